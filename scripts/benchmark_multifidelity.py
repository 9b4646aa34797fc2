"""Multi-fidelity training: many cheap GFN1-xTB labels plus few GFN2-xTB labels, against the few alone.

    python scripts/benchmark_multifidelity.py run --budget-s 150 [--labels 25 50 100] [--docs]
    python scripts/benchmark_multifidelity.py table [--docs]
    python scripts/benchmark_multifidelity.py run --budget-s 600 --labels 50 --arms gfn2_only --core 0

Runs at another budget than the table's 150 s are kept apart (``results_<budget>s`` in the
results, ``_<budget>s`` in the run directories) and tabled by budget at each label count: at 150 s
the multi-fidelity arms make a tenth of the GFN2-only arm's epochs, so the budget table shows
how much of the gap between them is training time rather than labels.

Data (shipped; scripts/make_datasets.py): the 1000 ethanol frames of data/ethanol_gfn2_500K.extxyz
and the same geometries relabelled with GFN1-xTB (data/ethanol_gfn1_500K.extxyz).
  * held-out test: GFN2 labels of frames 800:1000 (never trained on, at either level);
  * validation (best-checkpoint choice, the same for every arm): GFN2 labels of frames 750:800;
  * N expensive labels: GFN2 labels of frames 0:N, for N in --labels;
  * cheap labels: GFN1 labels of frames 0:700.
Arms, at every N, each trained for the same wall-clock budget on one CPU core, one after another:
  * ``gfn2_only``: a single-fidelity model on the N GFN2 frames;
  * ``multi``: one backbone, heads [gfn1, gfn2] (per-fidelity E0 from the isolated atoms), trained
    jointly on the 700 GFN1 and the N GFN2 frames;
  * ``transfer``: a [gfn1] model pretrained once on the 700 GFN1 frames (its own budget, reported),
    then fine-tuned (`training.init_from`, a fresh gfn2 head, backbone frozen for the first 10 %)
    on the N GFN2 frames for the budget.
The model and loss are configs/quickstart.yaml's. Test errors are of the gfn2 head (the
default fidelity). Results: docs/benchmark_multifidelity.json, the table (and a plot,
docs/benchmark_multifidelity.png) with --docs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_common import ROOT, cpu_model, publish_table  # noqa: E402

DATA = os.path.join(ROOT, "data")
GFN2 = os.path.join(DATA, "ethanol_gfn2_500K.extxyz")
GFN1 = os.path.join(DATA, "ethanol_gfn1_500K.extxyz")
E0S = {"gfn1": os.path.join(DATA, "ethanol_gfn1_e0s.json"), "gfn2": os.path.join(DATA, "ethanol_gfn2_e0s.json")}
TEST, VALID, CHEAP = f"{GFN2}@800:1000", f"{GFN2}@750:800", f"{GFN1}@0:700"
RESULTS = os.environ.get("MLIP_BENCHMARK_RESULTS", os.path.join(ROOT, "docs", "benchmark_multifidelity.json"))
BASE_BUDGET_S = 150.0  # the budget of the main table


def results_key(budget_s: float) -> str:
    return "results" if budget_s == BASE_BUDGET_S else f"results_{budget_s:g}s"


def budget_suffix(budget_s: float) -> str:
    """What a run directory trained for another budget than the table's ends with."""
    return "" if budget_s == BASE_BUDGET_S else f"_{budget_s:g}s"


def base_config(budget_s: float, seed: int) -> dict:
    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "quickstart.yaml")))
    config["seed"] = seed
    config["training"].update(max_time=budget_s, max_epochs=100000, progress_bar=False, plots=False)
    return config


# Levers of the multi-fidelity arm (``multi+<lever>``), each a change merged into its config.
LEVERS = {"w10": {"loss": {"fidelity_weights": {"gfn2": 10.0}}},
          "w3": {"loss": {"fidelity_weights": {"gfn2": 3.0}}},
          "emb": {"model": {"fidelity_embedding": True}},
          "head64": {"model": {"head": {"mlp_hidden": 64}}},
          "rep10": {"data": {"train": [{"source": CHEAP, "fidelity": "gfn1"},
                                       {"source": "EXPENSIVE", "fidelity": "gfn2", "repeat": 10}]}}}


def merged(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) and value else copy.deepcopy(value)
    return out


