"""SG-MCMC: SGLD and SGHMC sample a known Gaussian; chains get their own noise; collection; end to end."""

import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from conftest import with_long_range

NUM_DATA, PRIOR_PRECISION = 4, 0.5


def _chain(sampler, temperature, learning_rate, steps, coordinates, preconditioned=False, decay=0.999):
    """Independent 1-D chains (one per coordinate) on Ũ = θ²/2 with exact gradients, by lax.scan.

    Ũ = N·L + ½ λ θ² with the mean loss L = θ²/(4N) and λ = ½: data and prior each give θ²/4,
    so both gradient paths of the sampler are exercised. Returns the trajectory [steps, coordinates].
    """
    from mlip.uq.sgmcmc import sgmcmc_sampler

    optimizer = sgmcmc_sampler(sampler, NUM_DATA, temperature=temperature, friction=0.1,
                               prior_precision=PRIOR_PRECISION, preconditioned=preconditioned,
                               preconditioner_decay=decay)
    # Started from the target: the test measures the stationary law, not the transient
    # (from θ = 0 the first preconditioner is 1/ε and the first kick huge).
    theta = np.sqrt(temperature) * jax.random.normal(jax.random.PRNGKey(1), (coordinates,))
    rate = jnp.asarray(learning_rate)

    def step(carry, key):
        theta, state = carry
        mean_loss_gradient = theta / (2 * NUM_DATA)
        updates, state = optimizer.update(mean_loss_gradient, state, theta, key=key, learning_rate=rate)
        theta = theta - rate * updates  # what the trainer applies
        return (theta, state), theta

    keys = jax.random.split(jax.random.PRNGKey(0), steps)
    _, trajectory = jax.jit(lambda k: jax.lax.scan(step, (theta, optimizer.init(theta)), k))(keys)
    return np.asarray(trajectory)


@pytest.mark.parametrize("sampler", ["sgld", "sghmc"])
def test_sampler_reproduces_gaussian_mean_zero_and_variance_temperature(sampler):
    # η = α/N = 0.01 (SGLD; SGHMC η = aα/N): autocorrelation ~ 100 steps, 5000 kept steps ×
    # 512 chains ≈ 25 000 independent draws: the variance's sampling error is ~1 %, the
    # discretisation bias of SGLD's variance η/2 = 0.5 %.
    temperature = 0.3
    trajectory = _chain(sampler, temperature, learning_rate=0.04, steps=6000, coordinates=512)[1000:]
    assert abs(trajectory.mean()) < 0.03 * np.sqrt(temperature)
    assert trajectory.var() == pytest.approx(temperature, rel=0.04)


@pytest.mark.parametrize("sampler", ["sgld", "sghmc"])
def test_preconditioned_sampler_with_slow_preconditioner_keeps_the_target(sampler):
    # G ≈ N/|θ|-scale here; with a slowly averaged V it is nearly constant, so the dropped
    # drift-correction term is small (measured 3–4 % excess variance at β = 0.999).
    temperature = 0.3
    trajectory = _chain(sampler, temperature, learning_rate=0.01, steps=12000, coordinates=256,
                        preconditioned=True)[3000:]
    assert abs(trajectory.mean()) < 0.05 * np.sqrt(temperature)
    assert trajectory.var() == pytest.approx(temperature, rel=0.1)


def test_temperature_scales_the_noise_and_the_update_reproduces_the_sgld_move():
    from mlip.uq.sgmcmc import sgmcmc_sampler

    params = {"a": jnp.asarray([0.3, -1.2]), "b": jnp.asarray(2.0)}
    grads = {"a": jnp.asarray([0.5, 0.1]), "b": jnp.asarray(-0.4)}
    key, rate = jax.random.PRNGKey(3), jnp.asarray(0.02)
    moves = {}
    for temperature in (1.0, 0.25):
        optimizer = sgmcmc_sampler("sgld", 10, temperature=temperature, prior_precision=2.0)
        updates, _ = optimizer.update(grads, optimizer.init(params), params, key=key, learning_rate=rate)
        moves[temperature] = jax.tree.map(lambda u: -rate * u, updates)
    # Drift −α(g + λθ/N) is the same at both temperatures; the noise halves for T/4.
    drift = jax.tree.map(lambda g, p: -0.02 * (g + 0.2 * p), grads, params)
    for name in params:
        noise_hot = np.asarray(moves[1.0][name] - drift[name])
        noise_cold = np.asarray(moves[0.25][name] - drift[name])
        np.testing.assert_allclose(noise_cold, 0.5 * noise_hot, rtol=1e-10)
        assert np.all(noise_hot != 0)
    # The two leaves get different noise (one split key each), scaled by sqrt(2αT/N).
    leaf_keys = jax.random.split(key, 2)
    expected_a = np.sqrt(2 * 0.02 / 10) * np.asarray(jax.random.normal(leaf_keys[0], (2,)))
    np.testing.assert_allclose(np.asarray(moves[1.0]["a"] - drift["a"]), expected_a, rtol=1e-10)


