"""Accuracy at equal wall-clock budget: mlip vs mace-torch vs apax on the same split.

``--dataset butane`` trains on trans n-butane at 300 K and adds the extrapolation figures
(600 K and 1200 K MD, relaxed torsion scans) of scripts/benchmark_extrapolation.py, the
three frameworks side by side (issue 19); the default is the in-distribution ethanol run.

Each framework trains on the same GFN2-xTB ethanol frames (default: train 0:500, valid
500:600, test 600:1000 of data/ethanol_gfn2_500K.extxyz), one after the other in one
run, each with the same wall-clock budget measured from the start of its training
process (startup and compilation included). A framework still training at the budget
is stopped (SIGTERM, then SIGKILL) and its last saved model is used. mlip places its
schedule by elapsed time; the peers' schedules (mace's stage two, apax's learning-rate
decay) are planned in epochs, so each peer is first run for ``--probe-s`` seconds with
the same command, its epoch end times are read from its own logs, and its budgeted run
is planned from the epoch time and start-up measured there. All three are then
evaluated by the same metric function on predictions written by each framework's own
ASE calculator. Results go to docs/benchmark_accuracy.json and to the section between
``<!-- accuracy:begin -->`` and ``<!-- accuracy:end -->`` of docs/benchmarks.md.

Peers run in their own virtual environments (mace-torch needs torch, apax its own jax):

    python scripts/benchmark_accuracy.py --setup            # creates /work/peers/{mace,apax}-venv
    python scripts/benchmark_accuracy.py --budget-s 720     # about 45 minutes on 2 cores
    python scripts/benchmark_accuracy.py --dataset butane --budget-s 300 --seed 1   # another seed

``--seed N`` seeds all three frameworks (mlip's ``seed``, mace's ``--seed``, apax's ``seed``);
its results go to their own json and docs sections (suffix ``_seedN``), beside seed 0's;
``--mean-over-seeds`` then tabulates every recorded butane seed's mean per figure.

mlip's config is per data set (configs/benchmark_ethanol.yaml, configs/benchmark_butane.yaml).
``--frameworks mlip --keep-recorded`` retrains mlip alone and keeps the peers' recorded results
of the same seed, their date in the table: for a change of mlip's config, valid while the
machine runs at the recorded speed (compare the epochs). ``--mace-r-max`` gives mace-torch
another cutoff (with ``--section`` and ``--json``, a side run beside the recorded tables).

This is a benchmark script, never part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from typing import Callable

import numpy as np

from benchmark_common import cpu_model, replace_marked_section, run_with_budget, setup, small_backbone
from benchmark_common import versions as peer_versions  # noqa: E402  (scripts/ is sys.path[0])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each data set: the labelled file the split is cut from, its isolated-atom E0s, the default
# split, whether the extrapolation figures of scripts/benchmark_extrapolation.py apply, and
# mlip's config (configs/).
DATASETS = {
    "ethanol": {"data": "ethanol_gfn2_500K.extxyz", "e0s": "ethanol_gfn2_e0s.json",
                "train": "0:500", "valid": "500:600", "test": "600:1000", "extrapolation": False,
                "mlip_config": "benchmark_ethanol.yaml"},
    # Train on trans n-butane at 300 K; test held out at 300 K, hotter MD and torsion scans.
    "butane": {"data": "butane_gfn2_300K.extxyz", "e0s": "butane_gfn2_e0s.json",
               "train": "0:450", "valid": "450:500", "test": "500:", "extrapolation": True,
               "mlip_config": "benchmark_butane.yaml"},
}

# mace-torch's architecture: configs/benchmark_ethanol.yaml's, mlip's on ethanol (mlip's butane
# config differs only in a 4.5 Å cutoff; --mace-r-max gives mace-torch the same).
MACE_ARCHITECTURE = {"r_max": 5.0, "num_channels": 32, "max_L": 1, "max_ell": 3, "correlation": 3,
                     "num_interactions": 2, "batch_size": 5, "lr": 0.01}


def write_split(work_dir: str, data: str, e0s: str, train: str, valid: str, test: str) -> dict:
    import ase.io

    paths = {"data": data, "e0s": e0s}
    for name, index in (("train", train), ("valid", valid), ("test", test)):
        frames = ase.io.read(data, index=index)
        path = os.path.join(work_dir, f"{name}.extxyz")
        ase.io.write(path, frames, format="extxyz")
        paths[name] = path
        paths[f"n_{name}"] = len(frames)
    return paths


def metrics_from_predictions(test_path: str, prediction_path: str) -> dict:
    """The one metric function every framework is judged by."""
    import ase.io

    frames = ase.io.read(test_path, ":")
    predicted = np.load(prediction_path)
    energy_errors = np.array([p - f.info["REF_energy"] for p, f in zip(predicted["energies"], frames)])
    n_atoms = np.array([len(f) for f in frames])
    force_errors = predicted["forces"] - np.concatenate([f.arrays["REF_forces"] for f in frames])
    per_atom = energy_errors / n_atoms
    return {"n_test": len(frames),
            "energy_mae_mev_per_atom": 1000 * float(np.mean(np.abs(per_atom))),
            "energy_rmse_mev_per_atom": 1000 * float(np.sqrt(np.mean(per_atom**2))),
            "forces_mae_mev_per_a": 1000 * float(np.mean(np.abs(force_errors))),
            "forces_rmse_mev_per_a": 1000 * float(np.sqrt(np.mean(force_errors**2)))}


PREDICT_WORKER = textwrap.dedent("""
    import sys, time, numpy as np, ase.io
    kind, model, test_path, out_path = sys.argv[1:5]
    if kind == "mace":
        from mace.calculators import MACECalculator
        calc = MACECalculator(model_paths=model, device="cpu", default_dtype="float32")
    elif kind == "apax":
        from apax.md import ASECalculator
        calc = ASECalculator(model_dir=model)
    else:
        from mlip import MLIPCalculator
        calc = MLIPCalculator.from_run(model)
    frames = ase.io.read(test_path, ":")
    energies, forces = [], []
    start = time.time()
    for atoms in frames:
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    np.savez(out_path, energies=np.array(energies), forces=np.concatenate(forces),
             seconds=time.time() - start)
