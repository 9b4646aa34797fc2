"""Uncertainty methods compared on ethanol: accuracy, calibration, ranking, OOD detection and cost.

Every method trains from its own ``configs/uncertainty_<method>.yaml`` (train 0:400,
valid 400:500 of data/ethanol_gfn2_500K.extxyz) with the same wall-clock budget
(``training.max_time``) and the same model size (``model.backbone.num_channels``), one
method after another, each in its own ``mlip train`` process. Each trained run is then
scored by ``mlip evaluate`` (σ recalibrated as stored in the run's calibration.json) on

  * in-distribution (ID) test frames: 500:1000 of the 500 K trajectory,
  * out-of-distribution (OOD) test frames: data/ethanol_gfn2_1200K.extxyz (200 frames, 1200 K),

and per-structure σ from the ``<stem>_uncertainty.csv`` that evaluate writes give the
AUROC for telling the 1200 K frames (label 1) from the ID test frames (label 0).
Inference cost is timed in a separate process with `mlip.training.evaluation.Predictor`
over the ID frames after one warm-up pass. Results go to docs/benchmark_uncertainty.json,
docs/benchmark_uncertainty.png and the section between ``<!-- uncertainty:begin -->`` and
``<!-- uncertainty:end -->`` of docs/uncertainty.md (``--no-docs``: the out dir only).

    python scripts/benchmark_uncertainty.py                     # 7 methods x 300 s: 1-1.5 h on 2 cores
    python scripts/benchmark_uncertainty.py --methods mve shallow_ensemble --budget-s 30 --channels 4 --no-docs

A method whose config file does not exist is skipped with a message. This is a
benchmark script, never part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

from benchmark_common import cpu_model, replace_marked_section, run_with_budget, versions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("deep_ensemble", "mve", "shallow_ensemble", "swag", "laplace", "sgmcmc", "ivon")
TRAIN_DATA = "data/ethanol_gfn2_500K.extxyz"
ID_TEST = f"{TRAIN_DATA}@500:1000"
OOD_TEST = "data/ethanol_gfn2_1200K.extxyz@:"
DOC = os.path.join(ROOT, "docs", "uncertainty.md")
BEGIN, END = "<!-- uncertainty:begin -->", "<!-- uncertainty:end -->"
# The goals for the best method, judged on the ID test set after recalibration.
GOAL_SPEARMAN, GOAL_MISCALIBRATION = 0.6, 0.05
# Structures timed one at a time (the calculator's and MD's case), after a warm-up call.
SINGLE_STRUCTURE_FRAMES = 50


def config_path(method: str) -> str:
    return os.path.join(ROOT, "configs", f"uncertainty_{method}.yaml")


def subprocess_env() -> dict:
    # No persistent XLA cache: every method pays its compilation inside its budget,
    # whatever ran before on this machine.
    return {**os.environ, "MLIP_COMPILATION_CACHE": "off"}


# ---------------------------------------------------------------- training
def train(method: str, method_dir: str, budget_s: float, channels: int, grace_s: float) -> dict:
    """``mlip train`` of one method in its own process; wall time from process start to exit."""
    run_dir = os.path.join(method_dir, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "mlip.cli", "train", config_path(method),
               "--set", f"run_dir={run_dir}", "--set", f"training.max_time={budget_s}",
               "--set", f"model.backbone.num_channels={channels}", "--set", "training.progress_bar=false"]
    log = os.path.join(method_dir, "train.log")
    # max_time stops the training loop; the grace covers start-up, compilation before the
    # loop, drawing the posterior, recalibration and plots. Past it the run is killed.
    result = run_with_budget(command, budget_s, log, env=subprocess_env(), grace_s=grace_s, cwd=ROOT)
    if result["returncode"] != 0 or not os.path.exists(os.path.join(run_dir, "summary.json")):
        tail = open(log).read().strip().splitlines()[-3:]
        raise RuntimeError(f"mlip train exited with {result['returncode']}"
                           f"{' (killed at budget + grace)' if result['stopped_at_budget'] else ''}: "
                           + " | ".join(tail))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    epochs = int(summary["epochs"])
    return {"run_dir": run_dir, "command": " ".join(command[2:]), "wall_s": result["wall_s"],
            "loop_s": summary["elapsed_s"], "epochs": epochs, "steps": summary.get("steps"),
            "s_per_epoch": round(summary["elapsed_s"] / epochs, 3) if epochs else None,
            "ms_per_step": steady_ms_per_step(os.path.join(run_dir, "metrics.csv")),
            # start-up, compilation outside the loop, posterior, recalibration, plots
            "outside_loop_s": round(result["wall_s"] - summary["elapsed_s"], 1),
            "stop_reason": summary["stop_reason"], "best_epoch": summary.get("best_epoch"),
            "posterior": summary.get("posterior"), "recalibration": summary.get("recalibration")}


def steady_ms_per_step(metrics_csv: str):
    """Training-loop ms per optimizer step after the first epoch, validation included; None below 2 epochs.

    The first epoch holds the compilation of the train step and the last one may be cut
    short by max_time (a few steps, then a full validation), so the rate is taken from the
    end of epoch 1 to the end of the last complete epoch.
    """
    with open(metrics_csv) as stream:
        rows = [(int(row["step"]), float(row["time_s"])) for row in csv.DictReader(stream)]
    if len(rows) < 2:
        return None
    steps_per_epoch = rows[0][0]
    complete = [rows[0]] + [row for previous, row in zip(rows, rows[1:]) if row[0] - previous[0] == steps_per_epoch]
    if len(complete) < 2:
        return None
    (first_step, first_time), (last_step, last_time) = complete[0], complete[-1]
    return round(1000 * (last_time - first_time) / (last_step - first_step), 1)


# ---------------------------------------------------------------- evaluation
def evaluate(run_dir: str, data: str, stem: str) -> tuple[dict, list[dict]]:
    """``mlip evaluate`` metrics (JSON) and its per-structure σ table (CSV rows)."""
    json_path = stem + ".json"
    with open(stem + ".log", "w") as log:
        subprocess.run([sys.executable, "-m", "mlip.cli", "evaluate", run_dir, data, "--json", json_path],
                       check=True, cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    with open(stem + "_uncertainty.csv") as stream:
        rows = list(csv.DictReader(stream))
    return json.load(open(json_path)), rows


SET_METRICS = ("n_frames", "forces_mae", "forces_rmse", "energy_mae_per_atom", "energy_rmse_per_atom",
               "forces_nll", "energy_nll", "forces_miscalibration_area", "energy_miscalibration_area",
               "forces_ence", "energy_ence", "forces_spearman", "energy_spearman",
               "forces_coverage_95", "energy_coverage_95", "forces_rmv", "energy_rmv",
               "forces_interval_miscalibration_area", "energy_interval_miscalibration_area",
               "forces_interval_coverage_95")


def ood_detection(id_rows: list[dict], ood_rows: list[dict]) -> dict:
    """AUROC of per-structure scores, OOD frames (label 1) against ID frames (label 0)."""
    from mlip.uq.calibration import auroc

    return {f"auroc_{column}": auroc([float(row[column]) for row in id_rows],
                                     [float(row[column]) for row in ood_rows])
            for column in ("forces_std_mean", "forces_std_max_atom", "energy_std")}


# ---------------------------------------------------------------- inference cost (worker process)
def inference_worker(run_dir: str, data: str, out_path: str) -> None:
    """Time `Predictor` over ``data`` (after a warm-up pass) and score σ before recalibration.

    Writes ``out_path`` (JSON): ms per structure in batches of ``eval_batch_size`` and one
    at a time, sample and parameter counts, the ID metrics with σ divided by the stored
    scales (before recalibration), and the forces calibration curve after it (for the plot).
    """
    os.chdir(ROOT)
    from mlip.training.checkpoint import read_model_json

    if read_model_json(run_dir)["model"].get("dtype") == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    import jax

    from mlip.data.batching import build_samples
    from mlip.data.reader import read_frames
    from mlip.training.checkpoint import load_potential
    from mlip.training.config import load_config
    from mlip.training.evaluation import Predictor
    from mlip.training.trainer import label_keys
    from mlip.uq.calibration import calibration_curve
    from mlip.uq.evaluation import paired_errors, recalibrate_predictions, uncertainty_metrics
    from mlip.uq.posterior import Recalibration, sample_count

    potential, params = load_potential(run_dir)
    config = load_config(os.path.join(run_dir, "config.yaml"))
    samples = build_samples(read_frames(data, label_keys(config)), potential.cutoff, potential.k_cutoff)
    predictor = Predictor(potential, compute_stress=False)
    batch_size = config.training.eval_batch_size
    predictor.predict(params, samples, batch_size)  # compiles every padded batch shape
    start = time.perf_counter()
    predictions = predictor.predict(params, samples, batch_size)
    batched_s = time.perf_counter() - start
    single = samples[:SINGLE_STRUCTURE_FRAMES]
    predictor.predict(params, single[:1], 1)
    start = time.perf_counter()
    predictor.predict(params, single, 1)
    single_s = time.perf_counter() - start

    scales = potential.recalibration
    unscale = Recalibration(energy=1 / scales.energy, forces=1 / scales.forces, stress=1 / scales.stress)
    raw = uncertainty_metrics(samples, recalibrate_predictions(predictions, unscale))
    errors, sigma = paired_errors(samples, predictions)["forces"]
    expected, observed = calibration_curve(errors, sigma, 21)
    n_stored = int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))
    with open(out_path, "w") as stream:
        json.dump({"ms_per_structure_batched": 1000 * batched_s / len(samples), "batch_size": batch_size,
                   "ms_per_structure_single": 1000 * single_s / len(single), "n_timed_single": len(single),
                   "posterior_samples": potential.prediction_count(params),
                   "parameter_samples": sample_count(params), "n_params_stored": n_stored,
                   "n_params_per_sample": n_stored // sample_count(params),
                   "id_before_recalibration": {key: raw[key] for key in raw if key.startswith(("energy", "forces"))},
                   "forces_calibration_curve": {"expected": expected.tolist(), "observed": observed.tolist()},
                   "backend": jax.default_backend()}, stream, indent=2)


def inference_cost(run_dir: str, method_dir: str) -> dict:
    out_path = os.path.join(method_dir, "inference.json")
    with open(os.path.join(method_dir, "inference.log"), "w") as log:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--inference-worker", run_dir, ID_TEST, out_path],
                       check=True, cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    return json.load(open(out_path))


# ---------------------------------------------------------------- one method
def benchmark_method(method: str, args) -> dict:
    method_dir = os.path.join(args.out_dir, method)
    os.makedirs(method_dir, exist_ok=True)
    print(f"{method}: training for {args.budget_s:.0f} s ...", flush=True)
    training = train(method, method_dir, args.budget_s, args.channels, args.grace_s)
    print(f"{method}: {training['epochs']} epochs in {training['wall_s']} s; evaluating ...", flush=True)
    id_metrics, id_rows = evaluate(training["run_dir"], ID_TEST, os.path.join(method_dir, "id"))
    ood_metrics, ood_rows = evaluate(training["run_dir"], OOD_TEST, os.path.join(method_dir, "ood"))
    inference = inference_cost(training["run_dir"], method_dir)
    curve = inference.pop("forces_calibration_curve")
    return {"config": os.path.relpath(config_path(method), ROOT), "training": training,
            "inference": {key: value for key, value in inference.items() if key != "id_before_recalibration"},
            "posterior_samples": id_metrics.get("posterior_samples"),
            "id": {key: id_metrics.get(key) for key in SET_METRICS},
            "ood": {key: ood_metrics.get(key) for key in SET_METRICS},
            "ood_detection": ood_detection(id_rows, ood_rows),
            "id_before_recalibration": inference["id_before_recalibration"],
            "id_forces_calibration_curve": curve}


# ---------------------------------------------------------------- report
def goals(results: dict) -> dict:
    """Per method, whether the issue's goals hold on the ID test set after recalibration."""
    judged = {}
    for method, row in results.items():
        if "id" not in row:
            continue
        rho, area = row["id"]["forces_spearman"], row["id"]["forces_miscalibration_area"]
        interval_area = row["id"].get("forces_interval_miscalibration_area")
        judged[method] = {"forces_spearman": rho, "forces_miscalibration_area": area,
                          "forces_interval_miscalibration_area": interval_area,
                          "spearman_goal_met": rho is not None and rho >= GOAL_SPEARMAN,
                          "calibration_goal_met": area is not None and area <= GOAL_MISCALIBRATION,
                          "interval_calibration_goal_met": (interval_area is not None
                                                            and interval_area <= GOAL_MISCALIBRATION)}
    return judged


