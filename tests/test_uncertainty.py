"""Uncertainty: calibration metrics on known Gaussians, the vmapped posterior, deep ensembles end to end."""

import csv
import json
import os
import warnings

import ase.io
import jax
import numpy as np
import pytest
import yaml

from conftest import emt_frames, make_potential
from mlip.uq import calibration

# ---------------------------------------------------------------- calibration metrics


def test_nll_of_a_known_gaussian_matches_the_closed_form():
    rng = np.random.default_rng(0)
    sigma = np.full(50, 0.3)
    errors = rng.normal(0.0, 0.3, 50)
    expected = np.mean(0.5 * np.log(2 * np.pi * 0.3**2) + errors**2 / (2 * 0.3**2))
    assert calibration.gaussian_nll(errors, sigma) == pytest.approx(expected, rel=1e-12)
    # A calibrated unit Gaussian: ½ log 2π + ½ = 1.4189 in expectation.
    z = rng.normal(size=200_000)
    assert calibration.gaussian_nll(z, np.ones_like(z)) == pytest.approx(0.5 * np.log(2 * np.pi) + 0.5, abs=5e-3)


def test_calibrated_gaussian_scores_as_calibrated():
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.1, 2.0, 50_000)
    errors = sigma * rng.normal(size=sigma.size)
    assert calibration.interval_coverage(errors, sigma, 0.95) == pytest.approx(0.95, abs=0.005)
    assert calibration.interval_coverage(errors, sigma, 0.683) == pytest.approx(0.683, abs=0.01)
    assert calibration.z_for_confidence(0.95) == pytest.approx(1.959964, abs=1e-5)
    assert calibration.miscalibration_area(errors, sigma) < 0.01
    assert calibration.ence(errors, sigma, 10) < 0.03
    # σ far too large: every error inside every interval, the worst area (0.5).
    assert calibration.miscalibration_area(errors, 1e6 * sigma) == pytest.approx(0.5, abs=0.01)
    expected, observed = calibration.calibration_curve(errors, sigma, 11)
    assert expected[0] == 0.0 and observed[-1] == 1.0 and np.all(np.diff(observed) >= 0)


def test_recalibration_recovers_the_scale_and_reduces_nll():
    rng = np.random.default_rng(2)
    true_sigma = rng.uniform(0.1, 1.0, 20_000)
    errors = true_sigma * rng.normal(size=true_sigma.size)
    overconfident = 0.5 * true_sigma
    scale = calibration.fit_variance_scale(errors, overconfident)
    assert scale == pytest.approx(2.0, rel=0.02)
    before = calibration.gaussian_nll(errors, overconfident)
    after = calibration.gaussian_nll(errors, scale * overconfident)
    assert after < before - 0.1
    # Closed form is the minimiser: any other scale is worse.
    for factor in (0.97, 1.03):
        assert calibration.gaussian_nll(errors, factor * scale * overconfident) > after
    # An atom beyond every neighbour's reach: zero force and σ = 0 in every member, a real error.
    # No scale covers it, and it must not set the scale of every other prediction.
    with_isolated = (np.append(errors, 0.14), np.append(overconfident, 0.0))
    assert calibration.fit_variance_scale(*with_isolated) == pytest.approx(scale, rel=1e-6)
    np.testing.assert_allclose(calibration.fit_interval_quantiles(*with_isolated),
                               calibration.fit_interval_quantiles(errors, overconfident))
    assert calibration.fit_variance_scale([0.1, 0.2], [0.0, 0.0]) == 1.0
    fallback = calibration.fit_interval_quantiles([0.1, 0.2], [0.0, 0.0])  # Gaussian, finite for JSON
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow where the fallback's last level is the float maximum
        levels = calibration.recalibrated_levels([0.5, 5.0], [1.0, 1.0], fallback)
    np.testing.assert_allclose(levels, [0.383, 0.99], atol=2e-3)  # Gaussian: |e|/σ = 0.5, and 5 beyond z(0.99)


