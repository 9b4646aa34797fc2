"""The training loop behind `mlip train`: data, statistics, optimiser, EMA, checkpoints.

One epoch = one shuffled pass over the training structures in padded batches. After
every epoch the model (EMA weights if enabled) is evaluated on the validation set, a
row is written to ``metrics.csv``, ``last.msgpack`` is saved for resuming and
``best.msgpack`` whenever the validation loss improves. The run stops at
``training.max_epochs`` or ``training.max_time`` seconds, whichever comes first.

With ``uncertainty.method: deep_ensemble`` the parameters, optimizer state and EMA
carry a leading member axis and the train step is mapped over it (`mlip.uq.ensemble`);
validation, best-checkpoint selection and the summary use the ensemble mean, and after
the last epoch σ recalibration scales are fitted on the validation set
(``calibration.json``).

``mve`` and ``shallow_ensemble`` train one model, stored as a posterior of one sample
(the same stacked state and prediction path): its head predicts variances, or K
readouts whose spread is the variance. They start with the ``loss:`` section's MSE and
after ``uncertainty.warmup_fraction`` of the run switch to the β-NLL of the predicted
Gaussian (`mlip.training.loss.gaussian_nll_terms`); validation and best-checkpoint
selection then use the NLL. When an MVE run switches, its variance offset is set to
the last validation errors so σ starts near the error (METHODS.md §4.3).

``swag``, ``laplace``, ``sgmcmc`` and ``ivon`` change the run through their
`mlip.uq.methods.MethodHooks` (optimizer, weight draws, learning rate, state collected
after each step or epoch) and after the last epoch leave a posterior of parameter
samples (``posterior.msgpack``) that predicts from then on.

Determinism: shuffling uses ``seed + epoch`` and parameters depend only on the seed,
so a run killed and resumed from ``last.msgpack`` ends where an uninterrupted run
would (for runs limited by epochs, not by wall-clock time).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlip.data.batching import BatchIterator, build_samples
from mlip.data.reader import LabelKeys, assign_fidelities, read_frames
from mlip.data.statistics import (DatasetStatistics, compute_statistics, extend_statistics, isolated_atom_energies,
                                  load_e0_file)
from mlip.errors import CheckpointError, ConfigError, DataError
from mlip.graph import random_rotations, rotate_graph
from mlip.potential import Potential, on_device
from mlip.training import checkpoint
from mlip.training import finetune
from mlip.training.config import RunConfig, config_from_dict, describe_sources, save_config, source_list
from mlip.training.evaluation import Predictor, compute_metrics, loss_from_metrics, metrics_by_fidelity, parity_plot
from mlip.training.loss import gaussian_nll_terms, loss_terms, total_loss
from mlip.uq import ensemble
from mlip.uq.evaluation import (fit_interval_recalibration, fit_recalibration, recalibrate_predictions,
                                uncertainty_metrics)
from mlip.uq.methods import hooks_for
from mlip.uq.posterior import PosteriorPotential, sample_count

# Parameters held still while ``training.freeze_backbone_fraction`` lasts (top-level modules).
FROZEN_MODULES = ("backbone", "all_to_all", "embedding_map")

METRIC_COLUMNS = ["epoch", "step", "time_s", "learning_rate", "train_loss", "valid_loss",
                  "valid_energy_mae_per_atom", "valid_energy_rmse_per_atom", "valid_forces_mae",
                  "valid_forces_rmse", "valid_stress_mae", "old_valid_energy_mae_per_atom", "old_valid_forces_mae"]
OLD_TASK_BEFORE = "old_task_before.json"  # a fine-tuning run's old-task errors before its first step


def label_keys(config: RunConfig) -> LabelKeys:
    data = config.data
    return LabelKeys(energy=data.energy_key, forces=data.forces_key, stress=data.stress_key,
                     charge=data.charge_key, spin=data.spin_key, fidelity=data.fidelity_key,
                     magmoms=data.magmoms_key)


def is_isolated_atom(frame) -> bool:
    """MACE's convention: frames with ``config_type=IsolatedAtom`` give reference energies."""
    return (frame.config_type or "").replace("_", "").lower() == "isolatedatom"


def _without_isolated_atoms(frames: list, isolated: list) -> list:
    """``frames`` less their isolated-atom frames, which are appended to ``isolated``."""
    isolated.extend(frame for frame in frames if is_isolated_atom(frame))
    return [frame for frame in frames if not is_isolated_atom(frame)]


def read_data(config: RunConfig, spec, default_fidelity: Optional[int] = None) -> list:
    """The frames of a data-source setting (a ``path@index`` string or a list of sources), each
    with its fidelity index into ``model.fidelities`` (from its source, else its tag, else
    ``default_fidelity``)."""
    keys = label_keys(config)
    frames = []
    for entry in source_list(spec):
        part = read_frames(entry.source, keys)
        assign_fidelities(part, config.model.fidelity_names, entry.fidelity, default_fidelity, config.data.fidelity_key)
        for frame in part:
            frame.repeat = entry.repeat
        frames += part
    return frames


