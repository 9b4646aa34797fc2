"""Continual fine-tuning (`training.init_from`): start a run from a trained run (METHODS.md §6.3).

The new run takes the source run's model section (its own ``model:`` keys override it,
e.g. a longer ``fidelities`` list), its statistics and its best parameters:

* statistics: the source's E0, shift and scale for every fidelity it knew, and its
  ``avg_num_neighbors`` (a constant of the backbone), so before the first step the model
  predicts exactly what the source run did; a new element's E0 is fitted to the new
  data with the known E0 held fixed, a new fidelity's statistics come from its frames;
* parameters: copied leaf by leaf, matched by name; along the species axis of a
  per-element weight, the rows of the known elements are copied and a new element's
  row keeps its fresh initialisation; a new fidelity's head (``head/fidelity_<name>``)
  and embedding row start fresh too;
* replay (`data.replay`) of the source run's training data, and its validation frames
  as the "old task" whose errors the run records before and during fine-tuning.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Sequence

import numpy as np

from mlip.errors import CheckpointError, ConfigError


@dataclasses.dataclass
class SourceRun:
    """What a fine-tuning run takes from the run it starts from."""

    run_dir: str
    config: Any  # its RunConfig
    statistics: Any  # its DatasetStatistics
    params: Any  # its best parameters (stacked [M, ...] for a run with members)
    members: int  # 0: one model

    @property
    def model(self):
        return self.config.model


def load_source_run(run_dir: str) -> SourceRun:
    """The config, statistics and best parameters of the run ``training.init_from`` names."""
    import jax

    from mlip.data.statistics import DatasetStatistics
    from mlip.potential import Potential
    from mlip.training import checkpoint
    from mlip.training.config import load_config
    from mlip.uq.methods import hooks_class

    metadata = checkpoint.read_model_json(run_dir)
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{run_dir}: no config.yaml; training.init_from needs a run directory of `mlip train`")
    config = load_config(config_path)
    statistics = DatasetStatistics.from_json(metadata["statistics"])
    # The trained model is config.yaml's (a Laplace run's model.json describes its posterior head).
    template = checkpoint.parameter_template(Potential(config.model, statistics))
    # best.msgpack holds the parameters as trained: stacked over deep-ensemble members or SG-MCMC
    # chains (not over model.json's posterior samples, which live in posterior.msgpack).
    members = hooks_class(config.uncertainty.method).members_for(config.uncertainty) or 0
    if members:
        template = jax.tree.map(lambda s: jax.ShapeDtypeStruct((members,) + s.shape, s.dtype), template)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    params = checkpoint.load_pytree(os.path.join(run_dir, "best.msgpack"), zeros)
    return SourceRun(run_dir, config, statistics, jax.tree.map(np.asarray, params), members)


def merged_model_config(source_model, user_model, explicitly_set: dict):
    """The source run's model section with the keys the new config sets itself laid over it."""
    from mlip.model_config import ModelConfig

    def merge(base: dict, update: dict) -> dict:
        merged = dict(base)
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and \
                    value.get("name", merged[key].get("name")) == merged[key].get("name"):
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = value
        return merged

    tree = merge(source_model.model_dump(mode="json"), explicitly_set)
    try:
        return ModelConfig.model_validate(tree)
    except Exception as error:  # pydantic's message names the key
        raise ConfigError(f"model section merged from training.init_from: {error}") from None


# ------------------------------------------------------------------ parameters
_IRREPS_COUNT = re.compile(r"\b\d+x(?=\d[eo])")


def _normalised(key: str) -> str:
    """Parameter names that embed an irreps multiplicity (e3nn's ``w[0,0] 2x0e,8x0e``) without the
    counts, so the embedding of a model with one more element still matches by name."""
    return _IRREPS_COUNT.sub("#x", str(key))


def transplant(fresh: Any, source: Any, source_numbers: Sequence[int], numbers: Sequence[int],
               source_fidelities: Sequence[str], fidelities: Sequence[str], path: tuple = ()) -> tuple[Any, dict]:
    """``fresh`` parameters with every leaf the source model also has copied from ``source``.

    Returns the parameters and counts ``{"copied": n, "fresh": n, "extended": n}`` of leaves
    (extended: copied into a larger per-element or per-fidelity array).

    Raises:
        CheckpointError: a leaf of both models whose shapes differ other than along the
            species or fidelity axis (the model sections differ).
    """
    counts = {"copied": 0, "fresh": 0, "extended": 0}
    if not isinstance(fresh, dict):
        value, how = _transplant_leaf(fresh, source, source_numbers, numbers, source_fidelities, fidelities, path)
        counts[how] += 1
        return value, counts
    by_name = {}
    if isinstance(source, dict):
        for key in source:
            by_name.setdefault(_normalised(key), []).append(key)
    result = {}
    for key, value in fresh.items():
        source_key = key
        if not (isinstance(source, dict) and key in source):
            candidates = by_name.get(_normalised(key), [])
            source_key = candidates[0] if len(candidates) == 1 else None
        if source_key is None:
            leaves = len(_leaves(value))
            counts["fresh"] += leaves
            result[key] = value
            continue
        match = source[source_key]
        if source_key != key and not isinstance(value, dict):
            match = np.asarray(match) * _fan_in_factor(source_key, key)
        result[key], sub_counts = transplant(value, match, source_numbers, numbers, source_fidelities, fidelities,
                                             path + (key,))
        for name in counts:
            counts[name] += sub_counts[name]
    return result, counts