def test_interval_recalibration_calibrates_heavy_tailed_errors():
    """Student-t errors with σ = their scale: variance scaling cannot fix the shape, quantiles can."""
    rng = np.random.default_rng(5)
    sigma = rng.uniform(0.1, 1.0, 40_000)
    errors = sigma * rng.standard_t(df=3, size=sigma.size)
    fit, held_out = slice(0, 20_000), slice(20_000, None)
    scale = calibration.fit_variance_scale(errors[fit], sigma[fit])
    gaussian_area = calibration.miscalibration_area(errors[held_out], scale * sigma[held_out])
    quantiles = calibration.fit_interval_quantiles(errors[fit], scale * sigma[fit])
    assert gaussian_area > 0.05
    assert calibration.interval_miscalibration_area(errors[held_out], scale * sigma[held_out], quantiles) < 0.01
    assert calibration.interval_coverage_recalibrated(errors[held_out], scale * sigma[held_out],
                                                      quantiles) == pytest.approx(0.95, abs=0.01)
    # For Gaussian errors the fitted half-widths are the Gaussian ones.
    gaussian = calibration.fit_interval_quantiles(rng.normal(size=50_000), np.ones(50_000))
    assert calibration.interval_half_width(gaussian, 0.95) == pytest.approx(1.96, abs=0.03)


def test_ence_and_spearman_on_hand_made_cases():
    # Two bins: σ = 1 with errors ±1 (RMSE 1), σ = 2 with errors ±1 (RMSE 1): (0 + 0.5) / 2.
    errors = np.array([1.0, -1.0, 1.0, -1.0])
    sigma = np.array([1.0, 1.0, 2.0, 2.0])
    assert calibration.ence(errors, sigma, 2) == pytest.approx(0.25)
    assert calibration.spearman(np.array([0.1, -0.2, 0.3, -0.4]), np.array([1.0, 2.0, 3.0, 4.0])) == \
        pytest.approx(1.0)
    assert np.isnan(calibration.spearman(errors, np.ones(4)))  # constant σ ranks nothing


