"""IVON: the update against a numpy transcription of the reference, the posterior of a linear model, end to end."""

import json
import os

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from conftest import with_long_range


def reference_ivon_steps(m, grads, noises, lr, ess, beta1=0.9, beta2=0.99999, hess_init=1.0, wd=1e-4,
                         clip_radius=np.inf, debias=True):
    """``IVON._update`` of team-approx-bayes/ivon (price Hessian, one MC sample) on a flat numpy vector."""
    momentum, hess = np.zeros_like(m), np.full_like(m, hess_init)
    trajectory = []
    for step, (g, noise) in enumerate(zip(grads, noises), start=1):
        momentum = beta1 * momentum + (1.0 - beta1) * g
        f = noise * g * (hess + wd) * ess
        hess = beta2 * hess + (1.0 - beta2) * f + 0.5 * (1 - beta2) ** 2 * (hess - f) ** 2 / (hess + wd)
        bias = 1.0 - beta1**step if debias else 1.0
        m = m - lr * (hess_init + wd) * np.clip((momentum / bias + wd * m) / (hess + wd), -clip_radius, clip_radius)
        trajectory.append((m.copy(), momentum.copy(), hess.copy()))
    return trajectory


def _tree(flat, shapes=((2, 3), (4,))):
    a, b = np.split(flat, [int(np.prod(shapes[0]))])
    return {"kernel": jnp.asarray(a.reshape(shapes[0])), "bias": jnp.asarray(b)}


def _flat(tree):
    return np.concatenate([np.ravel(tree["kernel"]), np.ravel(tree["bias"])])


@pytest.mark.parametrize("options", [{}, {"clip_radius": 0.05, "beta2": 0.9, "debias": False}])
def test_update_matches_numpy_transcription_of_the_reference(options):
    from mlip.uq.ivon import ivon

    rng = np.random.default_rng(0)
    lr, ess = 0.3, 50.0
    m0 = rng.normal(size=10)
    grads = [rng.normal(size=10) * 3 for _ in range(5)]
    noises = [rng.normal(size=10) * 0.2 for _ in range(5)]
    expected = reference_ivon_steps(m0, grads, noises, lr, ess, **options)

    optimizer = ivon(ess, **options)
    params = _tree(m0)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for (m, momentum, hess), g, noise in zip(expected, grads, noises):
        updates, state = update(_tree(g), state, params, noise=_tree(noise), key=jax.random.PRNGKey(0),
                                learning_rate=lr)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)  # as the trainer does
        np.testing.assert_allclose(_flat(params), m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(_flat(state.momentum), momentum, rtol=1e-12)
        np.testing.assert_allclose(_flat(state.hessian), hess, rtol=1e-12)
    assert int(state.count) == 5
    # Several draws: noise_grad = mean ε ⊙ g replaces noise.
    one = optimizer.update(_tree(grads[0]), optimizer.init(params), params, noise=_tree(noises[0]))[0]
    two = optimizer.update(_tree(grads[0]), optimizer.init(params), params,
                           noise_grad=_tree(noises[0] * grads[0]))[0]
    np.testing.assert_allclose(_flat(one), _flat(two), rtol=1e-14)


def test_first_step_is_sgd_with_weight_decay():
    from mlip.uq.ivon import ivon

    rng = np.random.default_rng(1)
    m, g = _tree(rng.normal(size=10)), _tree(rng.normal(size=10))
    wd = 1e-3
    optimizer = ivon(100.0, hess_init=0.7, weight_decay=wd)
    # Noise ε = 0: ĥ = 0 and with β₂ = 0.99999, h₁ = h₀ (1 − 1e-5 + O(1e-10)).
    updates, state = optimizer.update(g, optimizer.init(m), m, noise=jax.tree.map(jnp.zeros_like, m))
    sgd = jax.tree.map(lambda grad, p: grad + wd * p, g, m)
    np.testing.assert_allclose(_flat(updates), _flat(sgd), rtol=2e-5)
    np.testing.assert_allclose(_flat(state.hessian), 0.7 * (1 - 1e-5) + 0.5e-10 * 0.7**2 / (0.7 + wd), rtol=1e-12)


def test_noise_has_the_posterior_variance_and_independent_leaves():
    from mlip.uq.ivon import draw_noise

    hessian = {"a": jnp.full((4000,), 3.0), "b": jnp.full((4000,), 3.0), "c": jnp.full((2, 2000), 0.5)}
    noise = draw_noise(jax.random.PRNGKey(0), hessian, 10.0, 1e-4)
    assert np.var(noise["a"]) == pytest.approx(1 / (10 * (3.0 + 1e-4)), rel=0.08)
    assert np.var(noise["c"]) == pytest.approx(1 / (10 * (0.5 + 1e-4)), rel=0.08)
    assert not np.allclose(noise["a"], noise["b"])  # same shape, own key
    assert abs(np.corrcoef(noise["a"], noise["b"])[0, 1]) < 0.1


def test_bayesian_linear_regression_mean_and_variance_approach_mean_field_posterior():
    """Gaussian likelihood with known noise: q's optimum is the exact mean and precision diag(P)."""
    from mlip.uq.ivon import draw_noise, ivon, posterior_std

    rng = np.random.default_rng(3)
    n, d, sigma, wd = 64, 3, 0.5, 0.05
    x = rng.normal(size=(n, d)) * np.array([1.0, 0.5, 2.0])
    w_true = np.array([0.7, -1.2, 0.3])
    y = x @ w_true + sigma * rng.normal(size=n)
    # Loss = mean NLL per example, λ = n, prior N(0, 1/(λδ)): posterior precision P = XᵀX/σ² + nδ.
    precision = x.T @ x / sigma**2 + n * wd * np.eye(d)
    exact_mean = np.linalg.solve(precision, x.T @ y / sigma**2)
    mean_field_std = 1 / np.sqrt(np.diag(precision))

    def loss(w):
        return jnp.mean((y - x @ w["w"]) ** 2) / (2 * sigma**2)

    optimizer = ivon(n, beta2=0.999, weight_decay=wd, hess_init=1.0)
    lr = 0.05

    def step(carry, key):
        params, state = carry
        noise = draw_noise(key, state.hessian, n, wd)
        grads = jax.grad(loss)(jax.tree.map(jnp.add, params, noise))
        updates, state = optimizer.update(grads, state, params, noise=noise)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return (params, state), params["w"]

    params = {"w": jnp.zeros(d)}
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    (params, state), trajectory = jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, optimizer.init(params)),
                                                                                 keys)
    late_mean = np.asarray(trajectory[-5000:]).mean(axis=0)
    np.testing.assert_allclose(late_mean, exact_mean, atol=0.1 * mean_field_std.min())
    np.testing.assert_allclose(np.asarray(posterior_std(state.hessian, n, wd)["w"]), mean_field_std, rtol=0.05)