def _fan_in_factor(source_key: str, key: str) -> float:
    """e3nn's linear layers divide by √(fan-in), the input multiplicity in the weight's name
    (``w[0,0] 2x0e,8x0e``: 2 elements in); with another element count the copied weights are
    rescaled so the known elements' outputs stay the same."""
    old, new = (_IRREPS_COUNT.search(str(name)) for name in (source_key, key))
    if old is None or new is None:
        return 1.0
    return float(np.sqrt(int(new.group(0)[:-1]) / int(old.group(0)[:-1])))


def _leaves(tree: Any) -> list:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    return [tree]


def _transplant_leaf(fresh, source, source_numbers, numbers, source_fidelities, fidelities, path):
    fresh = np.asarray(fresh)
    if isinstance(source, dict):
        raise CheckpointError(f"init_from: parameter {'/'.join(path)} is a module in the source run and an array "
                              "here; the model sections differ")
    source = np.asarray(source)
    embedding_of_fidelities = "fidelity" in path  # FidelityEmbedding's table [F, C]
    if source.shape == fresh.shape and (not embedding_of_fidelities or list(source_fidelities) == list(fidelities)):
        return source.astype(fresh.dtype), "copied"
    if source.ndim != fresh.ndim:
        raise CheckpointError(f"init_from: parameter {'/'.join(path)} has shape {source.shape} in the source run and "
                              f"{fresh.shape} here; the model sections differ")
    value = fresh.copy()
    index = [slice(None)] * fresh.ndim
    target = [slice(None)] * fresh.ndim
    for axis, (old, new) in enumerate(zip(source.shape, fresh.shape)):
        if embedding_of_fidelities and axis == 0:
            kept = [name for name in source_fidelities if name in fidelities]
            index[axis] = [list(source_fidelities).index(name) for name in kept]
            target[axis] = [list(fidelities).index(name) for name in kept]
        elif old == new:
            continue
        elif old == len(source_numbers) and new == len(numbers):
            index[axis] = list(range(len(source_numbers)))
            target[axis] = [list(numbers).index(z) for z in source_numbers]
        else:
            raise CheckpointError(f"init_from: parameter {'/'.join(path)} has shape {source.shape} in the source run "
                                  f"and {fresh.shape} here; the model sections differ")
    # Advanced indices on several axes would pair up; apply one axis at a time.
    picked = source
    for axis, selection in enumerate(index):
        if not isinstance(selection, slice):
            picked = np.take(picked, selection, axis=axis)
    region = tuple(np.ix_(*[np.asarray(t) if not isinstance(t, slice) else np.arange(fresh.shape[a])
                            for a, t in enumerate(target)]))
    value[region] = picked.astype(fresh.dtype)
    return value, "extended"


def initial_parameters(fresh: Any, source: SourceRun, numbers: Sequence[int], fidelities: Sequence[str],
                       members: int) -> tuple[Any, dict]:
    """The fine-tuning run's starting parameters (stacked over ``members`` when it has them)."""
    import jax

    def one(fresh_params, source_params):
        return transplant(jax.tree.map(np.asarray, _plain(fresh_params)), _plain(source_params),
                          source.statistics.atomic_numbers, numbers, source.model.fidelity_names, fidelities)

    if not members:
        source_params = jax.tree.map(lambda x: x[0], source.params) if source.members else source.params
        if source.members > 1:
            print(f"notice: init_from {source.run_dir}: the source run has {source.members} members; "
                  "fine-tuning starts from the first", file=sys.stderr)
        return one(fresh, source_params)
    outputs = []
    for m in range(members):
        source_params = (jax.tree.map(lambda x: x[m % source.members], source.params) if source.members
                         else source.params)
        outputs.append(one(jax.tree.map(lambda x: x[m], fresh), source_params))
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[params for params, _ in outputs])
    return stacked, outputs[0][1]


def _plain(tree: Any) -> Any:
    """Flax's FrozenDict or nested mappings as plain nested dicts."""
    if hasattr(tree, "items"):
        return {key: _plain(value) for key, value in tree.items()}
    return tree


def describe_transplant(source: SourceRun, counts: dict) -> str:
    return (f"init_from {source.run_dir}: {counts['copied']} parameter arrays copied, {counts['extended']} extended "
            f"(new elements or fidelities), {counts['fresh']} new")


def old_task_fidelity(source: SourceRun, fidelities: Sequence[str], frames: Sequence) -> None:
    """Map the source run's frames (fidelity indices of its model) to this model's fidelity indices."""
    from mlip.errors import DataError

    source_names = source.model.fidelity_names
    for frame in frames:
        if not fidelities:
            frame.fidelity = 0
        elif source_names:
            name = source_names[frame.fidelity]
            if name not in fidelities:
                raise DataError(f"{frame.source}: the source run's fidelity '{name}' is not in model.fidelities "
                                f"{list(fidelities)}; keep it listed to replay or validate its data")
            frame.fidelity = list(fidelities).index(name)
        else:
            raise DataError(f"{frame.source}: the source run has one fidelity and this model several "
                            f"{list(fidelities)}; give data.replay.source with its fidelity "
                            "({source: ..., fidelity: NAME})")


def replay_count(new_frames: int, fraction: float) -> int:
    """Old frames drawn per epoch so they are ``fraction`` of the epoch's frames."""
    return max(1, int(round(fraction / (1.0 - fraction) * new_frames)))


def check_source_run(source: SourceRun, run_dir: str) -> None:
    if os.path.abspath(source.run_dir) == os.path.abspath(run_dir):
        raise ConfigError(f"training.init_from is the run's own run_dir {run_dir}; fine-tune into a new directory")
