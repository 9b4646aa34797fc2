"""Last-layer Laplace approximation (METHODS.md §4.7): a Gaussian over the readout's last linear layer.

The energy head computes ε_i = w_lin·s_i + w_mlp·a_i (linear readout of the node scalars
s_i plus the last, bias-free layer of a small MLP on them), so every output is affine
in the last-layer weights w = (w_lin, w_mlp) once the rest of the network is fixed:

    E_n = E_n(w*) + J_E,n (w − w*),   F_n = F_n(w*) + J_F,n (w − w*)

with J = ∂output/∂w (taken by forward-mode differentiation through the force
computation). The Gaussian likelihood of the training labels (noise σ_E per structure
energy, σ_F per force component, their maximum-likelihood values at w*) and a prior
N(0, λ⁻¹ I) give the exact posterior precision (the generalised Gauss–Newton matrix is
exact for a linear model)

    P = J_Eᵀ J_E / σ_E² + J_Fᵀ J_F / σ_F² + λ I.

λ maximises the log marginal likelihood (evidence) of the linear model,

    log p(D | λ) = −½ λ |w*|² + (d/2) log λ − ½ Σ_k log(e_k + λ) + const,

e_k the eigenvalues of the data part of P, on a grid λ ∈ 10^[−6, 6] (or is given).

Prediction: ``samples`` antithetic draws w* ± δ, δ ~ N(0, P⁻¹), become the K readouts of
a shallow-ensemble head on the trained backbone, so the posterior is one parameter
sample and the spread costs one backbone pass plus K backward passes for forces. The
member mean equals the trained model's prediction exactly (the outputs are affine in w
and the draws come in ± pairs), and the member variance (ddof 0) is an unbiased
estimate of the linearised predictive variance J P⁻¹ Jᵀ; the aleatoric noise σ² is left
out, and the recalibration fitted on validation data scales the total.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlip.errors import ConfigError, DataError
from mlip.heads.fidelity import head_paths, tree_at, tree_with
from mlip.uq.methods import MethodHooks, Posterior, register_hooks
from mlip.uq.posterior import stack_samples

# Evidence grid: 20 points per decade over 10^[-6, 6].
PRIOR_GRID = np.logspace(-6.0, 6.0, 241)


@dataclasses.dataclass(frozen=True)
class LastLayer:
    """Where the last-layer weights sit in an energy head's parameters, and their flat order.

    Attributes:
        paths: key paths (from the top of the parameter tree) of the weight arrays.
        shapes: their shapes; the flat vector is their concatenation in this order.
    """

    paths: tuple
    shapes: tuple

    @classmethod
    def of(cls, params: Any) -> "LastLayer":
        """The linear readout and the MLP's last layer of an `EnergyHead` (``params["head"]``; of
        every fidelity's head for a multi-fidelity model, in one vector)."""
        if not isinstance(params, dict) or "head" not in params:
            raise ConfigError("uncertainty.method 'laplace' needs a model with a readout head")
        paths = []
        for head_path in head_paths(params):
            head = tree_at(params, head_path)
            if "linear" not in head or "mlp" not in head:
                raise ConfigError("uncertainty.method 'laplace' needs model.head.name 'energy' (a linear readout "
                                  f"plus an MLP); the head's parameters are {sorted(head)}")
            paths += [head_path + ("linear", name) for name in sorted(head["linear"])]
            last_dense = max(head["mlp"], key=lambda name: int(name.rsplit("_", 1)[-1]))
            paths.append(head_path + ("mlp", last_dense, "kernel"))
        shapes = tuple(tuple(tree_at(params, path).shape) for path in paths)
        return cls(tuple(paths), shapes)

    @property
    def size(self) -> int:
        return int(sum(np.prod(shape) for shape in self.shapes))

    def vector(self, params: Any) -> jnp.ndarray:
        """[d] the weights, flattened."""
        return jnp.concatenate([jnp.ravel(tree_at(params, path)) for path in self.paths])

    def with_vector(self, params: Any, vector: jnp.ndarray) -> Any:
        """``params`` with the last-layer weights replaced by ``vector`` [d]."""
        offset = 0
        for path, shape in zip(self.paths, self.shapes):
            size = int(np.prod(shape))
            params = tree_with(params, path, vector[offset:offset + size].reshape(shape))
            offset += size
        return params


