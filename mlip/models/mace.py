"""MACE-class backbone: equivariant convolutions with higher body order (e3nn-jax, flax).

Per layer t, for receiver i and neighbours j (periodic images included):

    A_i = (1/avg_num_neighbors) Σ_j R(r_ij) ⊙ [ Y(r̂_ij) ⊗ W_up h_j ]       (atomic basis)
    B_i = SymmetricContraction_{Z_i}(A_i)                                 (correlation ν)
    h_i ← Linear(B_i) + Linear_{Z_i}(h_i)                                 (species skip)

The backbone returns the invariant (0e) channels of every layer, concatenated, as
per-node features [N, num_interactions * num_channels]; a head turns them into
energies. It knows nothing of energy, forces or normalisation.

References:
    Batatia et al., NeurIPS 2022, arXiv:2206.07697 (ACEsuit/mace, ACEsuit/mace-jax).
"""

from __future__ import annotations

from typing import Optional, Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlip.geometry import padded_edge_vectors
from mlip.graph import AtomsGraph
from mlip.models.embedding import ChargeSpinEmbedding, FidelityEmbedding
from mlip.models.radial import radial_embedding
from mlip.models.symmetric_contraction import SymmetricContraction, irreps_up_to
from mlip.physics.ewald_message_passing import EwaldBlock
from mlip.registry import register_backbone


def species_index_table(atomic_numbers: Sequence[int]) -> np.ndarray:
    """[119] map from atomic number to the model's element index (unknown -> 0)."""
    table = np.zeros(119, np.int32)
    for index, z in enumerate(atomic_numbers):
        table[z] = index
    return table


def tensor_product_paths(irreps_in: e3nn.Irreps, irreps_sh: e3nn.Irreps,
                         filter_ir_out: e3nn.Irreps) -> list[tuple[int, int, int, e3nn.Irrep]]:
    """Paths (input chunk, harmonic chunk, multiplicity, l3) of e3nn.tensor_product, in its output order.

    e3nn loops over the (regrouped) input chunks, then the harmonic chunks, then l1 ⊗ l2,
    and sorts the outputs stably by irrep; the radial weights follow that order.
    """
    paths = []
    for index_in, (mul, ir_in) in enumerate(irreps_in.regroup()):
        for index_sh, (_, ir_sh) in enumerate(irreps_sh.regroup()):
            paths.extend((index_in, index_sh, mul, ir_out) for ir_out in ir_in * ir_sh
                         if ir_out in filter_ir_out)
    return sorted(paths, key=lambda path: path[3])  # sorted() is stable


def coupling_scale(ir_in: e3nn.Irrep, ir_sh: e3nn.Irrep, ir_out: e3nn.Irrep) -> float:
    """e3nn.tensor_product's factor on the Clebsch-Gordan coefficients."""
    return {"component": ir_out.dim ** 0.5, "norm": (ir_in.dim * ir_sh.dim) ** 0.5,
            "none": 1.0}[e3nn.config("irrep_normalization")]


