"""What Lightning and Keras users expect of `ModelCheckpoint`, on real Orbax and a real Trainer:
`~` in dirpath, copies before training, read-only property reads, `monitor=None`,
`save_last` at train end, `verbose`, `initial_value_threshold` and the tie rule."""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import pytest
from rich.console import Console

from artifex_ckpt import (
    BaseCallback,
    CheckpointConfig,
    EarlyStopping,
    EarlyStoppingConfig,
    MetricCheckpointManager,
    MetricError,
    ModelCheckpoint,
    ProgressBarCallback,
    ProgressBarConfig,
)
from artifex_ckpt.history import DecisionHistory, explain
from artifex_ckpt.trainer import Trainer
from tests.conftest import step_dirs
from tests.training import ScriptedMetric, batches, make_trainer

Copier = Callable[[Any], Any]
COPIERS: dict[str, Copier] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
}


@pytest.fixture(scope="module")
def shared() -> Trainer:
    """One trainer for the whole module (compiling its steps once): the scripted metrics,
    not the model, decide what is kept."""
    return make_trainer(n_train=1)


def _fit(
    trainer: Trainer,
    callbacks: list[Any],
    epochs: int,
    *,
    validate: bool = True,
) -> None:
    trainer.epochs = epochs
    trainer.val_data = batches(2, 2) if validate else None
    trainer.fit(callbacks=callbacks)


