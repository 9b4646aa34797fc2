"""Weighted energy / force / stress loss, masked so padding never counts.

    L = w_E · mean_g ((E_g − Ê_g)/N_g)² + w_F · mean_{i,α} (F_iα − F̂_iα)² + w_σ · mean_g,ab (σ − σ̂)²
        [+ w_m · mean_i (m_i − m̂_i)² for a model with a magnetic-moment head]

Energy errors are taken per atom so large cells do not dominate (MACE's "weighted"
loss). With ``kind: huber`` each squared error is replaced by a Huber loss.

Models that predict a Gaussian (mean-variance heads, shallow ensembles) add β-NLL
terms (`gaussian_nll_terms`, METHODS.md §4.3 and §4.4): ``energy_nll`` per atom,
``forces_nll`` per force component, weighted like the MSE terms; the trainer switches
weight from the MSE terms to them after a warm-up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mlip.graph import AtomsGraph
from mlip.training.config import LossConfig


def _penalty(error: jnp.ndarray, config: LossConfig) -> jnp.ndarray:
    if config.kind == "huber":
        return optax.losses.huber_loss(error, delta=config.huber_delta) * 2.0  # 2×: equals error² for small errors
    return error**2


def _masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def fidelity_factors(graph: AtomsGraph, fidelity_weights, dtype) -> tuple:
    """[G] and [N] loss factors of each graph's and atom's fidelity (ones without weights)."""
    if fidelity_weights is None:
        return 1.0, 1.0
    per_graph = jnp.asarray(fidelity_weights, dtype)[graph.fidelity]
    return per_graph, per_graph[graph.node_graph]


def loss_terms(outputs: dict, graph: AtomsGraph, config: LossConfig, fidelity_weights=None) -> dict:
    """Per-term losses (unweighted) for one batch.

    ``fidelity_weights`` [F] (multi-fidelity, ``loss.fidelity_weights``) scales every
    frame's contributions by its fidelity's factor; the means stay over all labels, so a
    factor of 0.5 halves that fidelity's share whatever the batch's mix.
    """
    targets = graph.targets
    n_atoms = jnp.maximum(graph.n_node, 1).astype(outputs["energy"].dtype)
    graph_mask = graph.graph_mask.astype(outputs["energy"].dtype)
    graph_factor, node_factor = fidelity_factors(graph, fidelity_weights, outputs["energy"].dtype)
    energy_error = (outputs["energy"] - targets["energy"]) / n_atoms
    terms = {"energy": _masked_mean(graph_factor * _penalty(energy_error, config), targets["energy_mask"] * graph_mask)}
    if "forces" in outputs:
        force_mask = targets["forces_mask"] * graph.node_mask
        per_atom = jnp.mean(_penalty(outputs["forces"] - targets["forces"], config), axis=-1)
        terms["forces"] = _masked_mean(node_factor * per_atom, force_mask)
    if "stress" in outputs:
        per_graph = jnp.mean(_penalty(outputs["stress"] - targets["stress"], config), axis=(-1, -2))
        terms["stress"] = _masked_mean(graph_factor * per_graph, targets["stress_mask"] * graph_mask)
    if "magmoms" in outputs and "magmoms" in targets:
        mask = targets["magmoms_mask"] * graph.node_mask
        terms["magmoms"] = _masked_mean(node_factor * _penalty(outputs["magmoms"] - targets["magmoms"], config), mask)
    return terms


def total_loss(terms: dict, weights: dict) -> jnp.ndarray:
    """Σ weight × term; ``weights`` may hold traced values (they change during a run)."""
    return sum(weights[name] * value for name, value in terms.items())


# Added to a shallow ensemble's spread in the NLL (eV², (eV/Å)²): members that agree
# exactly (e.g. at initialisation) would otherwise give an infinite NLL.
ENSEMBLE_VARIANCE_FLOOR = 1e-6


def beta_nll(error: jnp.ndarray, variance: jnp.ndarray, beta: float) -> jnp.ndarray:
    """Elementwise β-NLL: stop_gradient(σ²)^β · ½ [log σ² + e²/σ²] (Seitzer et al. 2022).

    β = 0 is the Gaussian NLL (constants dropped); β = 1 gives the mean the gradient of
    the MSE. The weight is stop-gradiented so it rescales samples without rewarding a
    large σ.
    """
    nll = 0.5 * (jnp.log(variance) + error**2 / variance)
    if beta == 0.0:
        return nll
    return jax.lax.stop_gradient(variance**beta) * nll


def predicted_gaussians(outputs: dict) -> dict:
    """name -> (mean, variance) of the Gaussians a model predicts, for energy and forces.

    From ``<name>_variance`` outputs (mean-variance head) or from the spread (1/(K − 1))
    of ``<name>_members`` outputs (shallow ensemble) plus `ENSEMBLE_VARIANCE_FLOOR`.
    """
    gaussians = {}
    for name in ("energy", "forces"):
        if f"{name}_variance" in outputs:
            gaussians[name] = (outputs[name], outputs[f"{name}_variance"])
        elif f"{name}_members" in outputs:
            members = outputs[f"{name}_members"]
            gaussians[name] = (jnp.mean(members, axis=0),
                               jnp.var(members, axis=0, ddof=1) + ENSEMBLE_VARIANCE_FLOOR)
    return gaussians


def gaussian_nll_terms(outputs: dict, graph: AtomsGraph, beta: float, fidelity_weights=None) -> dict:
    """``energy_nll`` (per structure, divided by its atom count) and ``forces_nll`` (per component).

    Only the outputs with a predicted variance get a term. Padding is masked; its
    variance is replaced by 1 before the logarithm so no NaN reaches the gradient.
    ``fidelity_weights`` as in `loss_terms`.
    """
    targets = graph.targets
    terms = {}
    gaussians = predicted_gaussians(outputs)
    graph_factor, node_factor = fidelity_factors(graph, fidelity_weights, outputs["energy"].dtype)
    if "energy" in gaussians:
        mean, variance = gaussians["energy"]
        mask = targets["energy_mask"] * graph.graph_mask.astype(mean.dtype)
        variance = jnp.where(mask > 0, variance, 1.0)
        n_atoms = jnp.maximum(graph.n_node, 1).astype(mean.dtype)
        per_graph = beta_nll(mean - targets["energy"], variance, beta) / n_atoms
        terms["energy_nll"] = _masked_mean(graph_factor * per_graph, mask)
    if "forces" in gaussians:
        mean, variance = gaussians["forces"]
        mask = targets["forces_mask"] * graph.node_mask
        variance = jnp.where(mask[:, None] > 0, variance, 1.0)
        per_atom = jnp.mean(beta_nll(mean - targets["forces"], variance, beta), axis=-1)
        terms["forces_nll"] = _masked_mean(node_factor * per_atom, mask)
    return terms
