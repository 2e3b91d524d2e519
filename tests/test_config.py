"""CheckpointConfig: seed defaults, and every validation error naming field and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from artifex_ckpt import CheckpointConfig, ConfigError


def test_seed_defaults() -> None:
    config = CheckpointConfig()
    assert (
        config.dirpath,
        config.filename,
        config.monitor,
        config.mode,
        config.save_top_k,
        config.save_last,
        config.every_n_epochs,
        config.save_weights_only,
    ) == ("checkpoints", "model-{epoch:02d}-{val_loss:.4f}", "val_loss", "min", 3, True, 1, False)
    assert not hasattr(config, "__dict__"), "CheckpointConfig must use __slots__"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"mode": "best"}, ["mode", "'best'", "'min' or 'max'"]),
        ({"mode": None}, ["mode", "None"]),
        ({"save_top_k": -2}, ["save_top_k", "-2", "-1"]),
        ({"save_top_k": 1.5}, ["save_top_k", "1.5"]),
        ({"save_top_k": True}, ["save_top_k", "True"]),
        ({"every_n_epochs": 0}, ["every_n_epochs", "0", ">= 1"]),
        ({"every_n_epochs": "2"}, ["every_n_epochs", "'2'"]),
        ({"monitor": ""}, ["monitor", "''", "metric name"]),
        ({"monitor": "   "}, ["monitor"]),
        ({"save_last": "yes"}, ["save_last", "'yes'", "True or False"]),
        ({"save_weights_only": 1}, ["save_weights_only", "1"]),
        ({"filename": "model-{epoch"}, ["model-{epoch", "does not parse"]),
        ({"filename": "model-{val_loss:.4f}"}, ["no {epoch}", "share a name"]),
        ({"filename": "model-{epoch:.2f}"}, ["{epoch}", "'.2f'", "integer"]),
        ({"filename": "model-{epoch}-{val_loss:d}"}, ["{val_loss}", "'d'", "float"]),
        ({"filename": "model-{epoch:>4}"}, ["epoch", "read back", "'>4'"]),
        ({"filename": "{epoch}{val_loss}"}, ["touch", "separator"]),
        ({"filename": "model-{}-{epoch}"}, ["positional"]),
        ({"filename": "model-{epoch!r}"}, ["conversion"]),
        ({"filename": ""}, ["filename", "non-empty"]),
        ({"filename": None}, ["filename=None"]),
        ({"dirpath": ""}, ["dirpath", "''"]),
        ({"dirpath": 3}, ["dirpath", "3"]),
    ],
)
def test_bad_values_name_field_and_value(kwargs: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        CheckpointConfig(**kwargs)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_dirpath_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "not-a-dir"
    file.write_text("keep me")
    with pytest.raises(ConfigError, match="is an existing file"):
        CheckpointConfig(dirpath=file)
    assert file.read_text() == "keep me"


def test_config_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="mode"):
        CheckpointConfig(mode="avg")  # type: ignore[arg-type]
