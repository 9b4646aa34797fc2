"""MD integrators as pure JAX functions of a state pytree: NVE, Langevin, Nosé–Hoover chain, MTK NPT.

Units are ASE's: positions Å, momenta amu·Å/(ASE time), masses amu, energy eV, time
in ASE units (1 fs = ``ase.units.fs``). Every step takes a force function
``evaluate(positions, cell) -> (energy, forces, stress)`` and calls it exactly once,
at the new positions; forces (and stress) of the current positions are carried in
the state, as in velocity Verlet.

The Nosé–Hoover chain thermostat and the Martyna–Tobias–Klein barostats follow
ASE's `ase.md.nose_hoover_chain` (`NoseHooverChainNVT`, `IsotropicMTKNPT`, `MTKNPT`)
operator for operator — same Liouville splitting, fourth-order Suzuki–Yoshida chain
integration, thermostat/barostat masses and conserved quantities — so a trajectory
here matches ASE's step for step (tested). Langevin uses BAOAB (Leimkuhler &
Matthews 2013), whose configurational sampling error is smallest among the common
splittings.

Arrays may carry padding atoms (mask 0): their masses are 1, their forces zero, and
they are excluded from every kinetic sum, so they stay at rest.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from ase import units

Array = jax.Array
ForceFunction = Callable[[Array, Array], tuple]  # (positions, cell) -> (energy, forces, stress)

# Fourth-order Suzuki–Yoshida weights (H. Yoshida, Phys. Lett. A 150, 262 (1990)), as ASE.
_YOSHIDA4 = (1 / (2 - 2 ** (1 / 3)), -(2 ** (1 / 3)) / (2 - 2 ** (1 / 3)), 1 / (2 - 2 ** (1 / 3)))

ENSEMBLES = ("nve", "langevin", "nose-hoover", "npt", "npt-aniso")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["timestep", "n_atoms", "temperature_K", "pressure", "friction", "tdamp", "pdamp"],
                   meta_fields=["name", "tchain", "pchain", "tloop", "ploop"])
@dataclasses.dataclass(frozen=True)
class Ensemble:
    """Settings of an integrator. A pytree: the numbers (time step, atom count, temperature,
    pressure, friction, time constants) are traced, so changing them does not recompile (the
    atom count only counts degrees of freedom: the arrays are padded, see ``MDState.atom_mask``);
    the name and chain lengths shape the program and are static.

    Attributes:
        name: one of `ENSEMBLES`: ``npt`` scales the cell isotropically (MTK),
            ``npt-aniso`` lets all nine cell components fluctuate (full MTK).
        timestep: ASE time units.
        n_atoms: number of real atoms (the degrees of freedom of thermostat and barostat).
        temperature_K: target temperature (thermostatted ensembles).
        pressure: external pressure, eV/Å³ (NPT).
        friction: Langevin friction, 1 / ASE time.
        tdamp, pdamp: thermostat and barostat time constants, ASE time.
        tchain, pchain: lengths of the thermostat and barostat Nosé–Hoover chains.
        tloop, ploop: sub-steps of the chain integrations.
    """

    name: str
    timestep: float
    n_atoms: int
    temperature_K: float = 0.0
    pressure: float = 0.0
    friction: float = 0.01 / units.fs
    tdamp: float = 0.0
    pdamp: float = 0.0
    tchain: int = 3
    pchain: int = 3
    tloop: int = 1
    ploop: int = 1

    @property
    def kT(self) -> float:
        return units.kB * self.temperature_K

    @property
    def changes_cell(self) -> bool:
        return self.name in ("npt", "npt-aniso")

    @property
    def thermostat_masses(self) -> tuple:
        q = self.kT * self.tdamp ** 2
        return (3 * self.n_atoms * q,) + (q,) * (self.tchain - 1)

    @property
    def cell_dof(self) -> int:
        return 1 if self.name == "npt" else 9

    @property
    def barostat_mass(self) -> float:
        """W: the mass of the cell momentum (ASE's MTK choices)."""
        per_dof = 3 * self.n_atoms + 3 if self.name == "npt" else self.n_atoms + 1
        return per_dof * self.kT * self.pdamp ** 2

    @property
    def barostat_chain_masses(self) -> tuple:
        r = self.kT * self.pdamp ** 2
        return (9 * r,) + (r,) * (self.pchain - 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MDState:
    """Everything an integrator step reads and writes (a pytree; one trajectory).

    ``forces``, ``energy`` and ``stress`` belong to the current positions and cell.
    ``cell_reference`` and ``log_strain`` describe the isotropic NPT cell,
    ``cell = cell_reference * exp(log_strain)``; ``cell_momentum`` is the scalar
    p_ε (isotropic) in element [0, 0] or the full 3×3 p_g (anisotropic).
    ``thermostat_work`` accumulates the kinetic energy the Langevin thermostat put in,
    so ``E − thermostat_work`` is conserved up to integration error.
    """

    positions: Array  # [N, 3]
    momenta: Array  # [N, 3]
    masses: Array  # [N, 1]
    atom_mask: Array  # [N, 1] 1 for real atoms
    cell: Array  # [3, 3]
    forces: Array  # [N, 3]
    energy: Array  # [] eV above the reference energies
    stress: Array  # [3, 3] potential part only, eV/Å³
    eta: Array  # [tchain] thermostat positions
    p_eta: Array  # [tchain] thermostat momenta
    xi: Array  # [pchain] barostat-chain positions
    p_xi: Array  # [pchain] barostat-chain momenta
    cell_reference: Array  # [3, 3]
    log_strain: Array  # []
    cell_momentum: Array  # [3, 3]
    thermostat_work: Array  # []
    key: Array  # PRNG key (Langevin)

    def replace(self, **changes) -> "MDState":
        return dataclasses.replace(self, **changes)


def resting_state(ensemble: Ensemble, positions, momenta, masses, atom_mask, cell, key) -> MDState:
    """State at rest in the thermostat and barostat, with zero forces, energy and stress.

    The forces of the initial positions come from one step with a zero time step, which
    moves nothing and evaluates them (`mlip.md.simulation`), so the MD program that takes
    the steps also makes the initial state and no second program is compiled for it.
    """
    dtype = positions.dtype
    zeros = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
    return MDState(positions=positions, momenta=momenta * atom_mask, masses=masses, atom_mask=atom_mask,
                   cell=cell, forces=jnp.zeros_like(positions), energy=zeros(), stress=zeros(3, 3),
                   eta=zeros(max(ensemble.tchain, 1)), p_eta=zeros(max(ensemble.tchain, 1)),
                   xi=zeros(max(ensemble.pchain, 1)), p_xi=zeros(max(ensemble.pchain, 1)),
                   cell_reference=cell, log_strain=zeros(), cell_momentum=zeros(3, 3),
                   thermostat_work=zeros(), key=key)


# ---------------------------------------------------------------------------------
# Observables


def kinetic_energy(state: MDState) -> Array:
    return 0.5 * jnp.sum(state.atom_mask * state.momenta ** 2 / state.masses)


def temperature_K(state: MDState, n_atoms: int) -> Array:
    """Instantaneous temperature from 3N degrees of freedom (ASE's convention without constraints)."""
    return 2 * kinetic_energy(state) / (3 * n_atoms * units.kB)


def volume(cell: Array) -> Array:
    return jnp.abs(jnp.linalg.det(cell))


def kinetic_stress(state: MDState) -> Array:
    """Ideal-gas part of the stress, −Σ p pᵀ/m / V (ASE's ``include_ideal_gas``)."""
    p = state.momenta * state.atom_mask
    return -jnp.einsum("na,nb->ab", p, p / state.masses) / volume(state.cell)


def pressure(state: MDState) -> Array:
    """Instantaneous pressure including the kinetic term, eV/Å³."""
    return -jnp.trace(state.stress + kinetic_stress(state)) / 3


def conserved_energy(state: MDState, ensemble: Ensemble) -> Array:
    """The quantity the integrator conserves (eV above the references), for drift checks."""
    total = state.energy + kinetic_energy(state)
    if ensemble.name == "langevin":
        return total - state.thermostat_work
    if ensemble.name == "nve":
        return total
    kT = ensemble.kT
    q = jnp.asarray(ensemble.thermostat_masses, total.dtype)
    total = total + 3 * ensemble.n_atoms * kT * state.eta[0] + kT * jnp.sum(state.eta[1:]) \
        + jnp.sum(0.5 * state.p_eta ** 2 / q)
    if ensemble.changes_cell:
        r = jnp.asarray(ensemble.barostat_chain_masses, total.dtype)
        total = total + jnp.sum(0.5 * state.p_xi ** 2 / r) + ensemble.cell_dof * kT * state.xi[0] \
            + kT * jnp.sum(state.xi[1:]) \
            + jnp.sum(state.cell_momentum ** 2) / (2 * ensemble.barostat_mass) \
            + ensemble.pressure * volume(state.cell)
    return total


# ---------------------------------------------------------------------------------
# Building blocks


def _exprel(x: Array) -> Array:
    """(eˣ − 1)/x, 1 at x = 0 (scipy.special.exprel), safe under jit."""
    safe = jnp.where(x == 0, 1.0, x)
    return jnp.where(x == 0, 1.0, jnp.expm1(safe) / safe)


def _chain(momentum, chain_q, chain_p, chain_masses, kT, dof, twice_kinetic, delta, loops):
    """exp(iL_NHC δ): a Nosé–Hoover chain acting on ``momentum`` (particles or cell).

    The same operator sequence as ASE's ``NoseHooverChainThermostat.integrate_nhc``:
    Suzuki–Yoshida weights × ``loops``, each a backward sweep of the chain momenta, a
    drift of the chain positions, a scaling of ``momentum`` and a forward sweep.
    """
    masses = jnp.asarray(chain_masses, chain_p.dtype)
    length = len(chain_masses)

    def update(chain_p, j, momentum, half, quarter):
        if j < length - 1:
            chain_p = chain_p.at[j].multiply(jnp.exp(-quarter * chain_p[j + 1] / masses[j + 1]))
        if j == 0:
            force = twice_kinetic(momentum) - dof * kT
        else:
            force = chain_p[j - 1] ** 2 / masses[j - 1] - kT
        chain_p = chain_p.at[j].add(half * force)
        if j < length - 1:
            chain_p = chain_p.at[j].multiply(jnp.exp(-quarter * chain_p[j + 1] / masses[j + 1]))
        return chain_p

    for _ in range(loops):
        for weight in _YOSHIDA4:
            d = weight * delta / loops
            for j in reversed(range(length)):
                chain_p = update(chain_p, j, momentum, d / 2, d / 4)
            chain_q = chain_q + d * chain_p / masses
            momentum = momentum * jnp.exp(-d * chain_p[0] / masses[0])
            for j in range(length):
                chain_p = update(chain_p, j, momentum, d / 2, d / 4)
    return momentum, chain_q, chain_p


def _thermostat(state: MDState, ensemble: Ensemble, delta: float) -> MDState:
    def twice_kinetic(p):
        return jnp.sum(state.atom_mask * p ** 2 / state.masses)

    momenta, eta, p_eta = _chain(state.momenta, state.eta, state.p_eta, ensemble.thermostat_masses,
                                 ensemble.kT, 3 * ensemble.n_atoms, twice_kinetic, delta, ensemble.tloop)
    return state.replace(momenta=momenta, eta=eta, p_eta=p_eta)


def _barostat_chain(state: MDState, ensemble: Ensemble, delta: float) -> MDState:
    w = ensemble.barostat_mass

    def twice_kinetic(p_cell):
        return jnp.sum(p_cell ** 2) / w

    if ensemble.name == "npt":  # only the scalar p_ε lives in element [0, 0]
        p_eps, xi, p_xi = _chain(state.cell_momentum[0, 0], state.xi, state.p_xi,
                                 ensemble.barostat_chain_masses, ensemble.kT, 1, twice_kinetic,
                                 delta, ensemble.ploop)
        return state.replace(cell_momentum=state.cell_momentum.at[0, 0].set(p_eps), xi=xi, p_xi=p_xi)
    p_cell, xi, p_xi = _chain(state.cell_momentum, state.xi, state.p_xi, ensemble.barostat_chain_masses,
                              ensemble.kT, 9, twice_kinetic, delta, ensemble.ploop)
    return state.replace(cell_momentum=p_cell, xi=xi, p_xi=p_xi)


def _kick(state: MDState, delta: float) -> MDState:
    return state.replace(momenta=state.momenta + delta * state.forces * state.atom_mask)


def _drift(state: MDState, delta: float) -> MDState:
    return state.replace(positions=state.positions + delta * state.momenta / state.masses)


def _evaluate(state: MDState, evaluate: ForceFunction) -> MDState:
    energy, forces, stress = evaluate(state.positions, state.cell)
    return state.replace(energy=energy, forces=forces * state.atom_mask, stress=stress)


# ---------------------------------------------------------------------------------
# Steps


def _step_nve(state, ensemble, evaluate):
    dt = ensemble.timestep
    state = _drift(_kick(state, dt / 2), dt)
    return _kick(_evaluate(state, evaluate), dt / 2)


def _step_langevin(state, ensemble, evaluate):
    """BAOAB: half kick, half drift, exact Ornstein–Uhlenbeck, half drift, forces, half kick."""
    dt = ensemble.timestep
    state = _drift(_kick(state, dt / 2), dt / 2)
    key, noise_key = jax.random.split(state.key)
    c1 = jnp.exp(-ensemble.friction * dt)
    c2 = jnp.sqrt(1 - c1 ** 2)
    noise = jax.random.normal(noise_key, state.momenta.shape, state.momenta.dtype)
    momenta = (c1 * state.momenta + c2 * jnp.sqrt(state.masses * ensemble.kT) * noise) * state.atom_mask
    work = 0.5 * jnp.sum(state.atom_mask * (momenta ** 2 - state.momenta ** 2) / state.masses)
    state = state.replace(momenta=momenta, key=key, thermostat_work=state.thermostat_work + work)
    state = _drift(state, dt / 2)
    return _kick(_evaluate(state, evaluate), dt / 2)


def _step_nose_hoover(state, ensemble, evaluate):
    dt = ensemble.timestep
    state = _kick(_thermostat(state, ensemble, dt / 2), dt / 2)
    state = _evaluate(_drift(state, dt), evaluate)
    return _thermostat(_kick(state, dt / 2), ensemble, dt / 2)


def _cell_force(state: MDState, ensemble: Ensemble) -> Array:
    """G: the force on the cell momentum, V (σ_int − P_ext) + (Σ p²/m)/(3N) (ASE's MTK)."""
    p = state.momenta * state.atom_mask
    kinetic_term = jnp.sum(p ** 2 / state.masses) / (3 * ensemble.n_atoms)
    internal = -(state.stress + kinetic_stress(state))  # internal pressure tensor
    eye = jnp.eye(3, dtype=state.positions.dtype)
    if ensemble.name == "npt":
        pressure_internal = jnp.trace(internal) / 3
        g = 3 * volume(state.cell) * (pressure_internal - ensemble.pressure) + 3 * kinetic_term
        return jnp.zeros_like(eye).at[0, 0].set(g)
    return volume(state.cell) * (internal - ensemble.pressure * eye) + kinetic_term * eye


def _step_npt_isotropic(state, ensemble, evaluate):
    """ASE's IsotropicMTKNPT.step: barostat chain, thermostat, p_ε, p, q, ε, forces, and back."""
    dt, w, n = ensemble.timestep, ensemble.barostat_mass, ensemble.n_atoms

    def kick_cell(state, delta):
        return state.replace(cell_momentum=state.cell_momentum + delta * _cell_force(state, ensemble))

    def kick(state, delta):
        x = (1 + 1 / n) * state.cell_momentum[0, 0] * delta / w
        momenta = state.momenta * jnp.exp(-x) + delta * state.forces * _exprel(-x)
        return state.replace(momenta=momenta * state.atom_mask)

    def drift(state, delta):
        x = delta * state.cell_momentum[0, 0] / w
        positions = state.positions * jnp.exp(x) + state.momenta * delta / state.masses * _exprel(x)
        log_strain = state.log_strain + delta * state.cell_momentum[0, 0] / w
        return state.replace(positions=positions, log_strain=log_strain,
                             cell=state.cell_reference * jnp.exp(log_strain))

    state = _thermostat(_barostat_chain(state, ensemble, dt / 2), ensemble, dt / 2)
    state = kick(kick_cell(state, dt / 2), dt / 2)
    state = _evaluate(drift(state, dt), evaluate)
    state = kick_cell(kick(state, dt / 2), dt / 2)
    return _barostat_chain(_thermostat(state, ensemble, dt / 2), ensemble, dt / 2)


def _step_npt_anisotropic(state, ensemble, evaluate):
    """ASE's MTKNPT.step: the full 3×3 cell momentum p_g, propagated in its eigenbasis."""
    dt, w, n = ensemble.timestep, ensemble.barostat_mass, ensemble.n_atoms

    def kick_cell(state, delta):
        return state.replace(cell_momentum=state.cell_momentum + delta * _cell_force(state, ensemble))

    def kick(state, delta):
        eigenvalues, u = jnp.linalg.eigh(state.cell_momentum)
        kappa = (eigenvalues + jnp.trace(state.cell_momentum) / (3 * n)) * delta / w
        y = state.momenta @ u
        solution = y * jnp.exp(-kappa) + delta * (state.forces @ u) * _exprel(-kappa)
        return state.replace(momenta=(solution @ u.T) * state.atom_mask)

    def drift(state, delta):
        eigenvalues, u = jnp.linalg.eigh(state.cell_momentum)
        x = eigenvalues * delta / w
        solution = (state.positions @ u) * jnp.exp(x) + delta * (state.momenta @ u) / state.masses * _exprel(x)
        cell = ((state.cell @ u) * jnp.exp(x)) @ u.T
        return state.replace(positions=solution @ u.T, cell=cell)

    state = _thermostat(_barostat_chain(state, ensemble, dt / 2), ensemble, dt / 2)
    state = kick(kick_cell(state, dt / 2), dt / 2)
    state = _evaluate(drift(state, dt), evaluate)
    state = kick_cell(kick(state, dt / 2), dt / 2)
    return _barostat_chain(_thermostat(state, ensemble, dt / 2), ensemble, dt / 2)


_STEPS = {"nve": _step_nve, "langevin": _step_langevin, "nose-hoover": _step_nose_hoover,
          "npt": _step_npt_isotropic, "npt-aniso": _step_npt_anisotropic}


def step(state: MDState, ensemble: Ensemble, evaluate: ForceFunction) -> MDState:
    """One time step of ``ensemble``; calls ``evaluate`` once, at the new positions."""
    return _STEPS[ensemble.name](state, ensemble, evaluate)
