"""Make the small reference data sets shipped in data/ (no internet needed).

  * data/ethanol_gfn2_500K.extxyz   1000 frames of ethanol, GFN2-xTB (tblite), Langevin MD at 500 K
  * data/ethanol_gfn2_1200K.extxyz  200 frames at 1200 K: out-of-distribution test set
  * data/ethanol_gfn2_e0s.json      isolated-atom GFN2-xTB energies of H, C, O
  * data/cuau_emt.extxyz            250 periodic Cu/Au frames (triclinic, strained), ASE EMT,
                                    with stress
  * data/cuau_surfaces_emt.extxyz   Cu/Au beyond the bulk (ASE EMT): four seed structures (an alloy
                                    cell, a Cu(111) slab with an Au adatom, an Au(100) slab with Cu
                                    in its top layer, a 13-atom Cu/Au cluster), then held-out and
                                    spare frames of EMT Langevin MD from each at 300 and 1000 K:
                                    the active-learning benchmark's heterogeneous system
  * data/ethanol_gfn1_500K.extxyz   the 1000 frames of the 500 K set relabelled with GFN1-xTB
                                    (tagged ``level_of_theory=gfn1``): the cheap fidelity of the
                                    multi-fidelity examples
  * data/ethanol_gfn1_e0s.json      isolated-atom GFN1-xTB energies of H, C, O

Labels follow MACE's convention: ``REF_energy`` (eV, absolute) and ``REF_stress``
(3x3, eV/Å³, ASE sign) in ``atoms.info``, ``REF_forces`` (eV/Å) in ``atoms.arrays``.
Deterministic: fixed seeds, and tblite is pinned to one OpenMP thread (set before
anything loads it) because its parallel reductions change the last bits of the
forces with the thread count, and MD trajectories amplify that into different
frames. Run time on an otherwise idle 2-core machine: about 50 s for the 500 K set,
12 s for the 1200 K set, <1 s for the isolated atoms and 27 s for CuAu, so about
1.5 minutes in all (several times that if other jobs share the cores).

Ethanol does not dissociate at 1200 K with 0.5 fs steps: the longest of its eight
covalent bonds over all 200 frames is 1.78 Å (the script prints this check).

Isolated atoms: GFN2-xTB has no spin-polarisation energy term, so the multiplicity
passed to tblite (H 2, C 3, O 3, i.e. ``uhf`` 1, 2, 2: the atoms' ground-state
multiplicities) only changes how the degenerate 2p shell is occupied under the
300 K Fermi smearing, i.e. the electronic-entropy part of the (free) energy that
tblite returns: C and O come out 0.049 eV higher than with the default (closed
shell for even electron counts); H is a doublet either way. We keep the physical
multiplicities.

    python scripts/make_datasets.py [--out-dir data] [--sets ethanol,ood,e0s,cuau,cuau_surfaces,gfn1]

The ``gfn1`` set reads ``ethanol_gfn2_500K.extxyz`` from the output directory (make ``ethanol``
first); it takes about 20 s.
"""

from __future__ import annotations

import os

# Before numpy/tblite load their OpenMP/BLAS runtimes: one thread makes the MD bitwise
# reproducible (and for a 9-atom molecule it is also the fastest).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import tempfile
import time

import ase.io
import numpy as np
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation

try:  # ASE >= 3.29 deprecates MaxwellBoltzmannDistribution in favour of this (same draws)
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(atoms, temperature_K, rng=None):
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


def write_frames_atomically(path: str, frames: list) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".extxyz", dir=directory)
    os.close(handle)
    ase.io.write(temporary, frames, format="extxyz")
    os.chmod(temporary, 0o644)  # mkstemp makes owner-only files
    os.replace(temporary, path)


def write_json_atomically(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as stream:
        json.dump(data, stream, indent=2)
        stream.write("\n")
    os.replace(path + ".tmp", path)


def labelled_copy(atoms, config_type: str, stress: bool = False) -> Atoms:
    """A copy carrying only REF_* labels (no calculator attached)."""
    frame = atoms.copy()
    frame.calc = None
    frame.info["REF_energy"] = float(atoms.get_potential_energy())
    frame.arrays["REF_forces"] = atoms.get_forces().copy()
    if stress:
        frame.info["REF_stress"] = atoms.get_stress(voigt=False).copy()
    frame.info["config_type"] = config_type
    for key in ("momenta",):
        if key in frame.arrays:
            del frame.arrays[key]
    return frame


def xtb(method: str = "GFN2-xTB"):
    from tblite.ase import TBLite

    return TBLite(method=method, verbosity=0)


def relabelled(frames: list, method: str, tag: str) -> list:
    """The same geometries labelled by another method (a second level of theory)."""
    out = []
    for frame in frames:
        atoms = Atoms(frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        atoms.calc = xtb(method)
        copy = labelled_copy(atoms, frame.info.get("config_type", ""))
        copy.info["level_of_theory"] = tag
        out.append(copy)
    return out


def ethanol_md(temperature: float, n_frames: int, equilibration_steps: int, seed: int,
               config_type: str, stride: int = 20) -> list:
    atoms = molecule("CH3CH2OH")
    atoms.calc = xtb()
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)  # Maxwell-Boltzmann
    Stationary(atoms)
    ZeroRotation(atoms)
    dynamics = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=temperature,
                        friction=0.01 / units.fs, rng=rng, fixcm=False)
    dynamics.run(equilibration_steps)
    frames = []
    for _ in range(n_frames):
        dynamics.run(stride)
        frames.append(labelled_copy(atoms, config_type))
    return frames