def batch_statistics(potential, params: Any, layer: LastLayer, graph, basis_chunk: int = 16) -> dict:
    """Gauss–Newton blocks and squared residuals of one labelled batch (jittable).

    Returns:
        ``energy_gram`` [d, d] = Σ_n J_E,nᵀ J_E,n over labelled graphs, ``forces_gram``
        [d, d] over labelled force components, ``energy_sse`` and ``forces_sse`` (sums of
        squared residuals at w*, eV² and (eV/Å)²), and the label counts.
    """
    w_star = layer.vector(params)

    def outputs(w):
        predicted = potential.apply(layer.with_vector(params, w), graph, compute_forces=True)
        return predicted["energy"], predicted["forces"]

    energy, forces = outputs(w_star)
    # Column k of J is the directional derivative along basis vector k; chunks of them are
    # vmapped (memory grows with the chunk), chunks run one after another.
    basis = jnp.eye(layer.size, dtype=w_star.dtype)
    energy_jac, forces_jac = jax.lax.map(lambda e: jax.jvp(outputs, (w_star,), (e,))[1], basis,
                                         batch_size=basis_chunk)  # [d, G], [d, N, 3]
    targets = graph.targets
    energy_mask = (targets["energy_mask"] * graph.graph_mask).astype(w_star.dtype)
    forces_mask = (targets["forces_mask"] * graph.node_mask).astype(w_star.dtype)
    energy_jac = energy_jac * energy_mask
    forces_jac = (forces_jac * forces_mask[:, None]).reshape(layer.size, -1)
    energy_residual = (targets["energy"] - energy) * energy_mask
    forces_residual = (targets["forces"] - forces) * forces_mask[:, None]
    return {"energy_gram": energy_jac @ energy_jac.T, "forces_gram": forces_jac @ forces_jac.T,
            "energy_sse": jnp.sum(energy_residual**2), "forces_sse": jnp.sum(forces_residual**2),
            "energy_count": jnp.sum(energy_mask), "forces_count": 3.0 * jnp.sum(forces_mask)}


def accumulate_statistics(potential, params: Any, layer: LastLayer, batches) -> dict:
    """`batch_statistics` summed over ``batches`` (padded `AtomsGraph` s), in float64 on the host."""
    # Parameters are an argument, not a closure constant: host (NumPy) arrays may not be
    # indexed by traced values inside the model. So is the potential (see `Potential`).
    compiled = jax.jit(lambda potential, params, graph: batch_statistics(potential, params, layer, graph))
    totals = None
    for graph in batches:
        values = {key: np.asarray(value, np.float64)
                  for key, value in jax.device_get(compiled(potential, params, graph)).items()}
        totals = values if totals is None else {key: totals[key] + values[key] for key in totals}
    if totals is None:
        raise DataError("Laplace: no training batches to fit the posterior on")
    return totals


@dataclasses.dataclass(frozen=True)
class LastLayerPosterior:
    """N(w*, P⁻¹) with P = V diag(eigenvalues + λ) Vᵀ.

    Attributes:
        mean: [d] w*.
        eigenvalues: [d] of the data part of P (≥ 0).
        eigenvectors: [d, d] V, columns.
        prior_precision: λ.
        noise_energy, noise_forces: σ_E (eV per structure), σ_F (eV/Å); None without labels.
        log_evidence: log marginal likelihood at λ, up to a constant.
    """

    mean: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    prior_precision: float
    noise_energy: Optional[float]
    noise_forces: Optional[float]
    log_evidence: float

    @property
    def covariance(self) -> np.ndarray:
        """[d, d] P⁻¹."""
        return (self.eigenvectors / (self.eigenvalues + self.prior_precision)) @ self.eigenvectors.T

    def antithetic_draws(self, n_samples: int, seed: int) -> np.ndarray:
        """[2⌈n/2⌉, d] weights w* + δ_j and w* − δ_j, δ_j ~ N(0, P⁻¹) independent."""
        half = (n_samples + 1) // 2
        normal = np.random.default_rng(seed).standard_normal((half, self.mean.size))
        deltas = (normal / np.sqrt(self.eigenvalues + self.prior_precision)) @ self.eigenvectors.T
        return np.concatenate([self.mean + deltas, self.mean - deltas])