def load_split(config: RunConfig):
    """Train and validation frames (validation split off train when not given), and the
    isolated-atom frames found among them, taken out of both."""
    isolated: list = []
    train = _without_isolated_atoms(read_data(config, config.data.train), isolated)
    if config.data.valid:
        valid = _without_isolated_atoms(read_data(config, config.data.valid), isolated)
    else:
        if len(train) < 2:
            raise DataError(f"{describe_sources(config.data.train)}: need at least 2 frames to split off a "
                            "validation set (or give data.valid)")
        order = np.random.default_rng(config.seed).permutation(len(train))
        n_valid = max(1, int(round(config.data.valid_fraction * len(train))))
        valid = [train[i] for i in order[:n_valid]]
        train = [train[i] for i in sorted(order[n_valid:])]
    if not train:
        raise DataError(f"{describe_sources(config.data.train)}: no training frames besides the isolated atoms")
    return train, valid, isolated


def check_elements(frames, known: tuple, split: str) -> None:
    from ase.data import chemical_symbols

    known_set = set(known)
    for frame in frames:
        unknown = sorted(set(int(z) for z in frame.numbers) - known_set)
        if unknown:
            atom = int(np.flatnonzero(frame.numbers == unknown[0])[0])
            raise DataError(f"{frame.source}: atom {atom} is {chemical_symbols[unknown[0]]}, an element "
                            f"not in the training set {[chemical_symbols[z] for z in known]} ({split} split)")


def resolve_e0s(config: RunConfig, isolated: Sequence = ()) -> tuple[Optional[dict], str]:
    """The reference energies (None: fit them) and where they come from, in words.

    ``data.e0s: fit`` (the default) with isolated-atom frames in the data (MACE's
    ``config_type=IsolatedAtom``) takes their energies; a JSON or structure file, or a
    mapping, wins over such frames.
    """
    return _resolve_e0_spec(config, config.data.e0s, isolated)


def resolve_fidelity_e0s(config: RunConfig, isolated: Sequence = ()) -> tuple[list, str]:
    """Per fidelity of a multi-fidelity model: its reference energies (None: fit) and, in words,
    where they all come from. ``data.e0s`` may map fidelity names to specs (others: fit); one
    spec applies to every fidelity; isolated-atom frames count for their own fidelity."""
    spec = config.data.e0s
    per_name = isinstance(spec, dict) and bool(spec) and all(isinstance(v, (str, dict)) for v in spec.values())
    e0s, sources = [], []
    for index, name in enumerate(config.model.fidelity_names):
        own_spec = spec.get(name, "fit") if per_name else spec
        own_isolated = [frame for frame in isolated if frame.fidelity == index]
        e0, where = _resolve_e0_spec(config, own_spec, own_isolated, f" (fidelity '{name}')")
        e0s.append(e0)
        sources.append(f"{name}: {where}")
    return e0s, "; ".join(sources)


def _resolve_e0_spec(config: RunConfig, e0s, isolated: Sequence = (), label: str = "") -> tuple[Optional[dict], str]:
    if isolated and e0s != "fit":
        print(f"notice: {len(isolated)} isolated-atom frame(s) (config_type=IsolatedAtom){label} left out of "
              f"training; the reference energies come from data.e0s", file=sys.stderr)
    if isinstance(e0s, dict):
        from ase.data import atomic_numbers

        resolved = {}
        for key, value in e0s.items():
            z = int(key) if str(key).isdigit() else atomic_numbers.get(key)
            if z is None:
                raise ConfigError(f"data.e0s{label}: '{key}' is neither an atomic number nor an element symbol")
            resolved[z] = float(value)
        return resolved, "data.e0s mapping"
    if e0s == "fit":
        if isolated:
            where = sorted({frame.source.rsplit("@", 1)[0] for frame in isolated})
            return (isolated_atom_energies(isolated, "config_type=IsolatedAtom"),
                    f"isolated-atom frames in {', '.join(where)}")
        return None, "least-squares fit to the training energies"
    return load_e0_file(e0s, label_keys(config)), e0s


def describe_data(train: Sequence, valid: Sequence, statistics: DatasetStatistics, e0_source: str) -> str:
    """What training is about to see, so a wrong unit or key shows before an hour is spent."""
    from collections import Counter

    from ase.data import chemical_symbols

    def counts(values):
        return ", ".join(f"{key:g}: {count}" for key, count in sorted(Counter(values).items()))

    elements = Counter(int(z) for frame in train for z in frame.numbers)
    lines = [f"data: {len(train)} training frames ({sum(f.n_atoms for f in train)} atoms), {len(valid)} validation "
             f"frames; elements " + ", ".join(f"{chemical_symbols[z]} {n}" for z, n in sorted(elements.items()))]
    labelled = [f for f in train if f.energy is not None]
    if labelled:
        per_frame = np.array([f.energy for f in labelled])
        e0 = statistics.e0_tables()
        above = np.array([(f.energy - e0[min(f.fidelity, len(e0) - 1)][f.numbers].sum()) / f.n_atoms
                          for f in labelled])
        lines.append(f"  energy   {per_frame.min():.6g} … {per_frame.max():.6g} eV per frame; above the references "
                     f"{above.min():.4g} … {above.max():.4g} eV/atom (shift {statistics.shift:.4g})")
    forces = [f.forces for f in train if f.forces is not None]
    if forces:
        stacked = np.concatenate(forces)
        lines.append(f"  forces   on {len(forces)} frames; |F| up to {np.linalg.norm(stacked, axis=1).max():.4g} eV/Å, "
                     f"RMS component {np.sqrt(np.mean(stacked ** 2)):.4g} eV/Å (scale {statistics.scale:.4g})")
    periodic = sum(f.is_periodic for f in train)
    stressed = sum(f.stress is not None for f in train)
    lines.append(f"  cells    {periodic} periodic, {len(train) - periodic} non-periodic; stress on {stressed} frames")
    lines.append(f"  charge   {counts(f.charge for f in train)}; spin multiplicity {counts(f.spin for f in train)}")
    lines.append(f"  E0 ({e0_source})")
    for entry in statistics.fidelities or [statistics]:
        name = getattr(entry, "name", None)
        label = (f"fidelity {name}: {sum(f.fidelity == statistics.fidelity_names.index(name) for f in train)} "
                 f"frames, shift {entry.shift:.4g}, scale {entry.scale:.4g}; E0 ") if name else "E0 "
        lines.append(f"  {label}" + ", ".join(f"{chemical_symbols[z]} {entry.e0[z]:.6g}"
                                              for z in statistics.atomic_numbers) + " eV")
    return "\n".join(lines)


