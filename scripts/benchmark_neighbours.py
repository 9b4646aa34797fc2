"""What one MD neighbour-list build costs on the host, by system size (issue 20).

    python scripts/benchmark_neighbours.py [--atoms 108000 256000 1048576] [--repeats 2]

For fcc Cu/Au cells of 4 k³ atoms (scripts/benchmark_startup.py's), times what
`MolecularDynamics` does at each rebuild: the vesin list at cutoff + skin (5 + 0.5 Å, the
default model's), packing it into the dense padded graph, and the copy to the device. The
fastest of ``--repeats`` builds is reported. On a GPU the device waits this long per rebuild
unless the list is built on a thread while it steps (``overlap_neighbour_lists``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, nargs="+", default=[108000, 256000, 1048576])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from benchmark_startup import fcc_cell
    from mlip.data.batching import PaddedSizes, build_sample, pack_samples, padded_node_count, round_up_neighbours
    from mlip.data.reader import frame_from_atoms

    rows = []
    for n in args.atoms:
        frame = frame_from_atoms(fcc_cell(n))
        best = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            sample = build_sample(frame, 5.5)  # vesin, as MolecularDynamics builds it
            listed = time.perf_counter()
            sizes = PaddedSizes.dense(padded_node_count(n, dense=True), round_up_neighbours(sample.max_neighbours),
                                      2, 0, ())
            graph = pack_samples([sample], sizes, None, np.float32)
            packed = time.perf_counter()
            jax.block_until_ready(jax.device_put(graph.replace(targets={})))
            done = time.perf_counter()
            times = {"vesin_s": listed - start, "pack_s": packed - listed, "device_put_s": done - packed,
                     "total_s": done - start}
            if best is None or times["total_s"] < best["total_s"]:
                best = times
        row = {"atoms": n, "edges": int(sample.n_edges), **{k: round(v, 3) for k, v in best.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "rows": rows}
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(report, stream, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
