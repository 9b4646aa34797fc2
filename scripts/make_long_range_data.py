"""Make the small long-range (electrostatics) data sets shipped in data/ (no internet needed).

  * data/ion_pairs_gfn2.extxyz      600 non-periodic H/O/Na/Cl frames of two fragments
                                    (ions, water) 2.3-12 Å apart, total charge -1, 0 or +1,
                                    GFN2-xTB (tblite) energy and forces
  * data/nacl_defects_gfn2.extxyz   ~100 periodic 8-site rock-salt NaCl cells, pristine or
                                    with vacancies, total charge -1, 0 or +1, GFN2-xTB
                                    energy, forces and stress
  * data/long_range_gfn2_e0s.json   isolated-atom GFN2-xTB energies of H, O, Na, Cl

Labels follow data/README.md: ``REF_energy`` (eV, absolute GFN2-xTB energy) and, for the
periodic set, ``REF_stress`` (3x3, eV/Å³, ASE sign) in ``atoms.info``; ``REF_forces``
(eV/Å) in ``atoms.arrays``. Every frame carries ``total_charge`` (e, int) and
``total_spin`` (multiplicity 2S+1, int) in ``atoms.info``; the multiplicity is the
lowest one the electron count allows (1 for an even count, 2 for an odd one).

Why it is hard for a short-range model: in the molecular set the two fragments sit
2.3-12 Å apart (centre-of-mass distance, roughly uniform), so most pairs are beyond a
5 Å cutoff while their interaction (ion-ion, ion-dipole) still changes the energy, and
some geometries appear twice, at two total charges (``pair_id`` links the two frames).

GFN2-xTB's SCF is fragile here: the neutral Na...Cl pair beyond ~6 Å (xTB puts about
±0.5 e on the ions) often oscillates under tblite's default mixer, small periodic cells
fail to converge or converge to unphysical charge-inverted states, and a strongly damped
mixer can stop far from a solution. Each calculation therefore tries a list of SCF
settings (``SCF_ATTEMPTS``), checks every converged result with a restart from its own
wavefunction under the default mixer and with a charge sanity test, and skips (and
counts) the calculation if no attempt passes; see ``gfn2``. Only the route to the
solution differs between attempts, not the method.

Deterministic: fixed seeds, a fresh calculator for every calculation and attempt
(tblite's ASE calculator would otherwise start from the previous frame's wavefunction),
and tblite pinned to one OpenMP thread (set before anything loads it).

    python scripts/make_long_range_data.py [--out-dir data] [--sets ions,nacl,e0s]
        [--n-ions 600] [--n-nacl 120] [--seed 11]
"""

from __future__ import annotations

import os
import sys

# Before numpy/tblite load their OpenMP/BLAS runtimes: one thread keeps the labels
# bitwise reproducible (and for a handful of atoms it is also the fastest).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import collections
import json
import time

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_datasets import write_frames_atomically  # noqa: E402  (the shipped sets' one atomic writer)

# SCF attempts for one frame, in order: tblite's defaults (SAD guess, Broyden mixer,
# damping 0.4, memory = max iterations), the EEQ charge guess, then damped short-memory
# Broyden mixers, which converge the charge-transfer cases the default oscillates on.
SCF_ATTEMPTS = (
    {},
    {"guess": 1},
    {"mixer_damping": 0.05, "mixer_memory": 3, "max_iterations": 500},
    {"mixer_damping": 0.1, "mixer_memory": 3, "max_iterations": 500},
    {"mixer_damping": 0.2, "mixer_memory": 3, "max_iterations": 500},
    {"mixer_damping": 0.4, "mixer_memory": 5, "max_iterations": 500},
    {"guess": 1, "mixer_damping": 0.4, "mixer_memory": 10, "max_iterations": 500},
    {"mixer_damping": 0.3, "mixer_memory": 20, "max_iterations": 500},
    {"mixer_damping": 0.02, "mixer_memory": 2, "max_iterations": 1000},
)

