"""`ActiveLearner`: the explore–select–label–retrain loop behind `mlip active-learn` (METHODS.md §6.2).

Each iteration k, in ``al_dir/iter_<k>/``:

1. **train** (``run/``): an ordinary `mlip train` run of the configured training config on
   the initial set plus every label bought so far; from iteration 1 on it starts from the
   previous iteration's model (``training.init_from``, for ``finetune_epochs``) unless
   ``finetune: false``. Its validation (and the optional held-out test) errors go to the
   report.
2. **explore** (``explored.extxyz``): MD with the model's mean forces from every seed at
   every temperature; every ``check_every`` steps the snapshot's σ score (the largest or
   the mean force σ over its atoms, ``selection.score``) is evaluated, and a trajectory
   stops once σ passes ``sigma_stop``, the MD becomes unstable, or (with
   ``exploration.max_bond_stretch``) a bond of the seed breaks (`mlip.active.bonds`).
3. **select** (``candidates.extxyz``): σ_low < σ <= σ_high, farthest-point sampling on
   the model's features (`mlip.active.selection`), at most the batch size and what is
   left of the label budget. With ``selection.thresholds: relative`` the window is in
   units of the median σ of the labelled structures under this iteration's model. When
   every snapshot is above σ_high, the least uncertain of them (``when_none_trusted:
   edge``). No snapshot above σ_low: the loop has converged and stops.
4. **label**: the oracle's worker processes label the candidates; every label is written
   at once, atomically, as its own file ``labels/<id>.extxyz`` (REF_energy, REF_forces,
   REF_stress, and the iteration and the oracle in ``atoms.info``); a failure goes to
   ``failed.jsonl`` with its error and is skipped. Then ``labelled.extxyz`` is rebuilt
   from the label files, and the next iteration trains on it.

Nothing is lost: ``state.json`` (written atomically) holds the iteration and phase;
``mlip active-learn --resume AL_DIR`` goes on from there: a killed training run resumes
from its last epoch, and a killed labelling round labels only the candidates that have
neither a label file nor a failure record, so no label is bought twice; with ``--set
budget.max_labels=N`` (or ``max_iterations``) a run that stopped on its budget continues. The loop stops
on the label budget, the iteration count, or when no explored structure is uncertain; with
``final_from_scratch`` it then trains the final model on every label from scratch
(``final/run``, the report's row ``final``), which a warm-start chain's noise does not reach.
``report.csv`` has one row per iteration (labels, errors, exploration σ, seconds per
phase) and ``learning_curve.png`` the test (else validation) force error against labels.
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import os
import sys
import time
from typing import Any, Optional

import numpy as np
import yaml

from mlip.active.config import ActiveLearningConfig, load_active_learning_config
from mlip.active.oracle import LabelResult, Oracle, labelled_atoms
from mlip.active.selection import candidate_mask, edge_of_trust, select_balanced, select_batch
from mlip.errors import ConfigError, DataError
from mlip.training.checkpoint import atomic_write_text, read_json, write_json
from mlip.training.config import config_from_dict, source_list

REPORT_COLUMNS = ["iteration", "labels_total", "labels_bought", "labels_failed", "valid_forces_mae",
                  "test_forces_mae", "test_energy_mae_per_atom", "explored", "uncertain_fraction", "sigma_median",
                  "sigma_max", "sigma_low", "sigma_high", "selected_from", "train_s", "explore_s", "label_s"]
# Trajectories of seeds of unlike sizes in one program (padded) or one per size: on a CPU the
# padding's work outweighed the compilations saved (the cuau-surfaces exploration, seeds of 32 to
# 13 atoms: 139 s in one program against 106 s by size, scripts/benchmark_replicas.py --mixed).
# A GPU, where compilations cost more and padding less, is not measured yet.
EXPLORATION_MAX_PADDING = 1.0
FINAL = "final"  # the iteration name of the final model's training (final_from_scratch)
NOTHING_UNCERTAIN = "no explored structure"  # how a stop for want of candidates reads


class ActiveLearner:
    """The active-learning loop of one ``al_dir`` (see the module docstring).

    ``scorer_class`` makes each iteration's scorer from (posterior, parameters, score, offsets); a
    subclass may set its own (a `UncertaintyScorer` subclass) to rank snapshots by another measure.
    """

    scorer_class: type = None  # UncertaintyScorer, set below its definition

    def __init__(self, config: ActiveLearningConfig, config_dir: str = "."):
        self.config = config
        self.dir = config.al_dir
        self.training_tree = self._training_tree(config.training, config_dir)
        self.oracle = Oracle(config.oracle.calculator, config.oracle.kwargs, config.oracle.workers,
                             config.oracle.timeout_s)
        self.seeds = _read_seeds(config.seeds)

    @classmethod
    def from_file(cls, path: str, overrides=()) -> "ActiveLearner":
        return cls(load_active_learning_config(path, overrides), os.path.dirname(os.path.abspath(path)))

    @classmethod
    def resume(cls, al_dir: str, overrides=()) -> "ActiveLearner":
        """The run in ``al_dir``, to continue where it stopped. ``overrides`` (``budget.KEY=VALUE``) raise
        its budget: a run that stopped on its budget goes on from its last model's exploration. Nothing
        else can change: what is on disk was made with the rest."""
        path = os.path.join(al_dir, "config.yaml")
        if not os.path.exists(path):
            raise ConfigError(f"{al_dir}: no config.yaml; is this a directory of `mlip active-learn`?")
        for override in overrides:
            key = str(override).partition("=")[0].strip()
            if not key.startswith("budget."):
                raise ConfigError(f"--resume {al_dir}: --set {key} cannot change on a run under way (its labels "
                                  f"and models were made with it); only budget.max_labels and "
                                  f"budget.max_iterations can, to continue it")
        learner = cls.from_file(path, overrides)
        if overrides:
            learner._continue_with_budget()
        return learner

    # ------------------------------------------------------------------ configuration
    def _training_tree(self, training, config_dir: str) -> dict:
        """The training run config as a tree, checked: it validates and its model has uncertainty."""
        if isinstance(training, str):
            path = training if os.path.isabs(training) or os.path.exists(training) else \
                os.path.join(config_dir, training)
            if not os.path.exists(path):
                raise ConfigError(f"training: config file '{training}' not found")
            with open(path) as stream:
                tree = yaml.safe_load(stream) or {}
        else:
            tree = copy.deepcopy(training)
        tree.setdefault("data", {})
        tree["data"]["train"] = _plain_sources(self.config.initial)
        checked = config_from_dict(tree, "training")
        if checked.uncertainty.method == "none":
            raise ConfigError("training: active learning needs a model that reports its uncertainty; set "
                              "uncertainty (e.g. uncertainty: deep_ensemble)")
        # The energy σ (score or MD bias) is the spread of several models' energies; found out
        # here, not after the first training, when the loop would first need it.
        wants_energy_spread = [name for name, wanted in (
            ("exploration.uncertainty_bias", self.config.exploration.uncertainty_bias > 0),
            ("selection.score: energy", self.config.selection.score == "energy")) if wanted]
        if checked.uncertainty.method == "mve" and wants_energy_spread:
            raise ConfigError(f"{' and '.join(wants_energy_spread)}: need the spread of several models' energies, "
                              "and uncertainty.method mve predicts one Gaussian; use an ensemble or a posterior "
                              "(e.g. deep_ensemble, shallow_ensemble, laplace), or the force score without a bias")
        return tree

    def run_config(self, iteration: int) -> dict:
        """The training config of iteration ``iteration`` (``FINAL``: the final model, from scratch)."""
        tree = copy.deepcopy(self.training_tree)
        labelled = os.path.join(self.dir, "labelled.extxyz")
        sources = _plain_sources(self.config.initial)
        if os.path.exists(labelled):
            sources.append({"source": labelled})
        tree["data"]["train"] = sources
        if self.config.test is not None:
            tree["data"]["test"] = _plain_sources(self.config.test)
        tree["run_dir"] = self._run_dir(iteration)
        tree["seed"] = self.config.seed
        training = tree.setdefault("training", {})
        training["progress_bar"] = False
        if iteration != FINAL and iteration > 0 and self.config.finetune:
            training["init_from"] = self._run_dir(iteration - 1)
            if self.config.finetune_epochs is not None:
                training["max_epochs"] = self.config.finetune_epochs
        return tree

    def _run_dir(self, iteration: int) -> str:
        if iteration == FINAL:
            return os.path.join(self.dir, "final", "run")
        return os.path.join(self.dir, f"iter_{iteration:03d}", "run")

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return read_json(os.path.join(self.dir, "state.json")) or {"iteration": 0, "phase": "train", "rows": []}

    def _save(self, state: dict) -> None:
        write_json(os.path.join(self.dir, "state.json"), state)

    def labels_bought(self) -> int:
        folder = os.path.join(self.dir, "labels")
        return len([name for name in os.listdir(folder) if name.endswith(".extxyz")]) if os.path.isdir(folder) else 0

    def failures(self) -> dict:
        """candidate id -> error of every failed label."""
        path = os.path.join(self.dir, "failed.jsonl")
        if not os.path.exists(path):
            return {}
        records = [json.loads(line) for line in open(path) if line.strip()]
        return {record["id"]: record["error"] for record in records}

    def _write_config(self) -> None:
        atomic_write_text(os.path.join(self.dir, "config.yaml"),
                          yaml.safe_dump({**self.config.model_dump(mode="json"), "training": self.training_tree},
                                         sort_keys=False))

    def _continue_with_budget(self) -> None:
        """The raised budget saved; a run that stopped on its budget reopened at its last model's
        exploration (the final model trained then, if any, moved to ``final_<labels>``)."""
        state = self._state()
        if state.get("phase") in ("done", "final"):
            if state["stop_reason"].startswith(NOTHING_UNCERTAIN):
                raise ConfigError(f"{self.dir}: stopped with {state['stop_reason']}; a larger budget does not "
                                  f"change that (its exploration would find the same)")
            reason = self._stop_reason(state["iteration"])
            if reason is not None:
                raise ConfigError(f"{self.dir}: stopped with {state['stop_reason']}; the budget given would stop "
                                  f"it again ({reason}): raise budget.max_labels or budget.max_iterations")
            final = os.path.dirname(self._run_dir(FINAL))
            if os.path.exists(final):
                os.replace(final, f"{final}_{self._labelled_count()}")
            state["rows"] = [row for row in state["rows"] if row["iteration"] != FINAL]
            state.update(phase="explore", seconds={})
            print(f"[iteration {state['iteration']}] the budget raised: continuing after "
                  f"{state.pop('stop_reason')}", file=sys.stderr, flush=True)
            self._save(state)
        self._write_config()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        os.makedirs(self.dir, exist_ok=True)
        if not os.path.exists(os.path.join(self.dir, "config.yaml")):
            self._write_config()
        state = self._state()
        while state["phase"] != "done":
            iteration, phase = state["iteration"], state["phase"]
            timings = state.setdefault("seconds", {})
            start = time.monotonic()
            if phase == "train":
                row = self._train(iteration)
                timings["train_s"] = round(time.monotonic() - start, 1)
                state["row"] = row
                stop = self._stop_reason(iteration)
                state["phase"] = "explore"
                if stop is not None:
                    self._record(state)
                    self._finish(state, stop)
            elif phase == "explore":
                exploration = self._explore_and_select(iteration)
                timings["explore_s"] = round(time.monotonic() - start, 1)
                state["row"].update(exploration)
                if not exploration["selected"]:
                    reason = f"{NOTHING_UNCERTAIN} is uncertain"
                    if exploration["above_sigma_high"]:
                        reason = (f"{NOTHING_UNCERTAIN} between sigma_low and sigma_high: "
                                  f"{exploration['above_sigma_high']} of {exploration['explored']} are above "
                                  f"sigma_high, where the model is not trusted (train longer, raise "
                                  f"selection.sigma_high, or set selection.when_none_trusted: edge)")
                    self._record(state)
                    self._finish(state, reason)
                else:
                    state["phase"] = "label"
            elif phase == "label":
                failed = self._label(iteration)
                timings["label_s"] = round(time.monotonic() - start, 1)
                state["row"]["labels_failed"] = failed
                self._record(state)
                state.update(iteration=iteration + 1, phase="train", seconds={})
            elif phase == "final":
                print(f"[final] {state['stop_reason']}; the final model, from scratch", file=sys.stderr, flush=True)
                state["row"] = self._train(FINAL)
                state["seconds"] = {"train_s": round(time.monotonic() - start, 1)}
                self._record(state)
                state["phase"] = "done"
            self._save(state)
        final = os.path.exists(os.path.join(self._run_dir(FINAL), "summary.json"))
        print(f"active learning stopped: {state['stop_reason']} ({self.labels_bought()} labels bought, "
              f"{len(self.failures())} failed)" + (f"; final model: {self._run_dir(FINAL)}" if final else ""),
              file=sys.stderr, flush=True)
        return state

    def _finish(self, state: dict, reason: str) -> None:
        """The loop has stopped: train the final model first where the config asks for one."""
        wanted = self.config.final_from_scratch and self.config.finetune and state["iteration"] > 0
        state.update(phase="final" if wanted else "done", stop_reason=reason, seconds={})

    def _stop_reason(self, iteration: int) -> Optional[str]:
        if self.labels_bought() >= self.config.budget.max_labels:
            return f"label budget spent ({self.config.budget.max_labels})"
        if iteration >= self.config.budget.max_iterations:
            return f"{self.config.budget.max_iterations} iterations done"
        return None

    def _record(self, state: dict) -> None:
        """Append the iteration's row to the report (once), and redraw the learning curve."""
        row = {**state.get("row", {}), **state.get("seconds", {})}
        rows = [r for r in state["rows"] if r["iteration"] != row.get("iteration")] + [row]
        state["rows"] = rows
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(os.path.join(self.dir, "report.csv"), buffer.getvalue())
        _plot_learning_curve(rows, os.path.join(self.dir, "learning_curve.png"))

    # ------------------------------------------------------------------ phases
    def _train(self, iteration: int) -> dict:
        from mlip.training.trainer import Trainer

        run_dir = self._run_dir(iteration)
        summary_path = os.path.join(run_dir, "summary.json")
        if iteration != FINAL:
            print(f"[iteration {iteration}] train on {self._labelled_count()} structures -> {run_dir}",
                  file=sys.stderr, flush=True)
        if not os.path.exists(summary_path):
            config = config_from_dict(self.run_config(iteration), f"training (iteration {iteration})"
                                      if iteration != FINAL else "training (final model)")
            resume = os.path.exists(os.path.join(run_dir, "last.msgpack"))
            Trainer(config).run(resume=resume)
        summary = read_json(summary_path)
        test = summary.get("test", {})
        return {"iteration": iteration, "labels_total": self._labelled_count(), "labels_bought": self.labels_bought(),
                "valid_forces_mae": summary["valid"].get("forces_mae"), "test_forces_mae": test.get("forces_mae"),
                "test_energy_mae_per_atom": test.get("energy_mae_per_atom")}

    def _labelled_count(self) -> int:
        if not hasattr(self, "_initial_count"):  # the initial set does not change: read it once
            from mlip.data.reader import read_atoms

            self._initial_count = sum(len(read_atoms(entry.source)) for entry in source_list(self.config.initial))
        return self._initial_count + self.labels_bought()

    def _explore_and_select(self, iteration: int) -> dict:
        import ase.io

        from mlip.training.checkpoint import load_potential

        potential, params = load_potential(self._run_dir(iteration))
        selection = self.config.selection
        labelled = self._labelled_structures()
        offsets = None
        if selection.score == "energy" or self.config.exploration.uncertainty_bias > 0:
            from mlip.uq.bias import fit_member_offsets

            # σ_E beyond each member's constant offset on what is labelled (see mlip.uq.bias).
            offsets = fit_member_offsets(potential, params, labelled)
        scorer = self.scorer_class(potential, params, selection.score, offsets)
        relative = selection.thresholds == "relative"
        known_scores, known = self._known(scorer, labelled, with_scores=relative)
        # Relative thresholds: in units of what the labelled structures score under this model.
        unit = float(np.median(known_scores)) if relative else 1.0
        sigma_low, sigma_high = selection.sigma_low * unit, selection.sigma_high * unit
        explored, scores, features = self._explore(potential, params, iteration, scorer, self.config.sigma_stop * unit)
        folder = os.path.dirname(self._run_dir(iteration))
        for atoms, score in zip(explored, scores):
            atoms.info["sigma_score"] = float(score)
        ase.io.write(os.path.join(folder, "explored.extxyz"), explored)
        left = self.config.budget.max_labels - self.labels_bought()
        count = min(selection.batch_size, left)
        source = "window"
        if selection.strategy == "random":  # the baseline: explored snapshots drawn uniformly
            rng = np.random.default_rng(self.config.seed * 7919 + iteration)
            chosen = rng.choice(len(explored), min(count, len(explored)), replace=False).tolist()
            source = "random"
        else:
            if selection.balance == "temperature":
                temperatures = [atoms.info["temperature_K"] for atoms in explored]
                chosen = select_balanced(temperatures, scores, features, count, sigma_low, sigma_high, known,
                                         selection.diversity)
            else:
                chosen = select_batch(scores, features, count, sigma_low, sigma_high, known, selection.diversity)
            if not chosen and selection.when_none_trusted == "edge":
                chosen = edge_of_trust(scores, features, count, sigma_high, known, selection.diversity)
                source = "edge"
        candidates = []
        for rank, index in enumerate(chosen):
            atoms = explored[index].copy()
            atoms.info.update(candidate_id=f"{iteration:03d}-{rank:04d}", al_iteration=iteration)
            candidates.append(atoms)
        write_frames_atomically(os.path.join(folder, "candidates.extxyz"), candidates)
        uncertain = candidate_mask(scores, sigma_low, np.inf)
        print(f"[iteration {iteration}] explored {len(explored)} snapshots, {int(uncertain.sum())} above σ_low "
              f"{sigma_low:.3g}, {int(np.sum(scores > sigma_high))} above σ_high {sigma_high:.3g}; "
              f"{len(candidates)} selected" + (" at the edge of the trusted region" if source == "edge" else ""),
              file=sys.stderr, flush=True)
        return {"explored": len(explored), "selected": len(candidates), "selected_from": source,
                "sigma_low": sigma_low, "sigma_high": sigma_high,
                "above_sigma_high": int(np.sum(np.asarray(scores) > sigma_high)),
                "uncertain_fraction": float(uncertain.mean()) if len(explored) else 0.0,
                "sigma_median": float(np.median(scores)) if len(scores) else None,
                "sigma_max": float(np.max(scores)) if len(scores) else None}

    def _explore(self, potential, params, iteration: int, scorer: "UncertaintyScorer", sigma_stop: float):
        """Snapshots of MD from every seed at every temperature, with their σ score and features.
        With ``exploration.uncertainty_bias`` the MD moves on the biased energy E − τσ_E.

        The trajectories step together (`ReplicaDynamics`: one compiled program for each group of
        `replica_groups`, by seed size unless `EXPLORATION_MAX_PADDING` allows padding); each is the
        run `MolecularDynamics` would make alone with its seed (config seed + 1000·iteration +
        100·seed index + temperature index), whatever the grouping."""
        from mlip.active.bonds import BondCheck
        from mlip.md.replicas import ReplicaDynamics, replica_groups

        exploration = self.config.exploration
        runs = [(seed_index, t_index, temperature) for seed_index in range(len(self.seeds))
                for t_index, temperature in enumerate(exploration.temperatures)]
        groups = [[runs[index] for index in group]
                  for group in replica_groups([len(self.seeds[seed_index]) for seed_index, _, _ in runs],
                                              EXPLORATION_MAX_PADDING)]
        found = []  # (seed index, temperature index, step, snapshot, σ, features)
        moving = potential
        if exploration.uncertainty_bias > 0:
            from mlip.uq.bias import UncertaintyBiasedPotential

            moving = UncertaintyBiasedPotential(potential, exploration.uncertainty_bias, scorer.offsets)
        for number, group in enumerate(groups, 1):
            # A line per group: exploration is the loop's longest silence after training.
            started = time.monotonic()
            print(f"[iteration {iteration}] exploring: {len(group)} trajectories of "
                  f"{len(self.seeds[group[0][0]])} atoms, {exploration.steps} steps (group {number} of {len(groups)})",
                  file=sys.stderr, flush=True)
            md = ReplicaDynamics(moving, params, [self.seeds[seed_index] for seed_index, _, _ in group],
                                 temperatures_K=[temperature for _, _, temperature in group],
                                 seeds=[self.config.seed + 1000 * iteration + 100 * seed_index + t_index
                                        for seed_index, t_index, _ in group],
                                 ensemble=exploration.ensemble, timestep_fs=exploration.timestep_fs,
                                 friction_per_fs=exploration.friction_per_fs, pressure_GPa=exploration.pressure_GPa)
            bonds = [None if exploration.max_bond_stretch is None else
                     BondCheck(self.seeds[seed_index], exploration.max_bond_stretch) for seed_index, _, _ in group]
            for _ in range(exploration.steps // exploration.check_every):
                running = np.flatnonzero(md.live)
                if running.size == 0:
                    break
                md.run(exploration.check_every)
                # Every replica scored, the stopped ones too (their results unused): one batch shape.
                snapshots = [md.atoms(replica) for replica in range(md.count)]
                for snapshot in snapshots:
                    snapshot.calc = None
                scored = scorer.score_many(snapshots)
                for replica in running:
                    seed_index, t_index, temperature = group[replica]
                    if replica in md.stopped:
                        print(f"  seed {seed_index} at {temperature:g} K stopped: {md.stopped[replica]}",
                              file=sys.stderr)
                        continue
                    snapshot = snapshots[replica]
                    broken = bonds[replica].broken(snapshot) if bonds[replica] is not None else []
                    if broken:
                        i, j, length = max(broken, key=lambda bond: bond[2])
                        md.stop(replica, "broken bond")
                        print(f"  seed {seed_index} at {temperature:g} K stopped at step {md.steps_done[replica]}: "
                              f"{len(broken)} bond(s) broken (atoms {i}-{j} at {length:.2f} Å)", file=sys.stderr)
                        continue
                    snapshot.info.update(seed_structure=seed_index, temperature_K=temperature,
                                         md_step=int(md.steps_done[replica]))
                    sigma, feature = scored[replica]
                    found.append((seed_index, t_index, int(md.steps_done[replica]), snapshot, sigma, feature))
                    if sigma > sigma_stop:
                        md.stop(replica, "σ above sigma_stop")  # later snapshots would be unphysical
            print(f"[iteration {iteration}]   group {number}: {len(md.stopped)} of {md.count} trajectories stopped "
                  f"early; {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        found.sort(key=lambda entry: entry[:3])  # trajectory by trajectory, as they were run one at a time
        return ([entry[3] for entry in found], np.asarray([entry[4] for entry in found]),
                np.asarray([entry[5] for entry in found]))

    def _labelled_structures(self) -> list:
        """The initial structures and every label bought so far."""
        import ase.io

        from mlip.data.reader import read_atoms

        structures = []
        for entry in source_list(self.config.initial):
            structures += read_atoms(entry.source)
        labelled = os.path.join(self.dir, "labelled.extxyz")
        if os.path.exists(labelled):
            structures += ase.io.read(labelled, ":")
        return structures

    @staticmethod
    def _known(scorer: "UncertaintyScorer", structures: list,
               with_scores: bool) -> tuple[Optional[np.ndarray], np.ndarray]:
        """Scores (only where asked: they cost a posterior prediction each) and features of the
        labelled ``structures``: what known looks like to this model (the unit of relative
        thresholds; candidates near them count as covered)."""
        if not with_scores:
            return None, np.asarray([scorer.features(atoms) for atoms in structures])
        scored = [scorer(atoms) for atoms in structures]
        return np.asarray([score for score, _ in scored]), np.asarray([feature for _, feature in scored])

    def _label(self, iteration: int) -> int:
        """Label this iteration's candidates that have neither a label nor a failure; the failures."""
        import ase.io

        folder = os.path.dirname(self._run_dir(iteration))
        candidates = ase.io.read(os.path.join(folder, "candidates.extxyz"), ":")
        labels_dir = os.path.join(self.dir, "labels")
        os.makedirs(labels_dir, exist_ok=True)
        failures = self.failures()
        todo = [atoms for atoms in candidates if atoms.info["candidate_id"] not in failures
                and not os.path.exists(os.path.join(labels_dir, f"{atoms.info['candidate_id']}.extxyz"))]
        print(f"[iteration {iteration}] labelling {len(todo)} structures with {self.oracle.name} "
              f"({len(candidates) - len(todo)} done before)", file=sys.stderr, flush=True)

        def store(result: LabelResult) -> None:
            atoms = todo[result.index]
            identifier = atoms.info["candidate_id"]
            if result.ok:
                labelled = labelled_atoms(atoms, result, {"oracle": self.oracle.name, "al_iteration": iteration,
                                                          "label_seconds": round(result.seconds, 3)})
                write_frames_atomically(os.path.join(labels_dir, f"{identifier}.extxyz"), [labelled])
            else:
                _append_line(os.path.join(self.dir, "failed.jsonl"),
                             json.dumps({"id": identifier, "iteration": iteration, "error": result.error}))
                print(f"  label {identifier} failed: {result.error}", file=sys.stderr, flush=True)

        self.oracle.label(todo, on_result=store)
        self._rebuild_labelled_set()
        failures = self.failures()
        return sum(1 for atoms in candidates if atoms.info["candidate_id"] in failures)

    def _rebuild_labelled_set(self) -> None:
        import ase.io

        folder = os.path.join(self.dir, "labels")
        frames = [ase.io.read(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
                  if name.endswith(".extxyz")]
        if frames:
            write_frames_atomically(os.path.join(self.dir, "labelled.extxyz"), frames)


# selection.score over the per-atom force σ. The sum ranks a structure by what its label adds to an
# error averaged over atoms: with the mean, a cluster of 13 atoms outranks a bulk cell of 32 whose
# atoms are nearly as unsure, though the cell's label teaches 2.5 times the forces.
_ATOM_REDUCTIONS = {"max_atom": np.max, "mean_atom": np.mean, "sum_atom": np.sum}


class UncertaintyScorer:
    """The σ score (max, mean or sum over atoms of the force σ, or the energy σ over √N) and mean features of
    single structures. ``offsets``: each member's per-element energy offset (`fit_member_offsets`), taken
    off before the energy σ."""

    def __init__(self, potential, params, score: str = "max_atom", offsets: Optional[np.ndarray] = None):
        import jax

        from mlip.potential import compiled_structure_features
        from mlip.training.evaluation import Predictor

        self.potential, self.params, self.score, self.offsets = potential, params, score, offsets
        if score == "energy":
            if offsets is None:
                raise ValueError("the energy score needs the members' offsets")
            self._member_energies = potential.sample_energies
        self.predictor = Predictor(potential, compute_stress=False)
        # Features of the first posterior sample: a descriptor, not a prediction.
        inner = getattr(potential, "potential", potential)
        self._first = jax.device_put(jax.tree.map(lambda x: x[0], params) if inner is not potential else params)
        # The potential as an argument (see `Potential`): each iteration's model runs the last one's program.
        self._features = functools.partial(compiled_structure_features, inner)
        self._sizes = None  # the padded shape of every batch so far (see `packed`)

    def _sample(self, atoms):
        from mlip.data.batching import build_sample
        from mlip.data.reader import frame_from_atoms

        return build_sample(frame_from_atoms(atoms), self.potential.cutoff, self.potential.k_cutoff,
                            self.potential.molecules_only)

    def features(self, atoms) -> np.ndarray:
        return self.packed([atoms])[2][0]

    def __call__(self, atoms) -> tuple[float, np.ndarray]:
        return self.score_many([atoms])[0]

    def packed(self, structures) -> tuple[list, Any, np.ndarray]:
        """The structures' samples, their packed graph, and their [n, d] features.

        Every call pads to one shape that only grows (`covering`): exploration scores a few
        snapshots at a time, of seeds of several sizes, and each new shape would compile again."""
        from mlip.data.batching import covering, pack_samples, sizes_for

        samples = [self._sample(atoms) for atoms in structures]
        self._sizes = covering(self._sizes, sizes_for(samples, len(samples) + 1, layout="dense"))
        graph = pack_samples(samples, self._sizes, None, np.float64 if self.potential.config.dtype == "float64"
                             else np.float32)
        return samples, graph, np.asarray(self._features(self._first, graph))

    def score_many(self, structures) -> list[tuple[float, np.ndarray]]:
        """(σ score, features) of each structure, predicted together (a batch per call)."""
        if not structures:
            return []
        samples, graph, features = self.packed(structures)
        if self.score == "energy":
            from mlip.uq.bias import offset_free_energy_spread

            # σ_E / √N (METHODS.md §6.1) of the members' energies less their offsets on the labelled data;
            # no forces needed.
            energies = np.asarray(self._member_energies(self.params, graph))[:, :len(structures)]
            spread = offset_free_energy_spread(energies, self.offsets, structures, self.potential.ddof)
            return [(float(spread[index] / np.sqrt(len(atoms))), features[index])
                    for index, atoms in enumerate(structures)]
        predictions = self.predictor.predict(self.params, samples, graph=graph)  # packed once, for both
        if "forces_std" not in predictions[0]:
            raise DataError("active learning needs a model that reports its uncertainty")
        scores = []
        for index, prediction in enumerate(predictions):
            per_atom = np.linalg.norm(prediction["forces_std"], axis=1)
            sigma = float(_ATOM_REDUCTIONS[self.score](per_atom))
            scores.append((sigma, features[index]))
        return scores


ActiveLearner.scorer_class = UncertaintyScorer


def _plain_sources(spec) -> list:
    """Data sources as plain mappings (YAML-safe)."""
    return [entry.model_dump(exclude_defaults=True) for entry in source_list(spec)]


def _read_seeds(spec) -> list:
    """The exploration's seed structures, from one path@index or a list of them, in order."""
    from mlip.data.reader import read_atoms

    return [atoms for entry in source_list(spec) for atoms in read_atoms(entry.source)]


def write_frames_atomically(path: str, frames: list) -> None:
    """``frames`` as extended XYZ at ``path``, all at once: a kill never leaves half a file."""
    import ase.io

    buffer = io.StringIO()
    ase.io.write(buffer, frames, format="extxyz")
    atomic_write_text(path, buffer.getvalue())


def _append_line(path: str, line: str) -> None:
    with open(path, "a") as stream:
        stream.write(line + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def _plot_learning_curve(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "test_forces_mae" if any(r.get("test_forces_mae") is not None for r in rows) else "valid_forces_mae"
    points = [(r["labels_total"], 1e3 * r[key]) for r in rows if r.get(key) is not None and r["iteration"] != FINAL]
    if not points:
        return
    figure, axis = plt.subplots(figsize=(4.5, 3.4))
    axis.plot(*zip(*points), "o-", label="each iteration's model")
    final = [(r["labels_total"], 1e3 * r[key]) for r in rows if r.get(key) is not None and r["iteration"] == FINAL]
    if final:
        axis.plot(*zip(*final), "*", markersize=12, label="final model, from scratch")
        axis.legend(fontsize=7)
    axis.set_xlabel("labelled structures")
    axis.set_ylabel(f"{'test' if key.startswith('test') else 'validation'} force MAE (meV/Å)")
    figure.tight_layout()
    from mlip.training.checkpoint import save_figure

    save_figure(figure, path)
