"""Multi-fidelity heads and statistics, picking a fidelity at use, and fine-tuning (init_from, replay)."""

import dataclasses
import json
import os

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from conftest import TINY_BACKBONE, emt_frames
from mlip.data.batching import BatchIterator, build_samples, pack_samples, sizes_for
from mlip.data.reader import LabelKeys, assign_fidelities, atoms_to_frame
from mlip.data.statistics import DatasetStatistics, FidelityStatistics, compute_statistics
from mlip.errors import ConfigError, DataError
from mlip.potential import Potential
from mlip.training.config import ModelConfig, config_from_dict
from mlip.training.loss import loss_terms

LOW = FidelityStatistics("low", {29: -3.0, 79: -2.0}, 0.1, 0.8)
HIGH = FidelityStatistics("high", {29: -5.0, 79: -4.5}, -0.2, 0.5)


def potential_for(numbers=(29, 79), fidelities=(LOW, HIGH), head="energy", embedding=True, seed=0):
    """A tiny multi-fidelity MACE with fixed statistics, and its parameters."""
    from mlip.training.checkpoint import dummy_graph

    statistics = DatasetStatistics.per_fidelity(numbers, 8.0, fidelities)
    config = ModelConfig.model_validate({"backbone": {"name": "mace", **TINY_BACKBONE, "max_ell": 1,
                                                                      "num_interactions": 1}, "dtype": "float64",
                                         "head": {"name": head}, "fidelity_embedding": embedding,
                                         "fidelities": [f.name for f in fidelities]})
    potential = Potential(config, statistics)
    params = jax.jit(potential.init)(jax.random.PRNGKey(seed), dummy_graph(numbers))
    return potential, jax.tree.map(lambda p: p * 1.5, params)


def labelled_frames(n=3, fidelity=0, seed=5):
    frames = [atoms_to_frame(atoms, LabelKeys(), f"emt@{i}") for i, atoms in enumerate(emt_frames(n, seed=seed))]
    for frame in frames:
        frame.fidelity = fidelity
    return frames


def batch_of(frames, potential):
    samples = build_samples(frames, potential.cutoff)
    return pack_samples(samples, sizes_for(samples, len(samples) + 1), potential.statistics.e0_tables(), np.float64)


@pytest.mark.parametrize("head", ["energy", "shallow_ensemble"])
def test_fidelities_differ_and_a_frame_trains_only_its_own_head(head):
    potential, params = potential_for(head=head)
    frames = labelled_frames(2, fidelity=0)
    low_batch = batch_of(frames, potential)
    high_batch = batch_of([dataclasses.replace(f, fidelity=1) for f in frames], potential)
    apply = jax.jit(lambda p, g: potential.apply(p, g, compute_forces=True))
    low, high = apply(params, low_batch), apply(params, high_batch)
    assert float(jnp.max(jnp.abs(low["energy"][:2] - high["energy"][:2]))) > 1e-3
    assert float(jnp.max(jnp.abs(low["forces"] - high["forces"]))) > 1e-6
    # The absolute energies carry each fidelity's own E0.
    numbers = frames[0].numbers
    assert potential.reference_energy(numbers, 0) == pytest.approx(float(np.sum(potential.statistics.e0_tables()[0][numbers])))
    assert potential.reference_energy(numbers, 0) != pytest.approx(potential.reference_energy(numbers, 1))

    def loss(p):
        terms = loss_terms(potential.apply(p, low_batch, compute_forces=True, member_derivatives=False), low_batch,
                           config_from_dict({"data": {"train": "x"}}).loss)
        return terms["energy"] + terms["forces"]

    grads = jax.jit(jax.grad(loss))(params)
    high_head = jax.tree.leaves(grads["head"]["fidelity_high"])
    low_head = jax.tree.leaves(grads["head"]["fidelity_low"])
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in high_head)
    assert max(float(jnp.max(jnp.abs(g))) for g in low_head) > 0.0
    # The fidelity embedding's row of the other level gets no gradient either.
    table = grads["backbone"]["fidelity"]["table"]["embedding"]
    assert float(jnp.max(jnp.abs(table[1]))) == 0.0 and float(jnp.max(jnp.abs(table[0]))) > 0.0


