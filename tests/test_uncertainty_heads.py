"""Mean-variance heads and shallow ensembles: losses by hand, physics of the outputs, end to end."""

import dataclasses
import json
import os

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from conftest import TINY_BACKBONE, emt_frames, with_long_range

# ---------------------------------------------------------------- losses by hand


def test_beta_nll_values_and_stopped_gradient_weight():
    from mlip.training.loss import beta_nll

    error, variance = jnp.asarray(1.0), jnp.asarray(4.0)
    nll = 0.5 * (np.log(4.0) + 1.0 / 4.0)
    assert float(beta_nll(error, variance, 0.0)) == pytest.approx(nll, rel=1e-12)
    assert float(beta_nll(error, variance, 0.5)) == pytest.approx(2.0 * nll, rel=1e-12)  # σ^(2·0.5) = 2
    assert float(beta_nll(error, variance, 1.0)) == pytest.approx(4.0 * nll, rel=1e-12)
    # The weight σ^(2β) is a constant for the gradient: d/dσ² = 2 · ½ (1/σ² − e²/σ⁴).
    grad = jax.grad(lambda v: beta_nll(error, v, 0.5))(variance)
    assert float(grad) == pytest.approx(2.0 * 0.5 * (1 / 4.0 - 1 / 16.0), rel=1e-12)
    grad_mean = jax.grad(lambda e: beta_nll(e, variance, 1.0))(error)
    assert float(grad_mean) == pytest.approx(1.0, rel=1e-12)  # β = 1: the MSE gradient e (×½·2)


@pytest.fixture(scope="module")
def labelled_batch():
    from mlip.data.batching import build_samples, pack_samples, sizes_for
    from mlip.data.reader import LabelKeys, atoms_to_frame

    frames = [atoms_to_frame(atoms, LabelKeys(), f"emt@{i}") for i, atoms in enumerate(emt_frames(2, seed=3))]
    samples = build_samples(frames, 3.0)
    # Padding on purpose: one extra graph and extra nodes, which the loss must ignore.
    return pack_samples(samples, sizes_for(samples, 3), np.zeros(100), np.float64), frames


def test_joint_energy_force_nll_against_numpy(labelled_batch):
    from mlip.training.loss import gaussian_nll_terms

    graph, frames = labelled_batch
    n_nodes, n_graphs = graph.positions.shape[0], graph.n_node.shape[0]
    rng = np.random.default_rng(0)
    energy = rng.normal(size=n_graphs) + np.asarray(graph.targets["energy"])
    forces = rng.normal(size=(n_nodes, 3))
    energy_variance = rng.uniform(0.5, 2.0, n_graphs)
    forces_variance = np.repeat(rng.uniform(0.5, 2.0, n_nodes)[:, None], 3, axis=1)
    outputs = {"energy": jnp.asarray(energy), "forces": jnp.asarray(forces),
               "energy_variance": jnp.asarray(energy_variance), "forces_variance": jnp.asarray(forces_variance)}
    terms = gaussian_nll_terms(outputs, graph, beta=0.0)
    expected_energy, expected_forces, offset = [], [], 0
    for g, frame in enumerate(frames):
        n = len(frame.numbers)
        e = energy[g] - graph.targets["energy"][g]
        expected_energy.append(0.5 * (np.log(energy_variance[g]) + e**2 / energy_variance[g]) / n)
        f = forces[offset:offset + n] - frame.forces
        v = forces_variance[offset:offset + n]
        expected_forces.append(0.5 * (np.log(v) + f**2 / v))
        offset += n
    assert float(terms["energy_nll"]) == pytest.approx(np.mean(expected_energy), rel=1e-10)
    assert float(terms["forces_nll"]) == pytest.approx(np.mean(np.concatenate(expected_forces)), rel=1e-10)
    # β = 0.5 multiplies every term by σ (per entry, before the mean).
    half = gaussian_nll_terms(outputs, graph, beta=0.5)
    weighted = [t * np.sqrt(energy_variance[g]) for g, t in enumerate(expected_energy)]
    assert float(half["energy_nll"]) == pytest.approx(np.mean(weighted), rel=1e-10)


