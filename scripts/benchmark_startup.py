"""Where the wait before the first MD step goes: tracing, lowering and XLA compilation (issue 20).

    python scripts/benchmark_startup.py [--atoms 4000] [--model default|small] [--block-steps 10]
                                        [--cache off|DIR] [--json PATH]

The default model (or configs/small.yaml's backbone) with random weights on an fcc Cu/Au cell
of ``--atoms`` atoms: the script times model initialisation, `MolecularDynamics(...)`
construction, the first block and a second one, then `MLIPCalculator`'s first and second
force calls on the same cell, and splits each into JAX's own phases,
read from its compile log (``jax_log_compiles``): tracing to a jaxpr, lowering the jaxpr to
an MLIR module, and XLA compilation, per compiled program. What is left of a phase's wall
time is host work (the neighbour list, packing the graph) and the run itself.

``--cache off`` (the default) measures a cold start, as on a new machine; ``--cache DIR``
uses (and fills) a persistent compilation cache there, so a second call measures a warm one.
Runs on CPU and GPU alike; the figures and the device go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PHASES = {"tracing": re.compile(r"Finished tracing (\S+) for jit in ([0-9.]+) sec"),
          "lowering": re.compile(r"Finished jaxpr to MLIR module conversion (\S+) in ([0-9.]+) sec"),
          "compilation": re.compile(r"Finished XLA compilation of (\S+) in ([0-9.]+) sec")}


class CompileLog(logging.Handler):
    """Collects JAX's per-program tracing, lowering and compilation times."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.events: list[tuple[str, str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for phase, pattern in PHASES.items():
            match = pattern.search(message)
            if match:
                self.events.append((phase, match.group(1), float(match.group(2))))

    def take(self) -> dict:
        """Seconds per phase, and per program, since the last call."""
        events, self.events = self.events, []
        totals = {phase: round(sum(s for p, _, s in events if p == phase), 3) for phase in PHASES}
        programs: dict[str, dict] = {}
        for phase, name, seconds in events:
            entry = programs.setdefault(name, {})
            entry[phase] = round(entry.get(phase, 0.0) + seconds, 3)
        slowest = sorted(programs.items(), key=lambda item: -sum(item[1].values()))[:6]
        return {**totals, "programs": len(programs), "slowest": dict(slowest)}


def fcc_cell(n_atoms: int, seed: int = 0):
    import numpy as np
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    k = round((n_atoms / 4) ** (1 / 3))
    if 4 * k**3 != n_atoms:
        raise SystemExit(f"--atoms {n_atoms} is not 4 k³ (nearest: {4 * k**3}, {4 * (k + 1)**3})")
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((k, k, k))
    rng = np.random.default_rng(seed)
    atoms.numbers[rng.choice(n_atoms, n_atoms // 4, replace=False)] = 79
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
    Stationary(atoms)
    return atoms


def random_cuau_model(model: str):
    """(potential, params): the default model or configs/small.yaml's backbone (``model``) for Cu/Au,
    with random weights and unit statistics."""
    import jax

    from mlip.data.statistics import DatasetStatistics
    from mlip.model_config import ModelConfig
    from mlip.potential import Potential
    from mlip.training.checkpoint import dummy_graph

    config = {}
    if model == "small":
        from benchmark_common import small_backbone
        config = {"backbone": small_backbone()}
    statistics = DatasetStatistics(atomic_numbers=[29, 79], e0={29: 0.0, 79: 0.0}, shift=0.0, scale=1.0,
                                   avg_num_neighbors=12.0)
    potential = Potential(ModelConfig.model_validate(config), statistics)
    return potential, potential.init(jax.random.PRNGKey(0), dummy_graph([29, 79]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, default=4000)
    parser.add_argument("--model", choices=["default", "small"], default="default")
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--cache", default="off", help="off, or a compilation cache directory")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ["MLIP_COMPILATION_CACHE"] = args.cache

    import jax

    jax.config.update("jax_log_compiles", True)
    log = CompileLog()
    logging.getLogger("jax").addHandler(log)
    logging.getLogger("jax").setLevel(logging.DEBUG)

    from mlip.compilation_cache import enable_compilation_cache
    from mlip.md import MolecularDynamics

    report = {"atoms": args.atoms, "model": args.model, "block_steps": args.block_steps, "cache": args.cache,
              "device": str(jax.devices()[0]), "jax": jax.__version__}
    atoms = fcc_cell(args.atoms)
    enable_compilation_cache()  # as the calculator and MD do; here before the random initialisation too
    start = time.perf_counter()
    potential, params = random_cuau_model(args.model)
    jax.block_until_ready(params)
    report["init"] = {"wall_s": round(time.perf_counter() - start, 3), **log.take()}

    start = time.perf_counter()
    md = MolecularDynamics(potential, params, atoms, ensemble="nve", timestep_fs=2.0,
                           block_steps=args.block_steps)
    jax.block_until_ready(md.state.positions)
    report["construction"] = {"wall_s": round(time.perf_counter() - start, 3), **log.take()}
    for name in ("first_block", "second_block"):
        start = time.perf_counter()
        md.run(args.block_steps)
        report[name] = {"wall_s": round(time.perf_counter() - start, 3), **log.take()}
    report["compilations"] = md.compilations
    # The calculator's first call (its own force program, compiled apart from the MD block),
    # then a second call on moved atoms: what a user's ASE script waits for.
    from mlip.calculator import MLIPCalculator

    calculator_atoms = atoms.copy()
    calculator_atoms.calc = MLIPCalculator(potential, params, skin=0.5)
    for name in ("calculator_first_call", "calculator_second_call"):
        start = time.perf_counter()
        calculator_atoms.get_forces()
        report[name] = {"wall_s": round(time.perf_counter() - start, 3), **log.take()}
        calculator_atoms.positions += 0.01
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as stream:
            stream.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
