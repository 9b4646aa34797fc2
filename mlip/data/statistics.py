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

A multi-fidelity model (``model.fidelities``) has E0, μ and s per level of theory, each
from that level's training frames alone (two codes' absolute energies differ by far more
than any model error); the top-level ``e0``, ``shift``, ``scale`` are then the default
(last) fidelity's.

Both statistics classes are JAX pytrees whose leaves are their numbers (the elements and
fidelity names are the structure): a compiled program that takes a `mlip.potential.Potential`
as an argument takes its statistics as inputs, not as constants folded into its code, so
models of one architecture fitted to different data share a compilation, in this process
and in the persistent cache (a loop that retrains every iteration compiles each shape once).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from mlip.data.batching import GraphSample
from mlip.errors import DataError

MAX_ATOMIC_NUMBER = 118


def _e0_table(e0: Mapping[int, float]) -> np.ndarray:
    table = np.zeros(MAX_ATOMIC_NUMBER + 1, np.float64)
    for z, value in e0.items():
        table[int(z)] = value
    return table


@dataclasses.dataclass(frozen=True)
class FidelityStatistics:
    """E0, shift and scale of one level of theory of a multi-fidelity model."""

    name: str
    e0: dict[int, float]
    shift: float
    scale: float

    def to_json(self) -> dict:
        return {"name": self.name, "e0": {str(z): v for z, v in self.e0.items()}, "shift": self.shift,
                "scale": self.scale}

    @classmethod
    def from_json(cls, data: Mapping) -> "FidelityStatistics":
        return cls(name=str(data["name"]), e0={int(z): float(v) for z, v in data["e0"].items()},
                   shift=float(data["shift"]), scale=float(data["scale"]))


@dataclasses.dataclass(frozen=True)
class DatasetStatistics:
    """Normalisation constants of a trained model (never trained, never sampled).

    ``fidelities`` is empty for a single-fidelity model; otherwise one entry per
    ``model.fidelities`` name in that order, and ``e0``/``shift``/``scale`` are the last's.
    """

    atomic_numbers: tuple[int, ...]  # elements the model knows, sorted
    e0: dict[int, float]  # eV per atom of each element
    shift: float  # eV per atom
    scale: float  # eV (per atom), eV/Å for forces
    avg_num_neighbors: float
    fidelities: tuple[FidelityStatistics, ...] = ()

    @classmethod
    def per_fidelity(cls, atomic_numbers, avg_num_neighbors: float,
                     fidelities: Sequence[FidelityStatistics]) -> "DatasetStatistics":
        """Statistics of a multi-fidelity model; the top level is the default (last) fidelity's."""
        default = fidelities[-1]
        return cls(atomic_numbers=tuple(atomic_numbers), e0=dict(default.e0), shift=default.shift,
                   scale=default.scale, avg_num_neighbors=float(avg_num_neighbors), fidelities=tuple(fidelities))

    @property
    def fidelity_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fidelities)

    def e0_per_species(self, fidelity: Optional[int] = None) -> np.ndarray:
        """[119] float64 table of reference energies (of fidelity index ``fidelity``; None: the
        default), zero for unknown elements."""
        if fidelity is None or not self.fidelities:
            return _e0_table(self.e0)
        return _e0_table(self.fidelities[int(fidelity)].e0)

    def e0_tables(self) -> np.ndarray:
        """[F, 119] reference energies per fidelity ([1, 119] for a single-fidelity model)."""
        if not self.fidelities:
            return self.e0_per_species()[None]
        return np.stack([_e0_table(f.e0) for f in self.fidelities])

    def shifts(self) -> np.ndarray:
        """[F] shift per fidelity (eV per atom); [1] for a single-fidelity model."""
        return np.array([f.shift for f in self.fidelities] or [self.shift], np.float64)

    def scales(self) -> np.ndarray:
        """[F] scale per fidelity; [1] for a single-fidelity model."""
        return np.array([f.scale for f in self.fidelities] or [self.scale], np.float64)

    def to_json(self) -> dict:
        data = {"atomic_numbers": list(self.atomic_numbers),
                "e0": {str(z): v for z, v in self.e0.items()},
                "shift": self.shift, "scale": self.scale,
                "avg_num_neighbors": self.avg_num_neighbors}
        if self.fidelities:
            data["fidelities"] = [f.to_json() for f in self.fidelities]
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> "DatasetStatistics":
        return cls(atomic_numbers=tuple(int(z) for z in data["atomic_numbers"]),
                   e0={int(z): float(v) for z, v in data["e0"].items()},
                   shift=float(data["shift"]), scale=float(data["scale"]),
                   avg_num_neighbors=float(data["avg_num_neighbors"]),
                   fidelities=tuple(FidelityStatistics.from_json(f) for f in data.get("fidelities", ())))