def test_ensemble_nll_uses_member_mean_and_spread(labelled_batch):
    from mlip.training.loss import ENSEMBLE_VARIANCE_FLOOR, gaussian_nll_terms

    graph, frames = labelled_batch
    target = np.asarray(graph.targets["energy"])
    # Members target ± 1: mean exact, variance 1/(K−1) Σ 1 = 2 for K = 2.
    members = np.stack([target + 1.0, target - 1.0])
    terms = gaussian_nll_terms({"energy": jnp.asarray(members.mean(0)), "energy_members": jnp.asarray(members)},
                               graph, beta=0.0)
    sizes = [len(f.numbers) for f in frames]
    expected = np.mean([0.5 * np.log(2.0 + ENSEMBLE_VARIANCE_FLOOR) / n for n in sizes])
    assert float(terms["energy_nll"]) == pytest.approx(expected, rel=1e-10)
    assert "forces_nll" not in terms
    # With each member's forces (member_forces_in_training): members F ± 0.5, variance 0.5.
    forces = np.asarray(graph.targets["forces"])
    forces_members = jnp.asarray(np.stack([forces + 0.5, forces - 0.5]))
    terms = gaussian_nll_terms({"energy": jnp.asarray(members.mean(0)), "energy_members": jnp.asarray(members),
                                "forces": jnp.asarray(forces), "forces_members": forces_members}, graph, beta=0.0)
    assert float(terms["forces_nll"]) == pytest.approx(0.5 * np.log(0.5 + ENSEMBLE_VARIANCE_FLOOR), rel=1e-10)


def test_loss_switches_from_mse_to_nll_after_the_warmup():
    from types import SimpleNamespace

    from mlip.training.config import config_from_dict
    from mlip.training.trainer import Trainer

    def weights(uncertainty, progress):
        config = config_from_dict({"data": {"train": "x.xyz"}, "uncertainty": uncertainty})
        return Trainer.loss_weights(SimpleNamespace(config=config, gaussian_nll=True), progress)

    mve = {"method": "mve", "warmup_fraction": 0.4, "nll_forces_weight": 3.0}
    assert weights(mve, 0.39) == {"energy": 1.0, "forces": 100.0, "stress": 1.0, "magmoms": 1.0,
                                  "energy_nll": 0.0, "forces_nll": 0.0}
    assert weights(mve, 0.4) == {"energy": 0.0, "forces": 0.0, "stress": 1.0, "magmoms": 1.0,
                                 "energy_nll": 1.0, "forces_nll": 3.0}
    # A shallow ensemble without member forces keeps the MSE of its mean forces.
    shallow = {"method": "shallow_ensemble", "warmup_fraction": 0.4}
    assert weights(shallow, 0.5) == {"energy": 0.0, "forces": 100.0, "stress": 1.0, "magmoms": 1.0,
                                     "energy_nll": 1.0, "forces_nll": 0.0}
    with_forces = weights({**shallow, "member_forces_in_training": True}, 0.5)
    assert (with_forces["forces"], with_forces["forces_nll"]) == (0.0, 1.0)


# ---------------------------------------------------------------- heads


def _potential(head, scale=1.7):
    from mlip.data.statistics import DatasetStatistics
    from mlip.potential import Potential
    from mlip.training.config import MACEConfig, ModelConfig

    stats = DatasetStatistics(atomic_numbers=(29, 79), e0={29: 0.0, 79: 0.0}, shift=0.1, scale=scale,
                              avg_num_neighbors=8.0)
    # One interaction layer: these tests are about the heads, and compile time dominates.
    backbone = MACEConfig(**{**TINY_BACKBONE, "num_interactions": 1})
    return Potential(ModelConfig(backbone=backbone, head=head, dtype="float64"), stats)


@pytest.fixture(scope="module")
def mve_model(labelled_batch):
    potential = _potential({"name": "mve", "variance_floor": 1e-6})
    graph = labelled_batch[0]
    params = potential.init(jax.random.PRNGKey(1), graph)
    # Give the variance MLP a non-zero last layer, so variances differ between atoms.
    head = dict(params["head"])
    head["variance_out"] = {"kernel": 0.5 * jax.random.normal(jax.random.PRNGKey(2), head["variance_out"]["kernel"].shape)}
    params = {**params, "head": head}
    # Everything jitted once for the module: e3nn-jax is slow op by op.
    jitted = {"apply": jax.jit(lambda p, g: potential.apply(p, g, True, False)),
              "nodes": jax.jit(lambda p, g: potential.node_outputs(p, g, g.positions, g.cell))}
    return potential, params, graph, jitted


