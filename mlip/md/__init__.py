"""Molecular dynamics on the device: integrators (`integrators`), the block-stepped runner
(`simulation`) and several trajectories stepped together (`replicas`)."""

from mlip.md.integrators import ENSEMBLES, Ensemble, MDState
from mlip.md.replicas import ReplicaDynamics
from mlip.md.simulation import MDReport, MDStabilityError, MolecularDynamics

__all__ = ["ENSEMBLES", "Ensemble", "MDState", "MDReport", "MDStabilityError", "MolecularDynamics",
           "ReplicaDynamics"]
