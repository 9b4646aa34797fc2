"""Embeddings of a graph's total charge and spin, and of its level of theory, into its atoms' features.

A local model sees only geometry, so a cation and the neutral molecule of the same
geometry look alike to it. With the embedding every atom of graph g adds

    e_g = W₂ SiLU(W₁ [Q_g, S_g − 1])        (Q total charge in e, S spin multiplicity)

to its invariant input features. There are no biases, so a neutral singlet adds exactly
zero: switching the embedding on leaves such data's model unchanged at any weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlip.graph import AtomsGraph


class ChargeSpinEmbedding(nn.Module):
    """[N, num_channels] per-atom features from the total charge and spin of each atom's graph."""

    num_channels: int

    @nn.compact
    def __call__(self, graph: AtomsGraph, dtype) -> jnp.ndarray:
        per_graph = jnp.stack([graph.charge, graph.spin - 1.0], axis=-1).astype(dtype)  # [G, 2]
        init = nn.initializers.normal(stddev=1.0)
        hidden = jax.nn.silu(nn.Dense(self.num_channels, use_bias=False, kernel_init=init, param_dtype=dtype,
                                      name="hidden")(per_graph))
        out = nn.Dense(self.num_channels, use_bias=False, param_dtype=dtype, name="out")(hidden)
        return out[graph.node_graph]


class FidelityEmbedding(nn.Module):
    """[N, num_channels] a learned vector per level of theory (``graph.fidelity``), for a
    multi-fidelity model with ``model.fidelity_embedding`` (added to the initial features)."""

    num_fidelities: int
    num_channels: int

    @nn.compact
    def __call__(self, graph: AtomsGraph, dtype) -> jnp.ndarray:
        table = nn.Embed(self.num_fidelities, self.num_channels, param_dtype=dtype,
                         embedding_init=nn.initializers.normal(stddev=0.1), name="table")
        return table(graph.fidelity)[graph.node_graph].astype(dtype)
