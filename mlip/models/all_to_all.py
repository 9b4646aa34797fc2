"""All-to-all node attention (AllScAIP-style; METHODS.md §2.2), stacked after any backbone.

Each layer lets every atom attend to every atom of its own graph, on the backbone's
invariant features h [N, F] (pre-LayerNorm, residual):

    l_ijh = q_ih·k_jh / √d + Σ_b W_hb φ_b(r_ij)                 (masked to i, j in one graph)
    a_ijh = softmax_j(l_ijh),   o_ih = Σ_j a_ijh [v_jh, φ(r_ij)]
    h_i  += W_o o_i,            h_i += MLP(LayerNorm(h_i))

φ_b(r) = s_b / √(r² + s_b²), s_b from 1 to 32 Å on a log grid: smooth, finite at r = 0 and
≈ s_b/r far away, so the block can express Coulomb-like decay between atoms far beyond
the backbone's cutoff. Distances enter only for molecules (non-periodic graphs): in a
periodic cell the distance between two atoms depends on which images one picks, so
there the block attends on features alone, which makes it exact under supercells
(n copies of each key leave a softmax average unchanged). Everything is invariant, and
forces and stress stay derivatives of the one energy through every block.

Cost: O(N²) per graph (computed as O(N_batch²) with a block-diagonal mask, in query
blocks of ``QUERY_BLOCK`` rows so memory stays O(QUERY_BLOCK · N)). Above ``max_atoms``
padded atoms the block attends over the backbone's neighbour list instead (weights
c(r)·e^l with a null key, smooth at the cutoff): a different, local function, announced
by a warning when it is compiled. ``docs/benchmarks.md`` gives the size where the
quadratic block stops paying.
"""

from __future__ import annotations

import math
import warnings

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlip.geometry import max_at_receivers, padded_edge_vectors, sum_at_receivers
from mlip.graph import AtomsGraph
from mlip.models.transformer import cosine_cutoff

QUERY_BLOCK = 1024  # rows of the [queries, keys] attention computed at once
MASKED_LOGIT = -1e9  # not −inf: a padding row with every key masked stays finite


def distance_scales(num_basis: int) -> np.ndarray:
    return np.geomspace(1.0, 32.0, num_basis)


def distance_features(lengths_squared: jnp.ndarray, num_basis: int) -> jnp.ndarray:
    """[..., B] φ_b = s_b / √(r² + s_b²) from squared distances (no √ of zero anywhere)."""
    scales = jnp.asarray(distance_scales(num_basis), lengths_squared.dtype)
    return scales / jnp.sqrt(lengths_squared[..., None] + scales**2)


