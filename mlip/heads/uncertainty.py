"""Readout heads that predict uncertainty: mean-variance estimation and shallow ensembles.

* `MeanVarianceHead` (METHODS.md §4.3): the per-atom energy of `EnergyHead` plus, per
  atom, a positive energy variance s_i (summed to the structure's σ_E², extensive like
  the energy) and one force variance shared by the three components (a scalar, so it
  cannot break equivariance). Variances are softplus of a learned offset plus a small
  MLP whose last layer starts at zero, so every atom starts at the same variance.
* `ShallowEnsembleHead` (METHODS.md §4.4): K independent `EnergyHead` readouts on one
  backbone, their parameters stacked on a leading axis (`flax.linen.vmap`), so the
  readout posterior is a stack of samples evaluated in one backbone pass.

Outputs are in the normalised units of the head (the potential applies scale² to
variances, see `mlip.potential`).
"""

from __future__ import annotations

import math
from typing import Any

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from mlip.heads.energy import EnergyHead
from mlip.registry import register_head


def inverse_softplus(value: float) -> float:
    """x with softplus(x) = value (> 0)."""
    return float(value + math.log(-math.expm1(-value)))


@register_head("mve")
class MeanVarianceHead(nn.Module):
    """Per-node normalised energy and variances.

    Returns:
        dict with ``energy`` [N], ``energy_variance`` [N] and ``forces_variance`` [N]
        (normalised units², > 0 before the potential's floor).
    """

    mlp_hidden: int = 16
    variance_hidden: int = 16
    initial_variance: float = 0.1
    variance_floor: float = 1e-6  # read by the potential (eV², (eV/Å)²), not used here

    @nn.compact
    def __call__(self, node_features: e3nn.IrrepsArray) -> dict:
        energy = EnergyHead(self.mlp_hidden, name="energy")(node_features)
        scalars = node_features.filter(keep="0e").array
        hidden = jax.nn.silu(nn.Dense(self.variance_hidden, name="variance_hidden")(scalars))
        # Zero last layer: all atoms start at softplus(offset) = initial_variance.
        raw = nn.Dense(2, kernel_init=nn.initializers.zeros, use_bias=False, name="variance_out")(hidden)
        offset = self.param("variance_offset", nn.initializers.constant(inverse_softplus(self.initial_variance)),
                            (2,), raw.dtype)
        variances = jax.nn.softplus(raw + offset)
        return {"energy": energy, "energy_variance": variances[:, 0], "forces_variance": variances[:, 1]}


def reset_variance_offset(params: Any, energy_variance: float, forces_variance: float) -> Any:
    """``params`` with the MVE head's variance offset set so σ² starts at the given values.

    Used when training switches from the MSE warm-up to the NLL (METHODS.md §4.3: σ should
    start near the current training error, not near 0 or far above it). Values are in
    the head's normalised units² (energy: per atom). Works on stacked parameters too.
    """
    from mlip.heads.fidelity import head_paths, tree_at, tree_with

    for path in head_paths(params):  # every fidelity's head of a multi-fidelity model
        offset = tree_at(params, path + ("variance_offset",))
        target = jnp.asarray([inverse_softplus(max(energy_variance, 1e-12)),
                              inverse_softplus(max(forces_variance, 1e-12))], offset.dtype)
        params = tree_with(params, path + ("variance_offset",), jnp.broadcast_to(target, offset.shape))
    return params


@register_head("shallow_ensemble")
class ShallowEnsembleHead(nn.Module):
    """K readouts with their own parameters on shared node features: [K, N] energies."""

    members: int = 8
    mlp_hidden: int = 16

    @nn.compact
    def __call__(self, node_features: e3nn.IrrepsArray) -> dict:
        readouts = nn.vmap(EnergyHead, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=None, out_axes=0, axis_size=self.members)
        return {"energy_members": readouts(self.mlp_hidden, name="readouts")(node_features)}
