"""On-device molecular dynamics: blocks of integrator steps compiled into one `lax.scan`.

    md = MolecularDynamics(potential, params, atoms, ensemble="langevin",
                           timestep_fs=0.5, temperature_K=300)
    md.run(1000)            # 1000 steps on the device, a few host round trips
    md.atoms                # current structure (ase.Atoms with energy/forces attached)

How a block runs. The host builds a neighbour list with vesin at ``cutoff + skin``
and pads it to the bucket ladder. A compiled block then runs up to ``block_steps``
integrator steps in `lax.scan` (force evaluation, integrator, thermodynamic
observables and stability checks all on the device). After each step it checks that
the list is still complete: a pair missing from it was at least ``cutoff + skin``
apart when the list was built, so it cannot be inside the cutoff while
``skin − (cutoff + skin)·‖M − I‖ − 2·max|Δrᵢ| > 0``, where M maps the reference cell
to the current one (identity without a barostat) and Δrᵢ is each atom's displacement
beyond the affine deformation. The first step that breaks this is discarded and the
remaining steps of the block are skipped (`lax.cond`); the host rebuilds the list
and continues from the last valid state. Results are therefore exactly those of a
list rebuilt every step (up to the order of floating-point sums over edges).

Overlapped rebuilds (``overlap_neighbour_lists``, on by default off the CPU): a block
runs with half the skin as its limit, and stops once half of it is used. The host then
starts the next list, from those positions, on a thread, and the device goes on with the
current list, which is still complete, for one more block. The new list comes in after
that block, with the positions it was built from as its reference. The device does not
wait for the host's neighbour list (seconds at 10⁵–10⁶ atoms) unless the list takes longer
than a block; the price is about twice as many builds. Which block the list comes in at
does not depend on the thread's timing, so a run is reproducible.

Stability: a step whose energy or forces are not finite, that brings two atoms
closer than ``min_distance_fraction`` times the sum of their covalent radii, or that
heats the system past ``max_temperature_K`` is discarded and the run stops with
`MDStabilityError`, which names the step, atoms and values; the state before it
is kept (``md.atoms``).

Compilations: one per (padded atom count, neighbour capacity K of the dense edge
layout); K only grows, along the bucket ladder, so a run compiles a handful of times
at most.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols, covalent_radii

from mlip.compilation_cache import enable_compilation_cache
from mlip.data.batching import (PaddedSizes, build_sample, pack_samples, padded_node_count, reciprocal_sizes,
                                round_up_neighbours)
from mlip.data.reader import Frame
from mlip.errors import DataError, MLIPError
from mlip.md import integrators
from mlip.md.integrators import ENSEMBLES, Ensemble, MDState
from mlip.potential import on_device

# Status codes a block returns.
_RUNNING, _REBUILD, _TOO_CLOSE, _TOO_HOT, _NOT_FINITE = 0, 1, 2, 3, 4

THERMO_FIELDS = ("potential_energy", "kinetic_energy", "temperature_K", "conserved_energy",
                 "pressure_GPa", "volume")


@dataclasses.dataclass
class _NeighbourList:
    """A built neighbour list: its padded graph on the device, the positions and cell it was
    built at (the reference of the completeness check) and the capacities it needed."""

    template: Any
    reference_positions: Any
    reference_cell: Any
    capacity: int
    k_capacity: int
    mesh_shape: tuple
    complete: bool


class MDStabilityError(MLIPError):
    """The simulation became unphysical (atoms too close, exploding temperature, NaN)."""


@dataclasses.dataclass
class MDReport:
    """What `MolecularDynamics.run` did: steps, wall time, neighbour-list builds."""

    steps: int
    seconds: float
    neighbour_list_builds: int
    neighbour_wait_s: float = 0.0  # host time the steps waited for neighbour lists

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")


class MolecularDynamics:
    """An MD run of a trained potential, compiled and stepped on the device.

    Args:
        potential, params: the model (see `mlip.training.checkpoint.load_potential`).
        atoms: initial structure. Its momenta are used when set; otherwise velocities
            are drawn from Maxwell–Boltzmann at ``temperature_K`` (seeded) with zero
            total momentum.
        ensemble: ``nve``, ``langevin``, ``nose-hoover``, ``npt`` (isotropic MTK) or
            ``npt-aniso`` (full-cell MTK).
        timestep_fs: time step, fs.
        temperature_K: target (thermostats) and initial temperature.
        pressure_GPa: external pressure for NPT.
        friction_per_fs: Langevin friction γ, 1/fs.
        tdamp_fs, pdamp_fs: Nosé–Hoover and barostat time constants (default 100 and
            1000 time steps).
        skin: neighbour-list skin, Å. Larger means fewer rebuilds but more edges per step
            (at 0.5 Å a dense metal carries 33 % more edges than at the cutoff; at 1 Å, 73 %).
        block_steps: steps per compiled block (host round trip).
        seed: Maxwell–Boltzmann velocities and Langevin noise.
        min_distance_fraction: stop when two atoms come closer than this fraction of
            the sum of their covalent radii.
        max_temperature_K: stop above this temperature (default 5 × max(T, 300 K)).
        max_history_steps: per-step observables kept in memory (`thermo_table`); the
            drift fit covers every step regardless.
        overlap_neighbour_lists: build each next neighbour list on a host thread while the
            device steps (module doc). None: on where JAX computes on an accelerator, off on
            the CPU, where the thread would compete with XLA's for the same cores.
    """

    def __init__(self, potential, params, atoms: Atoms, ensemble: str = "nve", timestep_fs: float = 0.5,
                 temperature_K: Optional[float] = None, pressure_GPa: float = 0.0,
                 friction_per_fs: float = 0.01, tdamp_fs: Optional[float] = None,
                 pdamp_fs: Optional[float] = None, tchain: int = 3, pchain: int = 3, skin: float = 0.5,
                 block_steps: int = 50, seed: int = 0, min_distance_fraction: float = 0.5,
                 max_temperature_K: Optional[float] = None, max_history_steps: int = 1_000_000,
                 overlap_neighbour_lists: Optional[bool] = None):
        if ensemble not in ENSEMBLES:
            raise MLIPError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
        if timestep_fs <= 0 or skin < 0 or block_steps < 1:
            raise MLIPError(f"need timestep_fs > 0, skin >= 0, block_steps >= 1 "
                            f"(got {timestep_fs}, {skin}, {block_steps})")
        if ensemble != "nve" and not temperature_K:
            raise MLIPError(f"ensemble {ensemble} needs a target temperature (temperature_K > 0)")
        pbc = np.asarray(atoms.pbc, bool)
        if ensemble.startswith("npt") and not pbc.all():
            raise MLIPError(f"ensemble {ensemble} needs a periodic cell in all three directions "
                            f"(pbc is {pbc.tolist()})")
        enable_compilation_cache()  # a second start of the same model and size loads its programs
        self.potential = potential
        self.params = jax.device_put(params)
        self.numbers = np.asarray(atoms.numbers)
        self.pbc = pbc
        # Total charge and spin multiplicity, as the calculator and the training data have them.
        self.total_charge = float(atoms.info.get("total_charge", 0.0))
        self.total_spin = float(atoms.info.get("total_spin", 1.0))
        _check_elements(self.numbers, potential.statistics.atomic_numbers)
        self.n_atoms = len(atoms)
        self._n_padded = padded_node_count(self.n_atoms, dense=True)  # state arrays and graph alike
        self.skin = float(skin)
        self.block_steps = int(block_steps)
        self.timestep_fs = float(timestep_fs)
        self.min_distance_fraction = float(min_distance_fraction)
        reference_T = temperature_K or 0.0
        self.max_temperature_K = float(max_temperature_K or 5 * max(reference_T, 300.0))
        self.dtype = np.float64 if potential.config.dtype == "float64" else np.float32
        dt = timestep_fs * units.fs
        self.ensemble = Ensemble(
            name=ensemble, timestep=dt, n_atoms=self.n_atoms, temperature_K=float(temperature_K or 0.0),
            pressure=pressure_GPa * units.GPa, friction=friction_per_fs / units.fs,
            tdamp=(tdamp_fs * units.fs) if tdamp_fs else 100 * dt,
            pdamp=(pdamp_fs * units.fs) if pdamp_fs else 1000 * dt, tchain=tchain, pchain=pchain)
        self.reference_energy = potential.reference_energy(self.numbers)
        self.steps_done = 0
        self.neighbour_list_builds = 0
        self.thermo: dict[str, list] = {name: [] for name in ("step",) + THERMO_FIELDS}
        self.max_history_steps = int(max_history_steps)
        self._drift_sums = np.zeros(5)
        self._energy_origin: Optional[float] = None
        self._neighbour_capacity = 0
        self._k_capacity = 0
        self.overlap_neighbour_lists = (jax.default_backend() != "cpu" if overlap_neighbour_lists is None
                                        else bool(overlap_neighbour_lists))
        self._next_list: Optional[Future] = None  # the list being built on the host thread
        self._list_thread: Optional[ThreadPoolExecutor] = None
        self.neighbour_wait_s = 0.0
        self._mesh_shape: tuple = ()
        self._template = None
        self._program = _Program(self.block_steps)
        # An argument of the block program, not a constant in it (see `Potential`): models of one
        # architecture share the program; on the device once, as the parameters are.
        self._potential = on_device(potential)
        self._limits = np.array([self.skin, self.min_distance_fraction, self.max_temperature_K])
        self._compilations_before = _run_block._cache_size()
        self._state = self._initial_state(atoms, temperature_K, seed)

    # ----------------------------------------------------------------------------- setup

    def _initial_state(self, atoms: Atoms, temperature_K, seed) -> MDState:
        positions, padded_momenta, masses, atom_mask = padded_start(atoms, self._n_padded, temperature_K, seed)
        cell = np.asarray(atoms.cell.array, np.float64) if self.pbc.any() else np.zeros((3, 3))
        self._rebuild_neighbours(positions[:self.n_atoms], cell)
        cast = lambda x: jnp.asarray(x, self.dtype)  # noqa: E731
        key = jax.random.PRNGKey(seed)
        resting = integrators.resting_state(self.ensemble, cast(positions), cast(padded_momenta), cast(masses),
                                            cast(atom_mask), cast(cell), key)
        # The initial forces: one step of zero length through the block program itself, which
        # moves nothing (kicks, drifts and thermostats all scale with the time step) and
        # evaluates the forces. A separate program would cost a second compilation at start-up
        # (about 4 s at 4000 atoms on 2 CPU cores). No stability limits here: those apply to steps.
        no_limits = jnp.asarray([1e30, 0.0, 1e30], self.dtype)
        state, status, detail, _, _ = _run_block(
            self._program, self._potential, dataclasses.replace(self.ensemble, timestep=0.0), no_limits,
            self.params, resting, self._template, self._reference_positions, self._reference_cell,
            jnp.asarray(1, jnp.int32))
        if int(status) != _RUNNING:
            raise MDStabilityError("initial structure: " + self._describe_failure(int(status), np.asarray(detail)))
        return state.replace(key=key)  # the zero step drew no noise: keep the seed's stream as it was

    def _rebuild_neighbours(self, positions: np.ndarray, cell: np.ndarray) -> None:
        """Host neighbour list at cutoff + skin, padded to a capacity that only grows."""
        self._install(self._build_neighbours(positions, cell))

    def _build_neighbours(self, positions: np.ndarray, cell: np.ndarray) -> _NeighbourList:
        """The list at ``positions`` and its padded graph on the device; no state changed, so
        it may run on the host thread while the device steps."""
        sample = neighbour_sample(self.potential, self.skin, positions, self.numbers, cell, self.pbc,
                                  self.total_charge, self.total_spin)
        # Dense edge layout (mlip.graph): K slots per atom, a capacity that only grows; so
        # does the k-index capacity of a long-range term (a barostat changes the cell).
        capacity = max(self._neighbour_capacity, round_up_neighbours(sample.max_neighbours))
        n_k, mesh_shape = reciprocal_sizes([sample])
        k_capacity = max(self._k_capacity, n_k)
        mesh = self._mesh_shape
        if mesh_shape:  # a mesh, once chosen, stays; it only grows
            mesh = tuple(np.maximum(mesh or (0, 0, 0), mesh_shape).tolist())
        sizes = PaddedSizes.dense(self._n_padded, capacity, 2, 0 if mesh else k_capacity, mesh)
        graph = pack_samples([sample], sizes, None, self.dtype)
        return _NeighbourList(
            template=jax.device_put(graph.replace(targets={})),
            reference_positions=jnp.asarray(graph.positions, self.dtype),
            reference_cell=jnp.asarray(cell, self.dtype), capacity=capacity, k_capacity=k_capacity,
            mesh_shape=mesh,
            # A non-periodic system whose list already holds every ordered pair (a molecule
            # smaller than the cutoff) can never miss a pair: no displacement check, no rebuild.
            complete=not self.pbc.any() and sample.n_edges == self.n_atoms * (self.n_atoms - 1))

    def _install(self, built: _NeighbourList) -> None:
        self._template = built.template
        self._reference_positions = built.reference_positions
        self._reference_cell = built.reference_cell
        self._neighbour_capacity, self._k_capacity = built.capacity, built.k_capacity
        self._mesh_shape = built.mesh_shape
        self._complete_list = built.complete
        self.neighbour_list_builds += 1

    def _host_positions(self, state: MDState) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(jax.device_get(state.positions[:self.n_atoms]), np.float64)
        return positions, np.asarray(jax.device_get(state.cell), np.float64)

    def _start_next_list(self, state: MDState) -> None:
        if self._list_thread is None:
            self._list_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlip-neighbours")
        self._next_list = self._list_thread.submit(self._build_neighbours, *self._host_positions(state))

    def _install_next_list(self) -> None:
        start = time.perf_counter()
        built = self._next_list.result()  # waits only if the host thread is slower than a block
        self.neighbour_wait_s += time.perf_counter() - start
        self._next_list = None
        self._install(built)

    # ----------------------------------------------------------------------------- host loop

    def run(self, n_steps: int) -> MDReport:
        """Advance ``n_steps`` steps; raises `MDStabilityError` if the system blows up."""
        start = time.perf_counter()
        builds, waited = self.neighbour_list_builds, self.neighbour_wait_s
        target = self.steps_done + int(n_steps)
        stalled = False  # the last block ran no step on a list built at the current positions
        idle = False  # the last block ran no step
        while self.steps_done < target:
            remaining = min(target - self.steps_done, self.block_steps)
            limits = self._block_limits()
            # Overlap: with half the skin as the limit, a block stops once half is used.
            # Never right after a block that ran no step, so a stuck run reaches the check below.
            early = (self.overlap_neighbour_lists and self._next_list is None and not self._complete_list
                     and not idle)
            if early:
                limits[0] = 0.5 * limits[0]
            state, status, detail, executed, records = _run_block(
                self._program, self._potential, self.ensemble, jnp.asarray(limits, self.dtype),
                self.params, self._state, self._template, self._reference_positions, self._reference_cell,
                jnp.asarray(remaining, jnp.int32))
            status, executed = int(status), int(executed)
            self._state = state
            self._record(jax.device_get(records))
            self.steps_done += executed
            idle = executed == 0
            if status == _REBUILD and early:  # half the skin used: the next list on the host thread
                self._start_next_list(state)
                stalled = False
            elif self._next_list is not None and status in (_RUNNING, _REBUILD):
                self._install_next_list()  # one block after it was started, whatever the thread's speed
                stalled = False
            elif status == _REBUILD:
                if executed == 0 and stalled:
                    raise MDStabilityError(
                        f"step {self.steps_done + 1}: atoms moved more than skin/2 = {self.skin / 2} Å in "
                        f"one step; the time step ({self.timestep_fs} fs) is too large or the system is "
                        f"exploding")
                stalled = executed == 0
                rebuild_start = time.perf_counter()
                self._rebuild_neighbours(*self._host_positions(state))
                self.neighbour_wait_s += time.perf_counter() - rebuild_start
            elif status != _RUNNING:
                raise MDStabilityError(self._describe_failure(status, np.asarray(detail)))
            else:
                stalled = False
        return MDReport(steps=int(n_steps), seconds=time.perf_counter() - start,
                        neighbour_list_builds=self.neighbour_list_builds - builds,
                        neighbour_wait_s=self.neighbour_wait_s - waited)

    def _block_limits(self) -> np.ndarray:
        """[skin, min_distance_fraction, max_temperature_K] as the block checks them."""
        limits = self._limits.copy()
        if self._complete_list:
            limits[0] = 1e30  # the list-completeness margin then never runs out
        return limits

    def _record(self, records) -> None:
        ran = np.asarray(records[0], bool)
        if not ran.any():
            return
        steps = self.steps_done + 1 + np.arange(int(ran.sum()))
        values = self._absolute(records[1:], ran)
        self.thermo["step"].append(steps)
        for name, value in values.items():
            self.thermo[name].append(value)
        self._accumulate_drift(steps, values["conserved_energy"])
        # Keep memory bounded in long runs: drop the oldest blocks beyond the history limit.
        while len(self.thermo["step"]) > 1 and sum(map(len, self.thermo["step"])) > self.max_history_steps:
            for series in self.thermo.values():
                series.pop(0)

    def _accumulate_drift(self, steps: np.ndarray, conserved: np.ndarray) -> None:
        """Running least-squares sums of conserved energy against time, over every step."""
        if self._energy_origin is None:
            self._energy_origin = float(conserved[0])  # sums of small differences: no cancellation
        t = steps * self.timestep_fs / 1000.0
        e = conserved - self._energy_origin
        self._drift_sums += np.array([len(t), t.sum(), (t * t).sum(), e.sum(), (t * e).sum()])

    def _absolute(self, values, selection) -> dict:
        values = [np.asarray(v, np.float64)[selection] for v in values]
        values[0] = values[0] + self.reference_energy  # potential energy: absolute
        values[3] = values[3] + self.reference_energy  # conserved energy: absolute
        if not self.ensemble.changes_cell:
            values[4] = np.full(values[4].shape, np.nan)  # pressure is computed only under a barostat
        return dict(zip(THERMO_FIELDS, values))

    def current_thermo(self) -> dict[str, float]:
        """Observables of the current state (step, absolute energies eV, T K, P GPa, V Å³)."""
        values = jax.device_get(_observe(self.ensemble, self._state))
        current = {name: float(v) for name, v in self._absolute(values, ()).items()}
        return {"step": self.steps_done, **current}

    def _describe_failure(self, status: int, detail: np.ndarray) -> str:
        return describe_failure(status, detail, self.steps_done + 1, self._template, self.numbers,
                                self.min_distance_fraction, self.max_temperature_K)

    # ----------------------------------------------------------------------------- results

    @property
    def state(self) -> MDState:
        return self._state

    @property
    def atoms(self) -> Atoms:
        """The current structure with momenta, and energy, forces (and stress) attached."""
        state = jax.device_get(self._state)
        n = self.n_atoms
        cell = np.asarray(state.cell, np.float64)
        atoms = Atoms(numbers=self.numbers, positions=np.asarray(state.positions[:n], np.float64),
                      cell=cell if self.pbc.any() else None, pbc=self.pbc,
                      momenta=np.asarray(state.momenta[:n], np.float64))
        results: dict[str, Any] = {"energy": self.reference_energy + float(state.energy),
                                   "forces": np.asarray(state.forces[:n], np.float64)}
        if self.ensemble.changes_cell:
            stress = np.asarray(state.stress, np.float64)
            results["stress"] = stress.reshape(9)[[0, 4, 8, 5, 2, 1]]
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    def thermo_table(self) -> dict[str, np.ndarray]:
        """Per-step observables (the last ``max_history_steps``): step, energies (eV, absolute), T (K),
        P (GPa), V (Å³)."""
        return {name: (np.concatenate(values) if values else np.zeros(0))
                for name, values in self.thermo.items()}

    def energy_drift(self) -> float:
        """Slope of the conserved energy, eV per atom per ps (least squares over every step run)."""
        n, st, stt, se, ste = self._drift_sums
        denominator = n * stt - st * st
        if n < 2 or denominator <= 0:
            return float("nan")
        return float((n * ste - st * se) / denominator / self.n_atoms)

    @property
    def compilations(self) -> int:
        """Block programs compiled since this run started (one per new padded shape or setting)."""
        return _run_block._cache_size() - self._compilations_before


# ---------------------------------------------------------------------------------
# Compiled programs. Module-level and keyed on a hashable `_Program` and the potential's
# structure (its model section; `mlip.potential.Potential`), so runs of one architecture and
# settings (successive `mlip md` calls in one process, active-learning iterations, tests) share them.


@dataclasses.dataclass(frozen=True)
class _Program:
    """What shapes a compiled block beside its arguments' shapes: the scan length.

    The potential (its model section the structure, its statistics traced), the ensemble's
    numbers and the stability limits are arguments, so runs that differ only in the data a
    model was fitted to, time step, temperature, pressure, skin or limits share one compilation.
    """

    block_steps: int


def _force_function(potential, ensemble: Ensemble, params, template):
    compute_stress = ensemble.changes_cell

    # A posterior moves atoms by its mean forces; σ is not needed per step, and for K
    # readouts on one backbone the mean forces cost one backward pass instead of K.
    apply = getattr(potential, "apply_mean", potential.apply)

    def evaluate(positions, cell):
        graph = template.replace(positions=positions, cell=template.cell.at[0].set(cell))
        outputs = apply(params, graph, True, compute_stress)
        stress = outputs["stress"][0] if compute_stress else jnp.zeros((3, 3), positions.dtype)
        return outputs["energy"][0], outputs["forces"], stress

    return evaluate


@jax.jit
def _observe(ensemble: Ensemble, state: MDState) -> tuple:
    return observables(state, ensemble)


def checked_step(potential, ensemble: Ensemble, limits, params, template, reference_positions,
                 reference_cell, evaluate=None):
    """``advance(carry) -> carry``: one integrator step of one trajectory with the stability and
    neighbour-list checks; carry = (state, status, detail, executed). A step that fails a check
    is not taken (the state stays) and its status says why. Traced, not compiled: the block of
    one trajectory (`integrate_block`) and of replicas (`mlip.md.replicas`) both call it.
    ``evaluate(positions, cell) -> (energy, forces, stress)``: the model on ``template`` by default."""
    skin, min_distance_fraction, max_temperature_K = limits[0], limits[1], limits[2]
    if evaluate is None:
        evaluate = _force_function(potential, ensemble, params, template)
    dtype = reference_positions.dtype
    real_edge = template.edge_mask
    radii = jnp.asarray(covalent_radii, dtype)
    pair_radius = radii[template.species[template.senders]] + radii[template.species[template.receivers]]
    pair_radius = jnp.where(real_edge, pair_radius, 1.0)
    cutoff = potential.cutoff
    if ensemble.changes_cell:
        deformation = jnp.linalg.solve(reference_cell, jnp.eye(3, dtype=dtype))  # H0⁻¹
    else:
        deformation = None

    def list_margin(state):
        """> 0 while the neighbour list still holds every pair within the cutoff."""
        if deformation is None:
            affine = reference_positions
            strain = 0.0
        else:
            m = deformation @ state.cell
            affine = reference_positions @ m
            strain = jnp.linalg.norm(m - jnp.eye(3, dtype=dtype))
        displacement = jnp.linalg.norm((state.positions - affine) * state.atom_mask, axis=1).max()
        return skin - (cutoff + skin) * strain - 2 * displacement

    def closest_pair(state):
        vectors = (state.positions[template.senders] + template.shifts.astype(dtype) @ state.cell
                   - state.positions[template.receivers])
        ratio = jnp.where(real_edge, jnp.linalg.norm(vectors, axis=1) / pair_radius, jnp.inf)
        edge = jnp.argmin(ratio)
        return ratio[edge], edge

    def advance(carry):
        state, status, detail, executed = carry
        new = integrators.step(state, ensemble, evaluate)
        ratio, edge = closest_pair(new)
        temperature = integrators.temperature_K(new, ensemble.n_atoms)
        finite = jnp.isfinite(new.energy) & jnp.all(jnp.isfinite(new.forces))
        new_status = jnp.select(
            [list_margin(new) <= 0, ~finite, ratio < min_distance_fraction,
             temperature > max_temperature_K],
            [_REBUILD, _NOT_FINITE, _TOO_CLOSE, _TOO_HOT], _RUNNING)
        accept = new_status == _RUNNING
        state = jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, state)
        detail = jnp.where(new_status == _TOO_CLOSE, jnp.stack([edge.astype(dtype), ratio]),
                           jnp.where(new_status == _TOO_HOT, jnp.stack([0.0, temperature]).astype(dtype),
                                     detail))
        return state, new_status.astype(jnp.int32), detail, executed + accept.astype(jnp.int32)

    return advance


def integrate_block(program: _Program, potential, ensemble: Ensemble, limits, params, state: MDState, template,
                    reference_positions, reference_cell, steps_to_run):
    """Up to ``block_steps`` steps of one trajectory; returns (state, status, detail, executed,
    per-step records)."""
    advance = checked_step(potential, ensemble, limits, params, template, reference_positions, reference_cell)
    dtype = reference_positions.dtype

    def body(carry, _):
        _, status, _, executed = carry
        go = (status == _RUNNING) & (executed < steps_to_run)
        carry = jax.lax.cond(go, advance, lambda c: c, carry)
        ran = go & (carry[1] == _RUNNING)
        return carry, (ran,) + observables(carry[0], ensemble)

    carry = (state, jnp.asarray(_RUNNING, jnp.int32), jnp.zeros(2, dtype), jnp.asarray(0, jnp.int32))
    (state, status, detail, executed), records = jax.lax.scan(body, carry, None, length=program.block_steps)
    return state, status, detail, executed, records


_run_block = functools.partial(jax.jit, static_argnums=0)(integrate_block)


def describe_failure(status: int, detail: np.ndarray, step: int, template, numbers: np.ndarray,
                     min_distance_fraction: float, max_temperature_K: float) -> str:
    """The message of a block's failure status: what went wrong at ``step``, naming atoms and values."""
    if status == _NOT_FINITE:
        return f"step {step}: energy or forces are not finite; the model left its domain"
    if status == _TOO_HOT:
        return (f"step {step}: temperature {detail[1]:.0f} K exceeds the limit "
                f"{max_temperature_K:.0f} K; the system is exploding")
    edge = int(detail[0])
    i = int(np.asarray(template.receivers)[edge])
    j = int(np.asarray(template.senders)[edge])
    limit = min_distance_fraction * (covalent_radii[numbers[i]] + covalent_radii[numbers[j]])
    distance = float(detail[1]) * limit / min_distance_fraction
    return (f"step {step}: atoms {i} ({chemical_symbols[numbers[i]]}) and {j} "
            f"({chemical_symbols[numbers[j]]}) are {distance:.3f} Å apart, closer than "
            f"{limit:.3f} Å ({min_distance_fraction} x the sum of covalent radii)")


