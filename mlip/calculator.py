"""`MLIPCalculator`: a trained mlip model as an ASE calculator.

    from mlip import MLIPCalculator
    atoms.calc = MLIPCalculator.from_run("runs/quickstart")
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

Structures are padded to the bucket ladder of `mlip.data.batching`, so MD on systems
of any size compiles only when a bucket is first seen, not at every new atom or
edge count. Energies are absolute: the per-element references are added in float64.

For a model with uncertainty (e.g. a deep ensemble) energy, forces and stress are the
posterior mean and ``calc.results`` also holds ``energy_std`` (eV), ``forces_std``
([N, 3], eV/Å) and ``stress_std`` (Voigt 6, eV/Å³), recalibrated as stored in the run.

With ``skin > 0`` the neighbour list is built at ``cutoff + skin`` and reused while
no atom has moved more than ``skin / 2`` since it was built (and the cell, pbc and
atoms are unchanged): pairs beyond the cutoff contribute exactly zero (the radial
envelope vanishes there), so results are unchanged and the list is rebuilt rarely.
Between rebuilds the padded graph stays on the device and only positions are copied.
Compiled programs go to mlip's persistent cache (`mlip.compilation_cache`), so a second
script with the same model and system size starts without compiling.

The total charge and spin multiplicity of the structure are read from
``atoms.info[charge_key]`` and ``atoms.info[spin_key]`` (``total_charge``, ``total_spin``
as in the training data; 0 and 1 when absent). A model with a long-range term (LES) also
returns its latent per-atom ``charges`` (e), one with a magnetic-moment head ``magmoms`` (μ_B).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes, equal

from mlip.compilation_cache import enable_compilation_cache
from mlip.data.batching import GraphSample, build_sample, pack_samples, sizes_for
from mlip.data.reader import Frame, frame_from_atoms
from mlip.errors import DataError
from mlip.graph import AtomsGraph
from mlip.potential import on_device


class MLIPCalculator(Calculator):
    """ASE calculator for energy, free_energy, forces, stress, per-atom energies (and σ with uncertainty)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, potential, params, skin: float = 0.0, charge_key: str = "total_charge",
                 spin_key: str = "total_spin", **kwargs):
        super().__init__(**kwargs)
        enable_compilation_cache()
        if skin < 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.skin = float(skin)
        self.charge_key, self.spin_key = charge_key, spin_key
        self.neighbour_list_builds = 0
        self._neighbours: Optional[GraphSample] = None  # the last neighbour-list build
        self._graph: Optional[AtomsGraph] = None  # its padded graph, on the device
        self.potential = potential
        self.params = jax.device_put(params)
        self._known = set(potential.statistics.atomic_numbers)
        from mlip.uq import has_uncertainty

        self.has_uncertainty = has_uncertainty(potential)
        if self.has_uncertainty:
            self.implemented_properties = type(self).implemented_properties + [
                "energy_std", "forces_std", "stress_std"]
        if potential.config.long_range is not None:
            self.implemented_properties = self.implemented_properties + ["charges"]
        if potential.config.magmoms:
            self.implemented_properties = self.implemented_properties + ["magmoms"]
        # On the device once, as the parameters are: each call then passes its statistics as they are.
        self._potential = on_device(potential)
        self._dtype = np.float64 if potential.config.dtype == "float64" else np.float32

    def _graph_for(self, frame: Frame) -> tuple[AtomsGraph, int]:
        """The padded graph of ``frame`` on the device, and its atom count.

        While the atoms have moved less than half the skin since the neighbour list was
        built, the list is still complete: the graph of that build is reused on the
        device and only the new positions go to it, with the call.
        """
        previous = self._neighbours
        if previous is not None and self.skin > 0 and _same_system(previous.frame, frame):
            displacement = np.linalg.norm(frame.positions - previous.frame.positions, axis=1).max()
            if displacement < 0.5 * self.skin:
                positions = np.zeros(self._graph.positions.shape, self._dtype)
                positions[:len(frame.numbers)] = frame.positions
                charge, spin = np.zeros(self._graph.charge.shape, self._dtype), np.ones(self._graph.spin.shape, self._dtype)
                charge[0], spin[0] = frame.charge, frame.spin
                return dataclasses.replace(self._graph, positions=positions, charge=charge, spin=spin), len(frame.numbers)
        sample = build_sample(frame, self.potential.cutoff + self.skin, self.potential.k_cutoff,
                              self.potential.molecules_only)
        self.neighbour_list_builds += 1
        self._neighbours = sample
        self._graph = jax.device_put(pack_samples([sample], sizes_for([sample], 2), None, self._dtype))
        return self._graph, sample.n_atoms

    @classmethod
    def from_run(cls, run_dir: str, which: str = "best", rotation_average: Optional[int] = None,
                 fidelity: Optional[str] = None, **kwargs) -> "MLIPCalculator":
        """Load the best (or ``which="last"``) parameters of a `mlip train` run directory.

        ``rotation_average``: a TransIP model averaged over this many fixed rotations.
        ``fidelity``: for a multi-fidelity model, the level of theory to predict (None: the
        default, the last of ``model.fidelities``, as model.json records)."""
        from mlip.training.checkpoint import load_potential

        potential, params = load_potential(run_dir, which, rotation_average, fidelity)
        return cls(potential, params, **kwargs)

    def check_state(self, atoms, tol=1e-15):
        """ASE's `compare_atoms`, with identical arrays settled by `np.array_equal` first.

        ASE tests every property with `np.isclose`, about 0.1 ms each, on every property
        request (three per MD step); at 9 atoms that was a third of a calculator step.
        Arrays that are not identical still go through ASE's own test, so the answer is
        ASE's.
        """
        if self.atoms is None:
            return all_changes[:]
        old, new = self.atoms, atoms
        checked = set(all_changes) - set(self.ignored_changes)

        def same(a, b):
            return np.array_equal(a, b) or equal(a, b, atol=tol)

        changes = [name for name in ("cell", "pbc")
                   if name in checked and not same(np.asarray(getattr(old, name)), np.asarray(getattr(new, name)))]
        old_arrays, new_arrays = checked & set(old.arrays), checked & set(new.arrays)
        changes += sorted(old_arrays ^ new_arrays)
        changes += [name for name in sorted(old_arrays & new_arrays) if not same(old.arrays[name], new.arrays[name])]
        # ASE does not compare atoms.info; the total charge and spin live there.
        changes += [key for key in (self.charge_key, self.spin_key) if old.info.get(key) != new.info.get(key)]
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if "numbers" in system_changes or "cell" in system_changes or "pbc" in system_changes:
            self._neighbours = None
        atoms = self.atoms
        numbers = np.asarray(atoms.numbers)
        unknown = sorted(set(numbers.tolist()) - self._known)
        if unknown:
            from ase.data import chemical_symbols
            atom = int(np.flatnonzero(numbers == unknown[0])[0])
            raise DataError(f"atom {atom} is {chemical_symbols[unknown[0]]}; this model knows only "
                            f"{[chemical_symbols[z] for z in sorted(self._known)]}")
        pbc = np.asarray(atoms.pbc, bool)
        frame = frame_from_atoms(atoms, self.charge_key, self.spin_key)
        graph, n = self._graph_for(frame)
        want_stress = bool(pbc.all())
        outputs = jax.device_get(_evaluate(self._potential, self.params, graph, want_stress))
        energy = self.potential.reference_energy(numbers) + float(outputs["energy"][0])
        e0 = self.potential.reference_energies(numbers)
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": np.asarray(outputs["forces"][:n], np.float64),
            "energies": e0 + np.asarray(outputs["node_energy"][:n], np.float64),
        }
        for name in ("charges", "magmoms"):
            if name in outputs:
                self.results[name] = np.asarray(outputs[name][:n], np.float64)
        if self.has_uncertainty:
            self.results["energy_std"] = float(outputs["energy_std"][0])
            self.results["forces_std"] = np.asarray(outputs["forces_std"][:n], np.float64)
        if want_stress:
            stress = np.asarray(outputs["stress"][0], np.float64)
            self.results["stress"] = stress.reshape(9)[VOIGT_ORDER]
            if self.has_uncertainty:
                self.results["stress_std"] = np.asarray(outputs["stress_std"][0], np.float64).reshape(9)[VOIGT_ORDER]


VOIGT_ORDER = [0, 4, 8, 5, 2, 1]  # flattened 3x3 -> Voigt xx yy zz yz xz xy


@functools.partial(jax.jit, static_argnums=3)
def _evaluate(potential, params, graph: AtomsGraph, compute_stress: bool) -> dict:
    return potential.apply(params, graph, True, compute_stress)


def _same_system(old: Frame, new: Frame) -> bool:
    return (len(old.numbers) == len(new.numbers) and np.array_equal(old.numbers, new.numbers)
            and np.array_equal(old.pbc, new.pbc) and np.array_equal(old.cell, new.cell))