def check_intact(frames: list, label: str) -> None:
    """Print the longest covalent bond over all frames (> ~2 Å would mean a broken molecule)."""
    # ase's CH3CH2OH is C C O H H H H H H; its eight bonds:
    bonds = [(0, 1), (0, 6), (0, 7), (0, 8), (1, 2), (1, 4), (1, 5), (2, 3)]
    longest = max(frame.get_distance(a, b) for frame in frames for a, b in bonds)
    print(f"  {label}: longest bond {longest:.2f} Å")


def summarize(path: str, frames: list) -> None:
    """One line per file: frames, energy per atom, force RMS, size (what data/README.md quotes)."""
    per_atom = np.array([f.info["REF_energy"] / len(f) for f in frames])
    forces = np.concatenate([f.arrays["REF_forces"] for f in frames])
    print(f"  {os.path.basename(path)}: {len(frames)} frames, E/atom {per_atom.min():.3f} .. "
          f"{per_atom.max():.3f} (mean {per_atom.mean():.3f}) eV, force RMS "
          f"{np.sqrt(np.mean(forces ** 2)):.3f} eV/Å, max |F| "
          f"{np.linalg.norm(forces, axis=1).max():.2f} eV/Å, {os.path.getsize(path) / 1e6:.2f} MB")


def isolated_atom_energies(method: str = "GFN2-xTB") -> dict:
    """GFN2-xTB (or ``method``) energies of single H, C, O atoms in their ground-state multiplicity.

    See the module docstring: with GFN2-xTB the multiplicity only moves C and O by the
    0.049 eV electronic-entropy term; H is the same either way.
    """
    from tblite.ase import TBLite

    energies = {}
    for symbol, multiplicity in (("H", 2), ("C", 3), ("O", 3)):
        atom = Atoms(symbol, positions=[[0, 0, 0]])
        atom.calc = TBLite(method=method, verbosity=0, multiplicity=multiplicity)
        energies[str(atom.numbers[0])] = float(atom.get_potential_energy())
    return energies