""")


def predict(kind: str, python: str, model: str, test_path: str, work_dir: str, label: str = "test") -> str:
    worker = os.path.join(work_dir, "predict_worker.py")
    with open(worker, "w") as stream:
        stream.write(PREDICT_WORKER)
    out_path = os.path.join(work_dir, f"predictions_{kind}_{label}.npz")
    subprocess.run([python, worker, kind, model, test_path, out_path], check=True,
                   stdout=subprocess.DEVNULL, stderr=open(os.path.join(work_dir, f"predict_{kind}.log"), "w"))
    return out_path


# ---------------------------------------------------------------- mlip
def small_config(work_dir: str) -> str:
    """configs/benchmark_ethanol.yaml with the backbone of configs/small.yaml (same training)."""
    import yaml

    with open(os.path.join(ROOT, "configs", "benchmark_ethanol.yaml")) as stream:
        config = yaml.safe_load(stream)
    config["model"]["backbone"] = small_backbone()
    path = os.path.join(work_dir, "benchmark_ethanol_small.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    return path


def train_mlip(split: dict, work_dir: str, budget_s: float, small: bool = False,
               config_name: str = "benchmark_ethanol.yaml") -> dict:
    """mlip with configs/``config_name``, or (small) configs/benchmark_ethanol.yaml's training with
    configs/small.yaml's model."""
    start = time.monotonic()
    name = "mlip-small" if small else "mlip"
    run_dir = os.path.join(work_dir, f"{name}_run")
    shutil.rmtree(run_dir, ignore_errors=True)
    config = small_config(work_dir) if small else os.path.join(ROOT, "configs", config_name)
    # mlip stops itself on time (training.max_time counts from the start of its training
    # loop); 20 s are left for start-up and data loading, the rest of the budget is the
    # same hard limit every framework gets.
    command = [sys.executable, "-m", "mlip.cli", "train", config,
               "--set", f"run_dir={run_dir}", "--set", f"data.train={split['train']}",
               "--set", f"data.e0s={split['e0s']}",
               "--set", f"data.valid={split['valid']}", "--set", f"training.max_time={budget_s - 20}",
               "--set", f"seed={split['seed']}",
               "--set", "training.progress_bar=false"]
    result = run_with_budget(command, budget_s, os.path.join(work_dir, f"{name}_train.log"), grace_s=60)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    # Training ends at start-up + max_time; the rest of wall_s is mlip's own final
    # evaluation and plots, which the peers do outside their budget.
    training_end = os.path.getmtime(os.path.join(run_dir, "last.msgpack"))
    result["training_s"] = round(training_end - (time.time() - (time.monotonic() - start)), 1)
    import yaml

    backbone = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["model"]["backbone"]
    result.update(epochs=summary["epochs"], model=run_dir, python=sys.executable,
                  n_params=_mlip_parameter_count(run_dir), r_max=backbone["r_max"])
    return result


