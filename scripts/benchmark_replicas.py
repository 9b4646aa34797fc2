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

    python scripts/benchmark_replicas.py --mixed [--repeats 2] [--docs]

times a whole exploration of configs/active_learning_cuau_surfaces.yaml instead: four seeds of
32, 28, 16 and 13 atoms (one non-periodic) at 300 and 1000 K, 1000 steps each with a σ score
every 50, on that config's model trained for ``--epochs`` on its 20 initial cells. Wall time
counts everything, compilation included, since an exploration compiles once per iteration:

    by-size      one `ReplicaDynamics` per seed size (the exploration's default)
    one-program  ``replica_groups(max_padding=2)``: here all eight trajectories, padded to 32 atoms

Each in a fresh process, the two alternating ``--repeats`` times. Results:
docs/benchmark_replicas_mixed.json and, with --docs, its table in docs/benchmarks.md.
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
from benchmark_common import ROOT, cpu_model, publish_table  # noqa: E402

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


def trained_cuau_surfaces_model(work_dir: str, epochs: int) -> str:
    """The cuau-surfaces AL config's iteration-0 model, trained for ``epochs`` (cached)."""
    from mlip.active.learner import ActiveLearner

    run_dir = os.path.join(work_dir, f"cuau_surfaces_model_{epochs}")
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return run_dir
    learner = ActiveLearner.from_file(os.path.join(ROOT, "configs", "active_learning_cuau_surfaces.yaml"),
                                      [f"al_dir={os.path.join(work_dir, 'cuau_surfaces_al')}"])
    config = learner.run_config(0)
    config["run_dir"] = run_dir
    config["training"]["max_epochs"] = epochs
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, "cuau_surfaces_train.yaml")
    with open(path, "w") as stream:
        yaml.safe_dump(config, stream)
    subprocess.run([sys.executable, "-m", "mlip.cli", "train", path], check=True, cwd=ROOT)
    return run_dir


def time_exploration(run_dir: str, work_dir: str, grouping: str) -> dict:
    """One exploration of the cuau-surfaces config (`ActiveLearner._explore`), wall and compile time."""
    import logging
    import re

    import jax
    import numpy as np

    import mlip.active.learner as learner_module
    import mlip.md.replicas as replicas
    from mlip.active.learner import ActiveLearner, UncertaintyScorer
    from mlip.training.checkpoint import load_potential

    compile_seconds = []

    class Compilations(logging.Handler):
        def emit(self, record):
            match = re.search(r"Finished XLA compilation of .* in ([0-9.e-]+) sec", record.getMessage())
            if match:
                compile_seconds.append(float(match.group(1)))

    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").addHandler(Compilations())
    logging.getLogger("jax").propagate = False
    max_padding = 1.0 if grouping == "by-size" else 2.0  # 1: no padding, a group per size
    learner_module.EXPLORATION_MAX_PADDING = max_padding
    learner = ActiveLearner.from_file(os.path.join(ROOT, "configs", "active_learning_cuau_surfaces.yaml"),
                                      [f"al_dir={os.path.join(work_dir, 'cuau_surfaces_al')}"])
    potential, params = load_potential(run_dir)
    scorer = UncertaintyScorer(potential, params, learner.config.selection.score)
    start = time.perf_counter()
    explored, scores, _ = learner._explore(potential, params, 0, scorer, np.inf)
    wall = time.perf_counter() - start
    sizes = [len(learner.seeds[i]) for i in range(len(learner.seeds)) for _ in learner.config.exploration.temperatures]
    groups = replicas.replica_groups(sizes, max_padding)
    return {"grouping": grouping, "groups": len(groups), "wall_s": round(wall, 1),
            "compilations": len(compile_seconds), "compile_s": round(sum(compile_seconds), 1),
            "snapshots": len(explored), "mean_sigma": float(np.mean(scores))}


def mixed_table(results: list) -> str:
    lines = ["| trajectories stepped | programs (groups) | exploration wall s, mean | compilations | compile s, mean |",
             "|---|---|---|---|---|"]
    for grouping in ("by-size", "one-program"):
        rows = [row for row in results if row["grouping"] == grouping]
        mean = lambda key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
        walls = ", ".join(f"{row['wall_s']:.0f}" for row in rows)
        lines.append(f"| {grouping} | {rows[0]['groups']} | {mean('wall_s'):.0f} ({walls}) | {rows[0]['compilations']} "
                     f"| {mean('compile_s'):.1f} |")
    return "\n".join(lines)


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
    parser.add_argument("--epochs", type=int, help="training of the model (default 100; --mixed: 150, as its config)")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "benchmark_replicas"))
    parser.add_argument("--case", nargs=3, metavar=("RUN_DIR", "REPLICAS", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--mixed", action="store_true", help="time the cuau-surfaces exploration (seeds of four "
                        "sizes) by size against one program")
    parser.add_argument("--repeats", type=int, default=2, help="--mixed: runs of each grouping")
    parser.add_argument("--exploration-case", nargs=2, metavar=("RUN_DIR", "GROUPING"), help=argparse.SUPPRESS)
    parser.add_argument("--docs", action="store_true")
    parser.add_argument("--out-json", default=os.path.join(ROOT, "docs", "benchmark_replicas.json"))
    parser.add_argument("--table-only", action="store_true", help="time nothing: the table of the recorded results")
    args = parser.parse_args(argv)
    if args.mixed or args.exploration_case:
        return mixed(args)
    if args.table_only:
        results = json.load(open(args.out_json))["results"]
        return write_table(results, args.docs)
    if args.case:  # one case in a fresh process: no compilation shared between paths
        run_dir, replicas, path = args.case
        print(json.dumps(time_case(run_dir, int(replicas), args.steps, args.check_every, path == "together")))
        return 0
    run_dir = trained_model(args.work_dir, args.epochs or 100)
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
              "check_every": args.check_every, "epochs": args.epochs or 100, "results": results}
    with open(args.out_json, "w") as stream:
        json.dump(record, stream, indent=1)
    return write_table(results, args.docs)


def mixed(args) -> int:
    """--mixed: the cuau-surfaces exploration, by size against one program, each in a fresh process."""
    out_json = args.out_json.replace(".json", "_mixed.json")
    if args.exploration_case:
        run_dir, grouping = args.exploration_case
        print(json.dumps(time_exploration(run_dir, args.work_dir, grouping)))
        return 0
    os.chdir(ROOT)  # the config's data paths are relative to the repository
    if not args.table_only:
        epochs = args.epochs or 150
        run_dir = trained_cuau_surfaces_model(args.work_dir, epochs)
        env = {**os.environ, "MLIP_COMPILATION_CACHE": "off"}
        results = []
        for _ in range(args.repeats):
            for grouping in ("by-size", "one-program"):
                output = subprocess.run([sys.executable, __file__, "--exploration-case", run_dir, grouping,
                                         "--work-dir", args.work_dir], check=True, capture_output=True, text=True,
                                        env=env, cwd=ROOT).stdout
                results.append(json.loads(output.strip().splitlines()[-1]))
                print(results[-1], flush=True)
        with open(out_json, "w") as stream:
            json.dump({"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "epochs": epochs,
                       "results": results}, stream, indent=1)
    results = json.load(open(out_json))["results"]
    return publish_table(mixed_table(results), "replicas-mixed", "MD speed: several trajectories at once", args.docs)


def write_table(results: list, docs: bool) -> int:
    return publish_table(table(results), "replicas", "MD speed: several trajectories at once", docs)


if __name__ == "__main__":
    sys.exit(main())
