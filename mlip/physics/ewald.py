"""Ewald summation of point and Gaussian charges on padded batches (METHODS.md §3.1, §3.3).

Every energy is returned *per atom* ([N], eV; zero on padding atoms), so that the
graph total is a segment sum like any other atomic energy and the per-atom energies
of the calculator stay meaningful:

    E_real,i  = (k_e/2) Σ_j Σ_T′ q_i q_j erfc(α|r_ij + T|)/|r_ij + T|     (pair list, r < r_c)
    E_recip,i = (2π k_e/V) Σ_{k≠0, |k|≤k_c} w_k e^{−k²/4α²}/k² q_i Re[e^{−ik·r_i} S(k)],  S(k) = Σ_j q_j e^{ik·r_j}
    E_self,i  = −k_e α/√π q_i²
    E_bg,i    = −k_e π q_i Q/(2Vα²)          (neutralising background; Σ_i gives −k_e π Q²/(2Vα²))
    E_direct,i = (k_e/2) Σ_{j≠i} q_i q_j erf(r_ij/(√2 σ))/r_ij   (non-periodic; point charges: erf → 1)

The reciprocal sum runs over a half space of integer indices n (k = n·B, B = 2π cell⁻ᵀ,
weight w_k = 2 for the dropped −k), chosen on the host per graph (`reciprocal_indices`)
and carried by `AtomsGraph.k_indices`; k itself is recomputed from the (possibly
strained) cell inside the function, so stress is the strain derivative. Padding rows
of ``k_indices`` are n = 0, which the k = 0 exclusion removes, as padding edges are
self-loops.

Latent Ewald (LES) uses Gaussian charges of pair width σ: reciprocal + self + background
with α = 1/(√2 σ) for periodic graphs, the erf direct sum for the others.

Cost: for point charges `ewald_parameters` picks α ∝ (N/V²)^{1/6} so that the real
and reciprocal sums both grow as N^1.5 at fixed accuracy. For large cells the batch
carries a mesh instead of k indices (`AtomsGraph.mesh_shape`) and the reciprocal sum
runs by particle-mesh Ewald (`mlip.physics.mesh_ewald`), N log N. `reciprocal_potential`
is the one sum behind Ewald's reciprocal energy and Ewald message passing.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mlip.data.neighbours import reciprocal_indices  # noqa: F401  (re-exported: the host half of a sum)

COULOMB_CONSTANT = 14.399645  # k_e = 1/(4πε₀), eV·Å/e²


# ----------------------------------------------------------------------------- host side

def ewald_parameters(n_atoms: int, volume: float, accuracy: float = 1e-6) -> tuple[float, float, float]:
    """(α, r_cutoff, k_cutoff) for point-charge Ewald at relative accuracy ε.

    r_c = √(−ln ε)/α and k_c = 2α√(−ln ε) truncate both sums at e^{−(…)²} = ε; α =
    √π (N/V²)^{1/6} balances the pairs within r_c (∝ N r_c³ N/V) against the N·(V k_c³)
    structure-factor terms, so each grows as N^1.5 (Frenkel & Smit §12.1.5).
    """
    if not 0.0 < accuracy < 1.0:
        raise ValueError(f"accuracy must be in (0, 1), got {accuracy}")
    s = math.sqrt(-math.log(accuracy))
    alpha = math.sqrt(math.pi) * (n_atoms / volume**2) ** (1.0 / 6.0)
    return alpha, s / alpha, 2.0 * alpha * s


# ----------------------------------------------------------------------------- device side

def _graph_volume(cell: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[G] volume (1 where non-periodic) and [G] bool periodic."""
    periodic = jnp.abs(jnp.linalg.det(jax.lax.stop_gradient(cell))) > 1e-9
    # det's derivative is det·cell⁻ᵀ: NaN at a zero cell, so take it of the identity there.
    safe_cell = jnp.where(periodic[:, None, None], cell, jnp.eye(3, dtype=cell.dtype))
    return jnp.abs(jnp.linalg.det(safe_cell)), periodic