def test_mve_variances_are_positive_extensive_and_do_not_enter_forces(mve_model):
    potential, params, graph, jitted = mve_model
    outputs = jitted["apply"](params, graph)
    real = np.asarray(graph.node_mask)
    forces_variance = np.asarray(outputs["forces_variance"])
    assert forces_variance.shape == (graph.positions.shape[0], 3)
    assert np.all(forces_variance[real] >= 1e-6) and np.ptp(forces_variance[real, 0]) > 0
    np.testing.assert_array_equal(forces_variance[real, 0], forces_variance[real, 2])  # one σ per atom
    nodes = jitted["nodes"](params, graph)
    per_graph = jax.ops.segment_sum(nodes["energy_variance"], graph.node_graph, graph.n_node.shape[0])
    np.testing.assert_allclose(outputs["energy_variance"], per_graph, rtol=1e-12)
    assert np.all(np.asarray(outputs["energy_variance"])[np.asarray(graph.graph_mask)] > 0)

    # Forces are −∂E/∂r of the energy alone: the derivative of the energy output, and a
    # central finite difference of it.
    @jax.jit
    def total_energy(positions):
        return potential.apply(params, dataclasses.replace(graph, positions=positions), False)["energy"].sum()

    np.testing.assert_allclose(outputs["forces"], -jax.jit(jax.grad(total_energy))(graph.positions), rtol=1e-10, atol=1e-12)
    step, atom = 1e-5, 1
    shift = np.zeros(graph.positions.shape)
    shift[atom, 0] = step
    difference = (total_energy(graph.positions + shift) - total_energy(graph.positions - shift)) / (2 * step)
    assert float(outputs["forces"][atom, 0]) == pytest.approx(-float(difference), rel=1e-6, abs=1e-9)


def test_mve_posterior_of_one_sample_is_purely_aleatoric(mve_model):
    from mlip.uq import PosteriorPotential, Recalibration, stack_samples

    potential, params, graph, jitted = mve_model
    posterior = PosteriorPotential(potential, "mve", recalibration=Recalibration(forces=2.0))
    single = jitted["apply"](params, graph)
    outputs = jax.jit(lambda p, g: posterior.apply(p, g, True, False))(stack_samples([params]), graph)
    # vmap over the sample axis changes XLA's summation order (float64: ~1e-12 relative)
    np.testing.assert_allclose(outputs["forces"], single["forces"], rtol=1e-10)
    np.testing.assert_allclose(outputs["energy_std"], np.sqrt(single["energy_variance"]), rtol=1e-10)
    np.testing.assert_allclose(outputs["forces_std"], 2.0 * np.sqrt(single["forces_variance"]), rtol=1e-10)
    np.testing.assert_allclose(outputs["forces_std_epistemic"], 0.0)


def test_reset_variance_offset_sets_the_starting_variance(mve_model):
    from mlip.heads.uncertainty import reset_variance_offset
    from mlip.uq import stack_samples

    potential, params, graph, jitted = mve_model
    zeroed = {**params, "head": {**params["head"], "variance_out": {
        "kernel": jnp.zeros_like(params["head"]["variance_out"]["kernel"])}}}
    reset = reset_variance_offset(stack_samples([zeroed]), 0.02, 0.3)  # stacked, as the trainer holds them
    nodes = jitted["nodes"](jax.tree.map(lambda x: x[0], reset), graph)
    real = np.asarray(graph.node_mask)
    scale2 = potential.statistics.scale**2
    np.testing.assert_allclose(np.asarray(nodes["energy_variance"])[real], scale2 * 0.02 + 1e-6, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(nodes["forces_variance"])[real], scale2 * 0.3 + 1e-6, rtol=1e-10)


@pytest.fixture(scope="module")
def shallow_model(labelled_batch):
    potential = _potential({"name": "shallow_ensemble", "members": 3})
    graph = labelled_batch[0]
    params = potential.init(jax.random.PRNGKey(3), graph)
    apply = jax.jit(lambda p, g: potential.apply(p, g, True, True))
    return potential, params, graph, apply


