"""Equivariant transformer backbone (TorchMD-Net ET family; METHODS.md §2.1): AtomsGraph -> scalars.

Every atom carries scalars x_i ∈ R^F and vectors v_i ∈ R^{3×F} (v starts at zero). Each
layer, on LayerNorm(x), computes per edge j → i (r̂_ij, r_ij = |r_ij|, f_ij the expnorm
radial basis, c the cosine cutoff, φ = SiLU):

    a_ij  = φ_attn( Σ_{f in head} q_i k_j φ(D_k f_ij) ) · c(r_ij)       (per head)
    (s¹, s², s³)_j = (W_v x_j) ⊙ φ(D_v f_ij)
    Δx_i  = Σ_j a_ij s¹_j,     Δv_i = Σ_j c(r_ij) (v_j ⊙ s²_j + s³_j ⊗ r̂_ij)
    (u¹, u², u³) = W_vec v_i,  (o¹, o², o³) = W_o Δx_i
    x_i += (u¹·u²) ⊙ o² + o³,  v_i += u³ ⊙ o¹ + Δv_i

Departures from torchmd-net, each for a reason:
  * every message path is multiplied by c(r_ij), the vector messages included (torchmd's
    ``vector_cutoff``): otherwise the energy jumps when an atom crosses r_c.
  * ``attention: softmax`` normalises over the neighbours *and a null key of logit 0*,
    with weights c(r_ij)·e^{l_ij} / (Σ_j c e^{l} + 1): an atom that leaves the cutoff
    fades out smoothly instead of renormalising the others with a jump, and an atom
    with no neighbour attends to nothing (no 0/0). The √(2d) temperature is CMRET's.
  * total charge and spin enter the initial scalars through `ChargeSpinEmbedding`
    (learned, zero for a neutral singlet), not as a constant added to the Cartesian
    components of v, which would not be equivariant (METHODS.md §2.1).

The backbone returns LayerNorm(x) of the last layer ([N, F], 0e) for any head; with
Ewald message passing a long-range update is added to x after every layer.

References:
    Thölke & De Fabritiis, ICLR 2022, arXiv:2202.02541 (torchmd/torchmd-net).
    Tao, Morimoto & Leoni 2023, arXiv:2308.10752 (CMRET: charge, spin, softmax temperature).
"""

from __future__ import annotations

import math
from typing import Optional

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from mlip.geometry import max_at_receivers, padded_edge_vectors, sum_at_receivers
from mlip.graph import AtomsGraph
from mlip.models.embedding import ChargeSpinEmbedding, FidelityEmbedding
from mlip.models.mace import species_index_table
from mlip.physics.ewald_message_passing import EwaldBlock
from mlip.registry import register_backbone


def cosine_cutoff(lengths: jnp.ndarray, r_max: float) -> jnp.ndarray:
    """½(cos(π r/r_c) + 1) inside the cutoff, 0 beyond."""
    return jnp.where(lengths < r_max, 0.5 * (jnp.cos(math.pi * lengths / r_max) + 1.0), 0.0)


class ExpNormalBasis(nn.Module):
    """torchmd-net's expnorm radial basis, trainable: c(r) exp(−β_b (e^{−α r} − μ_b)²), α = 5/r_c."""

    r_max: float
    num_basis: int

    @nn.compact
    def __call__(self, lengths: jnp.ndarray) -> jnp.ndarray:
        dtype = lengths.dtype
        start = math.exp(-self.r_max)
        means = self.param("means", lambda _, shape: jnp.linspace(start, 1.0, shape[0], dtype=dtype),
                           (self.num_basis,))
        betas = self.param("betas", lambda _, shape: jnp.full(shape, (2.0 / shape[0] * (1 - start)) ** -2, dtype),
                           (self.num_basis,))
        alpha = 5.0 / self.r_max
        expanded = jnp.exp(-betas * (jnp.exp(-alpha * lengths)[:, None] - means) ** 2)
        return cosine_cutoff(lengths, self.r_max)[:, None] * expanded


class NeighbourEmbedding(nn.Module):
    """torchmd-net's initial scalars: x_i = W [e(Z_i), Σ_j c(r_ij) (D f_ij) ⊙ e'(Z_j)]."""

    num_channels: int
    num_species: int

    @nn.compact
    def __call__(self, species_index, edge_basis, edge_cutoff, graph: AtomsGraph, dtype) -> jnp.ndarray:
        own = nn.Embed(self.num_species, self.num_channels, param_dtype=dtype, name="embedding")(species_index)
        neighbour = nn.Embed(self.num_species, self.num_channels, param_dtype=dtype,
                             name="neighbour_embedding")(species_index)
        weights = nn.Dense(self.num_channels, param_dtype=dtype, name="distance")(edge_basis) * edge_cutoff[:, None]
        gathered = sum_at_receivers(weights * neighbour[graph.senders], graph, own.shape[0])
        return nn.Dense(self.num_channels, param_dtype=dtype, name="combine")(
            jnp.concatenate([own, gathered], axis=-1))


