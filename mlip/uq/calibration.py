"""How good predicted uncertainties are: calibration metrics and recalibration, in NumPy.

Every function takes errors ``e = y − μ`` and predicted standard deviations ``σ`` of the
same shape (any shape; they are flattened) and treats each entry as one Gaussian
prediction N(μ, σ²). The metrics follow METHODS.md §4.9:

  * ``gaussian_nll``           mean of ½ log(2πσ²) + e²/(2σ²); 1.4189 for a calibrated unit Gaussian
  * ``interval_coverage``      fraction of |e| inside the central interval of a confidence level
  * ``calibration_curve`` / ``miscalibration_area``  observed vs expected coverage over levels
  * ``ence``                   binned |RMV − RMSE| / RMV (Levi et al. 2022)
  * ``spearman``               rank correlation of |e| against σ
  * ``auroc``                  how well a score (σ) separates out-of-distribution from in-distribution
  * ``fit_variance_scale``     s with σ → s σ minimising the NLL on held-out data (closed form;
                               entries with a negligible σ, atoms beyond every neighbour's reach, left out)
  * ``fit_interval_quantiles`` the held-out quantile function of |e|/σ: intervals whose
    coverage is calibrated whatever the error distribution's shape (isotonic recalibration)

References:
    Kuleshov, Fenner & Ermon 2018, "Accurate Uncertainties for Deep Learning Using
    Calibrated Regression", ICML (arXiv 1807.00263).
    Tran et al. 2020, "Methods for comparing uncertainty quantifications for material
    property predictions", Mach. Learn.: Sci. Technol. 1 025006 (doi:10.1088/2632-2153/ab7e1a).
    Levi et al. 2022, "Evaluating and Calibrating Uncertainty Prediction in Regression
    Tasks", Sensors 22 5540 (doi:10.3390/s22155540).
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

# A predicted σ of exactly 0 (e.g. identical ensemble members) would make the NLL
# infinite and the ratios undefined; metrics treat it as this tiny, finite value.
SIGMA_FLOOR = 1e-12
# Fits leave out entries whose σ is below this fraction of the median σ: an atom with no
# neighbour within the cutoff (one evaporated from a hot cluster) has exactly zero force in
# every member, hence σ = 0, while the reference method still sees a force. No scale can
# cover that error, and one such atom in mean(e²/σ²) set a fitted force scale of 8·10⁷.
NEGLIGIBLE_SIGMA = 1e-6


def _errors_and_sigma(errors, sigma) -> tuple[np.ndarray, np.ndarray]:
    errors = np.asarray(errors, np.float64).reshape(-1)
    sigma = np.asarray(sigma, np.float64).reshape(-1)
    if errors.shape != sigma.shape:
        raise ValueError(f"errors and sigma must have the same number of entries, got "
                         f"{errors.size} and {sigma.size}")
    if errors.size == 0:
        raise ValueError("no errors given: calibration metrics need at least one prediction")
    if not (np.all(np.isfinite(errors)) and np.all(np.isfinite(sigma))):
        raise ValueError("errors and sigma must be finite (found NaN or inf)")
    if np.any(sigma < 0):
        raise ValueError(f"sigma must be >= 0, found {sigma.min()}")
    return errors, np.maximum(sigma, SIGMA_FLOOR)


def gaussian_nll(errors, sigma) -> float:
    """Mean negative log-likelihood of the errors under N(0, σ²), in nats per entry."""
    errors, sigma = _errors_and_sigma(errors, sigma)
    return float(np.mean(0.5 * np.log(2.0 * np.pi * sigma**2) + 0.5 * (errors / sigma) ** 2))


def z_for_confidence(confidence) -> np.ndarray:
    """Half-width in σ of the central interval holding ``confidence`` of a Gaussian (1.96 for 0.95)."""
    confidence = np.asarray(confidence, np.float64)
    return np.sqrt(2.0) * special.erfinv(np.clip(confidence, 0.0, 1.0))


def interval_coverage(errors, sigma, confidence: float = 0.95) -> float:
    """Fraction of entries with |e| ≤ z σ, z the central-interval half-width of ``confidence``."""
    errors, sigma = _errors_and_sigma(errors, sigma)
    return float(np.mean(np.abs(errors) <= z_for_confidence(confidence) * sigma))


def calibration_curve(errors, sigma, n_levels: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Expected and observed coverage of central intervals at ``n_levels`` levels in [0, 1].

    Returns:
        (expected [L], observed [L]): for a calibrated Gaussian prediction the two agree.
    """
    errors, sigma = _errors_and_sigma(errors, sigma)
    expected = np.linspace(0.0, 1.0, n_levels)
    standardised = np.sort(np.abs(errors) / sigma)
    half_widths = z_for_confidence(expected)  # inf at level 1: everything is inside
    observed = np.searchsorted(standardised, half_widths, side="right") / standardised.size
    return expected, observed


