"""Several independent MD trajectories of one model, stepped together in one compiled block.

    md = ReplicaDynamics(potential, params, [atoms_a, atoms_b, atoms_a],
                         temperatures_K=[300, 600, 1200], seeds=[0, 1, 2], ensemble="langevin")
    md.run(100)                 # every live replica 100 steps further
    md.atoms(2)                 # replica 2 now (ase.Atoms with energy and forces)
    md.stop(1, "σ too high")    # the caller ends a replica; the others go on
    md.stopped                  # {replica: why it stopped}

One compiled loop steps all replicas in lockstep: each step is the checked integrator
step of `mlip.md.simulation` (stability checks, neighbour-list completeness check) under
`jax.vmap`, with one force call for all of them on the union of their graphs, and the loop returns to the host once
every replica has run its steps or one of them needs its neighbour list rebuilt (or
became unstable). Each replica is exactly the trajectory `MolecularDynamics` would run
with the same structure, temperature and seed (tested): its own neighbour list, rebuilt
when it alone needs it, its own thermostat, noise stream and stability limits. A replica
that becomes unstable stops with the message `MolecularDynamics` would raise, kept in
``stopped``; the others go on. What it buys depends on the device: on 2 CPU cores a
14-atom molecule's step is mostly arithmetic already, and 6 trajectories together made
1.21× the steps of the same runs one after another, 24 made 1.45× (docs/benchmarks.md);
on a GPU the replicas fill a device that one small molecule leaves idle (not measured yet).

The replicas share the ensemble, time step and model; their structures (sizes and
periodicity too), cells, temperatures and seeds may differ. Every replica's arrays are
padded to the largest one's (masked atoms that neither move nor interact), so replicas of
different sizes cost one compiled program, and the smaller ones the work of the padding.
A padded replica still runs its lone trajectory: JAX's partitionable threefry draws each
atom's Langevin noise by its index, whatever the padding.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator

from mlip.compilation_cache import enable_compilation_cache
from mlip.data.batching import PaddedSizes, pack_samples, padded_node_count, reciprocal_sizes, round_up_neighbours
from mlip.errors import MLIPError
from mlip.md import integrators
from mlip.md.integrators import ENSEMBLES, Ensemble
from mlip.md.simulation import (_REBUILD, _RUNNING, MDReport, MDStabilityError, _check_elements, _Program,
                                _run_block, checked_step, describe_failure, neighbour_sample,
                                padded_start)
from mlip.potential import on_device


class ReplicaDynamics:
    """Independent MD runs of one potential, stepped together.

    Args:
        potential, params: the model (see `mlip.training.checkpoint.load_potential`).
        structures: one initial structure per replica (any size and periodicity). Momenta
            are used where set, else drawn at the replica's temperature with its seed.
        temperatures_K: one per replica (thermostat target and initial temperature);
            None for NVE from the structures' own momenta.
        seeds: one per replica (velocities and Langevin noise), default 0, 1, 2, ...
        ensemble, timestep_fs, pressure_GPa, friction_per_fs, tdamp_fs, pdamp_fs, tchain,
        pchain, skin, block_steps, min_distance_fraction: as `MolecularDynamics`, shared.
        max_temperature_K: stop a replica above this temperature (default 5 × max(T, 300 K)
            of each replica).
    """

    def __init__(self, potential, params, structures: Sequence[Atoms], temperatures_K: Optional[Sequence] = None,
                 seeds: Optional[Sequence[int]] = None, ensemble: str = "langevin", timestep_fs: float = 0.5,
                 pressure_GPa: float = 0.0, friction_per_fs: float = 0.01, tdamp_fs: Optional[float] = None,
                 pdamp_fs: Optional[float] = None, tchain: int = 3, pchain: int = 3, skin: float = 0.5,
                 block_steps: int = 50, min_distance_fraction: float = 0.5,
                 max_temperature_K: Optional[float] = None):
        structures = list(structures)
        count = len(structures)
        temperatures = [None] * count if temperatures_K is None else [t for t in temperatures_K]
        seeds = list(range(count)) if seeds is None else [int(s) for s in seeds]
        if count == 0 or len(temperatures) != count or len(seeds) != count:
            raise MLIPError(f"need one temperature and one seed per structure (got {count} structures, "
                            f"{len(temperatures)} temperatures, {len(seeds)} seeds)")
        if ensemble not in ENSEMBLES:
            raise MLIPError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
        if timestep_fs <= 0 or skin < 0 or block_steps < 1:
            raise MLIPError(f"need timestep_fs > 0, skin >= 0, block_steps >= 1 "
                            f"(got {timestep_fs}, {skin}, {block_steps})")
        self.pbc = [np.asarray(atoms.pbc, bool) for atoms in structures]
        for index, atoms in enumerate(structures):
            if ensemble != "nve" and not temperatures[index]:
                raise MLIPError(f"replica {index}: ensemble {ensemble} needs a target temperature (> 0)")
            if ensemble.startswith("npt") and not self.pbc[index].all():
                raise MLIPError(f"replica {index}: ensemble {ensemble} needs a periodic cell in all three "
                                f"directions (pbc is {self.pbc[index].tolist()})")
            _check_elements(np.asarray(atoms.numbers), potential.statistics.atomic_numbers)
        enable_compilation_cache()
        self.potential = potential
        self.params = jax.device_put(params)
        self.count = count
        self.atom_counts = np.array([len(atoms) for atoms in structures])
        self.numbers = [np.asarray(atoms.numbers) for atoms in structures]
        self.charges = [float(atoms.info.get("total_charge", 0.0)) for atoms in structures]
        self.spins = [float(atoms.info.get("total_spin", 1.0)) for atoms in structures]
        self.reference_energies = np.array([potential.reference_energy(numbers) for numbers in self.numbers])
        self._n_padded = padded_node_count(int(self.atom_counts.max()), dense=True)
        self.skin = float(skin)
        self.block_steps = int(block_steps)
        self.timestep_fs = float(timestep_fs)
        self.min_distance_fraction = float(min_distance_fraction)
        self.max_temperatures_K = np.array([float(max_temperature_K or 5 * max(t or 0.0, 300.0))
                                            for t in temperatures])
        self.dtype = np.float64 if potential.config.dtype == "float64" else np.float32
        dt = timestep_fs * units.fs
        ensembles = [Ensemble(name=ensemble, timestep=dt, n_atoms=int(n), temperature_K=float(t or 0.0),
                              pressure=pressure_GPa * units.GPa, friction=friction_per_fs / units.fs,
                              tdamp=(tdamp_fs * units.fs) if tdamp_fs else 100 * dt,
                              pdamp=(pdamp_fs * units.fs) if pdamp_fs else 1000 * dt, tchain=tchain, pchain=pchain)
                     for t, n in zip(temperatures, self.atom_counts)]
        self.ensemble = ensembles[0]  # the shared settings (name, time step, chains)
        self._ensembles = jax.tree.map(lambda *values: np.asarray(values, self.dtype), *ensembles)
        self.steps_done = np.zeros(count, np.int64)
        self.stopped: dict[int, str] = {}
        self.neighbour_list_builds = 0
        self._samples: list = [None] * count
        self._graphs: list = [None] * count  # each replica's packed graph at ``self._sizes``
        self._sizes = None
        self._neighbour_capacity = 0
        self._k_capacity = 0
        self._mesh_shape: tuple = ()
        self._program = _Program(self.block_steps)
        self._potential = on_device(potential)  # an argument of the programs (see MolecularDynamics)
        self._compilations_before = _run_replica_blocks._cache_size() + _run_block._cache_size()
        self._states = self._initial_states(structures, temperatures, seeds, ensembles)
        self._host_states = None

    @property
    def live(self) -> np.ndarray:
        """[replicas] True for a replica still running."""
        return np.array([r not in self.stopped for r in range(self.count)])

    # ----------------------------------------------------------------------------- setup

    def _initial_states(self, structures, temperatures, seeds, ensembles):
        cast = lambda x: jnp.asarray(x, self.dtype)  # noqa: E731
        resting, keys = [], []
        for atoms, pbc, temperature, seed, ensemble in zip(structures, self.pbc, temperatures, seeds, ensembles):
            positions, momenta, masses, atom_mask = padded_start(atoms, self._n_padded, temperature, seed)
            cell = np.asarray(atoms.cell.array, np.float64) if pbc.any() else np.zeros((3, 3))
            key = jax.random.PRNGKey(seed)
            keys.append(key)
            resting.append(integrators.resting_state(ensemble, cast(positions), cast(momenta), cast(masses),
                                                     cast(atom_mask), cast(cell), key))
        states = jax.tree.map(lambda *leaves: jnp.stack(leaves), *resting)
        self._rebuild_neighbours(range(self.count), states)
        # The initial forces: a step of zero length through the block program (see MolecularDynamics).
        still = dataclasses.replace(self._ensembles, timestep=np.zeros(self.count, self.dtype))
        no_limits = np.tile([1e30, 0.0, 1e30], (self.count, 1))
        states, status, detail, _ = self._block(still, no_limits, states, np.ones(self.count))
        for replica in np.flatnonzero(status != _RUNNING):
            raise MDStabilityError(f"replica {replica}, initial structure: "
                                   + self._describe(replica, int(status[replica]), detail[replica]))
        return states.replace(key=jnp.stack(keys))  # the zero step drew no noise

    def _rebuild_neighbours(self, replicas, states) -> None:
        """Host neighbour lists of ``replicas`` at cutoff + skin; the shared capacity only grows."""
        positions = np.asarray(jax.device_get(states.positions), np.float64)
        cells = np.asarray(jax.device_get(states.cell), np.float64)
        for r in replicas:
            sample = neighbour_sample(self.potential, self.skin, positions[r, :self.atom_counts[r]], self.numbers[r],
                                      cells[r], self.pbc[r], self.charges[r], self.spins[r])
            self._samples[r] = sample
            self._neighbour_capacity = max(self._neighbour_capacity, round_up_neighbours(sample.max_neighbours))
            n_k, mesh_shape = reciprocal_sizes([sample])
            self._k_capacity = max(self._k_capacity, n_k)
            if mesh_shape:
                self._mesh_shape = tuple(np.maximum(self._mesh_shape or (0, 0, 0), mesh_shape).tolist())
            self.neighbour_list_builds += 1
        # Every replica's graph at the shared sizes: the stacked templates are one array each. Only
        # the rebuilt replicas are packed again, unless the shared sizes grew.
        sizes = PaddedSizes.dense(self._n_padded, self._neighbour_capacity, 2,
                                  0 if self._mesh_shape else self._k_capacity, self._mesh_shape)
        repack = range(self.count) if sizes != self._sizes else replicas
        for r in repack:
            self._graphs[r] = pack_samples([self._samples[r]], sizes, None, self.dtype)
        self._sizes, graphs = sizes, self._graphs
        self._templates = jax.device_put(jax.tree.map(lambda *leaves: np.stack(leaves),
                                                      *[graph.replace(targets={}) for graph in graphs]))
        self._reference_positions = jnp.asarray(np.stack([graph.positions for graph in graphs]), self.dtype)
        self._reference_cells = jnp.asarray(np.stack([sample.frame.cell for sample in self._samples]), self.dtype)
        # A molecule whose list holds every ordered pair can never miss one (no rebuilds).
        self._complete = np.array([not pbc.any() and sample.n_edges == n * (n - 1)
                                   for sample, pbc, n in zip(self._samples, self.pbc, self.atom_counts)])

    def _block(self, ensembles, limits, states, steps):
        if self.count == 1:  # one trajectory: the program of MolecularDynamics, which a lone run is
            first = lambda tree: jax.tree.map(lambda leaf: leaf[0], tree)  # noqa: E731
            state, status, detail, executed, _ = _run_block(
                self._program, self._potential, first(ensembles), jnp.asarray(limits[0], self.dtype), self.params,
                first(states), first(self._templates), self._reference_positions[0], self._reference_cells[0],
                jnp.asarray(steps[0], jnp.int32))
            states = jax.tree.map(lambda leaf: leaf[None], state)
            return states, np.asarray(status)[None], np.asarray(detail)[None], np.asarray(executed)[None]
        states, status, detail, executed = _run_replica_blocks(
            self._program, self._potential, ensembles, jnp.asarray(limits, self.dtype), self.params, states,
            self._templates, self._reference_positions, self._reference_cells, jnp.asarray(steps, jnp.int32))
        return states, np.asarray(status), np.asarray(detail), np.asarray(executed)

    # ----------------------------------------------------------------------------- host loop

    def run(self, n_steps: int) -> MDReport:
        """Advance every live replica ``n_steps`` steps; an unstable one stops (see ``stopped``)."""
        start = time.perf_counter()
        builds = self.neighbour_list_builds
        target = self.steps_done + int(n_steps)
        stalled = np.zeros(self.count, bool)
        limits = np.stack([np.full(self.count, self.skin), np.full(self.count, self.min_distance_fraction),
                           self.max_temperatures_K], axis=1)
        while True:
            steps = np.where(self.live, np.minimum(target - self.steps_done, self.block_steps), 0)
            if not steps.any():
                break
            limits[:, 0] = np.where(self._complete, 1e30, self.skin)
            self._states, status, detail, executed = self._block(self._ensembles, limits, self._states, steps)
            self._host_states = None
            self.steps_done += executed
            rebuild = []
            for r in np.flatnonzero(steps):
                if status[r] == _REBUILD:
                    if executed[r] == 0 and stalled[r]:
                        self.stop(r, f"step {self.steps_done[r] + 1}: atoms moved more than skin/2 = "
                                     f"{self.skin / 2} Å in one step; the time step ({self.timestep_fs} fs) is "
                                     f"too large or the system is exploding")
                        continue
                    stalled[r] = executed[r] == 0
                    rebuild.append(r)
                elif status[r] != _RUNNING:
                    self.stop(r, self._describe(r, int(status[r]), detail[r]))
                else:
                    stalled[r] = False
            if rebuild:
                self._rebuild_neighbours(rebuild, self._states)
        return MDReport(steps=int(n_steps), seconds=time.perf_counter() - start,
                        neighbour_list_builds=self.neighbour_list_builds - builds)

    def stop(self, replica: int, reason: str) -> None:
        """End ``replica`` here (its last state stays readable); the others go on."""
        self.stopped.setdefault(int(replica), reason)

    def _describe(self, replica: int, status: int, detail: np.ndarray) -> str:
        template = jax.tree.map(lambda leaf: np.asarray(leaf)[replica], self._templates)
        return describe_failure(status, detail, int(self.steps_done[replica]) + 1, template, self.numbers[replica],
                                self.min_distance_fraction, float(self.max_temperatures_K[replica]))

    # ----------------------------------------------------------------------------- results

    def atoms(self, replica: int) -> Atoms:
        """Replica ``replica`` now, with momenta, and energy and forces (and stress) attached."""
        if self._host_states is None:  # one transfer for every replica's snapshot
            self._host_states = jax.device_get(self._states)
        state = jax.tree.map(lambda leaf: np.asarray(leaf)[replica], self._host_states)
        n, pbc = self.atom_counts[replica], self.pbc[replica]
        cell = np.asarray(state.cell, np.float64)
        atoms = Atoms(numbers=self.numbers[replica], positions=np.asarray(state.positions[:n], np.float64),
                      cell=cell if pbc.any() else None, pbc=pbc,
                      momenta=np.asarray(state.momenta[:n], np.float64))
        results = {"energy": float(self.reference_energies[replica]) + float(state.energy),
                   "forces": np.asarray(state.forces[:n], np.float64)}
        if self.ensemble.changes_cell:
            results["stress"] = np.asarray(state.stress, np.float64).reshape(9)[[0, 4, 8, 5, 2, 1]]
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    def temperatures_K(self) -> np.ndarray:
        """[replicas] current kinetic temperature of each replica, K."""
        return np.asarray(jax.device_get(_temperatures(self._states, self._ensembles.n_atoms)), np.float64)

    @property
    def compilations(self) -> int:
        """Block programs compiled since these replicas started."""
        return _run_replica_blocks._cache_size() + _run_block._cache_size() - self._compilations_before


def replica_groups(sizes: Sequence[int], max_padding: float = 2.0) -> list[list[int]]:
    """Trajectories of structures of ``sizes`` atoms, grouped to step together: lists of indices,
    largest first. A group pads every trajectory to its largest (`ReplicaDynamics`): one program
    for all saves a compilation per size (seconds on a CPU, more on a GPU) but costs the
    padding's work. The fewest groups whose padded atoms stay within ``max_padding`` times their
    real atoms each, and among those the least padding (groups of neighbours in size order)."""
    if max_padding < 1:
        raise ValueError(f"max_padding is padded over real atoms, at least 1 (got {max_padding})")
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    ordered = [int(sizes[i]) for i in order]
    real = np.concatenate([[0], np.cumsum(ordered)])  # real[j]: atoms of the first j
    # best[j]: (groups, padded atoms, start of the last group) for the first j trajectories.
    best = [(0, 0, 0)] + [None] * len(ordered)
    for end in range(1, len(ordered) + 1):
        for start in range(end):
            padded = (end - start) * ordered[start]
            if padded > max_padding * (real[end] - real[start]):
                continue
            option = (best[start][0] + 1, best[start][1] + padded, start)
            if best[end] is None or option[:2] < best[end][:2]:
                best[end] = option
    groups, end = [], len(ordered)
    while end:
        start = best[end][2]
        groups.insert(0, order[start:end])
        end = start
    return groups


@functools.partial(jax.jit, static_argnums=0)
def _run_replica_blocks(program: _Program, potential, ensembles: Ensemble, limits, params, states, templates,
                        reference_positions, reference_cells, steps_to_run):
    """Steps of every replica in lockstep (params shared, everything else per replica), until each
    has run its ``steps_to_run`` or one of them stops (a list to rebuild, an unstable step).

    Not `jax.vmap` of the one-trajectory block: its `lax.scan` runs ``block_steps`` iterations
    whatever is left, and a vmapped `lax.cond` no longer skips the model, so the replicas would
    pay for every step a block could hold (twice the steps with a snapshot every 25 of 50). Here
    a step costs one vmapped force call and the loop ends with the work: a replica that must
    wait (its list, or its steps done) waits at most until the host's next round trip."""
    count = steps_to_run.shape[0]
    dtype = reference_positions.dtype

    forces = _union_forces(ensembles.changes_cell)

    def step_one(ensemble, limit, template, positions, cell, carry, go):
        evaluate = lambda at, cell_now: forces(potential, params, template, at, cell_now)  # noqa: E731
        advance = checked_step(potential, ensemble, limit, params, template, positions, cell, evaluate)
        # A mask, not `lax.cond`: under vmap a cond runs both branches anyway, and it would
        # batch the shared parameters along with everything it closes over.
        return jax.tree.map(lambda new, old: jnp.where(go, new, old), advance(carry), carry)

    step_all = jax.vmap(step_one)

    def unfinished(carry):
        _, status, _, executed = carry
        return jnp.all(status == _RUNNING) & jnp.any(executed < steps_to_run)

    def body(carry):
        return step_all(ensembles, limits, templates, reference_positions, reference_cells, carry,
                        carry[3] < steps_to_run)

    carry = (states, jnp.full(count, _RUNNING, jnp.int32), jnp.zeros((count, 2), dtype), jnp.zeros(count, jnp.int32))
    return jax.lax.while_loop(unfinished, body, carry)


