"""Backbones: AtomsGraph -> per-node features. Importing this package registers them."""

from mlip.models.mace import MACE
from mlip.models.transformer import EquivariantTransformer

__all__ = ["MACE", "EquivariantTransformer"]