def cuau_frames(n_frames: int, seed: int) -> list:
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < n_frames:
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
        gold_fraction = rng.uniform(0.0, 0.4)
        for index in rng.choice(len(atoms), int(round(gold_fraction * len(atoms))), replace=False):
            atoms[int(index)].symbol = "Au"
        lattice = 3.61 + 0.47 * gold_fraction  # Vegard-like, keeps the cells near equilibrium
        atoms.set_cell(atoms.cell.array * lattice / 3.61, scale_atoms=True)
        strain = rng.uniform(-0.03, 0.03, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.rattle(rng.uniform(0.05, 0.1), seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        temperature = rng.uniform(300, 1000)
        thermalize_momenta(atoms, temperature_K=temperature, rng=rng)  # Maxwell-Boltzmann
        dynamics = Langevin(atoms, timestep=2 * units.fs, temperature_K=temperature,
                            friction=0.02 / units.fs, rng=rng, fixcm=False)
        for _ in range(5):  # five snapshots 40 fs apart from each starting cell
            dynamics.run(20)
            frames.append(labelled_copy(atoms, "emt_cuau", stress=True))
    return frames[:n_frames]


CUAU_SURFACE_KINDS = ("bulk", "slab111_adatom", "slab100", "cluster")


def cuau_surface_seed(kind: str, rng) -> Atoms:
    """One starting structure of each kind: a user with bulk alloy data who wants surfaces and particles."""
    from ase.build import add_adsorbate, fcc100, fcc111
    from ase.cluster import Icosahedron

    if kind == "bulk":  # as in cuau_emt.extxyz: a 2x2x2 cubic cell, a quarter of it Au
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
        for index in rng.choice(len(atoms), 8, replace=False):
            atoms[int(index)].symbol = "Au"
        atoms.set_cell(atoms.cell.array * (3.61 + 0.47 * 0.25) / 3.61, scale_atoms=True)
    elif kind == "slab111_adatom":  # 27 Cu atoms in three layers, an Au atom on an fcc hollow site
        atoms = fcc111("Cu", (3, 3, 3), a=3.61, vacuum=6.0)
        add_adsorbate(atoms, "Au", 2.1, "fcc")
    elif kind == "slab100":  # four Au(100) layers of 2x2, two of the top layer's atoms Cu
        atoms = fcc100("Au", (2, 2, 4), a=4.08, vacuum=6.0)
        top = np.argsort(atoms.positions[:, 2])[-4:]
        for index in rng.choice(top, 2, replace=False):
            atoms[int(index)].symbol = "Cu"
    elif kind == "cluster":  # a 13-atom icosahedron, 4 of its shell atoms Au, in a 16 Å box, not periodic
        atoms = Icosahedron("Cu", noshells=2, latticeconstant=3.61)
        for index in rng.choice(np.arange(1, 13), 4, replace=False):
            atoms[int(index)].symbol = "Au"
        atoms.set_cell([16.0, 16.0, 16.0])
        atoms.center()
        atoms.pbc = False
    else:
        raise ValueError(kind)
    atoms.info.pop("adsorbate_info", None)  # ase.build's slab bookkeeping, not a label
    if kind != "cluster":
        atoms.pbc = True  # slabs: periodic along z too, across 12 Å of vacuum (more than twice the cutoff)
    return atoms


def cuau_surface_frames(seed: int) -> list:
    """The four seeds, then for each use ("test", "spare"), kind and temperature (300, 1000 K) eight
    frames of EMT Langevin MD from that kind's seed, 100 fs apart after 1 ps; every draw (the seeds'
    substitutions, each trajectory's velocities and noise) comes in turn from one generator. Order: seeds (0-3), test (4-67), spare (68-131)."""
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    seeds = {kind: cuau_surface_seed(kind, rng) for kind in CUAU_SURFACE_KINDS}
    frames = []
    for kind, atoms in seeds.items():
        atoms = atoms.copy()
        atoms.calc = EMT()
        frames.append(labelled_copy(atoms, f"seed_{kind}"))
    for use in ("test", "spare"):
        for kind in CUAU_SURFACE_KINDS:
            for temperature in (300.0, 1000.0):
                atoms = seeds[kind].copy()
                atoms.calc = EMT()
                thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
                Stationary(atoms)
                dynamics = Langevin(atoms, timestep=2 * units.fs, temperature_K=temperature,
                                    friction=0.02 / units.fs, rng=rng, fixcm=False)
                dynamics.run(500)
                for _ in range(8):
                    dynamics.run(50)
                    frames.append(labelled_copy(atoms, f"{use}_{kind}_{int(temperature)}K"))
    return frames


SETS = ("ethanol", "ood", "e0s", "cuau", "cuau_surfaces", "gfn1")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="data", help="where to write the files (default: data)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of: {', '.join(SETS)}")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    wanted = set(args.sets.split(","))
    unknown = wanted - set(SETS)
    if unknown:
        parser.error(f"unknown set(s): {', '.join(sorted(unknown))}")
    if "ethanol" in wanted:
        start = time.time()
        frames = ethanol_md(500.0, 1000, 2000, seed=1, config_type="md_500K")
        check_intact(frames, "500 K")
        path = os.path.join(args.out_dir, "ethanol_gfn2_500K.extxyz")
        write_frames_atomically(path, frames)
        summarize(path, frames)
        print(f"ethanol 500 K: {len(frames)} frames in {time.time() - start:.0f} s")
    if "ood" in wanted:
        start = time.time()
        frames = ethanol_md(1200.0, 200, 1000, seed=2, config_type="md_1200K")
        check_intact(frames, "1200 K")
        path = os.path.join(args.out_dir, "ethanol_gfn2_1200K.extxyz")
        write_frames_atomically(path, frames)
        summarize(path, frames)
        print(f"ethanol 1200 K: {len(frames)} frames in {time.time() - start:.0f} s")
    if "e0s" in wanted:
        energies = isolated_atom_energies()
        write_json_atomically(os.path.join(args.out_dir, "ethanol_gfn2_e0s.json"), energies)
        print(f"isolated atoms: {energies}")
    if "cuau" in wanted:
        start = time.time()
        frames = cuau_frames(250, seed=3)
        path = os.path.join(args.out_dir, "cuau_emt.extxyz")
        write_frames_atomically(path, frames)
        summarize(path, frames)
        print(f"CuAu EMT: {len(frames)} frames in {time.time() - start:.0f} s")
    if "cuau_surfaces" in wanted:
        start = time.time()
        frames = cuau_surface_frames(seed=4)
        path = os.path.join(args.out_dir, "cuau_surfaces_emt.extxyz")
        write_frames_atomically(path, frames)
        summarize(path, frames)
        print(f"CuAu surfaces EMT: {len(frames)} frames in {time.time() - start:.0f} s")
    if "gfn1" in wanted:
        start = time.time()
        source = ase.io.read(os.path.join(args.out_dir, "ethanol_gfn2_500K.extxyz"), index=":")
        frames = relabelled(source, "GFN1-xTB", "gfn1")
        path = os.path.join(args.out_dir, "ethanol_gfn1_500K.extxyz")
        write_frames_atomically(path, frames)
        summarize(path, frames)
        energies = isolated_atom_energies("GFN1-xTB")
        write_json_atomically(os.path.join(args.out_dir, "ethanol_gfn1_e0s.json"), energies)
        print(f"ethanol GFN1: {len(frames)} frames in {time.time() - start:.0f} s; isolated atoms {energies}")


if __name__ == "__main__":
    main()
