"""Reading labelled structures from any file ASE reads into plain `Frame` records.

A data source is written ``path@index``, where ``index`` is an ASE index string:
``data.extxyz`` (all frames), ``data.extxyz@0:450``, ``data.extxyz@-50:``,
``data.db@7``. Labels are looked up under configurable keys, first in
``atoms.info`` / ``atoms.arrays`` and then in the results of an attached
calculator (ASE's extxyz reader puts ``energy``/``forces``/``stress`` there), so
``energy``, ``REF_energy`` and ``dft_forces`` all work without editing the file.
Where the configured key is absent from a frame, ASE's plain ``energy``/``forces``/
``stress`` are used instead, with a one-line notice per file. Every problem is reported
with the file, the frame and the key.

Besides every format ASE reads, ``.npz`` files of the revised MD17 (``nuclear_charges``,
``coords``, ``energies``, ``forces``) and MD22/sGDML (``z``, ``R``, ``E``, ``F``) layouts
are read, converted from kcal/mol and kcal/mol/Å (or the file's ``e_unit``) to eV and eV/Å.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from typing import Optional, Sequence

import numpy as np

from mlip.errors import DataError


@dataclasses.dataclass(frozen=True)
class LabelKeys:
    """Where the labels of a frame live. ``None`` means: this data set has no such label."""

    energy: Optional[str] = "REF_energy"
    forces: Optional[str] = "REF_forces"
    stress: Optional[str] = "REF_stress"
    charge: Optional[str] = "total_charge"
    spin: Optional[str] = "total_spin"
    fidelity: Optional[str] = None
    magmoms: Optional[str] = None


@dataclasses.dataclass
class Frame:
    """One labelled structure on the host, in float64.

    Attributes:
        positions: [n, 3] Å.
        numbers: [n] atomic numbers.
        cell: [3, 3] Å, rows are lattice vectors (may be non-zero for a
            non-periodic frame; it is then ignored).
        pbc: [3] periodic directions.
        energy: total energy, eV (absolute, as labelled), or None.
        forces: [n, 3] eV/Å, or None.
        stress: [3, 3] eV/Å³ in ASE's sign convention, or None.
        charge: total charge, e.
        spin: spin multiplicity.
        fidelity: index of the level of theory in the model's ``fidelities`` (set by
            `assign_fidelities`; 0 for a single-fidelity model).
        fidelity_tag: the frame's own level-of-theory tag, ``atoms.info[keys.fidelity]``
            (a name or an index), or None.
        repeat: times the frame is drawn per training epoch (its data source's ``repeat``).
        magmoms: [n] magnitudes of per-atom magnetic moments, μ_B, or None.
        config_type: ``atoms.info["config_type"]`` (e.g. MACE's ``IsolatedAtom``), or None.
        source: ``file@frame`` for error messages.
    """

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: Optional[float] = None
    forces: Optional[np.ndarray] = None
    stress: Optional[np.ndarray] = None
    charge: float = 0.0
    spin: float = 1.0
    fidelity: int = 0
    fidelity_tag: Optional[str] = None
    repeat: int = 1
    magmoms: Optional[np.ndarray] = None
    config_type: Optional[str] = None
    source: str = ""

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def is_periodic(self) -> bool:
        return bool(np.any(self.pbc))


def frame_from_atoms(atoms, charge_key: str = "total_charge", spin_key: str = "total_spin") -> Frame:
    """An unlabelled `Frame` of ASE atoms, to predict on (total charge and spin from ``atoms.info``)."""
    return Frame(positions=np.asarray(atoms.positions, np.float64), numbers=np.asarray(atoms.numbers),
                 cell=np.asarray(atoms.cell.array, np.float64), pbc=np.asarray(atoms.pbc, bool),
                 charge=float(atoms.info.get(charge_key, 0.0)), spin=float(atoms.info.get(spin_key, 1.0)))


def split_data_spec(spec: str) -> tuple[str, str]:
    """Split ``path@index`` into the path and an ASE index string (``":"`` if absent)."""
    spec = os.fspath(spec)
    if "@" in spec:
        path, index = spec.rsplit("@", 1)
        if not index:
            raise DataError(f"{spec}: empty index after '@' (use e.g. {path}@0:100)")
        return path, index
    return spec, ":"


def read_atoms(spec: str, at_most: Optional[int] = None) -> list:
    """Read the ASE ``Atoms`` objects selected by ``path@index``.

    With ``at_most``, every k-th frame of the selection, k as small as keeps it to at most that
    many; an extended XYZ file then has only those frames parsed (its frames are counted first).
    """
    import ase.io

    path, index = split_data_spec(spec)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (from data source '{spec}')")
    if at_most is not None:
        index = _strided_xyz_index(path, index, at_most) or index
    if path.endswith(".npz"):
        return evenly_strided(read_npz(path, index), at_most)
    try:
        images = ase.io.read(path, index=index)
    except (ValueError, IndexError, KeyError) as error:
        raise DataError(f"{spec}: ASE cannot read this selection: {error}") from error
    except Exception as error:  # ASE raises many kinds for malformed files
        raise DataError(f"{spec}: not a structure file ASE can read ({type(error).__name__}: {error})") from error
    if not isinstance(images, list):
        images = [images]
    if len(images) == 0:
        raise DataError(f"{spec}: the selection '{index}' contains no frames")
    return evenly_strided(images, at_most)


def evenly_strided(images: Sequence, at_most: Optional[int]) -> Sequence:
    """Every k-th of ``images``, k as small as keeps at most ``at_most`` of them."""
    if at_most is not None and at_most < 1:
        raise ValueError(f"at_most must be at least 1, not {at_most}")
    if at_most is None or len(images) <= at_most:
        return images
    return images[::-(-len(images) // at_most)]


def _strided_xyz_index(path: str, index: str, at_most: int) -> Optional[str]:
    """The ASE index of every k-th frame of ``index`` in an (extended) XYZ file, k as small as
    keeps at most ``at_most``, so that ASE parses only those; None where that cannot be worked
    out cheaply (another format, a single-frame index, a backward slice, a malformed file)."""
    from ase.io.formats import string2index

    if not path.endswith((".xyz", ".extxyz")):
        return None
    try:
        selection = string2index(index)
    except ValueError:
        return None
    if not isinstance(selection, slice) or (selection.step or 1) < 0:
        return None
    count = 0
    with open(path, errors="replace") as stream:  # a frame: the atom count, a comment line, one line per atom
        for line in stream:
            if not line.strip():
                continue
            try:
                atoms_in_frame = int(line)
            except ValueError:
                return None
            if sum(1 for _ in itertools.islice(stream, atoms_in_frame + 1)) < atoms_in_frame + 1:
                return None
            count += 1
    frames = range(count)[selection]
    if len(frames) <= at_most:
        return index
    frames = evenly_strided(frames, at_most)
    return f"{frames.start}:{frames.stop}:{frames.step}"


# Energy units of sGDML-style files (``e_unit``) in eV; rMD17 and MD22 are kcal/mol.
_ENERGY_UNITS = {"kcal/mol": 0.0433641043, "kj/mol": 0.0103642688, "ev": 1.0, "hartree": 27.211386246,
                 "ha": 27.211386246}
_NPZ_LAYOUTS = (("nuclear_charges", "coords", "energies", "forces"),  # revised MD17
                ("z", "R", "E", "F"))  # MD22, sGDML


def read_npz(path: str, index: str = ":") -> list:
    """Frames of an rMD17 or MD22/sGDML ``.npz`` as ASE ``Atoms`` with energy and forces in eV.

    The labels become ASE's plain ``energy`` and ``forces`` (calculator results), so the
    default label keys find them (with a notice). Lengths are Å in both layouts.
    """
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io.formats import string2index

    try:
        data = np.load(path, allow_pickle=False)
    except Exception as error:
        raise DataError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from error
    layout = next((names for names in _NPZ_LAYOUTS if all(name in data for name in names[:2])), None)
    if layout is None:
        raise DataError(f"{path}: an .npz needs rMD17 keys (nuclear_charges, coords, energies, forces) or "
                        f"MD22/sGDML keys (z, R, E, F); found {sorted(data.files)}")
    numbers_key, positions_key, energy_key, forces_key = layout
    unit = str(data["e_unit"]) if "e_unit" in data else "kcal/mol"
    if unit.strip().lower() not in _ENERGY_UNITS:
        raise DataError(f"{path}: energy unit e_unit='{unit}' is not one of {sorted(_ENERGY_UNITS)}")
    to_ev = _ENERGY_UNITS[unit.strip().lower()]
    numbers = np.asarray(data[numbers_key]).reshape(-1).astype(int)
    positions = np.asarray(data[positions_key], dtype=np.float64)
    if positions.ndim != 3 or positions.shape[1:] != (len(numbers), 3):
        raise DataError(f"{path}: '{positions_key}' has shape {positions.shape}, expected "
                        f"(frames, {len(numbers)}, 3)")
    energies = np.asarray(data[energy_key], dtype=np.float64).reshape(-1) * to_ev if energy_key in data else None
    forces = np.asarray(data[forces_key], dtype=np.float64) * to_ev if forces_key in data else None
    try:
        selection = string2index(index)
        frames = range(len(positions))[selection] if isinstance(selection, slice) else [range(len(positions))[selection]]
    except (ValueError, IndexError) as error:
        raise DataError(f"{path}@{index}: not a selection of its {len(positions)} frames ({error})") from error
    images = []
    for frame in frames:
        atoms = Atoms(numbers=numbers, positions=positions[frame])
        results = {}
        if energies is not None:
            results["energy"] = float(energies[frame])
        if forces is not None:
            results["forces"] = forces[frame]
        atoms.calc = SinglePointCalculator(atoms, **results)
        images.append(atoms)
    if not images:
        raise DataError(f"{path}@{index}: the selection contains no frames")
    return images


def _calc_results(atoms) -> dict:
    calc = getattr(atoms, "calc", None)
    return dict(getattr(calc, "results", {}) or {}) if calc is not None else {}


def _lookup(atoms, key: str, per_atom: bool):
    """Find a label under ``key`` in info/arrays, then in calculator results.

    ASE's extxyz reader moves plain ``energy``/``forces``/``stress`` into the results
    of a SinglePointCalculator, hence the second place to look.
    """
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    return _calc_results(atoms).get(key)


_NOTICED: set = set()  # (file, configured key) pairs already announced


def _lookup_or_plain(atoms, key: str, plain: str, per_atom: bool, source: str):
    """``key``'s label, or else ASE's plain ``plain`` one, announced once per file."""
    value = _lookup(atoms, key, per_atom)
    if value is None and key != plain:
        value = _lookup(atoms, plain, per_atom)
        path = source.rsplit("@", 1)[0]
        if value is not None and (path, key) not in _NOTICED:
            _NOTICED.add((path, key))
            print(f"notice: {path}: no '{key}' label; using ASE's plain '{plain}' instead", file=sys.stderr)
    return value


def _available_keys(atoms) -> str:
    keys = sorted(set(atoms.info) | set(atoms.arrays) | set(_calc_results(atoms)))
    keys = [k for k in keys if k not in ("numbers", "positions")]
    return ", ".join(keys) if keys else "(none)"


def _as_stress_matrix(value, where: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if value.shape == (3, 3):
        return value
    if value.size == 9:
        return value.reshape(3, 3)
    if value.size == 6:  # Voigt order xx, yy, zz, yz, xz, xy (ASE)
        xx, yy, zz, yz, xz, xy = value.reshape(6)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise DataError(f"{where}: stress must have 6 (Voigt) or 9 values, got shape {value.shape}")


def atoms_to_frame(atoms, keys: LabelKeys, source: str, require_energy: bool = True,
                   require_forces: bool = True) -> Frame:
    """Convert one ASE ``Atoms`` into a `Frame`, checking every label."""
    numbers = np.asarray(atoms.numbers, dtype=np.int64)
    if len(numbers) == 0:
        raise DataError(f"{source}: frame has no atoms")
    bad = np.flatnonzero((numbers <= 0) | (numbers > 118))
    if bad.size:
        raise DataError(f"{source}: atom {bad[0]} has invalid atomic number {numbers[bad[0]]}")
    positions = np.asarray(atoms.positions, dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        atom = int(np.argwhere(~np.isfinite(positions))[0, 0])
        raise DataError(f"{source}: atom {atom} has a non-finite position")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-9:
        raise DataError(f"{source}: periodic frame (pbc={pbc.tolist()}) has a zero-volume cell")
    frame = Frame(positions=positions, numbers=numbers, cell=cell, pbc=pbc, source=source)

    if keys.energy is not None:
        value = _lookup_or_plain(atoms, keys.energy, "energy", False, source)
        if value is None:
            if require_energy:
                raise DataError(f"{source}: no energy under key '{keys.energy}'; keys present: "
                                f"{_available_keys(atoms)} (set data.energy_key)")
        else:
            energy = float(np.asarray(value, dtype=np.float64).reshape(()))
            if not np.isfinite(energy):
                raise DataError(f"{source}: energy '{keys.energy}' is {energy}")
            frame.energy = energy
    if keys.forces is not None:
        value = _lookup_or_plain(atoms, keys.forces, "forces", True, source)
        if value is None:
            if require_forces:
                raise DataError(f"{source}: no forces under key '{keys.forces}'; keys present: "
                                f"{_available_keys(atoms)} (set data.forces_key)")
        else:
            forces = np.asarray(value, dtype=np.float64)
            if forces.shape != positions.shape:
                raise DataError(f"{source}: forces '{keys.forces}' have shape {forces.shape}, "
                                f"expected {positions.shape}")
            if not np.all(np.isfinite(forces)):
                atom = int(np.argwhere(~np.isfinite(forces))[0, 0])
                raise DataError(f"{source}: forces '{keys.forces}' are not finite on atom {atom}")
            frame.forces = forces
    if keys.stress is not None and pbc.all():
        value = _lookup_or_plain(atoms, keys.stress, "stress", False, source)
        if value is not None:
            stress = _as_stress_matrix(value, f"{source}: '{keys.stress}'")
            if not np.all(np.isfinite(stress)):
                raise DataError(f"{source}: stress '{keys.stress}' is not finite")
            frame.stress = stress
    if "config_type" in atoms.info:
        frame.config_type = str(atoms.info["config_type"])
    if keys.charge is not None and keys.charge in atoms.info:
        frame.charge = float(atoms.info[keys.charge])
    if keys.spin is not None and keys.spin in atoms.info:
        frame.spin = float(atoms.info[keys.spin])
    if keys.fidelity is not None and keys.fidelity in atoms.info:
        frame.fidelity_tag = str(atoms.info[keys.fidelity]).strip()
    if keys.magmoms is not None:
        value = _lookup(atoms, keys.magmoms, per_atom=True)
        if value is not None:
            magmoms = np.asarray(value, dtype=np.float64)
            if magmoms.shape == (len(numbers), 3):  # non-collinear: the magnitude, as CHGNet
                magmoms = np.linalg.norm(magmoms, axis=1)
            if magmoms.shape != (len(numbers),):
                raise DataError(f"{source}: magnetic moments '{keys.magmoms}' have shape {magmoms.shape}, "
                                f"expected ({len(numbers)},) or ({len(numbers)}, 3)")
            if not np.all(np.isfinite(magmoms)):
                atom = int(np.flatnonzero(~np.isfinite(magmoms))[0])
                raise DataError(f"{source}: magnetic moment '{keys.magmoms}' is not finite on atom {atom}")
            frame.magmoms = np.abs(magmoms)
    return frame


def read_frames(spec: str, keys: LabelKeys = LabelKeys(), require_energy: bool = True,
                require_forces: bool = True) -> list[Frame]:
    """Read and check every frame of a ``path@index`` data source.

    Raises:
        DataError: file missing or unreadable, empty selection, missing or
            non-finite labels, invalid atomic numbers.
    """
    path, index = split_data_spec(spec)
    images = read_atoms(spec)
    frame_numbers = _frame_numbers(path, index, len(images))
    return [
        atoms_to_frame(atoms, keys, f"{path}@{number}", require_energy, require_forces)
        for atoms, number in zip(images, frame_numbers)
    ]


def _frame_numbers(path: str, index: str, count: int) -> Sequence:
    """Frame numbers in the file for error messages (relative numbers if unknown)."""
    try:
        if ":" in index:
            parts = [int(p) if p else None for p in index.split(":")]
            start = parts[0] or 0
            step = parts[2] if len(parts) > 2 and parts[2] else 1
            if start >= 0 and step > 0:
                return range(start, start + step * count, step)
        else:
            number = int(index)
            if number >= 0:
                return [number]
    except ValueError:
        pass
    return [f"{index}[{i}]" for i in range(count)]


def assign_fidelities(frames: Sequence[Frame], names: Sequence[str], source_fidelity: Optional[str] = None,
                      default: Optional[int] = None, tag_key: Optional[str] = None) -> None:
    """Set each frame's ``fidelity`` index into ``names`` (a multi-fidelity model's levels of theory).

    The level is the source's (``{source: ..., fidelity: NAME}`` in the config), else the
    frame's own tag (a name, or an index into ``names``), else ``default``; with one or no
    name every frame is at index 0 (a single-fidelity model ignores tags).

    Raises:
        DataError: an unknown name or index, or a frame with no level and no default; the
            message names the frame.
    """
    for frame in frames:
        if not names or (len(names) == 1 and source_fidelity is None and frame.fidelity_tag is None):
            frame.fidelity = 0
            continue
        tag = source_fidelity if source_fidelity is not None else frame.fidelity_tag
        if tag is None:
            if default is None:
                hint = (f"tag the frame with atoms.info['{tag_key}']" if tag_key else
                        "set data.fidelity_key to the atoms.info key that tags frames")
                raise DataError(f"{frame.source}: no level of theory for this multi-fidelity model "
                                f"(fidelities {list(names)}): give the data source one "
                                f"({{source: ..., fidelity: NAME}}) or {hint}")
            frame.fidelity = int(default)
        elif tag in names:
            frame.fidelity = list(names).index(tag)
        elif tag.lstrip("-").isdigit() and 0 <= int(tag) < len(names):
            frame.fidelity = int(tag)
        else:
            where = "its data source's fidelity" if source_fidelity is not None else f"atoms.info['{tag_key}']"
            raise DataError(f"{frame.source}: fidelity '{tag}' ({where}) is not one of the model's fidelities "
                            f"{list(names)} (nor an index 0..{max(len(names) - 1, 0)})")