def dense_convolution(node_features: e3nn.IrrepsArray, edge_sh: e3nn.IrrepsArray,
                      radial_weights: Sequence[jnp.ndarray], senders: jnp.ndarray,
                      neighbours_per_node: int, filter_ir_out: e3nn.Irreps) -> e3nn.IrrepsArray:
    """Σ_k R ⊙ (h[senders] ⊗ Y) per receiver, for edges in the dense [N, K] layout.

    Equal to ``scatter_sum(tensor_product(h[senders], Y, filter_ir_out) * R)`` (same
    irreps, same order, e3nn's normalisation), computed per path l1 ⊗ l2 → l3 as

        T[n, k, a, o] = Σ_b CG[a, b, o] Y[n, k, b]                    (no channel axis)
        A[n, c, o]    = Σ_{k, a} (R[n, k, c] h[j(n, k), c, a]) T[n, k, a, o]

    a batched matrix product per node that never writes the [E, C, 2 l3 + 1] message
    array. On a CPU, where the edge-list form is bound by memory traffic, this halves
    the time of the aggregation (scripts/benchmark_dense_aggregation.py).

    Args:
        node_features: [N, irreps] neighbour features h (a zero chunk gives a zero path).
        edge_sh: [E, irreps] edge harmonics Y, one copy of each degree.
        radial_weights: per path of ``tensor_product_paths``, [E, multiplicity] weights R.
        senders: [E] neighbour index of each edge, receiver-major (E = N K).
        neighbours_per_node: K.
        filter_ir_out: output irreps kept.
    """
    n = node_features.shape[0]
    k = neighbours_per_node
    node_features = node_features.regroup()
    edge_sh = edge_sh.regroup()
    neighbour_index = senders.reshape(n, k)
    gathered = [None if chunk is None else jnp.swapaxes(chunk, -1, -2)[neighbour_index]  # [N, K, 2 l1 + 1, C]
                for chunk in node_features.chunks]
    harmonics = [chunk.reshape(n, k, chunk.shape[-1]) for chunk in edge_sh.chunks]  # mul 1 each
    paths = tensor_product_paths(node_features.irreps, edge_sh.irreps, filter_ir_out)
    if len(radial_weights) != len(paths):
        raise ValueError(f"{len(radial_weights)} radial weight blocks for {len(paths)} paths")
    irreps_out, chunks = [], []
    for (index_in, index_sh, mul, ir_out), weights in zip(paths, radial_weights):
        irreps_out.append((mul, ir_out))
        if gathered[index_in] is None:  # a zero chunk (e3nn's None) stays zero
            chunks.append(None)
            continue
        ir_in, ir_sh = node_features.irreps[index_in].ir, edge_sh.irreps[index_sh].ir
        cg = e3nn.clebsch_gordan(ir_in.l, ir_sh.l, ir_out.l) * coupling_scale(ir_in, ir_sh, ir_out)
        coupling = jnp.einsum("nkb,abo->nkao", harmonics[index_sh], cg.astype(edge_sh.dtype))
        weighted = gathered[index_in] * weights.reshape(n, k, 1, mul)
        chunks.append(jnp.einsum("nkac,nkao->nco", weighted, coupling))
    return e3nn.from_chunks(irreps_out, chunks, (n,), node_features.dtype).regroup()


class _BlockDense(nn.Module):
    """A bias-free Dense layer whose output is returned as column blocks (flax's kernel)."""

    block_sizes: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        kernel = self.param("kernel", nn.initializers.normal(stddev=1.0),
                            (x.shape[-1], sum(self.block_sizes)), x.dtype)
        scale = x.shape[-1] ** -0.5
        bounds = np.cumsum((0,) + self.block_sizes)
        return [(x @ kernel[:, start:stop]) * scale for start, stop in zip(bounds[:-1], bounds[1:])]


class RadialMLP(nn.Module):
    """e3nn.flax.MultiLayerPerceptron (SiLU, no biases, "path" normalisation) with its
    last layer's output in column blocks: the same parameters and the same values.

    Why blocks: the dense convolution takes one block per path. From one [E, H]·[H, Σ]
    product read in slices, XLA on CPU fuses the concatenation of the slices' cotangents
    into the backward product and runs it as a loop, 3.6× the forward product's time
    (the largest single op of a force call); per-block products stay GEMMs.
    """

    hidden: tuple[int, ...]
    block_sizes: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        act = e3nn.normalize_function(jax.nn.silu)
        for features in self.hidden:
            dense = nn.Dense(features, use_bias=False, kernel_init=nn.initializers.normal(stddev=1.0),
                             param_dtype=x.dtype)
            x = act(x.shape[-1] ** -0.5 * dense(x))
        return _BlockDense(self.block_sizes, name=f"Dense_{len(self.hidden)}")(x)


