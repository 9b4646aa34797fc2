"""Last-layer Laplace: the exact linear-Gaussian posterior, the evidence, and a trained run end to end."""

import json
import os

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from conftest import emt_frames, make_potential, with_long_range


def _linear_problem(seed=0, n=60, d=5, noise=0.3, prior_precision=2.0):
    """X, y and the MAP weights of ridge regression at the given noise and prior."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d))
    labels = features @ rng.normal(size=d) + noise * rng.normal(size=n)
    precision = features.T @ features / noise**2 + prior_precision * np.eye(d)
    w_map = np.linalg.solve(precision, features.T @ labels / noise**2)
    return features, labels, w_map


def _statistics(features, labels, weights):
    residual = labels - features @ weights
    zeros = np.zeros((features.shape[1],) * 2)
    return {"energy_gram": features.T @ features, "energy_sse": float(residual @ residual),
            "energy_count": float(len(labels)), "forces_gram": zeros, "forces_sse": 0.0, "forces_count": 0.0}


def test_equals_the_exact_bayesian_linear_regression_posterior():
    from mlip.uq.laplace import fit_last_layer_posterior

    features, labels, w_map = _linear_problem()
    statistics = _statistics(features, labels, w_map)
    fitted = fit_last_layer_posterior(statistics, w_map, prior_precision=2.0)
    noise2 = statistics["energy_sse"] / len(labels)  # the maximum-likelihood noise the fit uses
    exact = np.linalg.inv(features.T @ features / noise2 + 2.0 * np.eye(features.shape[1]))
    np.testing.assert_allclose(fitted.covariance, exact, rtol=1e-10, atol=1e-14)
    assert fitted.noise_energy == pytest.approx(np.sqrt(noise2))

    draws = fitted.antithetic_draws(20000, seed=3)
    np.testing.assert_allclose(draws.mean(axis=0), w_map, atol=1e-12)  # ± pairs: the mean is exact
    np.testing.assert_allclose(np.cov(draws.T, ddof=0), exact, atol=0.05 * np.abs(exact).max())


def test_evidence_at_the_map_equals_the_exact_marginal_likelihood():
    """For a linear Gaussian model at its MAP the Laplace evidence is exact (up to the data term)."""
    from mlip.uq.laplace import log_evidence

    noise, prior_precision = 0.3, 2.0
    features, labels, w_map = _linear_problem(noise=noise, prior_precision=prior_precision)
    n, d = features.shape
    eigenvalues = np.linalg.eigvalsh(features.T @ features / noise**2)
    residual = labels - features @ w_map
    laplace = (log_evidence(prior_precision, eigenvalues, float(w_map @ w_map))
               - 0.5 * residual @ residual / noise**2 - 0.5 * n * np.log(2 * np.pi * noise**2))
    covariance = noise**2 * np.eye(n) + features @ features.T / prior_precision
    _, logdet = np.linalg.slogdet(2 * np.pi * covariance)
    exact = -0.5 * logdet - 0.5 * labels @ np.linalg.solve(covariance, labels)
    assert laplace == pytest.approx(exact, rel=1e-10)


def test_evidence_picks_a_prior_near_the_generating_one():
    """Weights drawn from N(0, 1/λ): the evidence-maximising λ lands within a decade of it."""
    from mlip.uq.laplace import fit_last_layer_posterior

    rng = np.random.default_rng(1)
    d, n, noise, true_precision = 20, 400, 0.1, 25.0
    weights = rng.normal(size=d) / np.sqrt(true_precision)
    features = rng.normal(size=(n, d))
    labels = features @ weights + noise * rng.normal(size=n)
    w_fit = np.linalg.lstsq(features, labels, rcond=None)[0]
    fitted = fit_last_layer_posterior(_statistics(features, labels, w_fit), w_fit)
    assert true_precision / 10 < fitted.prior_precision < true_precision * 10


def _emt_samples(n_frames, cutoff):
    from mlip.data.batching import build_samples
    from mlip.data.reader import LabelKeys, atoms_to_frame

    frames = [atoms_to_frame(atoms, LabelKeys(), f"emt[{i}]") for i, atoms in enumerate(emt_frames(n_frames))]
    return build_samples(frames, cutoff)


def test_outputs_are_affine_in_the_last_layer_and_the_gram_matches_jacobians():
    from mlip.data.batching import pack_samples
    from mlip.uq.laplace import LastLayer, batch_statistics

    potential, params = make_potential([29, 79], num_interactions=1, max_ell=1, correlation=1)
    samples = _emt_samples(3, potential.cutoff)
    graph = pack_samples(samples, None, potential.statistics.e0_per_species(), np.float64)
    layer = LastLayer.of(params)
    assert layer.size == 4 + 16  # 4 scalar channels into the linear readout, 16 MLP hidden units
    w_star = layer.vector(params)
    step = jax.random.normal(jax.random.PRNGKey(0), w_star.shape)

    # Jitted once: e3nn-jax runs slowly op by op.
    forces = jax.jit(lambda w: potential.apply(layer.with_vector(params, w), graph)["forces"].reshape(-1))
    at_optimum = forces(w_star)
    # Columns by differences along the basis: exact if (and only if) the forces are affine in w,
    # which the random step then checks.
    jacobian = np.stack([forces(w_star + unit) - at_optimum for unit in jnp.eye(layer.size)], axis=1)
    node_mask = np.repeat(np.asarray(graph.node_mask), 3)
    np.testing.assert_allclose(forces(w_star + step) - at_optimum, jacobian @ step, atol=1e-9)
    statistics = jax.jit(lambda p, g: batch_statistics(potential, p, layer, g, basis_chunk=7))(params, graph)
    masked = jacobian[node_mask]
    np.testing.assert_allclose(statistics["forces_gram"], masked.T @ masked, rtol=1e-7, atol=1e-9)
    assert statistics["forces_count"] == 3 * sum(s.n_atoms for s in samples)


def test_readout_ensemble_mean_equals_the_trained_model():
    from mlip.data.batching import pack_samples
    from mlip.potential import Potential
    from mlip.uq.laplace import LastLayer, readout_ensemble, shallow_head_config
    from mlip.uq.posterior import PosteriorPotential, stack_samples

    potential, params = make_potential([29, 79], num_interactions=1)
    samples = _emt_samples(2, potential.cutoff)
    graph = pack_samples(samples, None, None, np.float64)
    layer = LastLayer.of(params)
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(2, layer.size))
    w_star = np.asarray(layer.vector(params))
    ensemble_params = readout_ensemble(params, layer, np.concatenate([w_star + deltas, w_star - deltas]))
    posterior = PosteriorPotential(Potential(shallow_head_config(potential.config, 4), potential.statistics),
                                   method="laplace", ddof=0)
    predicted = jax.jit(lambda p: posterior.apply(p, graph, compute_stress=True))(stack_samples([ensemble_params]))
    single = jax.jit(lambda p: potential.apply(p, graph, compute_stress=True))(params)
    for name in ("energy", "forces", "stress"):
        np.testing.assert_allclose(predicted[name], single[name], atol=1e-10)
        assert float(jnp.max(predicted[f"{name}_std"])) > 0


def test_train_evaluate_and_calculator_end_to_end(emt_file, tmp_path):
    from mlip import MLIPCalculator
    from mlip.cli import main
    from mlip.potential import Potential
    from mlip.training.checkpoint import load_pytree, parameter_template
    from mlip.training.config import ModelConfig
    from mlip.data.statistics import DatasetStatistics

    run_dir = str(tmp_path / "run")
    config = {"run_dir": run_dir, "seed": 1,
              "data": {"train": f"{emt_file}@0:8", "valid": f"{emt_file}@8:12"},
              "model": with_long_range({"backbone": {"num_channels": 4, "max_ell": 1, "correlation": 1,
                                                     "radial_mlp": [8], "r_max": 3.0, "num_interactions": 1}},
                                       ewald_mp=False),
              "training": {"max_epochs": 2, "batch_size": 4, "progress_bar": False, "plots": False},
              "uncertainty": {"method": "laplace", "samples": 6}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    model = json.load(open(os.path.join(run_dir, "model.json")))
    uncertainty = model["uncertainty"]
    assert uncertainty["method"] == "laplace" and uncertainty["members"] == 1 and uncertainty["ddof"] == 0
    assert uncertainty["readout_samples"] == 6 and uncertainty["prior_precision_from"] == "marginal_likelihood"
    assert model["model"]["head"] == {"name": "shallow_ensemble", "members": 6, "mlp_hidden": 16}
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    # Readout weights: 4 channels of the interaction, 4 of the charge/spin embedding; 16 of the MLP.
    assert summary["posterior"]["last_layer_size"] == 4 + 4 + 16 and "forces_nll" in summary["valid"]

    # The posterior mean is the trained (best) model's prediction.
    saved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    trained = Potential(ModelConfig.model_validate(saved["model"]), DatasetStatistics.from_json(model["statistics"]))
    best = load_pytree(os.path.join(run_dir, "best.msgpack"),
                       jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), parameter_template(trained)))
    atoms = ase.io.read(emt_file, 13)
    atoms.calc = MLIPCalculator(trained, best)
    reference_forces = atoms.get_forces().copy()
    atoms.calc = MLIPCalculator.from_run(run_dir)
    np.testing.assert_allclose(atoms.get_forces(), reference_forces, atol=1e-4)
    assert atoms.calc.results["energy_std"] > 0 and np.all(atoms.calc.results["forces_std"] > 0)
    assert atoms.calc.results["charges"].sum() == pytest.approx(0.0, abs=1e-5)  # LES: a neutral cell

    out = tmp_path / "test.json"
    assert main(["evaluate", run_dir, f"{emt_file}@12:", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["uncertainty_method"] == "laplace" and "forces_spearman" in metrics
