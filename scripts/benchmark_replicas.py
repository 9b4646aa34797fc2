"""Several MD trajectories at once: `ReplicaDynamics` against the same runs one after another.

    python scripts/benchmark_replicas.py [--replicas 1 6 24] [--steps 1000] [--docs]
    python scripts/benchmark_replicas.py --table-only --docs       # the recorded results' table

The model is the active-learning butane config's (configs/active_learning_butane.yaml: MACE,
16 channels, a deep ensemble of 3 whose mean forces drive the MD), trained for
``--epochs`` on its 20 initial frames (cached in ``--work-dir``; timing depends on the
shapes, not the weights). Each case runs R Langevin trajectories of n-butane (14 atoms)
from the two seed frames of the active-learning config, at 300, 600 and 1200 K in turn,
``--steps`` steps each, in blocks of ``--check-every`` steps with a snapshot (``atoms``)
after each block, as the exploration of `mlip active-learn` does:

    one-by-one   R `MolecularDynamics` runs, one after the other (the exploration before)
    together     one `ReplicaDynamics` with all R (the exploration now)

The first block of each path is a warm-up (compilation, reported, not timed). Results:
docs/benchmark_replicas.json and, with --docs, the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_common import ROOT, cpu_model, replace_marked_section  # noqa: E402

TEMPERATURES = (300.0, 600.0, 1200.0)


def trained_model(work_dir: str, epochs: int) -> str:
    """The AL butane config's model, trained briefly on its initial frames (cached)."""
    run_dir = os.path.join(work_dir, f"model_{epochs}")
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return run_dir
    al = yaml.safe_load(open(os.path.join(ROOT, "configs", "active_learning_butane.yaml")))
    config = {**al["training"], "run_dir": run_dir, "seed": 0}
    config["data"] = {**config["data"], "train": os.path.join(ROOT, al["initial"]),
                      "e0s": os.path.join(ROOT, config["data"]["e0s"]),
                      "energy_key": "REF_energy", "forces_key": "REF_forces"}
    config["training"] = {**config["training"], "max_epochs": epochs, "progress_bar": False}
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, "train.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    subprocess.run([sys.executable, "-m", "mlip.cli", "train", path], check=True)
    return run_dir


def time_case(run_dir: str, replicas: int, steps: int, check_every: int, together: bool) -> dict:
    import ase.io

    from mlip.md.replicas import ReplicaDynamics
    from mlip.md.simulation import MolecularDynamics, MDStabilityError
    from mlip.training.checkpoint import load_potential

    al = yaml.safe_load(open(os.path.join(ROOT, "configs", "active_learning_butane.yaml")))
    path, _, index = al["seeds"].partition("@")
    seeds = ase.io.read(os.path.join(ROOT, path), index)
    potential, params = load_potential(run_dir)
    structures = [seeds[r % len(seeds)] for r in range(replicas)]
    temperatures = [TEMPERATURES[r % len(TEMPERATURES)] for r in range(replicas)]
    settings = dict(ensemble="langevin", timestep_fs=0.5)
    blocks = steps // check_every
    warmup = timed = 0.0
    stopped = 0
    if together:
        start = time.perf_counter()
        md = ReplicaDynamics(potential, params, structures, temperatures, list(range(replicas)), **settings)
        md.run(check_every)
        [md.atoms(r) for r in range(replicas)]
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(blocks - 1):
            md.run(check_every)
            [md.atoms(r) for r in range(replicas)]
        timed = time.perf_counter() - start
        stopped = len(md.stopped)
        done = int(md.steps_done.sum()) - replicas * check_every
    else:
        done = 0
        for r in range(replicas):
            start = time.perf_counter()
            md = MolecularDynamics(potential, params, structures[r], temperature_K=temperatures[r], seed=r,
                                   **settings)
            md.run(check_every)
            md.atoms
            warmup += time.perf_counter() - start  # every run's start: compiled once, then from the jit cache
            start = time.perf_counter()
            try:
                for _ in range(blocks - 1):
                    md.run(check_every)
                    md.atoms
            except MDStabilityError:
                stopped += 1
            timed += time.perf_counter() - start
            done += md.steps_done - check_every
    return {"replicas": replicas, "path": "together" if together else "one-by-one", "warmup_s": round(warmup, 2),
            "timed_s": round(timed, 3), "steps_timed": done, "stopped": stopped,
            "steps_per_s": round(done / timed, 1), "ms_per_trajectory_step": round(1e3 * timed / done, 3)}


def table(results: list) -> str:
    lines = ["| trajectories | one by one: steps/s (all trajectories), warm-up s | together: steps/s, warm-up s | "
             "speed-up |", "|---|---|---|---|"]
    for replicas in sorted({row["replicas"] for row in results}):
        rows = {row["path"]: row for row in results if row["replicas"] == replicas}
        alone, together = rows["one-by-one"], rows["together"]
        lines.append(f"| {replicas} | {alone['steps_per_s']:.0f}, {alone['warmup_s']:.1f} | "
                     f"{together['steps_per_s']:.0f}, {together['warmup_s']:.1f} | "
                     f"{together['steps_per_s'] / alone['steps_per_s']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 6, 24])
    parser.add_argument("--steps", type=int, default=1000, help="steps per trajectory")
    parser.add_argument("--check-every", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "benchmark_replicas"))
    parser.add_argument("--case", nargs=3, metavar=("RUN_DIR", "REPLICAS", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--docs", action="store_true")
    parser.add_argument("--out-json", default=os.path.join(ROOT, "docs", "benchmark_replicas.json"))
    parser.add_argument("--table-only", action="store_true", help="time nothing: the table of the recorded results")
    args = parser.parse_args(argv)
    if args.table_only:
        results = json.load(open(args.out_json))["results"]
        return write_table(results, args.docs)
    if args.case:  # one case in a fresh process: no compilation shared between paths
        run_dir, replicas, path = args.case
        print(json.dumps(time_case(run_dir, int(replicas), args.steps, args.check_every, path == "together")))
        return 0
    run_dir = trained_model(args.work_dir, args.epochs)
    env = {**os.environ, "MLIP_COMPILATION_CACHE": "off"}
    results = []
    for replicas in args.replicas:
        for path in ("one-by-one", "together"):
            output = subprocess.run([sys.executable, __file__, "--case", run_dir, str(replicas), path,
                                     "--steps", str(args.steps), "--check-every", str(args.check_every)],
                                    check=True, capture_output=True, text=True, env=env).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    record = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "steps": args.steps,
              "check_every": args.check_every, "epochs": args.epochs, "results": results}
    with open(args.out_json, "w") as stream:
        json.dump(record, stream, indent=1)
    return write_table(results, args.docs)


def write_table(results: list, docs: bool) -> int:
    text = table(results)
    print(text)
    if docs:
        replace_marked_section(os.path.join(ROOT, "docs", "benchmarks.md"), "<!-- replicas -->", "<!-- /replicas -->",
                               text, "MD speed: several trajectories at once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
