"""Padding structures into `AtomsGraph` batches whose sizes come from a fixed ladder.

`jit` compiles once per distinct array shape. Every batch is therefore padded to a
bucket: node and edge counts are rounded up to the next value of a geometric ladder
(four steps per doubling: 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...), and the graph
count is fixed per use. A run over systems of any size compiles a bounded number
of times, at most about 25 % padding waste per batch.

Edges are laid out either as a list or, by default where it pays, densely: K slots per
node, K the bucketed largest number of neighbours of an atom (see `mlip.graph`), so
models aggregate with a matrix product per node instead of a scatter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from typing import Iterator, Optional, Sequence

import numpy as np

from mlip.data.neighbours import mesh_shape_for, neighbour_list, reciprocal_indices
from mlip.data.reader import Frame
from mlip.errors import DataError
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
    """Array sizes of a padded batch: nodes, edges and graphs (padding graph included).

    ``neighbours_per_node = K > 0`` asks for the dense receiver-major edge layout of
    `AtomsGraph` (``n_edge`` must then be ``n_node * K``); 0 for an edge list.
    """

    n_node: int
    n_edge: int
    n_graph: int
    neighbours_per_node: int = 0
    n_k: int = 0  # k indices per graph (Ewald sums); 0 without a reciprocal-space term or with a mesh
    mesh_shape: tuple = ()  # particle-mesh Ewald mesh instead of k indices (large cells)

    @classmethod
    def dense(cls, n_node: int, neighbours_per_node: int, n_graph: int, n_k: int = 0,
              mesh_shape: tuple = ()) -> "PaddedSizes":
        return cls(n_node, n_node * neighbours_per_node, n_graph, neighbours_per_node, n_k, mesh_shape)


@dataclasses.dataclass
class GraphSample:
    """One structure with its neighbour list (host, unpadded) and, for Ewald sums, its k indices."""

    frame: Frame
    senders: np.ndarray  # [e]
    receivers: np.ndarray  # [e]
    shifts: np.ndarray  # [e, 3]
    k_indices: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), np.int32))  # [m, 3]

    @property
    def n_atoms(self) -> int:
        return self.frame.n_atoms

    @property
    def n_edges(self) -> int:
        return len(self.senders)

    @functools.cached_property
    def max_neighbours(self) -> int:
        """Largest number of edges into one atom (the K a dense layout needs)."""
        return int(np.bincount(self.receivers).max()) if len(self.receivers) else 0


def build_sample(frame: Frame, cutoff: float, k_cutoff: Optional[float] = None,
                 molecules_only: bool = False) -> GraphSample:
    """Neighbour list within ``cutoff`` (Å) and, for a periodic frame and a model with a
    reciprocal-space term, the half-space k indices within ``k_cutoff`` (Å⁻¹).

    ``molecules_only``: the model cannot describe a periodic frame (a DataError names it)."""
    if molecules_only and frame.is_periodic:
        raise DataError(f"{frame.source or 'structure'}: a periodic frame (pbc={np.asarray(frame.pbc).tolist()}), "
                        "but the model describes molecules only (model.backbone transip); set pbc to False "
                        "for a molecule in a box, or use another backbone")
    senders, receivers, shifts = neighbour_list(frame.positions, frame.cell, frame.pbc, cutoff)
    sample = GraphSample(frame, senders, receivers, shifts)
    if k_cutoff and frame.is_periodic:
        sample.k_indices = reciprocal_indices(frame.cell, k_cutoff)
    return sample


def build_samples(frames: Sequence[Frame], cutoff: float, k_cutoff: Optional[float] = None,
                  molecules_only: bool = False) -> list[GraphSample]:
    return [build_sample(frame, cutoff, k_cutoff, molecules_only) for frame in frames]


def padded_node_count(n_atoms: int, dense: bool) -> int:
    """Nodes of a padded batch: the ladder value for the atoms, plus one padding node for an
    edge list (its padding edges sit on it). Padding nodes of the dense layout would each
    carry K empty edge slots, so it has none beyond the ladder's."""
    return round_up_to_bucket(n_atoms if dense else n_atoms + 1)


