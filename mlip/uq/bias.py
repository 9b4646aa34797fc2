"""Uncertainty-biased exploration: a posterior whose MD energy is lowered where its samples disagree.

    offsets = fit_member_offsets(posterior, params, labelled_structures)
    biased = UncertaintyBiasedPotential(posterior, strength=1.0, member_offsets=offsets)
    md = MolecularDynamics(biased, params, atoms, ensemble="langevin", temperature_K=600)

The biased energy of each structure is E_b = μ_E − τ σ_E (hyperactive learning, van der
Oord et al. 2023; METHODS.md §6.2), with μ_E and σ_E the mean and the epistemic spread of
the samples' total energies (epistemic only: no recalibration, no aleatoric part). MD on
E_b is drawn towards configurations the model does not know, so an exploration reaches
rare ones (a torsion barrier, a second conformer) sooner than unbiased MD at the same
temperature. Its trajectories are for finding structures to label, never for observables.

Each sample's energy is first taken relative to its own per-element offsets on the labelled
structures (`fit_member_offsets`): independently trained members disagree by a near-constant
shift (for a 3-member butane ensemble on 20 frames, ±0.1–0.2 eV on every structure, against a
spread of 3 meV beyond it on the training frames and 130 meV on gauche frames it never saw).
That shift has no gradient but it dominates σ_E, and in ∇σ it would weight the members by
their arbitrary offsets: the bias would tilt the energy surface in no useful direction.

The bias needs no derivative of σ by automatic differentiation: every sample already
returns its own forces F_s = −∇E_s (and stress S_s), and with d_s = E_s − μ_E

    ∇σ_E = 1 / (σ_E (M − ddof)) · Σ_s d_s (∇E_s − ∇μ_E)

so F_b = F̄ − τ / (σ_E (M − ddof)) · Σ_s d_s (F_s − F̄), and the stress likewise. The bias
costs what the posterior's σ costs: one prediction per sample (a deep ensemble's mean
forces already take one per member; a shallow ensemble's take K backward passes instead of
one). τ is dimensionless: the bias is τ times the model's own energy uncertainty, so it
shrinks as the model learns. Keep it near the thermal energy (τ σ_E ≲ a few k_B T).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mlip.errors import MLIPError
from mlip.uq.posterior import MEAN_ONLY_OUTPUTS

# σ floor, eV: keeps ∇σ = ∇σ² / 2σ finite where the samples agree exactly (padding graphs).
_SIGMA_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class UncertaintyBiasedPotential:
    """A `PosteriorPotential` whose ``apply_mean`` (what MD calls) returns E − τσ_E and its derivatives.

    Attributes:
        posterior: the model with parameter samples (deep ensemble, shallow ensemble, SWAG,
            Laplace, SG-MCMC, IVON draws); a single sample (a mean-variance head alone) has no
            epistemic spread and is refused when the parameters are first used.
        strength: τ, the multiple of σ_E taken off the energy (dimensionless, >= 0).
        member_offsets: [S, 119] eV, each sample's energy offset per element (`fit_member_offsets`),
            taken off its energy before the spread; None: none.
    """

    posterior: Any
    strength: float
    member_offsets: Optional[np.ndarray] = None

    def __post_init__(self):
        if not self.strength >= 0:
            raise MLIPError(f"the uncertainty bias strength must be >= 0 (got {self.strength})")
        if not hasattr(self.posterior, "sample_outputs"):
            raise MLIPError("an uncertainty bias needs a model with parameter samples (an ensemble or a "
                            f"posterior), not a {type(self.posterior).__name__}")

    def __getattr__(self, name: str):
        # Everything a `Potential` user reads (cutoff, dtype, config, statistics, apply, ...) is the
        # posterior's; only the energy MD moves on differs. Dataclass fields never reach here.
        if name in ("posterior", "strength", "member_offsets"):
            raise AttributeError(name)
        return getattr(self.posterior, name)

    def apply_mean(self, posterior_params: Any, graph, compute_forces: bool = True,
                   compute_stress: bool = False) -> dict:
        """``energy`` [G] = μ − τσ per graph, ``forces`` and ``stress`` its derivatives, node energies unbiased."""
        samples = self.posterior.sample_outputs(posterior_params, graph, compute_forces, compute_stress)
        energies = samples["energy"]  # [M, G]
        # Via the first sample (as `predictive_moments`): in float32 the total energies' common part
        # would swamp their differences.
        mean = energies[0] + (energies - energies[0]).mean(axis=0)
        count = energies.shape[0]
        if count - self.posterior.ddof < 1:
            raise MLIPError(f"an uncertainty bias needs an epistemic spread: {count} prediction(s) with "
                            f"ddof {self.posterior.ddof} have none (use an ensemble or a posterior)")
        if self.member_offsets is not None:
            if self.member_offsets.shape[0] != count:
                raise MLIPError(f"member_offsets has {self.member_offsets.shape[0]} rows for {count} predictions")
            per_node = jnp.asarray(self.member_offsets, energies.dtype)[:, graph.species]  # [M, N]
            per_node = jnp.where(graph.node_mask, per_node, 0.0)
            energies = energies - jax.ops.segment_sum(per_node.T, graph.node_graph, energies.shape[1]).T
        differences = energies - energies[0]
        deviations = differences - differences.mean(axis=0)  # d_s, offsets taken off
        sigma = jnp.sqrt(jnp.sum(deviations**2, axis=0) / (count - self.posterior.ddof) + _SIGMA_FLOOR**2)
        outputs = {name: jnp.mean(samples[name], axis=0) for name in MEAN_ONLY_OUTPUTS if name in samples}
        outputs["energy"] = mean - self.strength * sigma
        # τ ∇σ = −coefficient · Σ_s d_s (F_s − F̄) per graph.
        coefficient = self.strength / (sigma * (count - self.posterior.ddof))  # [G]
        if compute_forces:
            forces = samples["forces"]  # [M, N, 3]
            mean_forces = forces.mean(axis=0)
            pull = jnp.einsum("mn,mnc->nc", deviations[:, graph.node_graph], forces - mean_forces)
            outputs["forces"] = mean_forces - coefficient[graph.node_graph, None] * pull
        if compute_stress:
            stress = samples["stress"]  # [M, G, 3, 3]
            mean_stress = stress.mean(axis=0)
            pull = jnp.einsum("mg,mgab->gab", deviations, stress - mean_stress)
            outputs["stress"] = mean_stress - coefficient[:, None, None] * pull
        return outputs


def _unflatten_biased(_, leaves) -> UncertaintyBiasedPotential:
    # Not through the constructor: under `jax.jit` the strength is a tracer its check cannot read.
    biased = object.__new__(UncertaintyBiasedPotential)
    for name, value in zip(("posterior", "strength", "member_offsets"), leaves):
        object.__setattr__(biased, name, value)
    return biased


# A pytree like `Potential`: the strength and the offsets (fitted again each active-learning
# iteration) are inputs of the compiled MD, not constants of it.
jax.tree_util.register_pytree_node(
    UncertaintyBiasedPotential, lambda b: ((b.posterior, b.strength, b.member_offsets), None), _unflatten_biased)


def offset_free_energy_spread(energies, member_offsets: np.ndarray, structures: list, ddof: int) -> np.ndarray:
    """[n] eV: σ_E of each structure, from its samples' energies [S, n] less their per-element offsets."""
    offsets = np.stack([member_offsets[:, atoms.numbers].sum(axis=1) for atoms in structures], axis=1)
    return (np.asarray(energies, np.float64) - offsets).std(axis=0, ddof=ddof)


