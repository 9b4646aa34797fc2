"""Covalent bonds of a seed structure, and whether an explored snapshot has broken one.

Model-driven MD at a high temperature can pull a molecule apart where the reference
method would not (the model has never seen the bond stretched). Such a snapshot is far
from anything the user asked to simulate: labelling it buys a point of no use to the
test conditions (on n-butane at 1200 K, σ selection bought molecules with C–C at
6.9 Å; docs/benchmarks.md). With ``exploration.max_bond_stretch`` the loop stops a
trajectory at the first snapshot whose bonds (those of the seed) are stretched past that
multiple of the sum of covalent radii, and keeps none of it from there on.
"""

from __future__ import annotations

import numpy as np
from ase.data import covalent_radii
from ase.geometry import find_mic
from ase.neighborlist import neighbor_list

# A pair is bonded in the seed when closer than this multiple of its covalent radii's sum
# (ASE's natural_cutoffs and most connectivity tools use 1.0-1.2).
BONDED_FACTOR = 1.2


class BondCheck:
    """The bonds of ``seed`` (i < j pairs within 1.2 × the covalent radii's sum), checked in snapshots."""

    def __init__(self, seed, max_stretch: float):
        self.max_stretch = float(max_stretch)
        radii = covalent_radii[seed.numbers]
        first, second, distance = neighbor_list("ijd", seed, float(BONDED_FACTOR * 2 * radii.max()))
        bonded = (first < second) & (distance < BONDED_FACTOR * (radii[first] + radii[second]))
        self.first, self.second = first[bonded], second[bonded]
        self.limit = self.max_stretch * (radii[self.first] + radii[self.second])

    def broken(self, atoms) -> list[tuple[int, int, float]]:
        """(i, j, length) of each seed bond longer than ``max_stretch`` × its covalent radii's sum."""
        if self.first.size == 0:
            return []
        vectors = atoms.positions[self.second] - atoms.positions[self.first]
        if atoms.pbc.any():
            vectors, _ = find_mic(vectors, atoms.cell, atoms.pbc)
        lengths = np.linalg.norm(vectors, axis=1)
        over = np.flatnonzero(lengths > self.limit)
        return [(int(self.first[k]), int(self.second[k]), float(lengths[k])) for k in over]
