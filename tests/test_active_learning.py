"""`mlip active-learn`: the loop end to end on EMT copper, a kill while labelling, failures, early errors."""

import json
import os

import ase.io
import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT

from mlip.active.oracle import Oracle
from mlip.active.selection import edge_of_trust, select_balanced, select_batch
from mlip.errors import ConfigError


def _copper(n, seed, rattle=0.05):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(rattle, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.info["REF_stress"] = atoms.get_stress(voigt=False)
        atoms.calc = None
        frames.append(atoms)
    return frames


def al_config(tmp_path, **changes):
    ase.io.write(tmp_path / "initial.extxyz", _copper(6, 1))
    ase.io.write(tmp_path / "test.extxyz", _copper(3, 2, rattle=0.1))
    ase.io.write(tmp_path / "seeds.extxyz", _copper(2, 3, rattle=0.0))
    config = {
        "al_dir": str(tmp_path / "al"), "seed": 0,
        "training": {"model": {"backbone": {"num_channels": 4, "max_ell": 1, "max_l": 1, "correlation": 2,
                                            "num_interactions": 1, "radial_mlp": [8], "r_max": 3.0}},
                     "uncertainty": {"method": "deep_ensemble", "members": 2},
                     "data": {"valid_fraction": 0.34},
                     "training": {"max_epochs": 2, "batch_size": 4, "plots": False}},
        "initial": str(tmp_path / "initial.extxyz"), "seeds": str(tmp_path / "seeds.extxyz"),
        "test": str(tmp_path / "test.extxyz"),
        "oracle": {"calculator": "oracles.CountingEMT", "kwargs": {"log": str(tmp_path / "oracle.log")},
                   "workers": 2, "timeout_s": 60},
        # 2 seeds x 2 temperatures; σ_stop so small that every trajectory stops at its first check;
        # the trajectories move on the uncertainty-biased energy (E − σ_E)
        "exploration": {"temperatures": [300, 900], "steps": 20, "check_every": 5, "timestep_fs": 2.0,
                        "sigma_stop": 1e-9, "uncertainty_bias": 1.0},
        # A window in units of the labelled structures' median σ, which takes in every snapshot.
        "selection": {"batch_size": 3, "sigma_low": 0.0, "sigma_high": 1e6, "thresholds": "relative",
                      "score": "mean_atom"},
        "budget": {"max_labels": 5, "max_iterations": 2}, "finetune_epochs": 1}
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "al.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), config


def oracle_calls(tmp_path) -> list:
    path = tmp_path / "oracle.log"
    return path.read_text().split() if path.exists() else []


def test_two_iterations_with_a_kill_while_labelling_a_failure_and_resume(tmp_path, monkeypatch, capsys):
    from mlip.active import ActiveLearner, UncertaintyScorer  # the public Python API (issue 18)
    from mlip.cli import main

    class CountingScorer(UncertaintyScorer):  # a user's own ranking, through the scorer_class hook
        scored = 0

        def score_many(self, structures):
            CountingScorer.scored += len(structures)
            return super().score_many(structures)

    class ScriptedLearner(ActiveLearner):
        scorer_class = CountingScorer

    path, config = al_config(tmp_path, oracle={"kwargs": {"log": str(tmp_path / "oracle.log"),
                                                          "fail_ids": ["001-0001"]}}, final_from_scratch=True)
    # Kill the run after the first label of iteration 1's round (as Ctrl-C or a lost node would).
    original = Oracle.label

    def label_then_die(self, structures, on_result=None):
        if structures and structures[0].info["candidate_id"].startswith("001"):
            original(self, structures[:1], on_result)
            raise KeyboardInterrupt
        return original(self, structures, on_result)

    monkeypatch.setattr(Oracle, "label", label_then_die)
    with pytest.raises(KeyboardInterrupt):
        ScriptedLearner.from_file(path).run()
    assert CountingScorer.scored > 0
    al_dir = config["al_dir"]
    state = json.load(open(os.path.join(al_dir, "state.json")))
    assert (state["iteration"], state["phase"]) == (1, "label")
    assert len(oracle_calls(tmp_path)) == 4  # three in iteration 0, one before the kill
    monkeypatch.setattr(Oracle, "label", original)
    assert main(["active-learn", path]) == 2  # the directory holds a run: resume it, do not restart
    err = capsys.readouterr().err
    assert "--resume" in err and "[iteration 1] exploring: 4 trajectories of 4 atoms" in err  # a line per phase
    assert main(["active-learn", "--resume", al_dir]) == 0

    # Budget 5: 3 labels in iteration 0, then 2 of iteration 1's 2 candidates, one of which failed.
    labels = sorted(os.listdir(os.path.join(al_dir, "labels")))
    failed = [json.loads(line) for line in open(os.path.join(al_dir, "failed.jsonl"))]
    assert [record["id"] for record in failed] == ["001-0001"] and "fail_ids" in failed[0]["error"]
    calls = oracle_calls(tmp_path)
    assert len(calls) == len(labels) == 4 and len(set(calls)) == len(calls)  # no label bought twice
    labelled = ase.io.read(os.path.join(al_dir, "labelled.extxyz"), ":")
    assert len(labelled) == 4 and all(a.info["oracle"].startswith("CountingEMT") for a in labelled)
    assert sorted(a.info["al_iteration"] for a in labelled) == [0, 0, 0, 1]
    # The threshold stopped every trajectory at its first check: one snapshot each.
    explored = ase.io.read(os.path.join(al_dir, "iter_000", "explored.extxyz"), ":")
    assert len(explored) == 4 and {a.info["md_step"] for a in explored} == {5}
    rows = list(__import__("csv").DictReader(open(os.path.join(al_dir, "report.csv"))))
    assert [(r["iteration"], int(r["labels_total"])) for r in rows] == [("0", 6), ("1", 9), ("2", 10),
                                                                          ("final", 10)]
    assert all(float(r["test_forces_mae"]) > 0 for r in rows)
    # The final model: every label, from scratch, for the training config's own epochs.
    final = yaml.safe_load(open(os.path.join(al_dir, "final", "run", "config.yaml")))
    assert final["training"]["init_from"] is None and final["training"]["max_epochs"] == 2
    assert len(final["data"]["train"]) == 2 and final["data"]["train"][1]["source"].endswith("labelled.extxyz")
    assert os.path.exists(os.path.join(al_dir, "learning_curve.png"))
    # Iteration 1 fine-tuned iteration 0's model.
    run1 = yaml.safe_load(open(os.path.join(al_dir, "iter_001", "run", "config.yaml")))
    assert run1["training"]["init_from"].endswith(os.path.join("iter_000", "run"))
    assert run1["training"]["max_epochs"] == 1  # finetune_epochs; iteration 0 trains for max_epochs
    run0 = yaml.safe_load(open(os.path.join(al_dir, "iter_000", "run", "config.yaml")))
    assert run0["training"]["max_epochs"] == 2

    # A larger budget continues the finished run (iteration 2's exploration, 3 more labels, iteration 3);
    # nothing but the budget can change, and a budget the run has spent is said to be spent.
    capsys.readouterr()
    assert main(["active-learn", "--resume", al_dir, "--set", "seed=3"]) == 2
    assert "only budget.max_labels and budget.max_iterations" in capsys.readouterr().err
    assert main(["active-learn", "--resume", al_dir, "--set", "budget.max_labels=5"]) == 2
    assert "would stop it again (2 iterations done)" in capsys.readouterr().err
    assert main(["active-learn", "--resume", al_dir, "--set", "budget.max_labels=7",
                 "--set", "budget.max_iterations=3"]) == 0
    calls = oracle_calls(tmp_path)
    assert len(calls) == len(os.listdir(os.path.join(al_dir, "labels"))) == 7 and len(set(calls)) == 7
    rows = list(__import__("csv").DictReader(open(os.path.join(al_dir, "report.csv"))))
    assert [(r["iteration"], int(r["labels_total"])) for r in rows] == [("0", 6), ("1", 9), ("2", 10), ("3", 13),
                                                                          ("final", 13)]
    assert os.path.exists(os.path.join(al_dir, "final_10", "run", "summary.json"))  # the first final model, kept
    assert yaml.safe_load(open(os.path.join(al_dir, "config.yaml")))["budget"] == {"max_labels": 7,
                                                                                     "max_iterations": 3}


def test_a_bad_oracle_is_a_clear_error_before_anything_runs(tmp_path):
    from mlip.active.learner import ActiveLearner

    path, config = al_config(tmp_path, oracle={"calculator": "ase.calculators.nowhere.Nothing"})
    with pytest.raises(ConfigError, match="oracle.calculator 'ase.calculators.nowhere.Nothing': cannot import"):
        ActiveLearner.from_file(path)
    path, _ = al_config(tmp_path, oracle={"calculator": "oracles.CountingEMT", "kwargs": {"wrong": 1}})
    with pytest.raises(ConfigError, match="oracle.kwargs"):
        ActiveLearner.from_file(path)
    path, _ = al_config(tmp_path, training={"uncertainty": {"method": "none"}})
    with pytest.raises(ConfigError, match="needs a model that reports its uncertainty"):
        ActiveLearner.from_file(path)
    path, _ = al_config(tmp_path, training={"uncertainty": {"method": "mve"}})  # the config biases the MD
    with pytest.raises(ConfigError, match="exploration.uncertainty_bias: need the spread of several models"):
        ActiveLearner.from_file(path)
    assert not os.path.exists(config["al_dir"])


def test_seeds_from_several_files_in_order(tmp_path):
    from mlip.active.learner import ActiveLearner

    path, _ = al_config(tmp_path, seeds=[str(tmp_path / "seeds.extxyz@0:1"), str(tmp_path / "test.extxyz@0:2")])
    seeds = ActiveLearner.from_file(path).seeds
    assert [len(atoms) for atoms in seeds] == [len(atoms) for atoms in
                                               ase.io.read(tmp_path / "seeds.extxyz", "0:1") + ase.io.read(
                                                   tmp_path / "test.extxyz", "0:2")]
    assert np.allclose(seeds[1].positions, ase.io.read(tmp_path / "test.extxyz", 0).positions)


def test_a_larger_budget_does_not_reopen_a_run_that_found_nothing_uncertain(tmp_path):
    from mlip.active.learner import ActiveLearner

    path, config = al_config(tmp_path)
    os.makedirs(config["al_dir"])
    with open(path) as source, open(os.path.join(config["al_dir"], "config.yaml"), "w") as target:
        target.write(source.read())
    state = {"iteration": 1, "phase": "done", "stop_reason": "no explored structure is uncertain", "rows": []}
    with open(os.path.join(config["al_dir"], "state.json"), "w") as stream:
        json.dump(state, stream)
    with pytest.raises(ConfigError, match="a larger budget does not change that"):
        ActiveLearner.resume(config["al_dir"], ["budget.max_labels=50"])


def test_selection_takes_uncertain_and_spread_out_structures():
    features = np.array([[0.0, 0.0], [0.01, 0.0], [5.0, 5.0], [0.02, 0.01], [9.0, 0.0]])
    scores = np.array([0.9, 0.85, 0.5, 0.8, 2.0])  # the last is above σ_high: unphysical
    assert select_batch(scores, features, 2, 0.1, 1.0, diversity=False) == [0, 1]
    assert select_batch(scores, features, 2, 0.1, 1.0) == [0, 2]  # not the near-duplicate of 0
    known = np.array([[0.0, 0.0]])  # 0 and its neighbours are already labelled
    assert select_batch(scores, features, 1, 0.1, 1.0, known) == [2]
    assert select_batch(scores, features, 3, 0.95, 1.0) == []
    # Nothing trusted: the least uncertain above σ_high, not two steps of one trajectory.
    features = np.array([[0.0, 0.0], [0.01, 0.0], [5.0, 5.0], [0.02, 0.0], [9.0, 9.0]])
    scores = np.array([1.1, 1.2, 1.3, 1.25, 9.0])  # the 2·count least uncertain: 0, 1, 3, 2
    assert select_batch(scores, features, 2, 0.1, 1.0) == []
    assert edge_of_trust(scores, features, 2, 1.0) == [0, 2]
    assert edge_of_trust(scores, features, 2, 1.0, diversity=False) == [0, 1]
    assert edge_of_trust(scores, features, 2, 10.0) == []


def test_balanced_selection_shares_the_batch_among_temperatures():
    # The hot trajectory's snapshots are all more uncertain than the cold one's.
    temperatures = [300, 300, 300, 1200, 1200, 1200, 1200]
    features = np.array([[0.0, 0.0], [3.0, 0.0], [6.0, 0.0], [0.0, 9.0], [3.0, 9.0], [6.0, 9.0], [9.0, 9.0]])
    scores = np.array([0.2, 0.3, 0.25, 0.9, 0.8, 0.95, 0.85])
    assert all(temperatures[i] == 1200 for i in select_batch(scores, features, 4, 0.1, 1.0, diversity=False))
    picked = select_balanced(temperatures, scores, features, 4, 0.1, 1.0)
    assert sorted(temperatures[i] for i in picked) == [300, 300, 1200, 1200] and len(set(picked)) == 4
    # A temperature with too few candidates passes its share on; the window still applies.
    picked = select_balanced(temperatures, scores, features, 4, 0.22, 1.0)
    assert sorted(temperatures[i] for i in picked) == [300, 300, 1200, 1200]
    picked = select_balanced(temperatures, scores, features, 4, 0.26, 1.0)
    assert sorted(temperatures[i] for i in picked) == [300, 1200, 1200, 1200]
    assert sorted(select_balanced(temperatures, scores, features, 9, 0.1, 1.0)) == list(range(7))
    assert select_balanced(temperatures, scores, features, 3, 0.1, 1.0,
                           known_features=features[[0]]) == [2, 1, 5]  # spread out from the known one


def test_bond_check_finds_a_broken_molecule_and_not_a_hot_one():
    from ase.build import molecule

    from mlip.active.bonds import BondCheck

    butane = molecule("trans-butane")
    check = BondCheck(butane, 1.5)
    assert len(check.first) == 13  # 3 C-C and 10 C-H
    hot = butane.copy()
    hot.rattle(0.1, seed=0)  # vibrating, not broken
    assert check.broken(hot) == []
    carbons = [i for i, z in enumerate(butane.numbers) if z == 6]
    pulled = butane.copy()
    pulled.positions[carbons[0]] += [3.0, 0.0, 0.0]  # the end carbon torn off (with its hydrogens left)
    broken = check.broken(pulled)
    assert broken and all(carbons[0] in bond[:2] for bond in broken)
    # Periodic cells: a bond across the boundary is measured to the nearest image.
    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    check = BondCheck(copper, 1.5)
    assert len(check.first) > 0
    shifted = copper.copy()
    shifted.positions[0] += copper.cell[0]  # the same structure, one atom written in the next cell
    assert check.broken(shifted) == []


def test_scores_energy_spread_over_root_n_after_each_members_offsets_and_force_sigma_per_atom():
    import jax

    from conftest import emt_frames, make_potential
    from mlip.active.learner import UncertaintyScorer
    from mlip.training.evaluation import Predictor
    from mlip.uq import PosteriorPotential, stack_samples
    from mlip.uq.bias import fit_member_offsets

    potential, params = make_potential((29, 79))
    rng = np.random.default_rng(4)
    stack = stack_samples([jax.tree.map(lambda leaf: np.asarray(leaf) * (1.0 + 0.3 * rng.normal(size=leaf.shape)),
                                        params) for _ in range(3)])
    posterior = PosteriorPotential(potential, "deep_ensemble", ddof=1)
    known, other = emt_frames(4, seed=9), emt_frames(3, seed=5)
    for atoms in known + other:
        atoms.calc = None
    # No offsets: the posterior's own energy σ over √N.
    plain = UncertaintyScorer(posterior, stack, "energy", np.zeros((3, 119))).score_many(other)
    from mlip.data.batching import build_sample
    from mlip.data.reader import frame_from_atoms

    predictions = Predictor(posterior, compute_stress=False).predict(
        stack, [build_sample(frame_from_atoms(atoms), potential.cutoff) for atoms in other])
    expected = [float(np.squeeze(p["energy_std"])) / np.sqrt(len(a)) for p, a in zip(predictions, other)]
    np.testing.assert_allclose([score for score, _ in plain], expected, rtol=1e-8)
    # Offsets fitted on the known cells take the members' constant disagreement out there.
    offsets = fit_member_offsets(posterior, stack, known)
    fitted = UncertaintyScorer(posterior, stack, "energy", offsets)
    before = [score for score, _ in UncertaintyScorer(posterior, stack, "energy", np.zeros((3, 119))).score_many(known)]
    after = [score for score, _ in fitted.score_many(known)]
    assert np.median(after) < 0.5 * np.median(before)
    # The force scores reduce the same per-atom σ: the sum is the mean times the atoms.
    per_atom = [np.linalg.norm(p["forces_std"], axis=1) for p in predictions]
    for score, reduce in (("max_atom", np.max), ("mean_atom", np.mean), ("sum_atom", np.sum)):
        got = [sigma for sigma, _ in UncertaintyScorer(posterior, stack, score).score_many(other)]
        np.testing.assert_allclose(got, [reduce(sigmas) for sigmas in per_atom], rtol=1e-6)