def _mlip_parameter_count(run_dir: str) -> int:
    import jax

    from mlip.training.checkpoint import load_potential
    _, params = load_potential(run_dir)
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------- epoch planning
def plan_epochs(epoch_end_s: list[float], budget_s: float) -> dict:
    """Epochs that fit ``budget_s``, from the epoch end times of a probe run of the same command.

    A steady epoch is the median interval between epoch ends; start-up (reading data,
    compilation: everything before the first epoch's own share) is the first end minus
    one steady epoch. Both are measured in this run, on this machine's current speed.
    """
    if len(epoch_end_s) < 3:
        raise RuntimeError(f"the probe finished {len(epoch_end_s)} epochs, too few to time; raise --probe-s")
    epoch_s = float(np.median(np.diff(epoch_end_s)))
    startup_s = max(0.0, epoch_end_s[0] - epoch_s)
    # 3 % to spare: a peer cut off by the budget never finishes its schedule (the last
    # of its decay or stage two), which costs it more than the epoch or two given up.
    return {"planned_epochs": max(4, int(0.97 * (budget_s - startup_s) / epoch_s)),
            "probe_epoch_s": round(epoch_s, 2), "probe_startup_s": round(startup_s, 1)}


def peer_plan(name: str, work_dir: str, budget_s: float, probe_s: float, epoch_s: float | None,
              command_in: Callable[[str], list], epoch_counter: Callable[[str], Callable[[], int]]) -> dict:
    """A peer's epoch plan: from ``epoch_s`` where given, else from a probe in this run.

    The probe runs ``command_in(directory)`` (the peer's real command, with an epoch
    count it will not reach) for ``probe_s`` seconds in a fresh directory of its own.
    """
    if epoch_s is not None:
        return {"planned_epochs": max(4, int(budget_s / epoch_s)), "given_epoch_s": epoch_s}
    probe_dir = fresh_directory(os.path.join(work_dir, f"{name}_probe"))
    probe = run_with_budget(command_in(probe_dir), probe_s, os.path.join(work_dir, f"{name}_probe.log"),
                            count_epochs=epoch_counter(probe_dir))
    return plan_epochs(probe["epoch_end_s"], budget_s)


# ---------------------------------------------------------------- mace
def mace_arguments(split: dict, mace_dir: str) -> list:
    e0s = json.load(open(split["e0s"]))
    e0_text = "{" + ",".join(f"{z}:{v}" for z, v in e0s.items()) + "}"
    a = {**MACE_ARCHITECTURE, "r_max": split["mace_r_max"]}
    return [
        "--name=model", f"--train_file={split['train']}", f"--valid_file={split['valid']}",
        f"--E0s={e0_text}", "--energy_key=REF_energy", "--forces_key=REF_forces",
        "--model=MACE", f"--num_channels={a['num_channels']}", f"--max_L={a['max_L']}",
        f"--max_ell={a['max_ell']}", f"--correlation={a['correlation']}", f"--r_max={a['r_max']}",
        f"--num_interactions={a['num_interactions']}", f"--batch_size={a['batch_size']}",
        "--valid_batch_size=20", f"--lr={a['lr']}", "--ema", "--ema_decay=0.99", "--amsgrad",
        "--default_dtype=float32", "--device=cpu", f"--seed={split['seed']}", "--eval_interval=1",
        "--energy_weight=1.0", "--forces_weight=100.0", "--restart_latest",
        f"--checkpoints_dir={mace_dir}/checkpoints", f"--model_dir={mace_dir}",
        f"--log_dir={mace_dir}/logs", f"--results_dir={mace_dir}/results",
    ]


