"""IVON: variational learning of a diagonal Gaussian posterior with an Adam-like optimizer (METHODS.md §4.6).

Shen et al. 2024, "Variational Learning is Effective for Large Deep Networks"; the update
is a transcription of ``IVON._update`` in team-approx-bayes/ivon ``ivon/_ivon.py``. The
posterior is q(θ) = N(m, diag(1/(λ(h + δ)))), λ the effective sample size, δ the
weight decay (prior precision per unit λ). Every step:

    ε ~ N(0, 1/(λ(h+δ)));  g = ∇ loss(m + ε)          (mean over the batch and the draws)
    ĥ = mean(ε ⊙ g) · λ(h+δ)                           (reparameterisation ("Price") Hessian)
    m_g ← β₁ m_g + (1−β₁) g
    h   ← β₂ h + (1−β₂) ĥ + ½(1−β₂)² (h − ĥ)² / (h + δ)   (the last term keeps h > 0)
    m   ← m − α (h₀+δ) · clip((m_g/(1−β₁ᵗ) + δ m)/(h + δ), ±r)

The trainer applies ``params − α · updates`` itself, so `ivon` returns
``(h₀+δ) · clip(...)``; with h = h₀ the first step is SGD with weight decay δ.
`IVONHooks` plugs it into the trainer: the gradient is taken at m + ε (`perturb`), and
after training ``samples`` draws from q around the final m form the posterior.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mlip.errors import ConfigError
from mlip.uq.methods import MethodHooks, Posterior, register_hooks
from mlip.uq.posterior import stack_samples


class IVONState(NamedTuple):
    """IVON's optimizer state.

    Attributes:
        momentum: m_g, gradient momentum, same pytree as the parameters.
        hessian: h, the diagonal Hessian estimate (loss per training structure, so
            λ(h+δ) is the posterior precision), same pytree as the parameters.
        count: t, updates done so far (int32 scalar), for the debiasing 1 − β₁ᵗ.
    """

    momentum: Any
    hessian: Any
    count: jax.Array


def ivon(effective_sample_size: float, beta1: float = 0.9, beta2: float = 0.99999, hess_init: float = 1.0,
         weight_decay: float = 1e-4, clip_radius: Optional[float] = None, debias: bool = True,
         momentum_clip_norm: Optional[float] = None) -> optax.GradientTransformationExtraArgs:
    """IVON as an optax transformation whose updates are to be scaled by −learning_rate.

    ``update(grads, state, params, *, noise=None, noise_grad=None)``: ``grads`` is the
    (draw-averaged) gradient at m + ε, ``params`` is m, and the Hessian estimate needs
    either ``noise`` ε (one draw; ε ⊙ g is formed here) or ``noise_grad``, the mean of
    ε ⊙ g over several draws. Both are pytrees like the parameters.

    Args:
        effective_sample_size: λ (> 0), the number of training examples the mean loss is over.
        beta1, beta2: momentum and Hessian averaging, in [0, 1).
        hess_init: h₀ > 0; also sets the first step to SGD scale (lr · (h₀+δ)/(h₀+δ)).
        weight_decay: δ > 0.
        clip_radius: r, elementwise clip of the preconditioned step; None: no clip.
        debias: divide m_g by 1 − β₁ᵗ (the reference's default).
        momentum_clip_norm: clip the global norm of g before it enters the momentum; ĥ
            always uses the unclipped g (a norm clip depends on g itself and would bias the
            Stein identity E[ε ⊙ g] = Var(ε) ∇²loss behind ĥ). None: no clip.
    """
    if not effective_sample_size > 0:
        raise ConfigError(f"uncertainty.effective_sample_size: must be > 0, got {effective_sample_size}")
    if not (hess_init > 0 and weight_decay > 0):
        raise ConfigError(f"uncertainty.hess_init and weight_decay must be > 0, got {hess_init}, {weight_decay}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ConfigError(f"uncertainty.beta1/beta2: must lie in [0, 1), got {beta1}, {beta2}")
    ess, delta = float(effective_sample_size), float(weight_decay)

    def init(params):
        return IVONState(momentum=jax.tree.map(jnp.zeros_like, params),
                         hessian=jax.tree.map(lambda p: jnp.full_like(p, hess_init), params),
                         count=jnp.zeros((), jnp.int32))

    def update(grads, state, params=None, *, noise=None, noise_grad=None, **extra):
        del extra  # key, learning_rate: IVON needs neither (the trainer scales by the rate)
        if params is None:
            raise ValueError("ivon: update needs params (the posterior mean m)")
        if noise_grad is None:
            if noise is None:
                raise ValueError("ivon: update needs the weight noise of this step (noise=ε or noise_grad=mean ε⊙g)")
            noise_grad = jax.tree.map(lambda e, g: e * g, noise, grads)
        count = state.count + 1
        momentum_grads = grads
        if momentum_clip_norm is not None:
            norm = optax.tree.norm(grads)
            momentum_grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, momentum_clip_norm / (norm + 1e-30)),
                                          grads)
        momentum = jax.tree.map(lambda m, g: beta1 * m + (1.0 - beta1) * g, state.momentum, momentum_grads)

        def new_hessian(h, eg):
            # ĥ uses the Hessian of the step's draw, i.e. before this update (as the reference).
            estimate = eg * (h + delta) * ess
            return beta2 * h + (1.0 - beta2) * estimate + 0.5 * (1.0 - beta2) ** 2 * (h - estimate) ** 2 / (h + delta)

        hessian = jax.tree.map(new_hessian, state.hessian, noise_grad)
        def direction(m_g, h, p):
            debiased = m_g / (1.0 - beta1 ** count.astype(p.dtype)) if debias else m_g
            step = debiased + delta * p
            step = step / (h + delta)
            if clip_radius is not None:
                step = jnp.clip(step, -clip_radius, clip_radius)
            return (hess_init + delta) * step

        updates = jax.tree.map(direction, momentum, hessian, params)
        return updates, IVONState(momentum=momentum, hessian=hessian, count=count)

    return optax.GradientTransformationExtraArgs(init, update)


def posterior_std(hessian: Any, effective_sample_size: float, weight_decay: float) -> Any:
    """σ = 1/sqrt(λ(h+δ)) per parameter, a pytree like ``hessian``."""
    return jax.tree.map(lambda h: jax.lax.rsqrt(effective_sample_size * (h + weight_decay)), hessian)


def draw_noise(key, hessian: Any, effective_sample_size: float, weight_decay: float) -> Any:
    """ε ~ N(0, diag(1/(λ(h+δ)))), a pytree like ``hessian``; every leaf gets its own key."""
    leaves, treedef = jax.tree.flatten(hessian)
    keys = jax.random.split(key, len(leaves))
    stds = jax.tree.leaves(posterior_std(hessian, effective_sample_size, weight_decay))
    noise = [std * jax.random.normal(k, h.shape, h.dtype) for k, h, std in zip(keys, leaves, stds)]
    return jax.tree.unflatten(treedef, noise)


def _ivon_state(opt_state) -> IVONState:
    if not isinstance(opt_state, IVONState):
        raise TypeError(f"ivon: expected the IVON optimizer state, got {type(opt_state).__name__}")
    return opt_state


@register_hooks("ivon")
class IVONHooks(MethodHooks):
    """uncertainty.method: ivon — IVON replaces Adam; its Gaussian is the posterior.

    ``training.optimizer``: only ``learning_rate`` (with the schedule) and
    ``clip_grad_norm`` (which clips g in the momentum, not in ĥ) apply; Adam's
    moments, amsgrad and weight decay do not (δ is ``uncertainty.weight_decay``).

    ``mc_samples`` > 1: the trainer takes that many draws per step (`gradient_draws`) and
    `combine_draws` averages g and ε ⊙ g over them, as the reference's Welford means.

    No EMA: h describes the spread around IVON's own m, and an average of m over the
    trajectory would pair that spread with another mean; the reference keeps none.
    Validation and the best checkpoint therefore use m itself.
    """

    uses_ema = False

    def __init__(self, trainer):
        super().__init__(trainer)
        settings = self.settings
        self.effective_sample_size = float(settings.effective_sample_size or len(trainer.train_samples))
        self.gradient_draws = int(settings.mc_samples)

    def optimizer(self, base: optax.GradientTransformation) -> optax.GradientTransformation:
        settings = self.settings
        return ivon(self.effective_sample_size, beta1=settings.beta1, beta2=settings.beta2,
                    hess_init=settings.hess_init, weight_decay=settings.weight_decay,
                    clip_radius=settings.clip_radius,
                    momentum_clip_norm=self.trainer.config.training.optimizer.clip_grad_norm)

    def perturb(self, params: Any, opt_state: Any, key) -> tuple[Any, dict]:
        noise = draw_noise(key, _ivon_state(opt_state).hessian, self.effective_sample_size,
                           self.settings.weight_decay)
        return jax.tree.map(jnp.add, params, noise), {"noise": noise}

    def combine_draws(self, grads: Any, update_args: dict) -> tuple[Any, dict]:
        """Several draws (leading axis S): the mean gradient and the mean ε ⊙ g, as the reference."""
        noise_grad = jax.tree.map(lambda e, g: jnp.mean(e * g, axis=0), update_args["noise"], grads)
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), {"noise_grad": noise_grad}

    def posterior(self, state: dict, best_params: Any) -> Posterior:
        """``samples`` draws θ ~ N(m, 1/(λ(h+δ))) around the final m.

        The final m, not the best checkpoint: h is the final one, and mean and spread
        should come from the same step of the run.
        """
        settings = self.settings
        hessian = _ivon_state(state["opt_state"]).hessian
        mean = state["params"]
        key = jax.random.fold_in(jax.random.PRNGKey(self.trainer.config.seed), 0x1F0)
        draws = [jax.tree.map(jnp.add, mean, draw_noise(k, hessian, self.effective_sample_size,
                                                         settings.weight_decay))
                 for k in jax.random.split(key, settings.samples)]
        stds = jnp.concatenate([leaf.ravel() for leaf in
                                jax.tree.leaves(posterior_std(hessian, self.effective_sample_size,
                                                              settings.weight_decay))])
        hess = jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(hessian)])
        details = {"effective_sample_size": self.effective_sample_size, "weight_decay": settings.weight_decay,
                   "hess_init": settings.hess_init, "mean": "final",
                   "posterior_std_median": float(jnp.median(stds)),
                   "hessian_min": float(jnp.min(hess)), "hessian_median": float(jnp.median(hess))}
        if not math.isfinite(details["hessian_median"]):
            raise FloatingPointError("ivon: the Hessian estimate is not finite; lower training.optimizer.learning_rate")
        return Posterior(params=stack_samples(draws), ddof=0, details=details)
