"""Latent Ewald summation (LES, Cheng 2025; METHODS.md §3.3): learned charges, exact electrostatics.

A small MLP maps each atom's invariant features to a latent charge; the charges are
shifted uniformly so that every graph carries its total charge (`AtomsGraph.charge`,
METHODS.md §3.4), and their Gaussian-charge Coulomb energy (`gaussian_charge_energy`:
reciprocal space for periodic graphs, the erf direct sum otherwise) is added to the
local energy. No charge labels are needed: the charges are whatever makes the total
energy right, and the calculator reports them.
"""

from __future__ import annotations

import math

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from mlip.graph import AtomsGraph
from mlip.physics.ewald import gaussian_charge_energy
from mlip.registry import register_long_range


def conserve_total_charge(charges: jnp.ndarray, total_charge: jnp.ndarray, node_graph: jnp.ndarray,
                          node_mask: jnp.ndarray) -> jnp.ndarray:
    """[N] q_i + (Q_g − Σ_{j∈g} q_j)/N_g on real atoms, 0 on padding: each graph sums to its Q_g."""
    n_graph = total_charge.shape[0]
    charges = jnp.where(node_mask, charges, 0.0)
    count = jax.ops.segment_sum(node_mask.astype(charges.dtype), node_graph, n_graph)
    excess = total_charge.astype(charges.dtype) - jax.ops.segment_sum(charges, node_graph, n_graph)
    correction = excess / jnp.maximum(count, 1.0)
    return jnp.where(node_mask, charges + correction[node_graph], 0.0)


@register_long_range("les")
class LatentEwald(nn.Module):
    """Latent charges from node features and their Ewald energy.

    Attributes:
        sigma: pair width σ of the Gaussian charges, Å (α = 1/(√2 σ)).
        k_resolution: dl, Å; the reciprocal sum keeps |k| ≤ 2π/dl.
        charge_mlp: hidden sizes of the charge MLP (SiLU).
        element_features: size of the element embedding the charge MLP reads beside the
            backbone's features.
    """

    sigma: float = 1.0
    k_resolution: float = 2.0
    charge_mlp: tuple[int, ...] = (16,)
    element_features: int = 8

    @property
    def k_cutoff(self) -> float:
        return 2.0 * math.pi / self.k_resolution

    @nn.compact
    def __call__(self, node_features: e3nn.IrrepsArray, graph: AtomsGraph, positions: jnp.ndarray,
                 cell: jnp.ndarray) -> dict:
        """``charges`` [N] (e, summing to each graph's total charge) and ``energy`` [N] (eV per atom)."""
        # The element enters directly as well: an atom with no neighbour within the cutoff has
        # zero backbone features, and an isolated Na⁺ must still differ from an isolated Cl⁻.
        element = nn.Embed(119, self.element_features, name="element")(graph.species)
        hidden = jnp.concatenate([node_features.filter(keep="0e").array, element.astype(positions.dtype)], axis=-1)
        for index, features in enumerate(self.charge_mlp):
            hidden = jax.nn.silu(nn.Dense(features, name=f"hidden_{index}")(hidden))
        raw = nn.Dense(1, name="charge")(hidden)[:, 0]
        charges = conserve_total_charge(raw, graph.charge, graph.node_graph, graph.node_mask)
        energy = gaussian_charge_energy(charges, positions, cell, graph.node_graph, graph.k_indices, self.sigma,
                                        graph.mesh_shape, self.k_cutoff)
        return {"charges": charges, "energy": jnp.where(graph.node_mask, energy, 0.0)}