def _flatten_fidelity(statistics: FidelityStatistics):
    elements = tuple(sorted(statistics.e0))
    return ((tuple(statistics.e0[z] for z in elements), statistics.shift, statistics.scale),
            (statistics.name, elements))


def _unflatten_fidelity(structure, numbers) -> FidelityStatistics:
    (name, elements), (e0, shift, scale) = structure, numbers
    return FidelityStatistics(name=name, e0=dict(zip(elements, e0)), shift=shift, scale=scale)


def _flatten_statistics(statistics: DatasetStatistics):
    elements = tuple(sorted(statistics.e0))
    numbers = (tuple(statistics.e0[z] for z in elements), statistics.shift, statistics.scale,
               statistics.avg_num_neighbors, statistics.fidelities)
    return numbers, (tuple(statistics.atomic_numbers), elements)


def _unflatten_statistics(structure, numbers) -> DatasetStatistics:
    (atomic_numbers, elements), (e0, shift, scale, avg_num_neighbors, fidelities) = structure, numbers
    return DatasetStatistics(atomic_numbers=atomic_numbers, e0=dict(zip(elements, e0)), shift=shift, scale=scale,
                             avg_num_neighbors=avg_num_neighbors, fidelities=tuple(fidelities))


jax.tree_util.register_pytree_node(FidelityStatistics, _flatten_fidelity, _unflatten_fidelity)
jax.tree_util.register_pytree_node(DatasetStatistics, _flatten_statistics, _unflatten_statistics)


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


def _energy_statistics(samples: Sequence[GraphSample], atomic_numbers: Sequence[int],
                       e0: Optional[Mapping[int, float]], scaling: str, where: str = "") -> tuple[dict, float, float]:
    """(E0, shift, scale) of a set of samples: E0 given or fitted, shift the mean per-atom energy
    above it, scale the RMS force component (or the per-atom energy spread)."""
    own_elements = tuple(sorted({int(z) for s in samples for z in s.frame.numbers}))
    if e0 is None:
        e0 = fit_e0_least_squares(samples, own_elements)
    else:
        missing = [z for z in own_elements if z not in e0]
        if missing:
            from ase.data import chemical_symbols
            raise DataError(f"reference energies{where} given for elements "
                            f"{sorted(chemical_symbols[z] for z in e0)} but the training set "
                            f"also has {[chemical_symbols[z] for z in missing]}")
        e0 = {z: float(e0[z]) for z in atomic_numbers if z in e0}
    table = _e0_table(e0)
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
    return dict(e0), shift, scale


def compute_statistics(samples: Sequence[GraphSample], e0: Optional[Mapping[int, float]] = None,
                       scaling: str = "rms_forces", fidelities: Sequence[str] = (),
                       fidelity_e0s: Optional[Sequence[Optional[Mapping[int, float]]]] = None) -> DatasetStatistics:
    """All normalisation constants from the training samples.

    Args:
        samples: training structures with neighbour lists.
        e0: reference energies (e.g. isolated atoms); fitted by least squares if None.
        scaling: ``rms_forces`` or ``std_energy``.
        fidelities: the names of a multi-fidelity model's levels of theory; every sample's
            ``frame.fidelity`` indexes them, and E0, shift and scale come per fidelity from
            its own samples.
        fidelity_e0s: with ``fidelities``, the given reference energies of each (None: fit).
    """
    if not samples:
        raise DataError("the training set is empty")
    atomic_numbers = tuple(sorted({int(z) for s in samples for z in s.frame.numbers}))
    n_atoms = sum(s.n_atoms for s in samples)
    avg_num_neighbors = float(max(sum(s.n_edges for s in samples) / n_atoms, 1.0))
    if not fidelities:
        e0, shift, scale = _energy_statistics(samples, atomic_numbers, e0, scaling)
        return DatasetStatistics(atomic_numbers=atomic_numbers, e0=e0, shift=shift, scale=scale,
                                 avg_num_neighbors=avg_num_neighbors)
    per_fidelity = []
    for index, name in enumerate(fidelities):
        own = [s for s in samples if s.frame.fidelity == index]
        if not own:
            raise DataError(f"model.fidelities lists '{name}' but no training frame is labelled at it "
                            f"(fidelities of the training frames: "
                            f"{sorted({fidelities[s.frame.fidelity] for s in samples})})")
        given = fidelity_e0s[index] if fidelity_e0s is not None else None
        e0_f, shift, scale = _energy_statistics(own, atomic_numbers, given, scaling, f" of fidelity '{name}'")
        per_fidelity.append(FidelityStatistics(name, e0_f, shift, scale))
    return DatasetStatistics.per_fidelity(atomic_numbers, avg_num_neighbors, fill_missing_e0(per_fidelity,
                                                                                              atomic_numbers))


