"""Padding structures into `AtomsGraph` batches whose sizes come from a fixed ladder.

`jit` compiles once per distinct array shape. Every batch is therefore padded to a
bucket: node and edge counts are rounded up to the next value of a geometric ladder
(four steps per doubling: 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...), and the graph
count is fixed per use. A run over systems of any size compiles a bounded number
of times, at most about 25 % padding waste per batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional, Sequence

import numpy as np

from mlip.data.neighbours import neighbour_list
from mlip.data.reader import Frame
from mlip.graph import AtomsGraph


def round_up_to_bucket(count: int, minimum: int = 8) -> int:
    """Smallest ladder value >= count (ladder: b, 1.25b, 1.5b, 1.75b for b = 2^k >= 8)."""
    count = max(int(count), minimum)
    octave = 2 ** int(math.floor(math.log2(count)))
    for fraction in (1.0, 1.25, 1.5, 1.75, 2.0):
        candidate = int(octave * fraction)
        if candidate >= count:
            return candidate
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class PaddedSizes:
    """Array sizes of a padded batch: nodes, edges and graphs (padding graph included)."""

    n_node: int
    n_edge: int
    n_graph: int


@dataclasses.dataclass
class GraphSample:
    """One structure with its neighbour list (host, unpadded)."""

    frame: Frame
    senders: np.ndarray  # [e]
    receivers: np.ndarray  # [e]
    shifts: np.ndarray  # [e, 3]

    @property
    def n_atoms(self) -> int:
        return self.frame.n_atoms

    @property
    def n_edges(self) -> int:
        return len(self.senders)


def build_sample(frame: Frame, cutoff: float) -> GraphSample:
    senders, receivers, shifts = neighbour_list(frame.positions, frame.cell, frame.pbc, cutoff)
    return GraphSample(frame, senders, receivers, shifts)


def build_samples(frames: Sequence[Frame], cutoff: float) -> list[GraphSample]:
    return [build_sample(frame, cutoff) for frame in frames]


def sizes_for(samples: Sequence[GraphSample], n_graph: int) -> PaddedSizes:
    """Bucketed sizes that fit ``samples`` plus one padding node and one padding graph."""
    n_node = sum(s.n_atoms for s in samples)
    n_edge = sum(s.n_edges for s in samples)
    return PaddedSizes(round_up_to_bucket(n_node + 1), round_up_to_bucket(n_edge), n_graph)


def pack_samples(samples: Sequence[GraphSample], sizes: Optional[PaddedSizes] = None,
                 e0_per_species: Optional[np.ndarray] = None,
                 dtype=np.float32) -> AtomsGraph:
    """Pack structures into one padded `AtomsGraph` (NumPy arrays, host side).

    Args:
        samples: the structures, at most ``sizes.n_graph - 1`` of them.
        sizes: padded sizes; by default the bucket that fits ``samples`` with one
            padding graph.
        e0_per_species: [119] reference energy per element, eV. The energy target is
            the label minus the sum of reference energies, computed here in float64
            so large absolute DFT energies lose no precision before the cast.
        dtype: float dtype of positions, cell and targets.

    Returns:
        The padded batch; the last graph holds all padding nodes and edges.
    """
    if sizes is None:
        sizes = sizes_for(samples, len(samples) + 1)
    n_real_nodes = sum(s.n_atoms for s in samples)
    n_real_edges = sum(s.n_edges for s in samples)
    if len(samples) > sizes.n_graph - 1 or n_real_nodes > sizes.n_node - 1 or n_real_edges > sizes.n_edge:
        raise ValueError(f"batch of {len(samples)} graphs, {n_real_nodes} nodes, {n_real_edges} edges "
                         f"does not fit padded sizes {sizes}")
    N, E, G = sizes.n_node, sizes.n_edge, sizes.n_graph
    positions = np.zeros((N, 3), np.float64)
    species = np.zeros((N,), np.int32)
    node_graph = np.full((N,), G - 1, np.int32)
    cell = np.zeros((G, 3, 3), np.float64)
    senders = np.full((E,), N - 1, np.int32)  # padding edges join the last padding node to itself
    receivers = np.full((E,), N - 1, np.int32)
    shifts = np.zeros((E, 3), np.int32)
    n_node = np.zeros((G,), np.int32)
    n_edge = np.zeros((G,), np.int32)
    charge = np.zeros((G,), np.float64)
    spin = np.ones((G,), np.float64)
    fidelity = np.zeros((G,), np.int32)
    energy = np.zeros((G,), np.float64)
    energy_mask = np.zeros((G,), np.float64)
    forces = np.zeros((N, 3), np.float64)
    forces_mask = np.zeros((N,), np.float64)
    stress = np.zeros((G, 3, 3), np.float64)
    stress_mask = np.zeros((G,), np.float64)

    node_offset = edge_offset = 0
    for g, sample in enumerate(samples):
        frame = sample.frame
        n, e = sample.n_atoms, sample.n_edges
        nodes = slice(node_offset, node_offset + n)
        edges = slice(edge_offset, edge_offset + e)
        positions[nodes] = frame.positions
        species[nodes] = frame.numbers
        node_graph[nodes] = g
        if frame.is_periodic:
            cell[g] = frame.cell
        senders[edges] = sample.senders + node_offset
        receivers[edges] = sample.receivers + node_offset
        shifts[edges] = sample.shifts
        n_node[g], n_edge[g] = n, e
        charge[g], spin[g], fidelity[g] = frame.charge, frame.spin, frame.fidelity
        if frame.energy is not None:
            reference = 0.0 if e0_per_species is None else float(np.sum(e0_per_species[frame.numbers]))
            energy[g] = frame.energy - reference
            energy_mask[g] = 1.0
        if frame.forces is not None:
            forces[nodes] = frame.forces
            forces_mask[nodes] = 1.0
        if frame.stress is not None:
            stress[g] = frame.stress
            stress_mask[g] = 1.0
        node_offset += n
        edge_offset += e
    n_node[G - 1] = N - node_offset
    n_edge[G - 1] = E - edge_offset

    targets = {
        "energy": energy.astype(dtype), "energy_mask": energy_mask.astype(dtype),
        "forces": forces.astype(dtype), "forces_mask": forces_mask.astype(dtype),
        "stress": stress.astype(dtype), "stress_mask": stress_mask.astype(dtype),
    }
    return AtomsGraph(
        positions=positions.astype(dtype), species=species, cell=cell.astype(dtype),
        senders=senders, receivers=receivers, shifts=shifts, n_node=n_node, n_edge=n_edge,
        node_graph=node_graph, charge=charge.astype(dtype), spin=spin.astype(dtype),
        fidelity=fidelity, targets=targets)


class BatchIterator:
    """Yields padded batches of ``batch_size`` structures, shuffled by an explicit seed.

    All batches share ``n_graph = batch_size + 1``; node and edge counts come from the
    bucket ladder, so the number of distinct shapes (compilations) stays small.
    """

    def __init__(self, samples: Sequence[GraphSample], batch_size: int,
                 e0_per_species: Optional[np.ndarray] = None, dtype=np.float32):
        self.samples = list(samples)
        self.batch_size = int(batch_size)
        self.e0_per_species = e0_per_species
        self.dtype = dtype

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def batches(self, shuffle_seed: Optional[int] = None) -> Iterator[tuple[AtomsGraph, list[int]]]:
        """Yield (batch, indices of its samples); order fixed by ``shuffle_seed`` (None: in order)."""
        order = np.arange(len(self.samples))
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(order)
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size].tolist()
            chosen = [self.samples[i] for i in indices]
            sizes = sizes_for(chosen, self.batch_size + 1)
            yield pack_samples(chosen, sizes, self.e0_per_species, self.dtype), indices
