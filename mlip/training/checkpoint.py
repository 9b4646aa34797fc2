"""Saving and restoring runs without pickle: JSON metadata plus flax msgpack state.

A run directory holds
  * ``config.yaml``     the resolved run config,
  * ``model.json``      what is needed to rebuild the model (model config, data-set
                        statistics, mlip version, format version),
  * ``best.msgpack``    the parameters (EMA if enabled) with the best validation loss,
  * ``last.msgpack``    everything needed to resume: parameters, optimizer state, EMA,
                        epoch, step, elapsed time, schedule and early-stopping state,
  * ``calibration.json`` (runs with uncertainty) the σ recalibration scales.
A run with uncertainty stores its parameters as a posterior stack (leading axis =
ensemble members or samples) and names its method in model.json.
Every file is written to a temporary file and renamed, so a killed run never leaves a
half-written checkpoint. Restoring checks the tree structure and every leaf shape
against a freshly initialised template and fails loudly on a mismatch.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import flax.serialization
import jax
import numpy as np

from mlip.errors import CheckpointError, ConfigError

# 2: model.json may name an uncertainty method and the parameters are then a stack.
# Runs without uncertainty are still written as 1, so older mlip versions read them.
FORMAT_VERSION = 2
CALIBRATION_FILE = "calibration.json"
POSTERIOR_FILE = "posterior.msgpack"  # samples of SWAG, Laplace, SG-MCMC, IVON runs


def atomic_write_bytes(path: str, payload: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes owner-only files; use normal permissions
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_figure(figure, path: str) -> None:
    """A matplotlib figure as PNG, written atomically (a plot is never half-written), then closed."""
    import io

    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str) -> Any:
    """A JSON file written by `write_json`, or None where there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as stream:
        return json.load(stream)


def save_pytree(path: str, tree: Any) -> None:
    host_tree = jax.tree.map(np.asarray, tree)
    atomic_write_bytes(path, flax.serialization.to_bytes(host_tree))


