"""Prediction over a list of structures and the error metrics reported everywhere.

Predictions are batched into padded buckets (one compilation per bucket) and
returned per structure with absolute energies: the per-element references are
added back on the host in float64. Metrics are in eV, eV/Å and eV/Å³.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import numpy as np

from mlip.data.batching import GraphSample, SharedCapacity, pack_samples, sizes_for_chunks
from mlip.graph import AtomsGraph
from mlip.potential import on_device


class Predictor:
    """Jitted energy/forces/stress of a `Potential` for batches of structures.

    A `mlip.uq.PosteriorPotential` works the same way; its predictions are the
    posterior mean and carry ``energy_std``, ``forces_std`` and ``stress_std`` too.
    """

    def __init__(self, potential, compute_stress: bool = True, layout: str = "auto"):
        self.potential = potential
        self.compute_stress = compute_stress
        self.layout = layout  # edge layout of the batches (mlip.data.batching.sizes_for)
        # The potential goes in as an argument: every model of one architecture shares the program.
        self._apply = functools.partial(_predict, on_device(potential), compute_stress=compute_stress)

    def predict(self, params: Any, samples: Sequence[GraphSample], batch_size: int = 32,
                graph: Optional[AtomsGraph] = None) -> list[dict]:
        """Per structure: ``energy`` (eV, absolute), ``forces`` [n, 3], ``stress`` [3, 3] or None
        (and ``charges`` [n] for a model with a long-range term, ``magmoms`` [n] with a
        magnetic-moment head).

        With uncertainty also ``energy_std`` (eV), ``forces_std`` [n, 3] (eV/Å) and
        ``stress_std`` [3, 3] (eV/Å³) or None.

        ``graph``: all ``samples`` already packed in one batch, in this order (a caller that keeps
        one padded shape for calls that vary, see `mlip.data.batching.covering`), instead of
        batches of ``batch_size`` packed here.
        """
        results = []
        dtype = np.float64 if self.potential.config.dtype == "float64" else np.float32
        if graph is not None:
            batches = [(list(samples), graph)]
        else:
            chunks = [list(samples[start:start + batch_size]) for start in range(0, len(samples), batch_size)]
            batches = ((chunk, pack_samples(chunk, sizes, None, dtype)) for chunk, sizes in
                       zip(chunks, sizes_for_chunks(chunks, batch_size, self.layout, SharedCapacity.of(samples))))
        for chunk, graph in batches:
            outputs = jax.device_get(self._apply(params, graph))
            offset = 0
            for g, sample in enumerate(chunk):
                n = sample.n_atoms
                reference = self.potential.reference_energy(sample.frame.numbers, sample.frame.fidelity)
                result = {"energy": reference + float(outputs["energy"][g]),
                          "forces": np.asarray(outputs["forces"][offset:offset + n], np.float64),
                          "stress": None}
                if self.compute_stress and sample.frame.is_periodic:
                    result["stress"] = np.asarray(outputs["stress"][g], np.float64)
                for name in ("charges", "magmoms"):  # latent charges (e), magnetic moments (μ_B)
                    if name in outputs:
                        result[name] = np.asarray(outputs[name][offset:offset + n], np.float64)
                if "energy_std" in outputs:
                    result["energy_std"] = float(outputs["energy_std"][g])
                    result["forces_std"] = np.asarray(outputs["forces_std"][offset:offset + n], np.float64)
                    result["stress_std"] = (np.asarray(outputs["stress_std"][g], np.float64)
                                            if result["stress"] is not None else None)
                results.append(result)
                offset += n
        return results


@functools.partial(jax.jit, static_argnames="compute_stress")
def _predict(potential, params: Any, graph, compute_stress: bool) -> dict:
    return potential.apply(params, graph, compute_forces=True, compute_stress=compute_stress)


def compute_metrics(samples: Sequence[GraphSample], predictions: Sequence[dict]) -> dict:
    """Errors of ``predictions`` against the labels of ``samples`` (only labelled values count)."""
    energy_errors, per_atom_errors, force_errors, stress_errors, magmom_errors = [], [], [], [], []
    for sample, prediction in zip(samples, predictions):
        frame = sample.frame
        if frame.energy is not None:
            energy_errors.append(prediction["energy"] - frame.energy)
            per_atom_errors.append((prediction["energy"] - frame.energy) / frame.n_atoms)
        if frame.forces is not None:
            force_errors.append((prediction["forces"] - frame.forces).reshape(-1))
        if frame.stress is not None and prediction.get("stress") is not None:
            stress_errors.append((prediction["stress"] - frame.stress).reshape(-1))
        if frame.magmoms is not None and "magmoms" in prediction:
            magmom_errors.append(prediction["magmoms"] - frame.magmoms)
    metrics: dict = {"n_frames": len(samples)}
    if energy_errors:
        per_atom = np.asarray(per_atom_errors)
        total = np.asarray(energy_errors)
        metrics.update(energy_mae_per_atom=float(np.mean(np.abs(per_atom))),
                       energy_rmse_per_atom=float(np.sqrt(np.mean(per_atom**2))),
                       energy_mae=float(np.mean(np.abs(total))),
                       energy_rmse=float(np.sqrt(np.mean(total**2))))
    if force_errors:
        forces = np.concatenate(force_errors)
        metrics.update(forces_mae=float(np.mean(np.abs(forces))),
                       forces_rmse=float(np.sqrt(np.mean(forces**2))))
    if stress_errors:
        stress = np.concatenate(stress_errors)
        metrics.update(stress_mae=float(np.mean(np.abs(stress))),
                       stress_rmse=float(np.sqrt(np.mean(stress**2))))
    if magmom_errors:
        magmoms = np.concatenate(magmom_errors)
        metrics.update(magmoms_mae=float(np.mean(np.abs(magmoms))),
                       magmoms_rmse=float(np.sqrt(np.mean(magmoms**2))))
    return metrics


def metrics_by_fidelity(samples: Sequence[GraphSample], predictions: Sequence[dict], names: Sequence[str]) -> dict:
    """``{"by_fidelity": {name: metrics}}`` where the samples hold more than one fidelity, else {}."""
    present = sorted({sample.frame.fidelity for sample in samples})
    if len(names) < 2 or len(present) < 2:
        return {}
    groups = {}
    for index in present:
        chosen = [k for k, sample in enumerate(samples) if sample.frame.fidelity == index]
        groups[names[index]] = compute_metrics([samples[k] for k in chosen], [predictions[k] for k in chosen])
    return {"by_fidelity": groups}


def loss_from_metrics(metrics: dict, weights: dict) -> float:
    """Validation loss on the same scale as the training loss (RMSE² terms, weighted)."""
    loss = 0.0
    for name, metric in (("energy", "energy_rmse_per_atom"), ("forces", "forces_rmse"),
                         ("stress", "stress_rmse"), ("magmoms", "magmoms_rmse")):
        if metric in metrics:
            loss += weights[name] * metrics[metric] ** 2
    return float(loss)


def parity_plot(samples: Sequence[GraphSample], predictions: Sequence[dict], path: str,
                title: Optional[str] = None) -> None:
    """Energy-per-atom and force-component parity plots in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlip.training.checkpoint import save_figure

    labelled = [(s.frame, p) for s, p in zip(samples, predictions)]
    energy_pairs = np.array([(f.energy / f.n_atoms, p["energy"] / f.n_atoms)
                             for f, p in labelled if f.energy is not None])
    force_pairs = [np.stack([f.forces.reshape(-1), p["forces"].reshape(-1)], 1)
                   for f, p in labelled if f.forces is not None]
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for axis, pairs, label in ((axes[0], energy_pairs, "energy per atom (eV)"),
                               (axes[1], np.concatenate(force_pairs) if force_pairs else np.zeros((0, 2)),
                                "force component (eV/Å)")):
        if len(pairs):
            axis.scatter(pairs[:, 0], pairs[:, 1], s=4, alpha=0.5)
            low, high = float(pairs.min()), float(pairs.max())
            axis.plot([low, high], [low, high], "k--", lw=0.8)
        axis.set_xlabel(f"reference {label}")
        axis.set_ylabel(f"predicted {label}")
    if title:
        figure.suptitle(title)
    save_figure(figure, path)
