"""Make the extrapolation data set shipped in data/, in the spirit of the 3BPA study (no internet).

n-butane (C4H10) with GFN2-xTB (tblite): one rotatable heavy-atom bond (the C–C–C–C
dihedral: trans, two gauche minima, the eclipsed barriers) and two methyl rotors.

  * data/butane_gfn2_300K.extxyz    600 frames, Langevin MD at 300 K (the training data)
  * data/butane_gfn2_600K.extxyz    200 frames at 600 K  (hotter than training)
  * data/butane_gfn2_1200K.extxyz   200 frames at 1200 K (much hotter)
  * data/butane_gfn2_torsions.extxyz  relaxed torsion scans: the C–C–C–C dihedral and one
        H–C–C–C methyl dihedral, 0° to 350° in 10° steps, everything else relaxed
        (``atoms.info``: ``scan`` name, ``dihedral`` in degrees)
  * data/butane_gfn2_e0s.json       isolated-atom GFN2-xTB energies of H and C

Labels as the other shipped sets: ``REF_energy`` (eV, absolute), ``REF_forces`` (eV/Å),
``config_type`` (md_300K, md_600K, md_1200K, scan_CCCC, scan_HCCC).

Why it is an extrapolation test: in GFN2-xTB the gauche minima lie 27 meV above trans,
the trans–gauche barrier (120°) 111 meV above it (4.3 kT at 300 K), the cis barrier
214 meV; the methyl rotor's barrier is 113 meV. The 300 K trajectory (6 ps) never leaves
trans (0 % gauche frames); the 600 K one is 87 % gauche and the 1200 K one 14 %, with C–C
bonds up to 1.69 and 1.76 Å against 1.66 Å in training. The scans run through every
barrier, which no training frame visits. Run time about 45 s on one core.

Deterministic: fixed seeds, tblite on one OpenMP thread (set before it loads).

    python scripts/make_extrapolation_data.py [--out-dir data] [--sets md,scans,e0s]
"""

from __future__ import annotations

import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.build import molecule  # noqa: E402
from ase.constraints import FixInternals  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from ase.md.velocitydistribution import Stationary, ZeroRotation  # noqa: E402
from ase.optimize import BFGS  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_datasets import (labelled_copy, summarize, thermalize_momenta, write_frames_atomically,  # noqa: E402
                           xtb)

# ase's trans-butane: carbons 0-1-2-3 along the chain; H4, H6, H7 sit on C0.
CARBON_CHAIN = [0, 1, 2, 3]
METHYL_TORSION = [4, 0, 1, 2]
SCANS = {"scan_CCCC": CARBON_CHAIN, "scan_HCCC": METHYL_TORSION}


def butane() -> Atoms:
    return molecule("trans-butane")


def md_frames(temperature: float, n_frames: int, equilibration_steps: int, seed: int, stride: int = 20) -> list:
    atoms = butane()
    atoms.calc = xtb()
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dynamics = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=temperature, friction=0.01 / units.fs,
                        rng=rng, fixcm=False)
    dynamics.run(equilibration_steps)
    frames = []
    for _ in range(n_frames):
        dynamics.run(stride)
        frames.append(labelled_copy(atoms, f"md_{temperature:g}K"))
    chain = [frame.get_dihedral(*CARBON_CHAIN) for frame in frames]
    gauche = np.mean([min(abs(d - 60), abs(d - 300)) < 40 for d in chain])
    longest = max(frame.get_distance(a, b) for frame in frames for a, b in zip(CARBON_CHAIN, CARBON_CHAIN[1:]))
    print(f"  md {temperature:g} K: {gauche:.0%} of frames gauche, longest C–C bond {longest:.2f} Å")
    return frames


def torsion_scan(name: str, indices: list, step_degrees: float = 10.0, fmax: float = 0.01) -> list:
    """Relaxed scan: the dihedral held at each angle (FixInternals), everything else optimised."""
    atoms = butane()
    frames = []
    for angle in np.arange(0.0, 360.0, step_degrees):
        atoms.set_constraint()
        atoms.set_dihedral(*indices, angle, indices=_moving_side(atoms, indices))
        atoms.set_constraint(FixInternals(dihedrals_deg=[[angle, indices]]))
        atoms.calc = xtb()
        BFGS(atoms, logfile=None, maxstep=0.05).run(fmax=fmax, steps=500)
        atoms.set_constraint()
        frame = labelled_copy(atoms, name)  # the true forces: the constraint's are not in them
        frame.info.update(scan=name, dihedral=float(angle))
        frames.append(frame)
    energies = np.array([f.info["REF_energy"] for f in frames])
    print(f"  {name}: {len(frames)} points, barrier {1e3 * (energies.max() - energies.min()):.0f} meV")
    return frames


def _moving_side(atoms: Atoms, indices: list) -> list:
    """Atoms on the far side of the dihedral's central bond (moved by set_dihedral)."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.2))
    b, c = indices[1], indices[2]
    side, frontier = {c}, [c]
    while frontier:
        atom = frontier.pop()
        for neighbour in j[i == atom]:
            if neighbour != b and neighbour not in side:
                side.add(int(neighbour))
                frontier.append(int(neighbour))
    return sorted(side)


def isolated_atom_energies() -> dict:
    from tblite.ase import TBLite

    energies = {}
    for symbol, multiplicity in (("H", 2), ("C", 3)):
        atom = Atoms(symbol, positions=[[0, 0, 0]])
        atom.calc = TBLite(method="GFN2-xTB", verbosity=0, multiplicity=multiplicity)
        energies[str(atom.numbers[0])] = float(atom.get_potential_energy())
    return energies


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "data"))
    parser.add_argument("--sets", default="md,scans,e0s")
    args = parser.parse_args(argv)
    sets = set(args.sets.split(","))
    out = os.path.abspath(args.out_dir)
    if "md" in sets:
        for temperature, n_frames, seed in ((300.0, 600, 21), (600.0, 200, 22), (1200.0, 200, 23)):
            start = time.time()
            frames = md_frames(temperature, n_frames, equilibration_steps=2000, seed=seed)
            path = os.path.join(out, f"butane_gfn2_{temperature:g}K.extxyz")
            write_frames_atomically(path, frames)
            summarize(path, frames)
            print(f"    {time.time() - start:.0f} s")
    if "scans" in sets:
        start = time.time()
        frames = [frame for name, indices in SCANS.items() for frame in torsion_scan(name, indices)]
        path = os.path.join(out, "butane_gfn2_torsions.extxyz")
        write_frames_atomically(path, frames)
        summarize(path, frames)
        print(f"    {time.time() - start:.0f} s")
    if "e0s" in sets:
        path = os.path.join(out, "butane_gfn2_e0s.json")
        with open(path, "w") as stream:
            json.dump(isolated_atom_energies(), stream, indent=1)
        print(f"  {path}")


if __name__ == "__main__":
    main()
