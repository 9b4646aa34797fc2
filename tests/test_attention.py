"""Attention models: the equivariant transformer's charge and spin, the all-to-all block's
masking, blocking and neighbour fallback, TransIP's measured (not exact) invariance, and all
of them trained from YAML through every entry point.

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


def _energy_derivative(potential, params, atoms, atom, component, h=1e-5):
    """Central finite difference of the energy along one coordinate."""
    energies = []
    for sign in (1, -1):
        moved = atoms.copy()
        moved.positions[atom, component] += sign * h
        energies.append(_apply(potential, params, [_frame(moved)])["energy"][0])
    return (energies[0] - energies[1]) / (2 * h)


def _ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=0)
    return atoms


def test_transformer_charge_and_spin_change_the_energy_and_a_neutral_singlet_adds_nothing(attention="silu"):
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
    structures = [_ethanol(), molecule("H2O")]
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
    assert -_energy_derivative(potential, params, atoms, 2, 1) == pytest.approx(out["forces"][2, 1], rel=1e-6,
                                                                               abs=1e-8)


def _transip(**settings):
    return make_potential([1, 6, 8], backbone_name="transip", **settings)


def test_transip_is_translation_and_permutation_invariant_conservative_and_measurably_not_rotation_invariant():
    potential, params = _transip()
    averaged, _ = _transip(rotation_average=12)  # the same parameters, averaged over 12 turns
    atoms = _ethanol()
    n = len(atoms)
    out = _apply(potential, params, [_frame(atoms)])
    moved = atoms.copy()
    moved.positions += [3.0, -1.0, 2.0]
    order = np.random.default_rng(0).permutation(n)
    shifted, permuted = (_apply(potential, params, [_frame(a)]) for a in (moved, atoms[order]))
    # Alone and in a batch with another molecule (centroids and attention kept per molecule).
    together = _apply(potential, params, [_frame(molecule("H2O")), _frame(atoms)])
    assert together["energy"][1] == pytest.approx(out["energy"][0], rel=1e-10)
    np.testing.assert_allclose(together["forces"][3:3 + n], out["forces"][:n], atol=1e-10)
    assert shifted["energy"][0] == pytest.approx(out["energy"][0], rel=1e-10)
    assert permuted["energy"][0] == pytest.approx(out["energy"][0], rel=1e-10)
    np.testing.assert_allclose(permuted["forces"][:n], out["forces"][:n][order], atol=1e-9)
    assert -_energy_derivative(potential, params, atoms, 4, 2) == pytest.approx(out["forces"][4, 2], rel=1e-6,
                                                                               abs=1e-8)
    # Not invariant by construction: the energy spreads over rotations (untrained: widely),
    # and averaging over fixed rotations narrows the spread.
    spreads = []
    for model, model_params in ((potential, params), (averaged, params)):
        energies = []
        for seed in range(6):
            turned = atoms.copy()
            rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
            turned.positions = atoms.positions @ rotation.T
            energies.append(_apply(model, model_params, [_frame(turned)])["energy"][0])
        spreads.append(np.std(energies))
    assert spreads[0] > 1e-3 and spreads[1] < 0.5 * spreads[0]


def test_transip_with_ewald_message_passing_is_wired_invariant_and_conservative():
    potential, params = _transip(num_layers=1, ewald_message_passing={"aperiodic_spacing": 0.3})
    assert {"ewald_0"} <= set(params["backbone"]["encoder"])
    atoms = _ethanol()
    n = len(atoms)
    out = _apply(potential, params, [_frame(atoms)])
    moved = atoms.copy()
    moved.positions += [3.0, -1.0, 2.0]
    assert _apply(potential, params, [_frame(moved)])["energy"][0] == pytest.approx(out["energy"][0], rel=1e-10)
    together = _apply(potential, params, [_frame(molecule("H2O")), _frame(atoms)])
    np.testing.assert_allclose(together["forces"][3:3 + n], out["forces"][:n], atol=1e-10)
    assert -_energy_derivative(potential, params, atoms, 4, 2) == pytest.approx(out["forces"][4, 2], rel=1e-6,
                                                                               abs=1e-8)
    # The message enters the energy: with its filters zeroed the energy changes.
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf * 0.0 if "filter" in jax.tree_util.keystr(path) else leaf, params)
    assert abs(_apply(potential, zeroed, [_frame(atoms)])["energy"][0] - out["energy"][0]) > 1e-8


def test_transip_equivariance_objective_vanishes_for_the_identity_and_trains_the_map():
    import jax.numpy as jnp

    potential, params = _transip(equivariance_objective=0.5)
    graph = jax.tree.map(jnp.asarray, pack_samples(build_samples([_frame(_ethanol())], potential.cutoff), None,
                                                   None, np.float64))
    identity = jnp.broadcast_to(jnp.eye(3), (graph.n_graph, 3, 3))
    # T(z, I) = z once the map's output layer is zero: the objective is exactly zero.
    zero_map = {**params, "embedding_map": {**params["embedding_map"], "out": jax.tree.map(
        jnp.zeros_like, params["embedding_map"]["out"])}}
    loss_and_grad = jax.jit(jax.value_and_grad(potential.equivariance_loss))
    assert float(loss_and_grad(zero_map, graph, identity)[0]) == 0.0
    from mlip.graph import random_rotations

    turns = random_rotations(jax.random.PRNGKey(0), graph.n_graph, jnp.float64)
    loss, grads = loss_and_grad(params, graph, turns)
    assert float(loss) > 0
    for part in ("embedding_map", "backbone"):
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[part])) > 0, part


def test_transip_refuses_periodic_frames_with_the_frame_named():
    from ase.build import bulk

    from mlip.calculator import MLIPCalculator
    from mlip.errors import DataError

    potential, params = _transip()
    atoms = bulk("C", "diamond", a=3.6)
    atoms.calc = MLIPCalculator(potential, params)
    with pytest.raises(DataError, match="periodic frame.*molecules only"):
        atoms.get_potential_energy()


def test_rotate_graph_turns_positions_cell_and_labels_consistently():
    """An equivariant model's loss is the same on a batch and on the batch turned by rotate_graph."""
    from conftest import emt_frames
    from mlip.data.reader import LabelKeys, atoms_to_frame
    from mlip.graph import random_rotations, rotate_graph
    from mlip.training.config import LossConfig
    from mlip.training.loss import loss_terms

    potential, params = make_potential([29, 79])
    keys = LabelKeys(energy="REF_energy", forces="REF_forces", stress="REF_stress")
    frames = [atoms_to_frame(a, keys, f"emt@{i}") for i, a in enumerate(emt_frames(3))]
    graph = jax.tree.map(jax.numpy.asarray, pack_samples(build_samples(frames, potential.cutoff), None, None,
                                                         np.float64))
    turned = rotate_graph(graph, random_rotations(jax.random.PRNGKey(1), graph.n_graph, np.float64))
    assert np.abs(np.asarray(turned.positions - graph.positions)).max() > 0.1

    @jax.jit
    def terms(g):
        return loss_terms(potential.apply(params, g, True, True), g, LossConfig())

    before, after = terms(graph), terms(turned)
    for name in ("energy", "forces", "stress"):
        assert float(after[name]) == pytest.approx(float(before[name]), rel=1e-9), name