def _union_forces(compute_stress: bool):
    """``forces(potential, params, template, positions, cell) -> (energy, forces, stress)`` of one replica, whose
    `jax.vmap` evaluates all replicas as one graph of disjoint structures (a training batch's
    layout), not the model vmapped: XLA runs the model on the union faster on a CPU (1.6–2.4 ms
    against 1.7–5.4 per replica of a 14-atom molecule for 24 to 1)."""
    def apply(potential, params, graph):
        # A posterior moves atoms by its mean forces (see mlip.md.simulation._force_function).
        return getattr(potential, "apply_mean", potential.apply)(params, graph, True, compute_stress)

    def evaluate(potential, params, template, positions, cell):
        graph = template.replace(positions=positions, cell=template.cell.at[0].set(cell))
        outputs = apply(potential, params, graph)
        stress = outputs["stress"][0] if compute_stress else jnp.zeros((3, 3), positions.dtype)
        return outputs["energy"][0], outputs["forces"], stress

    batched_evaluate = jax.custom_batching.custom_vmap(evaluate)

    @batched_evaluate.def_vmap
    def _(count, batched, potential, params, template, positions, cell):
        if any(jax.tree.leaves(batched[:2])):
            raise NotImplementedError("the union graph needs one model and one set of parameters for every replica")
        spread = lambda tree, flags: jax.tree.map(  # noqa: E731
            lambda leaf, flag: leaf if flag else jnp.broadcast_to(leaf, (count,) + leaf.shape), tree, flags)
        template, positions = spread(template, batched[2]), spread(positions, batched[3])
        cell = spread(cell, batched[4])
        n_node, n_graph = template.positions.shape[1], template.n_node.shape[1]
        node_offset = (jnp.arange(count, dtype=template.senders.dtype) * n_node)[:, None]
        graph_offset = (jnp.arange(count, dtype=template.node_graph.dtype) * n_graph)[:, None]
        flat = lambda leaf: leaf.reshape((leaf.shape[0] * leaf.shape[1],) + leaf.shape[2:])  # noqa: E731
        union = template.replace(
            positions=flat(positions), species=flat(template.species), cell=flat(template.cell.at[:, 0].set(cell)),
            senders=flat(template.senders + node_offset), receivers=flat(template.receivers + node_offset),
            shifts=flat(template.shifts), n_node=flat(template.n_node), n_edge=flat(template.n_edge),
            node_graph=flat(template.node_graph + graph_offset), charge=flat(template.charge),
            spin=flat(template.spin), fidelity=flat(template.fidelity), k_indices=flat(template.k_indices))
        outputs = apply(potential, params, union)
        energy = outputs["energy"].reshape(count, n_graph)[:, 0]
        forces = outputs["forces"].reshape(count, n_node, 3)
        stress = (outputs["stress"].reshape(count, n_graph, 3, 3)[:, 0] if compute_stress
                  else jnp.zeros((count, 3, 3), positions.dtype))
        return (energy, forces, stress), (True, True, True)

    return batched_evaluate


@jax.jit
def _temperatures(states, atom_counts):
    return jax.vmap(integrators.temperature_K)(states, atom_counts)