def mace_epoch_counter(mace_dir: str) -> Callable[[], int]:
    """Epochs mace has finished: its "Epoch N:" evaluation lines (--eval_interval=1)."""
    def count() -> int:
        logs = glob.glob(os.path.join(mace_dir, "logs", "*_run-*.log"))
        logs = [path for path in logs if not path.endswith("_debug.log")]
        return sum(open(path).read().count(" INFO: Epoch ") for path in logs)
    return count


def fresh_directory(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def train_mace(split: dict, work_dir: str, budget_s: float, venv: str, probe_s: float,
               epoch_s: float | None) -> dict:
    trainer = os.path.join(venv, "bin", "mace_run_train")
    plan = peer_plan("mace", work_dir, budget_s, probe_s, epoch_s,
                     lambda directory: [trainer, *mace_arguments(split, directory), "--max_num_epochs=10000"],
                     mace_epoch_counter)
    mace_dir = fresh_directory(os.path.join(work_dir, "mace_run"))
    # mace's second stage (--swa: energy weight 1000, lower lr) starts at a fixed epoch:
    # put it at 75 % of the epochs that fit the budget.
    planned_epochs = plan["planned_epochs"]
    arguments = mace_arguments(split, mace_dir) + ["--swa", f"--start_swa={int(0.75 * planned_epochs)}"]
    result = run_with_budget([trainer, *arguments, f"--max_num_epochs={planned_epochs}"], budget_s,
                             os.path.join(work_dir, "mace_train.log"), count_epochs=mace_epoch_counter(mace_dir))
    epochs = _last_mace_epoch(os.path.join(mace_dir, "checkpoints"))
    # The .model file is written only at a normal end: restart from the last checkpoint
    # with max_num_epochs equal to the epochs done, which trains nothing and saves it.
    subprocess.run([trainer, *arguments, f"--max_num_epochs={epochs}"], check=True,
                   stdout=open(os.path.join(work_dir, "mace_export.log"), "w"), stderr=subprocess.STDOUT)
    # With --swa, model.model is the best model of stage one; the final model is the
    # stage-two one whenever stage two started.
    model = os.path.join(mace_dir, "model_stagetwo.model")
    if not os.path.exists(model):
        model = os.path.join(mace_dir, "model.model")
    result.update(plan, epochs=epochs + 1, model=model, python=os.path.join(venv, "bin", "python"),
                  r_max=split["mace_r_max"])
    return result


def _last_mace_epoch(checkpoint_dir: str) -> int:
    epochs = [int(name.split("epoch-")[1].split(".")[0].split("_")[0])
              for name in os.listdir(checkpoint_dir) if "epoch-" in name]
    if not epochs:
        raise RuntimeError(f"mace wrote no checkpoint in {checkpoint_dir} within the budget")
    # Restarting with max_num_epochs equal to the checkpoint's epoch trains nothing more
    # (one more would train an extra epoch outside the budget).
    return max(epochs)


# ---------------------------------------------------------------- apax
def apax_config(split: dict, apax_dir: str, n_epochs: int) -> str:
    """apax's default GMNN on the split (labels converted to calculator results); the config's path."""
    import yaml

    converted = {}
    for name in ("train", "valid"):
        converted[name] = _as_calculator_labels(split[name], os.path.join(apax_dir, f"{name}.extxyz"))
    config = {
        "n_epochs": n_epochs,
        "seed": split["seed"],
        "data": {"directory": apax_dir, "experiment": "model", "train_data_path": converted["train"],
                 "val_data_path": converted["valid"], "batch_size": MACE_ARCHITECTURE["batch_size"],
                 "valid_batch_size": 20, "shift_method": "per_element_regression_shift",
                 "scale_method": "per_element_force_rms_scale"},
        "model": {"name": "gmnn", "basis": {"name": "bessel", "n_basis": 16, "r_max": 5.0}},
        "loss": [{"name": "energy", "loss_type": "mse", "weight": 1.0},
                 {"name": "forces", "loss_type": "mse", "weight": 4.0}],
        "ckpt_interval": 1,
        "progress_bar": {"disable_epoch_pbar": True, "disable_batch_pbar": True},
    }
    config_path = os.path.join(apax_dir, "config.yaml")
    with open(config_path, "w") as stream:
        yaml.safe_dump(config, stream)
    return config_path


def apax_epoch_counter(apax_dir: str) -> Callable[[], int]:
    return lambda: _apax_epochs(os.path.join(apax_dir, "model")) or 0


def train_apax(split: dict, work_dir: str, budget_s: float, venv: str, probe_s: float,
               epoch_s: float | None) -> dict:
    apax = os.path.join(venv, "bin", "apax")
    plan = peer_plan("apax", work_dir, budget_s, probe_s, epoch_s,
                     lambda directory: [apax, "train", apax_config(split, directory, 10000)],
                     apax_epoch_counter)
    apax_dir = fresh_directory(os.path.join(work_dir, "apax_run"))
    # apax's learning rate decays linearly over n_epochs: plan the epochs that fit the budget.
    config_path = apax_config(split, apax_dir, plan["planned_epochs"])
    result = run_with_budget([apax, "train", config_path], budget_s, os.path.join(work_dir, "apax_train.log"),
                             count_epochs=apax_epoch_counter(apax_dir))
    result.update(plan, model=os.path.join(apax_dir, "model"), python=os.path.join(venv, "bin", "python"),
                  epochs=_apax_epochs(os.path.join(apax_dir, "model")))
    return result


def _as_calculator_labels(source: str, target: str) -> str:
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = ase.io.read(source, ":")
    for atoms in frames:
        energy, forces = atoms.info.pop("REF_energy"), atoms.arrays.pop("REF_forces")
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    ase.io.write(target, frames, format="extxyz")
    return target


def _apax_epochs(model_dir: str) -> int | None:
    log = os.path.join(model_dir, "log.csv")
    if os.path.exists(log):
        return max(0, len(open(log).read().strip().splitlines()) - 1)
    return None


# ---------------------------------------------------------------- extrapolation (butane)
def extrapolation_files(work_dir: str) -> dict:
    """scripts/benchmark_extrapolation.py's test sets, each written to one extxyz file."""
    import ase.io

    from benchmark_extrapolation import test_frames

    files = {}
    for name, frames in test_frames().items():
        files[name] = os.path.join(work_dir, f"extrapolation_{name}.extxyz")
        ase.io.write(files[name], frames, format="extxyz")
    return files


def extrapolation_figures(kind: str, run: dict, files: dict, work_dir: str) -> dict:
    """A trained model's extrapolation figures, from predictions by its own ASE calculator."""
    from benchmark_extrapolation import figures, test_frames

    predicted = {name: np.load(predict(kind, run["python"], run["model"], path, work_dir, label=name))
                 for name, path in files.items()}
    return figures(test_frames(), predicted)


# ---------------------------------------------------------------- report
EXTRAPOLATION_ROWS = [("force RMSE 300 K, held out (meV/Å)", "forces_rmse_300K_meV_A"),
                      ("force RMSE 600 K (meV/Å)", "forces_rmse_600K_meV_A"),
                      ("force RMSE 1200 K (meV/Å)", "forces_rmse_1200K_meV_A"),
                      ("C–C–C–C scan: relative-energy RMSE (meV)", "scan_CCCC_relative_energy_rmse_meV"),
                      ("C–C–C–C scan: barrier error (meV)", "scan_CCCC_barrier_error_meV"),
                      ("H–C–C–C scan: relative-energy RMSE (meV)", "scan_HCCC_relative_energy_rmse_meV"),
                      ("H–C–C–C scan: barrier error (meV)", "scan_HCCC_barrier_error_meV")]


def write_extrapolation_report(results: dict, meta: dict, section: str = "extrapolation-peers") -> None:
    """The three frameworks' extrapolation figures, side by side, as a table in docs/benchmarks.md.

    Each cell is the figure and, for a peer, the peer's figure over mlip's (above 1: mlip
    is better). A barrier enters as its absolute error against the reference barrier.
    """
    names = [name for name in results if "extrapolation" in results[name]]
    for name in names:
        results[name]["extrapolation"] = with_barrier_errors(results[name]["extrapolation"])
    ours = results.get("mlip", {}).get("extrapolation")
    lines = [f"Run on {meta['date']}, {meta['cpu']} ({meta['cores']} cores), {meta['budget_s']:.0f} s per "
             f"framework, one after the other. Command: `{meta['command']}`" + _carried_note(meta),
             "",
             "| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in EXTRAPOLATION_ROWS:
        cells = []
        for name in names:
            value = results[name]["extrapolation"][key]
            ratio = f" ({value / ours[key]:.2f}×)" if ours and name != "mlip" and ours[key] > 0 else ""
            cells.append(f"{value:.1f}{ratio}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if names:
        reference = results[names[0]]["extrapolation"]
        lines.append(f"\nReference barriers: C–C–C–C {reference['scan_CCCC_reference_barrier_meV']:.0f} meV, "
                     f"H–C–C–C {reference['scan_HCCC_reference_barrier_meV']:.0f} meV.")
    seed = f", seed {meta['seed']}" if meta["seed"] else ""
    replace_marked_section(os.path.join(ROOT, "docs", "benchmarks.md"), f"<!-- {section}:begin -->",
                           f"<!-- {section}:end -->", "\n".join(lines),
                           f"Extrapolation (n-butane): mlip, mace-torch and apax{seed}")


def with_barrier_errors(figures: dict) -> dict:
    """The figures with each scan's barrier as its absolute error against the reference barrier."""
    out = dict(figures)
    for scan in ("scan_CCCC", "scan_HCCC"):
        out[f"{scan}_barrier_error_meV"] = abs(out[f"{scan}_barrier_meV"] - out[f"{scan}_reference_barrier_meV"])
    return out


def write_extrapolation_mean_report(section: str = "extrapolation-peers-mean") -> None:
    """Every seed's butane run (docs/benchmark_accuracy_butane[_seedN].json): each figure's mean over
    the seeds per framework, the peer's mean over mlip's, and in how many seeds mlip was ahead
    of that peer by at least 20 % (the extrapolation issue's goal)."""
    paths = sorted(glob.glob(os.path.join(ROOT, "docs", "benchmark_accuracy_butane*.json")))
    runs = [json.load(open(path)) for path in paths]
    runs = [run for run in runs if all("extrapolation" in run["results"].get(name, {})
                                       for name in ("mlip", "mace", "apax"))]
    if not runs:
        raise SystemExit("no butane run with all three frameworks' extrapolation figures in docs/")
    seeds = [run["meta"].get("seed") or 0 for run in runs]
    names = ["mlip", "mace", "apax"]
    figures = {name: [with_barrier_errors(run["results"][name]["extrapolation"]) for run in runs] for name in names}
    lines = [f"Mean over seeds {', '.join(map(str, seeds))} of the runs above "
             f"(`python scripts/benchmark_accuracy.py --mean-over-seeds`; each run "
             f"{runs[0]['meta']['budget_s']:.0f} s per framework). A peer's cell: its mean, its mean over "
             "mlip's, and the seeds in which mlip was ahead of it by at least 20 % (its figure at least "
             "1.2× mlip's).", "",
             "| figure | mlip: mean (range) | mace | apax |", "|---|---|---|---|"]
    for label, key in EXTRAPOLATION_ROWS:
        ours = [f[key] for f in figures["mlip"]]
        cells = [f"{np.mean(ours):.1f} ({min(ours):.1f}–{max(ours):.1f})"]
        for name in names[1:]:
            theirs = [f[key] for f in figures[name]]
            ahead = sum(t >= 1.2 * o for t, o in zip(theirs, ours))
            cells.append(f"{np.mean(theirs):.1f} ({np.mean(theirs) / np.mean(ours):.2f}×; {ahead}/{len(runs)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    replace_marked_section(os.path.join(ROOT, "docs", "benchmarks.md"), f"<!-- {section}:begin -->",
                           f"<!-- {section}:end -->", "\n".join(lines),
                           "Extrapolation (n-butane): mean over seeds")


def carry_over_recorded(results: dict, json_path: str) -> dict:
    """Adds to ``results`` the frameworks recorded in ``json_path`` that this run did not train.

    Returns {framework: the date of the run it comes from}. Only valid while the machine runs
    at the recorded speed: compare this run's epochs with the recorded ones.
    """
    if not os.path.exists(json_path):
        raise SystemExit(f"--keep-recorded: nothing recorded at {json_path}")
    recorded = json.load(open(json_path))
    carried = {}
    for name, row in recorded["results"].items():
        if name not in results:
            carried[name] = recorded["meta"].get("carried_over", {}).get(name, recorded["meta"]["date"])
            results[name] = row
    return carried


def _carried_note(meta: dict) -> str:
    carried = meta.get("carried_over") or {}
    if not carried:
        return ""
    return (" Carried over from their own earlier run on this machine (`--keep-recorded`): "
            + ", ".join(f"{name} ({date})" for name, date in carried.items()) + ".")


def versions(peer_dir: str) -> dict:
    return {"python": platform.python_version(), **peer_versions(peer_dir)}


def write_report(results: dict, meta: dict, section: str, json_path: str,
                 heading: str = "Accuracy at equal wall-clock budget") -> None:
    docs = os.path.join(ROOT, "docs")
    os.makedirs(docs, exist_ok=True)
    with open(json_path, "w") as stream:
        json.dump({"meta": meta, "results": results}, stream, indent=2)
    reference = "mlip" if "mlip" in results else "mlip-small"
    ours = results.get(reference, {}).get("forces_mae_mev_per_a")
    lines = [
        f"Run on {meta['date']}, {meta['cpu']} ({meta['cores']} cores), budget {meta['budget_s']:.0f} s "
        f"of wall-clock per framework (process start to stop, compilation included).",
        f"Data: `{meta['data']}`, train {meta['n_train']} / valid {meta['n_valid']} / test {meta['n_test']} "
        f"frames; isolated-atom E0s from `{meta['e0s']}` for mlip and mace, apax "
        "fits its own per-element shift.",
        f"Command: `{meta['command']}`" + _carried_note(meta),
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        "",
        "| framework | model | params | epochs | training wall s | test E MAE meV/atom | E RMSE | "
        f"test F MAE meV/Å | F RMSE | F MAE / {reference}'s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    descriptions = {"mlip": "MACE (ours), 32x0e+32x1o, ell 3, corr 3",
                    "mlip-small": "MACE (ours), configs/small.yaml: 1 interaction, 16x0e, ell 2, corr 3",
                    "mace": "mace-torch MACE, 32x0e+32x1o, ell 3, corr 3",
                    "apax": "apax GMNN (defaults, 16 Bessel)"}
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | {descriptions[name]} | | | | failed: {row['error'][:80]} | | | | |")
            continue
        ratio = f"{row['forces_mae_mev_per_a'] / ours:.2f}" if ours else ""
        description = descriptions[name] + (f", r_max {row['r_max']:g} Å" if "r_max" in row else "")
        lines.append(f"| {name} | {description} | {row.get('n_params', '')} | {row.get('epochs', '')} | "
                     f"{row.get('training_s', row['wall_s'])} | {row['energy_mae_mev_per_atom']:.2f} | {row['energy_rmse_mev_per_atom']:.2f} | "
                     f"{row['forces_mae_mev_per_a']:.1f} | {row['forces_rmse_mev_per_a']:.1f} | {ratio} |")
    lines_text = "\n".join(lines)
    path = os.path.join(docs, "benchmarks.md")
    if not os.path.exists(path):
        with open(path, "w") as stream:
            stream.write("# Benchmarks\n")
    replace_marked_section(path, f"<!-- {section}:begin -->", f"<!-- {section}:end -->", lines_text, heading)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create the peer venvs and exit")
    parser.add_argument("--peer-dir", default="/work/peers")
    parser.add_argument("--work-dir", default="/tmp/mlip-benchmark-accuracy")
    parser.add_argument("--budget-s", type=float, default=720.0)
    parser.add_argument("--frameworks", default="mlip,mace,apax",
                        help="comma-separated: mlip, mlip-small (configs/small.yaml's model), mace, apax")
    parser.add_argument("--section", default=None,
                        help="docs/benchmarks.md section (between <!-- NAME:begin/end -->) for the table "
                             "(default: accuracy, or accuracy-butane for --dataset butane)")
    parser.add_argument("--json", default=None, help="default: docs/benchmark_accuracy.json "
                                                      "(docs/benchmark_accuracy_butane.json for --dataset butane)")
    parser.add_argument("--dataset", default="ethanol", choices=list(DATASETS),
                        help="ethanol: in distribution; butane: also the extrapolation figures "
                             "(hot MD, torsion scans) of scripts/benchmark_extrapolation.py")
    parser.add_argument("--seed", type=int, default=0,
                        help="every framework's seed (initialisation, shuffling); a seed other than 0 writes "
                             "its own json and docs sections (suffix _seedN)")
    parser.add_argument("--train", default=None, help="frames of the data set to train on (default: the set's)")
    parser.add_argument("--valid", default=None)
    parser.add_argument("--test", default=None)
    parser.add_argument("--probe-s", type=float, default=90.0,
                        help="length of the probe run that times a peer's epochs before its budgeted run")
    parser.add_argument("--mace-epoch-s", type=float, default=None,
                        help="seconds per mace epoch (plans its stage two); default: timed by a probe")
    parser.add_argument("--apax-epoch-s", type=float, default=None,
                        help="seconds per apax epoch (plans its lr decay); default: timed by a probe")
    parser.add_argument("--mace-r-max", type=float, default=None,
                        help=f"mace-torch's cutoff (default {MACE_ARCHITECTURE['r_max']} Å); with --section, "
                             "a side run that leaves the recorded tables alone")
    parser.add_argument("--keep-recorded", action="store_true",
                        help="frameworks not in --frameworks keep their results from this seed's recorded json "
                             "(their run's date noted in the table): retrain mlip alone against the peers' runs")
    parser.add_argument("--mean-over-seeds", action="store_true",
                        help="train nothing: the mean over the seeds of the butane runs recorded in docs/, "
                             "as a table in docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.mean_over_seeds:
        write_extrapolation_mean_report()
        return
    if args.setup:
        setup(args.peer_dir)
        return
    os.makedirs(args.work_dir, exist_ok=True)
    dataset = DATASETS[args.dataset]
    data = os.path.join(ROOT, "data", dataset["data"])
    split = write_split(args.work_dir, data, os.path.join(ROOT, "data", dataset["e0s"]),
                        *(getattr(args, part) or dataset[part] for part in ("train", "valid", "test")))
    split.update(seed=args.seed, mace_r_max=args.mace_r_max or MACE_ARCHITECTURE["r_max"])
    extrapolation_sets = extrapolation_files(args.work_dir) if dataset["extrapolation"] else {}
    results = {}
    for name in args.frameworks.split(","):
        print(f"training {name} for {args.budget_s:.0f} s ...", flush=True)
        try:
            if name in ("mlip", "mlip-small"):
                run = train_mlip(split, args.work_dir, args.budget_s, small=name == "mlip-small",
                                 config_name=dataset["mlip_config"])
            elif name == "mace":
                run = train_mace(split, args.work_dir, args.budget_s, os.path.join(args.peer_dir, "mace-venv"),
                                 args.probe_s, args.mace_epoch_s)
            elif name == "apax":
                run = train_apax(split, args.work_dir, args.budget_s, os.path.join(args.peer_dir, "apax-venv"),
                                 args.probe_s, args.apax_epoch_s)
            else:
                raise ValueError(f"unknown framework {name}")
            predictions = predict(name, run["python"], run["model"], split["test"], args.work_dir)
            run.update(metrics_from_predictions(split["test"], predictions))
            run["predict_s"] = round(float(np.load(predictions)["seconds"]), 1)
            if extrapolation_sets:
                run["extrapolation"] = extrapolation_figures(name, run, extrapolation_sets, args.work_dir)
        except Exception as error:  # report the failure in the table, go on with the others
            run = {"error": f"{type(error).__name__}: {error}"}
        results[name] = run
        print(f"  {name}: {json.dumps(run)}", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "budget_s": args.budget_s, "seed": args.seed, "data": os.path.relpath(data, ROOT),
            "e0s": os.path.relpath(split["e0s"], ROOT),
            "n_train": split["n_train"], "n_valid": split["n_valid"], "n_test": split["n_test"],
            "command": "python scripts/benchmark_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "versions": versions(args.peer_dir)}
    suffix = ("" if args.dataset == "ethanol" else f"_{args.dataset}") + (f"_seed{args.seed}" if args.seed else "")
    json_path = args.json or os.path.join(ROOT, "docs", f"benchmark_accuracy{suffix}.json")
    if args.keep_recorded:
        meta["carried_over"] = carry_over_recorded(results, json_path)
    if extrapolation_sets:
        write_extrapolation_report(results, meta, f"extrapolation-{args.section}" if args.section else
                                   "extrapolation-peers" + suffix.replace("_butane", "").replace("_", "-"))
    write_report(results, meta, args.section or "accuracy" + suffix.replace("_", "-"), json_path,
                 heading=f"Accuracy at equal wall-clock budget ({args.dataset})")


if __name__ == "__main__":
    main()
