"""Stochastic-gradient MCMC (METHODS.md §4.8): SGLD and SGHMC samplers and the hooks that collect their chains.

The samplers are optax transformations that take the per-step ``key`` and
``learning_rate`` the trainer passes to every update. They see the gradient g of the
trainer's loss L (a batch mean over structures) and sample the posterior

    p(θ | data) ∝ exp(−Ũ(θ)/T),   Ũ = N·L + ½ λ |θ|²

(N training structures, λ the prior precision, T the temperature; T < 1 is a cold
posterior). Step sizes are set by ``learning_rate`` α so that the drift equals a plain
optimizer step of size α on the per-structure potential Ũ/N (see `sgmcmc_sampler`).

`SGMCMCHooks` runs ``chains`` chains stacked like deep-ensemble members (each gets its
own key every step, hence its own noise), keeps no EMA, and after ``burn_in_fraction``
of the run collects ``samples_per_chain`` evenly spaced states of every chain into a
ring buffer in the training state (so ``last.msgpack`` holds it and a resumed run goes
on). All collected states form the posterior (ddof = 0: draws from one distribution).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlip.errors import ConfigError
from mlip.uq.methods import MethodHooks, Posterior, register_hooks

SAMPLERS = ("sgld", "sghmc")


class SGMCMCState(NamedTuple):
    """Sampler state; pytrees are () where the variant does not need them.

    Attributes:
        count: updates so far (int32 scalar), for the RMSprop bias correction.
        second_moment: RMSprop average V of the squared per-structure gradient of Ũ/N
            (like the parameters), or () without preconditioning.
        velocity: SGHMC velocity v in parameter units per step (like the parameters),
            or () for SGLD.
    """

    count: jnp.ndarray
    second_moment: Any
    velocity: Any


def sgmcmc_sampler(sampler: str, num_data: int, temperature: float = 1.0, friction: float = 0.05,
                   prior_precision: float = 0.0, preconditioned: bool = False,
                   preconditioner_decay: float = 0.999,
                   preconditioner_epsilon: float = 1e-5) -> optax.GradientTransformationExtraArgs:
    """SGLD or SGHMC as an optax transformation; the caller applies θ ← θ − α · updates.

    With ĝ = g + (λ/N) θ = ∇Ũ/N (g: gradient of the batch-mean loss), ξ ~ N(0, I) drawn
    per leaf from ``key``, α = ``learning_rate`` and G the preconditioner (1, or
    1/(ε + sqrt(V̂)) with V̂ the bias-corrected RMSprop average of ĝ²), the moves are

    * SGLD, η = α/N:   θ ← θ − η G ∇Ũ + sqrt(2 η T G) ξ
                         = θ − α G ĝ + sqrt(2 α T G / N) ξ
    * SGHMC, η = a α/N: v ← (1 − a) v − η G ∇Ũ + sqrt(2 a η T G) ξ,  θ ← θ + v
                         i.e. v ← (1 − a) v + a · (SGLD move)

    so the deterministic part of SGLD is a gradient step of size α on the mean loss,
    and SGHMC's velocity at steady drift is that same step (its momentum does not
    multiply the step by 1/a as a heavy-ball η = α/N would). Both target exp(−Ũ/T) as
    the step goes to zero; the preconditioned form drops the small drift-correction
    term (Li et al. 2016). G is updated before it is used.

    Args:
        sampler: "sgld" or "sghmc".
        num_data: N, training structures (the loss is a mean over them).
        temperature: T; scales the injected noise variance.
        friction: a, SGHMC's velocity decay per step, in (0, 1].
        prior_precision: λ of the Gaussian prior N(0, 1/λ) on every parameter.
        preconditioned: RMSprop preconditioning G (pSGLD / pSGHMC).
        preconditioner_decay: β of the RMSprop average. Without the drift-correction
            term, a G that follows θ quickly biases the samples (1-D Gaussian, exact
            gradients: β = 0.99, α = 0.04 gave ~6× the target variance; β = 0.999,
            α = 0.01 gave 4 % too much);
            a slow average keeps G nearly constant, for which the sampler is exact.
        preconditioner_epsilon: ε in G = 1/(ε + sqrt(V̂)), in units of the mean-loss
            gradient; bounds G by 1/ε, which bounds the noise on parameters the loss
            hardly touches.

    Returns:
        A transformation whose ``update(grads, state, params, *, key, learning_rate)``
        needs ``params`` (the prior term) and both keyword arguments.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"uncertainty.sampler: '{sampler}' is not one of {SAMPLERS}")
    if num_data < 1:
        raise ValueError(f"SG-MCMC needs at least one training structure, got num_data={num_data}")
    if not 0.0 < friction <= 1.0:
        raise ConfigError(f"uncertainty.friction: must lie in (0, 1], got {friction}")
    if temperature <= 0.0:
        raise ConfigError(f"uncertainty.temperature: must be positive, got {temperature}")
    sghmc = sampler == "sghmc"
    prior_per_structure = prior_precision / num_data

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return SGMCMCState(count=jnp.zeros([], jnp.int32),
                           second_moment=zeros() if preconditioned else (),
                           velocity=zeros() if sghmc else ())

    def update_fn(gradients, state, params=None, *, key=None, learning_rate=None, **unused):
        if params is None or key is None or learning_rate is None:
            raise ValueError("an SG-MCMC update needs params, key and learning_rate")
        count = state.count + 1
        # ∇Ũ/N: the scale of the mean loss, so ε, V and the learning rate keep their usual meaning.
        mean_gradient = jax.tree.map(lambda g, p: g + prior_per_structure * p, gradients, params)
        if preconditioned:
            second_moment = jax.tree.map(lambda v, g: preconditioner_decay * v + (1.0 - preconditioner_decay) * g**2,
                                         state.second_moment, mean_gradient)
            correction = 1.0 - preconditioner_decay ** count.astype(jnp.float32)
            gain = jax.tree.map(lambda v: 1.0 / (preconditioner_epsilon + jnp.sqrt(v / correction.astype(v.dtype))),
                                second_moment)
        else:
            second_moment = ()
            gain = jax.tree.map(lambda g: jnp.ones([], g.dtype), mean_gradient)
        leaves, treedef = jax.tree.flatten(mean_gradient)
        leaf_keys = jax.random.split(key, len(leaves))
        noise = jax.tree.unflatten(treedef, [jax.random.normal(k, leaf.shape, leaf.dtype)
                                             for k, leaf in zip(leaf_keys, leaves)])

        def langevin_move(g, G, xi):
            alpha = jnp.asarray(learning_rate, g.dtype)
            return -alpha * G * g + jnp.sqrt(2.0 * alpha * temperature * G / num_data) * xi

        move = jax.tree.map(langevin_move, mean_gradient, gain, noise)
        if sghmc:
            velocity = jax.tree.map(lambda v, m: (1.0 - friction) * v + friction * m, state.velocity, move)
            move = velocity
        else:
            velocity = ()
        # The trainer applies θ − α · updates; α > 0 along every schedule (warm-up and cosine floors).
        safe_rate = jnp.maximum(jnp.asarray(learning_rate), 1e-30)
        updates = jax.tree.map(lambda m: -m / safe_rate.astype(m.dtype), move)
        return updates, SGMCMCState(count=count, second_moment=second_moment, velocity=velocity)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def plan_spacing(remaining_epochs: int, samples_wanted: int) -> int:
    """Epochs between collections so ``samples_wanted`` more fit into ``remaining_epochs`` (≥ 1)."""
    return max(1, int(remaining_epochs) // max(1, int(samples_wanted)))


@register_hooks("sgmcmc")
class SGMCMCHooks(MethodHooks):
    """sgmcmc: chains as stacked members, the sampler as optimizer, a ring buffer of states as posterior.

    Collection (host side, once per epoch at most): the first state after
    ``burn_in_fraction`` of the run is kept; after each kept state the next one is
    planned ``plan_spacing(remaining epochs, samples still wanted)`` epochs later, with
    the remaining epochs estimated from the progress so far (exact for runs limited by
    epochs, the wall-clock rate for runs limited by ``max_time``). Once
    ``samples_per_chain`` states are held, collecting goes on at the last spacing and
    overwrites the oldest, so a run that lasts longer than planned still ends with the
    last ``samples_per_chain`` evenly spaced states.
    """

    uses_ema = False  # averaging MCMC states is not sampling

    def __init__(self, trainer):
        super().__init__(trainer)
        self.num_data = len(trainer.train_samples)

    @classmethod
    def members_for(cls, settings) -> int:
        return settings.chains

    def optimizer(self, base: optax.GradientTransformation) -> optax.GradientTransformation:
        settings = self.settings
        return sgmcmc_sampler(settings.sampler, self.num_data, temperature=settings.temperature,
                              friction=settings.friction, prior_precision=settings.prior_precision,
                              preconditioned=settings.preconditioned,
                              preconditioner_decay=settings.preconditioner_decay,
                              preconditioner_epsilon=settings.preconditioner_epsilon)

    def initial_collection(self, params: Any) -> dict:
        """Ring buffer [samples_per_chain, chains, ...] per leaf plus the collection schedule."""
        slots = self.settings.samples_per_chain
        return {"samples": jax.tree.map(lambda leaf: np.zeros((slots,) + tuple(leaf.shape), np.asarray(leaf).dtype),
                                        params),
                "collected": np.asarray(0, np.int64),      # states kept so far (may exceed the slots)
                "next_epoch": np.asarray(-1, np.int64),    # −1: collect at the first epoch after burn-in
                "spacing": np.asarray(1, np.int64)}

    def after_epoch(self, collection: dict, state: dict, progress: float) -> dict:
        epoch = int(state["epoch"])
        if progress < self.settings.burn_in_fraction or epoch < int(collection["next_epoch"]):
            return collection
        slots = self.settings.samples_per_chain
        collected = int(collection["collected"])
        slot = collected % slots
        chain_params = jax.device_get(state["params"])
        samples = jax.tree.map(lambda buffer, leaf: _set_slot(buffer, slot, leaf), collection["samples"], chain_params)
        collected += 1
        # Epochs per unit progress so far gives the epochs left (max_epochs − epoch when limited by epochs).
        remaining = int(round(epoch * (1.0 - progress) / progress)) if progress > 0 else 0
        wanted = slots - collected
        spacing = plan_spacing(remaining, wanted) if wanted > 0 else int(collection["spacing"])
        return {"samples": samples, "collected": np.asarray(collected, np.int64),
                "next_epoch": np.asarray(epoch + spacing, np.int64), "spacing": np.asarray(spacing, np.int64)}

    def posterior(self, state: dict, best_params: Any) -> Posterior:
        """All kept states, chain-major: [chains · samples, ...] (best_params is ignored)."""
        settings = self.settings
        collection = state["collection"]
        kept = min(int(collection["collected"]), settings.samples_per_chain)
        if kept == 0:
            raise ConfigError(
                f"uncertainty.burn_in_fraction={settings.burn_in_fraction}: the run stopped at epoch "
                f"{state['epoch']} before any SG-MCMC state was collected; lower burn_in_fraction or give "
                "training.max_epochs / training.max_time more room")
        stacked = jax.tree.map(
            lambda buffer: jnp.asarray(np.swapaxes(np.asarray(buffer)[:kept], 0, 1).reshape((-1,) + buffer.shape[2:])),
            collection["samples"])
        return Posterior(params=stacked, ddof=0,
                         details={"chains": settings.chains, "samples_per_chain": kept,
                                  "temperature": settings.temperature, "sampler": settings.sampler})


def _set_slot(buffer: np.ndarray, slot: int, leaf) -> np.ndarray:
    buffer = np.array(buffer, copy=True)
    buffer[slot] = np.asarray(leaf)
    return buffer
