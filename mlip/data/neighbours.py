"""Neighbour lists on the host, from vesin (a fast, well-tested C++ cell list), and their
reciprocal-space counterpart, the k indices of Ewald sums.

Returns edges in mlip's convention (see `mlip.graph`): receiver i, sender j, and the
integer lattice shift S of the sender image, so that
``r_ij = positions[j] + S @ cell - positions[i]``. Periodic images of the same atom
and an atom's own images (i == j, S != 0) are kept: they are real neighbours in
small cells.
"""

from __future__ import annotations

import math

import numpy as np


def neighbour_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                   cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs (i, j, S) with |r_j + S·cell − r_i| < cutoff, i≠j or S≠0.

    Args:
        positions: [n, 3] Å.
        cell: [3, 3] Å (rows); ignored where ``pbc`` is False.
        pbc: [3] periodic directions.
        cutoff: Å.

    Returns:
        senders [E], receivers [E], shifts [E, 3] (int).
    """
    from vesin import NeighborList

    pbc = np.asarray(pbc, dtype=bool)
    positions = np.asarray(positions, dtype=np.float64)
    # Atoms outside the cell need no wrapping: the shifts returned match the
    # positions as given, which is what the model differentiates.
    box = np.asarray(cell, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    calculator = NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts = calculator.compute(points=positions, box=box,
                                      periodic=pbc.tolist() if pbc.any() else False,
                                      quantities="ijS")
    return j.astype(np.int32), i.astype(np.int32), shifts.astype(np.int32)


def reciprocal_indices(cell: np.ndarray, k_cutoff: float) -> np.ndarray:
    """[m, 3] integer n of the half space (first non-zero component > 0) with 0 < |n·B| ≤ k_cutoff.

    Args:
        cell: [3, 3] lattice vectors as rows, Å.
        k_cutoff: Å⁻¹.
    """
    cell = np.asarray(cell, np.float64)
    basis = 2.0 * np.pi * np.linalg.inv(cell).T  # rows b_a with a_i·b_j = 2π δ_ij
    # |n_a| = |k·a_a|/2π ≤ k_c |a_a|/2π bounds the box that holds the sphere.
    bounds = np.ceil(k_cutoff * np.linalg.norm(cell, axis=1) / (2.0 * np.pi)).astype(int)
    axes = [np.arange(-b, b + 1) for b in bounds]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    first = np.where(grid[:, 0] != 0, grid[:, 0], np.where(grid[:, 1] != 0, grid[:, 1], grid[:, 2]))
    k_norm = np.linalg.norm(grid @ basis, axis=1)
    keep = (first > 0) & (k_norm <= k_cutoff)
    return grid[keep].astype(np.int32)


# Particle-mesh Ewald (mlip.physics.mesh_ewald). Order 6 splines on a mesh of K >= 2·2·n_max + 1
# points per direction (2× Nyquist's) gave the direct k sum's energy to 6e-6 and its forces to
# 4e-5 relative (order 4: 2e-4, 2e-3). An even order keeps the spline moduli B(m) finite.
SPLINE_ORDER = 6
OVERSAMPLING = 2.0


def good_fft_size(minimum: int) -> int:
    """Smallest n >= minimum whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    n = max(int(minimum), 1)
    while True:
        m = n
        for prime in (2, 3, 5):
            while m % prime == 0:
                m //= prime
        if m == 1:
            return n
        n += 1


def mesh_shape_for(largest_index: np.ndarray, order: int = SPLINE_ORDER,
                   oversampling: float = OVERSAMPLING) -> tuple[int, int, int]:
    """Mesh (K1, K2, K3) that resolves integer k indices up to ``largest_index`` [3] per direction."""
    return tuple(good_fft_size(max(math.ceil(2 * oversampling * n) + 1, 2 * order))
                 for n in np.asarray(largest_index).tolist())