def reciprocal_energy(charges: jnp.ndarray, positions: jnp.ndarray, cell: jnp.ndarray,
                      node_graph: jnp.ndarray, k_indices: jnp.ndarray, alpha,
                      mesh_shape: tuple = (), k_cutoff: Optional[float] = None) -> jnp.ndarray:
    """[N] per-atom reciprocal-space energy, eV (zero for non-periodic graphs).

    Args:
        charges: [N] e (zero on padding atoms).
        positions: [N, 3] Å.
        cell: [G, 3, 3] Å, rows; zero for non-periodic graphs.
        node_graph: [N] graph of each atom.
        k_indices: [G, M, 3] integer half-space indices, zero rows for padding.
        alpha: Ewald splitting parameter, Å⁻¹ (scalar).
        mesh_shape: (K1, K2, K3) to sum by particle-mesh Ewald (`mlip.physics.mesh_ewald`)
            over every mesh frequency with |k| ≤ ``k_cutoff`` instead of over ``k_indices``;
            () for the direct sum.
    """
    volume, _ = _graph_volume(cell)
    potential = reciprocal_potential(charges, positions, cell, node_graph, k_indices,
                                     lambda k_squared: jnp.exp(-k_squared / (4.0 * alpha**2)) / k_squared,
                                     mesh_shape, k_cutoff)
    prefactor = 2.0 * jnp.pi * COULOMB_CONSTANT / volume  # [G]
    return prefactor[node_graph] * charges * potential


def reciprocal_potential(sources: jnp.ndarray, positions: jnp.ndarray, cell: jnp.ndarray,
                         node_graph: jnp.ndarray, k_indices: jnp.ndarray, radial_filter,
                         mesh_shape: tuple = (), k_cutoff: Optional[float] = None) -> jnp.ndarray:
    """[N] or [N, C]: Σ_{k≠0} θ(k²) Re[e^{−ik·r_i} S(k)], S(k) = Σ_{j in i's graph} s_j e^{ik·r_j}, over the full k space.

    The sum of Ewald's reciprocal energy (sources = charges, θ = e^{−k²/4α²}/k²) and of Ewald
    message passing (sources = C feature channels, θ a learned radial filter per channel).

    Args:
        sources: [N] or [N, C] (zero on padding atoms).
        k_indices: [G, M, 3] half-space indices (each stands for ±k); unused with a mesh.
        radial_filter: k² [G, ...] (> 0) -> θ [G, ...] or [G, ..., C].
        mesh_shape, k_cutoff: see `reciprocal_energy`; ``k_cutoff`` also masks k indices.
    """
    if k_indices.shape[1] == 0 and not mesh_shape:
        return jnp.zeros_like(sources)
    _, periodic = _graph_volume(cell)
    safe_cell = jnp.where(periodic[:, None, None], cell, jnp.eye(3, dtype=cell.dtype))
    inverse_cell = jnp.linalg.inv(safe_cell)
    basis = 2.0 * jnp.pi * jnp.swapaxes(inverse_cell, -1, -2)  # [G, 3, 3] rows b_a

    def k_filter(indices, weight):
        """(w θ(k²) per index n [G, ..., 3], 0 at k = 0, beyond k_cutoff and in non-periodic graphs; k vectors)."""
        k_vectors = jnp.einsum("g...a,gab->g...b", indices.astype(positions.dtype), basis)
        k_squared = jnp.sum(k_vectors**2, axis=-1)
        real_k = jnp.any(indices != 0, axis=-1) & periodic.reshape((-1,) + (1,) * (k_squared.ndim - 1))
        if k_cutoff is not None:
            real_k = real_k & (k_squared <= k_cutoff**2)
        # Mask k = 0 (padding rows) before the filter: 1/k² there would be inf, and its gradient NaN.
        theta = radial_filter(jnp.where(real_k, k_squared, 1.0))
        mask = real_k if theta.ndim == real_k.ndim else real_k[..., None]
        return jnp.where(mask, weight * theta, 0.0), k_vectors

    if mesh_shape:
        from mlip.physics.mesh_ewald import mesh_reciprocal_potential

        # Every mesh frequency m: weight 1 (the mesh holds both k and −k).
        return mesh_reciprocal_potential(sources, positions, inverse_cell, node_graph, tuple(mesh_shape),
                                         lambda frequencies: k_filter(frequencies, 1.0)[0])
    filter_k, k_vectors = k_filter(k_indices, 2.0)  # half space: weight 2
    return _blocked_structure_factor_sum(sources, positions, node_graph, k_vectors, filter_k)