MIN_INTER_FRAGMENT_DISTANCE = 1.8  # Å
# Å, Gaussian sigma per Cartesian component of a water's atoms: an RMS displacement of
# 0.05 Å per atom, O-H bonds 0.82-1.10 Å over the 600-frame set (sigma 0.05 per
# component gave O-H 0.73-1.19 Å and intramolecular forces up to 30 eV/Å, which would
# swamp the long-range signal this set is for)
WATER_RATTLE = 0.03
NACL_LATTICE = 5.68  # Å: near GFN2-xTB's minimum (8-site cell; experiment: 5.64 Å)


# ----------------------------------------------------------------------------- helpers

def multiplicity(numbers, charge: int) -> int:
    """Lowest multiplicity for the electron count (core shells are even, so Z's parity does)."""
    return 1 if (int(np.sum(numbers)) - charge) % 2 == 0 else 2


class Stats:
    def __init__(self):
        self.attempt = collections.Counter()  # SCF attempt whose solution was stored (0 = defaults)
        self.skipped = collections.Counter()  # label -> calculations with no valid solution
        self.rejected = collections.Counter()  # label -> converged attempts rejected as unphysical
        self.multiple = collections.defaultdict(list)  # label -> spreads (eV) of calculations
                                                       # with several valid solutions


def scf(atoms: Atoms, charge: int, spin: int, settings: dict):
    """One tblite GFN2-xTB single point with the given SCF settings, verified by a
    restart: the converged wavefunction goes back to tblite's default mixer, which must
    converge again to the same energy (1e-6 Hartree). Returns the restart's Result;
    raises if either SCF fails or they disagree."""
    from ase.units import Bohr
    from tblite.interface import Calculator

    periodic = bool(atoms.pbc.any())
    calc = Calculator("GFN2-xTB", atoms.numbers, atoms.positions / Bohr, charge, spin - 1,
                      atoms.cell.array / Bohr if periodic else None,
                      atoms.pbc.copy() if periodic else None)
    calc.set("verbosity", 0)
    calc.set("guess", settings.get("guess", 0))
    calc.set("mixer-damping", settings.get("mixer_damping", 0.4))
    calc.set("max-iter", settings.get("max_iterations", 250))
    calc.set("mixer-memory", settings.get("mixer_memory", settings.get("max_iterations", 250)))
    first = calc.singlepoint()
    calc.set("mixer-damping", 0.4)
    calc.set("max-iter", 250)
    calc.set("mixer-memory", 250)
    res = calc.singlepoint(first, copy=True)
    if abs(res.get("energy") - first.get("energy")) > 1e-6:
        raise RuntimeError("restart moved the energy")
    return res


def physical(atoms: Atoms, charges: np.ndarray) -> bool:
    """Rejects the charge-inverted SCF solutions GFN2-xTB has in periodic NaCl (Na
    negative, Cl positive, energies thousands of eV too low, forces of hundreds of eV/Å):
    every |Mulliken charge| <= 1.5 e and, in periodic cells, Na > 0 > Cl."""
    if np.abs(charges).max() > 1.5:
        return False
    if atoms.pbc.any():
        return bool(np.all(charges[atoms.numbers == 11] > 0) and np.all(charges[atoms.numbers == 17] < 0))
    return True