def round_up_k_count(count: int) -> int:
    """M of a batch's k indices: 0 when no graph has any, else the bucket ladder from 8."""
    return round_up_to_bucket(count) if count else 0


# Above this many (atoms × k vectors) per batch the reciprocal sum goes through a particle
# mesh: for LES (σ = 1 Å, |k| <= π) in rock salt, energy and forces took 5.6 ms directly
# against 4.8 ms on the mesh at 216 atoms (1258 k), 1.7 s against 0.11 s at 4096 atoms.
MESH_MIN_WORK = 200_000


def reciprocal_sizes(samples: Sequence[GraphSample]) -> tuple[int, tuple]:
    """(M, mesh shape) for the batch: padded k indices for the direct sum, or 0 and a mesh."""
    largest = max((len(s.k_indices) for s in samples), default=0)
    if sum(s.n_atoms for s in samples) * largest < MESH_MIN_WORK:
        return round_up_k_count(largest), ()
    return 0, mesh_shape_for(largest_k_index(samples))


def largest_k_index(samples: Sequence[GraphSample]) -> np.ndarray:
    """[3] largest |n_a| over the samples' k indices (what a mesh must resolve)."""
    extents = [np.abs(s.k_indices).max(axis=0) for s in samples if len(s.k_indices)]
    return np.max(extents, axis=0) if extents else np.zeros(3, np.int64)


def round_up_neighbours(count: int) -> int:
    """K of a dense layout: the bucket ladder from 4 (4, 5, 6, 7, 8, 10, 12, ...)."""
    return round_up_to_bucket(count, minimum=4)


# The dense layout costs about 0.4x the edge list per edge slot on a CPU (a force call
# of the default model at 500 atoms: 0.50 s against 1.22 s, scripts/benchmark_edge_layout.py),
# so it pays while its slots (nodes x largest in-degree) are fewer than about 2.5x the
# edge-list edges.
# Batches mixing dense solids with small molecules can exceed that.
DENSE_LAYOUT_MAX_SLOTS_PER_EDGE = 2.0
# For a whole data set at once (`SharedCapacity`), at the break-even: every batch then has
# the same layout and K, so fewer shapes compile.
DATASET_DENSE_MAX_SLOTS_PER_EDGE = 2.5
EDGE_LAYOUTS = ("auto", "dense", "list")


@dataclasses.dataclass(frozen=True)
class SharedCapacity:
    """Edge layout, neighbour slots K and k indices M that every batch of a data set gets.

    Batches of molecules of different sizes would otherwise each pick their own layout, K
    and M and multiply the compiled shapes: 400 dimers of 4-12 atoms in batches of 5 gave
    17 shapes (edge-list batches vary in edges too), and a first epoch of 255 s, nearly
    all compilation. Decided once per data set, a dense layout leaves one shape per node
    bucket (5 there).
    """

    neighbours_per_node: int = 0
    n_k: int = 0
    layout: str = "dense"

    @classmethod
    def of(cls, samples: Sequence[GraphSample]) -> "SharedCapacity":
        k = round_up_neighbours(max((s.max_neighbours for s in samples), default=0))
        slots = k * sum(s.n_atoms for s in samples)
        edges = max(sum(s.n_edges for s in samples), 1)
        # A slot costs ~0.4x an edge-list edge: dense is no slower up to ~2.5 slots per edge.
        layout = "dense" if slots <= DATASET_DENSE_MAX_SLOTS_PER_EDGE * edges else "list"
        return cls(k, round_up_k_count(max((len(s.k_indices) for s in samples), default=0)), layout)