class MACEInteraction(nn.Module):
    """One MACE layer: convolution to the atomic basis, symmetric contraction, skip."""

    num_channels: int
    hidden_irreps: str  # irreps of the output node features (per all channels)
    max_ell: int
    correlation: int
    radial_mlp: tuple[int, ...]
    avg_num_neighbors: float
    num_species: int
    residual: bool
    neighbours_per_node: int = 0  # K of a dense edge layout (AtomsGraph), 0: edge list

    @nn.compact
    def __call__(self, node_features: e3nn.IrrepsArray, species_index: jnp.ndarray,
                 edge_sh: e3nn.IrrepsArray, edge_radial: jnp.ndarray,
                 senders: jnp.ndarray, receivers: jnp.ndarray) -> e3nn.IrrepsArray:
        num_nodes = node_features.shape[0]
        hidden_irreps = e3nn.Irreps(self.hidden_irreps)
        if self.residual:
            skip = e3nn.flax.Linear(hidden_irreps, num_indexed_weights=self.num_species,
                                    name="skip")(species_index, node_features)
        node_features = e3nn.flax.Linear(node_features.irreps, name="linear_up")(node_features)
        # Channel-wise tensor product of neighbour features with the edge harmonics.
        filter_ir_out = irreps_up_to(self.max_ell)
        # One radial weight per irrep channel; the MLP has no biases, so the weight is
        # zero wherever the (enveloped) radial features are zero: at and beyond r_c.
        if self.neighbours_per_node:
            paths = tensor_product_paths(node_features.irreps, edge_sh.irreps, filter_ir_out)
            radial_weights = RadialMLP(tuple(self.radial_mlp), tuple(mul for _, _, mul, _ in paths),
                                       name="radial_mlp")(edge_radial)
            atomic_basis = dense_convolution(node_features, edge_sh, radial_weights, senders,
                                             self.neighbours_per_node, filter_ir_out)
        else:
            messages = e3nn.tensor_product(node_features[senders], edge_sh, filter_ir_out=filter_ir_out)
            [mix] = RadialMLP(tuple(self.radial_mlp), (messages.irreps.num_irreps,),
                              name="radial_mlp")(edge_radial)
            atomic_basis = e3nn.scatter_sum(messages * mix, dst=receivers, output_size=num_nodes)
        atomic_basis = atomic_basis / self.avg_num_neighbors
        target_irreps = irreps_up_to(self.max_ell, self.num_channels)
        atomic_basis = e3nn.flax.Linear(target_irreps, name="linear_basis")(atomic_basis)
        per_channel = atomic_basis.mul_to_axis(self.num_channels)  # [N, C, irreps]
        keep = e3nn.Irreps([ir for _, ir in hidden_irreps])
        product = SymmetricContraction(self.correlation, str(keep), self.num_species,
                                       name="symmetric_contraction")(per_channel, species_index)
        product = product.axis_to_mul()
        updated = e3nn.flax.Linear(hidden_irreps, name="linear_product")(product)
        if self.residual:
            updated = updated + skip
        return updated


