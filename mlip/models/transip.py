"""TransIP backbone (Elhag et al. 2025; METHODS.md §2.3): a plain transformer on atom tokens.

Each atom is a token: an element embedding plus a projection of its Cartesian position,
centred on its molecule's centroid (so translations change nothing), through raw and
random Fourier features ``[r/5 Å, sin(ω r), cos(ω r)]``. The tokens of a molecule attend
to each other in pre-LayerNorm transformer layers (`AllToAllLayer`: masked to the
molecule, optionally with invariant distance functions in the attention). Nothing makes
the model rotation-equivariant: it learns the symmetry from rotated copies of the data
(``training.rotation_augmentation``), and the error that remains is measured, not
assumed away (tests/test_attention.py, scripts/benchmark_backbones.py).

Forces are −∂E/∂r, so the model is conservative even where it is not equivariant.
``rotation_average: K`` averages the token features over K fixed rotations (the identity
first) before the readout: a smoother, closer-to-invariant model at K times the cost,
switchable at inference (`load_potential(..., rotation_average=K)`).

Absolute coordinates have no meaning in a periodic cell (they change when an atom is
wrapped), so the model describes molecules only: periodic frames are refused when
graphs are built (`ModelConfig.molecules_only`).

``equivariance_objective: λ`` adds the paper's kind of objective in embedding space: a
learned map T(z, g) (`EmbeddingMap`, an MLP of the embedding and the rotation matrix, as a
residual on z) is trained so that T(z(x), g) matches z(g·x), the embedding of a turned
copy; the loss is λ times their mean squared difference per atom and channel. The paper's
exact form (contrastive, with the other batch members as negatives) is not public in
detail (METHODS.md §2.3 marks it unverified); this is the MSE form METHODS.md describes.
"""

from __future__ import annotations

from typing import Optional

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlip.graph import AtomsGraph
from mlip.models.all_to_all import AllToAllLayer
from mlip.models.embedding import ChargeSpinEmbedding, FidelityEmbedding
from mlip.models.mace import species_index_table
from mlip.physics.ewald_message_passing import EwaldBlock
from mlip.registry import register_backbone


def fixed_rotations(count: int) -> np.ndarray:
    """[count, 3, 3] rotations: the identity, then uniform draws from a fixed seed."""
    rng = np.random.default_rng(12345)
    rotations = [np.eye(3)]
    while len(rotations) < count:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        rotations.append(q if np.linalg.det(q) > 0 else -q)
    return np.stack(rotations[:count])


def centred_positions(positions: jnp.ndarray, graph: AtomsGraph) -> jnp.ndarray:
    """[N, 3] positions minus the centroid of the real atoms of their graph."""
    weight = graph.node_mask.astype(positions.dtype)
    totals = jax.ops.segment_sum(positions * weight[:, None], graph.node_graph, graph.n_graph)
    counts = jax.ops.segment_sum(weight, graph.node_graph, graph.n_graph)
    centroids = totals / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(graph.node_mask[:, None], positions - centroids[graph.node_graph], 0.0)


class TokenTransformer(nn.Module):
    """The transformer on one orientation of the atoms: [N, F] token features."""

    atomic_numbers: tuple[int, ...]
    r_max: float
    num_channels: int
    num_heads: int
    head_dim: int
    num_layers: int
    num_frequencies: int
    frequency_scale: float
    distance_basis: int
    charge_spin_embedding: bool
    max_atoms: int
    num_fidelities: int = 0
    ewald_message_passing: Optional[dict] = None

    @nn.compact
    def __call__(self, graph: AtomsGraph, positions: jnp.ndarray, cell: jnp.ndarray) -> jnp.ndarray:
        dtype = positions.dtype
        species_index = jnp.asarray(species_index_table(self.atomic_numbers))[graph.species]
        centred = centred_positions(positions, graph)
        frequencies = jnp.asarray(np.random.default_rng(0).normal(size=(self.num_frequencies, 3))
                                  * self.frequency_scale, dtype)
        phases = centred @ frequencies.T
        coordinates = jnp.concatenate([centred / 5.0, jnp.sin(phases), jnp.cos(phases)], axis=-1)
        tokens = nn.Embed(len(self.atomic_numbers), self.num_channels, param_dtype=dtype,
                          name="element_embedding")(species_index)
        tokens = tokens + nn.Dense(self.num_channels, param_dtype=dtype, name="position_embedding")(coordinates)
        if self.charge_spin_embedding:
            tokens = tokens + ChargeSpinEmbedding(self.num_channels, name="charge_spin")(graph, dtype)
        if self.num_fidelities:
            tokens = tokens + FidelityEmbedding(self.num_fidelities, self.num_channels, name="fidelity")(graph, dtype)
        for layer in range(self.num_layers):
            tokens = AllToAllLayer(self.num_heads, self.head_dim, self.distance_basis, self.max_atoms, self.r_max,
                                   name=f"layer_{layer}")(tokens, graph, positions, cell)
            if self.ewald_message_passing is not None:
                # Within max_atoms attention already spans the molecule; beyond it (neighbour-
                # limited attention) this is the only path between distant atoms.
                tokens = tokens + EwaldBlock(channels=self.num_channels, **self.ewald_message_passing,
                                             name=f"ewald_{layer}")(tokens, graph, positions, cell)
        return nn.LayerNorm(param_dtype=dtype, name="out_norm")(tokens)


