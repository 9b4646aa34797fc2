"""Readout heads: per-node features -> per-node outputs. Importing this package registers them."""

from mlip.heads.energy import EnergyHead

__all__ = ["EnergyHead"]