def _hooks(samples_per_chain=3, burn_in=0.5):
    from mlip.training.config import SGMCMCConfig
    from mlip.uq.sgmcmc import SGMCMCHooks

    settings = SGMCMCConfig(chains=2, samples_per_chain=samples_per_chain, burn_in_fraction=burn_in)
    trainer = SimpleNamespace(config=SimpleNamespace(uncertainty=settings), train_samples=[None] * 5)
    return SGMCMCHooks(trainer)


def test_collection_is_evenly_spaced_after_burn_in_and_keeps_the_last_states():
    hooks = _hooks(samples_per_chain=3)
    params = {"w": np.zeros((2, 3))}  # 2 chains
    collection = hooks.initial_collection(params)
    kept_epochs = []
    for epoch in range(1, 21):  # epoch-limited: progress = epoch / 20
        state = {"epoch": epoch, "params": {"w": np.full((2, 3), float(epoch))}}
        before = int(collection["collected"])
        collection = hooks.after_epoch(collection, state, epoch / 20)
        if int(collection["collected"]) > before:
            kept_epochs.append(epoch)
    assert kept_epochs == [10, 15, 20]  # first after burn-in, then 10 epochs left for 2 samples
    posterior = hooks.posterior({"collection": collection, "epoch": 20}, None)
    assert posterior.ddof == 0 and posterior.details == {"chains": 2, "samples_per_chain": 3,
                                                         "temperature": 1.0, "sampler": "sghmc"}
    # Chain-major: chain 0's three samples, then chain 1's.
    np.testing.assert_array_equal(np.asarray(posterior.params["w"])[:, 0], [10, 15, 20, 10, 15, 20])

    # A time-limited run whose estimate was too short goes on: the ring keeps the last three.
    hooks = _hooks(samples_per_chain=2, burn_in=0.0)
    collection = hooks.initial_collection(params)
    for epoch in range(1, 8):
        state = {"epoch": epoch, "params": {"w": np.full((2, 3), float(epoch))}}
        collection = hooks.after_epoch(collection, state, 0.99)  # always "almost done"
    posterior = hooks.posterior({"collection": collection, "epoch": 7}, None)
    assert sorted(np.asarray(posterior.params["w"])[:2, 0]) == [6, 7]


def test_posterior_without_collected_states_names_the_setting():
    from mlip.errors import ConfigError

    hooks = _hooks(burn_in=0.9)
    collection = hooks.initial_collection({"w": np.zeros((2, 1))})
    collection = hooks.after_epoch(collection, {"epoch": 1, "params": {"w": np.ones((2, 1))}}, 0.5)
    with pytest.raises(ConfigError, match="burn_in_fraction"):
        hooks.posterior({"collection": collection, "epoch": 1}, None)


def _config(emt_file, run_dir):
    return {"run_dir": str(run_dir), "seed": 3,
            "data": {"train": f"{emt_file}@0:8", "valid": f"{emt_file}@8:12"},
            "model": with_long_range({"backbone": {"num_channels": 4, "max_ell": 1, "correlation": 1,
                                                   "radial_mlp": [8], "r_max": 3.0, "num_interactions": 1}},
                                     les=False),
            "training": {"max_epochs": 4, "batch_size": 4, "progress_bar": False, "plots": False,
                         "optimizer": {"learning_rate": 0.005}, "schedule": {"name": "constant"}},
            "uncertainty": {"method": "sgmcmc", "chains": 2, "burn_in_fraction": 0.5, "samples_per_chain": 2,
                            "temperature": 0.1}}


