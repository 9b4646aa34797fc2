"""Attention models: the equivariant transformer's charge and spin, the all-to-all block's
masking, blocking and neighbour fallback, and both trained from YAML through every entry point.

The shared invariance tests (rotation, permutation, finite differences, stress, supercell,
padding, layouts, cutoff) run for every backbone in test_model.py.
"""

import json
import os

import ase.io
import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from conftest import make_potential
from mlip.data.batching import build_samples, pack_samples
from mlip.data.reader import Frame

TINY_ALL_TO_ALL = {"num_heads": 2, "head_dim": 4}


def _frame(atoms, charge=0.0, spin=1.0):
    return Frame(positions=atoms.positions.copy(), numbers=atoms.numbers, cell=atoms.cell.array.copy(),
                 pbc=np.asarray(atoms.pbc), charge=charge, spin=spin)


_COMPILED = {}


def _apply(potential, params, frames):
    graph = pack_samples(build_samples(frames, potential.cutoff), None, None, np.float64)
    if potential not in _COMPILED:  # one jit per potential: same-shaped calls are not traced again
        _COMPILED[potential] = jax.jit(lambda p, g: potential.apply(p, g, True, False))
    return jax.device_get(_COMPILED[potential](params, graph))


def _ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=0)
    return atoms


@pytest.mark.parametrize("attention", ["silu", "softmax"])
def test_transformer_charge_and_spin_change_the_energy_and_a_neutral_singlet_adds_nothing(attention):
    potential, params = make_potential([1, 6, 8], backbone_name="transformer", attention=attention)
    atoms = _ethanol()
    states = [(0.0, 1.0), (1.0, 2.0), (-1.0, 2.0), (0.0, 3.0)]
    out = _apply(potential, params, [_frame(atoms, q, s) for q, s in states])
    energies = out["energy"][:4]
    assert len(set(np.round(energies, 8))) == 4  # every charge/spin state differs
    # The embedding switched off with the other parameters kept: the neutral singlet's model.
    plain, _ = make_potential([1, 6, 8], backbone_name="transformer", attention=attention,
                              charge_spin_embedding=False)
    kept = {**params, "backbone": {k: v for k, v in params["backbone"].items() if k != "charge_spin"}}
    alone = _apply(plain, kept, [_frame(atoms)])
    assert alone["energy"][0] == pytest.approx(energies[0], rel=1e-12)
    np.testing.assert_allclose(alone["forces"][:len(atoms)], out["forces"][:len(atoms)], atol=1e-12)


def test_transformer_atom_without_neighbours_is_finite():
    potential, params = make_potential([1, 8], backbone_name="transformer", attention="softmax")
    out = _apply(potential, params, [_frame(Atoms("OH", positions=[[0, 0, 0], [20.0, 0, 0]]))])
    assert np.isfinite(out["energy"][0]) and np.all(out["forces"][:2] == 0.0)


@pytest.fixture(scope="module")
def all_to_all_model():
    return make_potential([1, 6, 8], all_to_all=TINY_ALL_TO_ALL)


def test_all_to_all_keeps_the_molecules_of_a_batch_apart_and_blocks_queries(all_to_all_model, monkeypatch):
    import mlip.models.all_to_all as all_to_all

    potential, params = all_to_all_model
    structures = [_ethanol(), molecule("H2O"), molecule("CO")]
    alone = [_apply(potential, params, [_frame(a)]) for a in structures]
    # Query blocks of 4 rows (padded to a whole block) give the same as one block.
    monkeypatch.setattr(all_to_all, "QUERY_BLOCK", 4)
    together = _apply(potential, params, [_frame(a) for a in structures])
    offset = 0
    for g, (atoms, single) in enumerate(zip(structures, alone)):
        assert together["energy"][g] == pytest.approx(single["energy"][0], rel=1e-10)
        np.testing.assert_allclose(together["forces"][offset:offset + len(atoms)], single["forces"][:len(atoms)],
                                   atol=1e-10)
        offset += len(atoms)
    # The block sees beyond the cutoff: moving the water 10 Å further from the CO changes the energy.
    far = molecule("H2O") + molecule("CO")
    far.positions[3:] += [6.0, 0, 0]
    farther = far.copy()
    farther.positions[3:] += [10.0, 0, 0]
    energies = [_apply(potential, params, [_frame(a)])["energy"][0] for a in (far, farther)]
    assert abs(energies[0] - energies[1]) > 1e-4