class AllToAllLayer(nn.Module):
    num_heads: int
    head_dim: int
    num_basis: int
    max_atoms: int
    cutoff: float

    @nn.compact
    def __call__(self, h: jnp.ndarray, graph: AtomsGraph, positions: jnp.ndarray, cell: jnp.ndarray):
        n, width = h.shape
        dtype = h.dtype
        heads, dim = self.num_heads, self.head_dim
        normed = nn.LayerNorm(param_dtype=dtype, name="norm")(h)
        project = lambda name: nn.Dense(heads * dim, param_dtype=dtype, name=name)(normed).reshape(n, heads, dim)
        query, key, value = project("query"), project("key"), project("value")
        # Without distance functions (TransIP's plain form) the attention sees features only.
        bias = nn.Dense(heads, use_bias=False, param_dtype=dtype, name="distance_bias") if self.num_basis else None
        # Molecules get distances; a periodic graph (non-zero cell) attends on features alone.
        molecular = ~jnp.any(cell != 0.0, axis=(1, 2))[graph.node_graph]  # [N]
        if n > self.max_atoms:
            warnings.warn(f"all-to-all attention over {n} atoms exceeds model.all_to_all.max_atoms="
                          f"{self.max_atoms}: attending over neighbours within {self.cutoff} Å instead "
                          "(a local function, not the trained all-to-all one)", stacklevel=2)
            mixed = self._neighbours(query, key, value, bias, molecular, graph, positions, cell)
        else:
            mixed = self._all_pairs(query, key, value, bias, molecular, graph, positions)
        h = h + nn.Dense(width, param_dtype=dtype, name="out")(mixed)
        hidden = nn.Dense(2 * width, param_dtype=dtype, name="mlp_hidden")(
            nn.LayerNorm(param_dtype=dtype, name="mlp_norm")(h))
        return h + nn.Dense(width, param_dtype=dtype, name="mlp_out")(jax.nn.silu(hidden))

    def _all_pairs(self, query, key, value, bias, molecular, graph, positions):
        n, heads, dim = query.shape
        valid = graph.node_mask
        if bias is not None:
            bias(jnp.zeros((1, self.num_basis), query.dtype))  # parameters exist for any first graph

        def rows(block_query, block_positions, block_graph, block_molecular):
            same = (block_graph[:, None] == graph.node_graph[None, :]) & valid[None, :]  # [B, N]
            with_distance = same & block_molecular[:, None] & molecular[None, :]
            squared = jnp.sum((block_positions[:, None, :] - positions[None, :, :]) ** 2, axis=-1)
            phi = jnp.where(with_distance[..., None], distance_features(squared, self.num_basis), 0.0)
            logits = jnp.einsum("bhd,nhd->bnh", block_query, key) / math.sqrt(dim)
            if bias is not None:
                logits = logits + bias(phi)
            weights = jax.nn.softmax(jnp.where(same[..., None], logits, MASKED_LOGIT), axis=1)
            mixed = jnp.einsum("bnh,nhd->bhd", weights, value)
            if bias is not None:
                mixed = jnp.concatenate([mixed, jnp.einsum("bnh,bnk->bhk", weights, phi)], axis=-1)
            return mixed.reshape(block_query.shape[0], -1)

        if n <= QUERY_BLOCK:
            return rows(query, positions, graph.node_graph, molecular)
        blocks = -(-n // QUERY_BLOCK)
        pad = blocks * QUERY_BLOCK - n

        def padded(x, fill=0):
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
            return x.reshape((blocks, QUERY_BLOCK) + x.shape[1:])

        # Padding queries belong to graph −1: every key masked, outputs dropped below.
        out = jax.lax.map(lambda args: jax.checkpoint(rows)(*args),
                          (padded(query), padded(positions), padded(graph.node_graph, -1), padded(molecular)))
        return out.reshape(blocks * QUERY_BLOCK, -1)[:n]

    def _neighbours(self, query, key, value, bias, molecular, graph, positions, cell):
        n, heads, dim = query.shape
        senders, receivers = graph.senders, graph.receivers
        vectors = padded_edge_vectors(positions, cell, graph, self.cutoff)
        squared = jnp.sum(vectors**2, axis=-1)
        phi = jnp.where(molecular[receivers][:, None], distance_features(squared, self.num_basis), 0.0)
        logits = jnp.sum(query[receivers] * key[senders], axis=-1) / math.sqrt(dim)  # [E, H]
        if bias is not None:
            logits = logits + bias(phi)
        # Null key of logit 0 (as in the transformer's softmax): smooth as atoms cross the cutoff.
        shift = jax.lax.stop_gradient(jnp.maximum(max_at_receivers(logits, graph, n), 0.0))
        weights = cosine_cutoff(jnp.sqrt(squared), self.cutoff)[:, None] * jnp.exp(logits - shift[receivers])
        weights = weights / (sum_at_receivers(weights, graph, n) + jnp.exp(-shift))[receivers]
        mixed = sum_at_receivers(weights[..., None] * value[senders], graph, n)
        if bias is not None:
            mixed = jnp.concatenate([mixed, sum_at_receivers(weights[..., None] * phi[:, None, :], graph, n)], axis=-1)
        return mixed.reshape(n, -1)


class AllToAllAttention(nn.Module):
    """``num_layers`` all-to-all layers on a backbone's invariant features: [N, F] -> [N, F] (0e).

    Attributes:
        num_layers, num_heads, head_dim: size of the block.
        num_basis: distance functions φ_b in the bias and the values (molecules only).
        max_atoms: padded atoms above which the block attends over neighbours only.
        cutoff: the backbone's cutoff, Å (for that neighbour-limited form).
    """

    num_layers: int = 1
    num_heads: int = 4
    head_dim: int = 16
    num_basis: int = 8
    max_atoms: int = 4096
    cutoff: float = 5.0

    @nn.compact
    def __call__(self, features: e3nn.IrrepsArray, graph: AtomsGraph, positions: jnp.ndarray,
                 cell: jnp.ndarray) -> e3nn.IrrepsArray:
        h = features.filter(keep="0e").array
        for layer in range(self.num_layers):
            h = AllToAllLayer(self.num_heads, self.head_dim, self.num_basis, self.max_atoms, self.cutoff,
                              name=f"layer_{layer}")(h, graph, positions, cell)
        h = jnp.where(graph.node_mask[:, None], h, 0.0)
        return e3nn.IrrepsArray(f"{h.shape[-1]}x0e", h)