def make_optimizer(config: RunConfig) -> optax.GradientTransformation:
    """Gradient transformation without the learning rate (applied per step from the schedule)."""
    opt = config.training.optimizer
    parts = []
    if opt.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    moment = optax.scale_by_amsgrad() if opt.amsgrad else optax.scale_by_adam()
    if opt.name == "adam":  # L2 penalty inside the moments, as torch's Adam(weight_decay)
        if opt.weight_decay:
            parts.append(optax.add_decayed_weights(opt.weight_decay))
        parts.append(moment)
    else:  # decoupled weight decay (AdamW)
        parts.append(moment)
        if opt.weight_decay:
            parts.append(optax.add_decayed_weights(opt.weight_decay))
    return optax.chain(*parts)


def learning_rate_at(config: RunConfig, progress: float, plateau_factor: float) -> float:
    schedule = config.training.schedule
    base = config.training.optimizer.learning_rate
    if schedule.warmup_fraction and progress < schedule.warmup_fraction:
        return base * max(progress / schedule.warmup_fraction, 0.01)
    if schedule.name == "cosine":
        span = max(1e-12, 1.0 - schedule.warmup_fraction)
        phase = min(1.0, (progress - schedule.warmup_fraction) / span)
        final = schedule.final_fraction
        return base * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * phase)))
    if schedule.name == "plateau":
        return base * plateau_factor
    return base


