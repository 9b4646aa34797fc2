"""Readout heads: per-node features -> per-node outputs. Importing this package registers them."""

from mlip.heads.energy import EnergyHead
from mlip.heads.magmoms import MagneticMomentHead
from mlip.heads.uncertainty import MeanVarianceHead, ShallowEnsembleHead

__all__ = ["EnergyHead", "MagneticMomentHead", "MeanVarianceHead", "ShallowEnsembleHead"]