class EquivariantAttention(nn.Module):
    """One ET layer's update (Δx [N, F], Δv [N, 3, F]) from LayerNorm(x) and v."""

    num_channels: int
    num_heads: int
    attention: str  # "silu" | "softmax"

    @nn.compact
    def __call__(self, x, vectors, edge_basis, edge_cutoff, unit_vectors, graph: AtomsGraph):
        n, f, h = x.shape[0], self.num_channels, self.num_heads
        dtype = x.dtype
        dense = lambda size, name, bias=True: nn.Dense(size, use_bias=bias, param_dtype=dtype, name=name)
        query = dense(f, "query")(x).reshape(n, h, f // h)
        key = dense(f, "key")(x).reshape(n, h, f // h)
        value = dense(3 * f, "value")(x)
        u1, u2, u3 = jnp.split(dense(3 * f, "vector_proj", bias=False)(vectors), 3, axis=-1)  # [N, 3, F] each
        key_filter = jax.nn.silu(dense(f, "key_filter")(edge_basis)).reshape(-1, h, f // h)
        value_filter = jax.nn.silu(dense(3 * f, "value_filter")(edge_basis))

        senders, receivers = graph.senders, graph.receivers
        logits = jnp.sum(query[receivers] * key[senders] * key_filter, axis=-1)  # [E, H]
        if self.attention == "softmax":
            logits = logits / math.sqrt(2.0 * (f // h))  # CMRET's temperature √(2d)
            # Null key of logit 0; the shift m ≥ 0 only keeps exp finite (it cancels).
            shift = jax.lax.stop_gradient(jnp.maximum(max_at_receivers(logits, graph, n), 0.0))
            weights = edge_cutoff[:, None] * jnp.exp(logits - shift[receivers])
            norm = sum_at_receivers(weights, graph, n) + jnp.exp(-shift)
            attention = weights / norm[receivers]
        else:
            attention = jax.nn.silu(logits) * edge_cutoff[:, None]
        s1, s2, s3 = jnp.split(value[senders] * value_filter, 3, axis=-1)  # [E, F] each
        scalar_messages = (s1.reshape(-1, h, f // h) * attention[..., None]).reshape(-1, f)
        vector_messages = edge_cutoff[:, None, None] * (vectors[senders] * s2[:, None, :]
                                                         + s3[:, None, :] * unit_vectors[:, :, None])
        delta_x = sum_at_receivers(scalar_messages, graph, n)
        delta_v = sum_at_receivers(vector_messages, graph, n)
        o1, o2, o3 = jnp.split(dense(3 * f, "out")(delta_x), 3, axis=-1)
        dot = jnp.sum(u1 * u2, axis=1)  # [N, F]: invariant
        return dot * o2 + o3, u3 * o1[:, None, :] + delta_v


@register_backbone("transformer")
class EquivariantTransformer(nn.Module):
    """Equivariant transformer backbone: AtomsGraph -> per-node invariant features [N, F].

    Attributes:
        atomic_numbers: elements the model knows (sorted).
        avg_num_neighbors: unused (attention weights are learned); accepted like every backbone.
        r_max: cutoff radius, Å.
        num_rbf: expnorm radial basis functions.
        num_channels: F, scalar and vector channels (a multiple of num_heads).
        num_heads: attention heads.
        num_layers: attention layers.
        attention: "silu" (torchmd-net's unnormalised weights) or "softmax" (with a null key).
        charge_spin_embedding: add `ChargeSpinEmbedding` of total charge and spin to the
            initial scalars.
        ewald_message_passing: `EwaldBlock` settings for a long-range update of x after
            every layer, or None.
        num_fidelities: >0 adds a `FidelityEmbedding` of the graph's level of theory to the
            initial scalars.
    """

    atomic_numbers: tuple[int, ...]
    avg_num_neighbors: float = 1.0
    r_max: float = 5.0
    num_rbf: int = 32
    num_channels: int = 64
    num_heads: int = 4
    num_layers: int = 4
    attention: str = "silu"
    charge_spin_embedding: bool = True
    ewald_message_passing: Optional[dict] = None
    num_fidelities: int = 0

    @property
    def feature_irreps(self) -> e3nn.Irreps:
        return e3nn.Irreps(f"{self.num_channels}x0e")

    @nn.compact
    def __call__(self, graph: AtomsGraph, positions: jnp.ndarray, cell: jnp.ndarray) -> e3nn.IrrepsArray:
        if self.num_channels % self.num_heads:
            raise ValueError(f"num_channels {self.num_channels} is not a multiple of num_heads {self.num_heads}")
        dtype = positions.dtype
        n = positions.shape[0]
        species_index = jnp.asarray(species_index_table(self.atomic_numbers))[graph.species]
        vectors = padded_edge_vectors(positions, cell, graph, self.r_max)
        lengths = jnp.linalg.norm(vectors, axis=-1)
        unit_vectors = vectors / lengths[:, None]
        edge_cutoff = cosine_cutoff(lengths, self.r_max)
        edge_basis = ExpNormalBasis(self.r_max, self.num_rbf, name="radial_basis")(lengths)

        x = NeighbourEmbedding(self.num_channels, len(self.atomic_numbers), name="neighbour_embedding")(
            species_index, edge_basis, edge_cutoff, graph, dtype)
        if self.charge_spin_embedding:
            x = x + ChargeSpinEmbedding(self.num_channels, name="charge_spin")(graph, dtype)
        if self.num_fidelities:
            x = x + FidelityEmbedding(self.num_fidelities, self.num_channels, name="fidelity")(graph, dtype)
        v = jnp.zeros((n, 3, self.num_channels), dtype)
        for layer in range(self.num_layers):
            normed = nn.LayerNorm(param_dtype=dtype, name=f"norm_{layer}")(x)
            delta_x, delta_v = EquivariantAttention(self.num_channels, self.num_heads, self.attention,
                                                    name=f"attention_{layer}")(
                normed, v, edge_basis, edge_cutoff, unit_vectors, graph)
            x, v = x + delta_x, v + delta_v
            if self.ewald_message_passing is not None:
                x = x + EwaldBlock(channels=self.num_channels, **self.ewald_message_passing,
                                   name=f"ewald_{layer}")(x, graph, positions, cell)
        x = nn.LayerNorm(param_dtype=dtype, name="out_norm")(x)
        return e3nn.IrrepsArray(f"{self.num_channels}x0e", jnp.where(graph.node_mask[:, None], x, 0.0))
