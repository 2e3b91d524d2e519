"""Saves that overlap, train end during a pending save, and a crash in the training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import pytest

from artifex_ckpt import (
    BaseCallback,
    CheckpointConfig,
    MetricCheckpointManager,
    ModelCheckpoint,
    load_checkpoint,
)
from tests.conftest import assert_trees_equal, pure, step_dirs
from tests.training import make_trainer

BIG = 4 * 1024 * 1024  # floats: 16 MiB, so a save is still running when the next one starts


def _state(step: int) -> dict[str, np.ndarray]:
    return {"w": np.full(BIG, step, np.float32)}


def test_save_while_the_previous_save_is_running(tmp_path: Path) -> None:
    with MetricCheckpointManager(tmp_path, filename="s-{epoch}", save_top_k=1) as manager:
        manager.save(0, args=ocp.args.StandardSave(_state(0)), metrics={"val_loss": 0.1})
        assert manager.is_saving_in_progress()
        manager.save(1, args=ocp.args.StandardSave(_state(1)), metrics={"val_loss": 0.2})
        # The second save waited for the first: step 0 is committed and stays (it is best).
        assert (tmp_path / "s-0").is_dir()
        manager.save(2, args=ocp.args.StandardSave(_state(2)), metrics={"val_loss": 0.3})
        manager.wait_until_finished()
        assert step_dirs(tmp_path) == {"s-0", "s-2"}
        target = {"w": np.zeros(BIG, np.float32)}
        for step in (0, 2):
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
            assert_trees_equal(restored, _state(step))


class Snapshot(BaseCallback):
    __slots__ = ("states",)

    def __init__(self) -> None:
        self.states: dict[int, Any] = {}

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
        self.states[epoch] = pure(trainer.model)


def test_train_end_waits_for_the_pending_save(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, filename="e-{epoch}"))
    snapshot = Snapshot()
    trainer = make_trainer(epochs=2)
    trainer.fit(callbacks=[snapshot, checkpoint])
    # No wait_until_finished here: on_train_end must already have committed everything.
    assert not checkpoint.manager.is_saving_in_progress()
    assert step_dirs(tmp_path) == {"e-0", "e-1"}
    for epoch in (0, 1):
        fresh = make_trainer(epochs=1, seed=9)
        with MetricCheckpointManager(tmp_path) as manager:
            load_checkpoint(manager, fresh.model, epoch)
        assert_trees_equal(fresh.model, snapshot.states[epoch])


class Explode(BaseCallback):
    __slots__ = ()

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
        if epoch == 2:
            raise RuntimeError("boom in the training loop")


def test_exception_mid_run_finishes_pending_saves(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, filename="e-{epoch}"))
    trainer = make_trainer(epochs=5)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(callbacks=[checkpoint, Explode()])
    assert not checkpoint.manager.is_saving_in_progress()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    assert step_dirs(tmp_path) == {"e-0", "e-1"}
    with MetricCheckpointManager(tmp_path) as reopened:
        assert sorted(reopened.all_steps()) == [0, 1]
    resumed = make_trainer(epochs=3)
    resumed.fit(
        callbacks=[ModelCheckpoint(CheckpointConfig(tmp_path, filename="e-{epoch}"))], resume=True
    )
    assert step_dirs(tmp_path) == {"e-0", "e-1", "e-2"}
