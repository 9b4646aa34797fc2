"""Backbones: AtomsGraph -> per-node features. Importing this package registers them."""

from mlip.models.mace import MACE
from mlip.models.transformer import EquivariantTransformer
from mlip.models.transip import TransIP

__all__ = ["MACE", "EquivariantTransformer", "TransIP"]
