"""The YAML schema: defaults, overrides, and errors that name the file and key."""

import pytest

from mlip.cli import main
from mlip.errors import ConfigError
from mlip.training.config import load_config


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_minimal_config_gets_every_default(tmp_path):
    config = load_config(write(tmp_path, "data: {train: a.xyz}\n"))
    assert config.model.backbone.name == "mace" and config.model.backbone.correlation == 3
    assert config.training.max_epochs == 100 and config.loss.forces_weight == 100.0


def test_overrides_are_typed_and_nested(tmp_path):
    path = write(tmp_path, "data: {train: a.xyz}\n")
    config = load_config(path, ["training.max_time=60", "model.backbone.num_channels=16",
                                "data.valid=b.xyz@-5:", "training.ema_decay=null"])
    assert config.training.max_time == 60.0 and config.model.backbone.num_channels == 16
    assert config.data.valid == "b.xyz@-5:" and config.training.ema_decay is None


@pytest.mark.parametrize("text, message", [
    ("data: {train: a.xyz}\ntraining: {max_epoch: 5}\n", r"run\.yaml: training\.max_epoch: unknown key"),
    ("data: {train: a.xyz}\nmodel: {backbone: {correlation: 9}}\n", r"model\.backbone\.mace\.correlation"),
    ("training: {max_epochs: 5}\n", r"data: required key is missing"),
    ("data: {train: a.xyz}\nmodel: {backbone: {name: nequip}}\n", r"model\.backbone.*'nequip'"),
    ("data: {train: a.xyz@-5:}\n", r"must be quoted"),
    ("- just\n- a list\n", r"top level must be a mapping"),
])
def test_bad_configs_name_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_bad_override_and_missing_file(tmp_path):
    path = write(tmp_path, "data: {train: a.xyz}\n")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(path, ["training.max_epochs"])
    with pytest.raises(ConfigError, match="training.max_epochs"):
        load_config(path, ["training.max_epochs=-3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_cli_validate_prints_clean_errors(tmp_path, capsys):
    good = write(tmp_path, "data: {train: a.xyz}\n")
    assert main(["validate", good]) == 0
    bad = write(tmp_path, "data: {train: a.xyz}\nlos: {}\n", "bad.yaml")
    assert main(["validate", bad]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: los: unknown key" in err and "Traceback" not in err