def sizes_for(samples: Sequence[GraphSample], n_graph: int, layout: str = "auto",
              shared: Optional[SharedCapacity] = None) -> PaddedSizes:
    """Bucketed sizes that fit ``samples`` and one padding graph (see `padded_node_count`).

    Args:
        samples: the structures of the batch.
        n_graph: graphs of the batch, padding graph included.
        layout: ``"dense"``: the [nodes, K] edge layout of `AtomsGraph`, K the bucketed
            largest in-degree; ``"list"``: an edge list; ``"auto"``: dense unless it
            needs more than ``DENSE_LAYOUT_MAX_SLOTS_PER_EDGE`` slots per padded edge.
        shared: the whole data set's `SharedCapacity`: K and M at least the batch's own,
            and its layout where ``layout`` is ``"auto"``.
    """
    if layout not in EDGE_LAYOUTS:
        raise ValueError(f"edge layout {layout!r}: expected one of {EDGE_LAYOUTS}")
    if shared is not None and layout == "auto":
        layout = shared.layout
    n_atoms = sum(s.n_atoms for s in samples)
    n_k, mesh_shape = reciprocal_sizes(samples)
    if shared is not None and not mesh_shape:
        n_k = max(n_k, shared.n_k)
    as_list = PaddedSizes(padded_node_count(n_atoms, dense=False), round_up_to_bucket(sum(s.n_edges for s in samples)),
                          n_graph, 0, n_k, mesh_shape)
    k = round_up_neighbours(max((s.max_neighbours for s in samples), default=0))
    if shared is not None:
        k = max(k, shared.neighbours_per_node)
    dense = PaddedSizes.dense(padded_node_count(n_atoms, dense=True), k, n_graph, n_k, mesh_shape)
    if layout == "dense" or (layout == "auto"
                             and dense.n_edge <= DENSE_LAYOUT_MAX_SLOTS_PER_EDGE * as_list.n_edge):
        return dense
    return as_list


def fits(sizes: PaddedSizes, need: PaddedSizes) -> bool:
    """Whether a batch whose own bucket is ``need`` can be packed into ``sizes`` instead."""
    return (sizes.n_graph == need.n_graph and sizes.neighbours_per_node == need.neighbours_per_node
            and sizes.mesh_shape == need.mesh_shape and sizes.n_k >= need.n_k
            and sizes.n_node >= need.n_node and sizes.n_edge >= need.n_edge)


def raised_to(sizes: PaddedSizes, n_node: int, n_edge: int) -> PaddedSizes:
    """``sizes`` with at least ``n_node`` nodes and (edge list) ``n_edge`` edges."""
    nodes = max(sizes.n_node, n_node)
    edges = nodes * sizes.neighbours_per_node if sizes.neighbours_per_node else max(sizes.n_edge, n_edge)
    return dataclasses.replace(sizes, n_node=nodes, n_edge=edges)


def covering(held: Optional[PaddedSizes], need: PaddedSizes) -> PaddedSizes:
    """Dense sizes that hold batches of both ``held`` (None: none yet) and ``need``: the same shape
    for batches that come one at a time and vary (grows only, so it compiles once per growth)."""
    if held is None:
        return need
    mesh = tuple(np.maximum(held.mesh_shape, need.mesh_shape).tolist()) if held.mesh_shape and need.mesh_shape \
        else (held.mesh_shape or need.mesh_shape)
    return PaddedSizes.dense(max(held.n_node, need.n_node), max(held.neighbours_per_node, need.neighbours_per_node),
                             max(held.n_graph, need.n_graph), 0 if mesh else max(held.n_k, need.n_k), mesh)