def gfn2(atoms: Atoms, charge: int, stats: Stats, label: str, stress: bool = False):
    """GFN2-xTB results for ``atoms`` at ``charge`` (lowest multiplicity), or None.

    Uses tblite's Python interface directly (what its ASE calculator wraps; same units
    and conversions, stress = virial / volume as ``TBLite`` does). A strongly damped mixer
    moves the density so little per cycle that it can pass the convergence test away
    from a solution, hence the restart check in ``scf``; and periodic NaCl has
    charge-inverted solutions, hence ``physical``. Molecules: the first attempt that
    passes both is stored (in testing, all attempts that converged agreed to 1e-4 eV).
    Periodic cells: attempts run until two valid solutions agree to 1e-4 eV; if two
    disagree, every attempt is run and the lowest-energy valid solution is stored (in
    testing, an 8-site cell converged to two valid solutions 0.17 eV apart, the default
    mixer finding the higher one); ``stats.multiple`` counts such cases.
    """
    from ase.units import Bohr, Hartree

    spin = multiplicity(atoms.numbers, charge)
    periodic = bool(atoms.pbc.any())
    solutions = []
    for attempt, settings in enumerate(SCF_ATTEMPTS):
        try:
            res = scf(atoms, charge, spin, settings)
        except Exception:  # tblite raises TBLiteRuntimeError when the SCF does not converge
            continue
        charges = np.array(res.get("charges"))
        if not physical(atoms, charges):
            stats.rejected[label] += 1
            continue
        solutions.append((float(res.get("energy") * Hartree), attempt, res, charges))
        if not periodic:
            break
        energies = [solution[0] for solution in solutions]
        if len(solutions) == 2 and max(energies) - min(energies) <= 1e-4:
            break  # two attempts agree: done; if they disagree, run all and keep the lowest
    if not solutions:
        stats.skipped[label] += 1
        return None
    energies = [solution[0] for solution in solutions]
    if max(energies) - min(energies) > 1e-4:
        stats.multiple[label].append(round(max(energies) - min(energies), 4))
    lowest = min(energies)
    energy, attempt, res, charges = next(s for s in solutions if s[0] <= lowest + 1e-4)
    stats.attempt[attempt] += 1
    result = {"energy": energy, "forces": -res.get("gradient") * Hartree / Bohr,
              "charges": charges, "spin": spin}
    if stress:
        result["stress"] = res.get("virial") * Hartree / atoms.get_volume()
    return result


