"""Backbones side by side: MACE, the equivariant transformer (ET), MACE + all-to-all attention, TransIP.

    python scripts/benchmark_backbones.py [--budget-s 300] [--datasets ethanol long_range] [--docs]
    python scripts/benchmark_backbones.py cost [--sizes 96 384 1536 3072 6144] [--docs]
    python scripts/benchmark_backbones.py table [--docs]    # the tables again from the recorded JSON

For each data set and model, `mlip train` for the same wall-clock budget (no compilation
cache: every model compiles cold), then on the held-out test frames the energy and force
MAE, on the long-range set also binned by fragment separation (beyond the 5 Å cutoff is
where all-to-all attention should pay), the parameter count, and on-device NVE MD speed
on CPU for one molecule of the set.

Data sets (shipped, GFN2-xTB):
  ethanol     data/ethanol_gfn2_500K.extxyz: train 0:400, valid 400:500, test 600: (quickstart's loss)
  long_range  data/ion_pairs_gfn2.extxyz: train 0:400, valid 400:480, test 480: (charges −1/0/+1;
              configs/long_range_les.yaml's loss)
Models (the MACE models train with the data set's config's optimizer, the others with their own):
  mace        configs/all_to_all.yaml without the all-to-all block (MACE + charge/spin embedding)
  transformer configs/transformer.yaml
  mace+all_to_all configs/all_to_all.yaml
  transip     configs/transip.yaml (with its rotation augmentation)

``cost``: energy and forces of one water cluster of N atoms (non-periodic, 3.1 Å grid),
float32, compiled, fastest of 3 calls, with the shipped configs' models at random weights:
MACE, MACE + the all-to-all block (O(N²)), the transformer; shows where the quadratic
block stops paying against the local backbone.

Results go to docs/benchmark_backbones*.json and, with --docs, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_common import ROOT, cpu_model, publish_table, run_with_budget  # noqa: E402
from benchmark_long_range import binned_errors  # noqa: E402

DOCS = os.path.join(ROOT, "docs")
CONFIGS = os.path.join(ROOT, "configs")


def _load(name: str) -> dict:
    return yaml.safe_load(open(os.path.join(CONFIGS, name)))


def models() -> dict:
    """name -> (model section, training settings over the data set's) from the shipped configs."""
    all_to_all, transformer, transip = _load("all_to_all.yaml"), _load("transformer.yaml"), _load("transip.yaml")
    mace = copy.deepcopy(all_to_all["model"])
    del mace["all_to_all"]
    return {"mace": (mace, {}),
            "transformer": (transformer["model"], {"optimizer": transformer["training"]["optimizer"]}),
            "mace+all_to_all": (all_to_all["model"], {}),
            "transip": (transip["model"], {"optimizer": transip["training"]["optimizer"],
                                           "rotation_augmentation": True})}


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
    model_section, training = models()[model]
    config = copy.deepcopy(base)
    config["model"] = copy.deepcopy(model_section)
    config["training"].update(copy.deepcopy(training))
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


def equivariance(run_dir: str, test_spec: str, rotation_average=None, frames: int = 10, turns: int = 8) -> dict:
    """How far from invariant a TransIP model stays: over ``turns`` random rotations of each of
    ``frames`` test frames, the energy spread (std, meV/atom) and the force equivariance error
    mean|F(g·x) − g·F(x)| / mean|F|."""
    import ase.io

    from mlip.calculator import MLIPCalculator

    calc = MLIPCalculator.from_run(run_dir, rotation_average=rotation_average)
    path, index = test_spec.rsplit("@", 1)
    rng = np.random.default_rng(0)
    spreads, errors, sizes = [], [], []
    for atoms in ase.io.read(os.path.join(ROOT, path), index=index)[:frames]:
        atoms.calc = calc
        energy, forces = [atoms.get_potential_energy()], atoms.get_forces()
        for _ in range(turns):
            q, r = np.linalg.qr(rng.normal(size=(3, 3)))
            rotation = q * np.sign(np.diag(r))
            rotation *= np.sign(np.linalg.det(rotation))
            turned = atoms.copy()
            turned.positions = atoms.positions @ rotation.T
            turned.calc = calc
            energy.append(turned.get_potential_energy())
            errors.append(np.abs(turned.get_forces() - forces @ rotation.T).mean())
            sizes.append(np.abs(forces).mean())
        spreads.append(np.std(energy) / len(atoms))
    return {"energy_spread_meV_atom": 1e3 * float(np.mean(spreads)),
            "force_equivariance_error": float(np.mean(errors) / np.mean(sizes))}


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
            if model == "transip":
                row["equivariance"] = equivariance(run_dir, test_spec)
                row["equivariance_rotation_average_24"] = equivariance(run_dir, test_spec, 24)
            results.setdefault(dataset, {})[model] = row
            print(dataset, model, json.dumps(row), flush=True)
    return results


def table(results: dict, budget_s: float, cores: int) -> str:
    lines = [f"Same wall-clock budget ({budget_s:g} s of training each, {cores} CPU core(s), float32, cold "
             "compile); test errors from the calculator; MD: NVE at 0.5 fs on one test structure.", ""]
    order = list(models())
    for dataset, rows in results.items():
        rows = dict(sorted(rows.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
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
        for model, row in rows.items():
            if "equivariance" in row:
                plain, averaged = row["equivariance"], row["equivariance_rotation_average_24"]
                lines += [f"{model} on {dataset}, not equivariant by construction: over 8 random rotations of 10 "
                          f"test frames the energy spreads by {plain['energy_spread_meV_atom']:.2f} meV/atom (std) "
                          f"and the force equivariance error mean|F(gx) − gF(x)| / mean|F| is "
                          f"{plain['force_equivariance_error']:.3f}; averaged over 24 fixed rotations at inference "
                          f"{averaged['energy_spread_meV_atom']:.2f} meV/atom and "
                          f"{averaged['force_equivariance_error']:.3f}.", ""]
    return "\n".join(lines)


def water_cluster(n_atoms: int):
    from ase.build import molecule

    side = math.ceil((n_atoms / 3) ** (1 / 3))
    water = molecule("H2O")
    cluster = water.copy()
    cluster = cluster[:0]
    for index in np.ndindex(side, side, side):
        if len(cluster) >= n_atoms:
            break
        placed = water.copy()
        placed.positions += 3.1 * np.asarray(index)
        cluster += placed
    cluster.rattle(0.05, seed=0)
    return cluster


def cost(sizes: list[int]) -> list[dict]:
    import jax

    from mlip.data.batching import build_samples, pack_samples
    from mlip.data.reader import Frame
    from mlip.data.statistics import DatasetStatistics
    from mlip.model_config import ModelConfig
    from mlip.potential import Potential
    from mlip.training.checkpoint import dummy_graph

    statistics = DatasetStatistics(atomic_numbers=(1, 8), e0={1: 0.0, 8: 0.0}, shift=0.0, scale=1.0,
                                   avg_num_neighbors=10.0)
    rows = []
    for n in sizes:
        atoms = water_cluster(n)
        frame = Frame(positions=atoms.positions, numbers=atoms.numbers, cell=np.zeros((3, 3)), pbc=np.zeros(3, bool))
        row = {"n_atoms": len(atoms)}
        for name, (model, _) in models().items():
            if name == "transip":
                continue
            model = {**model, "dtype": "float32"}
            if "all_to_all" in model:
                model["all_to_all"] = {**model["all_to_all"], "max_atoms": 10**9}  # time the O(N²) form itself
            potential = Potential(ModelConfig.model_validate(model), statistics)
            params = potential.init(jax.random.PRNGKey(0), dummy_graph(statistics.atomic_numbers))
            graph = pack_samples(build_samples([frame], potential.cutoff), None, None, np.float32)
            call = jax.jit(lambda p, g: potential.apply(p, g, True, False)["forces"])
            jax.block_until_ready(call(params, graph))
            times = []
            for _ in range(3):
                start = time.perf_counter()
                jax.block_until_ready(call(params, graph))
                times.append(time.perf_counter() - start)
            row[f"{name}_s"] = min(times)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def cost_table(rows: list[dict], cores: int) -> str:
    lines = [f"Energy and forces of one water cluster (non-periodic), float32, {cores} CPU core(s), fastest of 3 "
             "compiled calls; ms (µs/atom).", "",
             "| atoms | MACE | transformer | MACE + all-to-all | all-to-all block alone |", "|---|---|---|---|---|"]
    for row in rows:
        n = row["n_atoms"]
        cell = lambda seconds: f"{seconds * 1e3:.1f} ({seconds / n * 1e6:.0f})"  # noqa: E731
        block = row["mace+all_to_all_s"] - row["mace_s"]
        lines.append(f"| {n} | {cell(row['mace_s'])} | {cell(row['transformer_s'])} | "
                     f"{cell(row['mace+all_to_all_s'])} | {cell(block)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "table":
        recorded = json.load(open(os.path.join(DOCS, "benchmark_backbones.json")))
        text = table(recorded["results"], recorded["budget_s"], recorded["machine"]["cores"])
        return publish_table(text, "backbones", "Backbones: MACE, equivariant transformer, all-to-all attention",
                             "--docs" in argv)
    if argv and argv[0] == "cost":
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--sizes", type=int, nargs="+", default=[96, 384, 1536, 3072, 6144])
        parser.add_argument("--docs", action="store_true")
        args = parser.parse_args(argv[1:])
        rows = cost(args.sizes)
        cores = len(os.sched_getaffinity(0))
        with open(os.path.join(DOCS, "benchmark_backbones_cost.json"), "w") as stream:
            json.dump({"machine": {"cpu": cpu_model(), "cores": cores}, "rows": rows}, stream, indent=1)
        text = cost_table(rows, cores)
        return publish_table(text, "backbones-cost", "Attention: cost by system size", args.docs)
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
    return publish_table(text, "backbones", "Backbones: MACE, equivariant transformer, all-to-all attention",
                         args.docs)


if __name__ == "__main__":
    sys.exit(main())
