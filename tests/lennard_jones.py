"""A Lennard-Jones argon potential with the `Potential` interface, for integrator physics tests.

Thermostat and barostat statistics (mean temperature, mean pressure) need a bound,
physical system and thousands of steps; a pair potential gives both in seconds,
where a random-weight MACE model has no equilibrium volume. It uses mlip's padded
graphs and derivative conventions (forces −∂E/∂r, stress (1/V) ∂E/∂ε), so the MD
code under test runs unchanged.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mlip.data.statistics import DatasetStatistics
from mlip.training.config import ModelConfig

ARGON_EPSILON = 0.0104  # eV
ARGON_SIGMA = 3.40  # Å


@dataclasses.dataclass(frozen=True, eq=False)
class LennardJonesPotential:
    epsilon: float = ARGON_EPSILON
    sigma: float = ARGON_SIGMA
    cutoff: float = 2.5 * ARGON_SIGMA
    k_cutoff = None  # no reciprocal-space term (the interface of mlip.potential.Potential)
    molecules_only = False  # describes periodic cells too (same interface)
    config: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(dtype="float64"))
    statistics: DatasetStatistics = dataclasses.field(default_factory=lambda: DatasetStatistics(
        atomic_numbers=(18,), e0={18: 0.0}, shift=0.0, scale=1.0, avg_num_neighbors=1.0))

    def reference_energy(self, numbers, fidelity=None) -> float:
        return 0.0

    def reference_energies(self, numbers, fidelity=None):
        return np.zeros(len(numbers))

    def _pair(self, r):
        x6 = (self.sigma / r) ** 6
        xc6 = (self.sigma / self.cutoff) ** 6
        return 4 * self.epsilon * ((x6 * x6 - x6) - (xc6 * xc6 - xc6))  # shifted: zero at the cutoff

    def apply(self, params, graph, compute_forces=True, compute_stress=False):
        n_graph = graph.n_node.shape[0]
        real = graph.edge_mask

        def energy_of(positions, strain):
            strain = 0.5 * (strain + jnp.swapaxes(strain, -1, -2))
            positions = positions + jnp.einsum("na,nab->nb", positions, strain[graph.node_graph])
            cell = graph.cell + jnp.einsum("gab,gbc->gac", graph.cell, strain)
            vectors = (positions[graph.senders] - positions[graph.receivers]
                       + jnp.einsum("ea,eab->eb", graph.shifts.astype(positions.dtype),
                                    cell[graph.node_graph[graph.receivers]]))
            r = jnp.sqrt(jnp.sum(vectors ** 2, axis=1) + (~real))  # padding edges: r = 1, masked
            inside = real & (r < self.cutoff)
            pair = jnp.where(inside, self._pair(jnp.where(inside, r, self.cutoff)), 0.0)
            node_energy = 0.5 * jax.ops.segment_sum(pair, graph.receivers, positions.shape[0])
            graph_energy = jax.ops.segment_sum(node_energy, graph.node_graph, n_graph)
            return graph_energy.sum(), (graph_energy, node_energy)

        strain = jnp.zeros((n_graph, 3, 3), graph.positions.dtype)
        (grad_r, grad_strain), (energy, node_energy) = jax.grad(energy_of, (0, 1), has_aux=True)(
            graph.positions, strain)
        volume = jnp.abs(jnp.linalg.det(graph.cell))
        safe = jnp.where(volume > 0, volume, 1.0)
        return {"energy": energy, "node_energy": node_energy, "forces": -grad_r,
                "stress": jnp.where((volume > 0)[:, None, None], grad_strain / safe[:, None, None], 0.0)}


# MD takes its potential as an argument of the compiled block (`mlip.potential.Potential`); this
# one has no numbers to trace, so it is all structure (hashed by identity).
jax.tree_util.register_static(LennardJonesPotential)


def argon_crystal(repeat=3, a=5.26):
    from ase.build import bulk

    return bulk("Ar", "fcc", a=a, cubic=True).repeat(repeat)


def no_params():
    return np.zeros(())
