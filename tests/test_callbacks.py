"""ModelCheckpoint with a real Trainer, tiny nnx model and optax: the seed's examples and rules."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flax import nnx

from artifex_ckpt import (
    BaseCallback,
    CallbackList,
    CheckpointConfig,
    EarlyStopping,
    EarlyStoppingConfig,
    MetricError,
    ModelCheckpoint,
    ProgressBarCallback,
    ProgressBarConfig,
    StepError,
    WeightsOnlyError,
    load_checkpoint,
)
from artifex_ckpt.history import DecisionHistory
from tests.conftest import assert_trees_equal, step_dirs
from tests.training import ScriptedMetric, make_trainer


class Untouchable:
    """A monitor value that fails if anything reads it (stands in for an unsynced array)."""

    def __float__(self) -> float:
        raise AssertionError("monitor value was read on an ineligible epoch")

    __array__ = __float__
    item = __float__


def _epochs_on_disk(callback: ModelCheckpoint) -> list[int]:
    return sorted(callback.manager.all_steps())


def test_seed_basic_example(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(
        CheckpointConfig(
            dirpath=tmp_path / "checkpoints", monitor="val_loss", mode="min", save_top_k=3
        )
    )
    trainer = make_trainer(epochs=5)
    trainer.fit(callbacks=[checkpoint])
    best = checkpoint.best_checkpoint_path
    assert best is not None and best.is_dir()
    assert best.name == f"model-{checkpoint.manager.best_step():02d}-{checkpoint.best_score:.4f}"
    scores = [score for score, _ in checkpoint.saved_checkpoints]
    assert scores == sorted(scores) and checkpoint.best_score == scores[0]
    assert len(scores) == 3 or (len(scores) == 4 and checkpoint.last_checkpoint_path)
    assert {p.name for _, p in checkpoint.saved_checkpoints} <= step_dirs(tmp_path / "checkpoints")
    assert checkpoint.last_checkpoint_path is not None
    assert checkpoint.last_checkpoint_path.name.startswith("model-04-")


def test_seed_accuracy_max_example(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(
        CheckpointConfig(
            dirpath=tmp_path,
            monitor="val_accuracy",
            mode="max",
            save_top_k=1,
            filename="best-model-{epoch:02d}-{val_accuracy:.4f}",
        )
    )
    accuracies = [0.5, 0.9, 0.7, 0.8]
    make_trainer(epochs=4).fit(callbacks=[ScriptedMetric("val_accuracy", accuracies), checkpoint])
    assert step_dirs(tmp_path) == {"best-model-01-0.9000", "best-model-03-0.8000"}
    assert checkpoint.best_score == 0.9
    assert checkpoint.best_checkpoint_path is not None
    assert checkpoint.best_checkpoint_path.name == "best-model-01-0.9000"


def test_seed_save_all_every_five_epochs(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(
        CheckpointConfig(dirpath=tmp_path, save_top_k=-1, every_n_epochs=5)
    )
    make_trainer(epochs=12, n_train=1).fit(callbacks=[checkpoint])
    # 4 and 9 are eligible; 11 is written at train end because save_last is on.
    assert _epochs_on_disk(checkpoint) == [4, 9, 11]
    assert len(step_dirs(tmp_path)) == 3


def test_every_n_epochs_without_save_last_writes_only_eligible(tmp_path: Path) -> None:
    config = CheckpointConfig(dirpath=tmp_path, save_top_k=-1, every_n_epochs=5, save_last=False)
    checkpoint = ModelCheckpoint(config)
    make_trainer(epochs=12, n_train=1).fit(callbacks=[checkpoint])
    assert _epochs_on_disk(checkpoint) == [4, 9]


def test_seed_custom_filename_template(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(
        CheckpointConfig(
            dirpath=tmp_path,
            filename="model-epoch{epoch:03d}-loss{val_loss:.6f}-acc{val_accuracy:.4f}",
            monitor="val_loss",
        )
    )
    make_trainer(epochs=2).fit(callbacks=[checkpoint])
    names = step_dirs(tmp_path)
    assert len(names) == 2
    for epoch in (0, 1):
        path = checkpoint.manager.step_path(epoch)
        score = checkpoint.manager.score(epoch)
        accuracy = checkpoint.manager.metrics(epoch)["val_accuracy"]
        assert path.name == f"model-epoch{epoch:03d}-loss{score:.6f}-acc{accuracy:.4f}"
        assert path.name in names


def test_seed_combined_callbacks(tmp_path: Path) -> None:
    callbacks = CallbackList(
        [
            ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, monitor="val_loss", save_top_k=3)),
            EarlyStopping(EarlyStoppingConfig(monitor="val_loss", patience=10)),
            ProgressBarCallback(ProgressBarConfig(disable=True)),
        ]
    )
    trainer = make_trainer(epochs=3)
    trainer.fit(callbacks=callbacks)
    checkpoint = next(iter(callbacks))
    assert isinstance(checkpoint, ModelCheckpoint)
    assert len(step_dirs(tmp_path)) == 3


@pytest.mark.parametrize("save_last", [True, False])
def test_top_k_with_and_without_save_last(tmp_path: Path, save_last: bool) -> None:
    losses = [0.5, 0.4, 0.3, 0.9, 0.8]
    config = CheckpointConfig(dirpath=tmp_path, save_top_k=2, save_last=save_last)
    checkpoint = ModelCheckpoint(config)
    make_trainer(epochs=5).fit(callbacks=[ScriptedMetric("val_loss", losses), checkpoint])
    history = DecisionHistory(tmp_path).read()
    saves = [d.step for d in history if d.kind == "saved"]
    if save_last:
        assert saves == [0, 1, 2, 3, 4]
        assert _epochs_on_disk(checkpoint) == [1, 2, 4]
        assert checkpoint.last_checkpoint_path == checkpoint.manager.step_path(4)
    else:
        assert saves == [0, 1, 2]  # 0.9 and 0.8 would be deleted at once: not written
        assert [(d.step, d.score) for d in history if d.kind == "not_saved"] == [
            (3, 0.9),
            (4, 0.8),
        ]
        assert _epochs_on_disk(checkpoint) == [1, 2]
    assert checkpoint.best_score == 0.3


def test_nan_first_then_improving(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, save_top_k=3))
    losses = [math.nan, 0.8, 0.5, 0.4]
    make_trainer(epochs=4).fit(callbacks=[ScriptedMetric("val_loss", losses), checkpoint])
    assert _epochs_on_disk(checkpoint) == [1, 2, 3]
    assert checkpoint.best_score == 0.4
    assert [s for s, _ in checkpoint.saved_checkpoints] == [0.4, 0.5, 0.8]
    assert step_dirs(tmp_path) == {"model-01-0.8000", "model-02-0.5000", "model-03-0.4000"}


def test_inf_never_becomes_best(tmp_path: Path) -> None:
    config = CheckpointConfig(
        dirpath=tmp_path, mode="max", monitor="acc", save_top_k=1, filename="m-{epoch}"
    )
    checkpoint = ModelCheckpoint(config)
    make_trainer(epochs=3).fit(callbacks=[ScriptedMetric("acc", [0.2, math.inf, 0.1]), checkpoint])
    assert checkpoint.best_score == 0.2
    assert _epochs_on_disk(checkpoint) == [0, 2]


def test_ineligible_epochs_do_not_read_the_monitor(tmp_path: Path) -> None:
    config = CheckpointConfig(
        dirpath=tmp_path, every_n_epochs=2, save_last=False, filename="m-{epoch}"
    )
    checkpoint = ModelCheckpoint(config)
    values: list[Any] = [Untouchable(), 0.5, Untouchable(), 0.4]
    make_trainer(epochs=4).fit(callbacks=[ScriptedMetric("val_loss", values), checkpoint])
    assert _epochs_on_disk(checkpoint) == [1, 3]


def test_missing_monitor_names_it_and_lists_keys(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, monitor="val_psnr"))
    with pytest.raises(MetricError, match=r"'val_psnr'.*\['accuracy', 'loss', 'val_accuracy'"):
        make_trainer(epochs=2).fit(callbacks=[checkpoint])
    assert step_dirs(tmp_path) == set()


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    straight = make_trainer(epochs=6)
    straight.fit(callbacks=[ModelCheckpoint(CheckpointConfig(dirpath=tmp_path / "straight"))])

    first = make_trainer(epochs=3)
    first.fit(callbacks=[ModelCheckpoint(CheckpointConfig(dirpath=tmp_path / "split"))])
    resumed = make_trainer(epochs=6, seed=99)  # different init: everything must come from disk
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path / "split"))
    resumed.fit(callbacks=[checkpoint], resume=True)

    assert resumed.step == straight.step and resumed.epoch == 5
    assert_trees_equal(resumed.model, straight.model)
    assert_trees_equal(resumed.optimizer, straight.optimizer)
    assert step_dirs(tmp_path / "split") == step_dirs(tmp_path / "straight")
    assert checkpoint.last_checkpoint_path is not None
    assert checkpoint.last_checkpoint_path.name.startswith("model-05-")
    assert checkpoint.best_checkpoint_path == checkpoint.saved_checkpoints[0][1]


def test_fresh_start_on_a_used_directory_is_refused(tmp_path: Path) -> None:
    make_trainer(epochs=2).fit(callbacks=[ModelCheckpoint(CheckpointConfig(dirpath=tmp_path))])
    before = step_dirs(tmp_path)
    with pytest.raises(StepError, match=r"up to epoch 1.*starts at epoch 0.*resume=True"):
        make_trainer(epochs=4).fit(callbacks=[ModelCheckpoint(CheckpointConfig(dirpath=tmp_path))])
    assert step_dirs(tmp_path) == before


def test_weights_only_restores_into_a_model_but_refuses_to_resume(tmp_path: Path) -> None:
    config = CheckpointConfig(dirpath=tmp_path, save_weights_only=True)
    trainer = make_trainer(epochs=2)
    trainer.fit(callbacks=[ModelCheckpoint(config)])
    checkpoint = ModelCheckpoint(config)
    path = checkpoint.last_checkpoint_path
    assert path is not None and not (path / "optimizer").exists()

    fresh = make_trainer(epochs=2, seed=5)
    load_checkpoint(checkpoint.manager, fresh.model, "latest")
    assert_trees_equal(nnx.state(fresh.model, nnx.Param), nnx.state(trainer.model, nnx.Param))
    with pytest.raises(WeightsOnlyError, match="weights only"):
        load_checkpoint(checkpoint.manager, fresh.model, "latest", optimizer=fresh.optimizer)
    with pytest.raises(WeightsOnlyError, match="cannot resume"):
        make_trainer(epochs=4).fit(callbacks=[checkpoint], resume=True)


def test_callback_list_calls_hooks_in_order(tmp_path: Path) -> None:
    calls: list[tuple[str, str, Any]] = []

    class Recorder(BaseCallback):
        __slots__ = ("tag",)

        def __init__(self, tag: str) -> None:
            self.tag = tag

        def on_train_begin(self, trainer: Any) -> None:
            calls.append((self.tag, "train_begin", None))

        def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
            calls.append((self.tag, "epoch_begin", epoch))

        def on_batch_begin(self, trainer: Any, batch: int) -> None:
            calls.append((self.tag, "batch_begin", batch))

        def on_batch_end(self, trainer: Any, batch: int, logs: Any) -> None:
            calls.append((self.tag, "batch_end", batch))

        def on_validation_begin(self, trainer: Any) -> None:
            calls.append((self.tag, "val_begin", None))

        def on_validation_end(self, trainer: Any, logs: Any) -> None:
            calls.append((self.tag, "val_end", sorted(logs)))

        def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
            calls.append((self.tag, "epoch_end", sorted(logs)))

        def on_train_end(self, trainer: Any) -> None:
            calls.append((self.tag, "train_end", None))

    a, b = Recorder("a"), Recorder("b")
    callbacks = CallbackList([a])
    callbacks.add(b)
    extra = Recorder("c")
    callbacks.add(extra)
    callbacks.remove(extra)
    assert len(callbacks) == 2 and list(callbacks) == [a, b]
    make_trainer(epochs=1, n_train=2).fit(callbacks=callbacks)
    logs = ["accuracy", "loss", "val_accuracy", "val_loss"]
    expected_events = [
        ("train_begin", None),
        ("epoch_begin", 0),
        ("batch_begin", 0),
        ("batch_end", 0),
        ("batch_begin", 1),
        ("batch_end", 1),
        ("val_begin", None),
        ("val_end", ["val_accuracy", "val_loss"]),
        ("epoch_end", logs),
        ("train_end", None),
    ]
    assert calls == [(tag, *event) for event in expected_events for tag in "ab"]


def test_unused_template_metric_fails_before_writing(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(
        CheckpointConfig(dirpath=tmp_path, filename="m-{epoch}-{psnr:.1f}")
    )
    with pytest.raises(MetricError, match="'psnr'"):
        make_trainer(epochs=1).fit(callbacks=[checkpoint])
    assert step_dirs(tmp_path) == set()


def test_relative_dirpath_saves_where_it_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath="./checkpoints", save_top_k=1))
    make_trainer(epochs=2).fit(callbacks=[checkpoint])
    assert checkpoint.best_checkpoint_path is not None
    assert checkpoint.best_checkpoint_path.parent == tmp_path / "checkpoints"
    assert step_dirs(tmp_path / "checkpoints") == {p.name for _, p in checkpoint.saved_checkpoints}


def test_non_scalar_log_entries_are_not_metrics(tmp_path: Path) -> None:
    import numpy as np

    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, filename="m-{epoch}"))
    trainer = make_trainer(epochs=1)
    per_class = ScriptedMetric("per_class_acc", [np.ones(3)])
    note = ScriptedMetric("note", ["warm-up"])
    trainer.fit(callbacks=[per_class, note, checkpoint])
    stored = checkpoint.manager.metrics(0)
    assert "per_class_acc" not in stored and "note" not in stored
    assert {"loss", "val_loss"} <= set(stored)
