"""Deep ensembles trained together: M members as one stacked pytree, one vmapped train step.

Members differ only in their initial parameters (one key per member split from the
run's seed); they see the same batches in the same order, share the data-set
statistics (E0s, scale, shift are data, not parameters) and each keep their own
optimizer state and EMA because the whole step — loss, gradient, optax update, EMA —
is `jax.vmap`ped over the leading member axis. On one device this trains M small
models for less than M times the cost of one (METHODS.md §4.2).
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def member_keys(key: jax.Array, members: int) -> jax.Array:
    """[M] independent initialisation keys, one per member."""
    if members < 1:
        raise ValueError(f"an ensemble needs at least one member, got {members}")
    return jax.random.split(key, members)


def init_members(potential, key: jax.Array, graph, members: int) -> Any:
    """Stacked parameters of ``members`` independently initialised copies of ``potential``."""
    return jax.vmap(lambda member_key: potential.init(member_key, graph))(member_keys(key, members))


def vmap_over_members(step_fn: Callable, n_member_args: int, n_shared_args: int) -> Callable:
    """Map ``step_fn`` over the leading axis of its first ``n_member_args`` arguments.

    The remaining ``n_shared_args`` (batch, learning rate, step, loss weights) are the
    same for every member. Outputs all gain the member axis (losses become [M]).
    """
    return jax.vmap(step_fn, in_axes=(0,) * n_member_args + (None,) * n_shared_args)
