"""Micro-benchmark: message aggregation from an edge list against a dense [atoms, K] layout.

One equivariant path of a MACE layer (1o neighbour features times the l = 3 part of
the edge harmonics, weighted per channel by the radial MLP) summed over each atom's
neighbours, forward and forward plus backward, on CPU. Sizes of the default model's
second layer on the 500-atom fcc cell: 500 atoms, 56 neighbours each (cutoff plus
skin), 64 channels. Three forms of the same sum:

    edge list    gather h[senders], per-edge product [E, 7, C], segment_sum to receivers
                 (mlip's MACE on an edge-list graph, through e3nn-jax)
    dense sum    the same product in [N, K, 7, C], summed over K
    dense einsum einsum("nkic,nkio,nkc->noc"): a batched matrix product per atom that
                 never writes the [E, 7, C] message array (mlip's MACE on a dense-layout
                 graph: `mlip.models.mace.dense_convolution`)

The whole model in both layouts: scripts/benchmark_edge_layout.py.

mlip is imported first, so XLA's scratch buffers stay mapped as in every mlip process
(mlip/host_memory.py); without that, page faults triple the edge list's time and
overstate the gain. Results are recorded in docs/benchmarks.md (profile of the default
model). Not part of the test suite.

    python scripts/benchmark_dense_aggregation.py
"""

from __future__ import annotations

import time

import mlip  # noqa: F401  (first: its malloc settings must precede XLA's first allocation)
import jax
import jax.numpy as jnp
import numpy as np

N_ATOMS, NEIGHBOURS, CHANNELS = 500, 56, 64
IN_DIM, OUT_DIM = 3, 7  # 1o features, l = 3 outputs
REPEATS = 10


def milliseconds(function, *arguments) -> float:
    compiled = jax.jit(function)
    jax.block_until_ready(compiled(*arguments))
    start = time.perf_counter()
    for _ in range(REPEATS):
        result = compiled(*arguments)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / REPEATS * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    n_edges = N_ATOMS * NEIGHBOURS
    neighbours = jnp.asarray(rng.integers(0, N_ATOMS, (N_ATOMS, NEIGHBOURS)).astype(np.int32))
    senders = neighbours.reshape(-1)
    receivers = jnp.asarray(np.repeat(np.arange(N_ATOMS), NEIGHBOURS).astype(np.int32))
    features = jnp.asarray(rng.normal(size=(N_ATOMS, IN_DIM, CHANNELS)), jnp.float32)
    coupling = jnp.asarray(rng.normal(size=(n_edges, IN_DIM, OUT_DIM)), jnp.float32)  # CG·Y per edge
    radial = jnp.asarray(rng.normal(size=(n_edges, CHANNELS)), jnp.float32)

    def edge_list(h, t, w):
        x = h[senders]
        messages = sum(x[:, a, None, :] * t[:, a, :, None] for a in range(IN_DIM)) * w[:, None, :]
        return jax.ops.segment_sum(messages, receivers, N_ATOMS, indices_are_sorted=True)

    def dense_sum(h, t, w):
        x = h[neighbours]
        t = t.reshape(N_ATOMS, NEIGHBOURS, IN_DIM, OUT_DIM)
        w = w.reshape(N_ATOMS, NEIGHBOURS, CHANNELS)
        messages = sum(x[:, :, a, None, :] * t[:, :, a, :, None] for a in range(IN_DIM)) * w[:, :, None, :]
        return messages.sum(1)

    def dense_einsum(h, t, w):
        return jnp.einsum("nkac,nkao,nkc->noc", h[neighbours], t.reshape(N_ATOMS, NEIGHBOURS, IN_DIM, OUT_DIM),
                          w.reshape(N_ATOMS, NEIGHBOURS, CHANNELS))

    arguments = (features, coupling, radial)
    reference = edge_list(*arguments)
    print(f"{N_ATOMS} atoms x {NEIGHBOURS} neighbours, {CHANNELS} channels, 1o x l=3; "
          f"jax {jax.__version__} on {jax.devices()[0]}")
    for name, function in (("edge list", edge_list), ("dense sum", dense_sum), ("dense einsum", dense_einsum)):
        error = float(jnp.abs(function(*arguments) - reference).max())

        def loss(h, t, w, function=function):
            return (function(h, t, w) ** 2).sum()

        forward = milliseconds(function, *arguments)
        both = milliseconds(jax.grad(loss, argnums=(0, 1, 2)), *arguments)
        print(f"{name:13s} forward {forward:7.2f} ms   forward+backward {both:7.2f} ms   "
              f"max |difference| {error:.1e}")


if __name__ == "__main__":
    main()
