"""The active-learning configuration (`mlip active-learn CONFIG.yaml`): pydantic, like the run config.

Unknown keys are errors naming their dotted path; every default is written here. The
training run of each iteration is an ordinary run config (a path or inline), whose
data sources the loop replaces with the labelled set.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, ValidationError, model_validator

from mlip.errors import ConfigError
from mlip.model_config import StrictModel
from mlip.training.config import DataSources, format_validation_error, read_yaml_tree


class OracleConfig(StrictModel):
    """The reference method: any ASE calculator by import path, with its keyword arguments."""

    calculator: str = Field(description="import path, e.g. ase.calculators.emt.EMT or tblite.ase.TBLite")
    kwargs: dict = Field(default_factory=dict, description="keyword arguments of the calculator")
    workers: PositiveInt = Field(1, description="labels computed at once, each in its own process")
    timeout_s: PositiveFloat = Field(3600.0, description="a label running longer is a failure (its process "
                                                         "is terminated)")


class ExplorationConfig(StrictModel):
    """MD from every seed structure at every temperature, with the current model (posterior mean forces)."""

    ensemble: Literal["nve", "langevin", "nose-hoover", "npt", "npt-aniso"] = "langevin"
    temperatures: list[PositiveFloat] = Field(default_factory=lambda: [300.0], description="K, one run each")
    steps: PositiveInt = Field(1000, description="MD steps per trajectory at most")
    timestep_fs: PositiveFloat = 1.0
    friction_per_fs: PositiveFloat = 0.01
    pressure_GPa: float = 0.0
    check_every: PositiveInt = Field(50, description="steps between snapshots whose σ is evaluated")
    sigma_stop: Optional[PositiveFloat] = Field(
        None, description="stop a trajectory once a snapshot's score passes this (in the unit of "
                          "selection.thresholds); null: selection.sigma_high")
    uncertainty_bias: NonNegativeFloat = Field(
        0.0, description="τ: MD moves on E − τσ_E, the ensemble's mean energy lowered by τ times its energy "
                         "spread, so it is drawn to structures the model does not know (hyperactive learning, "
                         "METHODS.md §6.2; mlip.uq.UncertaintyBiasedPotential); 0: plain MD. Snapshots are "
                         "scored and labelled as ever; only the path the trajectories take changes")
    max_bond_stretch: Optional[PositiveFloat] = Field(
        None, description="molecules: stop a trajectory, keeping none of it from there on, once a bond of its "
                          "seed structure (pairs within 1.2x their covalent radii's sum) is longer than this "
                          "multiple of the radii's sum: the model's MD broke the molecule, a structure of no "
                          "use to label (e.g. 1.5); null: no check (crystals, liquids, reactions)")


class SelectionConfig(StrictModel):
    """Uncertain and diverse: σ_low < score <= σ_high, then farthest-point sampling on features."""

    batch_size: PositiveInt = Field(10, description="labels bought per iteration at most")
    score: Literal["max_atom", "mean_atom", "sum_atom", "energy"] = Field(
        "max_atom", description="a structure's uncertainty: the largest force σ over its atoms (finds one bad "
                                "atom in a big cell), the mean over its atoms (how unsure the whole cell is), the "
                                "sum over its atoms (the forces a label would teach: a 32-atom cell counts for "
                                "more than a 13-atom cluster of the same σ per atom), or energy: σ_E/√N, the "
                                "members' energy spread once each member's per-element offset on the labelled data "
                                "is taken off (a new conformer rather than a hot one; METHODS.md §6.1)")
    thresholds: Literal["absolute", "relative"] = Field(
        "absolute", description="absolute: sigma_low, sigma_high and exploration.sigma_stop in eV/Å; relative: "
                                "multiples of the median score of the labelled structures under the current "
                                "model, so the window follows the model as it improves (METHODS.md §6.1)")
    sigma_low: NonNegativeFloat = Field(0.05, description="below this a structure is already known")
    sigma_high: PositiveFloat = Field(1.0, description="above this it is probably unphysical")
    diversity: bool = Field(True, description="farthest-point sampling on the model's features (σ-weighted); "
                                              "false: the most uncertain")
    balance: Literal["none", "temperature"] = Field(
        "none", description="temperature: the batch is shared evenly among the exploration temperatures, each "
                            "share picked by σ and diversity within it (by σ alone every label can go to the "
                            "hottest trajectory, whose snapshots are always the most uncertain)")
    when_none_trusted: Literal["edge", "stop"] = Field(
        "edge", description="when every explored structure is above sigma_high: edge labels the least "
                            "uncertain of them (where MD first left the trusted region; a young model is "
                            "unsure everywhere), stop ends the loop")
    strategy: Literal["uncertainty", "random"] = Field(
        "uncertainty", description="random: any explored snapshots, drawn uniformly (the baseline of "
                                   "scripts/benchmark_active_learning.py)")


class BudgetConfig(StrictModel):
    max_labels: PositiveInt = Field(100, description="labels bought in all (failed ones do not count)")
    max_iterations: PositiveInt = Field(5, description="explore–select–label rounds")


class ActiveLearningConfig(StrictModel):
    al_dir: str = "runs/active_learning"
    seed: int = 0
    training: Union[str, dict] = Field(description="the run config of each iteration's training: a YAML path or "
                                                   "a mapping; its model must have uncertainty "
                                                   "(e.g. uncertainty: deep_ensemble)")
    initial: DataSources = Field(description="the labelled structures to start from")
    seeds: Union[str, list[str]] = Field(description="structures MD starts from: path@index, or a list of them "
                                                     "(several files, e.g. bulk cells and slabs)")
    oracle: OracleConfig
    exploration: ExplorationConfig = Field(default_factory=ExplorationConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    finetune: bool = Field(True, description="iterations after the first start from the previous model "
                                             "(training.init_from); false: train from scratch every time")
    finetune_epochs: Optional[PositiveInt] = Field(
        None, description="the max_epochs of a fine-tuning iteration (a warm start needs fewer than training "
                          "from scratch, as DP-GEN's training_reuse_numb_steps); null: the training config's")
    final_from_scratch: bool = Field(
        False, description="when the loop stops, train one more model on every label, from scratch with the "
                           "training config's own epochs, in al_dir/final/run (with finetune, each iteration's "
                           "model is a chain of warm starts, and a chain carries every link's training noise)")
    test: Optional[DataSources] = Field(None, description="a held-out labelled set, evaluated every iteration")

    @model_validator(mode="after")
    def _thresholds(self):
        if self.selection.sigma_low >= self.selection.sigma_high:
            raise ValueError(f"selection.sigma_low ({self.selection.sigma_low}) must be below sigma_high "
                             f"({self.selection.sigma_high})")
        return self

    @property
    def sigma_stop(self) -> float:
        return self.exploration.sigma_stop or self.selection.sigma_high


def load_active_learning_config(path: str, overrides=()) -> ActiveLearningConfig:
    """Read and validate an active-learning YAML file (``key.path=value`` overrides applied first)."""
    try:
        return ActiveLearningConfig.model_validate(read_yaml_tree(path, overrides))
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, path)) from None