def sizes_for_chunks(chunks: Sequence[Sequence[GraphSample]], batch_size: int, layout: str = "auto",
                     shared: Optional[SharedCapacity] = None, floor: tuple[int, int] = (0, 0)) -> list[PaddedSizes]:
    """Padded sizes of consecutive batches of ``batch_size`` structures (the last may hold fewer).

    A short last batch has a smaller bucket of its own, a shape no full batch has: one more
    compilation for every data set whose size is not a multiple of the batch size (and with
    replay, a new one most epochs). It is padded instead to the smallest bucket of a full
    batch that holds it, a shape already compiled. ``floor``: (nodes, edges) every full
    batch is padded to at least (see `BatchIterator`).
    """
    sizes = [sizes_for(chunk, batch_size + 1, layout, shared) for chunk in chunks]
    if floor != (0, 0):
        sizes = [raised_to(s, *floor) if len(chunk) == batch_size else s for chunk, s in zip(chunks, sizes)]
    full = sorted({s for chunk, s in zip(chunks, sizes) if len(chunk) == batch_size},
                  key=lambda s: (s.n_node, s.n_edge, s.n_k))
    for i, chunk in enumerate(chunks):
        if len(chunk) < batch_size:
            sizes[i] = next((candidate for candidate in full if fits(candidate, sizes[i])), sizes[i])
    return sizes


