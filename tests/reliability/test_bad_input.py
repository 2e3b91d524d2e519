"""Bad input of every kind: a clear error naming the culprit, and nothing on disk changes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from artifex_ckpt import (
    CheckpointConfig,
    CheckpointNotFoundError,
    ConfigError,
    EarlyStoppingConfig,
    MetricCheckpointManager,
    MetricError,
    ModelCheckpoint,
    ModelMismatchError,
    SettingsMismatchError,
    StepError,
    Trainer,
    WeightsOnlyError,
    load_checkpoint,
    save_checkpoint,
    setup_checkpoint_manager,
)
from tests.training import batches, make_trainer, mse_loss

TEMPLATE = "m-{epoch:02d}-{val_loss:.3f}"


class Case(NamedTuple):
    action: Callable[[Path], Any]
    error: type[BaseException]
    words: tuple[str, ...]


def _config(root: Path, **kwargs: Any) -> CheckpointConfig:
    return CheckpointConfig(dirpath=root / "run", filename=TEMPLATE, **kwargs)


def _manager(root: Path) -> MetricCheckpointManager:
    return MetricCheckpointManager(root / "run")


class _Unreadable:
    """A 0-d array-like whose value cannot be read (a deleted or non-addressable array)."""

    ndim = 0

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        raise RuntimeError("no device holds this value")


def _save(root: Path, step: int = 9, **metrics: Any) -> None:
    with _manager(root) as manager:
        args = ocp.args.StandardSave({"w": np.zeros(2, np.float32)})
        manager.save(step, args=args, metrics=metrics or {"val_loss": 0.1})


def _load(root: Path, step: Any, optimizer: bool = False, folder: str = "run") -> None:
    trainer = make_trainer(epochs=1, seed=5)
    with MetricCheckpointManager(root / folder) as manager:
        opt = trainer.optimizer if optimizer else None
        load_checkpoint(manager, trainer.model, step, optimizer=opt)


def _save_partial(directory: Path, template: str) -> None:
    with MetricCheckpointManager(directory, filename=template) as manager:
        manager.save(0, args=ocp.args.StandardSave({"w": np.zeros(2)}), partial="exception")


def _load_into_other_architecture(root: Path) -> None:
    other = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    with _manager(root) as manager:
        load_checkpoint(manager, other, 1)


def _fit(root: Path, config: CheckpointConfig, **fit: Any) -> None:
    make_trainer(epochs=3).fit(callbacks=[ModelCheckpoint(config)], **fit)


CASES: dict[str, Case] = {
    # config: every field
    "dirpath is a file": Case(
        lambda r: CheckpointConfig(dirpath=r / "a-file"), ConfigError, ("dirpath", "existing file")
    ),
    "dirpath empty": Case(lambda r: CheckpointConfig(dirpath=""), ConfigError, ("dirpath", "''")),
    "dirpath with NUL": Case(
        lambda r: CheckpointConfig(dirpath=f"{r}/run\0x"), ConfigError, ("NUL character",)
    ),
    "dirpath unknown scheme": Case(
        lambda r: CheckpointConfig(dirpath="weird://x"), ConfigError, ("'weird://'", "gs://")
    ),
    "dirpath URL without bucket": Case(
        lambda r: CheckpointConfig(dirpath="gs:///x"), ConfigError, ("names no bucket",)
    ),
    "filename None": Case(lambda r: CheckpointConfig(filename=None), ConfigError, ("filename",)),  # type: ignore[arg-type]
    "monitor empty": Case(lambda r: CheckpointConfig(monitor=""), ConfigError, ("monitor", "''")),
    "mode median": Case(
        lambda r: CheckpointConfig(mode="median"), ConfigError, ("mode", "'median'")
    ),  # type: ignore[arg-type]
    "save_top_k -5": Case(
        lambda r: CheckpointConfig(save_top_k=-5), ConfigError, ("save_top_k", "-5")
    ),
    "save_top_k str": Case(
        lambda r: CheckpointConfig(save_top_k="3"), ConfigError, ("save_top_k", "'3'")
    ),  # type: ignore[arg-type]
    "save_last None": Case(
        lambda r: CheckpointConfig(save_last=None), ConfigError, ("save_last", "None")
    ),  # type: ignore[arg-type]
    "every_n_epochs 0": Case(
        lambda r: CheckpointConfig(every_n_epochs=0), ConfigError, ("every_n_epochs", "0")
    ),
    "save_weights_only str": Case(
        lambda r: CheckpointConfig(save_weights_only="no"),
        ConfigError,
        ("save_weights_only", "'no'"),  # type: ignore[arg-type]
    ),
    # templates
    "template unknown placeholder": Case(
        lambda r: _fit(r, CheckpointConfig(dirpath=r / "new", filename="m-{epoch}-{fid:.2f}")),
        MetricError,
        ("'fid'", "missing", "val_loss"),
    ),
    "template bad spec": Case(
        lambda r: CheckpointConfig(filename="m-{epoch}-{val_loss:d}"),
        ConfigError,
        ("'d'", "val_loss"),
    ),
    "template no epoch": Case(
        lambda r: CheckpointConfig(filename="m-{val_loss:.2f}"), ConfigError, ("no {epoch}",)
    ),
    "template unbalanced": Case(
        lambda r: CheckpointConfig(filename="m-{epoch"), ConfigError, ("does not parse",)
    ),
    "template positional": Case(
        lambda r: CheckpointConfig(filename="m-{epoch}-{}"), ConfigError, ("positional",)
    ),
    "template placeholders touch": Case(
        lambda r: CheckpointConfig(filename="m-{epoch}{val_loss:.3f}"),
        ConfigError,
        ("touch", "separator"),
    ),
    "template with Orbax's suffix": Case(
        lambda r: CheckpointConfig(filename="m-{epoch}.orbax-checkpoint-tmp"),
        ConfigError,
        ("temporary suffix",),
    ),
    "template with a conversion": Case(
        lambda r: CheckpointConfig(filename="m-{epoch!r}"), ConfigError, ("conversion",)
    ),
    "template too long": Case(
        lambda r: CheckpointConfig(filename="x" * 250 + "-{epoch}"),
        ConfigError,
        ("255-byte limit",),
    ),
    "template too long with a partial suffix": Case(
        lambda r: _save_partial(r / "new", "x" * 219 + "-{epoch}-{val_loss:.3f}"),
        ConfigError,
        ("fit in 224 bytes", "orbax-checkpoint-tmp", "-preempted tag"),
    ),
    "template unreadable epoch": Case(
        lambda r: CheckpointConfig(filename="m-{epoch:>5}"), ConfigError, ("read back", "'>5'")
    ),
    # metrics
    "metric missing": Case(lambda r: _save(r, loss=0.1), MetricError, ("'val_loss'", "['loss']")),
    "metric string": Case(lambda r: _save(r, val_loss="low"), MetricError, ("'val_loss'", "'low'")),
    "metric array": Case(
        lambda r: _save(r, val_loss=np.ones(4)), MetricError, ("'val_loss'", "shape (4,)")
    ),
    "metric None": Case(lambda r: _save(r, val_loss=None), MetricError, ("'val_loss'", "None")),
    "metric bool array": Case(
        lambda r: _save(r, val_loss=np.asarray(True)), MetricError, ("'val_loss'", "real")
    ),
    "metric unreadable scalar": Case(
        lambda r: _save(r, val_loss=_Unreadable()), MetricError, ("'val_loss'", "no device")
    ),
    "metric in logs missing": Case(
        lambda r: _fit(r, CheckpointConfig(dirpath=r / "new", monitor="val_psnr")),
        MetricError,
        ("'val_psnr'", "val_loss"),
    ),
    # paths
    "path is a file": Case(
        lambda r: MetricCheckpointManager(r / "a-file"), ConfigError, ("existing file",)
    ),
    "path not writable": Case(
        lambda r: MetricCheckpointManager(r / "a-file" / "sub"), ConfigError, ("not writable",)
    ),
    # steps
    "step negative": Case(lambda r: _save(r, step=-1), StepError, ("step=-1", ">= 0")),
    "step not an int": Case(lambda r: _save(r, step="3"), StepError, ("step='3'",)),  # type: ignore[arg-type]
    "step already exists": Case(lambda r: _save(r, step=1), StepError, ("step 1", "not newer")),
    "step older than newest": Case(lambda r: _save(r, step=0), StepError, ("step 0", "not newer")),
    "fresh start on used dir": Case(
        lambda r: _fit(r, _config(r)), StepError, ("up to epoch 1", "resume=True")
    ),
    # restore
    "restore wrong step": Case(
        lambda r: _load(r, 7), CheckpointNotFoundError, ("step 7", "[0, 1]")
    ),
    "restore bad step spec": Case(lambda r: _load(r, "first"), ValueError, ("'first'", "'best'")),
    "restore wrong tree": Case(
        _load_into_other_architecture, ModelMismatchError, ("does not fit", "dense/kernel")
    ),
    "restore weights-only optimizer": Case(
        lambda r: _load(r, "latest", optimizer=True, folder="weights"),
        WeightsOnlyError,
        ("weights only",),
    ),
    "resume from weights-only": Case(
        lambda r: _fit(r, CheckpointConfig(dirpath=r / "weights", filename=TEMPLATE), resume=True),
        WeightsOnlyError,
        ("cannot resume", "weights"),
    ),
    "resume without callback": Case(
        lambda r: make_trainer(epochs=2).fit(callbacks=[], resume=True),
        ConfigError,
        ("resume=True", "ModelCheckpoint"),
    ),
    # managers
    "two templates one directory": Case(
        lambda r: MetricCheckpointManager(r / "run", filename="other-{epoch}"),
        SettingsMismatchError,
        ("other-{epoch}", TEMPLATE),
    ),
    "orbax retention option": Case(
        lambda r: MetricCheckpointManager(
            r / "run", options=ocp.CheckpointManagerOptions(max_to_keep=1)
        ),
        ConfigError,
        ("max_to_keep", "save_top_k"),
    ),
    "monitor changed on a used directory": Case(
        lambda r: MetricCheckpointManager(r / "run", monitor="val_accuracy"),
        SettingsMismatchError,
        ("monitor='val_accuracy'", "'val_loss'", "evict"),
    ),
    "read-only manager saves": Case(
        lambda r: MetricCheckpointManager(
            r / "run", options=ocp.CheckpointManagerOptions(read_only=True)
        ).save(5, args=ocp.args.StandardSave({"w": np.zeros(2)}), force=True),
        ConfigError,
        ("read-only",),
    ),
    "settings edited by hand": Case(
        lambda r: MetricCheckpointManager(r / "edited"), ConfigError, ("checksum", "edited")
    ),
    "settings edited by hand, reader": Case(
        lambda r: setup_checkpoint_manager(r / "edited", read_only=True),
        ConfigError,
        ("artifex_ckpt.json", "checksum"),
    ),
    "setup read_only not a bool": Case(
        lambda r: setup_checkpoint_manager(r / "run", read_only="yes"),  # type: ignore[arg-type]
        ConfigError,
        ("read_only='yes'", "None, True or False"),
    ),
    "setup read_only contradicts options": Case(
        lambda r: setup_checkpoint_manager(
            r / "run", read_only=False, options=ocp.CheckpointManagerOptions(read_only=True)
        ),
        ConfigError,
        ("read_only=False", "options.read_only=True"),
    ),
    "trash is a file": Case(
        lambda r: MetricCheckpointManager(r / "trash-file"), ConfigError, (".artifex-deleted",)
    ),
    "restore model without optimizer state": Case(
        lambda r: _load(r, "latest", optimizer=True, folder="no-optimizer"),
        ModelMismatchError,
        ("no optimizer state", "without optimizer="),
    ),
    "orbax option hiding metrics": Case(
        lambda r: MetricCheckpointManager(
            r / "run", options=ocp.CheckpointManagerOptions(lightweight_initialize=True)
        ),
        ConfigError,
        ("lightweight_initialize", "evicted"),
    ),
    "early stopping patience": Case(
        lambda r: EarlyStoppingConfig(patience=-1), ConfigError, ("patience", "-1")
    ),
    "trainer epochs": Case(
        lambda r: Trainer(
            nnx.Linear(4, 2, rngs=nnx.Rngs(0)), None, mse_loss, batches(1, 0), epochs=0
        ),  # type: ignore[arg-type]
        ConfigError,
        ("epochs", "0"),
    ),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of two epochs, a weights-only run, a plain file, a run with hand-edited
    settings, one with a file where the trash goes, and a checkpoint without optimizer."""
    base = tmp_path_factory.mktemp("prepared")
    make_trainer(epochs=2).fit(callbacks=[ModelCheckpoint(_config(base))])
    weights = CheckpointConfig(dirpath=base / "weights", filename=TEMPLATE, save_weights_only=True)
    make_trainer(epochs=2).fit(callbacks=[ModelCheckpoint(weights)])
    (base / "a-file").write_text("not a directory")
    # A hand edit that would flip the ranking (and evict the true best): min -> max.
    shutil.copytree(base / "run", base / "edited")
    settings = base / "edited" / "artifex_ckpt.json"
    settings.write_text(settings.read_text().replace('"min"', '"max"'))
    shutil.copytree(base / "run", base / "trash-file")
    (base / "trash-file" / ".artifex-deleted").write_text("a file in the trash's place")
    with MetricCheckpointManager(base / "no-optimizer", filename=TEMPLATE) as manager:
        save_checkpoint(manager, make_trainer(epochs=1).model, 0, metrics={"val_loss": 0.2})
    return base


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_there_are_at_least_fifty_cases() -> None:
    assert len(CASES) >= 50


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(prepared: Path, tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    shutil.copytree(prepared, root)
    before = _snapshot(root)
    case = CASES[name]
    with pytest.raises(case.error) as info:
        case.action(root)
    for word in case.words:
        assert word in str(info.value), (word, str(info.value))
    assert _snapshot(root) == before