def test_state_survives_a_checkpoint_round_trip(tmp_path):
    from mlip.training import checkpoint
    from mlip.uq.ivon import ivon

    optimizer = ivon(10.0)
    params = _tree(np.arange(10.0))
    _, state = optimizer.update(_tree(np.ones(10)), optimizer.init(params), params, noise=_tree(np.full(10, 0.1)))
    path = str(tmp_path / "last.msgpack")
    checkpoint.save_pytree(path, {"opt_state": state})
    restored = checkpoint.load_pytree(path, {"opt_state": optimizer.init(params)})["opt_state"]
    assert type(restored).__name__ == "IVONState" and int(restored.count) == 1
    np.testing.assert_array_equal(_flat(restored.hessian), _flat(state.hessian))


def test_shipped_config_loads():
    from mlip.training.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "uncertainty_ivon.yaml"), ["data.train=other.xyz@0:10"])
    assert config.uncertainty.method == "ivon" and config.training.ema_decay is None
    assert config.data.train == "other.xyz@0:10"


# ---------------------------------------------------------------- end to end


def test_train_evaluate_and_calculator_end_to_end(emt_file, tmp_path):
    from mlip import MLIPCalculator
    from mlip.cli import main

    samples = 3
    config = {"run_dir": str(tmp_path / "run"), "seed": 2,
              "data": {"train": f"{emt_file}@0:8", "valid": f"{emt_file}@8:12"},
              "model": with_long_range({"backbone": {"num_channels": 4, "max_ell": 1, "correlation": 1,
                                                     "radial_mlp": [8], "r_max": 3.0, "num_interactions": 1}},
                                       ewald_mp=False),
              "training": {"max_epochs": 2, "batch_size": 4, "progress_bar": False, "plots": False,
                           "optimizer": {"learning_rate": 0.05, "clip_grad_norm": 10.0},
                           "schedule": {"name": "cosine", "warmup_fraction": 0.0}},
              "uncertainty": {"method": "ivon", "samples": samples, "mc_samples": 2, "hess_init": 0.5}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    run_dir = config["run_dir"]
    assert os.path.exists(os.path.join(run_dir, "posterior.msgpack"))
    model = json.load(open(os.path.join(run_dir, "model.json")))
    uncertainty = model["uncertainty"]
    assert (uncertainty["method"], uncertainty["members"], uncertainty["ddof"]) == ("ivon", samples, 0)
    assert uncertainty["effective_sample_size"] == 8.0  # the training structures
    assert uncertainty["hessian_min"] > 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["epochs"] == 2 and summary["posterior"]["samples"] == samples

    out = tmp_path / "test.json"
    assert main(["evaluate", run_dir, f"{emt_file}@12:", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["uncertainty_method"] == "ivon" and metrics["posterior_samples"] == samples
    for key in ("energy_nll", "forces_nll", "forces_mae", "forces_spearman"):
        assert np.isfinite(metrics[key]), key

    atoms = ase.io.read(emt_file, 12)
    atoms.calc = MLIPCalculator.from_run(run_dir)
    atoms.get_potential_energy()
    assert atoms.calc.results["energy_std"] > 0 and np.all(atoms.calc.results["forces_std"] > 0)
    assert atoms.calc.results["charges"].sum() == pytest.approx(0.0, abs=1e-5)  # LES: a neutral cell
