"""Backbones side by side: MACE, the equivariant transformer (ET) and MACE + all-to-all attention.

    python scripts/benchmark_backbones.py [--budget-s 300] [--datasets ethanol long_range] [--docs]

For each data set and model, `mlip train` for the same wall-clock budget (no compilation
cache: every model compiles cold), then on the held-out test frames the energy and force
MAE, on the long-range set also binned by fragment separation (beyond the 5 Å cutoff is
where all-to-all attention should pay), the parameter count, and on-device NVE MD speed
on CPU for one molecule of the set.

Data sets (shipped, GFN2-xTB):
  ethanol     data/ethanol_gfn2_500K.extxyz: train 0:400, valid 400:500, test 600: (quickstart's loss)
  long_range  data/ion_pairs_gfn2.extxyz: train 0:400, valid 400:480, test 480: (charges −1/0/+1;
              configs/long_range_les.yaml's loss)
Models (the MACE models train with the data set's config's optimizer, the transformer with its own):
  mace        configs/all_to_all.yaml without the all-to-all block (MACE + charge/spin embedding)
  transformer configs/transformer.yaml
  mace+all_to_all configs/all_to_all.yaml

Results go to docs/benchmark_backbones.json and, with --docs, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_common import ROOT, cpu_model, replace_marked_section, run_with_budget  # noqa: E402
from benchmark_long_range import binned_errors  # noqa: E402

DOCS = os.path.join(ROOT, "docs")
CONFIGS = os.path.join(ROOT, "configs")


def _load(name: str) -> dict:
    return yaml.safe_load(open(os.path.join(CONFIGS, name)))


def models() -> dict:
    """name -> (model section, optimizer or None for the data set's) from the shipped configs."""
    all_to_all, transformer = _load("all_to_all.yaml"), _load("transformer.yaml")
    mace = copy.deepcopy(all_to_all["model"])
    del mace["all_to_all"]
    return {"mace": (mace, None),
            "transformer": (transformer["model"], transformer["training"]["optimizer"]),
            "mace+all_to_all": (all_to_all["model"], None)}


def datasets() -> dict:
    """name -> (base config, test spec, binned by separation?)."""
    ethanol = _load("quickstart.yaml")
    ethanol["data"]["charge_key"] = "total_charge"  # absent in the file: every frame neutral
    long_range = _load("long_range_les.yaml")
    test = long_range["data"].pop("test")
    return {"ethanol": (ethanol, "data/ethanol_gfn2_500K.extxyz@600:", False),
            "long_range": (long_range, test, True)}


def train(dataset: str, model: str, budget_s: float, work_dir: str) -> str:
    base, _, _ = datasets()[dataset]
    model_section, optimizer = models()[model]
    config = copy.deepcopy(base)
    config["model"] = copy.deepcopy(model_section)
    if optimizer is not None:
        config["training"]["optimizer"] = optimizer
    config["training"].update(max_time=budget_s, max_epochs=100000, progress_bar=False)
    name = f"{dataset}-{model}"
    run_dir = os.path.join(work_dir, name)
    if os.path.exists(run_dir):
        raise SystemExit(f"{run_dir} exists: remove it or pass another --work-dir")
    config["run_dir"] = run_dir
    path = os.path.join(work_dir, f"{name}.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    env = {**os.environ, "MLIP_COMPILATION_CACHE": "off"}
    run_with_budget([sys.executable, "-m", "mlip.cli", "train", path], budget_s + 240,
                    os.path.join(work_dir, f"{name}.log"), env=env)
    return run_dir


def test_errors(run_dir: str, test_spec: str) -> dict:
    import ase.io

    from mlip.calculator import MLIPCalculator

    calc = MLIPCalculator.from_run(run_dir)
    path, index = test_spec.rsplit("@", 1)
    energy, forces = [], []
    for atoms in ase.io.read(os.path.join(ROOT, path), index=index):
        reference_energy, reference_forces = atoms.info["REF_energy"], atoms.arrays["REF_forces"]
        atoms.calc = calc
        energy.append(abs(atoms.get_potential_energy() - reference_energy) / len(atoms))
        forces.append(np.abs(atoms.get_forces() - reference_forces).mean())
    return {"n_frames": len(energy), "energy_mae_meV_atom": 1e3 * float(np.mean(energy)),
            "forces_mae_meV_A": 1e3 * float(np.mean(forces))}


def parameter_count(run_dir: str) -> int:
    import jax

    from mlip.training.checkpoint import load_potential

    _, params = load_potential(run_dir)
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def md_speed(run_dir: str, test_spec: str, steps: int = 400) -> dict:
    """NVE steps per second of one test molecule (0.5 fs), after one compiled block."""
    import ase.io

    from mlip.md.simulation import MolecularDynamics
    from mlip.training.checkpoint import load_potential

    potential, params = load_potential(run_dir)
    path, index = test_spec.rsplit("@", 1)
    atoms = ase.io.read(os.path.join(ROOT, path), index=index.split(":")[0] or "0")
    # Speed only: a model trained briefly may heat the molecule; the limits only stop a blow-up.
    md = MolecularDynamics(potential, params, atoms, ensemble="nve", timestep_fs=0.5, max_temperature_K=1e6,
                           min_distance_fraction=0.1)
    md.run(100)
    start = time.perf_counter()
    md.run(steps)
    elapsed = time.perf_counter() - start
    return {"md_atoms": len(atoms), "md_steps_per_s": steps / elapsed,
            "md_us_per_atom_step": 1e6 * elapsed / steps / len(atoms)}


def run(budget_s: float, names: list[str], model_names: list[str], work_dir: str) -> dict:
    os.makedirs(work_dir, exist_ok=True)
    results = {}
    for dataset in names:
        _, test_spec, binned = datasets()[dataset]
        for model in model_names:
            run_dir = train(dataset, model, budget_s, work_dir)
            row = test_errors(run_dir, test_spec)
            if binned:
                bins = binned_errors(run_dir, test_spec, [0.0, 5.0, 100.0])["bins"]
                row["within_cutoff"], row["beyond_cutoff"] = bins[0], bins[1]
            row["parameters"] = parameter_count(run_dir)
            row["epochs"] = len(open(os.path.join(run_dir, "metrics.csv")).read().strip().splitlines()) - 1
            row.update(md_speed(run_dir, test_spec))
            results.setdefault(dataset, {})[model] = row
            print(dataset, model, json.dumps(row), flush=True)
    return results


def table(results: dict, budget_s: float, cores: int) -> str:
    lines = [f"Same wall-clock budget ({budget_s:g} s of training each, {cores} CPU core(s), float32, cold "
             "compile); test errors from the calculator; MD: NVE at 0.5 fs on one test structure.", ""]
    for dataset, rows in results.items():
        reference = rows.get("mace")
        header = "| model | parameters | epochs | E MAE (meV/atom) | F MAE (meV/Å) | F MAE / MACE |"
        if dataset == "long_range":
            header += " E MAE beyond 5 Å (meV, frame) | E MAE within 5 Å (meV, frame) |"
        header += " MD steps/s (atoms) |"
        lines += [f"**{dataset}**", "", header, "|" + "---|" * (header.count("|") - 1)]
        for model, row in rows.items():
            ratio = f"{row['forces_mae_meV_A'] / reference['forces_mae_meV_A']:.2f}" if reference else "—"
            cells = [model, f"{row['parameters']:,}", str(row["epochs"]), f"{row['energy_mae_meV_atom']:.2f}",
                     f"{row['forces_mae_meV_A']:.1f}", ratio]
            if dataset == "long_range":
                cells += [f"{row['beyond_cutoff']['energy_mae_meV']:.1f}", f"{row['within_cutoff']['energy_mae_meV']:.1f}"]
            cells.append(f"{row['md_steps_per_s']:.0f} ({row['md_atoms']})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--datasets", nargs="+", default=["ethanol", "long_range"], choices=["ethanol", "long_range"])
    parser.add_argument("--models", nargs="+", default=list(models()), choices=list(models()))
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "benchmark_backbones"))
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    new = run(args.budget_s, args.datasets, args.models, args.work_dir)
    machine = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0))}
    # Runs of a subset of models add to the recorded ones (same budget and machine only).
    path = os.path.join(DOCS, "benchmark_backbones.json")
    results = {}
    if os.path.exists(path):
        recorded = json.load(open(path))
        if recorded["budget_s"] == args.budget_s and recorded["machine"] == machine:
            results = recorded["results"]
    for dataset, rows in new.items():
        results.setdefault(dataset, {}).update(rows)
    with open(path, "w") as stream:
        json.dump({"machine": machine, "budget_s": args.budget_s, "results": results}, stream, indent=1)
    text = table(results, args.budget_s, machine["cores"])
    print(text)
    if args.docs:
        replace_marked_section(os.path.join(DOCS, "benchmarks.md"), "<!-- backbones -->", "<!-- /backbones -->",
                               text, "Backbones: MACE, equivariant transformer, all-to-all attention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