def _scripted(trainer: Trainer, checkpoint: ModelCheckpoint, values: list[Any]) -> None:
    _fit(trainer, [ScriptedMetric("val_loss", values), checkpoint], len(values))


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and directory under `root`: size, modification time, content hash."""
    out: dict[str, tuple[int, int, str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns, digest)
    return out


def _decisions(root: Path) -> list[tuple[str, int, str | None, float | None]]:
    return [(d.kind, d.step, d.name, d.score) for d in DecisionHistory(root).read()]


# ~ in dirpath


@pytest.mark.parametrize("form", [str, Path], ids=["str", "Path"])
def test_tilde_in_dirpath_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: Callable[[str], Any], shared: Trainer
) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=form("~/checkpoints"), save_top_k=1))
    _scripted(shared, checkpoint, [0.5, 0.4])
    assert step_dirs(home / "checkpoints") == {"model-01-0.4000"}
    assert checkpoint.best_checkpoint_path == home / "checkpoints" / "model-01-0.4000"
    checkpoint.manager.close()
    assert list(elsewhere.iterdir()) == []  # no directory literally named "~"


# Copies before training


def _three_callbacks(root: Path, console: Console) -> list[Any]:
    return [
        ModelCheckpoint(CheckpointConfig(dirpath=root, save_top_k=1)),
        EarlyStopping(EarlyStoppingConfig(patience=1)),
        ProgressBarCallback(ProgressBarConfig(show_eta=False), console=console),
    ]


@pytest.mark.parametrize("how", sorted(COPIERS))
def test_callbacks_copied_before_training_train_like_the_originals(
    tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str], shared: Trainer
) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False, color_system=None)
    originals = _three_callbacks(tmp_path / "run", console)
    checkpoint, stopper, _ = originals
    assert checkpoint.best_score is None  # a property read opens a read-only manager first
    copies = [COPIERS[how](callback) for callback in originals]
    assert [type(c) for c in copies] == [type(c) for c in originals]
    assert all(c is not o for c, o in zip(copies, originals, strict=True))

    # Not improving for one epoch stops at epoch 2; the last epoch is the final checkpoint.
    _fit(shared, [ScriptedMetric("val_loss", [0.5, 0.3, 0.4, 0.2, 0.1]), *copies], 5)
    copied_checkpoint, copied_stopper, _ = copies
    assert copied_stopper.stopped_epoch == 2 and stopper.stopped_epoch is None
    assert step_dirs(tmp_path / "run") == {"model-01-0.3000", "model-02-0.4000"}
    assert copied_checkpoint.best_score == 0.3
    # The original's read-only manager saw the directory before the run; a fresh read sees it.
    checkpoint.manager.close()
    assert ModelCheckpoint(checkpoint.config).best_score == 0.3
    # A deep copy writes to the same console; an unpickled bar to rich's default (stdout).
    shown = buffer.getvalue() if how == "deepcopy" else capsys.readouterr().out
    assert "3/5" in shown and "val_loss=" in shown
    copied_checkpoint.manager.close()


def test_properties_of_an_existing_run_are_read_without_writing(
    tmp_path: Path, shared: Trainer
) -> None:
    root = tmp_path / "run"
    _scripted(
        shared, ModelCheckpoint(CheckpointConfig(dirpath=root, save_top_k=2)), [0.5, 0.3, 0.4, 0.6]
    )
    before = _snapshot(root)

    reader = ModelCheckpoint(CheckpointConfig(dirpath=root, save_top_k=2))
    assert reader.best_score == 0.3
    assert reader.best_checkpoint_path == root / "model-01-0.3000"
    assert reader.last_checkpoint_path == root / "model-03-0.6000"
    assert [(s, p.name) for s, p in reader.saved_checkpoints] == [
        (0.3, "model-01-0.3000"),
        (0.4, "model-02-0.4000"),
        (0.6, "model-03-0.6000"),
    ]
    assert reader.manager.plan.read_only
    reader.manager.close()
    assert _snapshot(root) == before


def test_properties_of_a_missing_directory_create_nothing(tmp_path: Path) -> None:
    reader = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path / "not-yet"))
    assert reader.best_score is None and reader.best_checkpoint_path is None
    assert reader.saved_checkpoints == [] and reader.last_checkpoint_path is None
    reader.manager.close()
    assert list(tmp_path.iterdir()) == []


# monitor=None


@pytest.mark.parametrize("save_last", [True, False])
def test_monitor_none_keeps_the_newest_k_without_validation_data(
    tmp_path: Path, save_last: bool, shared: Trainer
) -> None:
    config = CheckpointConfig(
        dirpath=tmp_path, monitor=None, save_top_k=2, save_last=save_last, filename="m-{epoch:02d}"
    )
    checkpoint = ModelCheckpoint(config)
    _fit(shared, [checkpoint], 4, validate=False)
    assert step_dirs(tmp_path) == {"m-02", "m-03"}
    # As in Lightning: without a monitor the newest is the best, and nothing has a score.
    assert checkpoint.best_checkpoint_path == tmp_path / "m-03"
    assert checkpoint.best_score is None and checkpoint.saved_checkpoints == []
    assert [(kind, step, name) for kind, step, name, _ in _decisions(tmp_path)] == [
        ("saved", 0, "m-00"),
        ("saved", 1, "m-01"),
        ("saved", 2, "m-02"),
        ("evicted", 0, "m-00"),
        ("saved", 3, "m-03"),
        ("evicted", 1, "m-01"),
    ]
    checkpoint.manager.close()


def test_monitor_none_ignores_the_scores_in_the_names(tmp_path: Path, shared: Trainer) -> None:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, monitor=None, save_top_k=2))
    _scripted(shared, checkpoint, [0.1, 0.5, 0.9])
    # The best score (epoch 0) goes: the newest two are kept whatever their val_loss.
    assert step_dirs(tmp_path) == {"model-01-0.5000", "model-02-0.9000"}
    checkpoint.manager.close()


def test_monitor_none_with_the_default_filename_needs_its_metric(
    tmp_path: Path, shared: Trainer
) -> None:
    # The default template holds {val_loss}; without validation data it cannot be rendered.
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path / "run", monitor=None))
    with pytest.raises(MetricError, match=r"model-\{epoch:02d\}-\{val_loss:\.4f\}.*'val_loss'"):
        _fit(shared, [checkpoint], 2, validate=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_training_metric_can_rank_a_run_without_validation_data(
    tmp_path: Path, shared: Trainer
) -> None:
    config = CheckpointConfig(
        dirpath=tmp_path, monitor="loss", save_top_k=1, filename="m-{epoch:02d}-{loss:.4f}"
    )
    checkpoint = ModelCheckpoint(config)
    _fit(shared, [ScriptedMetric("loss", [0.9, 0.2, 0.5]), checkpoint], 3, validate=False)
    assert step_dirs(tmp_path) == {"m-01-0.2000", "m-02-0.5000"}
    assert checkpoint.best_score == 0.2
    checkpoint.manager.close()


# save_last at train end


class ValidateEvery(BaseCallback):
    """Drop the `val_` metrics of epochs that would not validate (Lightning's
    `check_val_every_n_epoch`), before the checkpoint callback sees the logs."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
        if (epoch + 1) % self.n:
            for name in [name for name in logs if name.startswith("val_")]:
                del logs[name]


