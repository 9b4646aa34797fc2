"""Uncertainty quantification: posterior stacks of parameters, ensembles, calibration.

A posterior is a parameter pytree with a leading sample axis; `PosteriorPotential`
predicts its mean and standard deviations by one `jax.vmap` of `Potential.apply`.
`mlip.uq.calibration` scores predicted σ against errors and fits recalibration scales;
`UncertaintyBiasedPotential` lowers a posterior's MD energy where it is unsure (exploration).
"""

from mlip.uq.bias import UncertaintyBiasedPotential
from mlip.uq.posterior import (PosteriorPotential, Recalibration, has_uncertainty, predictive_moments,
                               sample_count, select_sample, stack_samples, standard_deviations)

__all__ = [
    "PosteriorPotential",
    "Recalibration",
    "has_uncertainty",
    "predictive_moments",
    "sample_count",
    "select_sample",
    "stack_samples",
    "standard_deviations",
    "UncertaintyBiasedPotential",
]