class EmbeddingMap(nn.Module):
    """T(z, g) = z + MLP([z, vec(g)]): the learned action of a rotation g on TransIP embeddings."""

    @nn.compact
    def __call__(self, embedding: jnp.ndarray, rotations: jnp.ndarray) -> jnp.ndarray:
        width = embedding.shape[-1]
        inputs = jnp.concatenate([embedding, rotations.reshape(rotations.shape[0], 9)], axis=-1)
        hidden = jax.nn.silu(nn.Dense(width, param_dtype=embedding.dtype, name="hidden")(inputs))
        return embedding + nn.Dense(width, param_dtype=embedding.dtype, name="out")(hidden)


@register_backbone("transip")
class TransIP(nn.Module):
    """TransIP backbone: AtomsGraph -> per-node features [N, num_channels] (learned, not exact, invariance).

    Attributes: as `mlip.model_config.TransIPConfig`; ``avg_num_neighbors`` is unused.
    """

    atomic_numbers: tuple[int, ...]
    avg_num_neighbors: float = 1.0
    r_max: float = 5.0
    num_channels: int = 128
    num_heads: int = 4
    head_dim: int = 32
    num_layers: int = 4
    num_frequencies: int = 32
    frequency_scale: float = 1.0
    distance_basis: int = 0
    charge_spin_embedding: bool = True
    rotation_average: int = 0
    max_atoms: int = 4096
    equivariance_objective: float = 0.0  # a loss weight, read by the potential (EnergyModel.embedding_map)
    num_fidelities: int = 0  # >0: a FidelityEmbedding added to the tokens
    ewald_message_passing: Optional[dict] = None  # EwaldBlock settings after each layer, or None

    @nn.compact
    def __call__(self, graph: AtomsGraph, positions: jnp.ndarray, cell: jnp.ndarray) -> e3nn.IrrepsArray:
        settings = dict(atomic_numbers=self.atomic_numbers, r_max=self.r_max, num_channels=self.num_channels,
                        num_heads=self.num_heads, head_dim=self.head_dim, num_layers=self.num_layers,
                        num_frequencies=self.num_frequencies, frequency_scale=self.frequency_scale,
                        distance_basis=self.distance_basis, charge_spin_embedding=self.charge_spin_embedding,
                        max_atoms=self.max_atoms, num_fidelities=self.num_fidelities,
                        ewald_message_passing=self.ewald_message_passing)
        if self.rotation_average > 1:
            # One set of parameters applied to K turned copies (the same names as without).
            rotations = jnp.asarray(fixed_rotations(self.rotation_average), positions.dtype)
            turned = jnp.einsum("kab,nb->kna", rotations, positions)
            encoder = nn.vmap(TokenTransformer, in_axes=(None, 0, None), variable_axes={"params": None},
                              split_rngs={"params": False})(**settings, name="encoder")
            features = encoder(graph, turned, cell).mean(axis=0)
        else:
            features = TokenTransformer(**settings, name="encoder")(graph, positions, cell)
        features = jnp.where(graph.node_mask[:, None], features, 0.0)
        return e3nn.IrrepsArray(f"{self.num_channels}x0e", features)
