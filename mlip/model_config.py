"""The model's part of the run configuration: backbone, head, long-range terms (pydantic).

It sits below `mlip.potential`, which builds a model from a `ModelConfig`, so the
potential never imports the training layer; `mlip.training.config` (the whole run's
schema) re-exports every name here. Conventions as there: unknown keys are errors,
variants are picked by their ``name`` field, every default is written here.
"""

from __future__ import annotations

import math
import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator


FIDELITY_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EwaldMessagePassingConfig(StrictModel):
    """Ewald message passing (Kosmala et al. 2023; METHODS.md §3.2) after every interaction."""

    k_cutoff: PositiveFloat = Field(1.2, description="|k| limit in periodic cells, Å⁻¹ (1.2: wavelengths "
                                                     "beyond a 5 Å cutoff)")
    aperiodic_spacing: PositiveFloat = Field(0.2, description="Δk of the fixed k grid for molecules, Å⁻¹")
    aperiodic_cutoff: PositiveFloat = Field(0.6, description="|k| limit for molecules, Å⁻¹")
    num_basis: PositiveInt = Field(32, description="Gaussian basis functions of |k| in the filter")
    bottleneck: PositiveInt = Field(8, description="the filter's down-projection size")


class MACEConfig(StrictModel):
    """MACE backbone (METHODS.md §1). Defaults follow mace's, sized for small systems."""

    name: Literal["mace"] = "mace"
    r_max: PositiveFloat = Field(5.0, description="cutoff radius, Å")
    num_bessel: PositiveInt = 8
    envelope_p: PositiveInt = 5
    max_ell: int = Field(3, ge=1, le=4, description="degree of edge spherical harmonics")
    num_channels: PositiveInt = 64
    max_l: int = Field(1, ge=0, le=3, description="highest irrep degree of node features")
    correlation: int = Field(3, ge=1, le=4)
    num_interactions: int = Field(2, ge=1, le=6)
    radial_mlp: tuple[PositiveInt, ...] = (64, 64, 64)
    charge_spin_embedding: bool = Field(
        False, description="add an embedding of the graph's total charge and spin multiplicity to every "
                           "atom's features (zero for a neutral singlet)")
    ewald_message_passing: Optional[EwaldMessagePassingConfig] = Field(
        None, description="a long-range message in reciprocal space after each interaction, or null")


