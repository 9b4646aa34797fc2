"""The one prediction path of every uncertainty method: a posterior is a stack of parameter samples.

A posterior is a parameter pytree whose every leaf has a leading axis of M samples
(deep-ensemble members; one sample for a mean-variance model; SWAG, Laplace or MCMC
draws later). A shallow ensemble keeps its K readouts stacked inside the head and
evaluates them in one backbone pass; its samples are the K readouts (`flatten_members`).
Predictions are `jax.vmap` of `Potential.apply` over that axis (in groups, one group
after another, where that is faster: `map_samples`), so each sample computes its own forces
and stress as derivatives of its own energy (the ensemble variance is never
differentiated). The M predictions are reduced by the law of total variance
(METHODS.md §4.1):

    μ = (1/M) Σ_m μ_m
    σ²_epistemic = 1/(M − ddof) Σ_m (μ_m − μ)²,   σ²_aleatoric = (1/M) Σ_m σ²_m

where σ²_m is a per-sample variance that a model may return as ``<name>_variance``
(mean-variance heads); without one the aleatoric part is zero. Total σ = s·sqrt(epi +
ale) with a recalibration scale s per output (`Recalibration`, fitted on validation data).

`PosteriorPotential` wraps a `Potential` and offers the same ``apply(params, graph)``,
returning the mean under the usual keys plus ``<name>_std`` keys, so the evaluation,
the ASE calculator and MD use an ensemble exactly as they use a single model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

# Outputs that get a mean and a standard deviation; node energies, charges and magnetic moments only a mean.
UNCERTAIN_OUTPUTS = ("energy", "forces", "stress")
MEAN_ONLY_OUTPUTS = ("node_energy", "charges", "magmoms")


@dataclasses.dataclass(frozen=True)
class Recalibration:
    """Variance-scaling factors σ → s σ per output, fitted on validation data (1 = none)."""

    energy: float = 1.0
    forces: float = 1.0
    stress: float = 1.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Recalibration":
        return cls(**{name: float(data[name]) for name in UNCERTAIN_OUTPUTS if data.get(name) is not None})


def stack_samples(samples: list) -> Any:
    """One posterior pytree from a list of parameter pytrees of identical structure."""
    if not samples:
        raise ValueError("a posterior needs at least one parameter sample")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *samples)


def sample_count(posterior_params: Any) -> int:
    """M, the length of the leading axis shared by every leaf."""
    return int(jax.tree.leaves(posterior_params)[0].shape[0])


def select_sample(posterior_params: Any, index: int) -> Any:
    """The parameters of sample ``index`` (a single-model pytree)."""
    return jax.tree.map(lambda leaf: leaf[index], posterior_params)


def parallel_group(parallel: Optional[int], n_samples: int) -> int:
    """How many samples to vmap at once: ``parallel``, or by backend when None.

    None means all at once on GPU/TPU and one at a time on CPU: on 2 CPU cores a vmapped
    train step of 4 small MACE members took 5.6x a single member's time, a sequential
    `lax.map` 3.9x (measured, ethanol, 16 channels). On accelerators vmap is the default
    because one wide kernel fills the device better than M narrow ones (expected, not yet
    measured here: no GPU run so far).
    """
    if parallel is None:
        parallel = 1 if jax.default_backend() == "cpu" else n_samples
    if parallel < 1:
        raise ValueError(f"parallel samples must be >= 1, got {parallel}")
    return min(parallel, n_samples)


def map_samples(fn: Callable, stacked: Any, parallel: Optional[int] = None) -> Any:
    """``fn`` over the leading sample axis of ``stacked``; outputs stacked the same way.

    Groups of `parallel_group` samples are vmapped; groups run one after another
    (`jax.lax.map`). Either way each sample's result is that of ``fn`` on its own.
    """
    group = parallel_group(parallel, sample_count(stacked))
    if group >= sample_count(stacked):
        return jax.vmap(fn)(stacked)
    return jax.lax.map(fn, stacked, batch_size=group if group > 1 else None)


def flatten_members(sample_outputs: dict) -> dict:
    """Outputs [M, ...] with readout members ``<name>_members`` [M, K, ...] as M·K samples.

    Per-sample variances (``<name>_variance`` [M, ...]) are repeated over the K members
    of their sample. Outputs without members are returned unchanged.
    """
    if "energy_members" not in sample_outputs:
        return sample_outputs
    n_members = sample_outputs["energy_members"].shape[1]
    flat = {key: value for key, value in sample_outputs.items() if not key.endswith("_members")}
    for name in UNCERTAIN_OUTPUTS:
        if f"{name}_members" in sample_outputs:
            values = sample_outputs[f"{name}_members"]
            flat[name] = values.reshape((-1,) + values.shape[2:])
        elif name in flat:
            # No per-member values (apply called with member_derivatives=False; the
            # posterior never does): the mean repeated, with no epistemic spread.
            flat[name] = jnp.repeat(flat[name], n_members, axis=0)
        variance_key = f"{name}_variance"
        if variance_key in flat:
            flat[variance_key] = jnp.repeat(flat[variance_key], n_members, axis=0)
    for name in MEAN_ONLY_OUTPUTS:
        if name in flat:
            flat[name] = jnp.repeat(flat[name], n_members, axis=0)
    return flat


def predictive_moments(sample_outputs: dict, ddof: int = 1) -> dict:
    """Mean and variance parts over the leading sample axis of ``sample_outputs``.

    Args:
        sample_outputs: ``Potential.apply`` outputs with a leading axis of M samples,
            e.g. ``energy`` [M, G], ``forces`` [M, N, 3]; optional ``<name>_variance``
            of the same shapes holds per-sample (aleatoric) variances.
        ddof: 1 for an ensemble of independent fits (unbiased spread), 0 for draws
            from a posterior (MCMC, Laplace).

    Returns:
        per output ``<name>`` (mean), ``<name>_var_epistemic`` and ``<name>_var_aleatoric``
        with the shape of one sample's output; ``node_energy`` as a mean.
    """
    moments = {name: jnp.mean(sample_outputs[name], axis=0) for name in MEAN_ONLY_OUTPUTS if name in sample_outputs}
    for name in UNCERTAIN_OUTPUTS:
        if name not in sample_outputs:
            continue
        values = sample_outputs[name]
        n_samples = values.shape[0]
        # Moments of the differences to the first sample: identical samples then give a
        # spread of exactly 0 and a mean exactly equal to theirs, and the float32 sum
        # never carries the (possibly large) common part of the values.
        differences = values - values[0]
        mean_difference = jnp.mean(differences, axis=0)
        mean = values[0] + mean_difference
        # One sample has no spread; max() keeps M = ddof from dividing by zero.
        epistemic = jnp.sum((differences - mean_difference) ** 2, axis=0) / max(n_samples - ddof, 1)
        variance_key = f"{name}_variance"
        aleatoric = (jnp.mean(sample_outputs[variance_key], axis=0) if variance_key in sample_outputs
                     else jnp.zeros_like(mean))
        moments[name] = mean
        moments[f"{name}_var_epistemic"] = epistemic
        moments[f"{name}_var_aleatoric"] = aleatoric
    return moments


def standard_deviations(moments: dict, recalibration: Recalibration = Recalibration()) -> dict:
    """Means plus ``<name>_std`` (total), ``<name>_std_epistemic``, ``<name>_std_aleatoric``.

    The recalibration scale multiplies all three, so total² = epistemic² + aleatoric² holds
    after scaling too.
    """
    result = {key: value for key, value in moments.items() if "_var_" not in key}
    for name in UNCERTAIN_OUTPUTS:
        if name not in moments:
            continue
        scale = getattr(recalibration, name)
        epistemic, aleatoric = moments[f"{name}_var_epistemic"], moments[f"{name}_var_aleatoric"]
        result[f"{name}_std"] = scale * jnp.sqrt(epistemic + aleatoric)
        result[f"{name}_std_epistemic"] = scale * jnp.sqrt(epistemic)
        result[f"{name}_std_aleatoric"] = scale * jnp.sqrt(aleatoric)
    return result


@dataclasses.dataclass(frozen=True, eq=False)
class PosteriorPotential:
    """A `Potential` evaluated over a stack of parameter samples; same ``apply`` signature.

    Attributes:
        potential: the model every sample runs.
        method: the uncertainty method that made the samples (``deep_ensemble``, ...).
        ddof: 1 for independent fits (ensembles), 0 for posterior draws.
        recalibration: σ scales applied to every prediction.
        parallel_samples: samples evaluated at once (see `parallel_group`; None: by backend).
    """

    potential: Any
    method: str
    ddof: int = 1
    recalibration: Recalibration = Recalibration()
    parallel_samples: Optional[int] = None

    # The attributes callers of a `Potential` read, forwarded so either can be passed.
    @property
    def config(self):
        return self.potential.config

    @property
    def statistics(self):
        return self.potential.statistics

    @property
    def dtype(self):
        return self.potential.dtype

    @property
    def cutoff(self) -> float:
        return self.potential.cutoff

    @property
    def k_cutoff(self):
        return self.potential.k_cutoff

    @property
    def molecules_only(self) -> bool:
        return self.potential.molecules_only

    @property
    def fidelity(self):
        return self.potential.fidelity

    def reference_energy(self, numbers, fidelity=None) -> float:
        return self.potential.reference_energy(numbers, fidelity)

    def reference_energies(self, numbers, fidelity=None):
        return self.potential.reference_energies(numbers, fidelity)

    def fidelity_index(self, name) -> int:
        return self.potential.fidelity_index(name)

    def with_fidelity(self, name) -> "PosteriorPotential":
        """Every sample predicting at fidelity ``name`` (see `Potential.with_fidelity`)."""
        return dataclasses.replace(self, potential=self.potential.with_fidelity(name))

    def prediction_count(self, posterior_params: Any) -> int:
        """Predictions the moments are taken over: parameter samples × readout members (shallow ensemble)."""
        return sample_count(posterior_params) * max(getattr(self.potential, "ensemble_members", 0), 1)

    def with_recalibration(self, recalibration: Recalibration) -> "PosteriorPotential":
        return dataclasses.replace(self, recalibration=recalibration)

    def sample_outputs(self, posterior_params: Any, graph, compute_forces: bool = True,
                       compute_stress: bool = False) -> dict:
        """``Potential.apply`` of every sample: each output with a leading axis [M, ...].

        For a shallow-ensemble head every parameter sample holds K readout members, and
        the samples are the M·K (parameter sample, member) pairs: ``<name>_members``
        [M, K, ...] becomes ``<name>`` [M·K, ...].
        """
        outputs = map_samples(lambda params: self.potential.apply(params, graph, compute_forces, compute_stress),
                              posterior_params, self.parallel_samples)
        return flatten_members(outputs)

    def sample_energies(self, posterior_params: Any, graph) -> jnp.ndarray:
        """[S, G] each sample's graph energies (compiled; shared by posteriors of one structure)."""
        return _sample_energies(self, posterior_params, graph)

    def apply_mean(self, posterior_params: Any, graph, compute_forces: bool = True,
                   compute_stress: bool = False) -> dict:
        """Only the posterior mean of energy, node energies, forces and stress (no σ).

        What MD needs: for readout members (shallow ensemble, Laplace) the mean forces are
        the derivative of the mean energy, one backward pass instead of K.
        """
        outputs = map_samples(lambda params: self.potential.apply(params, graph, compute_forces, compute_stress,
                                                                  member_derivatives=False),
                              posterior_params, self.parallel_samples)
        return {name: jnp.mean(outputs[name], axis=0)
                for name in ("energy", "node_energy", "forces", "stress", "charges", "magmoms") if name in outputs}

    def apply(self, posterior_params: Any, graph, compute_forces: bool = True,
              compute_stress: bool = False) -> dict:
        """Posterior mean under the keys of `Potential.apply` plus standard deviations.

        Returns:
            dict with ``energy`` [G], ``node_energy`` [N], ``forces`` [N, 3], ``stress``
            [G, 3, 3] (means, as requested; ``charges`` [N] for a long-range model) and for each of energy/forces/stress
            ``<name>_std``, ``<name>_std_epistemic``, ``<name>_std_aleatoric`` of the same
            shape (eV, eV/Å, eV/Å³), recalibrated.
        """
        outputs = self.sample_outputs(posterior_params, graph, compute_forces, compute_stress)
        return standard_deviations(predictive_moments(outputs, self.ddof), self.recalibration)


# Pytrees like `Potential` (see there): the recalibration scales are leaves with the model's
# statistics, so a posterior recalibrated again (each active-learning iteration) or fitted to
# other data runs the programs compiled for the last one.
jax.tree_util.register_pytree_node(
    Recalibration, lambda r: ((r.energy, r.forces, r.stress), None), lambda _, leaves: Recalibration(*leaves))
jax.tree_util.register_pytree_node(
    PosteriorPotential,
    lambda p: ((p.potential, p.recalibration), (p.method, p.ddof, p.parallel_samples)),
    lambda structure, leaves: PosteriorPotential(leaves[0], structure[0], structure[1], leaves[1], structure[2]))


@jax.jit
def _sample_energies(posterior: PosteriorPotential, posterior_params: Any, graph) -> jnp.ndarray:
    return posterior.sample_outputs(posterior_params, graph, False, False)["energy"]


def has_uncertainty(potential) -> bool:
    """Whether ``potential.apply`` returns ``<name>_std`` outputs."""
    return isinstance(potential, PosteriorPotential)
