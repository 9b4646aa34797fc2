"""Continual fine-tuning: does replay keep the old task while the new one is learned?

    python scripts/benchmark_continual.py run --budget-s 150 [--scenarios molecule fidelity] [--docs]
    python scripts/benchmark_continual.py table [--docs]

Scenarios (shipped data, configs/quickstart.yaml's model and loss):
  * ``molecule``: pretrained on ethanol (GFN2, frames 0:400, valid 400:450), fine-tuned on
    n-butane (GFN2, 300 K frames 0:200, valid 450:500). Old task: ethanol GFN2 frames 800:1000;
    new task: butane 300 K frames 500:600.
  * ``fidelity``: pretrained on ethanol GFN1 labels (frames 0:400, model.fidelities [gfn1]),
    fine-tuned on 100 GFN2 labels (frames 0:100, a new gfn2 head). Old task: GFN1 frames
    800:1000 at the gfn1 head; new task: GFN2 frames 800:1000 at the gfn2 head.
Arms, after the pretraining: ``naive`` (init_from, no replay) and ``replay`` (init_from, a
quarter of every epoch drawn afresh from the pretraining run's training frames); both at
learning rate 0.005 with the backbone frozen for the first 10 %, each for the same
wall-clock budget on one CPU core. Goal (issue 17): replay keeps the old task's force MAE
within 1.2x of before, and its new-task force MAE within 1.2x of naive fine-tuning's.
Results: docs/benchmark_continual.json, the table in docs/benchmarks.md with --docs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_common import ROOT, cpu_model, publish_table  # noqa: E402
from benchmark_multifidelity import BASE_BUDGET_S, base_config, budget_suffix, train  # noqa: E402

DATA = os.path.join(ROOT, "data")
ETHANOL2 = os.path.join(DATA, "ethanol_gfn2_500K.extxyz")
ETHANOL1 = os.path.join(DATA, "ethanol_gfn1_500K.extxyz")
BUTANE = os.path.join(DATA, "butane_gfn2_300K.extxyz")
RESULTS = os.environ.get("MLIP_BENCHMARK_RESULTS", os.path.join(ROOT, "docs", "benchmark_continual.json"))

SCENARIOS = {
    "molecule": {
        "pretrain": {"train": f"{ETHANOL2}@0:400", "valid": f"{ETHANOL2}@400:450",
                     "e0s": os.path.join(DATA, "ethanol_gfn2_e0s.json")},
        "finetune": {"train": f"{BUTANE}@0:200", "valid": f"{BUTANE}@450:500"},
        "old_test": (f"{ETHANOL2}@800:1000", None), "new_test": (f"{BUTANE}@500:600", None)},
    "fidelity": {
        "pretrain": {"train": [{"source": f"{ETHANOL1}@0:400", "fidelity": "gfn1"}],
                     "valid": [{"source": f"{ETHANOL1}@400:450", "fidelity": "gfn1"}],
                     "e0s": {"gfn1": os.path.join(DATA, "ethanol_gfn1_e0s.json")}},
        "pretrain_model": {"fidelities": ["gfn1"]},
        "finetune": {"train": [{"source": f"{ETHANOL2}@0:100", "fidelity": "gfn2"}],
                     "valid": [{"source": f"{ETHANOL2}@400:450", "fidelity": "gfn2"}],
                     "e0s": {"gfn2": os.path.join(DATA, "ethanol_gfn2_e0s.json")}},
        "finetune_model": {"fidelities": ["gfn1", "gfn2"]},
        "old_test": (f"{ETHANOL1}@800:1000", "gfn1"), "new_test": (f"{ETHANOL2}@800:1000", "gfn2")},
}


def configs(scenario: str, budget_s: float, work_dir: str, fraction: float = 0.25,
            pretrain_budget_s: float = BASE_BUDGET_S) -> dict:
    spec = SCENARIOS[scenario]
    pretrain = base_config(pretrain_budget_s, 0)
    pretrain["run_dir"] = os.path.join(work_dir, f"{scenario}_pretrain" + budget_suffix(pretrain_budget_s))
    pretrain["data"].update(spec["pretrain"])
    pretrain["model"].update(spec.get("pretrain_model", {}))
    out = {"pretrain": pretrain}
    for arm in ("naive", "replay"):
        config = base_config(budget_s, 0)
        config.pop("model")  # the pretrained run's
        suffix = f"{fraction:g}" if arm == "replay" and fraction != 0.25 else ""
        suffix += budget_suffix(budget_s) + budget_suffix(pretrain_budget_s).replace("_", "_pre")
        config["run_dir"] = os.path.join(work_dir, f"{scenario}_{arm}{suffix}")
        config["data"] = {**spec["finetune"], **({"replay": {"fraction": fraction}} if arm == "replay" else {})}
        if "finetune_model" in spec:
            config["model"] = spec["finetune_model"]
        config["training"].update(init_from=pretrain["run_dir"], freeze_backbone_fraction=0.1)
        config["training"]["optimizer"]["learning_rate"] = 0.005
        out[arm] = config
    return out


def forces_mae(run_dir: str, spec: str, fidelity) -> float:
    from mlip.data.batching import build_samples
    from mlip.data.reader import read_frames
    from mlip.training.checkpoint import load_potential
    from mlip.training.evaluation import Predictor, compute_metrics

    potential, params = load_potential(run_dir, fidelity=fidelity)
    samples = build_samples(read_frames(spec), potential.cutoff)
    metrics = compute_metrics(samples, Predictor(potential, compute_stress=False).predict(params, samples))
    return 1e3 * metrics["forces_mae"]


def run(budget_s: float, scenarios: list[str], work_dir: str, core: int, fraction: float = 0.25,
        pretrain_budget_s: float = BASE_BUDGET_S, arms: tuple = ("naive", "replay")) -> dict:
    """Train the pretraining and ``arms`` of each scenario; tabulate a scenario once both arms are done
    (two invocations, one arm each on its own core, run side by side)."""
    os.makedirs(work_dir, exist_ok=True)
    recorded = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {"results": {}}
    for scenario in scenarios:
        spec, runs = SCENARIOS[scenario], configs(scenario, budget_s, work_dir, fraction, pretrain_budget_s)
        for name in ("pretrain", *arms):
            train(runs[name], work_dir, core)
        if not all(os.path.exists(os.path.join(runs[arm]["run_dir"], "summary.json")) for arm in ("naive", "replay")):
            print(f"{scenario}: trained {', '.join(arms)}; the table waits for the other arm", flush=True)
            continue
        result = {"old_before": forces_mae(runs["pretrain"]["run_dir"], *spec["old_test"])}
        if spec["new_test"][1] is None:  # a new molecule: the pretrained model's error on it, for scale
            result["new_before"] = forces_mae(runs["pretrain"]["run_dir"], *spec["new_test"])
        for arm in ("naive", "replay"):
            result[f"old_after_{arm}"] = forces_mae(runs[arm]["run_dir"], *spec["old_test"])
            result[f"new_after_{arm}"] = forces_mae(runs[arm]["run_dir"], *spec["new_test"])
        settings = ([] if fraction == 0.25 else [f"replay {fraction:g}"]) + (
            [] if pretrain_budget_s == BASE_BUDGET_S else [f"pretraining {pretrain_budget_s:g} s"]) + (
            [] if budget_s == BASE_BUDGET_S else [f"fine-tuning {budget_s:g} s"])
        name = scenario + (f" ({', '.join(settings)})" if settings else "")
        if os.path.exists(RESULTS):  # another invocation may have added results meanwhile
            recorded = {**json.load(open(RESULTS)), **{k: v for k, v in recorded.items() if k != "results"}}
        recorded["results"][name] = result
        print(scenario, json.dumps(result), flush=True)
        recorded.update(machine={"cpu": cpu_model(), "cores_per_run": 1}, budget_s=BASE_BUDGET_S)  # rows name others
        with open(RESULTS, "w") as stream:
            json.dump(recorded, stream, indent=1)
    return recorded


def table(recorded: dict) -> str:
    lines = ["| scenario | old task F MAE before (meV/Å) | after naive | after replay | replay/before | "
             "new task F MAE naive | replay | replay/naive |", "|---|---|---|---|---|---|---|---|"]
    for scenario, r in recorded["results"].items():
        lines.append(f"| {scenario} | {r['old_before']:.1f} | {r['old_after_naive']:.1f} | {r['old_after_replay']:.1f} | "
                     f"{r['old_after_replay'] / r['old_before']:.2f}× | {r['new_after_naive']:.1f} | "
                     f"{r['new_after_replay']:.1f} | {r['new_after_replay'] / r['new_after_naive']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["run", "table"])
    parser.add_argument("--budget-s", type=float, default=BASE_BUDGET_S,
                        help="seconds of each fine-tuning (other than 150: run directories and rows of their own)")
    parser.add_argument("--pretrain-budget-s", type=float, default=BASE_BUDGET_S)
    parser.add_argument("--arms", nargs="+", choices=["naive", "replay"], default=["naive", "replay"],
                        help="the fine-tuning arms to train in this invocation")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--core", type=int, default=1)
    parser.add_argument("--replay-fraction", type=float, default=0.25)
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "benchmark_continual"))
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args(argv)
    recorded = (run(args.budget_s, args.scenarios, args.work_dir, args.core, args.replay_fraction,
                    args.pretrain_budget_s, tuple(args.arms))
                if args.part == "run"
                else json.load(open(RESULTS)))
    text = table(recorded) + (f"\n\nBudget {recorded['budget_s']:.0f} s per run (pretraining and each fine-tuning, "
                              f"unless the row says otherwise) on one core of {recorded['machine']['cpu']}.")
    return publish_table(text, "continual", "Continual fine-tuning: naive against replay", args.docs)


if __name__ == "__main__":
    sys.exit(main())
