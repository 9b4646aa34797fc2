"""End to end: `mlip train`, `mlip evaluate`, resume after a kill, the ASE calculator."""

import json
import os

import ase.io
import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from mlip.cli import main

TINY_MODEL = {"backbone": {"num_channels": 4, "max_ell": 2, "correlation": 2, "radial_mlp": [8],
                           "r_max": 3.0}}


def write_config(tmp_path, emt_file, run_name, **training):
    config = {"run_dir": str(tmp_path / run_name), "seed": 3,
              "data": {"train": f"{emt_file}@0:8", "valid": f"{emt_file}@8:12", "test": f"{emt_file}@12:"},
              "model": TINY_MODEL,
              "training": {"max_epochs": 2, "batch_size": 4, "progress_bar": False,
                           "schedule": {"name": "cosine", "warmup_fraction": 0.0}, **training}}
    path = tmp_path / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), config["run_dir"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, emt_file):
    tmp_path = tmp_path_factory.mktemp("train")
    config_path, run_dir = write_config(tmp_path, emt_file, "full")
    assert main(["train", config_path]) == 0
    return run_dir


def test_train_writes_everything_a_user_needs(trained_run):
    for name in ("config.yaml", "model.json", "best.msgpack", "last.msgpack", "metrics.csv",
                 "learning_curve.png", "parity_valid.png", "summary.json"):
        assert os.path.exists(os.path.join(trained_run, name)), name
    summary = json.load(open(os.path.join(trained_run, "summary.json")))
    assert summary["epochs"] == 2 and summary["test"]["n_frames"] == 4
    assert "stress_mae" in summary["test"]
    assert len(open(os.path.join(trained_run, "metrics.csv")).read().strip().splitlines()) == 3


def test_evaluate_cli_writes_json(trained_run, emt_file, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", trained_run, f"{emt_file}@12:", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    for key in ("n_frames", "energy_mae_per_atom", "energy_rmse_per_atom", "forces_mae",
                "forces_rmse", "stress_mae"):
        assert key in metrics
    summary = json.load(open(os.path.join(trained_run, "summary.json")))
    assert metrics["forces_mae"] == pytest.approx(summary["test"]["forces_mae"], rel=1e-6)
    assert os.path.exists(tmp_path / "metrics_parity.png")
    assert "forces MAE" in capsys.readouterr().out

    # The same frames with labels under other names: --energy-key & co., or ASE's plain names.
    frames = ase.io.read(emt_file, "12:")
    renamed, plain = [], []
    for atoms in frames:
        labels = dict(energy=atoms.info.pop("REF_energy"), forces=atoms.arrays.pop("REF_forces"),
                      stress=atoms.info.pop("REF_stress"))
        copy = atoms.copy()
        copy.info.update(dft_energy=labels["energy"], dft_stress=labels["stress"])
        copy.arrays["dft_forces"] = labels["forces"]
        renamed.append(copy)
        copy = atoms.copy()
        copy.calc = SinglePointCalculator(copy, **labels)
        plain.append(copy)
    for name, images, flags in (("renamed", renamed, ["--energy-key", "dft_energy", "--forces-key", "dft_forces",
                                                      "--stress-key", "dft_stress"]),
                                ("plain", plain, [])):
        path = tmp_path / f"{name}.extxyz"
        ase.io.write(path, images)
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", trained_run, str(path), "--json", str(out), *flags]) == 0
        other = json.loads(out.read_text())
        assert other["forces_mae"] == pytest.approx(metrics["forces_mae"], rel=1e-9)
        assert other["stress_mae"] == pytest.approx(metrics["stress_mae"], rel=1e-9)
    assert "using ASE's plain 'energy'" in capsys.readouterr().err


def test_calculator_matches_evaluation_and_compiles_once_per_bucket(trained_run, emt_file):
    from mlip import MLIPCalculator

    calc = MLIPCalculator.from_run(trained_run)
    atoms = ase.io.read(emt_file, 12)
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    assert energy > 900  # absolute labels (EMT + 1000 eV) come back, references included
    assert atoms.get_forces().shape == (4, 3) and atoms.get_stress().shape == (6,)
    # The same structure in a 2x1x1 supercell: extensive energy, same stress.
    double = atoms.repeat((2, 1, 1))
    double.calc = calc
    assert double.get_potential_energy() == pytest.approx(2 * energy, rel=1e-5)
    np.testing.assert_allclose(double.get_stress(), atoms.get_stress(), atol=1e-5)
    # Growing systems: compilations follow the bucket ladder, not the atom count.
    from mlip.calculator import _evaluate

    before = _evaluate._cache_size()
    for n in range(1, 5):
        cluster = bulk("Cu", cubic=True).repeat((n, 1, 1))
        cluster.rattle(0.01, seed=n)
        cluster.calc = calc
        cluster.get_forces()
        cluster.positions += 0.001  # same sizes again: no new compilation
        cluster.get_forces()
    assert _evaluate._cache_size() - before <= 4
    # An element the model never saw is a clear error, not a silent zero.
    from mlip.errors import DataError
    alien = atoms.copy()
    alien[0].symbol = "Ag"
    alien.calc = calc
    with pytest.raises(DataError, match="atom 0 is Ag; this model knows only"):
        alien.get_potential_energy()


class _Killed(Exception):
    pass