def miscalibration_area(errors, sigma, n_levels: int = 101) -> float:
    """Area between the calibration curve and the diagonal: 0 is calibrated, 0.5 the worst."""
    expected, observed = calibration_curve(errors, sigma, n_levels)
    gap = np.abs(observed - expected)
    # Trapezoid rule written out: np.trapezoid needs NumPy 2, np.trapz is gone from it.
    return float(np.sum(0.5 * (gap[1:] + gap[:-1]) * np.diff(expected)))


def ence(errors, sigma, n_bins: int = 10) -> float:
    """Expected normalised calibration error: sort by σ, equal-count bins, mean |RMV − RMSE| / RMV."""
    errors, sigma = _errors_and_sigma(errors, sigma)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    order = np.argsort(sigma, kind="stable")
    terms = []
    for bin_indices in np.array_split(order, min(n_bins, errors.size)):
        rmv = np.sqrt(np.mean(sigma[bin_indices] ** 2))
        rmse = np.sqrt(np.mean(errors[bin_indices] ** 2))
        terms.append(abs(rmv - rmse) / rmv)
    return float(np.mean(terms))


def spearman(errors, sigma) -> float:
    """Spearman rank correlation of |e| against σ; NaN when either is constant or n < 2."""
    errors, sigma = _errors_and_sigma(errors, sigma)
    if errors.size < 2 or np.ptp(np.abs(errors)) == 0 or np.ptp(sigma) == 0:
        return float("nan")
    return float(stats.spearmanr(np.abs(errors), sigma).statistic)


def auroc(scores_in, scores_out) -> float:
    """P(score_out > score_in) with ties counted half: the Mann–Whitney U over n_in · n_out.

    Used to tell out-of-distribution structures (label 1) from in-distribution ones
    (label 0) by their predicted σ: 0.5 is chance, 1.0 perfect separation.
    """
    scores_in = np.asarray(scores_in, np.float64).reshape(-1)
    scores_out = np.asarray(scores_out, np.float64).reshape(-1)
    if scores_in.size == 0 or scores_out.size == 0:
        raise ValueError(f"auroc needs scores of both groups, got {scores_in.size} in-distribution "
                         f"and {scores_out.size} out-of-distribution")
    ranks = stats.rankdata(np.concatenate([scores_in, scores_out]))  # ties get their mean rank
    rank_sum_out = ranks[scores_in.size:].sum()
    u_out = rank_sum_out - scores_out.size * (scores_out.size + 1) / 2.0
    return float(u_out / (scores_in.size * scores_out.size))


def _fit_entries(errors, sigma) -> tuple[np.ndarray, np.ndarray]:
    """The entries a recalibration is fitted on: those whose σ is not negligible (`NEGLIGIBLE_SIGMA`)."""
    errors, sigma = _errors_and_sigma(errors, sigma)
    keep = sigma > max(NEGLIGIBLE_SIGMA * float(np.median(sigma)), SIGMA_FLOOR)
    return errors[keep], sigma[keep]


