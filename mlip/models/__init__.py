"""Backbones: AtomsGraph -> per-node features. Importing this package registers them."""

from mlip.models.mace import MACE

__all__ = ["MACE"]