@register_backbone("mace")
class MACE(nn.Module):
    """MACE backbone: AtomsGraph -> per-node invariant features.

    Attributes:
        atomic_numbers: elements the model knows (sorted).
        avg_num_neighbors: normalisation of the neighbour sum, from training data.
        r_max: cutoff radius, Å.
        num_bessel, envelope_p: radial basis size and polynomial envelope order.
        max_ell: highest degree of the edge spherical harmonics.
        num_channels, max_l: node features are num_channels x (0e + 1o + ... up to max_l).
        correlation: body order of the symmetric contraction (ν; ν+1-body per layer).
        num_interactions: number of layers.
        radial_mlp: hidden sizes of the radial MLP.
        charge_spin_embedding: add `ChargeSpinEmbedding` of the graph's total charge and
            spin to the atoms' initial features.
        ewald_message_passing: settings of an `EwaldBlock` that updates the invariant
            channels after every interaction, or None.
        num_fidelities: >0 adds a `FidelityEmbedding` of the graph's level of theory to the
            atoms' initial features (multi-fidelity models with ``fidelity_embedding``).
    """

    atomic_numbers: tuple[int, ...]
    avg_num_neighbors: float
    r_max: float = 5.0
    num_bessel: int = 8
    envelope_p: int = 5
    max_ell: int = 3
    num_channels: int = 64
    max_l: int = 1
    correlation: int = 3
    num_interactions: int = 2
    radial_mlp: tuple[int, ...] = (64, 64, 64)
    charge_spin_embedding: bool = False
    ewald_message_passing: Optional[dict] = None  # EwaldBlock settings, or None
    num_fidelities: int = 0

    @property
    def feature_irreps(self) -> e3nn.Irreps:
        blocks = self.num_interactions + (1 if self.charge_spin_embedding else 0)
        return e3nn.Irreps(f"{blocks * self.num_channels}x0e")

    @nn.compact
    def __call__(self, graph: AtomsGraph, positions: jnp.ndarray, cell: jnp.ndarray) -> e3nn.IrrepsArray:
        """Per-node features [N, num_interactions * num_channels] (0e); with the charge/spin
        embedding the initial features come first ([N, (num_interactions + 1) * num_channels]).

        Args:
            graph: the batch (species, edges, shifts, ...).
            positions: [N, 3] Å, possibly strained; differentiated by the potential.
            cell: [G, 3, 3] Å, possibly strained.
        """
        num_species = len(self.atomic_numbers)
        species_index = jnp.asarray(species_index_table(self.atomic_numbers))[graph.species]
        vectors = padded_edge_vectors(positions, cell, graph, self.r_max)
        lengths = jnp.linalg.norm(vectors, axis=-1)
        edge_radial = radial_embedding(lengths, self.r_max, self.num_bessel, self.envelope_p)
        edge_sh = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(self.max_ell), vectors,
                                           normalize=True, normalization="component")

        one_hot = jax.nn.one_hot(species_index, num_species, dtype=positions.dtype)
        node_features = e3nn.flax.Linear(f"{self.num_channels}x0e", name="embedding")(
            e3nn.IrrepsArray(f"{num_species}x0e", one_hot))
        if self.charge_spin_embedding:
            state = ChargeSpinEmbedding(self.num_channels, name="charge_spin")(graph, positions.dtype)
            node_features = node_features + e3nn.IrrepsArray(node_features.irreps, state)
        if self.num_fidelities:
            level = FidelityEmbedding(self.num_fidelities, self.num_channels, name="fidelity")(graph, positions.dtype)
            node_features = node_features + e3nn.IrrepsArray(node_features.irreps, level)
        # With the charge/spin embedding the initial features are part of the output too:
        # the first interaction has no skip, so an atom with no neighbour within the cutoff
        # (an ion far from the rest) would otherwise leave it with zero features, the same
        # for every element and charge state.
        scalars_per_layer = [node_features] if self.charge_spin_embedding else []
        for layer in range(self.num_interactions):
            last = layer == self.num_interactions - 1
            # The last layer only feeds the energy readout, so it keeps scalars only.
            hidden = irreps_up_to(0 if last else self.max_l, self.num_channels)
            node_features = MACEInteraction(
                num_channels=self.num_channels, hidden_irreps=str(hidden), max_ell=self.max_ell,
                correlation=self.correlation, radial_mlp=tuple(self.radial_mlp),
                avg_num_neighbors=self.avg_num_neighbors, num_species=num_species,
                residual=layer > 0, neighbours_per_node=graph.neighbours_per_node,
                name=f"interaction_{layer}")(
                    node_features, species_index, edge_sh, edge_radial,
                    graph.senders, graph.receivers)
            if self.ewald_message_passing is not None:
                # The invariant channels come first in the layer's irreps (irreps_up_to).
                delta = EwaldBlock(channels=self.num_channels, **self.ewald_message_passing, name=f"ewald_{layer}")(
                    node_features.array[:, :self.num_channels], graph, positions, cell)
                node_features = e3nn.IrrepsArray(node_features.irreps,
                                                 node_features.array.at[:, :self.num_channels].add(delta))
            scalars_per_layer.append(node_features.filter(keep="0e"))
        return e3nn.concatenate(scalars_per_layer, axis=-1)