def load_pytree(path: str, template: Any) -> Any:
    """Restore ``path`` into the structure of ``template``; shapes must match exactly."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as stream:
        payload = stream.read()
    try:
        raw = flax.serialization.msgpack_restore(payload)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({error})") from error
    template_state = flax.serialization.to_state_dict(template)
    _check_same_structure(template_state, raw, path, "")
    return flax.serialization.from_state_dict(template, raw)


def _check_same_structure(expected: Any, found: Any, path: str, where: str) -> None:
    if isinstance(expected, dict):
        if not isinstance(found, dict):
            raise CheckpointError(f"{path}: at '{where or '/'}' expected a mapping, found {type(found).__name__}")
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{path}: at '{where or '/'}' the checkpoint does not match the model "
                                  f"(missing {missing[:5]}, unexpected {extra[:5]}); was it written "
                                  "with a different model config?")
        for key in expected:
            _check_same_structure(expected[key], found[key], path, f"{where}/{key}")
        return
    expected_shape = np.shape(expected)
    found_shape = np.shape(found)
    if expected_shape != found_shape:
        raise CheckpointError(f"{path}: '{where}' has shape {found_shape}, the model expects "
                              f"{expected_shape}; was it written with a different model config?")


def read_model_json(run_dir: str) -> dict:
    path = os.path.join(run_dir, "model.json")
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"{run_dir}: run directory not found")
    if not os.path.exists(path):
        raise CheckpointError(f"{run_dir}: no model.json; is this a run directory of `mlip train`?")
    with open(path) as stream:
        data = json.load(stream)
    version = int(data.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer mlip (format {version}, this mlip reads up to "
                              f"{FORMAT_VERSION}); upgrade mlip to load it")
    return data


def model_metadata(potential, uncertainty: dict | None = None) -> dict:
    """model.json: model config, statistics, versions; ``uncertainty`` as {method, members}."""
    from mlip import __version__

    metadata = {"format_version": 1 if uncertainty is None else FORMAT_VERSION, "mlip_version": __version__,
                "model": potential.config.model_dump(mode="json"),
                "statistics": potential.statistics.to_json()}
    if potential.config.fidelities:  # what the calculator and MD predict unless told otherwise
        metadata["default_fidelity"] = potential.config.fidelities[-1]
    if uncertainty is not None:
        metadata["uncertainty"] = dict(uncertainty)
    return metadata


def write_recalibration(run_dir: str, recalibration, details: dict) -> None:
    """Store the σ scales of a run (calibration.json), with how they were fitted."""
    write_json(os.path.join(run_dir, CALIBRATION_FILE), {"scale": recalibration.to_json(), **details})


def read_recalibration(run_dir: str):
    """The run's `Recalibration`, or the identity when the run has none."""
    from mlip.uq.posterior import Recalibration

    path = os.path.join(run_dir, CALIBRATION_FILE)
    if not os.path.exists(path):
        return Recalibration()
    try:
        with open(path) as stream:
            return Recalibration.from_json(json.load(stream)["scale"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: not a readable calibration file ({error!r})") from None


def read_interval_quantiles(run_dir: str) -> dict | None:
    """name -> quantiles of |e|/σ for isotonically recalibrated intervals, or None (older runs, no labels)."""
    path = os.path.join(run_dir, CALIBRATION_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as stream:
        return json.load(stream).get("interval_quantiles")


def dummy_graph(atomic_numbers):
    """A small molecule holding each known element once: enough to initialise parameters."""
    from mlip.data.batching import build_sample, pack_samples
    from mlip.data.reader import Frame

    numbers = np.asarray(list(atomic_numbers) * (1 if len(atomic_numbers) > 1 else 2))
    positions = np.zeros((len(numbers), 3))
    positions[:, 0] = 1.5 * np.arange(len(numbers))
    frame = Frame(positions=positions, numbers=numbers, cell=np.zeros((3, 3)),
                  pbc=np.zeros(3, bool))
    return pack_samples([build_sample(frame, 5.0)])


def parameter_template(potential) -> Any:
    """Parameter shapes of ``potential`` without running it."""
    graph = dummy_graph(potential.statistics.atomic_numbers)
    return jax.eval_shape(potential.init, jax.random.PRNGKey(0), graph)


def load_potential(run_dir: str, which: str = "best", rotation_average: Optional[int] = None,
                   fidelity: Optional[str] = None, per_frame_fidelity: bool = False):
    """The `Potential` of a run and its parameters (``best`` or ``last``).

    ``rotation_average``: for a TransIP model, average its features over this many fixed
    rotations at inference (the parameters are the same; 0 or 1: none).

    ``fidelity``: a multi-fidelity model predicts every structure at this level of theory
    (None: the default one model.json names, the last of ``model.fidelities``); with
    ``per_frame_fidelity`` and no ``fidelity`` it reads each graph's own level instead
    (evaluation of tagged data).

    For a run with uncertainty (model.json names a method) the potential is a
    `mlip.uq.PosteriorPotential` carrying the run's recalibration, and the parameters are
    the stack of members; its ``apply`` returns the mean plus ``<name>_std`` outputs.

    Raises:
        CheckpointError: no such run, a newer format, or parameters that do not fit
            the model described in model.json.
    """
    from mlip.data.statistics import DatasetStatistics
    from mlip.potential import Potential
    from mlip.training.config import ModelConfig

    metadata = read_model_json(run_dir)
    model = metadata["model"]
    if rotation_average is not None:
        if model["backbone"].get("name") != "transip":
            raise ConfigError(f"{run_dir}: rotation averaging applies to transip models, this one is "
                              f"{model['backbone'].get('name')} (equivariant by construction)")
        model = {**model, "backbone": {**model["backbone"], "rotation_average": int(rotation_average)}}
    potential = Potential(ModelConfig.model_validate(model), DatasetStatistics.from_json(metadata["statistics"]))
    if fidelity is not None or not per_frame_fidelity:
        potential = potential.with_fidelity(fidelity if fidelity is not None else metadata.get("default_fidelity"))
    template = parameter_template(potential)
    uncertainty = metadata.get("uncertainty")
    if uncertainty is not None:
        from mlip.uq.posterior import PosteriorPotential

        members = int(uncertainty["members"])
        template = jax.tree.map(lambda s: jax.ShapeDtypeStruct((members,) + s.shape, s.dtype), template)
        potential = PosteriorPotential(potential, method=uncertainty["method"],
                                       ddof=int(uncertainty.get("ddof", 1)),
                                       recalibration=read_recalibration(run_dir))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    if uncertainty is not None and uncertainty.get("posterior_file"):
        # SWAG, Laplace, SG-MCMC, IVON: the samples drawn after the last epoch are the
        # model, for "best" and "last" alike (the training state is not a posterior).
        params = load_pytree(os.path.join(run_dir, uncertainty["posterior_file"]), zeros)
    elif which == "best":
        params = load_pytree(os.path.join(run_dir, "best.msgpack"), zeros)
    else:
        state = load_pytree_raw(os.path.join(run_dir, "last.msgpack"))
        params = flax.serialization.from_state_dict(zeros, state["ema_params"] or state["params"])
    return potential, jax.tree.map(np.asarray, params)


def load_pytree_raw(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as stream:
        return flax.serialization.msgpack_restore(stream.read())
