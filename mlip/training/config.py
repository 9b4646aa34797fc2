"""The run configuration: a pydantic schema that the YAML file maps onto one to one.

Every default is written here (the model's part in `mlip.model_config`). Unknown keys are errors that name their dotted path,
variants (backbone, head) are picked by their ``name`` field, and the resolved config
is saved next to every checkpoint. ``load_config`` reads a YAML file and applies
``key.path=value`` overrides from the command line before validation.
"""

from __future__ import annotations

import os
from typing import Literal, Optional, Union

import yaml
from pydantic import (Field, NonNegativeFloat, PositiveFloat, PositiveInt, ValidationError, field_validator,
                      model_validator)

from mlip.errors import ConfigError
# The model's schema lives below the potential (mlip.model_config); re-exported here, the
# whole run's schema, so `from mlip.training.config import MACEConfig` keeps working.
from mlip.model_config import (AllToAllConfig, BackboneConfig, EnergyHeadConfig, EwaldMessagePassingConfig,  # noqa: F401
                               HeadConfig, LatentEwaldConfig, LongRangeConfig, MACEConfig, TransformerConfig,
                               TransIPConfig, ZBLConfig,
                               MeanVarianceHeadConfig, ModelConfig, ShallowEnsembleHeadConfig, StrictModel)


class DataSource(StrictModel):
    """One entry of a list of data sources: ``{source: cheap.xyz@0:500, fidelity: gfn1}``."""

    source: str = Field(description="path@index (ASE index syntax)")
    fidelity: Optional[str] = Field(
        None, description="the level of theory of all its frames (a name in model.fidelities); null: each "
                          "frame's own tag under data.fidelity_key")
    repeat: PositiveInt = Field(1, description="times each of its frames is drawn per training epoch "
                                               "(oversampling scarce labels, e.g. the few high-fidelity ones)")


# A data source: one ``path@index`` string, or a list of strings and {source, fidelity} entries.
DataSources = Union[str, list[Union[str, DataSource]]]


