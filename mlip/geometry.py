"""Geometry of an `AtomsGraph` shared by the models and the physics terms: edge vectors,
envelopes, and sums over each atom's edges in either edge layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlip.graph import AtomsGraph


def edge_vectors(positions: jnp.ndarray, cell: jnp.ndarray, graph: AtomsGraph) -> jnp.ndarray:
    """[E, 3] r_ij = r_j + S·cell − r_i, recomputed from positions so autodiff sees them."""
    sender_offset = jnp.einsum("ea,eab->eb", graph.shifts.astype(positions.dtype), cell[graph.edge_graph])
    return positions[graph.senders] + sender_offset - positions[graph.receivers]


def padded_edge_vectors(positions: jnp.ndarray, cell: jnp.ndarray, graph: AtomsGraph,
                        r_max: float) -> jnp.ndarray:
    """`edge_vectors` with each padding edge (zero length) replaced by one of length 2 r_max:
    beyond every cutoff, where envelopes are exactly zero, so no norm of zero (and no NaN in
    its gradient) is ever taken."""
    vectors = edge_vectors(positions, cell, graph)
    far = jnp.array([2.0 * r_max, 0.0, 0.0], vectors.dtype)
    return jnp.where(graph.edge_mask[:, None], vectors, far)


def sum_at_receivers(edge_values: jnp.ndarray, graph: AtomsGraph, num_nodes: int) -> jnp.ndarray:
    """Σ over each receiver's edges: a reshape in the dense [N, K] layout, a scatter otherwise."""
    k = graph.neighbours_per_node
    if k:
        return edge_values.reshape((num_nodes, k) + edge_values.shape[1:]).sum(axis=1)
    return jax.ops.segment_sum(edge_values, graph.receivers, num_nodes)


def max_at_receivers(edge_values: jnp.ndarray, graph: AtomsGraph, num_nodes: int) -> jnp.ndarray:
    """Max over each receiver's edges (−inf for a node without edges in the list layout)."""
    k = graph.neighbours_per_node
    if k:
        return edge_values.reshape((num_nodes, k) + edge_values.shape[1:]).max(axis=1)
    return jax.ops.segment_max(edge_values, graph.receivers, num_nodes)


def polynomial_envelope(x: jnp.ndarray, p: int) -> jnp.ndarray:
    """u_p(x) for x = r / r_c, exactly zero for x >= 1 (with p − 1 vanishing derivatives there)."""
    envelope = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * x**p + p * (p + 2.0) * x ** (p + 1)
                - p * (p + 1.0) / 2.0 * x ** (p + 2))
    return jnp.where(x < 1.0, envelope, 0.0)