def test_auroc_of_separated_identical_and_tied_scores():
    rng = np.random.default_rng(3)
    assert calibration.auroc([0.1, 0.2, 0.3], [0.5, 0.6]) == 1.0
    assert calibration.auroc([0.5, 0.6], [0.1, 0.2, 0.3]) == 0.0
    assert calibration.auroc(np.ones(5), np.ones(7)) == 0.5
    same = calibration.auroc(rng.normal(size=4000), rng.normal(size=4000))
    assert same == pytest.approx(0.5, abs=0.03)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same number of entries"):
        calibration.gaussian_nll(np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        calibration.gaussian_nll(np.array([np.nan]), np.ones(1))
    with pytest.raises(ValueError, match=">= 0"):
        calibration.gaussian_nll(np.zeros(2), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="both groups"):
        calibration.auroc([], [1.0])


# ---------------------------------------------------------------- posterior prediction


def test_predictive_moments_follow_the_law_of_total_variance():
    from mlip.uq import predictive_moments

    outputs = {"energy": jax.numpy.array([[1.0], [-1.0]]),
               "energy_variance": jax.numpy.array([[0.5], [1.5]])}
    unbiased = predictive_moments(outputs, ddof=1)
    assert float(unbiased["energy"][0]) == 0.0
    assert float(unbiased["energy_var_epistemic"][0]) == pytest.approx(2.0)
    assert float(unbiased["energy_var_aleatoric"][0]) == pytest.approx(1.0)
    assert float(predictive_moments(outputs, ddof=0)["energy_var_epistemic"][0]) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def periodic_batch():
    from mlip.data.batching import build_samples, pack_samples
    from mlip.data.reader import LabelKeys, atoms_to_frame

    frames = [atoms_to_frame(atoms, LabelKeys(), f"emt@{i}") for i, atoms in enumerate(emt_frames(3, seed=5))]
    return pack_samples(build_samples(frames, 3.0))


@pytest.fixture(scope="module")
def tiny_posterior():
    """A tiny potential, its parameters, and jitted single and posterior predictions."""
    from mlip.uq import PosteriorPotential

    potential, params = make_potential((29, 79))
    # Members in groups of 2: a vmap inside each group, a lax.map across groups, and a
    # remainder group for M = 3 (the all-vmap path runs in the training test below).
    posterior = PosteriorPotential(potential, "deep_ensemble", ddof=1, parallel_samples=2)
    # Jitted once for the module: e3nn-jax is slow op by op, and each new jit compiles.
    apply_single = jax.jit(lambda p, g: potential.apply(p, g, True, True))
    apply_posterior = jax.jit(lambda p, g: posterior.apply(p, g, True, True))
    return potential, params, apply_single, apply_posterior


def test_identical_members_have_zero_spread(tiny_posterior, periodic_batch):
    from mlip.uq import stack_samples

    _, params, apply_single, apply_posterior = tiny_posterior
    outputs = apply_posterior(stack_samples([params] * 3), periodic_batch)
    single = apply_single(params, periodic_batch)
    for name in ("energy", "forces", "stress"):
        # Zero up to float64 rounding: XLA need not give identical lanes of a vmap the
        # same summation order (the stress differs in the 16th digit).
        scale = np.abs(np.asarray(single[name])).max()
        assert np.asarray(outputs[f"{name}_std"]).max() <= 1e-13 * scale, name
        np.testing.assert_allclose(outputs[name], single[name], rtol=1e-12, atol=1e-14 * scale)


def test_vmapped_prediction_equals_a_loop_over_members(tiny_posterior, periodic_batch):
    from mlip.uq import select_sample, stack_samples

    _, params, apply_single, apply_posterior = tiny_posterior
    # Members: the parameters with independent multiplicative noise on every leaf.
    rng = np.random.default_rng(7)
    noisy = [jax.tree.map(lambda leaf: np.asarray(leaf) * (1.0 + 0.3 * rng.normal(size=leaf.shape)), params)
             for _ in range(3)]
    stack = stack_samples(noisy)
    looped = [apply_single(select_sample(stack, m), periodic_batch) for m in range(3)]
    outputs = apply_posterior(stack, periodic_batch)
    for name in ("energy", "forces", "stress"):
        values = np.stack([np.asarray(o[name]) for o in looped])
        np.testing.assert_allclose(outputs[name], values.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(outputs[f"{name}_std"], values.std(0, ddof=1), rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(outputs[f"{name}_std_aleatoric"], 0.0)
    assert np.all(np.asarray(outputs["forces_std"])[np.asarray(periodic_batch.node_mask)] > 0)


def test_uncertainty_bias_is_tau_sigma_off_the_energy_with_forces_and_stress_its_derivatives(tiny_posterior):
    from mlip.data.batching import build_samples, pack_samples
    from mlip.data.reader import LabelKeys, atoms_to_frame
    from mlip.md import MolecularDynamics
    from mlip.uq import PosteriorPotential, UncertaintyBiasedPotential, stack_samples
    from mlip.uq.bias import fit_member_offsets

    def batch_of(structures):  # float64 positions: finite differences need them
        frames = [atoms_to_frame(atoms, LabelKeys(), f"bias@{i}") for i, atoms in enumerate(structures)]
        return pack_samples(build_samples(frames, 3.0), None, None, np.float64)

    periodic_batch = batch_of(emt_frames(3, seed=5))

    potential, params, _, apply_posterior = tiny_posterior
    rng = np.random.default_rng(3)
    stack = stack_samples([jax.tree.map(lambda leaf: np.asarray(leaf) * (1.0 + 0.3 * rng.normal(size=leaf.shape)),
                                        params) for _ in range(3)])
    tau = 2.0
    posterior = PosteriorPotential(potential, "deep_ensemble", ddof=1)
    # Offsets per member and element fitted on other cells: a member's constant shift is no uncertainty.
    known = emt_frames(4, seed=9)
    offsets = fit_member_offsets(posterior, stack, known)
    assert offsets.shape == (3, 119) and np.allclose(offsets.sum(axis=0), 0.0) and not offsets[:, 1].any()
    members = np.asarray(posterior.sample_energies(stack, batch_of(known)))[:, :4]
    fitted = np.stack([[offsets[m, atoms.numbers].sum() for atoms in known] for m in range(3)])
    residual = members - members.mean(axis=0) - fitted
    assert np.abs(residual).sum() < 0.5 * np.abs(members - members.mean(axis=0)).sum()  # least squares
    biased = UncertaintyBiasedPotential(posterior, strength=tau, member_offsets=offsets)
    apply_biased = jax.jit(lambda p, g: biased.apply_mean(p, g, True, True))
    energy_of = jax.jit(lambda p, g: biased.apply_mean(p, g, False, False)["energy"])
    outputs, plain = apply_biased(stack, periodic_batch), apply_posterior(stack, periodic_batch)
    real = np.asarray(periodic_batch.graph_mask)
    member_energies = np.asarray(posterior.sample_energies(stack, periodic_batch))[:, real]
    numbers = [atoms.numbers for atoms in emt_frames(3, seed=5)]
    shifted = member_energies - np.stack([[offsets[m, z].sum() for z in numbers] for m in range(3)])
    np.testing.assert_allclose(np.asarray(outputs["energy"])[real],
                               np.asarray(plain["energy"])[real] - tau * shifted.std(axis=0, ddof=1), rtol=1e-10)
    assert np.all(shifted.std(axis=0, ddof=1) > 1e-3)  # the bias is not negligible here

    def total(positions, cell, energy=energy_of):
        return float(np.sum(np.asarray(energy(stack, periodic_batch.replace(positions=positions, cell=cell)))[real]))

    positions, cell, h = np.asarray(periodic_batch.positions), np.asarray(periodic_batch.cell), 1e-4
    for atom, axis in [(0, 0), (1, 2), (5, 1)]:
        step = np.zeros_like(positions)
        step[atom, axis] = h
        derivative = (total(positions + step, cell) - total(positions - step, cell)) / (2 * h)
        assert float(outputs["forces"][atom, axis]) == pytest.approx(-derivative, rel=1e-6, abs=1e-9)
    # Stress: a symmetric strain of graph 0 alone, r -> r (I + ε), cell -> cell (I + ε).
    in_graph = (np.asarray(periodic_batch.node_graph) == 0)[:, None]
    strain = np.zeros((3, 3))
    strain[0, 1] = strain[1, 0] = 0.5 * h

    def strained(sign):
        deformation = np.eye(3) + sign * strain
        moved = np.where(in_graph, positions @ deformation, positions)
        return total(moved, np.concatenate([cell[:1] @ deformation, cell[1:]]))

    volume = abs(np.linalg.det(cell[0]))
    derivative = (strained(1) - strained(-1)) / (2 * h)
    assert float(outputs["stress"][0, 0, 1]) == pytest.approx(derivative / volume, rel=1e-5, abs=1e-9)

    # Draws from one posterior (SWAG, Laplace, SG-MCMC, IVON: ddof 0) take the same path with
    # σ over M instead of M − 1: the energy and a force component again.
    draws = UncertaintyBiasedPotential(PosteriorPotential(potential, "swag", ddof=0), strength=tau,
                                       member_offsets=offsets)
    draws_energy_of = jax.jit(lambda p, g: draws.apply_mean(p, g, False, False)["energy"])
    draws_outputs = jax.jit(lambda p, g: draws.apply_mean(p, g, True, False))(stack, periodic_batch)
    np.testing.assert_allclose(np.asarray(draws_outputs["energy"])[real],
                               np.asarray(plain["energy"])[real] - tau * shifted.std(axis=0, ddof=0), rtol=1e-10)
    step = np.zeros_like(positions)
    step[1, 2] = h
    derivative = (total(positions + step, cell, draws_energy_of)
                  - total(positions - step, cell, draws_energy_of)) / (2 * h)
    assert float(draws_outputs["forces"][1, 2]) == pytest.approx(-derivative, rel=1e-6, abs=1e-9)

    # MD moves on the biased energy: the structure it ends on carries E − τσ there.
    atoms = emt_frames(1, seed=11)[0]
    md = MolecularDynamics(biased, stack, atoms, ensemble="langevin", temperature_K=300, timestep_fs=1.0, seed=1)
    md.run(4)
    final = md.atoms
    graph = batch_of([final])
    expected = float(energy_of(stack, graph)[0]) + potential.reference_energy(final.numbers)
    assert final.get_potential_energy() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(Exception, match="epistemic spread"):
        UncertaintyBiasedPotential(posterior, 1.0).apply_mean(
            stack_samples([params]), periodic_batch)


def test_recalibration_scales_every_standard_deviation():
    from mlip.uq import Recalibration, predictive_moments, standard_deviations

    outputs = {"energy": jax.numpy.array([[1.0], [3.0]]), "forces": jax.numpy.array([[[1.0, 0, 0]], [[0, 0, 0]]]),
               "forces_variance": jax.numpy.full((2, 1, 3), 0.25)}
    moments = predictive_moments(outputs)
    plain = standard_deviations(moments)
    scaled = standard_deviations(moments, Recalibration(energy=2.0, forces=3.0))
    assert float(scaled["energy_std"][0]) == pytest.approx(2.0 * float(plain["energy_std"][0]))
    np.testing.assert_allclose(scaled["forces_std"], 3.0 * plain["forces_std"])
    total = np.sqrt(np.asarray(scaled["forces_std_epistemic"]) ** 2 + np.asarray(scaled["forces_std_aleatoric"]) ** 2)
    np.testing.assert_allclose(scaled["forces_std"], total)
    assert Recalibration.from_json(Recalibration(forces=1.5).to_json()) == Recalibration(forces=1.5)


# ---------------------------------------------------------------- config


def test_uncertainty_config_errors_name_the_key():
    from mlip.errors import ConfigError
    from mlip.training.config import config_from_dict

    base = {"data": {"train": "x.xyz"}}
    assert config_from_dict(base).uncertainty.method == "none"
    ensemble = config_from_dict({**base, "uncertainty": {"method": "deep_ensemble"}}).uncertainty
    assert (ensemble.members, ensemble.recalibrate) == (4, True)
    assert config_from_dict({**base, "uncertainty": "deep_ensemble"}).uncertainty == ensemble
    with pytest.raises(ConfigError, match="uncertainty: missing the key 'method'"):
        config_from_dict({**base, "uncertainty": {"members": 3}}, "c.yaml")
    with pytest.raises(ConfigError, match="uncertainty.deep_ensemble.members: Input should be greater"):
        config_from_dict({**base, "uncertainty": {"method": "deep_ensemble", "members": 1}}, "c.yaml")
    with pytest.raises(ConfigError, match="does not match any of the expected tags"):
        config_from_dict({**base, "uncertainty": {"method": "bogus"}}, "c.yaml")


def test_shipped_deep_ensemble_config_is_valid():
    from mlip.training.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "uncertainty_deep_ensemble.yaml"),
                         ["data.train=elsewhere.xyz@0:10"])
    assert config.uncertainty.method == "deep_ensemble" and config.data.train == "elsewhere.xyz@0:10"


# ---------------------------------------------------------------- deep ensemble end to end


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, emt_file):
    from mlip.cli import main

    tmp_path = tmp_path_factory.mktemp("ensemble")
    config = {"run_dir": str(tmp_path / "run"), "seed": 1,
              "data": {"train": f"{emt_file}@0:8", "valid": f"{emt_file}@8:12", "test": f"{emt_file}@12:"},
              "model": {"backbone": {"num_channels": 4, "max_ell": 2, "correlation": 2, "radial_mlp": [8],
                                     "r_max": 3.0, "num_interactions": 1}},
              "training": {"max_epochs": 2, "batch_size": 4, "progress_bar": False, "plots": False,
                           "schedule": {"name": "cosine", "warmup_fraction": 0.0}},
              # All members vmapped at once in training; evaluation and the calculator
              # load the run with the default (one at a time on CPU).
              "uncertainty": {"method": "deep_ensemble", "members": 3, "parallel_members": 3}}
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    return config["run_dir"]


