"""Weighted energy / force / stress loss, masked so padding never counts.

    L = w_E · mean_g ((E_g − Ê_g)/N_g)² + w_F · mean_{i,α} (F_iα − F̂_iα)² + w_σ · mean_g,ab (σ − σ̂)²

Energy errors are taken per atom so large cells do not dominate (MACE's "weighted"
loss). With ``kind: huber`` each squared error is replaced by a Huber loss.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mlip.graph import AtomsGraph
from mlip.training.config import LossConfig


def _penalty(error: jnp.ndarray, config: LossConfig) -> jnp.ndarray:
    if config.kind == "huber":
        return optax.losses.huber_loss(error, delta=config.huber_delta) * 2.0  # 2×: equals error² for small errors
    return error**2


def _masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss_terms(outputs: dict, graph: AtomsGraph, config: LossConfig) -> dict:
    """Per-term losses (unweighted) for one batch."""
    targets = graph.targets
    n_atoms = jnp.maximum(graph.n_node, 1).astype(outputs["energy"].dtype)
    graph_mask = graph.graph_mask.astype(outputs["energy"].dtype)
    energy_error = (outputs["energy"] - targets["energy"]) / n_atoms
    terms = {"energy": _masked_mean(_penalty(energy_error, config), targets["energy_mask"] * graph_mask)}
    if "forces" in outputs:
        force_mask = targets["forces_mask"] * graph.node_mask
        per_atom = jnp.mean(_penalty(outputs["forces"] - targets["forces"], config), axis=-1)
        terms["forces"] = _masked_mean(per_atom, force_mask)
    if "stress" in outputs:
        per_graph = jnp.mean(_penalty(outputs["stress"] - targets["stress"], config), axis=(-1, -2))
        terms["stress"] = _masked_mean(per_graph, targets["stress_mask"] * graph_mask)
    return terms


def total_loss(terms: dict, weights: dict) -> jnp.ndarray:
    """Σ weight × term; ``weights`` may hold traced values (they change during a run)."""
    return sum(weights[name] * value for name, value in terms.items())