TRAINED_ATTENTION_MODELS = {
    # The equivariant transformer with Ewald message passing, the all-to-all block, LES and a
    # shallow ensemble.
    "transformer": ({"backbone": {"name": "transformer", "num_channels": 8, "num_heads": 2, "num_layers": 1,
                                  "num_rbf": 8, "attention": "softmax", "ewald_message_passing": {}},
                     "all_to_all": TINY_ALL_TO_ALL, "long_range": {"name": "les", "charge_mlp": [4]},
                     "head": {"name": "shallow_ensemble", "members": 2}},
                    {"method": "shallow_ensemble"}, {}),
    # TransIP with rotation augmentation, the equivariance objective, aperiodic Ewald message
    # passing, LES and a mean-variance head, averaged over turns at inference.
    "transip": ({"backbone": {"name": "transip", "num_channels": 8, "num_heads": 2, "head_dim": 4,
                              "num_layers": 1, "num_frequencies": 4, "equivariance_objective": 0.1,
                              "ewald_message_passing": {"aperiodic_spacing": 0.3}},
                 "long_range": {"name": "les", "charge_mlp": [4]}, "head": {"name": "mve"}},
                {"method": "mve"}, {"rotation_augmentation": True}),
}


@pytest.mark.parametrize("name", list(TRAINED_ATTENTION_MODELS))
def test_attention_models_train_from_yaml_and_run_the_calculator_and_md(name, tmp_path):
    """The attention models through the user's entry points: train (an uncertainty method, a
    long-range term) and resume, the calculator with charge and spin, and `mlip md` (evaluation
    runs the calculator's PosteriorPotential path; test_uncertainty_heads covers it)."""
    import yaml

    from mlip.calculator import MLIPCalculator
    from mlip.cli import main

    model, uncertainty, training = TRAINED_ATTENTION_MODELS[name]
    data = os.path.join(os.path.dirname(__file__), "..", "data", "ion_pairs_gfn2.extxyz")
    config = {"run_dir": str(tmp_path / "run"), "seed": 0,
              "data": {"train": f"{data}@0:6", "valid": f"{data}@6:9", "energy_key": "REF_energy",
                       "forces_key": "REF_forces", "charge_key": "total_charge", "spin_key": "total_spin",
                       "e0s": os.path.join(os.path.dirname(data), "long_range_gfn2_e0s.json")},
              "model": model, "uncertainty": uncertainty,
              "training": {"max_epochs": 1, "batch_size": 3, "progress_bar": False, "plots": False, **training}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    assert "forces_mae" in json.load(open(os.path.join(config["run_dir"], "summary.json")))["valid"]
    if name == "transformer":  # a run of the new pieces resumes like any other
        assert main(["train", "--resume", config["run_dir"], "--set", "training.max_epochs=2"]) == 0
        assert json.load(open(os.path.join(config["run_dir"], "summary.json")))["epochs"] == 2
        from mlip.errors import ConfigError

        with pytest.raises(ConfigError, match="rotation averaging applies to transip"):
            MLIPCalculator.from_run(config["run_dir"], rotation_average=4)

    atoms = ase.io.read(data, 0)
    atoms.calc = MLIPCalculator.from_run(config["run_dir"], rotation_average=4 if name == "transip" else None)
    atoms.info["total_charge"] = 0
    neutral = atoms.get_potential_energy()
    assert "energy_std" in atoms.calc.results
    assert atoms.calc.results["charges"].sum() == pytest.approx(0.0, abs=1e-5)
    atoms.info["total_charge"] = 1
    assert atoms.get_potential_energy() != pytest.approx(neutral, abs=1e-6)

    structure = tmp_path / "start.extxyz"
    ase.io.write(structure, ase.io.read(data, 0))
    averaging = ["--rotation-average", "2"] if name == "transip" else []
    # One epoch leaves forces of eV/Å on the hydrogens: a short step keeps 10 steps below the
    # explosion check (1500 K).
    assert main(["md", config["run_dir"], "--structure", str(structure), "--ensemble", "nve", "--timestep", "0.1",
                 "--steps", "10", "--interval", "5", "--trajectory", str(tmp_path / "md.extxyz"), *averaging]) == 0
    assert len(ase.io.read(tmp_path / "md.extxyz", ":")) == 3