def test_shallow_ensemble_members_match_their_mean(shallow_model):
    from mlip.uq import PosteriorPotential, stack_samples

    potential, params, graph, apply = shallow_model
    outputs = apply(params, graph)
    assert outputs["energy_members"].shape == (3, graph.n_node.shape[0])
    assert outputs["forces_members"].shape == (3,) + graph.positions.shape
    # Mean of each member's forces (K backward passes) = forces of the mean energy (one pass).
    mean_only = jax.jit(lambda p, g: potential.apply(p, g, True, True, member_derivatives=False))(params, graph)
    assert "forces_members" not in mean_only
    np.testing.assert_allclose(outputs["forces"], mean_only["forces"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(outputs["stress"], mean_only["stress"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(outputs["energy"], outputs["energy_members"].mean(0), rtol=1e-12)
    posterior = jax.jit(lambda p, g: PosteriorPotential(potential, "shallow_ensemble").apply(p, g, True, True))
    predicted = posterior(stack_samples([params]), graph)
    for name in ("energy", "forces", "stress"):
        members = np.asarray(outputs[f"{name}_members"])
        np.testing.assert_allclose(predicted[f"{name}_std"], members.std(0, ddof=1), rtol=1e-8, atol=1e-12)
    assert np.all(np.asarray(predicted["forces_std"])[np.asarray(graph.node_mask)] > 0)
    # apply_mean (what MD calls): the same means from one backward pass per sample.
    mean_apply = jax.jit(lambda p, g: PosteriorPotential(potential, "shallow_ensemble").apply_mean(p, g, True, True))
    means = mean_apply(stack_samples([params, params]), graph)
    assert set(means) == {"energy", "node_energy", "forces", "stress"}
    for name in ("energy", "forces", "stress"):
        np.testing.assert_allclose(means[name], predicted[name], rtol=1e-10, atol=1e-12)


def test_uncertainty_bias_of_a_shallow_ensemble_is_the_derivative_of_its_biased_energy(shallow_model):
    # Its samples are readout members, whose forces take K backward passes (not parameter samples).
    from mlip.uq import PosteriorPotential, UncertaintyBiasedPotential, stack_samples
    from mlip.uq.bias import fit_member_offsets

    potential, params, graph, apply = shallow_model
    posterior, stack = PosteriorPotential(potential, "shallow_ensemble"), stack_samples([params])
    offsets = fit_member_offsets(posterior, stack, emt_frames(4, seed=8))
    assert offsets.shape == (3, 119)  # one row per readout member
    biased = UncertaintyBiasedPotential(posterior, strength=1.5, member_offsets=offsets)
    outputs = jax.jit(lambda p, g: biased.apply_mean(p, g, True, False))(stack, graph)
    energy_of = jax.jit(lambda p, g: biased.apply_mean(p, g, False, False)["energy"])
    real = np.asarray(graph.graph_mask)
    members = np.asarray(apply(params, graph)["energy_members"])[:, real]
    species, node_graph = np.asarray(graph.species), np.asarray(graph.node_graph)
    shifted = members - np.stack([[offsets[k, species[node_graph == g]].sum()
                                   for g in np.flatnonzero(real)] for k in range(3)])
    np.testing.assert_allclose(np.asarray(outputs["energy"])[real],
                               members.mean(axis=0) - 1.5 * shifted.std(axis=0, ddof=1), rtol=1e-8)
    positions, h = np.asarray(graph.positions), 1e-4
    for atom, axis in [(0, 0), (3, 2)]:
        step = np.zeros_like(positions)
        step[atom, axis] = h
        energies = [float(np.sum(np.asarray(energy_of(stack, graph.replace(positions=positions + sign * step)))[real]))
                    for sign in (1, -1)]
        assert float(outputs["forces"][atom, axis]) == pytest.approx(-(energies[0] - energies[1]) / (2 * h),
                                                                     rel=1e-6, abs=1e-9)


def test_shallow_ensemble_with_identical_heads_has_zero_spread_and_keeps_it(shallow_model):
    from mlip.training.loss import gaussian_nll_terms, loss_terms
    from mlip.training.config import LossConfig

    potential, params, graph, apply = shallow_model
    same = {**params, "head": jax.tree.map(lambda leaf: jnp.repeat(leaf[:1], leaf.shape[0], axis=0), params["head"])}
    outputs = apply(same, graph)
    for name in ("energy", "forces", "stress"):
        members = np.asarray(outputs[f"{name}_members"])
        assert np.abs(members - members[0]).max() <= 1e-12 * max(np.abs(members).max(), 1.0), name

    def loss(p):
        out = potential.apply(p, graph, True, False, member_derivatives=False)
        terms = {**loss_terms(out, graph, LossConfig()), **gaussian_nll_terms(out, graph, 0.5)}
        return terms["energy_nll"] + terms["forces"]

    # Identical heads get identical gradients from the ensemble NLL: training keeps them equal.
    grads = jax.jit(jax.grad(loss))(same)["head"]
    for leaf in jax.tree.leaves(grads):
        np.testing.assert_allclose(leaf, jnp.repeat(leaf[:1], leaf.shape[0], axis=0), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- config


def test_method_picks_its_head_and_mismatches_are_errors():
    from mlip.errors import ConfigError
    from mlip.training.config import config_from_dict, load_config

    base = {"data": {"train": "x.xyz"}}
    assert config_from_dict({**base, "uncertainty": "mve"}).model.head.name == "mve"
    shallow = config_from_dict({**base, "model": {"head": {"members": 4}}, "uncertainty": {"method": "shallow_ensemble"}})
    assert (shallow.model.head.name, shallow.model.head.members, shallow.uncertainty.beta) == ("shallow_ensemble", 4, 0.5)
    with pytest.raises(ConfigError, match="uncertainty.method 'mve' needs model.head.name 'mve', got 'energy'"):
        config_from_dict({**base, "model": {"head": {"name": "energy"}}, "uncertainty": "mve"}, "c.yaml")
    with pytest.raises(ConfigError, match="model.head.name 'mve' needs uncertainty.method 'mve', got 'none'"):
        config_from_dict({**base, "model": {"head": {"name": "mve"}}}, "c.yaml")
    with pytest.raises(ConfigError, match="uncertainty.mve.beta"):
        config_from_dict({**base, "uncertainty": {"method": "mve", "beta": 2.0}}, "c.yaml")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for method in ("mve", "shallow_ensemble"):
        config = load_config(os.path.join(root, "configs", f"uncertainty_{method}.yaml"), ["data.train=other.xyz@0:10"])
        assert config.uncertainty.method == config.model.head.name == method
        assert config.data.train == "other.xyz@0:10"


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["mve", "shallow_ensemble"])
def test_train_evaluate_and_calculator_end_to_end(method, emt_file, tmp_path):
    from mlip import MLIPCalculator
    from mlip.cli import main

    config = {"run_dir": str(tmp_path / "run"), "seed": 2,
              "data": {"train": f"{emt_file}@0:8", "valid": f"{emt_file}@8:12"},
              "model": {"backbone": {"num_channels": 4, "max_ell": 2, "correlation": 2, "radial_mlp": [8],
                                     "r_max": 3.0, "num_interactions": 1}},
              "training": {"max_epochs": 2, "batch_size": 4, "progress_bar": False, "plots": False,
                           "schedule": {"name": "cosine", "warmup_fraction": 0.0}},
              # Epoch 1 MSE, epoch 2 NLL: the switch (and the MVE variance reset) runs.
              "uncertainty": {"method": method, "warmup_fraction": 0.5}}
    if method == "shallow_ensemble":
        config["model"]["head"] = {"members": 2}
    else:  # MVE also through both long-range terms (scope 6 of the long-range issue)
        config["model"] = with_long_range(config["model"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    run_dir = config["run_dir"]
    model = json.load(open(os.path.join(run_dir, "model.json")))
    assert model["uncertainty"] == {"method": method, "members": 1, "ddof": 1}
    calibration_file = json.load(open(os.path.join(run_dir, "calibration.json")))
    assert all(s > 0 for s in calibration_file["scale"].values())
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["epochs"] == 2 and "forces_nll" in summary["valid"]

    out = tmp_path / "test.json"
    assert main(["evaluate", run_dir, f"{emt_file}@12:", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    for key in ("energy_nll", "forces_nll", "forces_miscalibration_area", "forces_spearman", "energy_spearman",
                "forces_coverage_95", "stress_nll", "forces_mae"):
        assert key in metrics, key
    assert metrics["uncertainty_method"] == method
    assert metrics["posterior_samples"] == (1 if method == "mve" else 2)
    assert os.path.exists(tmp_path / "test_uncertainty.csv")

    atoms = ase.io.read(emt_file, 12)
    atoms.calc = MLIPCalculator.from_run(run_dir)
    atoms.get_potential_energy()
    assert atoms.calc.results["energy_std"] > 0 and atoms.calc.results["forces_std"].shape == (len(atoms), 3)
    assert np.all(atoms.calc.results["forces_std"] > 0)
    if method == "mve":
        assert atoms.calc.results["charges"].sum() == pytest.approx(0.0, abs=1e-5)  # LES: a neutral cell