def test_train_evaluate_and_calculator_end_to_end(emt_file, tmp_path):
    import ase.io

    from mlip import MLIPCalculator
    from mlip.cli import main

    config = _config(emt_file, tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    run_dir = config["run_dir"]
    assert os.path.exists(os.path.join(run_dir, "posterior.msgpack"))
    model = json.load(open(os.path.join(run_dir, "model.json")))
    assert model["uncertainty"]["method"] == "sgmcmc"
    assert model["uncertainty"]["members"] == 2 * 2 and model["uncertainty"]["ddof"] == 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["posterior"]["samples"] == 4 and summary["posterior"]["sampler"] == "sghmc"

    # The collection lives in last.msgpack: a resumed, longer run goes on collecting into the
    # ring (epochs 2, 4 kept; spacing 2 → epoch 6 replaces epoch 2's states).
    from mlip.training.checkpoint import load_pytree_raw

    first = load_pytree_raw(os.path.join(run_dir, "posterior.msgpack"))
    assert main(["train", "--resume", run_dir, "--set", "training.max_epochs=6"]) == 0
    assert int(load_pytree_raw(os.path.join(run_dir, "last.msgpack"))["collection"]["collected"]) == 3
    second = load_pytree_raw(os.path.join(run_dir, "posterior.msgpack"))
    first_leaf, second_leaf = (np.asarray(jax.tree.leaves(tree)[0]) for tree in (first, second))
    # Chain-major [chain0: slot0, slot1, chain1: slot0, slot1]: slot 0 (epoch 2 → 6) changed, slot 1 kept.
    np.testing.assert_array_equal(first_leaf[[1, 3]], second_leaf[[1, 3]])
    assert not np.array_equal(first_leaf[[0, 2]], second_leaf[[0, 2]])

    # Fine-tuning from it, as active learning's later iterations do: best.msgpack holds the chains
    # (not model.json's posterior samples), and each new chain starts from its own.
    tuned = _config(emt_file, tmp_path / "tuned")
    tuned["training"].update(init_from=run_dir, max_epochs=2)  # collected after epochs 1 and 2
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump(tuned))
    assert main(["train", str(tmp_path / "tuned.yaml")]) == 0

    out = tmp_path / "test.json"
    assert main(["evaluate", run_dir, f"{emt_file}@12:", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["uncertainty_method"] == "sgmcmc" and metrics["posterior_samples"] == 4
    assert "forces_nll" in metrics and np.isfinite(metrics["forces_nll"])

    atoms = ase.io.read(emt_file, 12)
    atoms.calc = MLIPCalculator.from_run(run_dir)
    atoms.get_potential_energy()
    assert atoms.calc.results["energy_std"] > 0
    assert np.all(atoms.calc.results["forces_std"] > 0)


def test_chains_get_their_own_noise_in_the_trainer(emt_file, tmp_path):
    # After the end-to-end test: the same config compiles the same train step (persistent cache).
    from mlip.training.config import config_from_dict
    from mlip.training.trainer import Trainer

    trainer = Trainer(config_from_dict(_config(emt_file, tmp_path / "run")))
    state = trainer.initial_state()
    # Both chains start from chain 0's parameters: only the noise can tell them apart.
    same = jax.tree.map(lambda leaf: jnp.stack([leaf[0], leaf[0]]), state["params"])
    opt_state = jax.vmap(trainer.optimizer.init)(same)
    graph, _ = next(trainer.train_batches.batches(None))
    weights = {name: jnp.asarray(value, trainer.dtype) for name, value in trainer.loss_weights(0.0).items()}
    params, *_ = trainer._train_step(same, opt_state, None, graph, jnp.asarray(0.005, trainer.dtype),
                                     jnp.asarray(0, trainer.dtype), weights, jnp.asarray(0.0, trainer.dtype),
                                     trainer.potential)
    differences = [float(jnp.max(jnp.abs(leaf[0] - leaf[1]))) for leaf in jax.tree.leaves(params)]
    assert min(differences) > 0