def test_deep_ensemble_run_stores_members_and_recalibration(ensemble_run):
    from mlip.training.checkpoint import load_potential
    from mlip.uq import PosteriorPotential, sample_count

    model = json.load(open(os.path.join(ensemble_run, "model.json")))
    assert model["uncertainty"] == {"method": "deep_ensemble", "members": 3, "ddof": 1}
    calibration_file = json.load(open(os.path.join(ensemble_run, "calibration.json")))
    assert set(calibration_file["scale"]) == {"energy", "forces", "stress"}
    assert len(calibration_file["interval_quantiles"]["forces"]) == 101
    assert all(s > 0 for s in calibration_file["scale"].values())
    summary = json.load(open(os.path.join(ensemble_run, "summary.json")))
    for split in ("valid", "test"):
        for key in ("energy_nll", "forces_nll", "forces_miscalibration_area", "forces_spearman"):
            assert key in summary[split], (split, key)
    # Recalibration on the validation set lowers its NLL, for every output.
    for name, nll_before in calibration_file["valid_nll_before"].items():
        assert summary["valid"][name] <= nll_before, name
    potential, params = load_potential(ensemble_run)
    assert isinstance(potential, PosteriorPotential) and sample_count(params) == 3
    assert potential.recalibration.forces == pytest.approx(calibration_file["scale"]["forces"])
    members = jax.tree.leaves(params)[0]
    assert not np.allclose(members[0], members[1])  # different initialisations