class Trainer:
    """Holds the data, the model and the state of one training run."""

    def __init__(self, config: RunConfig):
        # Fine-tuning: the source run's model section, overridden by this config's own model keys.
        self.source = None
        if config.training.init_from:
            self.source = finetune.load_source_run(config.training.init_from)
            finetune.check_source_run(self.source, config.run_dir)
            model = finetune.merged_model_config(self.source.model, config.model,
                                                 config.model.model_dump(mode="json", exclude_unset=True))
            config = config_from_dict({**config.model_dump(mode="json"), "model": model.model_dump(mode="json")},
                                      f"config (model merged from {config.training.init_from})")
        self.config = config
        self.run_dir = config.run_dir
        self.dtype = np.float64 if config.model.dtype == "float64" else np.float32
        train_frames, valid_frames, isolated = load_split(config)
        cutoff, k_cutoff = config.model.backbone.r_max, config.model.k_cutoff
        molecules_only = config.model.molecules_only
        self.train_samples = build_samples(train_frames, cutoff, k_cutoff, molecules_only)
        self.valid_samples = build_samples(valid_frames, cutoff, k_cutoff, molecules_only)
        names = config.model.fidelity_names
        if names:
            e0s, e0_source = resolve_fidelity_e0s(config, isolated)
        else:
            e0, e0_source = resolve_e0s(config, isolated)
        if self.source is not None:
            self.statistics: DatasetStatistics = extend_statistics(
                self.source.statistics, self.source.model.fidelity_names, self.train_samples, names,
                e0s if names else [e0], config.data.scaling)
            e0_source = f"{self.source.run_dir} (init_from), new ones: {e0_source}"
        elif names:
            self.statistics = compute_statistics(self.train_samples, None, config.data.scaling, names, e0s)
        else:
            self.statistics = compute_statistics(self.train_samples, e0, config.data.scaling)
        print(describe_data(train_frames, valid_frames, self.statistics, e0_source), file=sys.stderr, flush=True)
        check_elements(valid_frames, self.statistics.atomic_numbers, "validation")
        # The old task of a fine-tuning run: replayed training frames, and validation frames
        # whose errors are recorded before and during fine-tuning.
        self.replay_samples, self.old_valid_samples = self._old_task(cutoff, k_cutoff, molecules_only)
        self.potential = Potential(config.model, self.statistics)
        # Ensemble members share the statistics (data, not parameters) and the batches.
        # A model that predicts a Gaussian (mve, shallow_ensemble) is a posterior of one sample.
        method = config.uncertainty.method
        self.gaussian_nll = method in ("mve", "shallow_ensemble")
        self.hooks = hooks_for(self)
        self.members = self.hooks.training_members
        self.ema_decay = config.training.ema_decay if self.hooks.uses_ema else None
        # What predicts: the single model, or the posterior over the stacked members.
        self.model = (PosteriorPotential(self.potential, method=method, ddof=1,
                                         parallel_samples=getattr(config.uncertainty, "parallel_members", None))
                      if self.members else self.potential)
        self.use_stress = any(s.frame.stress is not None for s in self.train_samples) \
            and config.loss.stress_weight > 0
        replay = None
        if config.data.replay is not None:
            epoch_frames = sum(sample.frame.repeat for sample in self.train_samples)
            replay = (self.replay_samples, finetune.replay_count(epoch_frames, config.data.replay.fraction))
        self.train_batches = BatchIterator(self.train_samples, config.training.batch_size, self.statistics.e0_tables(),
                                           self.dtype, config.data.edge_layout, replay=replay)
        # Extra-argument support: the step passes key and learning_rate to every update.
        self.optimizer = optax.with_extra_args_support(self.hooks.optimizer(make_optimizer(config)))
        # Stress needs a second derivative direction; skip it for all-molecule data.
        any_periodic = any(s.frame.is_periodic for s in self.train_samples + self.valid_samples
                           + self.old_valid_samples)
        self.predictor = Predictor(self.model, compute_stress=any_periodic, layout=config.data.edge_layout)
        self._train_step = jax.jit(self._make_train_step())
        self._step_potential = on_device(self.potential)  # the step's model argument, on the device once

    def _old_task(self, cutoff, k_cutoff, molecules_only) -> tuple[list, list]:
        """Replay pool and old validation samples of a fine-tuning run (empty lists otherwise)."""
        config, source = self.config, self.source
        replay_frames, old_valid = [], []
        if config.data.replay is not None and config.data.replay.source is not None:
            replay_frames = read_data(config, config.data.replay.source)
        if source is not None:
            old_train, old_valid, _ = load_split(source.config)
            names = config.model.fidelity_names
            finetune.old_task_fidelity(source, names, old_valid)
            if config.data.replay is not None and config.data.replay.source is None:
                finetune.old_task_fidelity(source, names, old_train)
                replay_frames = old_train
        for frames, split in ((replay_frames, "replayed"), (old_valid, "old validation")):
            check_elements(frames, self.statistics.atomic_numbers, split)
        return (build_samples(replay_frames, cutoff, k_cutoff, molecules_only),
                build_samples(old_valid, cutoff, k_cutoff, molecules_only))

    # ---------------------------------------------------------------- state
    def initial_state(self) -> dict:
        key = jax.random.PRNGKey(self.config.seed)
        first_batch, _ = next(self.train_batches.batches(None))
        if self.members:
            params = ensemble.init_members(self.potential, key, first_batch, self.members)
        else:
            params = self.potential.init(key, first_batch)
        if self.source is not None:
            params, counts = finetune.initial_parameters(params, self.source, self.statistics.atomic_numbers,
                                                         self.config.model.fidelity_names, self.members)
            params = jax.tree.map(jnp.asarray, params)
            print(finetune.describe_transplant(self.source, counts), file=sys.stderr, flush=True)
        opt_state = jax.vmap(self.optimizer.init)(params) if self.members else self.optimizer.init(params)
        return {"params": params, "opt_state": opt_state,
                "ema_params": params if self.ema_decay is not None else None,
                "collection": self.hooks.initial_collection(params),  # SWAG moments, MCMC samples
                "epoch": 0, "step": 0, "elapsed": 0.0, "best_valid_loss": float("inf"),
                "best_epoch": -1, "plateau_factor": 1.0, "plateau_best": float("inf"),
                "plateau_bad_epochs": 0, "loss_stage": 1}

    def _state_template(self) -> dict:
        return jax.tree.map(np.asarray, self.initial_state())

    def loss_weights(self, progress: float) -> dict:
        """Weights of the loss terms at a fraction of the run (MSE terms, then NLL terms after the warm-up)."""
        weights = self.config.loss.weights_at(progress)
        if self.gaussian_nll:
            uq = self.config.uncertainty
            nll = progress >= uq.warmup_fraction
            nll_forces = self.config.uncertainty.method == "mve" or uq.member_forces_in_training
            weights.update(energy_nll=uq.nll_energy_weight if nll else 0.0,
                           forces_nll=uq.nll_forces_weight if nll and nll_forces else 0.0)
            if nll:
                weights["energy"] = 0.0
                if nll_forces:
                    weights["forces"] = 0.0
        return weights

    def _nll_phase(self, progress: float) -> bool:
        return self.gaussian_nll and progress >= self.config.uncertainty.warmup_fraction

    def _loss_stage(self, progress: float) -> int:
        """Changes whenever the loss changes (stage two, NLL phase), so validation losses stay comparable."""
        stage_two = self.config.loss.weights_at(progress) != self.config.loss.weights_at(0.0)
        return 1 + int(stage_two) + 2 * int(self._nll_phase(progress))

    def _make_train_step(self):
        loss_config, use_stress = self.config.loss, self.use_stress
        optimizer, ema_decay, hooks = self.optimizer, self.ema_decay, self.hooks
        gaussian_nll, uq = self.gaussian_nll, self.config.uncertainty
        # A shallow ensemble's per-member forces cost K backward passes; only when asked.
        member_derivatives = getattr(uq, "member_forces_in_training", False)

        augment = self.config.training.rotation_augmentation
        equivariance_weight = float(getattr(self.config.model.backbone, "equivariance_objective", 0.0))
        fidelity_weights = None
        if self.config.loss.fidelity_weights:
            fidelity_weights = np.array([self.config.loss.fidelity_weights.get(name, 1.0)
                                         for name in self.config.model.fidelity_names])

        # The potential is an argument, not a constant of the program (see `Potential`): a run on
        # other data with the same model section loads this program from the persistent cache.
        def step_fn(params, opt_state, ema_params, key, graph, learning_rate, step, loss_weights, heads_only,
                    potential):
            if augment:  # its own stream: the samplers' noise keys are unchanged
                graph = rotate_graph(graph, random_rotations(jax.random.fold_in(key, 0x5EED), graph.n_graph,
                                                             graph.positions.dtype))

            def loss_fn(p):
                outputs = potential.apply(p, graph, compute_forces=True, compute_stress=use_stress,
                                          member_derivatives=member_derivatives)
                terms = loss_terms(outputs, graph, loss_config, fidelity_weights)
                if gaussian_nll:
                    terms.update(gaussian_nll_terms(outputs, graph, uq.beta, fidelity_weights))
                loss = total_loss(terms, loss_weights)
                if equivariance_weight:
                    rotations = random_rotations(jax.random.fold_in(key, 0xE0), graph.n_graph, graph.positions.dtype)
                    terms["equivariance"] = potential.equivariance_loss(p, graph, rotations)
                    loss = loss + equivariance_weight * terms["equivariance"]
                return loss, terms

            # IVON takes the gradient at a weight draw m + ε; other methods at the parameters.
            def gradient_at_draw(draw_key):
                gradient_params, draw_args = hooks.perturb(params, opt_state, draw_key)
                (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(gradient_params)
                return loss, terms, grads, draw_args

            if hooks.gradient_draws == 1:
                loss, terms, grads, update_args = gradient_at_draw(key)
            else:  # several draws, one after another (memory of one backward pass)
                loss, terms, grads, draw_args = jax.lax.map(
                    gradient_at_draw, jax.random.split(key, hooks.gradient_draws))
                loss, terms = jax.tree.map(lambda x: x.mean(axis=0), (loss, terms))
                grads, update_args = hooks.combine_draws(grads, draw_args)
            updates, opt_state = optimizer.update(grads, opt_state, params, key=key,
                                                  learning_rate=learning_rate, **update_args)
            # Fine-tuning's first phase: the backbone stays as trained, the readouts adapt.
            updates = {name: (jax.tree.map(lambda u: u * (1.0 - heads_only), value) if name in FROZEN_MODULES
                              else value) for name, value in updates.items()}
            params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
            if ema_params is not None:
                # torch_ema's warm-up: the decay grows with the number of updates.
                decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
                ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
            return params, opt_state, ema_params, loss, terms

        # A fresh key every step (and every member): samplers' noise is never reused.
        base_key = jax.random.PRNGKey(self.config.seed + 7919)
        members = self.members
        if members:
            # Each member: own parameters, optimizer state, EMA and noise; shared batch and schedule.
            mapped = ensemble.map_over_members(step_fn, n_member_args=4,
                                               parallel=getattr(self.config.uncertainty, "parallel_members", None))

            def member_step(params, opt_state, ema_params, graph, learning_rate, step, loss_weights, heads_only,
                            potential):
                keys = jax.random.split(jax.random.fold_in(base_key, step.astype(jnp.uint32)), members)
                return mapped(params, opt_state, ema_params, keys, graph, learning_rate, step, loss_weights,
                              heads_only, potential)
            return member_step

        def single_step(params, opt_state, ema_params, graph, learning_rate, step, loss_weights, heads_only,
                        potential):
            key = jax.random.fold_in(base_key, step.astype(jnp.uint32))
            return step_fn(params, opt_state, ema_params, key, graph, learning_rate, step, loss_weights, heads_only,
                           potential)
        return single_step

    # ---------------------------------------------------------------- run
    def run(self, resume: bool = False) -> dict:
        os.makedirs(self.run_dir, exist_ok=True)
        last_path = os.path.join(self.run_dir, "last.msgpack")
        if resume:
            state = checkpoint.load_pytree(last_path, self._state_template())
            state = _python_scalars(state)
            rows = _read_metrics(os.path.join(self.run_dir, "metrics.csv"), state["epoch"])
        else:
            if os.path.exists(last_path):
                raise CheckpointError(f"{self.run_dir}: already holds a run; use `mlip train --resume "
                                      f"{self.run_dir}` to continue it, or choose another run_dir")
            state = self.initial_state()
            rows = []
            if self.old_valid_samples:
                params = state["ema_params"] if state["ema_params"] is not None else state["params"]
                checkpoint.write_json(os.path.join(self.run_dir, OLD_TASK_BEFORE), self._old_task_metrics(params))
        save_config(self.config, os.path.join(self.run_dir, "config.yaml"))
        uncertainty = ({"method": self.config.uncertainty.method, "members": self.members, "ddof": 1}
                       if self.members else None)
        checkpoint.write_json(os.path.join(self.run_dir, "model.json"),
                              checkpoint.model_metadata(self.potential, uncertainty))

        training = self.config.training
        start_time = time.monotonic() - state["elapsed"]
        stop_reason = "max_epochs"
        previous_progress = self._progress(state, start_time)
        progress_bar = _progress_bar(training.progress_bar, training.max_epochs, state["epoch"])
        while state["epoch"] < training.max_epochs:
            epoch = state["epoch"]
            epoch_losses = []
            out_of_time = False
            for graph, _ in self.train_batches.batches(shuffle_seed=self.config.seed * 100_003 + epoch):
                progress = self._progress(state, start_time)
                if self._nll_phase(progress) and not self._nll_phase(previous_progress):
                    self._start_nll(state, rows)
                previous_progress = progress
                lr = self.hooks.learning_rate(learning_rate_at(self.config, progress, state["plateau_factor"]),
                                              progress)
                weights = {name: jnp.asarray(value, self.dtype)
                           for name, value in self.loss_weights(progress).items()}
                heads_only = float(progress < self.config.training.freeze_backbone_fraction)
                params, opt_state, ema, loss, _ = self._train_step(
                    state["params"], state["opt_state"], state["ema_params"], graph,
                    jnp.asarray(lr, self.dtype), jnp.asarray(state["step"], self.dtype), weights,
                    jnp.asarray(heads_only, self.dtype), self._step_potential)
                state.update(params=params, opt_state=opt_state, ema_params=ema, step=state["step"] + 1)
                state["collection"] = self.hooks.after_step(state["collection"], state, progress)
                epoch_losses.append(loss)
                if training.max_time is not None and time.monotonic() - start_time > training.max_time:
                    out_of_time = True
                    break
            train_loss = float(np.mean(jax.device_get(epoch_losses))) if epoch_losses else float("nan")
            if not np.isfinite(train_loss):
                raise DataError(f"training diverged at epoch {epoch} (loss {train_loss}); lower "
                                "training.optimizer.learning_rate or check the labels")
            state["epoch"] = epoch + 1
            state["elapsed"] = time.monotonic() - start_time
            state["collection"] = self.hooks.after_epoch(state["collection"], state,
                                                         self._progress(state, start_time))
            row = self._validate(state, train_loss, lr, self._progress(state, start_time))
            rows.append(row)
            _write_metrics(os.path.join(self.run_dir, "metrics.csv"), rows)
            checkpoint.save_pytree(last_path, state)
            _log_epoch(self.run_dir, row, progress_bar)
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{train_loss:.4g}", valid_F_mae=f"{row['valid_forces_mae']:.4g}"
                                     if row["valid_forces_mae"] != "" else "", lr=f"{lr:.2g}")
            if out_of_time:
                stop_reason = "max_time"
                break
        progress_bar.close()
        summary = self.finish(state, stop_reason)
        return summary

    def _start_nll(self, state: dict, rows: list) -> None:
        """MVE: set the variance offset so σ starts at the last validation error (METHODS.md §4.3).

        Before the first validation there is no error estimate and the initial variance stays.
        """
        if self.config.uncertainty.method != "mve" or not rows:
            return
        from mlip.heads.uncertainty import reset_variance_offset

        last = rows[-1]
        if last.get("valid_forces_rmse") in ("", None) or last.get("valid_energy_rmse_per_atom") in ("", None):
            return
        scale2 = self.statistics.scale**2
        mean_atoms = float(np.mean([s.n_atoms for s in self.train_samples]))
        # σ_E² = Σ_i s_i ≈ N s, and σ_E ≈ N · RMSE per atom: s = N · RMSE²_per_atom (normalised units).
        energy_variance = mean_atoms * float(last["valid_energy_rmse_per_atom"]) ** 2 / scale2
        forces_variance = float(last["valid_forces_rmse"]) ** 2 / scale2
        for key in ("params", "ema_params"):
            if state[key] is not None:
                state[key] = reset_variance_offset(state[key], energy_variance, forces_variance)

    def _progress(self, state: dict, start_time: float) -> float:
        training = self.config.training
        steps_per_epoch = len(self.train_batches)
        progress = state["step"] / (steps_per_epoch * training.max_epochs)
        if training.max_time is not None:
            progress = max(progress, (time.monotonic() - start_time) / training.max_time)
        return min(progress, 1.0)

    def _validate(self, state: dict, train_loss: float, lr: float, progress: float) -> dict:
        params = state["ema_params"] if state["ema_params"] is not None else state["params"]
        predictions = self.predictor.predict(params, self.valid_samples, self.config.training.eval_batch_size)
        metrics = compute_metrics(self.valid_samples, predictions)
        weights = self.loss_weights(progress)
        valid_loss = loss_from_metrics(metrics, weights)
        if self._nll_phase(progress):
            valid_loss += self._validation_nll(predictions, weights)
        stage = self._loss_stage(progress)
        if stage != state["loss_stage"]:
            # New loss weights make earlier validation losses incomparable: restart the
            # best-model tracking (as MACE does when it enters its second stage).
            state["best_valid_loss"] = float("inf")
        state["loss_stage"] = stage
        if valid_loss < state["best_valid_loss"]:
            state["best_valid_loss"], state["best_epoch"] = valid_loss, state["epoch"]
            checkpoint.save_pytree(os.path.join(self.run_dir, "best.msgpack"), params)
        schedule = self.config.training.schedule
        if schedule.name == "plateau":
            if valid_loss < state["plateau_best"]:
                state["plateau_best"], state["plateau_bad_epochs"] = valid_loss, 0
            else:
                state["plateau_bad_epochs"] += 1
                if state["plateau_bad_epochs"] > schedule.plateau_patience:
                    state["plateau_factor"] *= schedule.plateau_factor
                    state["plateau_bad_epochs"] = 0
        row = {"epoch": state["epoch"], "step": state["step"], "time_s": round(state["elapsed"], 2),
               "learning_rate": lr, "train_loss": train_loss, "valid_loss": valid_loss,
               **{f"valid_{name}": metrics.get(name, "") for name in
                  ("energy_mae_per_atom", "energy_rmse_per_atom", "forces_mae", "forces_rmse", "stress_mae")}}
        if self.old_valid_samples:
            old = self._old_task_metrics(params)
            row.update({f"old_valid_{name}": old.get(name, "") for name in ("energy_mae_per_atom", "forces_mae")})
        return row

    def _old_task_metrics(self, params) -> dict:
        """Errors on the source run's validation frames (fine-tuning's old task)."""
        predictions = self.predictor.predict(params, self.old_valid_samples, self.config.training.eval_batch_size)
        return compute_metrics(self.old_valid_samples, predictions)

    def _validation_nll(self, predictions: list, weights: dict) -> float:
        """The NLL terms of the training loss on the validation set (β = 0, i.e. the plain NLL)."""
        terms = 0.0
        energy_errors, force_errors, force_sigma = [], [], []
        for sample, prediction in zip(self.valid_samples, predictions):
            frame = sample.frame
            if frame.energy is not None:
                energy_errors.append((prediction["energy"] - frame.energy, prediction["energy_std"], frame.n_atoms))
            if frame.forces is not None:
                force_errors.append((prediction["forces"] - frame.forces).reshape(-1))
                force_sigma.append(prediction["forces_std"].reshape(-1))
        from mlip.uq.calibration import SIGMA_FLOOR

        if energy_errors and weights.get("energy_nll"):
            error, sigma, n_atoms = (np.asarray(column, np.float64) for column in zip(*energy_errors))
            sigma = np.maximum(sigma, SIGMA_FLOOR)
            terms += weights["energy_nll"] * float(np.mean((np.log(sigma**2) + (error / sigma) ** 2) / (2 * n_atoms)))
        if force_errors and weights.get("forces_nll"):
            error, sigma = np.concatenate(force_errors), np.maximum(np.concatenate(force_sigma), SIGMA_FLOOR)
            terms += weights["forces_nll"] * float(np.mean(0.5 * (np.log(sigma**2) + (error / sigma) ** 2)))
        return terms

    def finish(self, state: dict, stop_reason: str) -> dict:
        """Plots, test-set evaluation and a summary after the last epoch."""
        summary = {"run_dir": self.run_dir, "epochs": state["epoch"], "steps": state["step"],
                   "elapsed_s": round(state["elapsed"], 1), "stop_reason": stop_reason,
                   "best_epoch": state["best_epoch"], "best_valid_loss": state["best_valid_loss"]}
        best_params = checkpoint.load_pytree(os.path.join(self.run_dir, "best.msgpack"), state["params"])
        # SWAG, Laplace, SG-MCMC, IVON: the posterior drawn now predicts from here on.
        posterior = self.hooks.posterior(state, best_params)
        if posterior is not None:
            best_params = self._store_posterior(posterior)
            summary["posterior"] = {"samples": sample_count(best_params), **posterior.details}
        has_uncertainty = bool(self.members) or posterior is not None
        valid_predictions = self.predictor.predict(best_params, self.valid_samples,
                                                   self.config.training.eval_batch_size)
        summary["valid"] = compute_metrics(self.valid_samples, valid_predictions)
        summary["valid"].update(metrics_by_fidelity(self.valid_samples, valid_predictions,
                                                    self.config.model.fidelity_names))
        if self.old_valid_samples:  # fine-tuning: the old task's errors before and after
            summary["old_task_valid"] = {
                "before": checkpoint.read_json(os.path.join(self.run_dir, OLD_TASK_BEFORE)),
                "after": compute_metrics(self.old_valid_samples, self.predictor.predict(
                    best_params, self.old_valid_samples, self.config.training.eval_batch_size))}
        predictor = self.predictor
        if has_uncertainty:
            if self.config.uncertainty.recalibrate:
                recalibration = fit_recalibration(self.valid_samples, valid_predictions)
                before = uncertainty_metrics(self.valid_samples, valid_predictions)
                valid_predictions = recalibrate_predictions(valid_predictions, recalibration)
                # Intervals ±Q(c)·σ whose coverage is calibrated whatever the error shape.
                interval_quantiles = fit_interval_recalibration(self.valid_samples, valid_predictions)
                checkpoint.write_recalibration(self.run_dir, recalibration, {
                    "method": "variance_scaling", "fitted_on": "validation", "checkpoint": "best",
                    "n_frames": len(self.valid_samples),
                    "valid_nll_before": {k: v for k, v in before.items() if k.endswith("_nll")},
                    "interval_quantiles": interval_quantiles})
                summary["recalibration"] = recalibration.to_json()
                predictor = Predictor(self.model.with_recalibration(recalibration), predictor.compute_stress,
                                      predictor.layout)
            summary["valid"].update(uncertainty_metrics(self.valid_samples, valid_predictions))
        if self.config.data.test:
            # Untagged test frames of a multi-fidelity model are at its default (last) fidelity.
            test_frames = read_data(self.config, self.config.data.test,
                                    default_fidelity=max(len(self.config.model.fidelity_names) - 1, 0))
            check_elements(test_frames, self.statistics.atomic_numbers, "test")
            test_samples = build_samples(test_frames, self.potential.cutoff, self.potential.k_cutoff,
                                         self.potential.molecules_only)
            if not predictor.compute_stress and any(s.frame.is_periodic for s in test_samples):
                predictor = Predictor(predictor.potential, compute_stress=True, layout=predictor.layout)
            test_predictions = predictor.predict(best_params, test_samples,
                                                 self.config.training.eval_batch_size)
            summary["test"] = compute_metrics(test_samples, test_predictions)
            summary["test"].update(metrics_by_fidelity(test_samples, test_predictions, self.config.model.fidelity_names))
            if has_uncertainty:
                summary["test"].update(uncertainty_metrics(test_samples, test_predictions,
                                                           checkpoint.read_interval_quantiles(self.run_dir)))
        if self.config.training.plots:
            plot_learning_curve(os.path.join(self.run_dir, "metrics.csv"),
                                os.path.join(self.run_dir, "learning_curve.png"))
            parity_plot(self.valid_samples, valid_predictions,
                        os.path.join(self.run_dir, "parity_valid.png"), "validation set, best model")
        checkpoint.write_json(os.path.join(self.run_dir, "summary.json"), summary)
        return summary


    def _store_posterior(self, posterior) -> object:
        """Write the posterior samples and a model.json that loads them; predict with them from now on."""
        model_config = posterior.model_config or self.config.model
        potential = Potential(model_config, self.statistics)
        settings = self.config.uncertainty
        self.model = PosteriorPotential(potential, method=settings.method, ddof=posterior.ddof,
                                        parallel_samples=getattr(settings, "parallel_samples", None))
        self.predictor = Predictor(self.model, self.predictor.compute_stress, self.predictor.layout)
        checkpoint.save_pytree(os.path.join(self.run_dir, checkpoint.POSTERIOR_FILE), posterior.params)
        uncertainty = {"method": settings.method, "members": sample_count(posterior.params),
                       "ddof": posterior.ddof, "posterior_file": checkpoint.POSTERIOR_FILE, **posterior.details}
        checkpoint.write_json(os.path.join(self.run_dir, "model.json"),
                              checkpoint.model_metadata(potential, uncertainty))
        return posterior.params


