"""Uncertainty of predictions against labelled structures: metrics, recalibration fit, per-frame table, plot.

Predictions are the per-structure dicts of `mlip.training.evaluation.Predictor` for a
model with uncertainty (``energy_std``, ``forces_std`` [n, 3], ``stress_std`` [3, 3]).
Errors are paired with σ at the resolution the model predicts them:

  * energy: one total energy per structure (eV),
  * forces: every force component (eV/Å),
  * stress: every stress component of periodic structures (eV/Å³).

Spearman ρ for forces is per structure (mean |force error| against mean σ_F), the
ranking that picking structures to label relies on; for energy it is per structure too.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np

from mlip.uq import calibration
from mlip.uq.posterior import Recalibration

COVERAGE_LEVEL = 0.95


def paired_errors(samples: Sequence, predictions: Sequence[dict]) -> dict:
    """name -> (errors, sigma) over every labelled value that has a predicted σ."""
    pairs = {"energy": ([], []), "forces": ([], []), "stress": ([], [])}
    for sample, prediction in zip(samples, predictions):
        frame = sample.frame
        if "energy_std" not in prediction:
            raise ValueError("predictions carry no energy_std: the model has no uncertainty")
        if frame.energy is not None:
            pairs["energy"][0].append([prediction["energy"] - frame.energy])
            pairs["energy"][1].append([prediction["energy_std"]])
        if frame.forces is not None:
            pairs["forces"][0].append((prediction["forces"] - frame.forces).reshape(-1))
            pairs["forces"][1].append(prediction["forces_std"].reshape(-1))
        if frame.stress is not None and prediction.get("stress_std") is not None:
            pairs["stress"][0].append((prediction["stress"] - frame.stress).reshape(-1))
            pairs["stress"][1].append(prediction["stress_std"].reshape(-1))
    return {name: (np.concatenate(errors), np.concatenate(sigmas))
            for name, (errors, sigmas) in pairs.items() if errors}


def per_structure_scores(samples: Sequence, predictions: Sequence[dict], name: str) -> tuple:
    """Per structure: (mean |error|, mean σ) of ``name`` over its labelled values."""
    errors, sigmas = [], []
    for sample, prediction in zip(samples, predictions):
        label = getattr(sample.frame, name)
        std = prediction.get(f"{name}_std")
        if label is None or std is None:
            continue
        errors.append(float(np.mean(np.abs(np.asarray(prediction[name]) - label))))
        sigmas.append(float(np.mean(std)))
    return np.asarray(errors), np.asarray(sigmas)


def _n_bins(count: int) -> int:
    # Equal-count bins of at least ~10 values each, at most 10 bins.
    return int(min(10, max(1, count // 10)))


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None  # JSON has no NaN


def uncertainty_metrics(samples: Sequence, predictions: Sequence[dict],
                        interval_quantiles: Optional[dict] = None) -> dict:
    """NLL, miscalibration area, ENCE, 95 % coverage, RMV and Spearman ρ per output.

    Keys are ``<name>_nll``, ``<name>_miscalibration_area``, ``<name>_ence``,
    ``<name>_coverage_95``, ``<name>_rmv`` (root mean predicted variance) and
    ``<name>_spearman`` (per structure; None where undefined, e.g. a constant σ),
    for name in energy, forces, stress where labels exist. With ``interval_quantiles``
    (from `fit_interval_recalibration` on other data) also ``<name>_interval_miscalibration_area``
    and ``<name>_interval_coverage_95`` of the isotonically recalibrated intervals ±Q(c)·σ.
    """
    metrics = {}
    for name, (errors, sigma) in paired_errors(samples, predictions).items():
        if interval_quantiles and interval_quantiles.get(name) is not None:
            quantiles = interval_quantiles[name]
            metrics[f"{name}_interval_miscalibration_area"] = calibration.interval_miscalibration_area(
                errors, sigma, quantiles)
            metrics[f"{name}_interval_coverage_95"] = calibration.interval_coverage_recalibrated(
                errors, sigma, quantiles, COVERAGE_LEVEL)
        metrics[f"{name}_nll"] = calibration.gaussian_nll(errors, sigma)
        metrics[f"{name}_miscalibration_area"] = calibration.miscalibration_area(errors, sigma)
        metrics[f"{name}_ence"] = calibration.ence(errors, sigma, _n_bins(errors.size))
        metrics[f"{name}_coverage_95"] = calibration.interval_coverage(errors, sigma, COVERAGE_LEVEL)
        metrics[f"{name}_rmv"] = float(np.sqrt(np.mean(sigma**2)))
        structure_errors, structure_sigma = per_structure_scores(samples, predictions, name)
        metrics[f"{name}_spearman"] = _finite_or_none(calibration.spearman(structure_errors, structure_sigma))
    return metrics


def fit_recalibration(samples: Sequence, predictions: Sequence[dict]) -> Recalibration:
    """Variance scale per output, s² = mean(e²/σ²), from uncalibrated predictions.

    Outputs without labels keep the scale 1.
    """
    scales = {name: calibration.fit_variance_scale(errors, sigma)
              for name, (errors, sigma) in paired_errors(samples, predictions).items()}
    return Recalibration(**scales)


def fit_interval_recalibration(samples: Sequence, predictions: Sequence[dict]) -> dict:
    """name -> quantiles of |e|/σ (`calibration.fit_interval_quantiles`), from recalibrated predictions."""
    return {name: calibration.fit_interval_quantiles(errors, sigma).tolist()
            for name, (errors, sigma) in paired_errors(samples, predictions).items()}


def recalibrate_predictions(predictions: Sequence[dict], recalibration: Recalibration) -> list[dict]:
    """Copies of ``predictions`` with every σ multiplied by its scale."""
    scaled = []
    for prediction in predictions:
        prediction = dict(prediction)
        for name in ("energy", "forces", "stress"):
            if prediction.get(f"{name}_std") is not None:
                prediction[f"{name}_std"] = prediction[f"{name}_std"] * getattr(recalibration, name)
        scaled.append(prediction)
    return scaled


PER_FRAME_COLUMNS = ["frame", "source", "n_atoms", "energy_reference", "energy_predicted", "energy_error",
                     "energy_std", "forces_mae", "forces_std_mean", "forces_std_max_atom", "stress_std_mean"]


def per_frame_rows(samples: Sequence, predictions: Sequence[dict]) -> list[dict]:
    """One row per structure: predicted σs and errors (blank where there is no label).

    ``forces_std_mean`` is the mean σ over all force components; ``forces_std_max_atom``
    the largest per-atom σ_F,i = sqrt(mean over x, y, z of σ²), the usual score for
    picking structures to label.
    """
    rows = []
    for index, (sample, prediction) in enumerate(zip(samples, predictions)):
        frame = sample.frame
        forces_std = np.asarray(prediction["forces_std"])
        row = {"frame": index, "source": frame.source, "n_atoms": frame.n_atoms,
               "energy_reference": "" if frame.energy is None else frame.energy,
               "energy_predicted": prediction["energy"],
               "energy_error": "" if frame.energy is None else prediction["energy"] - frame.energy,
               "energy_std": prediction["energy_std"],
               "forces_mae": ("" if frame.forces is None
                              else float(np.mean(np.abs(prediction["forces"] - frame.forces)))),
               "forces_std_mean": float(np.mean(forces_std)),
               "forces_std_max_atom": float(np.max(np.sqrt(np.mean(forces_std**2, axis=1)))),
               "stress_std_mean": ("" if prediction.get("stress_std") is None
                                   else float(np.mean(prediction["stress_std"])))}
        rows.append(row)
    return rows


def per_frame_csv(samples: Sequence, predictions: Sequence[dict]) -> str:
    import csv

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PER_FRAME_COLUMNS)
    writer.writeheader()
    writer.writerows(per_frame_rows(samples, predictions))
    return buffer.getvalue()


def calibration_plot(samples: Sequence, predictions: Sequence[dict], path: str,
                     title: Optional[str] = None) -> None:
    """Calibration curves (observed vs expected coverage) and per-structure force error vs σ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlip.training.checkpoint import save_figure

    figure, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for name, (errors, sigma) in paired_errors(samples, predictions).items():
        expected, observed = calibration.calibration_curve(errors, sigma)
        area = calibration.miscalibration_area(errors, sigma)
        axes[0].plot(expected, observed, label=f"{name} (area {area:.3f})")
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[0].set_xlabel("expected coverage of central interval")
    axes[0].set_ylabel("observed coverage")
    axes[0].legend()
    errors, sigma = per_structure_scores(samples, predictions, "forces")
    if errors.size:
        axes[1].loglog(sigma, errors, "o", ms=3, alpha=0.6)
        low = max(min(errors[errors > 0].min(initial=np.inf), sigma[sigma > 0].min(initial=np.inf)), 1e-8)
        high = max(errors.max(), sigma.max(), low * 10)
        # A calibrated Gaussian has mean |error| = σ √(2/π), not σ.
        ideal = np.sqrt(2.0 / np.pi)
        axes[1].plot([low, high], [ideal * low, ideal * high], "k--", lw=0.8, label="calibrated: σ √(2/π)")
        axes[1].legend()
    axes[1].set_xlabel("mean predicted force σ per structure (eV/Å)")
    axes[1].set_ylabel("mean |force error| per structure (eV/Å)")
    if title:
        figure.suptitle(title)
    save_figure(figure, path)