def fit_member_offsets(posterior, posterior_params: Any, structures: list, batch_size: int = 32) -> np.ndarray:
    """[S, 119] eV: each sample's energy offset per element on ``structures`` (ase.Atoms), by least squares.

    Sample s's deviation from the mean energy, d_s = E_s − Ē, is fitted as Σ_i b_s[Z_i] over the
    structures (minimum-norm where the compositions do not fix every element: a single
    composition gives the mean deviation spread over its atoms). The rows sum to zero over
    samples, so the mean energy is unchanged; elements absent from ``structures`` get 0.
    """
    from mlip.data.batching import build_sample, pack_samples
    from mlip.data.reader import frame_from_atoms

    if not structures:
        raise MLIPError("fit_member_offsets needs at least one structure")
    if not hasattr(posterior, "sample_outputs"):
        raise MLIPError("member offsets (the energy score, an uncertainty bias) need a model with parameter "
                        f"samples (an ensemble or a posterior), not a {type(posterior).__name__}")
    dtype = np.float64 if posterior.config.dtype == "float64" else np.float32
    member_energies = posterior.sample_energies
    samples = [build_sample(frame_from_atoms(atoms), posterior.cutoff, posterior.k_cutoff, posterior.molecules_only)
               for atoms in structures]
    energies = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        graph = pack_samples(chunk, None, None, dtype)
        energies.append(np.asarray(member_energies(posterior_params, graph), np.float64)[:, :len(chunk)])
    energies = np.concatenate(energies, axis=1)  # [S, n]
    deviations = (energies - energies[:1]) - (energies - energies[:1]).mean(axis=0)
    elements = sorted({int(z) for atoms in structures for z in atoms.numbers})
    counts = np.asarray([[np.sum(atoms.numbers == z) for z in elements] for atoms in structures], np.float64)
    solution = np.linalg.lstsq(counts, deviations.T, rcond=None)[0]  # [elements, S]
    offsets = np.zeros((energies.shape[0], 119))
    offsets[:, elements] = solution.T
    return offsets