def test_statistics_per_fidelity_and_targets_above_their_own_references():
    frames = labelled_frames(6)
    for k, frame in enumerate(frames):  # a second "code": other absolute energies and stiffer forces
        if k % 2:
            frame.fidelity = 1
            frame.energy = 3.0 * frame.energy - 40.0 * frame.n_atoms
            frame.forces = 1.5 * frame.forces
    samples = build_samples(frames, 3.0)
    given = [{29: -1.0, 79: -2.0}, None]
    statistics = compute_statistics(samples, None, "rms_forces", ("low", "high"), given)
    low, high = statistics.fidelities
    assert statistics.fidelity_names == ("low", "high") and low.e0 == {29: -1.0, 79: -2.0}
    assert high.scale == pytest.approx(1.5 * np.sqrt(np.mean(np.concatenate([f.forces / 1.5 for f in frames[1::2]]) ** 2)))
    assert (statistics.e0, statistics.shift, statistics.scale) == (high.e0, high.shift, high.scale)  # the default
    graph = pack_samples(samples, None, statistics.e0_tables(), np.float64)
    for g, frame in enumerate(frames):
        table = statistics.e0_per_species(frame.fidelity)
        assert graph.targets["energy"][g] == pytest.approx(frame.energy - table[frame.numbers].sum())
    assert DatasetStatistics.from_json(json.loads(json.dumps(statistics.to_json()))) == statistics
    with pytest.raises(DataError, match="lists 'extra' but no training frame"):
        compute_statistics(samples, None, "rms_forces", ("low", "high", "extra"))


def test_bad_fidelity_names_and_missing_tags_are_clear_errors():
    frames = labelled_frames(2)
    frames[0].fidelity_tag = "low"
    with pytest.raises(DataError, match="emt@1: no level of theory"):
        assign_fidelities(frames, ("low", "high"), None, None, "level")
    frames[1].fidelity_tag = "dft"
    with pytest.raises(DataError, match=r"emt@1: fidelity 'dft' \(atoms.info\['level'\]\) is not one of"):
        assign_fidelities(frames, ("low", "high"), None, None, "level")
    frames[0].fidelity_tag, frames[1].fidelity_tag = None, "1"  # an index works too; untagged: the default
    assign_fidelities(frames, ("low", "high"), None, 0, "level")
    assert [f.fidelity for f in frames] == [0, 1]
    assign_fidelities(frames, ("low", "high"), "high")  # the source's fidelity wins over tags
    assert [f.fidelity for f in frames] == [1, 1]
    base = {"data": {"train": [{"source": "a.xyz", "fidelity": "dft"}]}}
    with pytest.raises(ConfigError, match="data.train names fidelity 'dft', but model.fidelities is not set"):
        config_from_dict(base)
    with pytest.raises(ConfigError, match=r"not one of model.fidelities \['low', 'high'\]"):
        config_from_dict({**base, "model": {"fidelities": ["low", "high"]}})
    with pytest.raises(ConfigError, match="distinct"):
        config_from_dict({"data": {"train": "a.xyz"}, "model": {"fidelities": ["low", "low"]}})
    with pytest.raises(ConfigError, match="loss.fidelity_weights names fidelity 'top'"):
        config_from_dict({"data": {"train": "a.xyz"}, "model": {"fidelities": ["low"]},
                          "loss": {"fidelity_weights": {"top": 2.0}}})
    potential, _ = potential_for()
    with pytest.raises(ConfigError, match=r"fidelity 'dft' is not one of this model's fidelities \['low', 'high'\]"):
        potential.with_fidelity("dft")
    assert potential.with_fidelity(None).fidelity == 1  # the default is the last listed


def test_replay_mixes_in_the_configured_fraction_and_repeat_oversamples():
    from mlip.training.finetune import replay_count

    new, old = build_samples(labelled_frames(6), 3.0), build_samples(labelled_frames(10, seed=7), 3.0)
    count = replay_count(len(new), 0.25)
    assert count == 2
    batches = BatchIterator(new, 4, None, np.float64, replay=(old, count))
    assert len(batches) == 2
    epochs = [sorted(i for _, indices in batches.batches(seed) for i in indices) for seed in (1, 2, 3)]
    for indices in epochs:
        assert indices[:6] == list(range(6))  # every new frame once
        assert len(indices) == 8 and all(i >= 6 for i in indices[6:])  # and 2 old ones: 25 %
    assert len({tuple(indices[6:]) for indices in epochs}) > 1  # a fresh draw each epoch
    new[0].frame.repeat = 3  # a data source's `repeat`: oversampled, in every epoch
    batches = BatchIterator(new, 4, None, np.float64)
    indices = sorted(i for _, chosen in batches.batches(1) for i in chosen)
    assert indices == [0, 0, 0, 1, 2, 3, 4, 5] and len(batches) == 2