def _pair(row: dict, key: str, factor: float = 1.0, digits: int = 2) -> str:
    values = [row[split].get(key) for split in ("id", "ood")]
    return " / ".join(_number(None if value is None else factor * value, digits) for value in values)


def _number(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_ratio(value, cheapest, digits: int) -> str:
    """``value (ratio to the cheapest)``, or a dash where there is no value."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + (f" ({value / cheapest:.1f}x)" if cheapest else "")


def report_section(results: dict, meta: dict, plot_name: str | None) -> str:
    done = {method: row for method, row in results.items() if "id" in row}
    cheapest_step = min((row["training"]["ms_per_step"] for row in done.values()
                         if row["training"]["ms_per_step"]), default=None)
    cheapest_inference = min((row["inference"]["ms_per_structure_batched"] for row in done.values()), default=None)
    lines = [
        f"Run on {meta['date']}, {meta['machine']}; load average {meta['load_average_start']} at the start. "
        f"Training budget {meta['budget_s']:.0f} s of training loop per method (`training.max_time`), "
        f"`model.backbone.num_channels={meta['channels']}` for every method, otherwise each method's "
        "`configs/uncertainty_<method>.yaml`.",
        f"Data: train {meta['data']['train']}, valid {meta['data']['valid']}; ID test `{ID_TEST}` "
        f"({meta['data']['n_id']} frames), OOD test `{OOD_TEST}` ({meta['data']['n_ood']} frames, 1200 K).",
        f"Command: `{meta['command']}` (mlip {meta['mlip_version']}, commit {meta['commit']})",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        "",
        "Cells are ID / OOD. σ recalibrated on the validation set (calibration.json). Forces: NLL and "
        "miscalibration area per force component, Spearman ρ per structure (mean |error| vs mean σ). "
        "AUROC: per-structure mean force σ, then energy σ, separating the 1200 K frames from the ID test "
        "frames. Training cost: ms per optimizer step (batch) from the end of epoch 1 to the last complete "
        "epoch, validation included, compilation not; all methods had the same loop time, so cheaper "
        "methods ran more epochs. Outside loop: start-up, drawing the posterior, recalibration, plots. "
        "Inference: "
        "ms per structure in batches of "
        f"{meta['eval_batch_size']} after a warm-up pass, and one at a time (ms single, "
        f"{SINGLE_STRUCTURE_FRAMES} structures); ratios are to the cheapest method. F miscal. ID raw: "
        "the ID forces miscalibration area before recalibration. F miscal. intervals: the same area for "
        "the isotonically recalibrated intervals ±Q(c)·σ (quantiles of |e|/σ fitted on validation, "
        "calibration.json), i.e. with the Gaussian shape assumption dropped.",
        "",
        "| method | samples | F MAE meV/Å | E MAE meV/atom | F NLL | E NLL | F miscal. area | "
        "F miscal. ID raw | F miscal. intervals | F ρ | E ρ | F 95 % cov. | AUROC σ_F / σ_E | epochs | "
        "ms/step | outside loop s | ms/structure | ms single |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in results.items():
        if "id" not in row:
            reason = row.get("skipped") or f"failed: {row.get('error', '')[:120]}"
            lines.append(f"| {method} | {reason} |" + " |" * 16)
            continue
        training, inference, detection = row["training"], row["inference"], row["ood_detection"]
        raw_area = row["id_before_recalibration"].get("forces_miscalibration_area")
        lines.append(
            f"| {method} | {row['posterior_samples']} | {_pair(row, 'forces_mae', 1000, 1)} | "
            f"{_pair(row, 'energy_mae_per_atom', 1000, 2)} | {_pair(row, 'forces_nll')} | "
            f"{_pair(row, 'energy_nll')} | {_pair(row, 'forces_miscalibration_area', 1, 3)} | "
            f"{_number(raw_area, 3)} | {_pair(row, 'forces_interval_miscalibration_area', 1, 3)} | "
            f"{_pair(row, 'forces_spearman')} | "
            f"{_pair(row, 'energy_spearman')} | {_pair(row, 'forces_coverage_95')} | "
            f"{detection['auroc_forces_std_mean']:.2f} / {detection['auroc_energy_std']:.2f} | "
            f"{training['epochs']} | {_with_ratio(training['ms_per_step'], cheapest_step, 1)} | "
            f"{training['outside_loop_s']} | "
            f"{_with_ratio(inference['ms_per_structure_batched'], cheapest_inference, 2)} | "
            f"{inference['ms_per_structure_single']:.1f} |")
    judged = meta["goals"]
    if judged:
        best = max(judged, key=lambda m: -1.0 if judged[m]["forces_spearman"] is None else judged[m]["forces_spearman"])
        verdict = judged[best]
        lines += ["", f"Goals (ID, after recalibration): Spearman ρ ≥ {GOAL_SPEARMAN} and forces miscalibration "
                      f"area ≤ {GOAL_MISCALIBRATION}. Highest forces ρ: {best} "
                      f"(ρ {_number(verdict['forces_spearman'])}, "
                      f"area {_number(verdict['forces_miscalibration_area'], 3)}): "
                      f"ρ goal {'met' if verdict['spearman_goal_met'] else 'not met'}, "
                      f"calibration goal {'met' if verdict['calibration_goal_met'] else 'not met'} with "
                      "variance scaling, "
                      f"{'met' if verdict['interval_calibration_goal_met'] else 'not met'} with recalibrated "
                      f"intervals (area {_number(verdict['forces_interval_miscalibration_area'], 3)}). Methods "
                      "meeting both with variance scaling: " + (
                          ", ".join(m for m, v in judged.items() if v["spearman_goal_met"] and v["calibration_goal_met"])
                          or "none") + "; with recalibrated intervals: " + (
                          ", ".join(m for m, v in judged.items()
                                    if v["spearman_goal_met"] and v["interval_calibration_goal_met"]) or "none") + "."]
    if plot_name:
        lines += ["", f"![calibration and cost]({plot_name})"]
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Forces calibration curves (ID) and ranking / OOD detection against inference cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from mlip.training.checkpoint import save_figure

    done = {method: row for method, row in results.items() if "id" in row}
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.3))
    for method, row in done.items():
        curve = row["id_forces_calibration_curve"]
        axes[0].plot(curve["expected"], curve["observed"], label=method)
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[0].set_xlabel("expected coverage of central interval")
    axes[0].set_ylabel("observed coverage (forces, ID test, recalibrated)")
    axes[0].legend(fontsize=8)
    for index, (method, row) in enumerate(done.items()):
        color = f"C{index}"
        cost = row["inference"]["ms_per_structure_batched"]
        rho = row["id"]["forces_spearman"]
        if rho is not None:
            axes[1].plot(cost, rho, "o", color=color)
        axes[1].plot(cost, row["ood_detection"]["auroc_forces_std_mean"], "s", mfc="none", color=color)
        axes[1].annotate(method, (cost, row["ood_detection"]["auroc_forces_std_mean"]), fontsize=8,
                         xytext=(4, 4), textcoords="offset points")
    axes[1].plot([], [], "ko", label="forces Spearman ρ (ID)")
    axes[1].plot([], [], "ks", mfc="none", label="AUROC, mean σ_F (OOD vs ID)")
    axes[1].axhline(GOAL_SPEARMAN, color="grey", lw=0.8, ls=":")
    axes[1].set_xscale("log")
    # Plain numbers at 1, 2, 5 x 10^k: the default 3x10^0, 4x10^0 ... labels overlap on a short range.
    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axes[1].xaxis.set_major_formatter(plain)
    axes[1].xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    axes[1].xaxis.set_minor_formatter(plain)
    axes[1].set_xlabel("inference, ms per structure (batched)")
    axes[1].set_ylabel("score")
    axes[1].legend(fontsize=8)
    save_figure(figure, path)


def count_frames(source: str) -> int:
    import ase.io

    path, index = source.split("@")
    return len(ase.io.read(os.path.join(ROOT, path), index=index))


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                        help=f"any of {', '.join(METHODS)} (default: all; a method without a config is skipped)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training.max_time of every method, seconds")
    parser.add_argument("--channels", type=int, default=16, help="model.backbone.num_channels of every method")
    parser.add_argument("--out-dir", default="/tmp/mlip-benchmark-uncertainty")
    parser.add_argument("--grace-s", type=float, default=600.0,
                        help="seconds past the budget before a training process is killed (start-up, posterior)")
    parser.add_argument("--no-docs", action="store_true",
                        help="write results and plot to the out dir only, not to docs/")
    parser.add_argument("--inference-worker", nargs=3, metavar=("RUN_DIR", "DATA", "OUT_JSON"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inference_worker:
        inference_worker(*args.inference_worker)
        return
    methods = [name for entry in args.methods for name in entry.split(",") if name]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.budget_s <= 0 or args.channels < 1:
        parser.error("--budget-s must be > 0 and --channels >= 1")
    args.out_dir = os.path.abspath(args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    load_start = [round(value, 2) for value in os.getloadavg()]

    results = {}
    for method in methods:
        if not os.path.exists(config_path(method)):
            message = f"not run: {os.path.relpath(config_path(method), ROOT)} does not exist yet"
            print(f"{method}: skipped, {message}", flush=True)
            results[method] = {"skipped": message}
            continue
        try:
            results[method] = benchmark_method(method, args)
            row = results[method]
            print(f"{method}: ID F MAE {1000 * row['id']['forces_mae']:.1f} meV/Å, forces ρ "
                  f"{_number(row['id']['forces_spearman'])}, "
                  f"area {_number(row['id']['forces_miscalibration_area'], 3)}; "
                  f"AUROC {row['ood_detection']['auroc_forces_std_mean']:.2f}", flush=True)
        except Exception as error:  # report the failure in the table, go on with the others
            results[method] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{method}: {results[method]['error']}", flush=True)

    import jax

    from mlip import __version__
    from mlip.training.config import load_config

    eval_batch_size = next((load_config(config_path(m)).training.eval_batch_size
                            for m in methods if os.path.exists(config_path(m))), 32)
    meta = {"date": datetime.date.today().isoformat(),
            "machine": f"{cpu_model()} ({os.cpu_count()} cores), {platform.system()}, JAX backend "
                       f"{jax.default_backend()}",
            "cpu": cpu_model(), "cores": os.cpu_count(), "load_average_start": load_start,
            "load_average_end": [round(value, 2) for value in os.getloadavg()],
            "budget_s": args.budget_s, "channels": args.channels, "eval_batch_size": eval_batch_size,
            "data": {"train": f"{TRAIN_DATA}@0:400", "valid": f"{TRAIN_DATA}@400:500", "id_test": ID_TEST,
                     "ood_test": OOD_TEST, "n_id": count_frames(ID_TEST), "n_ood": count_frames(OOD_TEST)},
            "command": "python scripts/benchmark_uncertainty.py " + " ".join(argv),
            "mlip_version": __version__, "commit": git_commit(),
            "versions": {"python": platform.python_version(), **versions()},
            "goals": goals(results)}
    docs_dir = os.path.join(ROOT, "docs") if not args.no_docs else args.out_dir
    json_path = os.path.join(docs_dir, "benchmark_uncertainty.json")
    with open(json_path, "w") as stream:
        json.dump({"meta": meta, "results": results}, stream, indent=2)
    plot_path = os.path.join(docs_dir, "benchmark_uncertainty.png")
    plot_name = None
    if any("id" in row for row in results.values()):
        plot(results, plot_path)
        plot_name = os.path.basename(plot_path)
    section = report_section(results, meta, plot_name)
    if args.no_docs:
        with open(os.path.join(args.out_dir, "uncertainty_section.md"), "w") as stream:
            stream.write(section + "\n")
    else:
        replace_marked_section(DOC, BEGIN, END, section, "Benchmark")
    print(f"results: {json_path}" + (f", plot {plot_path}" if plot_name else ""))
    print(section)


if __name__ == "__main__":
    main()