def test_killed_and_resumed_run_ends_where_uninterrupted_one_does(trained_run, emt_file, tmp_path,
                                                                    monkeypatch):
    from mlip.training import checkpoint

    config_path, run_dir = write_config(tmp_path, emt_file, "killed")
    real_save = checkpoint.save_pytree

    def save_then_die(path, tree):
        real_save(path, tree)
        if path.endswith("last.msgpack"):
            raise _Killed()  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(checkpoint, "save_pytree", save_then_die)
    with pytest.raises(_Killed):
        main(["train", config_path])
    monkeypatch.setattr(checkpoint, "save_pytree", real_save)
    assert main(["train", "--resume", run_dir]) == 0

    import flax.serialization
    resumed = flax.serialization.msgpack_restore(open(os.path.join(run_dir, "last.msgpack"), "rb").read())
    full = flax.serialization.msgpack_restore(open(os.path.join(trained_run, "last.msgpack"), "rb").read())
    assert int(resumed["epoch"]) == int(full["epoch"]) == 2
    leaves_resumed = jax_leaves(resumed["params"])
    leaves_full = jax_leaves(full["params"])
    for a, b in zip(leaves_resumed, leaves_full):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    rows = open(os.path.join(run_dir, "metrics.csv")).read().strip().splitlines()
    assert len(rows) == 3


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_train_refuses_to_overwrite_and_reports_bad_data(trained_run, emt_file, tmp_path, capsys):
    config_path = os.path.join(trained_run, "config.yaml")
    assert main(["train", config_path]) == 2
    assert "already holds a run" in capsys.readouterr().err
    bad_path, _ = write_config(tmp_path, emt_file, "bad")
    assert main(["train", bad_path, "--set", "data.energy_key=dft_energy"]) == 2
    err = capsys.readouterr().err
    assert "no energy under key 'dft_energy'" in err and "@0" in err and "Traceback" not in err
    assert main(["evaluate", str(tmp_path / "nowhere"), emt_file]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_calculator_neighbour_skin_gives_same_results_with_fewer_rebuilds(trained_run, emt_file):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from mlip import MLIPCalculator

    plain = MLIPCalculator.from_run(trained_run)
    skinned = MLIPCalculator.from_run(trained_run, skin=1.0)
    atoms = ase.io.read(emt_file, 0)
    atoms.calc = skinned
    dynamics = VelocityVerlet(atoms, 2 * units.fs)
    for _ in range(6):
        dynamics.run(1)
        reference = atoms.copy()
        reference.calc = plain
        assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-4)
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-4)
    assert skinned.neighbour_list_builds < plain.neighbour_list_builds


def test_calculator_sees_the_same_system_changes_as_ase(trained_run, emt_file):
    """MLIPCalculator.check_state (exact comparison first) answers as ASE's compare_atoms."""
    from ase.calculators.calculator import compare_atoms

    from mlip import MLIPCalculator

    calculator = MLIPCalculator.from_run(trained_run)
    atoms = ase.io.read(emt_file, 0)
    atoms.positions[0] = 0.0
    atoms.calc = calculator
    atoms.get_potential_energy()

    def moved(atoms):
        atoms.positions[1, 2] += 1e-9

    def strained(atoms):
        atoms.set_cell(atoms.cell.array * 1.001)

    def swapped(atoms):
        atoms.numbers[0] = 79 if atoms.numbers[0] == 29 else 29

    def charged(atoms):
        atoms.set_initial_charges(np.ones(len(atoms)))

    def tiny(atoms):
        atoms.positions[0, 0] = 1e-17  # not identical, but within ASE's tolerance: no change

    def open_boundaries(atoms):
        atoms.pbc = [True, True, False]

    def unchanged(atoms):
        pass

    found = {}
    for change in (unchanged, moved, strained, swapped, charged, tiny, open_boundaries):
        changed = atoms.copy()
        change(changed)
        found[change.__name__] = sorted(calculator.check_state(changed))
        assert found[change.__name__] == sorted(compare_atoms(calculator.atoms, changed))
    assert found == {"unchanged": [], "moved": ["positions"], "strained": ["cell"],
                     "swapped": ["numbers"], "charged": ["initial_charges"], "tiny": [], "open_boundaries": ["pbc"]}


def test_the_train_step_of_a_model_fitted_to_other_data_is_the_same_program(emt_file, tmp_path):
    # Statistics are inputs of the train step, not constants in it (mlip.potential.Potential): an
    # active-learning iteration trained from scratch on more data finds its step in the cache.
    import jax.numpy as jnp

    from mlip.training.config import config_from_dict
    from mlip.training.trainer import Trainer

    trainers = []
    for name, frames in (("few", "@0:8"), ("other", "@4:12")):
        write_config(tmp_path, emt_file, name)
        config = yaml.safe_load(open(tmp_path / f"{name}.yaml"))
        config["data"]["train"] = emt_file + frames
        trainers.append(Trainer(config_from_dict(config)))
    first, second = trainers
    assert first.statistics.scale != second.statistics.scale
    state = first.initial_state()
    graph, _ = next(first.train_batches.batches(None))
    weights = {name: jnp.asarray(value, first.dtype) for name, value in first.loss_weights(0.0).items()}
    arguments = (state["params"], state["opt_state"], state["ema_params"], graph, jnp.asarray(0.01, first.dtype),
                 jnp.asarray(0, first.dtype), weights, jnp.asarray(0.0, first.dtype))
    programs = [trainer._train_step.lower(*arguments, trainer.potential).as_text() for trainer in trainers]
    assert programs[0] == programs[1]
