"""SWAG (METHODS.md §4.5): a Gaussian over the parameters visited late in training, and its draws.

Maddox, Izmailov, Garipov, Vetrov & Wilson 2019, "A Simple Baseline for Bayesian
Uncertainty in Deep Learning" (wjmaddox/swa_gaussian). After ``start_fraction`` of the
run the learning rate is held constant and the raw parameters θ (not the EMA) are
collected once per epoch or every ``collect_every_steps`` steps into running moments:

* the mean θ̄ and the diagonal variance, kept as a Welford sum of squared deviations
  M₂ = Σ (θ − θ̄)² (variance M₂/n). The textbook form θ̄² − θ̄² (second moment minus
  squared mean) cancels catastrophically in float32 once the spread is ~1e-4 of |θ|,
  which is exactly the regime of late training; Welford's update never subtracts two
  large numbers and keeps the variance ≥ 0.
* the last K = ``max_rank`` deviations θ − θ̄ (θ̄ after the update, as in the reference
  code) in a ring buffer D of K columns.

Sampling (`sample`), with K = min(count, max_rank) filled columns:

    θ = θ̄ + (s/√2) · sqrt(var) ⊙ z₁ + (s/√(2(K−1))) · D z₂,   z₁ ~ N(0, I_d), z₂ ~ N(0, I_K)

s multiplies standard deviations (METHODS.md's convention; the reference code's
``scale`` multiplies variances, so its 0.5 is s = √0.5 here). z₂ is one vector per
draw shared by every leaf, since D z₂ is a product over the whole flattened parameter
vector. The moments are a plain pytree of arrays, so they live in the training state
(``state["collection"]``), go into ``last.msgpack`` and carry over when a run resumes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mlip.errors import ConfigError
from mlip.uq.methods import MethodHooks, Posterior, register_hooks

# METHODS.md §4.5: clamp the diagonal variance before the square root. Only positive
# variances are floored: parameters that never moved keep exactly zero spread, so
# constant parameters give samples equal to θ̄ bit for bit (the §4.5 test).
VARIANCE_FLOOR = 1e-30


def init_moments(params: Any, max_rank: int) -> dict:
    """Empty SWAG moments for a parameter pytree.

    Returns:
        ``{"mean", "sum_sq"}``: pytrees shaped like ``params``; ``"deviations"``: pytree
        whose leaves have shape [max_rank, *leaf.shape]; ``"count"``: int32 scalar,
        the number of collected parameter sets.
    """
    if max_rank < 2:
        raise ConfigError(f"uncertainty.max_rank: {max_rank}; SWAG needs at least 2 deviation columns")
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"mean": zeros, "sum_sq": zeros,
            "deviations": jax.tree.map(lambda leaf: jnp.zeros((max_rank,) + leaf.shape, leaf.dtype), params),
            "count": jnp.zeros((), jnp.int32)}


def collect(moments: dict, params: Any) -> dict:
    """The moments with one more parameter set θ = ``params`` (jittable).

    Welford: δ = θ − θ̄_old, θ̄ = θ̄_old + δ/n, M₂ += δ ⊙ (θ − θ̄). The deviation θ − θ̄
    overwrites ring-buffer column (n − 1) mod K, so D holds the last K deviations.
    """
    count = moments["count"] + 1
    max_rank = jax.tree.leaves(moments["deviations"])[0].shape[0]
    column = (count - 1) % max_rank

    def update(mean, sum_sq, deviations, theta):
        delta = theta - mean
        mean = mean + delta / count.astype(mean.dtype)
        deviation = theta - mean
        return mean, sum_sq + delta * deviation, deviations.at[column].set(deviation)

    updated = jax.tree.map(update, moments["mean"], moments["sum_sq"], moments["deviations"], params)
    # jax.tree.map over three outputs gives a tree of tuples; split it along the params structure.
    treedef = jax.tree.structure(params)
    mean, sum_sq, deviations = (jax.tree.unflatten(treedef, part)
                                for part in zip(*treedef.flatten_up_to(updated)))
    return {"mean": mean, "sum_sq": sum_sq, "deviations": deviations, "count": count}


def diagonal_variance(moments: dict) -> Any:
    """Per-parameter variance M₂/n of the collected parameters (population variance, as θ̄² − θ̄²)."""
    count = jnp.maximum(moments["count"], 1)
    return jax.tree.map(lambda sum_sq: sum_sq / count.astype(sum_sq.dtype), moments["sum_sq"])


def rank(moments: dict) -> jnp.ndarray:
    """K, the filled deviation columns: min(count, max_rank)."""
    max_rank = jax.tree.leaves(moments["deviations"])[0].shape[0]
    return jnp.minimum(moments["count"], max_rank)


def sample(moments: dict, key: jax.Array, n_samples: int, scale: float) -> Any:
    """``n_samples`` SWAG draws as one posterior pytree (every leaf [n_samples, *leaf.shape]).

    Needs count ≥ 2 (a low-rank part needs K − 1 ≥ 1); `SWAGHooks.posterior` checks it
    with a clear message. Jittable with ``n_samples`` static.
    """
    mean, deviations = moments["mean"], moments["deviations"]
    leaves, treedef = jax.tree.flatten(mean)
    max_rank = jax.tree.leaves(deviations)[0].shape[0]
    filled = rank(moments)
    diagonal_key, low_rank_key = jax.random.split(key)
    leaf_keys = jax.random.split(diagonal_key, len(leaves))
    # One z₂ per draw for the whole parameter vector; unfilled columns do not count.
    z_low_rank = jax.random.normal(low_rank_key, (n_samples, max_rank))
    z_low_rank = jnp.where(jnp.arange(max_rank) < filled, z_low_rank, 0.0)
    low_rank_factor = scale / jnp.sqrt(2.0 * jnp.maximum(filled - 1, 1))
    diagonal_factor = scale / math.sqrt(2.0)

    def draw(theta_bar, variance, columns, leaf_key):
        dtype = theta_bar.dtype
        std = jnp.sqrt(jnp.where(variance > 0.0, jnp.maximum(variance, VARIANCE_FLOOR), 0.0))
        z_diagonal = jax.random.normal(leaf_key, (n_samples,) + theta_bar.shape, dtype)
        low_rank = jnp.tensordot(z_low_rank.astype(dtype), columns, axes=1)  # [S, *shape]
        return (theta_bar + diagonal_factor * std * z_diagonal
                + low_rank_factor.astype(dtype) * low_rank)

    variances = treedef.flatten_up_to(diagonal_variance(moments))
    columns = treedef.flatten_up_to(deviations)
    return jax.tree.unflatten(treedef, [draw(*parts) for parts in zip(leaves, variances, columns, leaf_keys)])


@register_hooks("swag")
class SWAGHooks(MethodHooks):
    """SWAG in the trainer: constant learning rate and collection late in the run, draws at the end.

    Design: the EMA stays on (validation and ``best.msgpack`` use it as for plain
    training), but SWAG collects the raw parameters, since an EMA of the iterates would
    shrink the spread SWAG measures. The posterior replaces the best checkpoint: its mean
    is the SWA average of the collected iterates.
    """

    uses_ema = True

    def __init__(self, trainer):
        super().__init__(trainer)
        self._collect = jax.jit(collect)
        training = trainer.config.training
        if self.settings.collect_every_steps is None and training.max_time is None:
            # An epoch budget fixes the progress at every epoch's end (epoch / max_epochs): a run
            # that would collect too few sets is refused now, not after its training.
            epochs = training.max_epochs
            count = sum(epoch / epochs >= self.settings.start_fraction for epoch in range(1, epochs + 1))
            if count < 2:
                raise self._too_few(count)

    def _too_few(self, count: int) -> ConfigError:
        settings = self.settings
        how_often = ("once per epoch" if settings.collect_every_steps is None
                     else f"every {settings.collect_every_steps} steps")
        return ConfigError(
            f"SWAG collects {count} parameter set(s) ({how_often} after uncertainty.start_fraction = "
            f"{settings.start_fraction} of the run) but needs at least 2: lower uncertainty.start_fraction, "
            "raise training.max_epochs (or training.max_time), or set uncertainty.collect_every_steps; "
            "`mlip train --resume RUN_DIR --set training.max_epochs=N` continues a stopped run")

    def learning_rate(self, learning_rate: float, progress: float) -> float:
        settings = self.settings
        if progress < settings.start_fraction:
            return learning_rate
        if settings.learning_rate is not None:
            return settings.learning_rate
        if self.trainer.config.training.schedule.name == "plateau":
            # The plateau rate does not depend on progress; its factor lives in the state.
            return learning_rate
        from mlip.training.trainer import learning_rate_at

        return learning_rate_at(self.trainer.config, settings.start_fraction, 1.0)

    def initial_collection(self, params: Any) -> dict:
        return init_moments(params, self.settings.max_rank)

    def after_epoch(self, collection: dict, state: dict, progress: float) -> dict:
        if self.settings.collect_every_steps is None and progress >= self.settings.start_fraction:
            return self._collect(collection, state["params"])
        return collection

    def after_step(self, collection: dict, state: dict, progress: float) -> dict:
        every = self.settings.collect_every_steps
        if every is not None and progress >= self.settings.start_fraction and state["step"] % every == 0:
            return self._collect(collection, state["params"])
        return collection

    def posterior(self, state: dict, best_params: Any) -> Posterior:
        settings, moments = self.settings, state["collection"]
        count = int(moments["count"])
        if count < 2:  # a time budget ran out, or the steps fell short
            raise self._too_few(count)
        key = jax.random.fold_in(jax.random.PRNGKey(self.trainer.config.seed), 0x5A6)
        draws = jax.jit(sample, static_argnums=2)(moments, key, settings.samples, settings.scale)
        return Posterior(params=draws, ddof=0,
                         details={"collected": count, "rank": int(rank(moments)), "scale": settings.scale})
