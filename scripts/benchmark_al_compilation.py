"""What an active-learning iteration spends compiling, and what later iterations get from the cache.

    python scripts/benchmark_al_compilation.py [--iterations 3] [--epochs 10] [--steps 200]
                                               [--json PATH] [--docs]

Runs `mlip.active.ActiveLearner` on configs/active_learning_cuau_surfaces.yaml (every iteration
trains a 3-member MACE ensemble from scratch, so each iteration's model has new statistics),
with fewer epochs and MD steps (compilation does not depend on either) and a fresh persistent
compilation cache, as `mlip active-learn` uses one. Per iteration and phase (training, and
exploration with selection) it reads JAX's compile log and its monitoring events: seconds
tracing, lowering and compiling, programs compiled, and programs loaded from the persistent
cache instead. The same script measures an older mlip with ``PYTHONPATH=<its checkout>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_common import ROOT, cpu_model, publish_table  # noqa: E402
from benchmark_startup import CompileLog  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "active_learning_cuau_surfaces.yaml")
RESULTS = os.path.join(ROOT, "docs", "benchmark_al_compilation.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200, help="MD steps per trajectory")
    parser.add_argument("--label", default=None, help="the name of this run in the JSON (default: the commit)")
    parser.add_argument("--json", default=RESULTS, help="the JSON file of runs this run joins")
    parser.add_argument("--docs", action="store_true", help="write the table of the JSON's runs into docs/benchmarks.md")
    parser.add_argument("--publish-only", action="store_true", help="no run: only the table of the JSON's runs")
    args = parser.parse_args(argv)
    if args.publish_only:
        return publish(args.json, args.docs)

    work = tempfile.mkdtemp(prefix="al_compilation_")
    os.environ["MLIP_COMPILATION_CACHE"] = os.path.join(work, "xla")
    import jax
    import jax.monitoring

    import mlip
    from mlip.active.learner import ActiveLearner
    from mlip.compilation_cache import enable_compilation_cache

    jax.config.update("jax_log_compiles", True)
    log = CompileLog()
    logging.getLogger("jax").addHandler(log)
    logging.getLogger("jax").setLevel(logging.DEBUG)
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
    enable_compilation_cache()
    phases = []

    class TimedLearner(ActiveLearner):
        def _timed(self, phase, method, iteration):
            log.take()
            hits.clear()
            start = time.perf_counter()
            result = method(iteration)
            phases.append({"iteration": iteration, "phase": phase, "wall_s": round(time.perf_counter() - start, 1),
                           "cache_hits": len(hits), **log.take()})
            print(phases[-1], file=sys.stderr, flush=True)
            return result

        def _train(self, iteration):
            return self._timed("train", super()._train, iteration)

        def _explore_and_select(self, iteration):
            return self._timed("explore", super()._explore_and_select, iteration)

    overrides = [f"al_dir={os.path.join(work, 'al')}", f"budget.max_iterations={args.iterations - 1}",
                 f"training.training.max_epochs={args.epochs}", f"exploration.steps={args.steps}",
                 "exploration.check_every=50", "budget.max_labels=1000"]
    try:
        TimedLearner.from_file(CONFIG, overrides).run()
    finally:  # the loop's runs and the cache were only the measurement's
        shutil.rmtree(work, ignore_errors=True)
    commit = os.popen(f"git -C {os.path.dirname(os.path.dirname(mlip.__file__))} rev-parse --short HEAD").read().strip()
    run = {"label": args.label or commit, "commit": commit, "cpu": cpu_model(), "jax": jax.__version__,
           "epochs": args.epochs, "steps": args.steps, "phases": phases}
    runs = json.load(open(args.json)) if os.path.exists(args.json) else []
    runs = [r for r in runs if r["label"] != run["label"]] + [run]
    with open(args.json, "w") as handle:
        json.dump(runs, handle, indent=1)
    return publish(args.json, args.docs)


def publish(path: str, docs: bool) -> int:
    runs = json.load(open(path))
    lines = ["| mlip | iteration | phase | wall s | compiled programs | compile s (trace + lower + XLA) "
             "| loaded from cache |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for row in run["phases"]:
            compile_s = row["tracing"] + row["lowering"] + row["compilation"]
            lines.append(f"| {run['label']} | {row['iteration']} | {row['phase']} | {row['wall_s']} | "
                         f"{row['programs']} | {compile_s:.1f} ({row['tracing']:.1f} + {row['lowering']:.1f} + "
                         f"{row['compilation']:.1f}) | {row['cache_hits']} |")
    return publish_table("\n".join(lines), "al-compilation", "Compilation across active-learning iterations", docs)


if __name__ == "__main__":
    sys.exit(main())