def train(config: RunConfig, resume: bool = False) -> dict:
    return Trainer(config).run(resume=resume)


def _python_scalars(state: dict) -> dict:
    for key in ("epoch", "step", "best_epoch", "plateau_bad_epochs", "loss_stage"):
        state[key] = int(state[key])
    for key in ("elapsed", "best_valid_loss", "plateau_factor", "plateau_best"):
        state[key] = float(state[key])
    return state


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    # disable=None: tqdm switches itself off when output is not a terminal (CI, logs).
    return tqdm(total=total, initial=initial, desc="epochs", unit="epoch",
                disable=None if enabled else True, dynamic_ncols=True)


def _log_epoch(run_dir: str, row: dict, progress_bar) -> None:
    """Append one line per epoch to train.log; echo it to stderr when no progress bar shows."""
    def fmt(value, scale=1000.0, digits=1):
        return "-" if value in ("", None) else f"{scale * float(value):.{digits}f}"

    line = (f"epoch {row['epoch']:>4}  {row['time_s']:>8.1f} s  lr {row['learning_rate']:.2e}  "
            f"train loss {row['train_loss']:.4g}  valid loss {row['valid_loss']:.4g}  "
            f"E MAE {fmt(row['valid_energy_mae_per_atom'], digits=2)} meV/atom  "
            f"F MAE {fmt(row['valid_forces_mae'])} meV/Å")
    with open(os.path.join(run_dir, "train.log"), "a") as stream:
        stream.write(line + "\n")
    if progress_bar.disable:
        print(line, file=sys.stderr, flush=True)


def _write_metrics(path: str, rows: list) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.atomic_write_text(path, buffer.getvalue())


def _read_metrics(path: str, up_to_epoch: int) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as stream:
        rows = [row for row in csv.DictReader(stream) if int(row["epoch"]) <= up_to_epoch]
    return rows


def plot_learning_curve(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    losses = [float(r[column]) for r in rows for column in ("train_loss", "valid_loss")]
    # NLL losses (mve, shallow_ensemble) can be negative: a log axis cannot show them.
    plot_loss = axes[0].semilogy if min(losses) > 0 else axes[0].plot
    plot_loss(epochs, [float(r["train_loss"]) for r in rows], label="train")
    plot_loss(epochs, [float(r["valid_loss"]) for r in rows], label="valid")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    for column, label in (("valid_forces_mae", "force MAE (eV/Å)"),
                          ("valid_energy_mae_per_atom", "energy MAE (eV/atom)")):
        values = [float(r[column]) for r in rows if r[column] not in ("", None)]
        if values:
            axes[1].semilogy(epochs[:len(values)], values, label=label)
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation")
    axes[1].legend()
    checkpoint.save_figure(figure, png_path)