class TransformerConfig(StrictModel):
    """Equivariant transformer backbone (TorchMD-Net ET; METHODS.md §2.1), torchmd-net's defaults
    sized down for small systems; total charge and spin embedded by default."""

    name: Literal["transformer"] = "transformer"
    r_max: PositiveFloat = Field(5.0, description="cutoff radius, Å")
    num_rbf: PositiveInt = Field(32, description="expnorm radial basis functions")
    num_channels: PositiveInt = Field(64, description="scalar and vector channels F (a multiple of num_heads)")
    num_heads: PositiveInt = 4
    num_layers: int = Field(4, ge=1, le=12)
    attention: Literal["silu", "softmax"] = Field(
        "silu", description="silu: torchmd-net's unnormalised weights; softmax: normalised over the "
                            "neighbours and a null key, at CMRET's temperature √(2d)")
    charge_spin_embedding: bool = Field(
        True, description="add an embedding of the graph's total charge and spin multiplicity to every "
                          "atom's initial scalars (zero for a neutral singlet)")
    ewald_message_passing: Optional[EwaldMessagePassingConfig] = Field(
        None, description="a long-range message in reciprocal space after each layer, or null")

    @model_validator(mode="after")
    def _heads_divide_channels(self):
        if self.num_channels % self.num_heads:
            raise ValueError(f"num_channels ({self.num_channels}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        return self


class TransIPConfig(StrictModel):
    """TransIP (METHODS.md §2.3): a transformer on atom tokens (element + centred Cartesian
    coordinates), not equivariant by construction; it learns the symmetry from rotated copies
    (set training.rotation_augmentation). Molecules only: periodic frames are refused."""

    name: Literal["transip"] = "transip"
    r_max: PositiveFloat = Field(5.0, description="radius of the neighbour list, Å (used only beyond "
                                                  "max_atoms, where attention is limited to neighbours)")
    num_channels: PositiveInt = Field(128, description="token width")
    num_heads: PositiveInt = 4
    head_dim: PositiveInt = 32
    num_layers: int = Field(4, ge=1, le=24)
    num_frequencies: PositiveInt = Field(32, description="random Fourier features of the centred coordinates")
    frequency_scale: PositiveFloat = Field(1.0, description="standard deviation of their frequencies, Å⁻¹")
    distance_basis: int = Field(0, ge=0, le=32, description="invariant distance functions in the attention "
                                                            "(0: the paper's plain token transformer)")
    charge_spin_embedding: bool = True
    rotation_average: int = Field(0, ge=0, le=256, description="average the features over this many fixed "
                                                               "rotations (0: none); reduces the equivariance "
                                                               "error, at that multiple of the cost")
    max_atoms: PositiveInt = Field(4096, description="padded atoms above which attention is neighbour-limited")
    ewald_message_passing: Optional[EwaldMessagePassingConfig] = Field(
        None, description="a long-range message in reciprocal space (the aperiodic scheme: molecules only) "
                          "after each attention layer, or null")
    equivariance_objective: NonNegativeFloat = Field(
        0.0, description="weight λ of the embedding-space equivariance loss (METHODS.md §2.3): a learned map "
                         "T(z(x), g) is trained to give the embedding z(g·x) of a turned copy, MSE per atom and "
                         "channel; 0: off (rotation augmentation alone)")


class EnergyHeadConfig(StrictModel):
    name: Literal["energy"] = "energy"
    mlp_hidden: PositiveInt = 16


class MeanVarianceHeadConfig(StrictModel):
    """Energy plus per-atom energy and force variances (METHODS.md §4.3; uncertainty.method: mve)."""

    name: Literal["mve"] = "mve"
    mlp_hidden: PositiveInt = 16
    variance_hidden: PositiveInt = 16
    initial_variance: PositiveFloat = Field(
        0.1, description="starting per-atom variance in normalised units² (scale² eV², scale² (eV/Å)²); "
                         "reset to the validation error when the NLL starts")
    variance_floor: PositiveFloat = Field(1e-6, description="added to every per-atom variance, eV² and (eV/Å)²")


class ShallowEnsembleHeadConfig(StrictModel):
    """K energy readouts on one backbone (METHODS.md §4.4; uncertainty.method: shallow_ensemble)."""

    name: Literal["shallow_ensemble"] = "shallow_ensemble"
    members: int = Field(8, ge=2, le=64, description="number of readout heads K")
    mlp_hidden: PositiveInt = 16


class LatentEwaldConfig(StrictModel):
    """Latent-charge Ewald electrostatics, LES (METHODS.md §3.3): learned per-atom charges whose
    Gaussian-charge Coulomb energy is added to the local energy; charges sum to the total charge."""

    name: Literal["les"] = "les"
    sigma: PositiveFloat = Field(1.0, description="pair width σ of the Gaussian charges, Å")
    k_resolution: PositiveFloat = Field(2.0, description="dl, Å: the reciprocal sum keeps |k| <= 2π/dl")
    charge_mlp: tuple[PositiveInt, ...] = Field((16,), description="hidden sizes of the charge MLP")


class AllToAllConfig(StrictModel):
    """All-to-all node attention after the backbone (AllScAIP-style; METHODS.md §2.2): every atom
    attends to every atom of its structure; distances enter for molecules only."""

    num_layers: int = Field(1, ge=1, le=8)
    num_heads: PositiveInt = 4
    head_dim: PositiveInt = 16
    num_basis: PositiveInt = Field(8, description="distance functions s/√(r²+s²), s from 1 to 32 Å")
    max_atoms: PositiveInt = Field(
        4096, description="padded atoms per batch above which the block attends over the backbone's "
                          "neighbours only (O(N²) cost; a warning says so)")


class ZBLConfig(StrictModel):
    """ZBL universal nuclear repulsion between atoms closer than their covalent radii' sum, added to the
    model's energy (no parameters; the model learns the remainder)."""

    name: Literal["zbl"] = "zbl"
    envelope_p: int = Field(6, ge=2, le=12, description="order of the polynomial envelope that takes it to zero")


BackboneConfig = Union[MACEConfig, TransformerConfig, TransIPConfig]
HeadConfig = Union[EnergyHeadConfig, MeanVarianceHeadConfig, ShallowEnsembleHeadConfig]
LongRangeConfig = Union[LatentEwaldConfig]


class ModelConfig(StrictModel):
    backbone: BackboneConfig = Field(default_factory=MACEConfig, discriminator="name")
    head: HeadConfig = Field(default_factory=EnergyHeadConfig, discriminator="name")
    long_range: Optional[LongRangeConfig] = Field(
        None, discriminator="name", description="a long-range energy term (les), or null for a local model")
    all_to_all: Optional[AllToAllConfig] = Field(
        None, description="all-to-all node attention stacked after the backbone's local layers, or null")
    repulsion: Optional[ZBLConfig] = Field(
        None, discriminator="name", description="a short-range repulsion term ({name: zbl}), or null")
    magmoms: bool = Field(False, description="predict per-atom magnetic moments |Linear(h_i)| (CHGNet's "
                                             "charge-informed head), trained on data.magmoms_key")
    fidelities: Optional[list[str]] = Field(
        None, description="levels of theory, lowest first: one shared backbone and one readout head (and E0, "
                          "shift, scale) per name; the last is the default at inference. null: one fidelity")
    fidelity_embedding: bool = Field(
        False, description="with fidelities: also add a learned embedding of the frame's fidelity to every "
                           "atom's initial features, so the backbone too can tell the levels apart")
    dtype: Literal["float32", "float64"] = "float32"

    @property
    def fidelity_names(self) -> tuple[str, ...]:
        """The levels of theory; empty for a single-fidelity model."""
        return tuple(self.fidelities or ())

    @model_validator(mode="after")
    def _fidelity_names(self):
        names = self.fidelities
        if names is not None:
            if not names:
                raise ValueError("fidelities: give at least one name, or null for a single-fidelity model")
            bad = [n for n in names if not FIDELITY_NAME.fullmatch(n)]
            if bad:
                raise ValueError(f"fidelities: names are letters, digits, '_', '-' and '.', got {bad}")
            if len(set(names)) != len(names):
                raise ValueError(f"fidelities: names must be distinct, got {names}")
        elif self.fidelity_embedding:
            raise ValueError("fidelity_embedding needs model.fidelities")
        return self

    @property
    def k_cutoff(self) -> Optional[float]:
        """|k| limit of the reciprocal-space sums, Å⁻¹ (the largest any term needs); None without one."""
        limits = []
        if self.long_range is not None:
            limits.append(2.0 * math.pi / float(self.long_range.k_resolution))
        ewald = getattr(self.backbone, "ewald_message_passing", None)
        if ewald is not None:
            limits.append(float(ewald.k_cutoff))
        return max(limits) if limits else None

    @property
    def molecules_only(self) -> bool:
        """True for a backbone that sees absolute coordinates (TransIP): no periodic structures."""
        return self.backbone.name == "transip"

    @model_validator(mode="before")
    @classmethod
    def _default_variant_names(cls, data):
        # `backbone: {num_channels: 32}` means the default backbone; only a change of
        # variant needs `name:`.
        if isinstance(data, dict):
            data = dict(data)
            for key, default in (("backbone", "mace"), ("head", "energy"), ("long_range", "les"), ("repulsion", "zbl")):
                if isinstance(data.get(key), dict) and "name" not in data[key]:
                    data[key] = {"name": default, **data[key]}
        return data
