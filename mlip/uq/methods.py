"""How an uncertainty method changes a training run, and the posterior it leaves behind.

The trainer (`mlip.training.trainer.Trainer`) runs one loop for every method and asks
the method's `MethodHooks` at five points:

* ``optimizer(base)``: the gradient transformation (IVON and SG-MCMC replace Adam).
  The train step calls ``update(grads, opt_state, params, key=..., learning_rate=...,
  **extra)``; transformations that do not take these arguments never see them
  (``optax.chain`` drops them), so plain optax transformations work unchanged.
* ``perturb(params, opt_state, key)``: the parameters the gradient is taken at, plus
  extra update arguments (IVON evaluates the loss at m + ε and passes ε on).
* ``learning_rate(lr, progress)``: SWAG holds the rate constant while it collects.
* ``initial_collection(params)`` / ``after_epoch(collection, state, progress)``: a
  pytree the method accumulates during training (SWAG moments, SG-MCMC samples). It
  lives in the training state, so ``last.msgpack`` holds it and resumed runs go on.
* ``posterior(state, best_params)``: after the last epoch, the stack of parameter
  samples that predicts (a `Posterior`), or None to predict with the trained members.

A method's hooks live in ``mlip.uq.<method>`` and register themselves with
`register_hooks`; `hooks_for` imports that module on first use, so adding a method
adds a module and a config class and touches neither this file nor the trainer.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Optional

import jax
import optax

_HOOKS: dict = {}


def register_hooks(method: str):
    """Class decorator: the `MethodHooks` subclass for ``uncertainty.method: <method>``."""
    def decorate(cls):
        _HOOKS[method] = cls
        return cls
    return decorate


@dataclasses.dataclass
class Posterior:
    """What a method leaves to predict with.

    Attributes:
        params: parameter pytree with a leading axis of S samples.
        ddof: 1 for independent fits, 0 for draws from one posterior (§4.1).
        model_config: the `ModelConfig` the samples belong to (Laplace turns the
            energy head into a K-readout head); None keeps the run's.
        details: written into model.json's ``uncertainty`` (e.g. the prior precision).
    """

    params: Any
    ddof: int = 0
    model_config: Any = None
    details: dict = dataclasses.field(default_factory=dict)


class MethodHooks:
    """Plain training: the defaults every hook falls back to.

    Attributes:
        trainer: the `Trainer` (its config, statistics, samples, potential, predictor).
        settings: ``trainer.config.uncertainty``.
        training_members: leading parameter axis while training (deep-ensemble members,
            SG-MCMC chains; 1 for a single model that predicts a Gaussian); None for
            an ordinary single model.
        uses_ema: False where an exponential moving average would corrupt the method
            (averaging MCMC states is not sampling); the trainer then keeps no EMA.
    """

    training_members: Optional[int] = None
    uses_ema: bool = True
    # Weight draws per step (IVON's mc_samples): `perturb` is called with one key per draw
    # and `combine_draws` reduces the S gradients and update arguments to one.
    gradient_draws: int = 1

    def __init__(self, trainer):
        self.trainer = trainer
        self.settings = trainer.config.uncertainty
        self.training_members = self.members_for(self.settings)

    @classmethod
    def members_for(cls, settings) -> Optional[int]:
        """``training_members`` from the uncertainty settings alone (the stacked axis of a run's
        ``best.msgpack``, which fine-tuning from that run must know before it loads it)."""
        return cls.training_members

    def optimizer(self, base: optax.GradientTransformation) -> optax.GradientTransformation:
        return base

    def perturb(self, params: Any, opt_state: Any, key) -> tuple[Any, dict]:
        """(parameters to take the gradient at, extra keyword arguments for ``update``)."""
        return params, {}

    def combine_draws(self, grads: Any, update_args: dict) -> tuple[Any, dict]:
        """Gradients and update arguments of ``gradient_draws`` draws (leading axis S) → one step's."""
        mean = lambda tree: jax.tree.map(lambda leaf: leaf.mean(axis=0), tree)  # noqa: E731
        return mean(grads), mean(update_args)

    def learning_rate(self, learning_rate: float, progress: float) -> float:
        return learning_rate

    def initial_collection(self, params: Any) -> Any:
        return None

    def after_epoch(self, collection: Any, state: dict, progress: float) -> Any:
        """Host side, after every epoch (before validation); returns the new collection."""
        return collection

    def after_step(self, collection: Any, state: dict, progress: float) -> Any:
        """Host side, after every train step; returns the new collection (SWAG collecting by steps)."""
        return collection

    def posterior(self, state: dict, best_params: Any) -> Optional[Posterior]:
        return None


class EnsembleHooks(MethodHooks):
    """deep_ensemble: M members trained side by side; the members are the posterior."""

    uses_ema = True

    @classmethod
    def members_for(cls, settings) -> int:
        return settings.members


class GaussianHeadHooks(MethodHooks):
    """mve, shallow_ensemble: one model whose head predicts a Gaussian, stored as one sample."""

    training_members = 1


_BUILT_IN = {"none": MethodHooks, "deep_ensemble": EnsembleHooks, "mve": GaussianHeadHooks,
             "shallow_ensemble": GaussianHeadHooks}


def hooks_class(method: str) -> type:
    """The `MethodHooks` class of ``uncertainty.method: <method>``."""
    if method in _BUILT_IN:
        return _BUILT_IN[method]
    if method not in _HOOKS:
        importlib.import_module(f"mlip.uq.{method}")
    return _HOOKS[method]


def hooks_for(trainer) -> MethodHooks:
    """The hooks of ``trainer.config.uncertainty.method``."""
    return hooks_class(trainer.config.uncertainty.method)(trainer)
