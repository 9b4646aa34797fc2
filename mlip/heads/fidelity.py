"""One readout head per level of theory on a shared backbone (multi-fidelity models, METHODS.md §5).

Every head sees the same node features; each atom keeps the outputs of its frame's
fidelity's head only (a `jnp.where`, so the other heads get exactly zero gradient from
it). Any head works: an energy readout, a mean-variance head or a shallow ensemble.
The heads' parameters sit under ``head/fidelity_<name>``, so a run fine-tuned with a new
fidelity keeps the old heads by name and starts the new one fresh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

FIDELITY_PREFIX = "fidelity_"


class FidelityHeads(nn.Module):
    """Outputs of the head of each atom's fidelity: the same keys and shapes as one head's."""

    head_class: Any  # a registered head module class
    head_settings: tuple  # its keyword arguments, as (name, value) pairs
    fidelities: tuple[str, ...]

    @nn.compact
    def __call__(self, node_features, node_fidelity: jnp.ndarray) -> dict:
        selected = None
        for index, name in enumerate(self.fidelities):
            outputs = self.head_class(**dict(self.head_settings), name=FIDELITY_PREFIX + name)(node_features)
            if not isinstance(outputs, dict):
                outputs = {"energy": outputs}
            if selected is None:
                selected = outputs
                continue
            # Node is the last axis of every head output ([N], or [K, N] for K readouts).
            selected = {key: jnp.where(node_fidelity == index, value, selected[key])
                        for key, value in outputs.items()}
        return selected


def head_paths(params: Any) -> list[tuple]:
    """Key paths of the readout head(s) in a parameter tree: ``("head",)`` for one head,
    ``("head", "fidelity_<name>")`` for each head of a multi-fidelity model."""
    head = params["head"]
    names = sorted(key for key in head if key.startswith(FIDELITY_PREFIX))
    return [("head", name) for name in names] if names else [("head",)]


def tree_at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def tree_with(tree: dict, path: tuple, value: Any) -> dict:
    """A copy of the nested dict ``tree`` with the entry at ``path`` replaced."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: tree_with(tree[path[0]], path[1:], value)}