def labelled_frame(atoms: Atoms, result: dict, charge: int, system: str, extra: dict,
                   stress: bool = False) -> Atoms:
    frame = atoms.copy()
    frame.calc = None
    frame.info["REF_energy"] = result["energy"]
    frame.arrays["REF_forces"] = result["forces"]
    if stress:
        frame.info["REF_stress"] = result["stress"]
    frame.arrays["mulliken_charges"] = result["charges"]
    frame.info["total_charge"] = int(charge)
    frame.info["total_spin"] = int(result["spin"])
    frame.info["system"] = system
    frame.info["config_type"] = system
    frame.info.update(extra)
    return frame


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed rotation matrix (from a random unit quaternion)."""
    w, x, y, z = rng.normal(size=4)
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rotation_taking(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation matrix taking unit vector a onto unit vector b."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    if np.linalg.norm(v) < 1e-12:
        if c > 0:
            return np.eye(3)
        perpendicular = np.cross(a, [1.0, 0.0, 0.0])
        if np.linalg.norm(perpendicular) < 1e-6:
            perpendicular = np.cross(a, [0.0, 1.0, 0.0])
        perpendicular /= np.linalg.norm(perpendicular)
        return 2 * np.outer(perpendicular, perpendicular) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    vx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * vx + (1 - np.cos(angle)) * vx @ vx


def random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


# ------------------------------------------------------------------- molecular fragments

def water(rng: np.random.Generator) -> Atoms:
    """A water monomer (ASE geometry), rattled, centred on its centre of mass, unrotated."""
    w = molecule("H2O")
    w.positions += rng.normal(scale=WATER_RATTLE, size=w.positions.shape)
    w.positions -= w.get_center_of_mass()
    return w


def hydrated_ion(symbol: str, rng: np.random.Generator) -> Atoms:
    """An ion with one first-shell water: Na-O 2.15-2.5 Å with the hydrogens pointing away
    from Na+; Cl...H-O 2.05-2.4 Å with one O-H pointing at Cl-. Centred on its COM."""
    w = molecule("H2O")  # O at index 0, H at 1 and 2
    w.positions += rng.normal(scale=WATER_RATTLE, size=w.positions.shape)
    u = random_unit(rng)
    if symbol == "Na":
        bisector = 0.5 * (w.positions[1] + w.positions[2]) - w.positions[0]
        rotation = rotation_about(u, rng.uniform(0, 2 * np.pi)) @ rotation_taking(bisector, u)
        positions = (w.positions - w.positions[0]) @ rotation.T + u * rng.uniform(2.15, 2.5)
    else:
        oh = w.positions[1] - w.positions[0]  # O->H1 must point at the ion, i.e. along -u
        rotation = rotation_about(u, rng.uniform(0, 2 * np.pi)) @ rotation_taking(oh, -u)
        positions = (w.positions - w.positions[1]) @ rotation.T + u * rng.uniform(2.05, 2.4)
    cluster = Atoms(symbol + "OH2", positions=np.vstack([[0.0, 0.0, 0.0], positions]))
    cluster.positions -= cluster.get_center_of_mass()
    return cluster


def single_ion(symbol: str) -> Atoms:
    return Atoms(symbol, positions=[[0.0, 0.0, 0.0]])


def place_pair(a: Atoms, b: Atoms, low: float, high: float, rng: np.random.Generator) -> Atoms:
    """Fragments a and b (each centred on its COM) randomly rotated, b's COM at a distance
    drawn uniformly from [low, high] from a's, no inter-fragment distance below 1.8 Å
    (new orientations, then a new distance, until one passes)."""
    while True:
        separation = rng.uniform(low, high)
        for _ in range(50):
            pa = a.positions @ random_rotation(rng).T
            pb = b.positions @ random_rotation(rng).T + separation * random_unit(rng)
            distances = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
            if distances.min() >= MIN_INTER_FRAGMENT_DISTANCE:
                pair = Atoms(list(a.symbols) + list(b.symbols), positions=np.vstack([pa, pb]))
                pair.arrays["fragment"] = np.array([0] * len(a) + [1] * len(b), dtype=int)
                return pair


def pair_geometry_info(pair: Atoms) -> dict:
    fragment = pair.arrays["fragment"]
    a, b = pair[fragment == 0], pair[fragment == 1]
    distances = np.linalg.norm(a.positions[:, None, :] - b.positions[None, :, :], axis=-1)
    return {"separation": float(np.linalg.norm(b.get_center_of_mass() - a.get_center_of_mass())),
            "min_distance": float(distances.min())}


def build(system: str, rng: np.random.Generator) -> Atoms:
    """Geometry for one system label (fragment 0 first)."""
    if system in ("Na+_H2O", "Na_H2O"):
        return place_pair(single_ion("Na"), water(rng), 3.0, 12.0, rng)
    if system in ("Na+_(H2O)2", "Na_(H2O)2"):
        return place_pair(hydrated_ion("Na", rng), water(rng), 3.0, 12.0, rng)
    if system in ("Cl-_H2O", "Cl_H2O"):
        return place_pair(single_ion("Cl"), water(rng), 3.0, 12.0, rng)
    if system in ("Cl-_(H2O)2", "Cl_(H2O)2"):
        return place_pair(hydrated_ion("Cl", rng), water(rng), 3.0, 12.0, rng)
    if system == "NaCl":
        return place_pair(single_ion("Na"), single_ion("Cl"), 2.3, 12.0, rng)
    if system == "NaCl_H2O":  # the water in the first shell of one of the two ions
        if rng.random() < 0.5:
            return place_pair(hydrated_ion("Na", rng), single_ion("Cl"), 3.0, 12.0, rng)
        return place_pair(single_ion("Na"), hydrated_ion("Cl", rng), 3.0, 12.0, rng)
    if system == "H2O_H2O":
        return place_pair(water(rng), water(rng), 3.0, 12.0, rng)
    raise ValueError(system)


def charged_label(neutral: str, charge: int) -> str:
    """'Na_H2O' at +1 -> 'Na+_H2O'; 'H2O_H2O' at +1 -> 'H2O_H2O+'."""
    sign = "+" if charge > 0 else "-"
    if neutral.startswith("Na_") or neutral.startswith("Cl_"):
        return neutral[:2] + sign + neutral[2:]
    return neutral + sign


def ion_pair_frames(n_frames: int, seed: int, stats: Stats) -> list:
    """The molecular set. Shares of ``n_frames`` (600 by default):
    singly charged ion + water(s) 30 %, neutral Na...Cl (+ water) 21.7 %, neutral water
    dimers 8.3 %, and 40 % in same-geometry pairs (Na/water 0 and +1, Cl/water 0 and -1,
    water dimer 0 and +1)."""
    rng = np.random.default_rng(seed)
    share = {  # frames per 600
        "Na+_H2O": 50, "Na+_(H2O)2": 40, "Cl-_H2O": 50, "Cl-_(H2O)2": 40,
        "NaCl": 70, "NaCl_H2O": 60, "H2O_H2O": 50,
    }
    pair_share = {"Na": 80, "Cl": 80, "H2O": 80}  # frames per 600, two per geometry
    scale = n_frames / 600.0
    plan = []  # (system, charges): one geometry each
    for system, count in share.items():
        charge = 1 if "+" in system else -1 if "-" in system else 0
        plan += [(system, (charge,))] * int(round(count * scale))
    for kind, count in pair_share.items():
        for index in range(int(round(count * scale / 2))):
            if kind == "H2O":  # cation only: GFN2-xTB's (H2O)2 anion is unbound by 2.5-6 eV,
                # with the extra electron in O-H antibonding orbitals (forces up to 21 eV/Å)
                plan.append(("H2O_H2O", (0, 1)))
            else:
                system = f"{kind}_H2O" if index % 2 == 0 else f"{kind}_(H2O)2"
                plan.append((system, (0, 1 if kind == "Na" else -1)))
    order = rng.permutation(len(plan))  # interleave the systems in the file
    frames, next_pair = [], 0
    for index in order:
        system, charges = plan[int(index)]
        base = system.replace("+", "").replace("-", "") if len(charges) == 2 else system
        atoms = build(base, rng)
        extra = pair_geometry_info(atoms)
        if len(charges) == 2:
            results = [gfn2(atoms, q, stats, label=base) for q in charges]
            if any(r is None for r in results):
                continue  # a pair is only useful complete; the failure is counted
            extra["pair_id"] = next_pair
            next_pair += 1
            for q, result in zip(charges, results):
                label = base if q == 0 else charged_label(base, q)
                frames.append(labelled_frame(atoms, result, q, label, dict(extra)))
        else:
            result = gfn2(atoms, charges[0], stats, label=system)
            if result is None:
                continue
            extra["pair_id"] = -1
            frames.append(labelled_frame(atoms, result, charges[0], system, extra))
    return frames


# ------------------------------------------------------------------------ periodic NaCl

def nacl_frames(n_frames: int, seed: int, stats: Stats) -> list:
    """8-site conventional rock-salt cells, lattice constant 5.68 Å scaled by 0.97-1.03
    plus a random symmetric strain of up to ±1 % (incl. shear), rattled with sigma
    0.05-0.1 Å. Per 100 planned frames: 20 pristine, 16 with a neutral Na+Cl vacancy pair,
    and 16 geometries each with one Na vacancy (total charge 0 and -1) or one Cl vacancy
    (0 and +1).

    Only the 8-site cell: tblite's periodic GFN2-xTB samples the Brillouin zone at Gamma
    only, so the energy per atom depends strongly on the supercell (perfect crystal at
    5.68 Å: -66.28 eV/atom in the 8-site cell, -66.62 in 2x1x1, -66.72 in 2x2x1, -66.74
    in 2x2x2), and a non-cubic supercell gives a perfect cubic crystal an anisotropic
    stress (2x1x1: 0.0049 / 0.0020 eV/Å³). Mixing cell sizes would put these Gamma-point
    artefacts into the labels, where no interatomic potential could fit them; with one
    cubic cell they are the same for every frame and keep the cubic symmetry.
    """
    rng = np.random.default_rng(seed)
    scale = n_frames / 100.0
    plan = ([("bulk", (0,))] * int(round(20 * scale)) + [("V_NaCl", (0,))] * int(round(16 * scale))
            + [("V_Na", (0, -1))] * int(round(16 * scale)) + [("V_Cl", (0, 1))] * int(round(16 * scale)))
    order = rng.permutation(len(plan))
    frames, next_pair = [], 0
    for index in order:
        defect, charges = plan[int(index)]
        atoms = bulk("NaCl", "rocksalt", a=NACL_LATTICE, cubic=True)
        remove = []
        if defect in ("V_Na", "V_NaCl"):
            remove.append(int(rng.choice(np.flatnonzero(atoms.numbers == 11))))
        if defect in ("V_Cl", "V_NaCl"):
            remove.append(int(rng.choice(np.flatnonzero(atoms.numbers == 17))))
        del atoms[sorted(remove)]
        strain = rng.uniform(-0.01, 0.01, (3, 3))
        deformation = rng.uniform(0.97, 1.03) * (np.eye(3) + 0.5 * (strain + strain.T))
        atoms.set_cell(atoms.cell.array @ deformation, scale_atoms=True)
        atoms.positions += rng.normal(scale=rng.uniform(0.05, 0.1), size=atoms.positions.shape)
        atoms.wrap()
        atoms.pbc = True
        extra = {"pair_id": -1, "lattice_scale": float(np.cbrt(np.linalg.det(deformation)))}
        results = [gfn2(atoms, q, stats, label=defect, stress=True) for q in charges]
        if any(r is None for r in results):
            continue
        if len(charges) == 2:
            extra["pair_id"] = next_pair
            next_pair += 1
        for q, result in zip(charges, results):
            label = defect + ("+" if q > 0 else "-" if q < 0 else "")
            frames.append(labelled_frame(atoms, result, q, label, dict(extra), stress=True))
    return frames


# -------------------------------------------------------------------------- isolated atoms

def isolated_atom_energies() -> dict:
    """GFN2-xTB energies of single neutral H, O, Na, Cl atoms in their ground-state
    multiplicities (2, 3, 2, 2), keyed by atomic number as a string."""
    from tblite.ase import TBLite

    energies = {}
    for symbol, spin in (("H", 2), ("O", 3), ("Na", 2), ("Cl", 2)):
        atom = Atoms(symbol, positions=[[0, 0, 0]])
        atom.calc = TBLite(method="GFN2-xTB", charge=0, multiplicity=spin, verbosity=0)
        energies[str(atom.numbers[0])] = float(atom.get_potential_energy())
    return energies


# ---------------------------------------------------------------------------- reporting

def summarize(path: str, frames: list) -> None:
    energies = np.array([f.info["REF_energy"] for f in frames])
    forces = np.concatenate([f.arrays["REF_forces"] for f in frames])
    print(f"  {os.path.basename(path)}: {len(frames)} frames, {os.path.getsize(path) / 1e6:.2f} MB, "
          f"E {energies.min():.2f} .. {energies.max():.2f} eV, force RMS "
          f"{np.sqrt(np.mean(forces ** 2)):.3f} eV/Å, max |F| {np.linalg.norm(forces, axis=1).max():.2f} eV/Å")
    by_system = collections.defaultdict(list)
    for frame in frames:
        by_system[frame.info["system"]].append(frame)
    for system in sorted(by_system):
        group = by_system[system]
        e = np.array([f.info["REF_energy"] for f in group])
        f = np.concatenate([g.arrays["REF_forces"] for g in group])
        charges = sorted({g.info["total_charge"] for g in group})
        spins = sorted({g.info["total_spin"] for g in group})
        line = (f"    {system:12s} {len(group):4d} frames, charge {charges}, multiplicity {spins}, "
                f"{len(group[0])}-{max(len(g) for g in group)} atoms, E {e.min():.3f} .. {e.max():.3f} eV, "
                f"max |F| {np.linalg.norm(f, axis=1).max():.2f}")
        if "separation" in group[0].info:
            s = np.array([g.info["separation"] for g in group])
            line += f", separation {s.min():.2f} .. {s.max():.2f} Å"
        if "REF_stress" in group[0].info:
            st = np.array([g.info["REF_stress"] for g in group])
            line += f", stress {st.min():.4f} .. {st.max():.4f} eV/Å³"
        print(line)


def nacl_pair_check(frames: list) -> None:
    """How the neutral Na...Cl energy compares with a -14.4/r point-charge law."""
    pairs = sorted((f.info["separation"], f.info["REF_energy"], f.arrays["mulliken_charges"][0])
                   for f in frames if f.info["system"] == "NaCl")
    far = [p for p in pairs if p[0] > 6.0]
    if len(far) < 2:
        return
    r, e, q = (np.array(column) for column in zip(*far))
    coulomb = -14.399645 / r
    slope_full = np.polyfit(coulomb, e, 1)
    slope_q = np.polyfit(-14.399645 * q ** 2 / r, e, 1)
    print(f"  Na...Cl (neutral) at r > 6 Å, {len(r)} frames: fit E = a*(-14.40/r) + b gives "
          f"a = {slope_full[0]:.3f}; with the Mulliken charges, E = a*(-14.40 q²/r) + b gives "
          f"a = {slope_q[0]:.3f}; q(Na) {q.min():.2f} .. {q.max():.2f} e")
    for target in (6.5, 8.0, 10.0, 12.0):
        i = int(np.argmin(np.abs(r - target)))
        j = int(np.argmin(np.abs(r - 6.0)))
        print(f"    r {r[i]:.2f} Å: E - E({r[j]:.2f} Å) = {e[i] - e[j]:+.3f} eV, "
              f"-14.40/r difference {coulomb[i] - coulomb[j]:+.3f} eV, q(Na) {q[i]:.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="data", help="where to write the files (default: data)")
    parser.add_argument("--sets", default="ions,nacl,e0s", help="comma-separated subset of: ions, nacl, e0s")
    parser.add_argument("--n-ions", type=int, default=600, help="approximate molecular frames (default 600)")
    parser.add_argument("--n-nacl", type=int, default=120,
                        help="periodic frames planned (default 120; ~20 %% are lost to SCF failures)")
    parser.add_argument("--seed", type=int, default=11, help="base seed (periodic set uses seed + 1)")
    parser.add_argument("--ions-file", default="ion_pairs_gfn2.extxyz")
    parser.add_argument("--nacl-file", default="nacl_defects_gfn2.extxyz")
    parser.add_argument("--e0s-file", default="long_range_gfn2_e0s.json")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    wanted = set(args.sets.split(","))
    unknown = wanted - {"ions", "nacl", "e0s"}
    if unknown:
        parser.error(f"unknown set(s): {', '.join(sorted(unknown))}")
    if "e0s" in wanted:
        energies = isolated_atom_energies()
        path = os.path.join(args.out_dir, args.e0s_file)
        with open(path + ".tmp", "w") as stream:
            json.dump(energies, stream, indent=2)
            stream.write("\n")
        os.replace(path + ".tmp", path)
        print(f"isolated atoms: {energies}")
    for name, make, n, file, seed in (("ions", ion_pair_frames, args.n_ions, args.ions_file, args.seed),
                                      ("nacl", nacl_frames, args.n_nacl, args.nacl_file, args.seed + 1)):
        if name not in wanted:
            continue
        start = time.time()
        stats = Stats()
        frames = make(n, seed, stats)
        path = os.path.join(args.out_dir, file)
        write_frames_atomically(path, frames)
        print(f"{name}: {len(frames)} frames in {time.time() - start:.0f} s; stored solutions by SCF "
              f"attempt {dict(sorted(stats.attempt.items()))} (0 = tblite defaults); calculations "
              f"skipped (no valid solution, pair partner dropped too): {dict(stats.skipped) or 'none'}; "
              f"converged but unphysical: {dict(stats.rejected) or 'none'}; several valid solutions "
              f"(lowest kept; their energy spreads in eV): {dict(stats.multiple) or 'none'}")
        summarize(path, frames)
        if name == "ions":
            nacl_pair_check(frames)


if __name__ == "__main__":
    main()