def log_evidence(prior_precision: np.ndarray, eigenvalues: np.ndarray, mean_norm2: float) -> np.ndarray:
    """The λ-dependent part of the linear model's log marginal likelihood (METHODS.md §4.7)."""
    prior_precision = np.asarray(prior_precision, np.float64)[..., None]
    d = eigenvalues.size
    return (-0.5 * prior_precision[..., 0] * mean_norm2 + 0.5 * d * np.log(prior_precision[..., 0])
            - 0.5 * np.sum(np.log(eigenvalues + prior_precision), axis=-1))


def fit_last_layer_posterior(statistics: dict, mean: np.ndarray,
                             prior_precision: Optional[float] = None) -> LastLayerPosterior:
    """The posterior from accumulated `batch_statistics`; λ by evidence when not given."""
    precision = np.zeros((mean.size, mean.size))
    noise = {}
    for name in ("energy", "forces"):
        if statistics[f"{name}_count"] > 0:
            variance = max(statistics[f"{name}_sse"] / statistics[f"{name}_count"], 1e-12)
            noise[name] = float(np.sqrt(variance))
            precision += statistics[f"{name}_gram"] / variance
    if not noise:
        raise DataError("Laplace: the training set has neither energy nor force labels")
    eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (precision + precision.T))
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # round-off can leave tiny negatives on a PSD matrix
    mean_norm2 = float(mean @ mean)
    if prior_precision is None:
        evidence = log_evidence(PRIOR_GRID, eigenvalues, mean_norm2)
        prior_precision = float(PRIOR_GRID[int(np.argmax(evidence))])
    return LastLayerPosterior(mean=mean, eigenvalues=eigenvalues, eigenvectors=eigenvectors,
                              prior_precision=float(prior_precision), noise_energy=noise.get("energy"),
                              noise_forces=noise.get("forces"),
                              log_evidence=float(log_evidence(prior_precision, eigenvalues, mean_norm2)))


def readout_ensemble(params: Any, layer: LastLayer, draws: np.ndarray) -> Any:
    """Parameters of a K-readout (shallow-ensemble) head: the energy head K times, last layer from ``draws`` [K, d]."""
    dtype = layer.vector(params).dtype
    members = [layer.with_vector(params, jnp.asarray(w, dtype)) for w in draws]
    for path in head_paths(params):  # one K-readout head per fidelity
        params = tree_with(params, path, {"readouts": stack_samples([tree_at(member, path) for member in members])})
    return params


def shallow_head_config(model_config, members: int):
    """``model_config`` with its energy head turned into a ``members``-readout head."""
    from mlip.model_config import ShallowEnsembleHeadConfig

    head = ShallowEnsembleHeadConfig(members=members, mlp_hidden=model_config.head.mlp_hidden)
    return model_config.model_copy(update={"head": head})


def laplace_posterior(potential, params: Any, batches: Sequence, n_samples: int, seed: int,
                      prior_precision: Optional[float] = None) -> tuple[Posterior, LastLayerPosterior]:
    """Fit the last-layer posterior on ``batches`` and turn it into a one-sample `Posterior`."""
    layer = LastLayer.of(params)
    statistics = accumulate_statistics(potential, params, layer, batches)
    fitted = fit_last_layer_posterior(statistics, np.asarray(layer.vector(params), np.float64), prior_precision)
    draws = fitted.antithetic_draws(n_samples, seed)
    posterior_params = stack_samples([readout_ensemble(params, layer, draws)])
    details = {"prior_precision": fitted.prior_precision,
               "prior_precision_from": "given" if prior_precision is not None else "marginal_likelihood",
               "log_evidence": fitted.log_evidence, "noise_energy": fitted.noise_energy,
               "noise_forces": fitted.noise_forces, "last_layer_size": layer.size,
               "readout_samples": int(draws.shape[0])}
    return Posterior(params=posterior_params, ddof=0,
                     model_config=shallow_head_config(potential.config, int(draws.shape[0])),
                     details=details), fitted


@register_hooks("laplace")
class LaplaceHooks(MethodHooks):
    """Ordinary training; after the last epoch, the last-layer posterior of the best model."""

    def posterior(self, state: dict, best_params: Any) -> Posterior:
        # Heads other than `energy` are refused by the config (mve, shallow_ensemble need
        # their own methods) and by `LastLayer.of`.
        trainer = self.trainer
        batches = (graph for graph, _ in trainer.train_batches.batches(None))
        posterior, _ = laplace_posterior(trainer.potential, best_params, batches, self.settings.samples,
                                         trainer.config.seed, self.settings.prior_precision)
        return posterior