def fill_missing_e0(per_fidelity: Sequence[FidelityStatistics], atomic_numbers: Sequence[int]) -> list:
    """E0 for elements a fidelity's frames never hold: the value least-squares would not
    constrain. They take the E0 of that element at the first fidelity that has one, offset
    by the mean difference of the shared elements' E0, so a prediction at this fidelity of a
    structure with that element is at least on the fidelity's energy scale (a notice says so)."""
    import sys

    from ase.data import chemical_symbols

    filled = []
    for entry in per_fidelity:
        e0 = dict(entry.e0)
        for z in atomic_numbers:
            if z in e0:
                continue
            donor = next(other for other in per_fidelity if z in other.e0)
            shared = [w for w in e0 if w in donor.e0]
            offset = float(np.mean([e0[w] - donor.e0[w] for w in shared])) if shared else 0.0
            e0[z] = donor.e0[z] + offset
            print(f"notice: fidelity '{entry.name}' has no training frame with {chemical_symbols[z]}; its E0 "
                  f"comes from fidelity '{donor.name}' (predictions at '{entry.name}' for {chemical_symbols[z]} "
                  f"are untrained)", file=sys.stderr)
        filled.append(dataclasses.replace(entry, e0={z: e0[z] for z in atomic_numbers}))
    return filled


def extend_statistics(source: DatasetStatistics, source_fidelities: Sequence[str], samples: Sequence[GraphSample],
                      fidelities: Sequence[str] = (), given_e0s: Optional[Sequence] = None,
                      scaling: str = "rms_forces") -> DatasetStatistics:
    """Statistics of a model fine-tuned from one with statistics ``source`` (training.init_from).

    A fidelity the source knew (or the one fidelity of two single-fidelity models) keeps its
    E0, shift and scale, so the fine-tuned model starts with the source's predictions; an
    element new to it gets an E0 fitted to its frames with the known E0 held fixed. A new
    fidelity's statistics come from its own frames, as in `compute_statistics`. The neighbour
    normalisation is the source's (a constant of the trained backbone).
    """
    atomic_numbers = tuple(sorted(set(source.atomic_numbers) | {int(z) for s in samples for z in s.frame.numbers}))
    if source.fidelities:
        known = {entry.name: entry for entry in source.fidelities}
    elif not source_fidelities and not fidelities:
        known = {"": FidelityStatistics("", source.e0, source.shift, source.scale)}
    else:
        known = {}
    per_fidelity = []
    for index, name in enumerate(fidelities or [""]):
        own = [s for s in samples if s.frame.fidelity == index] if fidelities else list(samples)
        given = given_e0s[index] if given_e0s is not None else None
        if name in known:
            previous = known[name]
            e0 = dict(previous.e0)
            new_elements = sorted({int(z) for s in own for z in s.frame.numbers} - set(e0))
            if new_elements:
                e0.update({z: given[z] for z in new_elements if given and z in given})
                still = [z for z in new_elements if z not in e0]
                if still:
                    e0.update(_fit_new_e0(own, e0, still))
            per_fidelity.append(FidelityStatistics(name, e0, previous.shift, previous.scale))
        else:
            if not own:
                raise DataError(f"model.fidelities lists '{name}', new to this fine-tuned model, but no training "
                                "frame is labelled at it")
            e0, shift, scale = _energy_statistics(own, atomic_numbers, given, scaling, f" of fidelity '{name}'")
            per_fidelity.append(FidelityStatistics(name, e0, shift, scale))
    per_fidelity = fill_missing_e0(per_fidelity, atomic_numbers)
    if not fidelities:
        entry = per_fidelity[0]
        return DatasetStatistics(atomic_numbers=atomic_numbers, e0=entry.e0, shift=entry.shift, scale=entry.scale,
                                 avg_num_neighbors=source.avg_num_neighbors)
    return DatasetStatistics.per_fidelity(atomic_numbers, source.avg_num_neighbors, per_fidelity)


def _fit_new_e0(samples: Sequence[GraphSample], known: Mapping[int, float], new_elements: Sequence[int]) -> dict:
    """E0 of ``new_elements`` by least squares on what the known E0 leave of the energies."""
    labelled = [s.frame for s in samples if s.frame.energy is not None]
    if not labelled:
        raise DataError("cannot fit reference energies of the new elements: no training frame has an energy")
    table = _e0_table(known)
    counts = np.array([[np.sum(frame.numbers == z) for z in new_elements] for frame in labelled], np.float64)
    residual = np.array([frame.energy - table[frame.numbers].sum() for frame in labelled])
    solution = np.linalg.lstsq(counts, residual, rcond=None)[0]
    return {int(z): float(value) for z, value in zip(new_elements, solution)}
