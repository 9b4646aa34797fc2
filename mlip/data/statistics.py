"""Data-set statistics that normalise training: reference energies, scale, shift, neighbours.

Fitted on the training split only and saved with the model (MACE's conventions):
  * E0(Z): per-element reference energies, from a file of isolated-atom energies or
    by least squares E ≈ Σ_Z n_Z E0(Z) over the training frames;
  * shift μ: mean per-atom energy left after subtracting the references;
  * scale s: RMS of the force components (``rms_forces``), or the standard deviation of
    the per-atom energies when there are no forces;
  * avg_num_neighbors: mean number of edges per atom within the cutoff.
The model then predicts E = Σ_i [E0(Z_i) + s·ε_i + μ], so training never sees
absolute energies of thousands of eV.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from mlip.data.batching import GraphSample
from mlip.errors import DataError

MAX_ATOMIC_NUMBER = 118


@dataclasses.dataclass(frozen=True)
class DatasetStatistics:
    """Normalisation constants of a trained model (never trained, never sampled)."""

    atomic_numbers: tuple[int, ...]  # elements the model knows, sorted
    e0: dict[int, float]  # eV per atom of each element
    shift: float  # eV per atom
    scale: float  # eV (per atom), eV/Å for forces
    avg_num_neighbors: float

    def e0_per_species(self) -> np.ndarray:
        """[119] float64 table of reference energies, zero for unknown elements."""
        table = np.zeros(MAX_ATOMIC_NUMBER + 1, np.float64)
        for z, value in self.e0.items():
            table[int(z)] = value
        return table

    def to_json(self) -> dict:
        return {"atomic_numbers": list(self.atomic_numbers),
                "e0": {str(z): v for z, v in self.e0.items()},
                "shift": self.shift, "scale": self.scale,
                "avg_num_neighbors": self.avg_num_neighbors}

    @classmethod
    def from_json(cls, data: Mapping) -> "DatasetStatistics":
        return cls(atomic_numbers=tuple(int(z) for z in data["atomic_numbers"]),
                   e0={int(z): float(v) for z, v in data["e0"].items()},
                   shift=float(data["shift"]), scale=float(data["scale"]),
                   avg_num_neighbors=float(data["avg_num_neighbors"]))


def isolated_atom_energies(frames: Sequence, where: str) -> dict[int, float]:
    """E0(Z) from labelled frames of one atom each (MACE's ``config_type=IsolatedAtom`` frames, or a
    file of isolated atoms); a frame of more atoms, or two different energies of one element, is an error."""
    from ase.data import chemical_symbols

    e0: dict[int, float] = {}
    for frame in frames:
        if frame.n_atoms != 1:
            raise DataError(f"{frame.source}: an isolated-atom frame ({where}) must hold one atom, it has "
                            f"{frame.n_atoms}")
        if frame.energy is None:
            raise DataError(f"{frame.source}: isolated-atom frame ({where}) has no energy")
        z = int(frame.numbers[0])
        if z in e0 and abs(e0[z] - frame.energy) > 1e-6:
            raise DataError(f"{frame.source}: a second isolated {chemical_symbols[z]} atom with energy "
                            f"{frame.energy} eV (first: {e0[z]} eV)")
        e0[z] = float(frame.energy)
    return e0


def load_e0_file(path: str, keys=None) -> dict[int, float]:
    """Read isolated-atom energies: JSON ``{"1": -13.6, "H": ..., ...}`` (number or symbol keys), or
    any structure file ASE reads (e.g. extxyz) holding one isolated atom per frame, its energy under
    ``keys.energy`` (a `LabelKeys`; default ``REF_energy``, else ASE's plain ``energy``)."""
    from ase.data import atomic_numbers as symbol_to_number

    if not os.path.exists(path):
        raise DataError(f"{path}: reference-energy file not found")
    if not path.endswith(".json"):
        from mlip.data.reader import LabelKeys, read_frames

        keys = dataclasses.replace(keys or LabelKeys(), forces=None, stress=None, magmoms=None)
        return isolated_atom_energies(read_frames(path, keys, require_forces=False), f"data.e0s {path}")
    try:
        with open(path) as handle:
            raw = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping from element to energy")
    e0 = {}
    for key, value in raw.items():
        if str(key).isdigit():
            z = int(key)
        elif key in symbol_to_number:
            z = symbol_to_number[key]
        else:
            raise DataError(f"{path}: key '{key}' is neither an atomic number nor an element symbol")
        try:
            e0[z] = float(value)
        except (TypeError, ValueError) as error:
            raise DataError(f"{path}: energy of '{key}' is not a number: {value!r}") from error
    return e0


def fit_e0_least_squares(samples: Sequence[GraphSample], atomic_numbers: Sequence[int]) -> dict[int, float]:
    """Per-element energies minimising Σ_frames (E − Σ_Z n_Z E0(Z))² (minimum norm if degenerate)."""
    labelled = [s.frame for s in samples if s.frame.energy is not None]
    if not labelled:
        raise DataError("cannot fit reference energies: no training frame has an energy label")
    column = {z: k for k, z in enumerate(atomic_numbers)}
    counts = np.zeros((len(labelled), len(atomic_numbers)))
    for row, frame in enumerate(labelled):
        for z in frame.numbers:
            counts[row, column[int(z)]] += 1
    energies = np.array([frame.energy for frame in labelled])
    # lstsq gives the minimum-norm solution when element counts are collinear (e.g.
    # every frame has the same composition), where a plain solve would fail.
    solution = np.linalg.lstsq(counts, energies, rcond=None)[0]
    return {int(z): float(solution[column[z]]) for z in atomic_numbers}


def compute_statistics(samples: Sequence[GraphSample], e0: Optional[Mapping[int, float]] = None,
                       scaling: str = "rms_forces") -> DatasetStatistics:
    """All normalisation constants from the training samples.

    Args:
        samples: training structures with neighbour lists.
        e0: reference energies (e.g. isolated atoms); fitted by least squares if None.
        scaling: ``rms_forces`` or ``std_energy``.
    """
    if not samples:
        raise DataError("the training set is empty")
    atomic_numbers = tuple(sorted({int(z) for s in samples for z in s.frame.numbers}))
    if e0 is None:
        e0 = fit_e0_least_squares(samples, atomic_numbers)
    else:
        missing = [z for z in atomic_numbers if z not in e0]
        if missing:
            from ase.data import chemical_symbols
            raise DataError("reference energies given for elements "
                            f"{sorted(chemical_symbols[z] for z in e0)} but the training set "
                            f"also has {[chemical_symbols[z] for z in missing]}")
        e0 = {z: float(e0[z]) for z in atomic_numbers}
    table = np.zeros(MAX_ATOMIC_NUMBER + 1)
    for z, value in e0.items():
        table[z] = value
    per_atom = np.array([(s.frame.energy - table[s.frame.numbers].sum()) / s.n_atoms
                         for s in samples if s.frame.energy is not None])
    shift = float(per_atom.mean()) if per_atom.size else 0.0
    forces = [s.frame.forces for s in samples if s.frame.forces is not None]
    if scaling == "rms_forces" and forces:
        scale = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    elif per_atom.size > 1:
        scale = float(per_atom.std())
    else:
        scale = 1.0
    if not np.isfinite(scale) or scale < 1e-6:
        scale = 1.0  # e.g. a single frame or zero forces: keep the model's natural scale
    n_atoms = sum(s.n_atoms for s in samples)
    avg_num_neighbors = sum(s.n_edges for s in samples) / n_atoms
    return DatasetStatistics(atomic_numbers=atomic_numbers, e0=dict(e0), shift=shift,
                             scale=scale, avg_num_neighbors=float(max(avg_num_neighbors, 1.0)))