def test_evaluate_reports_uncertainty_with_csv_and_plot(ensemble_run, emt_file, tmp_path, capsys):
    from mlip.cli import main

    out = tmp_path / "test.json"
    plot = tmp_path / "parity.png"
    assert main(["evaluate", ensemble_run, f"{emt_file}@12:", "--json", str(out), "--plot", str(plot)]) == 0
    metrics = json.loads(out.read_text())
    for key in ("energy_nll", "forces_nll", "forces_miscalibration_area", "forces_spearman",
                "energy_spearman", "forces_ence", "forces_coverage_95", "stress_nll", "forces_mae",
                "forces_interval_miscalibration_area", "forces_interval_coverage_95"):
        assert key in metrics, key
    assert metrics["uncertainty_method"] == "deep_ensemble" and metrics["posterior_samples"] == 3
    summary = json.load(open(os.path.join(ensemble_run, "summary.json")))
    # float32 model; the summary came from all members vmapped, this from one at a time.
    assert metrics["forces_nll"] == pytest.approx(summary["test"]["forces_nll"], rel=1e-4)
    rows = list(csv.DictReader(open(tmp_path / "test_uncertainty.csv")))
    assert len(rows) == metrics["n_frames"] == 4
    assert all(float(row["forces_std_mean"]) > 0 and float(row["energy_std"]) > 0 for row in rows)
    assert os.path.exists(tmp_path / "parity_calibration.png")
    assert "forces σ" in capsys.readouterr().out


