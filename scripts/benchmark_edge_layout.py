"""Benchmark: the whole model on an edge-list graph against the dense [atoms, K] layout.

The same parameters on the same structure padded both ways (`mlip.data.batching.sizes_for`
with ``layout="list"`` and ``"dense"``); the two give the same numbers (checked here to
float32 rounding), so only the time differs. Two calls are timed, in alternating rounds:

    force call   energy and forces of one structure, as in MD and the calculator:
                 ethanol (9 atoms) and cubic fcc Cu/Au cells of 108, 500, 2048 atoms,
                 neighbour lists at r_max + 0.5 Å (the MD skin), random-weight models
    train step   value and parameter gradient of an energy + force loss on a batch of
                 5 ethanol frames from data/ (what `mlip train` differentiates)

for the default model and configs/small.yaml's. Results go to docs/benchmarks.md
(section ``edge-layout``). Not part of the test suite.

    python scripts/benchmark_edge_layout.py [--sizes 9 108 500 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import mlip  # noqa: F401  (first: its malloc settings must precede XLA's first allocation)
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_common import ROOT, cpu_model, replace_marked_section, small_backbone  # noqa: E402
from benchmark_md import average_neighbours, build_system  # noqa: E402

from mlip.data.batching import build_sample, build_samples, pack_samples, sizes_for  # noqa: E402
from mlip.data.reader import Frame, LabelKeys, read_frames  # noqa: E402
from mlip.data.statistics import DatasetStatistics  # noqa: E402
from mlip.potential import Potential  # noqa: E402
from mlip.training.checkpoint import dummy_graph  # noqa: E402
from mlip.training.config import MACEConfig, ModelConfig  # noqa: E402

LAYOUTS = ("list", "dense")
SKIN = 0.5
ETHANOL = os.path.join(ROOT, "data", "ethanol_gfn2_500K.extxyz")


def model_for(backbone: dict, atoms_list) -> tuple[Potential, dict]:
    numbers = sorted({int(z) for atoms in atoms_list for z in atoms.numbers})
    neighbours = np.mean([average_neighbours(atoms, backbone.get("r_max", 5.0)) for atoms in atoms_list])
    statistics = DatasetStatistics(atomic_numbers=tuple(numbers), e0={z: 0.0 for z in numbers}, shift=0.0,
                                   scale=0.1, avg_num_neighbors=float(neighbours))
    potential = Potential(ModelConfig(backbone=MACEConfig(**backbone)), statistics)
    return potential, potential.init(jax.random.PRNGKey(0), dummy_graph(tuple(numbers)))


def timed(function, arguments, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*arguments))
        seconds.append(time.perf_counter() - start)
    return seconds


def compare(function, graphs: dict, params, rounds: int, repeats: int, outputs_key) -> dict:
    """Fastest call per layout over alternating rounds, and the largest output difference."""
    results = {layout: jax.device_get(function(params, graph)) for layout, graph in graphs.items()}
    difference = float(np.max(np.abs(outputs_key(results["dense"]) - outputs_key(results["list"]))))
    best = {layout: [] for layout in graphs}
    for _ in range(rounds):
        for layout, graph in graphs.items():
            best[layout] += timed(function, (params, graph), repeats)
    return {"list_s": min(best["list"]), "dense_s": min(best["dense"]),
            "list_median_s": float(np.median(best["list"])), "dense_median_s": float(np.median(best["dense"])),
            "max_difference": difference,
            "slots": {layout: int(graph.senders.shape[0]) for layout, graph in graphs.items()}}


def force_call(backbone: dict, n_atoms: int, rounds: int) -> dict:
    atoms = build_system(n_atoms, 300.0, 0)
    potential, params = model_for(backbone, [atoms])
    frame = Frame(positions=atoms.positions, numbers=atoms.numbers, cell=atoms.cell.array, pbc=atoms.pbc)
    sample = build_sample(frame, potential.cutoff + SKIN)
    graphs = {layout: pack_samples([sample], sizes_for([sample], 2, layout), None, np.float32)
              for layout in LAYOUTS}
    apply = jax.jit(lambda p, g: potential.apply(p, g, True, False))
    return compare(apply, graphs, params, rounds, repeats=3 if n_atoms >= 2048 else 5,
                   outputs_key=lambda out: out["forces"][:n_atoms])


def train_step(backbone: dict, rounds: int) -> dict:
    frames = read_frames(f"{ETHANOL}@0:5", LabelKeys(energy="REF_energy", forces="REF_forces"))
    samples = build_samples(frames, backbone.get("r_max", 5.0))
    from ase.build import molecule

    potential, params = model_for(backbone, [molecule("CH3CH2OH")])
    graphs = {layout: pack_samples(samples, sizes_for(samples, 6, layout), None, np.float32)
              for layout in LAYOUTS}

    def loss(p, graph):
        out = potential.apply(p, graph, True, False)
        return ((out["energy"][:5] - out["energy"][:5].mean()) ** 2).sum() + (out["forces"] ** 2).sum()

    gradient = jax.jit(jax.grad(loss))
    return compare(gradient, graphs, params, rounds, repeats=20,
                   outputs_key=lambda grads: np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[9, 108, 500, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    models = {"default": {}, "small": small_backbone()}
    rows = []
    for name, backbone in models.items():
        for n_atoms in args.sizes:
            result = force_call(backbone, n_atoms, args.rounds)
            rows.append((name, f"force call, {n_atoms} atoms", result))
            print(name, n_atoms, result, flush=True)
        result = train_step(backbone, args.rounds)
        rows.append((name, "train step, 5 ethanol", result))
        print(name, "train", result, flush=True)
    lines = [f"CPU: {cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__}; fastest call over "
             f"{args.rounds} alternating rounds (median in brackets). Command: "
             f"`python scripts/benchmark_edge_layout.py`.", "",
             "| model | call | edge slots list / dense | list, ms | dense, ms | list / dense | max difference |",
             "|---|---|---|---|---|---|---|"]
    for name, call, r in rows:
        lines.append(f"| {name} | {call} | {r['slots']['list']} / {r['slots']['dense']} | "
                     f"{r['list_s'] * 1e3:.1f} ({r['list_median_s'] * 1e3:.1f}) | "
                     f"{r['dense_s'] * 1e3:.1f} ({r['dense_median_s'] * 1e3:.1f}) | "
                     f"{r['list_s'] / r['dense_s']:.2f} | {r['max_difference']:.1e} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_docs:
        replace_marked_section(os.path.join(ROOT, "docs", "benchmarks.md"), "<!-- edge-layout:start -->",
                               "<!-- edge-layout:end -->", table, "Edge layouts: the whole model")


if __name__ == "__main__":
    main()
