"""Molecular dynamics on the device: integrators (`integrators`) and the block-stepped runner (`simulation`)."""

from mlip.md.integrators import ENSEMBLES, Ensemble, MDState
from mlip.md.simulation import MDReport, MDStabilityError, MolecularDynamics

__all__ = ["ENSEMBLES", "Ensemble", "MDState", "MDReport", "MDStabilityError", "MolecularDynamics"]
