"""Long-range terms: accuracy of local against long-range models, and the cost of each term by size.

    python scripts/benchmark_long_range.py cost [--sizes 64 512 1728 4096 8000 10648]
    python scripts/benchmark_long_range.py accuracy [--budget-s 300]

``cost``: per call (energy and forces, float32, compiled, fastest of ``--repeats``) in
  periodic rock-salt cells of N atoms, of
  * the LES term (Gaussian charges σ = 1 Å, |k| ≤ π Å⁻¹): the direct sum over k vectors
    and the particle mesh;
  * one Ewald message-passing block's reciprocal sum (32 channels, |k| ≤ 1.2 Å⁻¹, mesh);
  * the classical point-charge Ewald sum at relative accuracy 1e-5, α chosen by
    `ewald_parameters` (N^1.5), with the host's vesin pair list at r_c timed apart;
  * the non-periodic erf direct sum (LES in a molecule of N atoms), O(N²).
  The point-charge sum and the direct sum stop at 4096 atoms (``--max-ewald``, ``--max-direct``).
``accuracy``: `mlip train` of configs/long_range_les.yaml as given (les), with the
  long-range term removed (local+charge: the charge/spin embedding only), with neither
  (local), and of configs/long_range_ewald_mp.yaml (ewald_mp), each for the same
  wall-clock budget on data/ion_pairs_gfn2.extxyz; test errors binned by the separation of
  the two fragments, a plot, the table in docs/benchmarks.md.

Results go to docs/benchmark_long_range*.json and, with --docs, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_common import ROOT, cpu_model, publish_table, run_with_budget  # noqa: E402

DOCS = os.path.join(ROOT, "docs")


# ----------------------------------------------------------------------------- cost

def rock_salt(n_atoms_target: int, seed: int = 0):
    from ase.build import bulk

    repeat = max(1, round((n_atoms_target / 8) ** (1 / 3)))
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    return atoms


def best_time(function, repeats: int) -> float:
    import jax

    jax.block_until_ready(function())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return min(times)


def cost(sizes: list[int], repeats: int, max_direct: int, max_ewald: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from mlip.data.neighbours import mesh_shape_for, neighbour_list, reciprocal_indices
    from mlip.physics.ewald import (direct_energy, ewald_parameters, gaussian_charge_energy,
                                    point_charge_energy, reciprocal_potential)

    rows = []
    for target in sizes:
        atoms = rock_salt(target)
        n = len(atoms)
        charges = jnp.asarray(np.where(atoms.numbers == 11, 1.0, -1.0), jnp.float32)
        positions = jnp.asarray(atoms.positions, jnp.float32)
        cell = np.asarray(atoms.cell.array)
        # One structure plus the (empty) padding graph, as MD and the calculator pack it.
        node_graph = jnp.zeros(n, jnp.int32)
        cells = jnp.asarray(np.stack([cell, np.zeros((3, 3))]), jnp.float32)
        row = {"n_atoms": n, "volume_A3": float(atoms.get_volume())}

        start = time.perf_counter()
        k_les = reciprocal_indices(cell, math.pi)
        row["les_host_k_s"] = time.perf_counter() - start
        row["les_k_vectors"] = len(k_les)
        mesh = mesh_shape_for(np.abs(k_les).max(axis=0))
        row["les_mesh"] = list(mesh)
        k_les = jnp.asarray(np.stack([k_les, np.zeros_like(k_les)]))

        def les(k_indices, mesh_shape):
            return jax.jit(jax.value_and_grad(lambda r: jnp.sum(gaussian_charge_energy(
                charges, r, cells, node_graph, k_indices, 1.0, mesh_shape, math.pi))))

        if n * row["les_k_vectors"] <= 1e8:  # the direct sum grows as N²: 1.7 s at 4096 atoms
            les_direct = les(k_les, ())
            row["les_direct_s"] = best_time(lambda: les_direct(positions), repeats)
        les_mesh = les(k_les[:, :0], mesh)
        row["les_mesh_s"] = best_time(lambda: les_mesh(positions), repeats)

        # Ewald message passing: one block's reciprocal sum of 32 channels at |k| <= 1.2, on the mesh.
        k_mp = reciprocal_indices(cell, 1.2)
        mesh_mp = mesh_shape_for(np.abs(k_mp).max(axis=0))
        features = jnp.asarray(np.random.default_rng(0).normal(size=(n, 32)), jnp.float32)
        filter_weights = jnp.asarray(np.random.default_rng(1).normal(size=32), jnp.float32)
        message = jax.jit(jax.value_and_grad(lambda r: jnp.sum(reciprocal_potential(
            features, r, cells, node_graph, jnp.zeros((2, 0, 3), jnp.int32),
            lambda k2: jnp.exp(-k2)[..., None] * filter_weights, mesh_mp, 1.2) ** 2)))
        row["ewald_mp_mesh"] = list(mesh_mp)
        row["ewald_mp_mesh_s"] = best_time(lambda: message(positions), repeats)

        if n > max_ewald:  # tens of millions of pairs beyond this on 2 cores
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        alpha, r_cutoff, k_cutoff = ewald_parameters(n, atoms.get_volume(), 1e-5)
        start = time.perf_counter()
        senders, receivers, shifts = neighbour_list(atoms.positions, cell, np.ones(3, bool), r_cutoff)
        k_points = reciprocal_indices(cell, k_cutoff)
        row["ewald_host_s"] = time.perf_counter() - start
        row.update(ewald_alpha=alpha, ewald_r_cutoff=r_cutoff, ewald_pairs=len(senders),
                   ewald_k_vectors=len(k_points))
        k_points = jnp.asarray(np.stack([k_points, np.zeros_like(k_points)]))
        pairs = tuple(map(jnp.asarray, (senders, receivers, shifts)))
        ewald = jax.jit(jax.value_and_grad(lambda r: jnp.sum(point_charge_energy(
            charges, r, cells, node_graph, k_points, *pairs, alpha, r_cutoff))))
        row["ewald_s"] = best_time(lambda: ewald(positions), repeats)

        if n <= max_direct:
            include = jnp.ones(n, bool)
            direct = jax.jit(jax.value_and_grad(lambda r: jnp.sum(direct_energy(
                charges, r, node_graph, include, 1.0))))
            row["direct_s"] = best_time(lambda: direct(positions), repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def cost_table(rows: list[dict]) -> str:
    def ms(row, key):
        return f"{row[key] * 1e3:.1f}" if key in row else "—"

    lines = ["| atoms | LES k vectors | LES direct (ms) | LES mesh (ms) | LES mesh µs/atom | EwaldMP block, mesh (ms) "
             "| point-charge Ewald, N^1.5 α (ms) | its pairs, k vectors | its host pair list (ms) "
             "| molecule direct sum (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        n = row["n_atoms"]
        pairs = f"{row['ewald_pairs']:,}, {row['ewald_k_vectors']}" if "ewald_pairs" in row else "—"
        lines.append(f"| {n} | {row['les_k_vectors']} | {ms(row, 'les_direct_s')} | {ms(row, 'les_mesh_s')} | "
                     f"{row['les_mesh_s'] / n * 1e6:.1f} | {ms(row, 'ewald_mp_mesh_s')} | {ms(row, 'ewald_s')} | "
                     f"{pairs} | {ms(row, 'ewald_host_s')} | {ms(row, 'direct_s')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- accuracy

DATA = os.path.join(ROOT, "data", "ion_pairs_gfn2.extxyz")
LES_CONFIG = os.path.join(ROOT, "configs", "long_range_les.yaml")
# name -> (config, overrides): the same model, data and training but for the long-range parts.
VARIANTS = {
    "local": (LES_CONFIG, {"model.long_range": None, "model.backbone.charge_spin_embedding": False}),
    "local+charge": (LES_CONFIG, {"model.long_range": None}),
    "les": (LES_CONFIG, {}),
    "ewald_mp": (os.path.join(ROOT, "configs", "long_range_ewald_mp.yaml"), {}),
}


def train_variant(name: str, config_path: str, overrides: dict, budget_s: float, work_dir: str) -> str:
    run_dir = os.path.join(work_dir, name)
    settings = [f"run_dir={run_dir}", f"training.max_time={budget_s}", "training.progress_bar=false"]
    settings += [f"{key}={'null' if value is None else str(value).lower()}" for key, value in overrides.items()]
    command = [sys.executable, "-m", "mlip.cli", "train", config_path]
    for setting in settings:
        command += ["--set", setting]
    # The budget covers training; start-up, the final evaluation and plots get a grace period.
    # No compilation cache: every variant compiles cold, as on a new machine.
    env = {**os.environ, "MLIP_COMPILATION_CACHE": "off"}
    run_with_budget(command, budget_s + 240, os.path.join(work_dir, f"{name}.log"), env=env)
    return run_dir


def binned_errors(run_dir: str, test_spec: str, bins: list[float]) -> dict:
    import ase.io

    from mlip.calculator import MLIPCalculator

    calc = MLIPCalculator.from_run(run_dir)
    path, index = test_spec.rsplit("@", 1)
    frames = ase.io.read(path, index=index)
    records = []
    for atoms in frames:
        reference_energy = atoms.info["REF_energy"]
        reference_forces = atoms.arrays["REF_forces"]
        labelled = atoms.copy()
        labelled.calc = calc
        energy = labelled.get_potential_energy()
        forces = labelled.get_forces()
        records.append((atoms.info["separation"], abs(energy - reference_energy),
                        np.abs(forces - reference_forces).mean()))
    records = np.asarray(records)
    result = {"n_frames": len(records), "bins": []}
    for low, high in zip(bins[:-1], bins[1:]):
        inside = (records[:, 0] >= low) & (records[:, 0] < high)
        if inside.any():
            result["bins"].append({"low": low, "high": high, "n": int(inside.sum()),
                                   "energy_mae_meV": float(records[inside, 1].mean() * 1e3),
                                   "forces_mae_meV_A": float(records[inside, 2].mean() * 1e3)})
    result["energy_mae_meV"] = float(records[:, 1].mean() * 1e3)
    result["forces_mae_meV_A"] = float(records[:, 2].mean() * 1e3)
    return result


def accuracy(budget_s: float, work_dir: str, test_spec: str, cutoff: float, names: list[str]) -> dict:
    os.makedirs(work_dir, exist_ok=True)
    bins = [0.0, 4.0, cutoff, 7.0, 9.0, 100.0]
    results = {}
    for name in names:
        config_path, overrides = VARIANTS[name]
        if os.path.exists(os.path.join(work_dir, name)):
            raise SystemExit(f"{os.path.join(work_dir, name)} exists: remove it or pass another --work-dir")
        run_dir = train_variant(name, config_path, overrides, budget_s, work_dir)
        results[name] = binned_errors(run_dir, test_spec, bins)
        results[name]["epochs"] = len(open(os.path.join(run_dir, "metrics.csv")).read().strip().splitlines()) - 1
        print(name, json.dumps(results[name]), flush=True)
    return results


def accuracy_table(results: dict) -> str:
    names = list(results)
    header = "| separation (Å) | frames | " + " | ".join(f"{name} E MAE (meV)" for name in names) + " | " + \
        " | ".join(f"{name} F MAE (meV/Å)" for name in names) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(names))]
    for index, bin_ in enumerate(results[names[0]]["bins"]):
        cells = [f"{results[name]['bins'][index]['energy_mae_meV']:.1f}" for name in names]
        cells += [f"{results[name]['bins'][index]['forces_mae_meV_A']:.1f}" for name in names]
        high = "∞" if bin_["high"] >= 100 else f"{bin_['high']:g}"
        lines.append(f"| {bin_['low']:g}–{high} | {bin_['n']} | " + " | ".join(cells) + " |")
    cells = [f"{results[name]['energy_mae_meV']:.1f}" for name in names]
    cells += [f"{results[name]['forces_mae_meV_A']:.1f}" for name in names]
    lines.append(f"| all | {results[names[0]]['n_frames']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Epochs in the budget: " + ", ".join(f"{name} {results[name]['epochs']}" for name in names) + ".")
    return "\n".join(lines)


def accuracy_plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, result in results.items():
        centres = [0.5 * (b["low"] + min(b["high"], 13.0)) for b in result["bins"]]
        axes[0].plot(centres, [b["energy_mae_meV"] for b in result["bins"]], "o-", label=name)
        axes[1].plot(centres, [b["forces_mae_meV_A"] for b in result["bins"]], "o-", label=name)
    for axis, label in zip(axes, ("energy MAE (meV)", "force MAE (meV/Å)")):
        axis.set_xlabel("fragment separation (Å)")
        axis.set_ylabel(label)
        axis.set_yscale("log")
        axis.axvline(5.0, color="grey", linestyle=":", label="cutoff")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["cost", "accuracy"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 1728, 4096, 8000, 10648])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-direct", type=int, default=4096, help="largest N for the O(N²) direct sum")
    parser.add_argument("--max-ewald", type=int, default=4096, help="largest N for the point-charge Ewald sum")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--test", default=None, help="test data (default: the frames after the config's valid set)")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "benchmark_long_range"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="models to train, one after another")
    parser.add_argument("--tag", default="", help="suffix of the result files and the docs section, so a "
                                                    "run with other settings keeps the first (e.g. _900s)")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count()}
    if args.part == "cost":
        rows = cost(args.sizes, args.repeats, args.max_direct, args.max_ewald)
        with open(os.path.join(DOCS, "benchmark_long_range_cost.json"), "w") as stream:
            json.dump({"machine": machine, "rows": rows}, stream, indent=1)
        table = cost_table(rows)
        return publish_table(table, "long-range-cost", "Long-range terms: cost by system size", args.docs)
    import yaml

    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "long_range_les.yaml")))
    test_spec = args.test or config["data"]["test"]
    results = accuracy(args.budget_s, args.work_dir, test_spec, float(config["model"]["backbone"]["r_max"]),
                       args.variants)
    with open(os.path.join(DOCS, f"benchmark_long_range{args.tag}.json"), "w") as stream:
        json.dump({"machine": machine, "budget_s": args.budget_s, "test": test_spec, "results": results},
                  stream, indent=1)
    accuracy_plot(results, os.path.join(DOCS, f"benchmark_long_range{args.tag}.png"))
    table = accuracy_table(results)
    return publish_table(table, f"long-range-accuracy{args.tag}", "Long range: local against LES at equal wall-clock",
                         args.docs)


if __name__ == "__main__":
    sys.exit(main())