def neighbour_sample(potential, skin: float, positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray,
                     pbc: np.ndarray, charge: float, spin: float):
    """The host neighbour list of one structure at the model's cutoff + ``skin`` (a `GraphSample`)."""
    frame = Frame(positions=np.asarray(positions, np.float64), numbers=numbers, cell=np.asarray(cell, np.float64),
                  pbc=pbc, charge=charge, spin=spin)
    return build_sample(frame, potential.cutoff + skin, potential.k_cutoff, potential.molecules_only)


def padded_start(atoms: Atoms, n_padded: int, temperature_K, seed: int) -> tuple:
    """Positions, momenta, masses and atom mask of ``atoms`` padded to ``n_padded`` rows (NumPy).
    Momenta are the structure's own, else drawn at ``temperature_K`` (seeded), else zero."""
    n_atoms = len(atoms)
    momenta = atoms.get_momenta()
    if not np.any(momenta) and temperature_K:
        momenta = maxwell_boltzmann_momenta(atoms.get_masses(), temperature_K, seed)
    positions = np.zeros((n_padded, 3))
    positions[:n_atoms] = atoms.positions
    padded_momenta = np.zeros((n_padded, 3))
    padded_momenta[:n_atoms] = momenta
    masses = np.ones((n_padded, 1))
    masses[:n_atoms, 0] = atoms.get_masses()
    atom_mask = np.zeros((n_padded, 1))
    atom_mask[:n_atoms] = 1.0
    return positions, padded_momenta, masses, atom_mask