def source_list(spec: Optional[DataSources]) -> list[DataSource]:
    """The entries of a data-source setting as `DataSource` records (none for null)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [DataSource(source=spec)]
    return [DataSource(source=item) if isinstance(item, str) else item for item in spec]


def describe_sources(spec: Optional[DataSources]) -> str:
    """The sources in words for messages: ``a.xyz@0:5`` or ``a.xyz@0:5 (gfn1) + b.xyz (gfn2)``."""
    return " + ".join(entry.source + (f" ({entry.fidelity})" if entry.fidelity else "")
                      for entry in source_list(spec)) or "(none)"


class ReplayConfig(StrictModel):
    """Rehearsal while fine-tuning: every epoch mixes a fresh random draw of old frames into the
    new training frames, so the model does not forget the old task (METHODS.md §6.3)."""

    fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each epoch's training frames that are old")
    source: Optional[DataSources] = Field(
        None, description="the old frames; null: the training data of training.init_from's run")


# Reference energies: 'fit', a file, or an element -> eV mapping.
E0Spec = Union[Literal["fit"], str, dict[str, float]]


class DataConfig(StrictModel):
    """Data sources are ``path@index`` strings (ASE index syntax, e.g. ``file.xyz@0:450``), or lists of
    them and of ``{source, fidelity}`` entries (multi-fidelity data)."""

    train: DataSources
    valid: Optional[DataSources] = None
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0,
                                  description="split off train when `valid` is not given")
    test: Optional[DataSources] = None
    energy_key: Optional[str] = "REF_energy"
    forces_key: Optional[str] = "REF_forces"
    stress_key: Optional[str] = "REF_stress"
    charge_key: Optional[str] = "total_charge"
    spin_key: Optional[str] = "total_spin"
    fidelity_key: Optional[str] = Field(
        None, description="atoms.info key of each frame's level of theory (a name in model.fidelities or an "
                          "index into it), for frames whose data source names none")
    magmoms_key: Optional[str] = Field(
        None, description="atoms.arrays key of per-atom magnetic moments (μ_B; |m| of 3-vectors), the target "
                          "of model.magmoms; frames without it are masked")
    e0s: Union[E0Spec, dict[str, E0Spec]] = Field(
        "fit", description="'fit' (least squares; or the energies of config_type=IsolatedAtom frames where the "
                           "data hold them, MACE's convention), a JSON file of isolated-atom energies, a structure "
                           "file (e.g. extxyz) of one isolated atom per frame, or a mapping element -> eV; for a "
                           "multi-fidelity model also a mapping fidelity name -> one of these (others: fit)")
    replay: Optional[ReplayConfig] = Field(None, description="rehearsal of old data while fine-tuning, or null")
    scaling: Literal["rms_forces", "std_energy"] = "rms_forces"
    edge_layout: Literal["auto", "dense", "list"] = Field(
        "auto", description="edges of a batch as K slots per atom ('dense', a matrix product per "
                            "atom), as a list ('list', a scatter), or dense where it needs at most "
                            "2 slots per edge ('auto'); results are the same, speed differs")


class LossConfig(StrictModel):
    """Weighted MSE (or Huber) of energy per atom, force components and stress.

    Stage two (MACE's "swa" stage): from ``stage_two_start`` (a fraction of the run's
    progress, see ScheduleConfig) on, the energy and force weights switch to the
    ``stage_two_*`` values; a large energy weight late in training tightens energies
    once forces are learned.
    """

    energy_weight: NonNegativeFloat = 1.0
    forces_weight: NonNegativeFloat = 100.0
    stress_weight: NonNegativeFloat = 1.0
    magmoms_weight: NonNegativeFloat = Field(1.0, description="on magnetic-moment errors² (μ_B²), with model.magmoms")
    kind: Literal["mse", "huber"] = "mse"
    huber_delta: PositiveFloat = 0.01
    stage_two_start: Optional[float] = Field(None, gt=0.0, lt=1.0)
    stage_two_energy_weight: NonNegativeFloat = 1000.0
    stage_two_forces_weight: NonNegativeFloat = 100.0
    fidelity_weights: dict[str, NonNegativeFloat] = Field(
        default_factory=dict, description="multi-fidelity: a factor on every loss term of frames at that "
                                          "fidelity (names of model.fidelities; unnamed: 1)")

    def weights_at(self, progress: float) -> dict:
        """Loss weights at a given fraction of the run."""
        if self.stage_two_start is not None and progress >= self.stage_two_start:
            return {"energy": self.stage_two_energy_weight, "forces": self.stage_two_forces_weight,
                    "stress": self.stress_weight, "magmoms": self.magmoms_weight}
        return {"energy": self.energy_weight, "forces": self.forces_weight, "stress": self.stress_weight,
                "magmoms": self.magmoms_weight}


class OptimizerConfig(StrictModel):
    name: Literal["adam", "adamw"] = "adam"
    learning_rate: PositiveFloat = 0.01
    amsgrad: bool = True
    weight_decay: NonNegativeFloat = 5e-7
    clip_grad_norm: Optional[PositiveFloat] = 10.0


class ScheduleConfig(StrictModel):
    """Learning-rate schedule over the run's progress.

    Progress is the larger of epoch/max_epochs and elapsed/max_time, so a cosine
    schedule also ends on time when the run is limited by wall clock.
    """

    name: Literal["constant", "cosine", "plateau"] = "cosine"
    warmup_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    final_fraction: float = Field(0.01, gt=0.0, le=1.0)
    plateau_factor: float = Field(0.8, gt=0.0, lt=1.0)
    plateau_patience: PositiveInt = 50


class TrainingConfig(StrictModel):
    max_epochs: PositiveInt = 100
    max_time: Optional[PositiveFloat] = Field(None, description="wall-clock limit, seconds")
    batch_size: PositiveInt = 10
    eval_batch_size: PositiveInt = 32
    ema_decay: Optional[float] = Field(0.99, ge=0.0, lt=1.0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    rotation_augmentation: bool = Field(
        False, description="turn every training structure by a fresh random rotation each step (positions, "
                           "cell, force and stress labels): how a non-equivariant model (transip) learns the "
                           "symmetry; no use for equivariant backbones")
    init_from: Optional[str] = Field(
        None, description="fine-tune: start from this run directory's best parameters and statistics; new "
                          "elements and new fidelities are allowed (their parameters start fresh)")
    freeze_backbone_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="with init_from: train only the readout heads for this fraction of "
                                         "the run, then everything")
    progress_bar: bool = True
    plots: bool = True


class NoUncertaintyConfig(StrictModel):
    """One model, no predicted uncertainty."""

    method: Literal["none"] = "none"


class DeepEnsembleConfig(StrictModel):
    """Independently initialised members trained together in one run (METHODS.md §4.2).

    Members are vmapped over a leading parameter axis: same batches, own optimizer
    state and EMA. The best checkpoint is chosen on the validation loss of the
    ensemble mean. With ``recalibrate`` the σ of energy, forces and stress are each
    scaled by a factor fitted on the validation set after training (METHODS.md §4.9).
    """

    method: Literal["deep_ensemble"] = "deep_ensemble"
    members: int = Field(4, ge=2, le=64, description="number of ensemble members M")
    recalibrate: bool = True
    parallel_members: Optional[PositiveInt] = Field(
        None, description="members vmapped at once in training and prediction; null: all on GPU/TPU, "
                          "1 on CPU (measured faster there)")


class GaussianNLLSettings(StrictModel):
    """How a method that predicts a Gaussian is trained: MSE warm-up, then β-NLL (METHODS.md §4.3).

    Until ``warmup_fraction`` of the run (progress as in ScheduleConfig) the loss is the
    ordinary ``loss:`` section (MSE/Huber). Afterwards energy and forces are fitted by
    the joint β-NLL
        L = w_E · β-NLL(E; μ_E, σ_E²)/N + w_F · mean_{i,α} β-NLL(F_iα; μ_F, σ_F,i²)
    with β-NLL = stop_gradient(σ²)^β · ½ [log σ² + (y − μ)²/σ²] (Seitzer et al. 2022);
    stress, which has no predicted variance, keeps its MSE term.
    """

    warmup_fraction: float = Field(0.3, ge=0.0, lt=1.0, description="fraction of the run trained with MSE")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="0: plain NLL, 1: MSE-like mean gradients")
    nll_energy_weight: NonNegativeFloat = Field(1.0, description="w_E of the per-atom energy NLL")
    nll_forces_weight: NonNegativeFloat = Field(1.0, description="w_F of the mean force-component NLL")
    recalibrate: bool = Field(True, description="fit σ scales on the validation set after training")


class MeanVarianceConfig(GaussianNLLSettings):
    """Mean-variance estimation: one model whose head predicts its own (aleatoric) variances.

    Needs ``model.head.name: mve`` (filled in when the config names no head). The model
    is stored as a posterior of one sample; its σ is the predicted variance, recalibrated.
    """

    method: Literal["mve"] = "mve"


class ShallowEnsembleConfig(GaussianNLLSettings):
    """Last-layer ensemble: K readout heads on one backbone (METHODS.md §4.4).

    Needs ``model.head.name: shallow_ensemble`` (filled in when the config names no head;
    K is ``model.head.members``). After the warm-up the ensemble is trained jointly by the
    β-NLL of its predicted Gaussian (mean and spread of the K energies). Forces: with
    ``member_forces_in_training`` each head's forces (K backward passes) enter a force
    NLL; by default the mean forces (one backward pass, the cost of a single model) keep
    their MSE term and the force spread is only recalibrated.
    """

    method: Literal["shallow_ensemble"] = "shallow_ensemble"
    member_forces_in_training: bool = False


class PosteriorSamplingSettings(StrictModel):
    """Shared by the methods that leave a posterior to draw from (swag, laplace, sgmcmc, ivon)."""

    recalibrate: bool = Field(True, description="fit σ scales on the validation set after training")
    parallel_samples: Optional[PositiveInt] = Field(
        None, description="posterior samples vmapped at once in prediction; null: all on GPU/TPU, 1 on CPU")


class SWAGConfig(PosteriorSamplingSettings):
    """SWAG (METHODS.md §4.5): a Gaussian fitted to the parameters visited late in training.

    Until ``start_fraction`` of the run the model trains as usual; from then on the
    learning rate is held constant and every ``collect_every_steps`` steps (null: once
    per epoch) the parameters update a running mean, a running second moment (diagonal)
    and the last ``max_rank`` deviations from the mean (low-rank part). After the run
    ``samples`` parameter sets are drawn, scaled by ``scale``, and form the posterior.
    """

    method: Literal["swag"] = "swag"
    start_fraction: float = Field(0.75, gt=0.0, lt=1.0, description="fraction of the run before collection starts")
    learning_rate: Optional[PositiveFloat] = Field(
        None, description="constant learning rate during collection; null: the schedule's rate at start_fraction")
    collect_every_steps: Optional[PositiveInt] = Field(None, description="null: once per epoch")
    max_rank: int = Field(20, ge=2, le=200, description="K, deviation columns kept for the low-rank part")
    samples: int = Field(20, ge=2, le=256, description="S, parameter draws forming the posterior")
    scale: float = Field(0.5, gt=0.0, description="s in θ = θ̄ + s/√2 (...) ; 1 is the derivation, 0.5 common")


class LaplaceConfig(PosteriorSamplingSettings):
    """Last-layer Laplace (METHODS.md §4.7): a Gaussian over the energy readout's last linear layer.

    After training the readout weights w enter E and F linearly, so the generalised
    Gauss–Newton precision P = J_Eᵀ J_E/σ_E² + J_Fᵀ J_F/σ_F² + λ I over the training set
    is exact; σ_E, σ_F are the training errors and λ maximises the marginal likelihood
    (or is given). ``samples`` antithetic draws w* ± δ from N(w*, P⁻¹) become K readouts
    of one backbone (a shallow-ensemble head), so the posterior mean equals the trained
    model and the spread costs one backbone pass.
    """

    method: Literal["laplace"] = "laplace"
    samples: int = Field(16, ge=2, le=256, description="readout draws (rounded up to an even number)")
    prior_precision: Optional[PositiveFloat] = Field(
        None, description="λ; null: maximise the marginal likelihood over a grid 10^[-6, 6]")


class SGMCMCConfig(PosteriorSamplingSettings):
    """Stochastic-gradient MCMC (METHODS.md §4.8): chains that sample the posterior while training.

    ``chains`` independently initialised chains run together (stacked like deep-ensemble
    members, each with its own noise). They sample exp(−Ũ/T) with Ũ = N·loss +
    ½ prior_precision·|θ|² (N training structures, loss the batch mean of the ``loss:``
    section) by SGLD or SGHMC, RMSprop-preconditioned when ``preconditioned``; the
    temperature T scales the injected noise. Replaces ``training.optimizer`` except its
    ``learning_rate`` α, and the schedule still applies (cosine or constant).

    Step size: the Langevin step is η = α/N for SGLD and η = friction·α/N for SGHMC, so
    the deterministic part of either is a plain gradient step of size α on the mean
    loss (SGHMC: its velocity at steady drift), and α keeps the meaning it has for
    other optimizers (with preconditioning, an RMSprop step; Adam-like rates work).
    After ``burn_in_fraction`` of the run, ``samples_per_chain`` evenly spaced states of
    every chain are kept (at most one per epoch; the last ones if the run outlasts the
    plan); all chains × samples form the posterior.
    """

    method: Literal["sgmcmc"] = "sgmcmc"
    sampler: Literal["sgld", "sghmc"] = "sghmc"
    chains: int = Field(4, ge=1, le=64)
    temperature: PositiveFloat = Field(1.0, description="T < 1: cold posterior")
    friction: float = Field(0.05, gt=0.0, le=1.0, description="SGHMC momentum decay a per step")
    preconditioned: bool = True
    preconditioner_decay: float = Field(
        0.999, ge=0.0, lt=1.0, description="β of the RMSprop average; slow (near 1) keeps G nearly constant")
    preconditioner_epsilon: PositiveFloat = Field(
        1e-5, description="ε in G = 1/(ε + sqrt(V)), mean-loss gradient units; caps G (and the noise) at 1/ε")
    prior_precision: NonNegativeFloat = Field(1.0, description="Gaussian prior precision on every parameter")
    burn_in_fraction: float = Field(0.5, ge=0.0, lt=1.0)
    samples_per_chain: int = Field(5, ge=1, le=100)


class IVONConfig(PosteriorSamplingSettings):
    """IVON (METHODS.md §4.6): variational learning of a diagonal Gaussian posterior by an Adam-like optimizer.

    Replaces ``training.optimizer`` (its learning rate and the schedule still apply;
    IVON's rates are larger than Adam's). ``effective_sample_size`` λ defaults to the
    number of training structures. After training ``samples`` draws θ ~ N(m, 1/(λ(h+δ)))
    form the posterior.
    """

    method: Literal["ivon"] = "ivon"
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99999, ge=0.0, lt=1.0)
    hess_init: PositiveFloat = Field(1.0, description="h₀")
    weight_decay: PositiveFloat = Field(1e-4, description="δ, also the prior precision per unit λ")
    effective_sample_size: Optional[PositiveFloat] = Field(None, description="λ; null: training structures")
    mc_samples: PositiveInt = Field(1, description="weight draws per training step")
    clip_radius: Optional[PositiveFloat] = Field(None, description="elementwise clip of the update; null: none")
    samples: int = Field(20, ge=2, le=256, description="S, parameter draws forming the posterior")


UncertaintyConfig = Union[NoUncertaintyConfig, DeepEnsembleConfig, MeanVarianceConfig, ShallowEnsembleConfig,
                          SWAGConfig, LaplaceConfig, SGMCMCConfig, IVONConfig]

# uncertainty.method -> the model.head.name it needs (methods not listed use any head but these).
METHOD_HEADS = {"mve": "mve", "shallow_ensemble": "shallow_ensemble"}


class RunConfig(StrictModel):
    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    uncertainty: UncertaintyConfig = Field(default_factory=NoUncertaintyConfig, discriminator="method")

    @model_validator(mode="before")
    @classmethod
    def _uncertainty_shorthand(cls, data):
        # `uncertainty: none` (or `--set uncertainty=deep_ensemble`) names the method with
        # its defaults; it also switches a config's method without its other keys.
        if isinstance(data, dict) and isinstance(data.get("uncertainty"), str):
            data = {**data, "uncertainty": {"method": data["uncertainty"]}}
        # A method with its own head (mve, shallow_ensemble) picks that head when the
        # config does not name one, so `uncertainty: mve` alone is a complete choice.
        if isinstance(data, dict) and isinstance(data.get("uncertainty"), dict):
            head_name = METHOD_HEADS.get(data["uncertainty"].get("method"))
            model = data.get("model")
            model = dict(model) if isinstance(model, dict) else ({} if model is None else model)
            if head_name and isinstance(model, dict):
                head = model.get("head")
                if head is None:
                    model["head"] = {"name": head_name}
                elif isinstance(head, dict) and "name" not in head:
                    model["head"] = {"name": head_name, **head}
                data = {**data, "model": model}
        return data

    @model_validator(mode="after")
    def _head_matches_method(self):
        method, head = self.uncertainty.method, self.model.head.name
        needed = METHOD_HEADS.get(method)
        if needed is not None and head != needed:
            raise ValueError(f"uncertainty.method '{method}' needs model.head.name '{needed}', got '{head}'")
        if needed is None and head in METHOD_HEADS.values():
            raise ValueError(f"model.head.name '{head}' needs uncertainty.method '{head}', got '{method}'")
        return self

    @model_validator(mode="after")
    def _fidelities_known(self):
        known = self.model.fidelity_names
        named = {entry.fidelity: f"data.{split}" for split in ("train", "valid", "test")
                 for entry in source_list(getattr(self.data, split)) if entry.fidelity is not None}
        if self.data.replay is not None:
            named.update({entry.fidelity: "data.replay.source" for entry in source_list(self.data.replay.source)
                          if entry.fidelity is not None})
        named.update({name: "loss.fidelity_weights" for name in self.loss.fidelity_weights})
        if isinstance(self.data.e0s, dict) and self.data.e0s and all(isinstance(v, (str, dict))
                                                                     for v in self.data.e0s.values()):
            named.update({name: "data.e0s" for name in self.data.e0s})
        for name, where in named.items():
            if not known and self.training.init_from:
                break  # the model section comes from the source run; checked again once merged
            if not known:
                raise ValueError(f"{where} names fidelity '{name}', but model.fidelities is not set (list the "
                                 "levels of theory there, lowest first)")
            if name not in known:
                raise ValueError(f"{where} names fidelity '{name}', not one of model.fidelities {list(known)}")
        if self.training.freeze_backbone_fraction and not self.training.init_from:
            raise ValueError("training.freeze_backbone_fraction needs training.init_from (a trained backbone)")
        if self.data.replay is not None and self.data.replay.source is None and not self.training.init_from:
            raise ValueError("data.replay needs data.replay.source or training.init_from (whose training data "
                             "it replays)")
        return self

    @field_validator("run_dir")
    @classmethod
    def _run_dir_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def apply_override(tree: dict, assignment: str, source: str = "--set") -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (numbers, null, lists)."""
    if "=" not in assignment:
        raise ConfigError(f"{source} '{assignment}': expected key.path=value")
    path, raw_value = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"{source} '{assignment}': empty key in '{path}'")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    if isinstance(value, dict) and not raw_value.strip().startswith("{"):
        value = raw_value  # e.g. data.valid=file.xyz@-5: is a string, not a mapping
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source} '{assignment}': '{'.'.join(keys[:depth + 1])}' is not a section")
        node = child
    node[keys[-1]] = value


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] == "union_tag_not_found":
            message = f"missing the key '{item['ctx']['discriminator'].strip(chr(39))}' that picks the variant"
        value = item.get("input")
        shown = "" if item["type"] in ("missing",) or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{source}: {path}: {message}{shown}")
    return "\n".join(lines)


def config_from_dict(tree: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def load_config(path: str, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``key.path=value`` overrides, validate.

    Raises:
        ConfigError: missing file, invalid YAML, unknown keys, bad values; the message
            names the file and the dotted key.
    """
    return config_from_dict(read_yaml_tree(path, overrides), path)


def read_yaml_tree(path: str, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """The mapping of a YAML config file with ``key.path=value`` overrides applied (not validated)."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path) as handle:
            tree = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        hint = ""
        if "mapping values are not allowed" in str(error) or "but got ':'" in str(error):
            hint = " (a value that ends with ':' must be quoted, e.g. train: \"data.xyz@-50:\")"
        raise ConfigError(f"{path}: invalid YAML{hint}: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(tree).__name__}")
    for assignment in overrides:
        apply_override(tree, assignment)
    return tree


def save_config(config: RunConfig, path: str) -> None:
    from mlip.training.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
