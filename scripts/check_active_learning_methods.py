"""Does `mlip active-learn` run with every uncertainty method, backbone and long-range term?

    python scripts/check_active_learning_methods.py [CASE ...]      # all cases: about 25 minutes on 2 cores

Each case runs the loop of tests/test_active_learning.py (EMT copper, a tiny MACE, 2 epochs) for one
iteration and the training on its labels (a fine-tune from iteration 0's model): training, MD
exploration with σ checks, selection, labelling in worker processes, fine-tuning. Too slow for the
test suite (a few minutes per case); the suite covers deep ensembles end to end and each piece
alone. Prints one line per case, OK with its seconds or FAIL with the error, and exits 1 on a FAIL.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time
import traceback

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the AL tests' config and their counting EMT oracle

DEEP = {"method": "deep_ensemble", "members": 2}
# name: (uncertainty, model changes, active-learning config changes)
CASES = {
    "deep_ensemble": (DEEP, {}, {}),
    "shallow_ensemble": ({"method": "shallow_ensemble"}, {"head": {"members": 3}}, {}),
    # One Gaussian: no energy spread to bias the MD with (refused up front with the bias on).
    "mve": ({"method": "mve"}, {}, {"exploration": {"uncertainty_bias": 0.0}}),
    # Two epochs per run: collect from half-way, so that each run collects twice.
    "swag": ({"method": "swag", "start_fraction": 0.5}, {}, {"finetune_epochs": 2}),
    "laplace": ({"method": "laplace", "samples": 4}, {}, {}),
    "ivon": ({"method": "ivon"}, {}, {}),
    "sgmcmc": ({"method": "sgmcmc", "chains": 2}, {}, {}),
    "transformer": (DEEP, {"backbone": {"name": "transformer", "r_max": 3.0, "num_channels": 8}}, {}),
    "all_to_all": (DEEP, {"all_to_all": {"num_layers": 1, "num_heads": 2, "head_dim": 4}}, {}),
    "les": (DEEP, {"long_range": {"name": "les"}}, {}),
    "ewald_message_passing": (DEEP, {"backbone": {"ewald_message_passing": {"k_cutoff": 1.2}}}, {}),
}


def run_case(name: str, folder: pathlib.Path) -> None:
    from test_active_learning import al_config

    from mlip.active import ActiveLearner

    uncertainty, model_changes, changes = CASES[name]
    path, config = al_config(folder)
    model = config["training"]["model"]
    config["training"]["uncertainty"] = uncertainty
    for key, value in model_changes.items():
        if key == "backbone" and "name" not in value:  # a key of the tiny MACE backbone
            model["backbone"] = {**model["backbone"], **value}
        else:
            model[key] = value
    config["budget"] = {"max_labels": 3, "max_iterations": 1}
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    pathlib.Path(path).write_text(yaml.safe_dump(config))
    ActiveLearner.from_file(path).run()


def main(argv=None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {list(CASES)}")
    failed = 0
    for name in names:
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"al_{name}_") as folder:
            try:
                run_case(name, pathlib.Path(folder))
                print(f"OK   {name}  {time.monotonic() - start:.0f} s", flush=True)
            except Exception as error:
                failed += 1
                print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
                traceback.print_exc(limit=4)
    return 1 if failed else 0


if __name__ == "__main__":  # the oracle's worker processes import this module: run only here
    sys.exit(main())