def fit_variance_scale(errors, sigma) -> float:
    """The s of σ → s σ that minimises the Gaussian NLL: s² = mean(e² / σ²).

    Fit it on validation data (separately for energy, forces and stress) and apply it
    to every later prediction; it fixes over- or under-confidence on average but not
    the ranking of σ. Entries with a negligible σ are left out (`NEGLIGIBLE_SIGMA`);
    with none left the scale is 1.
    """
    errors, sigma = _fit_entries(errors, sigma)
    return float(np.sqrt(np.mean((errors / sigma) ** 2))) if errors.size else 1.0


def fit_interval_quantiles(errors, sigma, n_levels: int = 101) -> np.ndarray:
    """[L] quantiles of |e|/σ at levels 0, 1/(L−1), …, 1 on held-out data.

    Isotonic recalibration (Kuleshov et al. 2018) for symmetric intervals: the map from a
    Gaussian central interval's nominal level to its observed coverage is monotone, and
    its calibration-set estimate is the empirical distribution of |e|/σ. Storing that
    distribution's quantile function Q gives the interval ±Q(c)·σ for confidence c, in
    place of the Gaussian ±z(c)·σ. Variance scaling fixes the width on average; this fixes
    the shape too (heavy tails), but not the ranking of σ. The last level is the largest
    |e|/σ seen, not infinity. Entries with a negligible σ are left out, as in
    `fit_variance_scale`; with none left, the Gaussian half-widths.
    """
    if n_levels < 2:
        raise ValueError(f"n_levels must be >= 2, got {n_levels}")
    errors, sigma = _fit_entries(errors, sigma)
    levels = np.linspace(0.0, 1.0, n_levels)
    if not errors.size:  # the last level's z is infinite, which calibration.json (JSON) cannot hold
        return np.minimum(z_for_confidence(levels), np.finfo(np.float64).max)
    return np.quantile(np.abs(errors) / sigma, levels)


def recalibrated_levels(errors, sigma, quantiles) -> np.ndarray:
    """Per entry, the recalibrated level of the smallest central interval holding it (uniform if calibrated)."""
    errors, sigma = _errors_and_sigma(errors, sigma)
    quantiles = np.asarray(quantiles, np.float64)
    levels = np.linspace(0.0, 1.0, quantiles.size)
    # np.interp needs increasing knots; repeated quantiles (ties) get a negligible ramp. Its
    # scale is the median quantile: the last one can be the float maximum (the fallback of
    # `fit_interval_quantiles`), and a ramp scaled by it would overflow.
    knots = quantiles + np.arange(quantiles.size) * 1e-12 * max(1.0, float(np.median(quantiles)))
    return np.interp(np.abs(errors) / sigma, knots, levels, left=0.0, right=1.0)


def interval_miscalibration_area(errors, sigma, quantiles, n_levels: int = 101) -> float:
    """Miscalibration area of the intervals ±Q(c)·σ given by `fit_interval_quantiles`."""
    observed_levels = np.sort(recalibrated_levels(errors, sigma, quantiles))
    expected = np.linspace(0.0, 1.0, n_levels)
    observed = np.searchsorted(observed_levels, expected, side="right") / observed_levels.size
    gap = np.abs(observed - expected)
    return float(np.sum(0.5 * (gap[1:] + gap[:-1]) * np.diff(expected)))


def interval_half_width(quantiles, confidence: float) -> float:
    """Q(confidence): the interval is ±Q σ (the Gaussian value would be `z_for_confidence`)."""
    quantiles = np.asarray(quantiles, np.float64)
    return float(np.interp(confidence, np.linspace(0.0, 1.0, quantiles.size), quantiles))


def interval_coverage_recalibrated(errors, sigma, quantiles, confidence: float = 0.95) -> float:
    """Fraction of entries inside ±Q(confidence)·σ."""
    errors, sigma = _errors_and_sigma(errors, sigma)
    return float(np.mean(np.abs(errors) <= interval_half_width(quantiles, confidence) * sigma))