# k vectors per block of the reciprocal sum: bounds the [N, block] phase arrays (and, by
# rematerialisation, what the backward pass keeps) for large cells.
K_BLOCK = 1024


def _blocked_structure_factor_sum(sources, positions, node_graph, k_vectors, filter_k):
    """[N(, C)] Σ_k f_k Re[e^{−ik·r_i} S(k)], S(k) = Σ_{j in i's graph} s_j e^{ik·r_j}, in blocks of K_BLOCK k's.

    ``sources`` [N] or [N, C]; ``filter_k`` [G, M] or [G, M, C].
    """
    n_graph, n_k = filter_k.shape[:2]
    channels = sources.shape[1:]
    blocks = -(-n_k // K_BLOCK)
    if blocks > 1:
        padding = blocks * K_BLOCK - n_k  # zero k vectors with zero filter add nothing
        k_vectors = jnp.pad(k_vectors, ((0, 0), (0, padding), (0, 0)))
        filter_k = jnp.pad(filter_k, ((0, 0), (0, padding)) + ((0, 0),) * len(channels))

    def block_sum(k_block, filter_block):  # [G, B, 3], [G, B(, C)]
        if n_graph == 2:
            # One structure and the padding graph (MD, the calculator): every atom can use
            # graph 0's k vectors, since padding atoms carry no sources; no gather, no scatter.
            phase = positions @ k_block[0].T  # [N, B]
            cos_phase, sin_phase = jnp.cos(phase), jnp.sin(phase)
            weighted_cos = filter_block[0] * (cos_phase.T @ sources)  # [B(, C)]
            weighted_sin = filter_block[0] * (sin_phase.T @ sources)
            return cos_phase @ weighted_cos + sin_phase @ weighted_sin
        phase = jnp.einsum("nb,nmb->nm", positions, k_block[node_graph])  # [N, B]
        cos_phase, sin_phase = jnp.cos(phase), jnp.sin(phase)
        if channels:
            cos_phase, sin_phase = cos_phase[..., None], sin_phase[..., None]
        per_atom = sources[:, None]  # [N, 1(, C)]
        structure_cos = jax.ops.segment_sum(per_atom * cos_phase, node_graph, n_graph)  # [G, B(, C)]
        structure_sin = jax.ops.segment_sum(per_atom * sin_phase, node_graph, n_graph)
        weighted_cos = (filter_block * structure_cos)[node_graph]
        weighted_sin = (filter_block * structure_sin)[node_graph]
        return jnp.sum(cos_phase * weighted_cos + sin_phase * weighted_sin, axis=1)

    if blocks == 1:
        return block_sum(k_vectors, filter_k)
    k_blocks = jnp.moveaxis(k_vectors.reshape(n_graph, blocks, K_BLOCK, 3), 1, 0)
    filter_blocks = jnp.moveaxis(filter_k.reshape((n_graph, blocks, K_BLOCK) + filter_k.shape[2:]), 1, 0)
    body = jax.checkpoint(lambda carry, block: (carry + block_sum(*block), None))
    potential, _ = jax.lax.scan(body, jnp.zeros_like(sources), (k_blocks, filter_blocks))
    return potential


def self_energy(charges: jnp.ndarray, alpha) -> jnp.ndarray:
    """[N] −k_e α/√π q_i², eV."""
    return -COULOMB_CONSTANT * alpha / jnp.sqrt(jnp.pi) * charges**2


def background_energy(charges: jnp.ndarray, cell: jnp.ndarray, node_graph: jnp.ndarray, alpha) -> jnp.ndarray:
    """[N] −k_e π q_i Q/(2Vα²): the uniform neutralising background of a charged cell, split by q_i."""
    volume, periodic = _graph_volume(cell)
    total = jax.ops.segment_sum(charges, node_graph, cell.shape[0])
    per_graph = jnp.where(periodic, -COULOMB_CONSTANT * jnp.pi * total / (2.0 * volume * alpha**2), 0.0)
    return charges * per_graph[node_graph]


def real_space_energy(charges: jnp.ndarray, positions: jnp.ndarray, cell: jnp.ndarray,
                      senders: jnp.ndarray, receivers: jnp.ndarray, shifts: jnp.ndarray,
                      edge_graph: jnp.ndarray, alpha, r_cutoff: float) -> jnp.ndarray:
    """[N] (k_e/2) Σ_pairs q_i q_j erfc(α r)/r over a full pair list (both directions), eV.

    Pairs at r ≥ r_cutoff and padding edges (self-loops, zero shift) contribute nothing.
    """
    vectors = positions[senders] + jnp.einsum("ea,eab->eb", shifts.astype(positions.dtype),
                                              cell[edge_graph]) - positions[receivers]
    real_edge = (senders != receivers) | jnp.any(shifts != 0, axis=-1)
    length_squared = jnp.sum(vectors**2, axis=-1)
    inside = real_edge & (length_squared < r_cutoff**2)
    length = jnp.sqrt(jnp.where(inside, length_squared, 1.0))
    pair = jnp.where(inside, charges[senders] * jax.scipy.special.erfc(alpha * length) / length, 0.0)
    return 0.5 * COULOMB_CONSTANT * charges * jax.ops.segment_sum(pair, receivers, charges.shape[0])


def same_graph_pairs(positions: jnp.ndarray, node_graph: jnp.ndarray,
                     include: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """All ordered pairs i ≠ j of included atoms in one graph: ([N, N] mask, [N, N] distances, Å).

    Coincident pairs (padding atoms all sit at the origin) are dropped; masked pairs get
    length 1 before the square root, so no 0/0 reaches the gradient.
    """
    n = positions.shape[0]
    pair_ok = (node_graph[:, None] == node_graph[None, :]) & ~jnp.eye(n, dtype=bool)
    pair_ok = pair_ok & include[:, None] & include[None, :]
    length_squared = jnp.sum((positions[None, :, :] - positions[:, None, :]) ** 2, axis=-1)
    pair_ok = pair_ok & (length_squared > 0)
    return pair_ok, jnp.sqrt(jnp.where(pair_ok, length_squared, 1.0))


def direct_energy(charges: jnp.ndarray, positions: jnp.ndarray, node_graph: jnp.ndarray,
                  include: jnp.ndarray, sigma: Optional[float] = None) -> jnp.ndarray:
    """[N] (k_e/2) Σ_{j≠i, same graph} q_i q_j f(r_ij)/r_ij over all pairs, eV: the non-periodic sum.

    f = 1 for point charges, erf(r/(√2 σ)) for Gaussian charges of pair width σ. O(N²)
    per batch: meant for molecules (thousands of atoms at most).

    Args:
        include: [N] bool, atoms whose graph is summed this way (e.g. non-periodic graphs).
    """
    pair_ok, length = same_graph_pairs(positions, node_graph, include)
    kernel = 1.0 / length if sigma is None else jax.scipy.special.erf(length / (math.sqrt(2.0) * sigma)) / length
    potential = jnp.sum(jnp.where(pair_ok, kernel * charges[None, :], 0.0), axis=1)
    return 0.5 * COULOMB_CONSTANT * charges * potential


def gaussian_charge_energy(charges: jnp.ndarray, positions: jnp.ndarray, cell: jnp.ndarray,
                           node_graph: jnp.ndarray, k_indices: jnp.ndarray, sigma: float,
                           mesh_shape: tuple = (), k_cutoff: Optional[float] = None) -> jnp.ndarray:
    """[N] Coulomb energy of Gaussian charges (pair width σ) less their self-energy, per atom, eV.

    Periodic graphs: reciprocal + self + background terms with α = 1/(√2 σ) (the real-space
    erfc remainder is short-ranged and left to the local model, as in LES); non-periodic
    graphs: the erf direct sum. Both equal Σ_{i<j} q_i q_j erf(r_ij/(√2 σ))/r_ij for an
    isolated system. ``mesh_shape`` and ``k_cutoff``: see `reciprocal_energy`.
    """
    alpha = 1.0 / (math.sqrt(2.0) * sigma)
    _, periodic = _graph_volume(cell)
    atom_periodic = periodic[node_graph]
    periodic_part = (reciprocal_energy(charges, positions, cell, node_graph, k_indices, alpha, mesh_shape, k_cutoff)
                     + self_energy(charges, alpha) + background_energy(charges, cell, node_graph, alpha))
    if k_indices.shape[0] == 2 and (k_indices.shape[1] > 0 or mesh_shape):
        # One structure (and the padding graph) with k indices: it is periodic, so the
        # O(N²) direct sum would be all masked; skip it (MD and the calculator of a solid).
        return jnp.where(atom_periodic, periodic_part, 0.0)
    direct = direct_energy(charges, positions, node_graph, ~atom_periodic, sigma)
    return jnp.where(atom_periodic, periodic_part, direct)


def point_charge_energy(charges: jnp.ndarray, positions: jnp.ndarray, cell: jnp.ndarray,
                        node_graph: jnp.ndarray, k_indices: jnp.ndarray, senders: jnp.ndarray,
                        receivers: jnp.ndarray, shifts: jnp.ndarray, alpha, r_cutoff: float,
                        mesh_shape: tuple = (), k_cutoff: Optional[float] = None) -> jnp.ndarray:
    """[N] classical Ewald energy of point charges per atom, eV (direct 1/r sum for non-periodic graphs).

    The pair list (senders, receivers, shifts; both directions) must hold every pair
    within ``r_cutoff`` and ``k_indices`` every k within the matching k_cutoff (see
    `ewald_parameters`, `reciprocal_indices`), or ``mesh_shape`` a mesh for |k| ≤ ``k_cutoff``.
    """
    _, periodic = _graph_volume(cell)
    atom_periodic = periodic[node_graph]
    edge_graph = node_graph[receivers]
    periodic_part = (real_space_energy(charges, positions, cell, senders, receivers, shifts, edge_graph,
                                       alpha, r_cutoff)
                     + reciprocal_energy(charges, positions, cell, node_graph, k_indices, alpha, mesh_shape,
                                         k_cutoff)
                     + self_energy(charges, alpha) + background_energy(charges, cell, node_graph, alpha))
    direct = direct_energy(charges, positions, node_graph, ~atom_periodic)
    return jnp.where(atom_periodic, periodic_part, direct)


def ewald_energy(positions: np.ndarray, charges: np.ndarray, cell: Optional[np.ndarray] = None,
                 accuracy: float = 1e-8, alpha: Optional[float] = None, mesh: bool = False) -> float:
    """Total Coulomb energy of point charges in one structure, eV (a convenience for scripts and tests).

    Periodic in all three directions when ``cell`` is given (neutralising background for
    a net charge), a direct sum otherwise. Parameters from `ewald_parameters` unless
    ``alpha`` is given (then r_c and k_c follow from it and ``accuracy``). With ``mesh`` the
    reciprocal sum runs by particle-mesh Ewald.
    """
    from mlip.data.neighbours import mesh_shape_for, neighbour_list

    positions = np.asarray(positions, np.float64)
    charges = np.asarray(charges, np.float64)
    n = len(charges)
    node_graph = np.zeros(n, np.int32)
    if cell is None:
        cell_batch = np.zeros((1, 3, 3))
        k_indices = np.zeros((1, 0, 3), np.int32)
        pairs = (np.zeros(0, np.int32),) * 2 + (np.zeros((0, 3), np.int32),)
        alpha, r_cutoff, k_cutoff = 1.0, 0.0, None
    else:
        cell = np.asarray(cell, np.float64)
        default_alpha, _, _ = ewald_parameters(n, abs(np.linalg.det(cell)), accuracy)
        alpha = default_alpha if alpha is None else float(alpha)
        s = math.sqrt(-math.log(accuracy))
        r_cutoff, k_cutoff = s / alpha, 2.0 * alpha * s
        k_indices = reciprocal_indices(cell, k_cutoff)[None]
        pairs = neighbour_list(positions, cell, np.ones(3, bool), r_cutoff)
        cell_batch = cell[None]
    mesh_shape = ()
    if mesh and cell is not None:
        mesh_shape = mesh_shape_for(np.abs(k_indices[0]).max(axis=0))
        k_indices = k_indices[:, :0]
    per_atom = _compiled_point_charge_energy(jnp.asarray(charges), jnp.asarray(positions), jnp.asarray(cell_batch),
                                             jnp.asarray(node_graph), jnp.asarray(k_indices),
                                             *map(jnp.asarray, pairs), alpha, r_cutoff, mesh_shape, k_cutoff)
    return float(jnp.sum(per_atom))


# One compilation per call's shapes instead of hundreds of op-by-op dispatches.
_compiled_point_charge_energy = jax.jit(point_charge_energy, static_argnames=("mesh_shape", "k_cutoff"))
