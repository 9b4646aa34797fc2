"""The `mlip` command line: train, evaluate, md, validate.

Heavy modules (JAX, flax) are imported inside the commands so ``mlip --help`` is
instant. Errors a user can cause print one line naming the file and key, and exit
with status 2; they never show a JAX stack trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from mlip.errors import MLIPError


def _enable_precision(dtype: str) -> None:
    # x64 is switched on only at entry points, never when a library module is imported.
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)


def _compilation_cache() -> None:
    """Reuse compiled XLA programs across runs (first run compiles, later runs load)."""
    from mlip.compilation_cache import enable_compilation_cache

    enable_compilation_cache()


def command_train(args) -> int:
    from mlip.training.config import load_config

    if args.resume:
        config_path = os.path.join(args.resume, "config.yaml")
        if not os.path.exists(config_path):
            raise MLIPError(f"{args.resume}: no config.yaml; is this a run directory of `mlip train`?")
        config = load_config(config_path, args.set or ())
        if os.path.abspath(config.run_dir) != os.path.abspath(args.resume):
            config = config.model_copy(update={"run_dir": args.resume})
    else:
        if not args.config:
            raise MLIPError("mlip train: give a CONFIG.yaml or --resume RUN_DIR")
        config = load_config(args.config, args.set or ())
    _enable_precision(config.model.dtype)
    _compilation_cache()
    from mlip.training.trainer import train

    summary = train(config, resume=bool(args.resume))
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    print(f"run: {summary['run_dir']}  epochs: {summary['epochs']}  time: {summary['elapsed_s']} s "
          f"(stopped by {summary['stop_reason']}), best epoch {summary['best_epoch']}")
    for split in ("valid", "test"):
        if split in summary:
            print(f"{split:>5}: " + _format_metrics(summary[split]))


def _format_metrics(metrics: dict) -> str:
    parts = [f"{metrics['n_frames']} frames"]
    if "energy_mae_per_atom" in metrics:
        parts.append(f"E MAE {1000 * metrics['energy_mae_per_atom']:.2f} meV/atom")
    if "forces_mae" in metrics:
        parts.append(f"F MAE {1000 * metrics['forces_mae']:.1f} meV/Å (RMSE {1000 * metrics['forces_rmse']:.1f})")
    if "stress_mae" in metrics:
        parts.append(f"stress MAE {1000 * metrics['stress_mae']:.2f} meV/Å³")
    return ", ".join(parts)


def command_evaluate(args) -> int:
    from mlip.training.checkpoint import read_model_json

    metadata = read_model_json(args.run_dir)
    _enable_precision(metadata["model"].get("dtype", "float32"))
    _compilation_cache()
    from mlip.data.batching import build_samples
    from mlip.data.reader import assign_fidelities, read_frames
    from mlip.training.checkpoint import atomic_write_text, load_potential
    from mlip.training.config import load_config
    from mlip.training.evaluation import Predictor, compute_metrics, metrics_by_fidelity, parity_plot
    from mlip.training.trainer import check_elements, label_keys

    # Multi-fidelity: --fidelity predicts every frame at that level; otherwise each frame at its
    # own tag (data.fidelity_key), untagged ones at the model's default.
    potential, params = load_potential(args.run_dir, args.which, args.rotation_average, args.fidelity,
                                       per_frame_fidelity=True)
    config = load_config(os.path.join(args.run_dir, "config.yaml"))
    keys = label_keys(config)
    # The evaluated file may name its labels differently from the training data.
    keys = dataclasses.replace(keys, **{name: getattr(args, f"{name}_key") for name in ("energy", "forces", "stress")
                                        if getattr(args, f"{name}_key") is not None})
    frames = read_frames(args.data, keys)
    names = potential.config.fidelity_names
    assign_fidelities(frames, names, args.fidelity, potential.fidelity_index(None), keys.fidelity)
    check_elements(frames, potential.statistics.atomic_numbers, "evaluated")
    samples = build_samples(frames, potential.cutoff, potential.k_cutoff, potential.molecules_only)
    predictor = Predictor(potential, compute_stress=any(s.frame.is_periodic for s in samples))
    predictions = predictor.predict(params, samples, args.batch_size)
    metrics = compute_metrics(samples, predictions)
    metrics.update(metrics_by_fidelity(samples, predictions, names))
    if names:
        metrics["fidelity"] = args.fidelity or "per frame (untagged: " + names[-1] + ")"
    metrics["data"] = args.data
    metrics["run_dir"] = args.run_dir
    from mlip.uq import has_uncertainty

    uncertain = has_uncertainty(potential)
    if uncertain:
        from mlip.uq.evaluation import uncertainty_metrics

        metrics["uncertainty_method"] = potential.method
        metrics["posterior_samples"] = potential.prediction_count(params)  # shallow ensemble: its K readouts
        from mlip.training.checkpoint import read_interval_quantiles

        metrics.update(uncertainty_metrics(samples, predictions, read_interval_quantiles(args.run_dir)))
    rows = [("frames", str(metrics["n_frames"]))]
    if names:
        rows.append(("fidelity", metrics["fidelity"]))
    rows += _error_rows(metrics)
    for name, part in metrics.get("by_fidelity", {}).items():
        rows += [(f"[{name}] {label}", value) for label, value in
                 [("frames", str(part["n_frames"]))] + _error_rows(part)]
    if uncertain:
        rows += _uncertainty_rows(metrics)
    width = max(len(label) for label, _ in rows)
    print(f"{args.data} with {args.run_dir}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
        if uncertain:
            from mlip.uq.evaluation import per_frame_csv

            atomic_write_text(os.path.splitext(args.json)[0] + "_uncertainty.csv", per_frame_csv(samples, predictions))
    plot_path = args.plot or (os.path.splitext(args.json)[0] + "_parity.png" if args.json else None)
    if plot_path:
        parity_plot(samples, predictions, plot_path, f"{args.data}")
        if uncertain:
            from mlip.uq.evaluation import calibration_plot

            stem = os.path.splitext(args.plot)[0] if args.plot else os.path.splitext(args.json)[0]
            calibration_plot(samples, predictions, stem + "_calibration.png", f"{args.data}")
    return 0


def _error_rows(metrics: dict) -> list:
    rows = []
    for key, label, factor, unit in (("energy_mae_per_atom", "energy MAE", 1000, "meV/atom"),
                                     ("energy_rmse_per_atom", "energy RMSE", 1000, "meV/atom"),
                                     ("forces_mae", "forces MAE", 1000, "meV/Å"),
                                     ("forces_rmse", "forces RMSE", 1000, "meV/Å"),
                                     ("stress_mae", "stress MAE", 1000, "meV/Å³"),
                                     ("stress_rmse", "stress RMSE", 1000, "meV/Å³")):
        if key in metrics:
            rows.append((label, f"{factor * metrics[key]:.3f} {unit}"))
    return rows


def _uncertainty_rows(metrics: dict) -> list:
    """Printed rows of `mlip evaluate` for a model with uncertainty."""
    rows = [("uncertainty", f"{metrics['uncertainty_method']}, {metrics['posterior_samples']} samples")]
    for name, unit in (("energy", "eV"), ("forces", "eV/Å"), ("stress", "eV/Å³")):
        if f"{name}_nll" not in metrics:
            continue
        spearman = metrics[f"{name}_spearman"]
        rows.append((f"{name} σ", f"NLL {metrics[f'{name}_nll']:.3f}, "
                     f"miscalibration area {metrics[f'{name}_miscalibration_area']:.3f}, "
                     f"ENCE {metrics[f'{name}_ence']:.3f}, 95 % coverage {metrics[f'{name}_coverage_95']:.3f}, "
                     f"Spearman {'-' if spearman is None else f'{spearman:.3f}'}, "
                     f"RMV {metrics[f'{name}_rmv']:.3g} {unit}"))
        if f"{name}_interval_miscalibration_area" in metrics:
            rows.append((f"{name} intervals", "isotonically recalibrated: miscalibration area "
                         f"{metrics[f'{name}_interval_miscalibration_area']:.3f}, 95 % coverage "
                         f"{metrics[f'{name}_interval_coverage_95']:.3f}"))
    return rows


def command_md(args) -> int:
    from mlip.training.checkpoint import read_model_json

    metadata = read_model_json(args.run_dir)
    _enable_precision(metadata["model"].get("dtype", "float32"))
    _compilation_cache()
    from mlip.md.runner import read_structure, run_md
    from mlip.training.checkpoint import load_potential

    potential, params = load_potential(args.run_dir, args.which, args.rotation_average, args.fidelity)
    atoms = read_structure(args.structure)
    if args.uncertainty_bias < 0:
        raise MLIPError(f"--uncertainty-bias must be >= 0 (got {args.uncertainty_bias})")
    if args.uncertainty_bias:
        from mlip.uq.bias import UncertaintyBiasedPotential, fit_member_offsets

        reference = _bias_reference(args)
        offsets = fit_member_offsets(potential, params, reference)
        potential = UncertaintyBiasedPotential(potential, args.uncertainty_bias, offsets)
        print(f"md: moving on E - {args.uncertainty_bias:g} sigma_E (members' offsets fitted on "
              f"{len(reference)} reference structures); for finding structures to label, not for observables")
    summary = run_md(potential, params, atoms, trajectory=args.trajectory, steps=args.steps,
                     interval=args.interval, progress_bar=not args.no_progress, ensemble=args.ensemble,
                     timestep_fs=args.timestep, temperature_K=args.temperature, pressure_GPa=args.pressure,
                     friction_per_fs=args.friction, tdamp_fs=args.tdamp, pdamp_fs=args.pdamp, skin=args.skin,
                     block_steps=args.block_steps, seed=args.seed, max_temperature_K=args.max_temperature)
    line = f"md: {summary['steps']} steps of {summary['ensemble']} ({summary['stop_reason']})"
    if "steps_per_second" in summary:
        line += (f", {summary['steps_per_second']:.1f} steps/s "
                 f"({summary['microseconds_per_atom_step']:.2f} µs/atom/step)")
    if "conserved_energy_drift_eV_per_atom_per_ps" in summary:
        line += f", conserved-energy drift {summary['conserved_energy_drift_eV_per_atom_per_ps']:.2e} eV/atom/ps"
    print(line)
    print(f"trajectory: {summary['trajectory']}  log: {summary['log']}")
    return 0


# Structures enough to fix one energy offset per member and element (`fit_member_offsets`).
_BIAS_REFERENCE_STRUCTURES = 200


def _bias_reference(args) -> list:
    """The structures the members' energy offsets are fitted on: ``--bias-reference``, or the run's training data."""
    from mlip.data.reader import evenly_strided, read_atoms

    if args.bias_reference:
        structures = read_atoms(args.bias_reference, at_most=_BIAS_REFERENCE_STRUCTURES)
    else:
        import yaml

        from mlip.training.config import source_list

        config_path = os.path.join(args.run_dir, "config.yaml")
        try:
            with open(config_path) as stream:
                train = (yaml.safe_load(stream).get("data") or {}).get("train")
            structures = [atoms for entry in source_list(train)
                          for atoms in read_atoms(entry.source, at_most=_BIAS_REFERENCE_STRUCTURES)]
        except (OSError, yaml.YAMLError, ValueError, MLIPError) as error:
            raise MLIPError(f"{config_path}: cannot read the run's training data for the uncertainty bias "
                            f"({error}); give --bias-reference DATA (structures like the training data, "
                            "labels not needed)") from error
        if not structures:
            raise MLIPError(f"{config_path}: names no training data; give --bias-reference DATA")
    return evenly_strided(structures, _BIAS_REFERENCE_STRUCTURES)


def command_active_learn(args) -> int:
    _compilation_cache()
    from mlip.active.learner import ActiveLearner

    if args.resume:
        learner = ActiveLearner.resume(args.resume, args.set or ())
    elif args.config:
        learner = ActiveLearner.from_file(args.config, args.set or ())
        if os.path.exists(os.path.join(learner.dir, "state.json")):
            raise MLIPError(f"{learner.dir}: already holds an active-learning run; continue it with "
                            f"`mlip active-learn --resume {learner.dir}` or choose another al_dir")
    else:
        raise MLIPError("mlip active-learn: give a CONFIG.yaml or --resume AL_DIR")
    _enable_precision(learner.run_config(0).get("model", {}).get("dtype", "float32"))
    state = learner.run()
    print(f"active learning: {state['stop_reason']}; report: {os.path.join(learner.dir, 'report.csv')}")
    return 0


def command_validate(args) -> int:
    from mlip.training.config import load_config

    import yaml

    tree = None
    try:
        with open(args.config) as stream:
            tree = yaml.safe_load(stream)
    except (OSError, yaml.YAMLError):
        pass  # load_config says what is wrong
    if isinstance(tree, dict) and "oracle" in tree:  # an active-learning config
        from mlip.active.config import load_active_learning_config

        config = load_active_learning_config(args.config, args.set or ())
    else:
        config = load_config(args.config, args.set or ())
    print(f"{args.config}: valid")
    if args.show:
        import yaml
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mlip import __version__

    parser = argparse.ArgumentParser(prog="mlip", description="Machine-learned interatomic potentials on JAX.")
    parser.add_argument("--version", action="version", version=f"mlip {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", nargs="?", help="YAML run config")
    train.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                       help="override a config value (repeatable), e.g. --set training.max_epochs=5")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    train.set_defaults(handler=command_train)

    evaluate = commands.add_parser("evaluate", help="errors of a trained model on a data set")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("data", help="data source, path@index (ASE index, e.g. test.xyz@-100:)")
    evaluate.add_argument("--json", help="write the metrics to this JSON file (and, for a model with "
                          "uncertainty, per-frame σ to FILE_uncertainty.csv)")
    evaluate.add_argument("--plot", help="parity plot PNG (default: beside --json); with uncertainty also "
                          "a calibration plot PLOT_calibration.png")
    evaluate.add_argument("--which", choices=["best", "last"], default="best")
    for name in ("energy", "forces", "stress"):
        evaluate.add_argument(f"--{name}-key", default=None, metavar="KEY",
                              help=f"label key of the {name} in DATA (default: the training run's data.{name}_key)")
    evaluate.add_argument("--fidelity", default=None, metavar="NAME",
                          help="multi-fidelity model: predict every frame at this level of theory (default: each "
                               "frame at its own tag, untagged frames at the model's default, the last listed)")
    evaluate.add_argument("--rotation-average", type=int, default=None, metavar="K",
                          help="transip models: average over K fixed rotations (closer to invariant, K× the cost)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.set_defaults(handler=command_evaluate)

    from mlip.md.integrators import ENSEMBLES

    md = commands.add_parser("md", help="molecular dynamics with a trained model, on the device")
    md.add_argument("run_dir")
    md.add_argument("--structure", required=True, help="starting structure, path or path@index (default: last frame)")
    md.add_argument("--ensemble", choices=ENSEMBLES, default="nve",
                    help="npt: isotropic MTK barostat; npt-aniso: full-cell MTK barostat")
    md.add_argument("--temperature", type=float, help="K: thermostat target, and initial velocities if the "
                                                      "structure has none")
    md.add_argument("--pressure", type=float, default=0.0, help="GPa (npt, npt-aniso)")
    md.add_argument("--timestep", type=float, default=0.5, help="fs")
    md.add_argument("--steps", type=int, required=True)
    md.add_argument("--trajectory", default="md.extxyz",
                    help="extxyz output; the log and summary go beside it (<stem>.log, <stem>_summary.json)")
    md.add_argument("--interval", type=int, default=100, help="steps between trajectory frames and log lines")
    md.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    md.add_argument("--tdamp", type=float, help="Nosé–Hoover time constant, fs (default 100 time steps)")
    md.add_argument("--pdamp", type=float, help="barostat time constant, fs (default 1000 time steps)")
    md.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin, Å")
    md.add_argument("--block-steps", type=int, default=50, help="steps per compiled block on the device")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--max-temperature", type=float, help="stop above this temperature, K "
                                                          "(default 5 x max(T, 300 K))")
    md.add_argument("--which", choices=["best", "last"], default="best")
    md.add_argument("--fidelity", default=None, metavar="NAME",
                    help="multi-fidelity model: the level of theory to run at (default: the last listed)")
    md.add_argument("--rotation-average", type=int, default=None, metavar="K",
                    help="transip models: average over K fixed rotations (closer to invariant, K× the cost)")
    md.add_argument("--uncertainty-bias", type=float, default=0.0, metavar="TAU",
                    help="move on E - TAU*sigma_E, drawn to structures the model does not know (a model with "
                         "uncertainty: an ensemble or a posterior; hyperactive learning): for finding structures to "
                         "label, never for observables (default 0: plain MD)")
    md.add_argument("--bias-reference", metavar="DATA",
                    help="structures like the training data (path@index, no labels needed) on which each member's "
                         "energy offset is taken off before sigma_E (default: the run's training data)")
    md.add_argument("--no-progress", action="store_true", help="no progress bar")
    md.set_defaults(handler=command_md)

    active = commands.add_parser("active-learn", help="explore with MD, label uncertain structures, retrain")
    active.add_argument("config", nargs="?", help="YAML active-learning config")
    active.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a config value")
    active.add_argument("--resume", metavar="AL_DIR", help="continue a stopped run where it stopped (with "
                        "--set budget.max_labels=N: a run that spent its budget goes on)")
    active.set_defaults(handler=command_active_learn)

    validate = commands.add_parser("validate", help="check a config without running anything")
    validate.add_argument("config")
    validate.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")
    validate.add_argument("--show", action="store_true", help="print the resolved config with all defaults")
    validate.set_defaults(handler=command_validate)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except MLIPError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is saved; continue with `mlip train --resume RUN_DIR`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
