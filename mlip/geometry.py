"""Geometry of an `AtomsGraph` shared by the models and the physics terms: edge vectors, envelopes."""

from __future__ import annotations

import jax.numpy as jnp

from mlip.graph import AtomsGraph


def edge_vectors(positions: jnp.ndarray, cell: jnp.ndarray, graph: AtomsGraph) -> jnp.ndarray:
    """[E, 3] r_ij = r_j + S·cell − r_i, recomputed from positions so autodiff sees them."""
    sender_offset = jnp.einsum("ea,eab->eb", graph.shifts.astype(positions.dtype), cell[graph.edge_graph])
    return positions[graph.senders] + sender_offset - positions[graph.receivers]


def polynomial_envelope(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """u_p(x) for x = r / r_c, exactly zero for x >= 1 (with p − 1 vanishing derivatives there)."""
    envelope = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * x**p + p * (p + 2.0) * x ** (p + 1)
                - p * (p + 1.0) / 2.0 * x ** (p + 2))
    return jnp.where(x < 1.0, envelope, 0.0)