@pytest.mark.filterwarnings("ignore:all-to-all attention over")
def test_all_to_all_beyond_max_atoms_attends_over_neighbours_with_a_warning():
    potential, params = make_potential([1, 6, 8], all_to_all={**TINY_ALL_TO_ALL, "max_atoms": 4})
    atoms = _ethanol()
    with pytest.warns(UserWarning, match="max_atoms"):
        out = _apply(potential, params, [_frame(atoms)])
    n = len(atoms)
    rotation, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T + 1.0
    rotated = _apply(potential, params, [_frame(moved)])
    assert rotated["energy"][0] == pytest.approx(out["energy"][0], rel=1e-10)
    np.testing.assert_allclose(rotated["forces"][:n], out["forces"][:n] @ rotation.T, atol=1e-9)
    h = 1e-5
    plus, minus = atoms.copy(), atoms.copy()
    plus.positions[2, 1] += h
    minus.positions[2, 1] -= h
    derivative = (_apply(potential, params, [_frame(plus)])["energy"][0]
                  - _apply(potential, params, [_frame(minus)])["energy"][0]) / (2 * h)
    assert -derivative == pytest.approx(out["forces"][2, 1], rel=1e-6, abs=1e-8)


def test_transformer_with_all_to_all_les_and_ensemble_trains_from_yaml_and_runs_md(tmp_path):
    """The attention models through the user's entry points: train (an uncertainty method, a
    long-range term), the calculator with charge and spin, and `mlip md` (evaluation runs the
    calculator's PosteriorPotential path; test_uncertainty_heads covers it)."""
    import yaml

    from mlip.calculator import MLIPCalculator
    from mlip.cli import main

    data = os.path.join(os.path.dirname(__file__), "..", "data", "ion_pairs_gfn2.extxyz")
    config = {"run_dir": str(tmp_path / "run"), "seed": 0,
              "data": {"train": f"{data}@0:6", "valid": f"{data}@6:9", "energy_key": "REF_energy",
                       "forces_key": "REF_forces", "charge_key": "total_charge", "spin_key": "total_spin",
                       "e0s": os.path.join(os.path.dirname(data), "long_range_gfn2_e0s.json")},
              "model": {"backbone": {"name": "transformer", "num_channels": 8, "num_heads": 2, "num_layers": 1,
                                     "num_rbf": 8, "attention": "softmax"},
                        "all_to_all": TINY_ALL_TO_ALL, "long_range": {"name": "les", "charge_mlp": [4]},
                        "head": {"name": "shallow_ensemble", "members": 2}},
              "uncertainty": {"method": "shallow_ensemble"},
              "training": {"max_epochs": 1, "batch_size": 3, "progress_bar": False, "plots": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    assert "forces_mae" in json.load(open(os.path.join(config["run_dir"], "summary.json")))["valid"]

    atoms = ase.io.read(data, 0)
    atoms.calc = MLIPCalculator.from_run(config["run_dir"])
    atoms.info["total_charge"] = 0
    neutral = atoms.get_potential_energy()
    assert {"charges", "energy_std"} <= set(atoms.calc.results)
    atoms.info["total_charge"] = 1
    assert atoms.get_potential_energy() != pytest.approx(neutral, abs=1e-6)

    structure = tmp_path / "start.extxyz"
    ase.io.write(structure, ase.io.read(data, 0))
    assert main(["md", config["run_dir"], "--structure", str(structure), "--ensemble", "nve", "--timestep", "0.5",
                 "--steps", "10", "--interval", "5", "--trajectory", str(tmp_path / "md.extxyz")]) == 0
    assert len(ase.io.read(tmp_path / "md.extxyz", ":")) == 3