def test_calculator_returns_standard_deviations(ensemble_run, emt_file):
    from mlip import MLIPCalculator
    from mlip.training.checkpoint import load_potential
    from mlip.training.evaluation import Predictor

    calc = MLIPCalculator.from_run(ensemble_run)
    atoms = ase.io.read(emt_file, 12)
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    atoms.get_stress()
    assert calc.results["forces_std"].shape == (len(atoms), 3)
    assert calc.results["stress_std"].shape == (6,)
    assert calc.results["energy_std"] > 0 and np.all(calc.results["forces_std"] > 0)
    assert calc.get_property("energy_std", atoms) == calc.results["energy_std"]
    # Same numbers as the batched evaluation path (the ensemble mean and its σ).
    potential, params = load_potential(ensemble_run)
    from mlip.data.batching import build_samples
    from mlip.data.reader import LabelKeys, atoms_to_frame

    sample = build_samples([atoms_to_frame(atoms, LabelKeys(), "x")], potential.cutoff)
    prediction = Predictor(potential).predict(params, sample)[0]
    assert energy == pytest.approx(prediction["energy"], abs=1e-4)
    np.testing.assert_allclose(calc.results["forces_std"], prediction["forces_std"], rtol=1e-4, atol=1e-7)


def test_ensemble_run_resumes_with_stacked_optimizer_state(ensemble_run):
    import shutil

    from mlip.cli import main

    copy = ensemble_run + "_resumed"
    shutil.copytree(ensemble_run, copy)
    assert main(["train", "--resume", copy, "--set", "training.max_epochs=3"]) == 0
    summary = json.load(open(os.path.join(copy, "summary.json")))
    assert summary["epochs"] == 3 and "forces_nll" in summary["valid"]