def test_save_last_writes_an_unscored_final_checkpoint(tmp_path: Path, shared: Trainer) -> None:
    config = CheckpointConfig(dirpath=tmp_path, save_top_k=1, every_n_epochs=2)
    checkpoint = ModelCheckpoint(config)
    _fit(shared, [ValidateEvery(2), checkpoint], 3)
    names = sorted(step_dirs(tmp_path))
    assert len(names) == 2 and names[0].startswith("model-01-") and names[1] == "model-02-none"
    assert checkpoint.manager.score(2) is None  # unscored: never the best
    assert checkpoint.best_checkpoint_path == tmp_path / names[0]
    assert checkpoint.last_checkpoint_path == tmp_path / "model-02-none"
    saved = [d for d in DecisionHistory(tmp_path).read() if d.kind == "saved"]
    assert [(d.step, d.score is None, d.details["rank"]) for d in saved] == [
        (1, False, 1),
        (2, True, None),
    ]
    checkpoint.manager.close()


def test_a_resumed_run_evicts_the_unscored_final_checkpoint_once_it_saves_a_newer_one(
    tmp_path: Path, shared: Trainer
) -> None:
    # Lightning overwrites last.ckpt; here the unscored end of a run is kept only while it is
    # the newest, so that each resumed run does not leave one behind for good.
    config = CheckpointConfig(dirpath=tmp_path, save_top_k=1, every_n_epochs=2)
    first = ModelCheckpoint(config)
    _fit(shared, [ScriptedMetric("val_loss", [9.0, 0.5, 9.0]), ValidateEvery(2), first], 3)
    assert step_dirs(tmp_path) == {"model-01-0.5000", "model-02-none"}
    shared.epochs = 6
    resumed = ModelCheckpoint(config)
    metric = ScriptedMetric("val_loss", [9.0, 9.0, 9.0, 0.7, 9.0, 0.4])
    shared.fit(callbacks=[metric, ValidateEvery(2), resumed], resume=True)
    # Epoch 3 (0.7) evicted model-02-none; epoch 5 (0.4) is the new best.
    assert step_dirs(tmp_path) == {"model-05-0.4000"}
    history = DecisionHistory(tmp_path)
    evicted = [(d.name, d.details["by"]) for d in history.read() if d.kind == "evicted"]
    assert ("model-02-none", "model-03-0.7000") in evicted
    why = explain("model-02-none", history.why("model-02-none"), monitor="val_loss")
    assert "kept only while it is the newest" in why and "by model-03-0.7000" in why
    resumed.manager.close()


def test_a_save_without_metrics_through_the_manager_is_kept_for_good(tmp_path: Path) -> None:
    with MetricCheckpointManager(tmp_path, save_top_k=1) as manager:
        state = ocp.args.StandardSave({"w": np.zeros(2)})
        manager.save(0, args=state)  # unscored, not the last: Orbax's keep-without-metrics
        manager.save(1, args=state, metrics=None, last=True)  # a run's unscored end
        for step, loss in ((2, 0.5), (3, 0.4)):
            manager.save(step, args=state, metrics={"val_loss": loss})
        manager.wait_until_finished()
        assert manager.all_steps() == [0, 3]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["0", "3"]


def test_without_save_last_nothing_is_added_at_train_end(tmp_path: Path, shared: Trainer) -> None:
    config = CheckpointConfig(dirpath=tmp_path, save_top_k=1, every_n_epochs=2, save_last=False)
    checkpoint = ModelCheckpoint(config)
    _fit(shared, [ValidateEvery(2), checkpoint], 3)
    assert [name[:9] for name in step_dirs(tmp_path)] == ["model-01-"]
    checkpoint.manager.close()


# verbose


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "artifex_ckpt"]


def test_verbose_logs_one_line_per_decision(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, shared: Trainer
) -> None:
    caplog.set_level(logging.INFO, logger="artifex_ckpt")
    config = CheckpointConfig(dirpath=tmp_path, save_top_k=3, save_last=False, verbose=True)
    _scripted(shared, ModelCheckpoint(config), [0.5, 0.55, 0.6, 0.3, 0.61])
    assert _messages(caplog) == [
        "epoch 0: val_loss 0.5000, saved model-00-0.5000",
        "epoch 1: val_loss 0.5500, saved model-01-0.5500",
        "epoch 2: val_loss 0.6000, saved model-02-0.6000",
        "epoch 3: val_loss improved from 0.5000 to 0.3000, saved model-03-0.3000",
        "epoch 3: evicted model-02-0.6000",
        "epoch 4: val_loss 0.6100 not in top 3, not saved",
    ]


def test_verbose_is_off_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, shared: Trainer
) -> None:
    caplog.set_level(logging.DEBUG, logger="artifex_ckpt")
    _scripted(
        shared,
        ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, save_last=False)),
        [0.5, 0.3, 0.9],
    )
    assert _messages(caplog) == []