def observables(state: MDState, ensemble: Ensemble) -> tuple:
    """The per-step record, in the order of `THERMO_FIELDS` (energies above the references)."""
    if ensemble.changes_cell:
        pressure = integrators.pressure(state) / units.GPa
    else:  # zero, not NaN, without a barostat (keeps NaN checks usable); NaN on the host
        pressure = jnp.zeros((), state.positions.dtype)
    return (state.energy, integrators.kinetic_energy(state), integrators.temperature_K(state, ensemble.n_atoms),
            integrators.conserved_energy(state, ensemble), pressure, integrators.volume(state.cell))


def maxwell_boltzmann_momenta(masses: np.ndarray, temperature_K: float, seed: int) -> np.ndarray:
    """Momenta drawn at ``temperature_K`` with the centre-of-mass momentum removed."""
    masses = np.asarray(masses, np.float64)[:, None]
    momenta = np.random.default_rng(seed).normal(size=(len(masses), 3)) * np.sqrt(masses * units.kB * temperature_K)
    if len(masses) > 1:
        momenta -= masses * momenta.sum(axis=0) / masses.sum()
    return momenta


def _check_elements(numbers: np.ndarray, known) -> None:
    unknown = sorted(set(numbers.tolist()) - set(known))
    if unknown:
        atom = int(np.flatnonzero(numbers == unknown[0])[0])
        raise DataError(f"atom {atom} is {chemical_symbols[unknown[0]]}; this model knows only "
                        f"{[chemical_symbols[z] for z in sorted(known)]}")