def expensive_frames(labels: int, selection: str) -> str:
    """The N GFN2 frames: the first N of the trajectory, or N spread evenly over the 700 GFN1 frames."""
    return f"{GFN2}@0:{labels}" if selection == "first" else f"{GFN2}@0:700:{700 // labels}"


def arm_config(arm: str, labels: int, budget_s: float, seed: int, work_dir: str, selection: str = "first") -> dict:
    arm, *levers = arm.split("+")
    config = _arm_config(arm, labels, budget_s, seed, work_dir, expensive_frames(labels, selection))
    for lever in levers:
        change = json.loads(json.dumps(LEVERS[lever]).replace('"EXPENSIVE"',
                                                              json.dumps(expensive_frames(labels, selection))))
        config = merged(config, change)
    if arm != "pretrain_gfn1":
        prefix = "" if selection == "first" else f"{selection}_"
        config["run_dir"] = os.path.join(work_dir, f"{prefix}{'+'.join([arm] + levers)}_{labels}_seed{seed}"
                                                   + budget_suffix(budget_s))
    return config


def _arm_config(arm: str, labels: int, budget_s: float, seed: int, work_dir: str, expensive: str) -> dict:
    config = base_config(budget_s, seed)
    pretrained = os.path.join(work_dir, f"pretrain_gfn1_seed{seed}" + budget_suffix(budget_s))
    if arm == "gfn2_only":
        config["data"].update(train=expensive, valid=VALID, e0s=E0S["gfn2"])
    elif arm == "multi":
        config["data"].update(train=[{"source": CHEAP, "fidelity": "gfn1"}, {"source": expensive, "fidelity": "gfn2"}],
                              valid=[{"source": VALID, "fidelity": "gfn2"}], e0s=E0S)
        config["model"]["fidelities"] = ["gfn1", "gfn2"]
    elif arm == "transfer":
        config["data"].update(train=[{"source": expensive, "fidelity": "gfn2"}],
                              valid=[{"source": VALID, "fidelity": "gfn2"}], e0s={"gfn2": E0S["gfn2"]})
        config["model"] = {"fidelities": ["gfn1", "gfn2"]}  # the rest from the pretrained run
        config["training"].update(init_from=pretrained,
                                  freeze_backbone_fraction=0.1)
    elif arm == "pretrain_gfn1":
        config["run_dir"] = pretrained
        config["data"].update(train=[{"source": CHEAP, "fidelity": "gfn1"}],
                              valid=[{"source": f"{GFN1}@750:800", "fidelity": "gfn1"}], e0s={"gfn1": E0S["gfn1"]})
        config["model"]["fidelities"] = ["gfn1"]
    else:
        raise ValueError(arm)
    return config


