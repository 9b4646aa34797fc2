"""SWAG (METHODS.md §4.5): moments against numpy, draws against the analytic covariance, end to end."""

import json
import os
from types import SimpleNamespace

import ase.io
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from conftest import with_long_range
from mlip.errors import ConfigError
from mlip.uq import swag


def _toy_params(dtype=jnp.float64):
    """Two leaves (5 parameters), one nested, like a flax parameter dict."""
    return {"kernel": jnp.asarray([[0.3, -1.2], [2.0, 0.0]], dtype), "head": {"bias": jnp.asarray([0.7], dtype)}}


def _collected(n_collections, seed=0, offset=0.0, spread=1.0, dtype=jnp.float64):
    """n parameter sets around the toy parameters, as a list of pytrees."""
    rng = np.random.default_rng(seed)
    base = _toy_params(dtype)
    return [jax.tree.map(lambda leaf: leaf + jnp.asarray(offset + spread * rng.normal(size=leaf.shape), leaf.dtype),
                         base) for _ in range(n_collections)]


def _flat(tree):
    return np.concatenate([np.asarray(leaf, np.float64).reshape(-1)
                           for leaf in jax.tree.leaves(tree)])


def _flat_stack(tree):
    """[S, d] from a stacked pytree (leading sample axis)."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def _collect_all(sets, max_rank):
    moments = swag.init_moments(sets[0], max_rank)
    step = jax.jit(swag.collect)
    for params in sets:
        moments = step(moments, params)
    return moments


# ---------------------------------------------------------------- moments and draws


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_constant_parameters_give_samples_equal_to_the_mean(dtype):
    params = _toy_params(dtype)  # includes an exact 0.0, where a 1e-30 floor on the variance would show
    moments = _collect_all([params] * 5, max_rank=3)
    draws = swag.sample(moments, jax.random.PRNGKey(1), 7, scale=1.0)
    for theta_bar, theta, stacked in zip(jax.tree.leaves(moments["mean"]), jax.tree.leaves(params),
                                         jax.tree.leaves(draws)):
        assert stacked.shape == (7,) + theta.shape and stacked.dtype == theta.dtype
        np.testing.assert_array_equal(theta_bar, theta)
        np.testing.assert_array_equal(stacked, np.broadcast_to(theta_bar, stacked.shape))


def test_mean_and_diagonal_variance_match_numpy_without_float32_cancellation():
    # Spread 1e-3 around values near 10: θ̄² − θ̄² in float32 would lose every digit
    # (ulp of 100 is 8e-6, the variance 1e-6); Welford keeps them.
    sets = _collected(30, seed=2, offset=10.0, spread=1e-3, dtype=jnp.float32)
    moments = _collect_all(sets, max_rank=4)
    values = np.stack([_flat(s) for s in sets])  # the float32 values, exactly, in float64
    assert int(moments["count"]) == 30
    np.testing.assert_allclose(_flat(moments["mean"]), values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(_flat(swag.diagonal_variance(moments)), values.var(0), rtol=2e-2)
    naive = np.mean(values.astype(np.float32) ** 2, 0) - values.mean(0).astype(np.float32) ** 2
    assert np.max(np.abs(naive - values.var(0)) / values.var(0)) > 0.5  # what the Welford form avoids


def test_ring_buffer_keeps_the_last_k_deviations_from_the_running_mean():
    sets = _collected(5, seed=3)
    moments = _collect_all(sets, max_rank=3)
    values = np.stack([_flat(s) for s in sets])
    running_means = np.cumsum(values, 0) / np.arange(1, 6)[:, None]
    expected = values - running_means  # deviation of collection i from the mean after it
    buffer = _flat_stack(moments["deviations"])
    # Collection i (1-based) sits in column (i − 1) mod K: 4 → 0, 5 → 1, 3 → 2; 1 and 2 are overwritten.
    np.testing.assert_allclose(buffer, expected[[3, 4, 2]], rtol=1e-12, atol=1e-14)
    assert int(swag.rank(moments)) == 3


@pytest.mark.parametrize("n_collections,max_rank", [(6, 3), (3, 5)])
def test_draws_have_the_analytic_swag_mean_and_covariance(n_collections, max_rank):
    sets = _collected(n_collections, seed=4, spread=0.5)
    moments = _collect_all(sets, max_rank)
    scale, n_draws = 0.7, 40_000
    draws = _flat_stack(jax.jit(swag.sample, static_argnums=2)(moments, jax.random.PRNGKey(5), n_draws, scale))
    values = np.stack([_flat(s) for s in sets])
    filled = min(n_collections, max_rank)  # unfilled columns (zeros) do not enter K − 1
    deviations = _flat_stack(moments["deviations"])[:filled]
    covariance = scale**2 / 2 * (np.diag(values.var(0)) + deviations.T @ deviations / (filled - 1))
    # Sampling error of an empirical covariance entry: sqrt((Σ_ii Σ_jj + Σ_ij²)/N).
    diagonal = np.diag(covariance)
    standard_error = np.sqrt((np.outer(diagonal, diagonal) + covariance**2) / n_draws)
    np.testing.assert_array_less(np.abs(np.cov(draws, rowvar=False) - covariance), 5 * standard_error + 1e-12)
    np.testing.assert_array_less(np.abs(draws.mean(0) - values.mean(0)), 5 * np.sqrt(diagonal / n_draws))


# ---------------------------------------------------------------- hooks


def _hooks(schedule="cosine", max_epochs=100, **settings):
    from mlip.training.config import config_from_dict

    config = config_from_dict({"data": {"train": "x.xyz"},
                               "training": {"schedule": {"name": schedule}, "max_epochs": max_epochs},
                               "uncertainty": {"method": "swag", "start_fraction": 0.6, **settings}})
    return swag.SWAGHooks(SimpleNamespace(config=config)), config


def test_learning_rate_is_held_from_start_fraction_on():
    from mlip.training.trainer import learning_rate_at

    hooks, config = _hooks()
    held = learning_rate_at(config, 0.6, 1.0)
    assert hooks.learning_rate(0.01, 0.3) == 0.01  # before collection: the schedule's rate
    assert hooks.learning_rate(1e-5, 0.6) == hooks.learning_rate(1e-6, 0.95) == held
    assert held < config.training.optimizer.learning_rate
    fixed, _ = _hooks(learning_rate=3e-4)
    assert fixed.learning_rate(1e-6, 0.9) == 3e-4


def test_fewer_than_two_collections_is_a_clear_error():
    hooks, _ = _hooks()
    moments = swag.collect(hooks.initial_collection(_toy_params()), _toy_params())
    with pytest.raises(ConfigError, match="start_fraction.*max_epochs"):
        hooks.posterior({"collection": moments}, None)
    # An epoch budget that leaves one epoch after start_fraction: refused before training.
    with pytest.raises(ConfigError, match="collects 1 parameter set"):
        _hooks(start_fraction=0.75, max_epochs=2)
    _hooks(start_fraction=0.5, max_epochs=2)  # epochs 1 and 2 (progress 0.5 and 1)


def test_collects_by_epoch_or_every_n_steps_after_start_fraction_only():
    params = _toy_params()
    by_epoch, _ = _hooks()
    moments = by_epoch.initial_collection(params)
    moments = by_epoch.after_epoch(moments, {"params": params, "step": 10}, 0.5)
    moments = by_epoch.after_step(moments, {"params": params, "step": 10}, 0.9)
    assert int(moments["count"]) == 0
    assert int(by_epoch.after_epoch(moments, {"params": params, "step": 12}, 0.6)["count"]) == 1
    by_steps, _ = _hooks(collect_every_steps=4)
    moments = by_steps.initial_collection(params)
    for step in range(1, 13):
        moments = by_steps.after_step(moments, {"params": params, "step": step}, step / 12)
        moments = by_steps.after_epoch(moments, {"params": params, "step": step}, step / 12)
    assert int(moments["count"]) == 2  # steps 8 and 12; step 4 is before 60 %


# ---------------------------------------------------------------- end to end


def _write_config(tmp_path, emt_file, name, max_epochs=4):
    model = {"backbone": {"num_channels": 4, "max_ell": 1, "correlation": 1, "radial_mlp": [8], "r_max": 3.0,
                          "num_interactions": 1}}
    config = {"run_dir": str(tmp_path / name), "seed": 2,
              "data": {"train": f"{emt_file}@0:8", "valid": f"{emt_file}@8:12"},
              "model": with_long_range(model),  # LES and Ewald MP: SWAG through both long-range terms
              "training": {"max_epochs": max_epochs, "batch_size": 4, "progress_bar": False, "plots": False,
                           "schedule": {"name": "cosine", "warmup_fraction": 0.0}},
              # Collected after epochs 2, 3, 4 (progress 0.5, 0.75, 1).
              "uncertainty": {"method": "swag", "start_fraction": 0.5, "samples": 4, "max_rank": 5}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), config["run_dir"]


@pytest.fixture(scope="module")
def swag_run(tmp_path_factory, emt_file):
    from mlip.cli import main

    tmp_path = tmp_path_factory.mktemp("swag")
    path, run_dir = _write_config(tmp_path, emt_file, "run")
    assert main(["train", path]) == 0
    return run_dir


def test_train_evaluate_and_calculator_end_to_end(swag_run, emt_file, tmp_path):
    from mlip import MLIPCalculator
    from mlip.cli import main

    run_dir = swag_run
    assert os.path.exists(os.path.join(run_dir, "posterior.msgpack"))
    model = json.load(open(os.path.join(run_dir, "model.json")))
    assert model["uncertainty"]["method"] == "swag" and model["uncertainty"]["members"] == 4
    assert (model["uncertainty"]["ddof"], model["uncertainty"]["collected"], model["uncertainty"]["rank"]) == (0, 3, 3)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["epochs"] == 4 and summary["posterior"]["samples"] == 4
    assert "forces_nll" in summary["valid"]
    # The rate is held from the first step at 50 % of the run on: epochs 3 and 4 share it.
    rates = [row.split(",")[3] for row in open(os.path.join(run_dir, "metrics.csv")).read().splitlines()[1:]]
    assert rates[2] == rates[3] != rates[0]

    out = tmp_path / "test.json"
    assert main(["evaluate", run_dir, f"{emt_file}@12:", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["uncertainty_method"] == "swag" and metrics["posterior_samples"] == 4
    assert "forces_nll" in metrics and "energy_spearman" in metrics

    atoms = ase.io.read(emt_file, 12)
    atoms.calc = MLIPCalculator.from_run(run_dir)
    atoms.get_potential_energy()
    assert atoms.calc.results["energy_std"] > 0 and np.all(atoms.calc.results["forces_std"] > 0)
    assert atoms.calc.results["charges"].sum() == pytest.approx(0.0, abs=1e-5)  # LES: a neutral cell


class _Killed(Exception):
    pass


def test_killed_and_resumed_run_keeps_collecting_where_it_stopped(swag_run, emt_file, tmp_path, monkeypatch):
    from mlip.cli import main
    from mlip.training import checkpoint

    path, run_dir = _write_config(tmp_path, emt_file, "killed")
    real_save, saves = checkpoint.save_pytree, []

    def save_then_die(target, tree):
        real_save(target, tree)
        if target.endswith("last.msgpack"):
            saves.append(target)
            if len(saves) == 3:
                raise _Killed()  # after epoch 3: two collections in last.msgpack

    monkeypatch.setattr(checkpoint, "save_pytree", save_then_die)
    with pytest.raises(_Killed):
        main(["train", path])
    monkeypatch.setattr(checkpoint, "save_pytree", real_save)
    killed = flax.serialization.msgpack_restore(open(os.path.join(run_dir, "last.msgpack"), "rb").read())
    assert int(killed["collection"]["count"]) == 2
    assert main(["train", "--resume", run_dir]) == 0

    resumed = flax.serialization.msgpack_restore(open(os.path.join(run_dir, "last.msgpack"), "rb").read())
    full = flax.serialization.msgpack_restore(open(os.path.join(swag_run, "last.msgpack"), "rb").read())
    assert int(resumed["collection"]["count"]) == int(full["collection"]["count"]) == 3
    for a, b in zip(jax.tree.leaves(resumed["collection"]), jax.tree.leaves(full["collection"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for name in ("posterior.msgpack",):
        a = flax.serialization.msgpack_restore(open(os.path.join(run_dir, name), "rb").read())
        b = flax.serialization.msgpack_restore(open(os.path.join(swag_run, name), "rb").read())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