# initial_value_threshold


def test_initial_value_threshold_gates_the_top_k_and_the_best(
    tmp_path: Path, shared: Trainer
) -> None:
    config = CheckpointConfig(
        dirpath=tmp_path, save_top_k=2, save_last=False, initial_value_threshold=0.45
    )
    checkpoint = ModelCheckpoint(config)
    # Strictly better than 0.45 only: 0.45 itself does not count.
    _scripted(shared, checkpoint, [0.5, 0.6, 0.4, 0.45, 0.3])
    assert step_dirs(tmp_path) == {"model-02-0.4000", "model-04-0.3000"}
    assert checkpoint.best_score == 0.3
    not_saved = [d.step for d in DecisionHistory(tmp_path).read() if d.kind == "not_saved"]
    assert not_saved == [0, 1, 3]
    checkpoint.manager.close()


def test_nothing_is_best_before_the_threshold_is_beaten(tmp_path: Path, shared: Trainer) -> None:
    config = CheckpointConfig(dirpath=tmp_path, save_top_k=2, initial_value_threshold=0.45)
    checkpoint = ModelCheckpoint(config)
    _scripted(shared, checkpoint, [0.5, 0.6])
    # save_last keeps the newest, but it does not count for the top k nor as the best.
    assert step_dirs(tmp_path) == {"model-01-0.6000"}
    assert checkpoint.best_score is None and checkpoint.best_checkpoint_path is None
    checkpoint.manager.close()


def test_history_names_the_initial_value_threshold_not_beaten(
    tmp_path: Path, shared: Trainer
) -> None:
    """Needs `MetricCheckpointManager.__init__` to pass the threshold and mode to its
    `Journal` (see journal.py); until then the history says "would not enter the top k"."""
    for save_last in (False, True):
        root = tmp_path / f"last-{save_last}"
        config = CheckpointConfig(
            dirpath=root, save_top_k=2, save_last=save_last, initial_value_threshold=0.45
        )
        _scripted(shared, ModelCheckpoint(config), [0.5, 0.4])
        rows = [
            (d.kind, d.step, d.details.get("rank"), d.details.get("threshold"))
            for d in DecisionHistory(root).read()
        ]
        # Without save_last 0.5 is not written; with it, it is kept as the newest, unranked,
        # until the next one comes.
        expected = [("not_saved", 0, None, 0.45), ("saved", 1, 1, None)]
        if save_last:
            expected = [("saved", 0, None, 0.45), ("saved", 1, 1, None), ("evicted", 0, None, None)]
        assert rows == expected


# The tie rule: the older of two tied checkpoints ranks better, always.


def test_a_tie_for_the_best_keeps_the_older(tmp_path: Path, shared: Trainer) -> None:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, save_top_k=3))
    _scripted(shared, checkpoint, [0.4, 0.3, 0.3, 0.5])
    assert checkpoint.best_checkpoint_path == tmp_path / "model-01-0.3000"
    checkpoint.manager.close()


def test_a_tie_at_the_eviction_boundary_evicts_the_newer(tmp_path: Path, shared: Trainer) -> None:
    # Top 2 of 0.5 (epoch 0), 0.5 (epoch 1), 0.3 (epoch 2): the older 0.5 stays.
    # (Lightning would evict epoch 0 here, the oldest of the tied worst.)
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, save_top_k=2))
    _scripted(shared, checkpoint, [0.5, 0.5, 0.3])
    assert step_dirs(tmp_path) == {"model-00-0.5000", "model-02-0.3000"}
    evicted = [d for d in DecisionHistory(tmp_path).read() if d.kind == "evicted"]
    assert [(d.name, d.score, d.details["by"], d.details["by_score"]) for d in evicted] == [
        ("model-01-0.5000", 0.5, "model-02-0.3000", 0.3)
    ]
    checkpoint.manager.close()


def test_a_newer_tie_does_not_enter_a_full_top_k(tmp_path: Path, shared: Trainer) -> None:
    config = CheckpointConfig(dirpath=tmp_path, save_top_k=2, save_last=False)
    checkpoint = ModelCheckpoint(config)
    _scripted(shared, checkpoint, [0.5, 0.4, 0.5])
    assert step_dirs(tmp_path) == {"model-00-0.5000", "model-01-0.4000"}
    declined = [d for d in DecisionHistory(tmp_path).read() if d.kind == "not_saved"]
    assert [(d.step, d.score, d.details["kth"]) for d in declined] == [(2, 0.5, 0.5)]
    checkpoint.manager.close()