def train(config: dict, work_dir: str, core: int) -> float:
    """Train one arm on one core; returns the wall time."""
    name = os.path.basename(config["run_dir"])
    if os.path.exists(os.path.join(config["run_dir"], "summary.json")):
        print(f"{name}: done before, reused")
        return float("nan")
    path = os.path.join(work_dir, f"{name}.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    start = time.monotonic()
    with open(os.path.join(work_dir, f"{name}.log"), "w") as log:
        code = subprocess.call(["taskset", "-c", str(core), sys.executable, "-m", "mlip.cli", "train", path],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLIP_COMPILATION_CACHE": "off"})
    if code != 0:
        raise SystemExit(f"{name}: training failed, see {work_dir}/{name}.log")
    return time.monotonic() - start


def test_errors(run_dir: str) -> dict:
    """Energy and force errors of the run's gfn2 (default) predictions on the held-out GFN2 frames."""
    from mlip.data.batching import build_samples
    from mlip.data.reader import read_frames
    from mlip.training.checkpoint import load_potential
    from mlip.training.evaluation import Predictor, compute_metrics

    potential, params = load_potential(run_dir)
    samples = build_samples(read_frames(TEST), potential.cutoff)
    metrics = compute_metrics(samples, Predictor(potential, compute_stress=False).predict(params, samples))
    return {"forces_mae_meV_A": 1e3 * metrics["forces_mae"], "forces_rmse_meV_A": 1e3 * metrics["forces_rmse"],
            "energy_mae_meV_atom": 1e3 * metrics["energy_mae_per_atom"]}


def run(budget_s: float, labels: list[int], seeds: list[int], work_dir: str, core: int,
        arms: list[str] = ("gfn2_only", "multi", "transfer"), selection: str = "first") -> dict:
    os.makedirs(work_dir, exist_ok=True)
    recorded = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {"results": {}}
    for seed in seeds:
        if any(arm.startswith("transfer") for arm in arms):
            pretrain = arm_config("pretrain_gfn1", 0, budget_s, seed, work_dir)
            wall = train(pretrain, work_dir, core)
            if wall == wall and budget_s == BASE_BUDGET_S:  # not reused; the table's budget
                recorded.setdefault("pretrain_wall_s", {})[str(seed)] = round(wall, 1)
        for n in labels:
            for arm in arms:
                config = arm_config(arm, n, budget_s, seed, work_dir, selection)
                train(config, work_dir, core)
                errors = test_errors(config["run_dir"])
                print(f"{arm:16s} N={n:4d} seed {seed}: F MAE {errors['forces_mae_meV_A']:.1f} meV/Å, "
                      f"E MAE {errors['energy_mae_meV_atom']:.2f} meV/atom", flush=True)
                # Re-read before writing: another invocation (other arms, another core) may have added results.
                if os.path.exists(RESULTS):
                    on_disk = json.load(open(RESULTS))
                    recorded = {**on_disk, "pretrain_wall_s": {**on_disk.get("pretrain_wall_s", {}),
                                                               **recorded.get("pretrain_wall_s", {})}}
                recorded.setdefault(results_key(budget_s), {})[f"{selection}/{arm}/{n}/seed{seed}"] = errors
                recorded.update(machine={"cpu": cpu_model(), "cores_per_run": 1}, budget_s=BASE_BUDGET_S)
                with open(RESULTS, "w") as stream:
                    json.dump(recorded, stream, indent=1)
    return recorded


ARM_LABELS = {"gfn2_only": "GFN2 only", "multi": "multi-fidelity", "transfer": "GFN1 pretrain → GFN2"}


def _mean(results: dict, prefix: str, key: str = "forces_mae_meV_A") -> tuple[float, int]:
    import numpy as np

    values = [v[key] for k, v in results.items() if k.rsplit("/", 1)[0] == prefix]
    return (float(np.mean(values)) if values else float("nan")), len(values)


def _arms(results: dict, selection: str) -> list[str]:
    arms = []
    for key in results:
        chosen, arm, _, _ = key.split("/")
        if chosen == selection and arm not in arms:
            arms.append(arm)
    return sorted(arms, key=lambda arm: (arm != "gfn2_only", arm.startswith("transfer"), arm))


def table(recorded: dict) -> str:
    """Per frame selection: GFN2 test force MAE of every arm, and its ratio to GFN2 only."""
    results = recorded["results"]
    lines = []
    for selection in ("spread", "first"):
        arms = _arms(results, selection)
        if not arms:
            continue
        what = ("spread evenly over frames 0:700" if selection == "spread"
                else "the first N frames of the trajectory (0.5 ps for 50)")
        lines += [f"GFN2 labels {what}: GFN2 test force MAE in meV/Å (ratio to GFN2 only), energy MAE in meV/atom",
                  "", "| GFN2 labels | " + " | ".join(ARM_LABELS.get(arm, arm) for arm in arms) + " |",
                  "|---|" + "---|" * len(arms)]
        labels = sorted({int(key.split("/")[2]) for key in results if key.startswith(selection + "/")})
        for n in labels:
            only, _ = _mean(results, f"{selection}/gfn2_only/{n}")
            cells = []
            for arm in arms:
                forces, seeds = _mean(results, f"{selection}/{arm}/{n}")
                energy, _ = _mean(results, f"{selection}/{arm}/{n}", "energy_mae_meV_atom")
                ratio = "" if arm == "gfn2_only" else f" ({only / forces:.2f}×)"
                cells.append(f"{forces:.1f}{ratio}, E {energy:.2f}" if seeds else "–")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def budget_table(recorded: dict) -> str:
    """Label counts run at other budgets than the table's: the arms run there, by budget."""
    budgets = sorted([BASE_BUDGET_S] + [float(key[len("results_"):-1]) for key in recorded
                                         if key.startswith("results_") and key.endswith("s")])
    by_budget = {budget: recorded.get(results_key(budget), {}) for budget in budgets}
    lines = []
    for selection in ("spread", "first"):
        longer = {key.rsplit("/", 1)[0] for budget in budgets[1:] for key in by_budget[budget]
                  if key.startswith(selection + "/")}
        for n in sorted({int(prefix.split("/")[2]) for prefix in longer}):
            arms = sorted({prefix.split("/")[1] for prefix in longer if prefix.endswith(f"/{n}")},
                          key=lambda arm: (arm != "gfn2_only", arm))
            if "gfn2_only" not in arms:
                continue
            lines += [f"{n} GFN2 labels ({selection}): GFN2 test force MAE in meV/Å (ratio to GFN2 only at the "
                      "same budget; means over the seeds), by training budget per run", "",
                      "| budget | seeds | " + " | ".join(ARM_LABELS.get(arm, arm) for arm in arms) + " |",
                      "|---|---|" + "---|" * len(arms)]
            for budget in budgets:
                if not any(key.startswith(f"{selection}/{arm}/{n}/") for arm in arms for key in by_budget[budget]):
                    continue
                only, _ = _mean(by_budget[budget], f"{selection}/gfn2_only/{n}")
                cells = []
                for arm in arms:
                    forces, seeds = _mean(by_budget[budget], f"{selection}/{arm}/{n}")
                    ratio = "" if arm == "gfn2_only" else f" ({only / forces:.2f}×)"
                    cells.append(f"{forces:.1f}{ratio}" if seeds else "–")
                seeds = sorted({key.rsplit("/", 1)[1][len("seed"):] for key in by_budget[budget]
                                if key.startswith(f"{selection}/") and key.split("/")[2] == str(n)})
                lines.append(f"| {budget:g} s | {', '.join(seeds)} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip()


def plot(recorded: dict, path: str, selection: str = "spread") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = recorded["results"]
    figure, axis = plt.subplots(figsize=(5, 3.6))
    for arm in _arms(results, selection):
        labels = sorted({int(key.split("/")[2]) for key in results if key.startswith(f"{selection}/{arm}/")})
        axis.semilogx(labels, [_mean(results, f"{selection}/{arm}/{n}")[0] for n in labels], "o-",
                    label=ARM_LABELS.get(arm, arm))
    ticks = sorted({int(key.split("/")[2]) for key in results if key.startswith(selection + "/")})
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.minorticks_off()
    axis.set_ylim(bottom=0)
    axis.set_xlabel("GFN2 training labels")
    axis.set_ylabel("GFN2 test force MAE (meV/Å)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["run", "table"])
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--labels", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--core", type=int, default=1, help="the CPU core every run is pinned to")
    parser.add_argument("--arms", nargs="+", default=["gfn2_only", "multi", "transfer"],
                        help=f"gfn2_only, multi, transfer, each optionally +lever ({', '.join(LEVERS)})")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "benchmark_multifidelity"))
    parser.add_argument("--selection", choices=["first", "spread"], default="spread",
                        help="the N GFN2 frames: the first N of the trajectory, or N spread over frames 0:700")
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args(argv)
    if args.part == "run":
        recorded = run(args.budget_s, args.labels, args.seeds, args.work_dir, args.core, args.arms, args.selection)
    else:
        recorded = json.load(open(RESULTS))
    text = table(recorded)
    if args.docs:
        plot(recorded, os.path.join(ROOT, "docs", "benchmark_multifidelity.png"))
        text += (f"\n\n![GFN2 test force MAE against GFN2 labels](benchmark_multifidelity.png)\n\n"
                 f"Budget {recorded['budget_s']:.0f} s per run on one core of {recorded['machine']['cpu']}; "
                 "the GFN1 pretraining took " + ", ".join(f"{wall:.0f} s (seed {seed})" for seed, wall in
                                                          recorded.get("pretrain_wall_s", {}).items())
                 + " more, once. The row of 700 labels is GFN2 only on every GFN2 label of frames 0:700: "
                   "the floor for any use of fewer.")
    publish_table(text, "multifidelity", "Multi-fidelity: GFN1 + GFN2 ethanol", args.docs)
    by_budget = budget_table(recorded)
    if by_budget:
        print()
        publish_table(by_budget, "multifidelity-budget", "Multi-fidelity: the same labels, longer training",
                      args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
