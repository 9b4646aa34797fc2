"""`AtomsGraph`: the one data structure every stage of mlip reads and writes.

A batch of atomic structures as a padded graph. Host side the fields are NumPy
arrays, device side jax arrays; the class is a frozen dataclass registered as a JAX
pytree so it passes through `jit`, `grad` and `vmap` unchanged.

Conventions (see DESIGN.md):
  * edge ``k`` carries a message from ``senders[k]`` (neighbour j) to
    ``receivers[k]`` (centre i); its vector is
    ``r_ij = positions[j] + shifts[k] @ cell[g] - positions[i]``, i.e. ``shifts`` are
    the integer lattice translations of the *sender* image (ASE's ``neighbor_list``
    "ijS" with i = receiver, j = sender).
  * padding nodes have ``species == 0``; padding edges are self-loops with zero shift
    (``senders == receivers``, ``shifts == 0``), which no real edge can be; padding
    graphs (at the end) hold only padding nodes, possibly none. Masks, not branches,
    remove padding from every sum.
  * two edge layouts. ``neighbours_per_node == 0``: an edge list, real edges first,
    padding edges on the last padding node. ``neighbours_per_node == K > 0``: a dense
    receiver-major layout, ``E == N * K`` and edge ``n * K + k`` has receiver ``n``;
    a node with fewer than K neighbours fills its remaining slots with self-loops.
    Models may then aggregate by reshaping to [N, K] instead of scattering (see
    `mlip.models.mace`). K is static (part of the jit cache key).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # np.ndarray on the host, jax.Array on device


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AtomsGraph:
    """A padded batch of atomic structures.

    Attributes:
        positions: [N, 3] Cartesian positions, Å.
        species: [N] atomic numbers, 0 for padding nodes.
        cell: [G, 3, 3] lattice vectors as rows, Å; zeros for a non-periodic graph.
        senders: [E] index of the neighbour atom j of each edge.
        receivers: [E] index of the centre atom i of each edge.
        shifts: [E, 3] integer lattice translations of the sender image.
        n_node: [G] number of nodes in each graph.
        n_edge: [G] number of edges in each graph.
        node_graph: [N] graph index of each node.
        charge: [G] total charge, e.
        spin: [G] spin multiplicity (1 = singlet).
        fidelity: [G] index of the level of theory that labelled the graph.
        k_indices: [G, M, 3] integer reciprocal-lattice indices n (k = n·2π cell⁻ᵀ) of a
            half space of each periodic graph, for Ewald sums (`mlip.physics.ewald`);
            zero rows pad (k = 0 is excluded from every sum). M = 0 when the model has
            no reciprocal-space term or when ``mesh_shape`` is set.
        mesh_shape: (K1, K2, K3) of a particle-mesh Ewald sum that replaces the sum over
            ``k_indices`` for large cells, () for none. Static (a pytree metadata field).
        targets: dict of labels: ``energy`` [G] (eV, above the reference energies),
            ``forces`` [N, 3] (eV/Å), ``stress`` [G, 3, 3] (eV/Å³), each with a
            matching ``<name>_mask`` ([G] or [N]) that is 1 where the label exists.
        neighbours_per_node: K of the dense receiver-major edge layout; 0 for an edge
            list. Static: a pytree metadata field.
    """

    positions: Array  # [N, 3]
    species: Array  # [N]
    cell: Array  # [G, 3, 3]
    senders: Array  # [E]
    receivers: Array  # [E]
    shifts: Array  # [E, 3]
    n_node: Array  # [G]
    n_edge: Array  # [G]
    node_graph: Array  # [N]
    charge: Array  # [G]
    spin: Array  # [G]
    fidelity: Array  # [G]
    k_indices: Array  # [G, M, 3]
    targets: dict = dataclasses.field(default_factory=dict)
    neighbours_per_node: int = dataclasses.field(default=0, metadata=dict(static=True))
    mesh_shape: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def n_graph(self) -> int:
        return self.n_node.shape[0]

    @property
    def node_mask(self) -> Array:
        """[N] 1 for real atoms, 0 for padding."""
        return self.species > 0

    @property
    def edge_mask(self) -> Array:
        """[E] True for real edges (padding edges are self-loops with zero shift)."""
        xp = jnp if isinstance(self.senders, jax.Array) else np
        return (self.senders != self.receivers) | xp.any(self.shifts != 0, axis=-1)

    @property
    def graph_mask(self) -> Array:
        """[G] True for graphs with at least one real atom."""
        xp = jnp if isinstance(self.species, jax.Array) else np
        real_count = _segment_sum(xp, self.node_mask.astype(xp.int32), self.node_graph, self.n_graph)
        return real_count > 0

    @property
    def edge_graph(self) -> Array:
        """[E] graph index of each edge."""
        return self.node_graph[self.receivers]

    def replace(self, **changes) -> "AtomsGraph":
        return dataclasses.replace(self, **changes)


def _segment_sum(xp, values, segment_ids, num_segments):
    if xp is jnp:
        return jax.ops.segment_sum(values, segment_ids, num_segments)
    out = np.zeros((num_segments,) + values.shape[1:], dtype=values.dtype)
    np.add.at(out, segment_ids, values)
    return out


def random_rotations(key: jax.Array, count: int, dtype=jnp.float32) -> jax.Array:
    """[count, 3, 3] rotations uniform on SO(3): normalised Gaussian quaternions."""
    q = jax.random.normal(key, (count, 4), dtype)
    w, x, y, z = jnp.moveaxis(q / jnp.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return jnp.stack([
        jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        jnp.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        jnp.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)


def rotate_graph(graph: AtomsGraph, rotations: jax.Array) -> AtomsGraph:
    """Each graph g turned by rotations[g] ([G, 3, 3]): positions, cell, force and stress labels.

    Integer image shifts stay valid (the cell turns with the atoms); energies, charges and
    magnetic moments are scalars. Used for rotation augmentation of non-equivariant models.
    """
    per_node = rotations[graph.node_graph]
    turn = lambda vectors: jnp.einsum("nab,nb->na", per_node, vectors)  # noqa: E731
    targets = dict(graph.targets)
    if "forces" in targets:
        targets["forces"] = turn(targets["forces"])
    if "stress" in targets:
        targets["stress"] = jnp.einsum("gab,gbc,gdc->gad", rotations, targets["stress"], rotations)
    return graph.replace(positions=turn(graph.positions), cell=jnp.einsum("gab,gcb->gca", rotations, graph.cell),
                         targets=targets)