def pack_samples(samples: Sequence[GraphSample], sizes: Optional[PaddedSizes] = None,
                 e0_per_species: Optional[np.ndarray] = None,
                 dtype=np.float32) -> AtomsGraph:
    """Pack structures into one padded `AtomsGraph` (NumPy arrays, host side).

    Args:
        samples: the structures, at most ``sizes.n_graph - 1`` of them.
        sizes: padded sizes; by default the bucket that fits ``samples`` with one
            padding graph.
        e0_per_species: [119] reference energy per element, eV, or [F, 119] one row per
            fidelity (a frame takes its ``frame.fidelity``'s row). The energy target is
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
    N, E, G, K = sizes.n_node, sizes.n_edge, sizes.n_graph, sizes.neighbours_per_node
    too_many_neighbours = K and max((s.max_neighbours for s in samples), default=0) > K
    if sizes.mesh_shape:  # the mesh replaces the k indices; it must resolve every one of them
        too_many_k = any(size < 2 * extent + 1 for size, extent in zip(sizes.mesh_shape, largest_k_index(samples)))
    else:
        too_many_k = max((len(s.k_indices) for s in samples), default=0) > sizes.n_k
    if (len(samples) > G - 1 or n_real_nodes > N - (0 if K else 1) or n_real_edges > E or too_many_neighbours
            or too_many_k or (K and E != N * K)):
        raise ValueError(f"batch of {len(samples)} graphs, {n_real_nodes} nodes, {n_real_edges} edges "
                         f"does not fit padded sizes {sizes}")
    positions = np.zeros((N, 3), np.float64)
    species = np.zeros((N,), np.int32)
    node_graph = np.full((N,), G - 1, np.int32)
    cell = np.zeros((G, 3, 3), np.float64)
    # Padding edges are self-loops with zero shift: on the last padding node for an edge
    # list, in every unused slot of a node for the dense layout.
    if K:
        senders = np.repeat(np.arange(N, dtype=np.int32), K)
        receivers = senders.copy()
    else:
        senders = np.full((E,), N - 1, np.int32)
        receivers = np.full((E,), N - 1, np.int32)
    shifts = np.zeros((E, 3), np.int32)
    n_node = np.zeros((G,), np.int32)
    n_edge = np.zeros((G,), np.int32)
    charge = np.zeros((G,), np.float64)
    spin = np.ones((G,), np.float64)
    fidelity = np.zeros((G,), np.int32)
    k_indices = np.zeros((G, sizes.n_k, 3), np.int32)
    energy = np.zeros((G,), np.float64)
    energy_mask = np.zeros((G,), np.float64)
    forces = np.zeros((N, 3), np.float64)
    forces_mask = np.zeros((N,), np.float64)
    stress = np.zeros((G, 3, 3), np.float64)
    stress_mask = np.zeros((G,), np.float64)
    magmoms = np.zeros((N,), np.float64)
    magmoms_mask = np.zeros((N,), np.float64)

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
        if K:
            slots = node_offset * K + dense_slots(sample.receivers, n, K)
            senders[slots] = sample.senders + node_offset
            shifts[slots] = sample.shifts
        else:
            senders[edges] = sample.senders + node_offset
            receivers[edges] = sample.receivers + node_offset
            shifts[edges] = sample.shifts
        n_node[g], n_edge[g] = n, n * K if K else e
        charge[g], spin[g], fidelity[g] = frame.charge, frame.spin, frame.fidelity
        if not sizes.mesh_shape:
            k_indices[g, :len(sample.k_indices)] = sample.k_indices
        if frame.energy is not None:
            if e0_per_species is None:
                reference = 0.0
            else:
                table = e0_per_species[frame.fidelity] if np.ndim(e0_per_species) == 2 else e0_per_species
                reference = float(np.sum(table[frame.numbers]))
            energy[g] = frame.energy - reference
            energy_mask[g] = 1.0
        if frame.forces is not None:
            forces[nodes] = frame.forces
            forces_mask[nodes] = 1.0
        if frame.stress is not None:
            stress[g] = frame.stress
            stress_mask[g] = 1.0
        if frame.magmoms is not None:
            magmoms[nodes] = frame.magmoms
            magmoms_mask[nodes] = 1.0
        node_offset += n
        edge_offset += e
    n_node[G - 1] = N - node_offset
    n_edge[G - 1] = (N - node_offset) * K if K else E - edge_offset

    targets = {
        "energy": energy.astype(dtype), "energy_mask": energy_mask.astype(dtype),
        "forces": forces.astype(dtype), "forces_mask": forces_mask.astype(dtype),
        "stress": stress.astype(dtype), "stress_mask": stress_mask.astype(dtype),
        "magmoms": magmoms.astype(dtype), "magmoms_mask": magmoms_mask.astype(dtype),
    }
    return AtomsGraph(
        positions=positions.astype(dtype), species=species, cell=cell.astype(dtype),
        senders=senders, receivers=receivers, shifts=shifts, n_node=n_node, n_edge=n_edge,
        node_graph=node_graph, charge=charge.astype(dtype), spin=spin.astype(dtype),
        fidelity=fidelity, k_indices=k_indices, targets=targets, neighbours_per_node=K,
        mesh_shape=tuple(sizes.mesh_shape))


def dense_slots(receivers: np.ndarray, n_atoms: int, neighbours_per_node: int) -> np.ndarray:
    """[e] slot ``receiver * K + rank`` of each edge in the dense layout (rank: its order
    among the edges into the same receiver)."""
    order = np.argsort(receivers, kind="stable")
    counts = np.bincount(receivers, minlength=n_atoms)
    first = np.cumsum(counts) - counts
    rank = np.empty(len(receivers), np.int64)
    rank[order] = np.arange(len(receivers)) - first[receivers[order]]
    return receivers.astype(np.int64) * neighbours_per_node + rank


class BatchIterator:
    """Yields padded batches of ``batch_size`` structures, shuffled by an explicit seed.

    All batches share ``n_graph = batch_size + 1`` and the data set's `SharedCapacity`;
    node and edge counts come from the bucket ladder, so the number of distinct shapes
    (compilations) stays small.

    ``replay = (pool, count)``: every shuffled pass also draws ``count`` structures of
    ``pool`` (old data rehearsed while fine-tuning), a fresh draw per seed; their
    indices in the yielded lists are ``len(samples) + index in pool``. A sample whose
    ``frame.repeat`` is k appears k times in every shuffled pass (oversampling).

    Structures of different sizes give full batches of several buckets. The smallest
    buckets, needed by at most ``RARE_BUCKET_FRACTION`` of the batches (a chance run of
    small structures), are padded up to the next one: each would otherwise cost a whole
    compilation for a few steps. Ethanol replayed into n-butane fine-tuning had 4 % of its
    batches in the smallest of four buckets.
    """

    RARE_BUCKET_FRACTION = 0.05
    _SIMULATED_BATCHES = 2000  # shuffled batches drawn, at least an epoch, to count the buckets

    def __init__(self, samples: Sequence[GraphSample], batch_size: int,
                 e0_per_species: Optional[np.ndarray] = None, dtype=np.float32, layout: str = "auto",
                 replay: Optional[tuple[Sequence[GraphSample], int]] = None):
        self.samples = list(samples)
        self.batch_size = int(batch_size)
        self.e0_per_species = e0_per_species
        self.dtype = dtype
        self.layout = layout
        self.replay_pool = list(replay[0]) if replay else []
        self.replay_count = min(int(replay[1]), len(self.replay_pool)) if replay else 0
        self.shared = SharedCapacity.of(self.samples + self.replay_pool)
        self.floor = self._common_floor()

    def _common_floor(self) -> tuple[int, int]:
        """(nodes, edges): the smallest buckets that more than RARE_BUCKET_FRACTION of full batches need."""
        pool = self.samples + self.replay_pool
        atoms = np.array([s.n_atoms for s in pool])
        edges = np.array([s.n_edges for s in pool])
        dense = self.layout == "dense" or (self.layout == "auto" and self.shared.layout == "dense")
        drawn_atoms, drawn_edges = [], []
        for seed in range(1000):  # sizes_for's node and edge buckets, for whole shuffled passes at once
            order = self._order(seed)
            full = order[:len(order) - len(order) % self.batch_size].reshape(-1, self.batch_size)
            drawn_atoms.append(atoms[full].sum(axis=1))
            drawn_edges.append(edges[full].sum(axis=1))
            if sum(map(len, drawn_atoms)) >= self._SIMULATED_BATCHES:
                break
        nodes = Counter()
        for count, times in zip(*np.unique(np.concatenate(drawn_atoms), return_counts=True)):
            nodes[padded_node_count(int(count), dense)] += int(times)
        if dense:  # edges follow the nodes: K slots each
            return self._floor_of(nodes), 0
        edge_buckets = Counter()
        for count, times in zip(*np.unique(np.concatenate(drawn_edges), return_counts=True)):
            edge_buckets[round_up_to_bucket(int(count))] += int(times)
        return self._floor_of(nodes), self._floor_of(edge_buckets)

    @classmethod
    def _floor_of(cls, counts: Counter) -> int:
        total, below = sum(counts.values()), 0
        for bucket in sorted(counts):
            if below + counts[bucket] > cls.RARE_BUCKET_FRACTION * total:
                return bucket
            below += counts[bucket]
        return 0

    def __len__(self) -> int:
        return math.ceil((len(self._epoch_indices()) + self.replay_count) / self.batch_size)

    def _epoch_indices(self) -> np.ndarray:
        """Every sample's index, as often as its frame's ``repeat`` asks."""
        return np.repeat(np.arange(len(self.samples)), [max(int(s.frame.repeat), 1) for s in self.samples])

    def _order(self, shuffle_seed: int) -> np.ndarray:
        """A shuffled pass: every sample (repeats included) and a fresh draw of the replay pool."""
        order = self._epoch_indices()
        rng = np.random.default_rng(shuffle_seed)
        if self.replay_count:
            drawn = rng.choice(len(self.replay_pool), self.replay_count, replace=False) + len(self.samples)
            order = np.concatenate([order, drawn])
        return rng.permutation(order)

    def batches(self, shuffle_seed: Optional[int] = None) -> Iterator[tuple[AtomsGraph, list[int]]]:
        """Yield (batch, indices of its samples); order fixed by ``shuffle_seed`` (None: in order,
        without replay)."""
        pool = self.samples + self.replay_pool
        order = np.arange(len(self.samples)) if shuffle_seed is None else self._order(shuffle_seed)
        index_chunks = [order[start:start + self.batch_size].tolist() for start in range(0, len(order), self.batch_size)]
        chunks = [[pool[i] for i in indices] for indices in index_chunks]
        for indices, chosen, sizes in zip(index_chunks, chunks,
                                          sizes_for_chunks(chunks, self.batch_size, self.layout, self.shared,
                                                           self.floor)):
            yield pack_samples(chosen, sizes, self.e0_per_species, self.dtype), indices