def test_transplant_keeps_predictions_with_a_new_element_and_a_new_fidelity():
    """A source model of Au at one fidelity; the new model knows Cu (sorted before Au) and a second
    fidelity: on Au at the old fidelity it predicts exactly what the source did."""
    from mlip.training.finetune import transplant

    source, source_params = potential_for(numbers=(79,), fidelities=(FidelityStatistics("low", {79: -2.0}, 0.1, 0.8),))
    target, fresh = potential_for(numbers=(29, 79), fidelities=(LOW, HIGH), seed=1)
    params, counts = transplant(jax.tree.map(np.asarray, fresh), jax.tree.map(np.asarray, source_params), (79,),
                                (29, 79), ("low",), ("low", "high"))
    assert counts["extended"] > 0 and counts["fresh"] > 0 and counts["copied"] > 0
    atoms = emt_frames(1, seed=2)[0]
    atoms.numbers[:] = 79
    frame = atoms_to_frame(atoms, LabelKeys(), "au")
    a = source.apply(source_params, batch_of([frame], source), compute_forces=True)
    b = target.apply(params, batch_of([frame], target), compute_forces=True)
    np.testing.assert_allclose(b["energy"][0], a["energy"][0], rtol=1e-12)
    np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-12)


# ---------------------------------------------------------------- end to end
def _two_fidelity_files(tmp_path):
    high = emt_frames(16)
    low = []
    for atoms in high:  # a cheaper "method": other absolute energies, forces 10 % off
        copy = atoms.copy()
        copy.info["REF_energy"] = 1.02 * atoms.info["REF_energy"] + 5.0
        copy.arrays["REF_forces"] = 1.1 * atoms.arrays["REF_forces"]
        copy.info["level"] = "low"
        low.append(copy)
    ase.io.write(tmp_path / "high.extxyz", high)
    ase.io.write(tmp_path / "low.extxyz", low)
    return str(tmp_path / "low.extxyz"), str(tmp_path / "high.extxyz")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-fidelity run (with a Laplace posterior), and a run fine-tuned from it with a third
    fidelity and replay."""
    from mlip.cli import main

    tmp_path = tmp_path_factory.mktemp("multifidelity")
    low, high = _two_fidelity_files(tmp_path)
    training = {"max_epochs": 1, "batch_size": 4, "progress_bar": False, "plots": False}
    source = {"run_dir": str(tmp_path / "source"), "seed": 1,
              "data": {"train": [f"{low}@0:8", {"source": f"{high}@0:4", "fidelity": "high"}],
                       "valid": [{"source": f"{low}@12:14", "fidelity": "low"}, {"source": f"{high}@12:14",
                                                                                   "fidelity": "high"}],
                       "fidelity_key": "level", "e0s": {"low": {"Cu": 250.0, "Au": 251.0}}},
              "model": {"backbone": {"num_channels": 4, "max_ell": 1, "correlation": 1, "radial_mlp": [8],
                                     "r_max": 3.0, "num_interactions": 1},
                        "fidelities": ["low", "high"], "fidelity_embedding": True},
              "loss": {"fidelity_weights": {"low": 0.5}}, "training": training,
              # Laplace over both heads' last layers; its posterior mean is the trained model.
              "uncertainty": {"method": "laplace", "samples": 4}}
    (tmp_path / "source.yaml").write_text(yaml.safe_dump(source))
    assert main(["train", str(tmp_path / "source.yaml")]) == 0
    finetuned = {"run_dir": str(tmp_path / "finetuned"), "seed": 2,
                 "data": {"train": [{"source": f"{high}@4:10", "fidelity": "top"}],
                          "valid": [{"source": f"{high}@10:12", "fidelity": "top"}], "replay": {"fraction": 0.25}},
                 "model": {"fidelities": ["low", "high", "top"]},
                 "training": {**training, "max_epochs": 2, "init_from": source["run_dir"],
                              "freeze_backbone_fraction": 0.5}}
    (tmp_path / "finetuned.yaml").write_text(yaml.safe_dump(finetuned))
    assert main(["train", str(tmp_path / "finetuned.yaml")]) == 0
    return source["run_dir"], finetuned["run_dir"], low, high


def test_multifidelity_run_records_fidelities_and_each_use_picks_one(runs, capsys):
    from mlip.calculator import MLIPCalculator
    from mlip.cli import main

    source, _, low, high = runs
    metadata = json.load(open(os.path.join(source, "model.json")))
    assert metadata["default_fidelity"] == "high"
    assert [f["name"] for f in metadata["statistics"]["fidelities"]] == ["low", "high"]
    assert metadata["statistics"]["fidelities"][0]["e0"] == {"29": 250.0, "79": 251.0}  # data.e0s per fidelity
    summary = json.load(open(os.path.join(source, "summary.json")))
    assert set(summary["valid"]["by_fidelity"]) == {"low", "high"}
    atoms = ase.io.read(high, index=14)
    energies = {}
    for fidelity in ("low", "high"):
        atoms.calc = MLIPCalculator.from_run(source, fidelity=fidelity)
        energies[fidelity] = atoms.get_potential_energy()
    assert abs(energies["low"] - energies["high"]) > 1.0
    assert MLIPCalculator.from_run(source).potential.fidelity == 1  # the default: the last listed
    assert atoms.calc.results["forces_std"].shape == (len(atoms), 3)  # σ of the Laplace posterior, per level
    # MD at a chosen level: its first frame is the calculator's energy at that level.
    trajectory = os.path.join(source, "md_low.extxyz")
    assert main(["md", source, "--structure", f"{high}@14", "--steps", "4", "--interval", "4", "--block-steps", "4",
                 "--trajectory", trajectory, "--fidelity", "low", "--no-progress"]) == 0
    assert ase.io.read(trajectory, index=0).get_potential_energy() == pytest.approx(energies["low"], abs=1e-4)
    # evaluate: tagged frames (data.fidelity_key 'level') each at their own level, or all at --fidelity.
    assert main(["evaluate", source, f"{low}@12:16", "--json", str(os.path.join(source, "low.json"))]) == 0
    tagged = json.load(open(os.path.join(source, "low.json")))
    assert main(["evaluate", source, f"{low}@12:16", "--fidelity", "low", "--json",
                 str(os.path.join(source, "forced.json"))]) == 0
    forced = json.load(open(os.path.join(source, "forced.json")))
    assert tagged["forces_mae"] == pytest.approx(forced["forces_mae"]) and forced["fidelity"] == "low"
    capsys.readouterr()
    assert main(["evaluate", source, f"{low}@12:16", "--fidelity", "dft"]) == 2
    assert "fidelity 'dft' is not one of this model's fidelities ['low', 'high']" in capsys.readouterr().err


def test_init_from_starts_where_the_source_run_ended_and_records_the_old_task(runs):
    source, finetuned, _, _ = runs
    before = json.load(open(os.path.join(finetuned, "summary.json")))["old_task_valid"]["before"]
    source_valid = json.load(open(os.path.join(source, "summary.json")))["valid"]
    # The old task is the source run's validation set: before the first step the same errors.
    for key in ("energy_mae_per_atom", "forces_mae", "stress_mae"):
        assert before[key] == pytest.approx(source_valid[key], rel=1e-6)
    rows = open(os.path.join(finetuned, "metrics.csv")).read().splitlines()
    assert rows[0].endswith("old_valid_energy_mae_per_atom,old_valid_forces_mae") and len(rows) == 3
    assert all(row.split(",")[-1] != "" for row in rows[1:])
    metadata = json.load(open(os.path.join(finetuned, "model.json")))
    names = [f["name"] for f in metadata["statistics"]["fidelities"]]
    source_statistics = json.load(open(os.path.join(source, "model.json")))["statistics"]
    assert names == ["low", "high", "top"] and metadata["default_fidelity"] == "top"
    assert metadata["statistics"]["fidelities"][:2] == source_statistics["fidelities"]
    assert metadata["model"]["backbone"]["num_channels"] == 4  # the model section came from the source run
