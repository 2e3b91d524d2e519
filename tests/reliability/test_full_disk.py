"""Full disks and unwritable directories, injected at the OS boundary (tmpfs, read-only mount)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from artifex_ckpt import (
    BaseCallback,
    CheckpointConfig,
    CheckpointSaveError,
    ConfigError,
    MetricCheckpointManager,
    ModelCheckpoint,
    load_checkpoint,
)
from tests.conftest import assert_trees_equal, step_dirs
from tests.training import make_trainer

MIB = 1024 * 1024


def _mount(target: Path, *options: str) -> None:
    result = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip()}); needs root and mount rights")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs: room for a few checkpoints of a 1 MiB state, then ENOSPC."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    _mount(mountpoint, "-t", "tmpfs", "-o", "size=6m", "tmpfs")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _state(step: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(step).normal(size=(MIB // 4,)).astype(np.float32)}


def _restore(manager: MetricCheckpointManager, step: int) -> object:
    target = {"w": np.zeros(MIB // 4, np.float32)}
    return manager.restore(step, args=ocp.args.StandardRestore(target))


def test_full_disk_error_surfaces_and_loses_nothing(small_disk: Path) -> None:
    root = small_disk / "run"
    filler = small_disk / "filler"
    manager = MetricCheckpointManager(root, filename="m-{epoch}", save_top_k=-1)
    committed: list[int] = []
    failure: CheckpointSaveError | None = None
    for step in range(8):
        try:
            manager.save(step, args=ocp.args.StandardSave(_state(step)), metrics={"val_loss": 1.0})
            manager.wait_until_finished()
            committed.append(step)
        except CheckpointSaveError as err:
            failure = err
            break
    assert failure is not None, "the disk never filled up"
    failed_step = len(committed)
    assert f"'m-{failed_step}'" in str(failure) and "No space left" in str(failure)
    assert sorted(manager.all_steps()) == committed
    assert step_dirs(root) >= {f"m-{s}" for s in committed}
    for step in committed:
        assert_trees_equal(_restore(manager, step), _state(step))

    # Make room again: a later save succeeds; a fresh manager lists no partial checkpoint.
    manager.delete(committed[0])
    filler.unlink(missing_ok=True)
    next_step = failed_step + 1
    manager.save(
        next_step, args=ocp.args.StandardSave(_state(next_step)), metrics={"val_loss": 0.5}
    )
    manager.wait_until_finished()
    manager.close()
    with MetricCheckpointManager(root) as reopened:
        assert sorted(reopened.all_steps()) == [*committed[1:], next_step]
        assert [p.name for p in root.iterdir() if "tmp" in p.name] == []
        assert_trees_equal(_restore(reopened, next_step), _state(next_step))


def test_callback_reports_a_failed_background_save_at_train_end(small_disk: Path) -> None:
    # Leave room for the settings file and little else.
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (6 * MIB - 64 * 1024))
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=small_disk / "run", filename="e-{epoch}"))
    trainer = make_trainer(epochs=1)
    with pytest.raises(CheckpointSaveError, match=r"'e-0'.*No space left"):
        trainer.fit(callbacks=[checkpoint])
    assert checkpoint.manager.all_steps() == []
    assert checkpoint.last_checkpoint_path is None
    filler.unlink()
    trainer.epochs = 2
    trainer.fit(callbacks=[checkpoint])  # space is back: epoch 0 and 1 train again, and save
    assert step_dirs(small_disk / "run") == {"e-0", "e-1"}
    fresh = make_trainer(epochs=1, seed=3)
    load_checkpoint(checkpoint.manager, fresh.model, "latest")
    assert_trees_equal(fresh.model, trainer.model)


def test_read_only_directory_is_refused_with_its_path(tmp_path: Path) -> None:
    source = tmp_path / "ro"
    source.mkdir()
    _mount(source, "--bind", str(source))
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(source)], check=True)
        with pytest.raises(ConfigError, match=rf"{source}.*not writable"):
            MetricCheckpointManager(source / "run")
        assert list(source.iterdir()) == []
    finally:
        subprocess.run(["umount", str(source)], check=False)
    assert os.access(source, os.W_OK)


class _FailAtEpochOne(BaseCallback):
    __slots__ = ()

    def on_epoch_begin(self, trainer: object, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt


def test_a_failed_save_does_not_hide_the_training_error(small_disk: Path) -> None:
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (6 * MIB - 64 * 1024))
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=small_disk / "run", filename="e-{epoch}"))
    with pytest.raises(KeyboardInterrupt) as info:
        make_trainer(epochs=3).fit(callbacks=[checkpoint, _FailAtEpochOne()])
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "'e-0'" in notes and "No space left" in notes
    assert checkpoint.manager.all_steps() == []
