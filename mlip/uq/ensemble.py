"""Deep ensembles trained together: M members as one stacked pytree, one mapped train step.

Members differ only in their initial parameters (one key per member split from the
run's seed); they see the same batches in the same order, share the data-set
statistics (E0s, scale, shift are data, not parameters) and each keep their own
optimizer state and EMA because the whole step — loss, gradient, optax update, EMA —
is mapped over the leading member axis (METHODS.md §4.2): vmapped on accelerators,
one member after another on CPU, where that measured faster (see
`mlip.uq.posterior.parallel_group`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from mlip.uq.posterior import map_samples


def member_keys(key: jax.Array, members: int) -> jax.Array:
    """[M] independent initialisation keys, one per member."""
    if members < 1:
        raise ValueError(f"an ensemble needs at least one member, got {members}")
    return jax.random.split(key, members)


def init_members(potential, key: jax.Array, graph, members: int) -> Any:
    """Stacked parameters of ``members`` independently initialised copies of ``potential``."""
    return jax.vmap(lambda member_key: potential.init(member_key, graph))(member_keys(key, members))


def map_over_members(step_fn: Callable, n_member_args: int, parallel: Optional[int] = None) -> Callable:
    """``step_fn`` over the leading axis of its first ``n_member_args`` arguments.

    The remaining arguments (batch, learning rate, step, loss weights) are the same for
    every member. Outputs all gain the member axis (losses become [M]). Members are
    vmapped in groups of ``parallel`` (None: all on GPU/TPU, one at a time on CPU; see
    `mlip.uq.posterior.parallel_group`).
    """
    def mapped(*args):
        member_args, shared_args = args[:n_member_args], args[n_member_args:]
        return map_samples(lambda member: step_fn(*member, *shared_args), tuple(member_args), parallel)

    return mapped
