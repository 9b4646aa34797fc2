"""Where an MD step's device time goes, by part of the model (issue 20: the default model's
GPU speed).

    python scripts/profile_md.py [--atoms 4000] [--model default|small] [--block-steps 10]
                                 [--blocks 2] [--top 12] [--json PATH]

Builds the model with random weights on an fcc Cu/Au cell (as scripts/benchmark_startup.py),
runs one block to compile, then traces ``--blocks`` blocks with JAX's profiler. Each traced
XLA operation (a kernel on a GPU, a thunk on the CPU) is matched by its name to the compiled
block program's HLO, whose metadata names the JAX operation and the model's module path,
e.g. ``transpose(jvp(EnergyModel))/backbone/interaction_0/radial_mlp/Dense_1/dot_general``.
The report sums the time per module (to three levels, such as
``backbone/interaction_0/radial_mlp``), forward and backward apart, and lists the slowest
operations. Runs on CPU and GPU alike; the device goes into the JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONTROL_FLOW = re.compile(r"^(while|cond|conditional|call)(\.\d+)?$")
OPERATION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]+)"', re.M)


def module_of(op_name: str) -> tuple[str, str]:
    """(direction, module path) of an HLO operation's JAX op_name: ``forward`` (jvp),
    ``backward`` (transpose: the force pass) or ``outside the model`` (integrator, checks)."""
    if "EnergyModel" not in op_name:
        return "outside the model", "integrator, checks, observables"
    direction = "backward" if "transpose(" in op_name.split("EnergyModel")[0] else "forward"
    parts = op_name.split("EnergyModel", 1)[1].strip(")/").split("/")[:-1]  # the primitive dropped
    modules = [part for part in parts if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part)
               and not part.startswith(("jit", "vmap", "jvp", "transpose"))]
    return direction, "/".join(modules[:3]) or "(top level)"


def device_events(profile) -> list[tuple[str, float]]:
    """(operation name, seconds) of every XLA operation the device ran in the trace."""
    events = []
    for plane in profile.planes:
        on_gpu = plane.name.startswith("/device:GPU")
        for line in plane.lines:
            if (on_gpu and line.name == "XLA Ops") or (plane.name == "/host:CPU"
                                                        and line.name.startswith("tf_XLA")):
                # Control flow (the scan's while loop, the step's cond) spans the operations
                # inside it on the CPU; counting it too would count them twice.
                events += [(event.name, event.duration_ns * 1e-9) for event in line.events
                           if not event.name.startswith("ThunkExecutor") and not CONTROL_FLOW.match(event.name)]
    return events


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, default=4000)
    parser.add_argument("--model", choices=["default", "small"], default="default")
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    # The program is compiled twice (by the run, and again for its HLO text): the second one
    # comes from this cache.
    cache = tempfile.mkdtemp(prefix="mlip-profile-cache-")
    os.environ.setdefault("MLIP_COMPILATION_CACHE", cache)

    import jax
    import jax.numpy as jnp

    from benchmark_startup import fcc_cell, random_cuau_model
    from mlip.md import MolecularDynamics, simulation

    potential, params = random_cuau_model(args.model)
    md = MolecularDynamics(potential, params, fcc_cell(args.atoms), ensemble="nve", timestep_fs=1.0,
                           block_steps=args.block_steps, overlap_neighbour_lists=False)
    md.run(args.block_steps)  # compiles
    compiled = simulation._run_block.lower(
        md._program, md._potential, md.ensemble, jnp.asarray(md._block_limits(), md.dtype), md.params,
        md.state, md._template, md._reference_positions, md._reference_cell,
        jnp.asarray(args.block_steps, jnp.int32)).compile()
    op_names = dict(OPERATION.findall(compiled.as_text()))

    trace_dir = tempfile.mkdtemp(prefix="mlip-profile-")
    steps_before, start = md.steps_done, time.perf_counter()
    with jax.profiler.trace(trace_dir):
        md.run(args.blocks * args.block_steps)
        jax.block_until_ready(md.state.positions)
    wall = time.perf_counter() - start
    steps = md.steps_done - steps_before
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    events = device_events(jax.profiler.ProfileData.from_file(path))

    by_module: collections.Counter = collections.Counter()
    by_operation: collections.Counter = collections.Counter()
    unmatched = 0.0
    for name, seconds in events:
        op_name = op_names.get(name)
        if op_name is None:
            unmatched += seconds
            continue
        by_module[module_of(op_name)] += seconds
        by_operation[name, op_name] += seconds
    total = sum(seconds for _, seconds in events)
    per_step = lambda seconds: round(1e3 * seconds / steps, 3)  # noqa: E731  ms per step
    report = {"atoms": args.atoms, "model": args.model, "device": str(jax.devices()[0]), "jax": jax.__version__,
              "steps": steps, "wall_ms_per_step": per_step(wall), "op_ms_per_step": per_step(total),
              "unmatched_op_ms_per_step": per_step(unmatched),
              "modules": [{"direction": d, "module": m, "ms_per_step": per_step(s), "share": round(s / total, 3)}
                          for (d, m), s in by_module.most_common()],
              "operations": [{"name": n, "op_name": o, "ms_per_step": per_step(s)}
                             for (n, o), s in by_operation.most_common(args.top)]}
    print(f"{args.model} model, {args.atoms} atoms on {report['device']}: {report['wall_ms_per_step']} ms per "
          f"step wall, {report['op_ms_per_step']} ms of operations ({report['unmatched_op_ms_per_step']} "
          f"unmatched)")
    for row in report["modules"][:args.top]:
        print(f"  {row['share']:6.1%}  {row['ms_per_step']:9.3f} ms  {row['direction']:9s} {row['module']}")
    print("slowest operations:")
    for row in report["operations"]:
        print(f"  {row['ms_per_step']:9.3f} ms  {row['name']}: {row['op_name'][-110:]}")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(report, stream, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
