"""Long runs: step and time cadences, preemption, save_on_exception, resume from any
checkpoint, and the data position, with a real Trainer, nnx models, Orbax and grain."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_ckpt import (
    BaseCallback,
    CheckpointConfig,
    CheckpointNotFoundError,
    ConfigError,
    MetricCheckpointManager,
    ModelCheckpoint,
    StepError,
    Trainer,
    TrainingPreempted,
)
from artifex_ckpt.data_state import DATA_ITEM, is_grain_source
from artifex_ckpt.history import DecisionHistory
from artifex_ckpt.policies import PARTIAL_METRIC
from tests.conftest import TinyMLP, assert_trees_equal, step_dirs
from tests.training import ScriptedMetric, batches, make_trainer, mse_loss

grain = pytest.importorskip("grain")

EPOCHS, PER_EPOCH = 3, 4  # make_trainer: 4 training batches per epoch


class Signal(BaseCallback):
    """Sends `signum` to this process at the end of global step `at` (a real signal)."""

    __slots__ = ("at", "hook", "signum", "times")

    def __init__(
        self, at: int, signum: int = signal.SIGTERM, *, times: int = 1, hook: str = "batch"
    ) -> None:
        self.at, self.signum, self.times, self.hook = at, signum, times, hook

    def _maybe(self, trainer: Any) -> None:
        if trainer.step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_batch_end(self, trainer: Any, batch: int, logs: Any) -> None:
        if self.hook == "batch":
            self._maybe(trainer)

    def on_validation_begin(self, trainer: Any) -> None:
        if self.hook == "validation":
            self._maybe(trainer)


class Fail(BaseCallback):
    """Raises `error` at the end of global step `at`, after running `before` (if any)."""

    __slots__ = ("at", "before", "error", "seen")

    def __init__(self, at: int, error: BaseException, before: Callable[[], None] | None = None):
        self.at, self.error, self.before = at, error, before
        self.seen: Any = None

    def on_batch_end(self, trainer: Any, batch: int, logs: Any) -> None:
        if trainer.step == self.at:
            self.seen = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(trainer.model)))
            if self.before is not None:
                self.before()
            raise self.error


class EpochLogs(BaseCallback):
    """Records each epoch's logs as floats."""

    __slots__ = ("logs",)

    def __init__(self) -> None:
        self.logs: dict[int, dict[str, float]] = {}

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
        self.logs[epoch] = {k: float(v) for k, v in logs.items()}


class Untouchable:
    """A metric value that fails when read: stands in for an array not yet synced."""

    def __float__(self) -> float:
        raise AssertionError("a batch-end hook that saves nothing read the metric")

    __array__ = __float__
    item = __float__


class HideBatchMetrics(BaseCallback):
    """Replaces the batch logs by unreadable values except on global steps in `readable`."""

    __slots__ = ("readable",)

    def __init__(self, readable: set[int]) -> None:
        self.readable = readable

    def on_batch_end(self, trainer: Any, batch: int, logs: Any) -> None:
        if trainer.step not in self.readable:
            for name in logs:
                logs[name] = Untouchable()


@pytest.fixture(scope="module")
def reference() -> Trainer:
    """The uninterrupted run every resumed run must match bit for bit."""
    trainer = make_trainer(epochs=EPOCHS)
    trainer.fit(callbacks=[])
    return trainer


@pytest.fixture(autouse=True)
def sigterm_untouched() -> Iterator[None]:
    """Every test leaves SIGTERM and SIGINT handled as before."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def assert_same_run(trainer: Trainer, reference: Trainer) -> None:
    assert trainer.step == reference.step and trainer.epoch == reference.epoch
    assert_trees_equal(trainer.model, reference.model)
    assert_trees_equal(trainer.optimizer, reference.optimizer)


def trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "trainer_state" / "metadata").read_text())


def custom_metadata(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "_CHECKPOINT_METADATA").read_text())["custom_metadata"]


def stored_metrics(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "metrics" / "metrics").read_text())


# --- cadences ---------------------------------------------------------------------------


def test_every_n_train_steps_saves_at_global_steps_and_names_epoch_and_step(
    tmp_path: Path,
) -> None:
    config = CheckpointConfig(
        dirpath=tmp_path,
        filename="m-{epoch:02d}-{step:04d}-{loss:.3f}",
        monitor="loss",
        save_top_k=-1,
        every_n_train_steps=3,
    )
    checkpoint = ModelCheckpoint(config)
    # Only the saving steps (3, 6, 9, 12) may read the batch's metrics.
    trainer = make_trainer(epochs=EPOCHS)
    trainer.fit(callbacks=[HideBatchMetrics({3, 6, 9, 12}), checkpoint])
    assert checkpoint.manager.all_steps() == [3, 6, 9, 12]
    for step in (3, 6, 9, 12):
        path = checkpoint.manager.step_path(step)
        epoch = (step - 1) // PER_EPOCH
        assert path.name == f"m-{epoch:02d}-{step:04d}-{checkpoint.manager.score(step):.3f}"
        assert custom_metadata(path) == {"epoch": epoch, "global_step": step}
    saved = [d.step for d in DecisionHistory(tmp_path).read() if d.kind == "saved"]
    assert saved == [3, 6, 9, 12]


def test_a_step_cadence_ranks_on_the_latest_validation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = CheckpointConfig(
        dirpath=tmp_path,
        filename="m-{step:03d}-{val_loss:.5f}",
        save_top_k=-1,
        every_n_train_steps=2,
    )
    epochs = EpochLogs()
    checkpoint = ModelCheckpoint(config)
    with caplog.at_level(logging.WARNING, logger="artifex_ckpt"):
        make_trainer(epochs=EPOCHS).fit(callbacks=[epochs, checkpoint])
    # Epoch 0 has no validation yet: its steps 2 and 4 are skipped, and that is said once.
    warnings = [r.getMessage() for r in caplog.records if "not logged yet" in r.getMessage()]
    assert len(warnings) == 1 and "'val_loss'" in warnings[0]
    assert checkpoint.manager.all_steps() == [6, 8, 10, 12]
    for step in (6, 8, 10, 12):
        # A step of epoch e is scored on epoch e-1's validation, as in Lightning.
        previous = (step - 1) // PER_EPOCH - 1
        assert checkpoint.manager.score(step) == pytest.approx(epochs.logs[previous]["val_loss"])


def test_train_time_interval_saves_the_first_batch_after_the_interval(tmp_path: Path) -> None:
    class Slow(BaseCallback):
        def on_batch_end(self, trainer: Any, batch: int, logs: Any) -> None:
            if trainer.step in (3, 7):
                time.sleep(0.55)

    config = CheckpointConfig(
        dirpath=tmp_path,
        filename="t-{step:03d}-{loss:.3f}",
        monitor="loss",
        save_top_k=-1,
        train_time_interval=0.5,
    )
    checkpoint = ModelCheckpoint(config)
    trainer = make_trainer(epochs=2)
    # Step 1 compiles, and may reach the interval on a loaded machine; every other step
    # takes milliseconds, so only steps 3 and 7 end more than 0.5 s after the last save.
    trainer.fit(callbacks=[Slow(), HideBatchMetrics({1, 3, 7}), checkpoint])
    steps = checkpoint.manager.all_steps()
    # Step 8 is the final checkpoint of save_last.
    assert {3, 7, 8} <= set(steps) <= {1, 3, 7, 8}, steps


def test_cadences_are_exclusive_and_a_step_cadence_needs_a_step_template(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="every_n_epochs=2 and every_n_train_steps=5"):
        CheckpointConfig(dirpath=tmp_path, every_n_epochs=2, every_n_train_steps=5)
    with pytest.raises(ConfigError, match="choose one cadence"):
        CheckpointConfig(dirpath=tmp_path, every_n_train_steps=5, train_time_interval=60.0)
    with pytest.raises(ConfigError, match=r"no \{step\} placeholder"):
        CheckpointConfig(dirpath=tmp_path, every_n_train_steps=5)  # the seed's template


# --- preemption -------------------------------------------------------------------------


def test_sigterm_mid_epoch_saves_then_resume_matches_the_uninterrupted_run(
    tmp_path: Path, reference: Trainer
) -> None:
    config = CheckpointConfig(dirpath=tmp_path, filename="m-{epoch:02d}-{step:03d}-{val_loss:.4f}")
    trainer = make_trainer(epochs=EPOCHS)
    with pytest.raises(TrainingPreempted) as info:
        trainer.fit(callbacks=[Signal(at=6), ModelCheckpoint(config)])
    stop = info.value
    assert stop.step == 6 and stop.signal_name == "SIGTERM"
    assert stop.checkpoint is not None and stop.checkpoint.name == "m-01-006-none-preempted"
    assert str(stop.checkpoint) in str(stop) and "fit(resume=True)" in str(stop)
    partial = Path(stop.checkpoint)
    assert custom_metadata(partial) == {"epoch": 1, "global_step": 6, "reason": "preempted"}
    assert stored_metrics(partial) == {PARTIAL_METRIC: 1.0}
    assert trainer_state(partial)["batches_done"] == 2
    others = step_dirs(tmp_path) - {partial.name}
    assert len(others) == 1 and next(iter(others)).startswith("m-00-004-")

    resumed = make_trainer(epochs=EPOCHS, seed=99)  # a different init: all comes from disk
    logs = EpochLogs()
    checkpoint = ModelCheckpoint(config)
    resumed.fit(callbacks=[logs, checkpoint], resume=True)
    assert resumed.initial_epoch == 1
    assert_same_run(resumed, reference)
    # Epoch 1 ended after the resume: its checkpoint replaced the partial one, and its
    # averages cover all four of its batches, as without the interruption.
    assert sorted(checkpoint.manager.all_steps()) == [0, 1, 2]
    assert not any(name.endswith("-preempted") for name in step_dirs(tmp_path))
    straight = EpochLogs()
    make_trainer(epochs=2).fit(callbacks=[straight])
    assert logs.logs[1] == straight.logs[1]
    history = DecisionHistory(tmp_path).read()
    assert ("evicted", "m-01-006-none-preempted") in [(d.kind, d.name) for d in history]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_resumed_epoch_outside_the_top_k_keeps_its_partial_checkpoint(
    tmp_path: Path, verbose: bool
) -> None:
    config = CheckpointConfig(
        dirpath=tmp_path,
        filename="m-{epoch}-{score:.2f}",
        monitor="score",
        save_top_k=1,
        save_last=False,
        verbose=verbose,
    )
    scores = ScriptedMetric("score", [0.1, 0.9, 0.05])
    with pytest.raises(TrainingPreempted) as info:
        make_trainer(epochs=EPOCHS).fit(callbacks=[scores, Signal(at=6), ModelCheckpoint(config)])
    assert info.value.checkpoint is not None
    partial = info.value.checkpoint.name
    assert step_dirs(tmp_path) == {"m-0-0.10", partial}
    # Epoch 1 ends after the resume with 0.9, outside the top 1: nothing is written, and
    # the partial checkpoint stays the point to resume from.
    make_trainer(epochs=2).fit(callbacks=[scores, ModelCheckpoint(config)], resume=True)
    assert step_dirs(tmp_path) == {"m-0-0.10", partial}
    declined = [
        (d.step, d.score) for d in DecisionHistory(tmp_path).read() if d.kind == "not_saved"
    ]
    assert declined == [(1, 0.9)]
    make_trainer(epochs=EPOCHS).fit(callbacks=[scores, ModelCheckpoint(config)], resume=True)
    assert step_dirs(tmp_path) == {"m-2-0.05"}  # the best; the partial was only the newest


def test_sigterm_with_a_step_cadence_saves_the_global_step(
    tmp_path: Path, reference: Trainer
) -> None:
    config = CheckpointConfig(
        dirpath=tmp_path,
        filename="s-{epoch}-{step:03d}-{loss:.4f}",
        monitor="loss",
        save_top_k=2,
        every_n_train_steps=4,
    )
    with pytest.raises(TrainingPreempted) as info:
        make_trainer(epochs=EPOCHS).fit(callbacks=[Signal(at=7), ModelCheckpoint(config)])
    assert info.value.checkpoint is not None
    assert info.value.checkpoint.name == "s-1-007-none-preempted"

    resumed = make_trainer(epochs=EPOCHS, seed=5)
    checkpoint = ModelCheckpoint(config)
    resumed.fit(callbacks=[checkpoint], resume=True)
    assert_same_run(resumed, reference)
    # The partial step 7 was evicted once step 8 committed; steps keep increasing.
    assert 7 not in checkpoint.manager.all_steps()
    assert max(checkpoint.manager.all_steps()) == 12
    saved = [d.step for d in DecisionHistory(tmp_path).read() if d.kind == "saved"]
    assert saved == sorted(saved) and len(set(saved)) == len(saved)


def test_preempted_after_the_last_step_the_resumed_run_ends_with_a_regular_checkpoint(
    tmp_path: Path, reference: Trainer
) -> None:
    # Step 12 is the last step of the last epoch: the resumed run trains no batch, yet its
    # epoch logs (monitored here: the training loss) must be those of the whole epoch.
    config = CheckpointConfig(dirpath=tmp_path, filename="e-{epoch}-{loss:.6f}", monitor="loss")
    with pytest.raises(TrainingPreempted) as info:
        make_trainer(epochs=EPOCHS).fit(callbacks=[Signal(at=12), ModelCheckpoint(config)])
    assert info.value.checkpoint is not None
    assert info.value.checkpoint.name == "e-2-none-preempted"
    resumed = make_trainer(epochs=EPOCHS, seed=7)
    logs = EpochLogs()
    resumed.fit(callbacks=[logs, ModelCheckpoint(config)], resume=True)
    assert_same_run(resumed, reference)
    straight = EpochLogs()
    make_trainer(epochs=EPOCHS).fit(callbacks=[straight])
    assert logs.logs == {2: straight.logs[2]}
    assert f"e-2-{straight.logs[2]['loss']:.6f}" in step_dirs(tmp_path)
    assert not any(name.endswith("-preempted") for name in step_dirs(tmp_path))


def test_a_step_checkpoint_taken_mid_epoch_resumes_within_its_epoch(
    tmp_path: Path, reference: Trainer
) -> None:
    # A crash (no save for it) after step 7: the newest checkpoint is the batch-end one of
    # step 6, the second batch of epoch 1, which must continue with that epoch's third.
    config = CheckpointConfig(
        dirpath=tmp_path, filename="c-{step:02d}", monitor=None, every_n_train_steps=3
    )
    with pytest.raises(OSError, match="disk on fire"):
        make_trainer(epochs=EPOCHS).fit(
            callbacks=[Fail(at=7, error=OSError("disk on fire")), ModelCheckpoint(config)]
        )
    assert step_dirs(tmp_path) == {"c-03", "c-06"}
    assert trainer_state(tmp_path / "c-06")["batches_done"] == 2
    resumed = make_trainer(epochs=EPOCHS, seed=11)
    logs = EpochLogs()
    resumed.fit(callbacks=[logs, ModelCheckpoint(config)], resume=True)
    assert resumed.initial_epoch == 1
    assert_same_run(resumed, reference)
    straight = EpochLogs()
    make_trainer(epochs=EPOCHS).fit(callbacks=[straight])
    assert logs.logs == {1: straight.logs[1], 2: straight.logs[2]}


def test_a_signal_during_validation_stops_at_the_epoch_end(
    tmp_path: Path, reference: Trainer
) -> None:
    config = CheckpointConfig(dirpath=tmp_path, every_n_epochs=2, save_top_k=-1)
    trainer = make_trainer(epochs=EPOCHS)
    # Step 4 is the last of epoch 0, which is not eligible (1, 3, ... are).
    with pytest.raises(TrainingPreempted) as info:
        trainer.fit(callbacks=[Signal(at=4, hook="validation"), ModelCheckpoint(config)])
    assert trainer.epoch == 0 and trainer.step == 4  # not one step into epoch 1
    assert info.value.checkpoint is not None
    state = trainer_state(info.value.checkpoint)
    assert "batches_done" not in state and state["reason"] == "preempted"  # epoch complete

    resumed = make_trainer(epochs=EPOCHS, seed=3)
    checkpoint = ModelCheckpoint(config)
    resumed.fit(callbacks=[checkpoint], resume=True)
    assert resumed.initial_epoch == 1
    assert_same_run(resumed, reference)
    assert checkpoint.manager.all_steps() == [1, 2]


def test_preempted_twice_in_one_epoch_keeps_the_later_state(
    tmp_path: Path, reference: Trainer
) -> None:
    config = CheckpointConfig(dirpath=tmp_path, filename="w-{epoch}", save_weights_only=True)
    with pytest.raises(TrainingPreempted):
        make_trainer(epochs=EPOCHS).fit(callbacks=[Signal(at=5), ModelCheckpoint(config)])
    again = make_trainer(epochs=EPOCHS, seed=1)
    with pytest.raises(TrainingPreempted) as info:
        again.fit(callbacks=[Signal(at=7), ModelCheckpoint(config)], resume=True)
    # The partial of step 7 replaced that of step 5 (both are epoch 1). Though the run
    # saves weights only, a partial checkpoint holds the optimizer too: it is for resuming.
    assert step_dirs(tmp_path) == {"w-0", "w-1-preempted"}
    assert info.value.checkpoint is not None
    assert trainer_state(info.value.checkpoint)["global_step"] == 7
    assert (Path(info.value.checkpoint) / "optimizer").is_dir()
    assert not (tmp_path / "w-0" / "optimizer").exists()
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.checkpoint == info.value.checkpoint and copy.step == 7

    last = make_trainer(epochs=EPOCHS, seed=2)
    last.fit(callbacks=[ModelCheckpoint(config)], resume=True)
    assert_same_run(last, reference)
    assert step_dirs(tmp_path) == {"w-0", "w-1", "w-2"}


def test_the_guard_is_installed_only_inside_fit_and_chains_the_previous_handler(
    tmp_path: Path,
) -> None:
    calls: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    class Probe(BaseCallback):
        def __init__(self) -> None:
            self.seen: list[object] = []

        def on_train_begin(self, trainer: Any) -> None:
            self.seen.append(signal.getsignal(signal.SIGTERM))

    old = signal.signal(signal.SIGTERM, previous)
    try:
        probe = Probe()
        with pytest.raises(TrainingPreempted):
            make_trainer(epochs=2).fit(
                callbacks=[probe, Signal(at=2), ModelCheckpoint(CheckpointConfig(tmp_path))]
            )
        assert probe.seen[0] is not previous  # the guard's, during fit
        assert signal.getsignal(signal.SIGTERM) is previous  # put back after fit
        assert calls == [signal.SIGTERM]  # and called with the first signal
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigint_stops_cleanly_only_when_opted_in(tmp_path: Path, reference: Trainer) -> None:
    config = CheckpointConfig(dirpath=tmp_path / "opt-in", filename="i-{epoch}")
    trainer = make_trainer(epochs=EPOCHS)
    trainer.catch_sigint = True
    with pytest.raises(TrainingPreempted) as info:
        trainer.fit(callbacks=[Signal(at=5, signum=signal.SIGINT), ModelCheckpoint(config)])
    assert info.value.signal_name == "SIGINT"
    assert info.value.checkpoint is not None and info.value.checkpoint.name == "i-1-preempted"
    resumed = make_trainer(epochs=EPOCHS, seed=4)
    resumed.fit(callbacks=[ModelCheckpoint(config)], resume=True)
    assert_same_run(resumed, reference)

    # Without the opt-in, Ctrl-C is Python's KeyboardInterrupt: nothing is saved for it,
    # and the directory is released.
    plain = CheckpointConfig(dirpath=tmp_path / "plain", filename="p-{epoch}")
    with pytest.raises(KeyboardInterrupt):
        make_trainer(epochs=EPOCHS).fit(
            callbacks=[Signal(at=5, signum=signal.SIGINT), ModelCheckpoint(plain)]
        )
    assert step_dirs(tmp_path / "plain") == {"p-0"}
    MetricCheckpointManager(tmp_path / "plain").close()  # no live writer holds it


# --- save_on_exception ------------------------------------------------------------------


def test_save_on_exception_saves_the_failing_step_and_reraises_the_same_error(
    tmp_path: Path, reference: Trainer
) -> None:
    config = CheckpointConfig(dirpath=tmp_path, filename="x-{epoch}-{step}", save_on_exception=True)
    error = RuntimeError("the loss exploded")
    fail = Fail(at=6, error=error)
    with pytest.raises(RuntimeError) as info:
        make_trainer(epochs=EPOCHS).fit(callbacks=[fail, ModelCheckpoint(config)])
    assert info.value is error and not getattr(error, "__notes__", None)
    assert "x-1-6-exception" in step_dirs(tmp_path)
    path = tmp_path / "x-1-6-exception"
    assert custom_metadata(path)["reason"] == "exception"

    # The checkpoint holds the state at the failing step; resuming continues from it.
    restored = make_trainer(epochs=EPOCHS, seed=8)
    restored.fit(callbacks=[ModelCheckpoint(config)], resume=str(path))
    assert_same_run(restored, reference)


def test_without_save_on_exception_an_error_saves_nothing_new(tmp_path: Path) -> None:
    config = CheckpointConfig(dirpath=tmp_path, filename="x-{epoch}")
    with pytest.raises(ValueError, match="bad batch"):
        make_trainer(epochs=EPOCHS).fit(
            callbacks=[Fail(at=6, error=ValueError("bad batch")), ModelCheckpoint(config)]
        )
    assert step_dirs(tmp_path) == {"x-0"}


def test_a_failing_exception_save_is_noted_on_the_error_never_replacing_it(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    config = CheckpointConfig(dirpath=run, filename="x-{epoch}", save_on_exception=True)
    checkpoint = ModelCheckpoint(config)

    def break_the_directory() -> None:
        # Once epoch 0's save has committed, the directory is moved away and a file takes
        # its place: the exception checkpoint cannot be written.
        checkpoint.manager.wait_until_finished()
        run.rename(tmp_path / "moved")
        run.write_text("not a directory")

    error = RuntimeError("original")
    with pytest.raises(RuntimeError) as info:
        make_trainer(epochs=EPOCHS).fit(
            callbacks=[Fail(at=6, error=error, before=break_the_directory), checkpoint]
        )
    assert info.value is error
    notes = "\n".join(getattr(error, "__notes__", []))
    assert "the exception checkpoint failed" in notes, notes


def test_errors_before_training_reach_on_exception_and_release_the_directory(
    tmp_path: Path,
) -> None:
    make_trainer(epochs=1).fit(callbacks=[ModelCheckpoint(CheckpointConfig(tmp_path))])

    class Seen(BaseCallback):
        def __init__(self) -> None:
            self.errors: list[BaseException] = []

        def on_exception(self, trainer: Any, error: BaseException) -> None:
            self.errors.append(error)

    config = CheckpointConfig(dirpath=tmp_path, save_on_exception=True)
    seen = Seen()
    with pytest.raises(CheckpointNotFoundError, match="step 7"):
        make_trainer(epochs=2).fit(callbacks=[seen, ModelCheckpoint(config)], resume=7)
    seen_begin = Seen()
    with pytest.raises(StepError, match="already holds"):
        make_trainer(epochs=2).fit(callbacks=[seen_begin, ModelCheckpoint(config)])
    assert [type(e) for e in seen.errors + seen_begin.errors] == [
        CheckpointNotFoundError,
        StepError,
    ]
    assert len(step_dirs(tmp_path)) == 1  # nothing saved for an error before training
    MetricCheckpointManager(tmp_path).close()  # and no live writer holds the directory


# --- resume from any checkpoint ---------------------------------------------------------


def test_resume_from_best_a_step_or_a_path(tmp_path: Path, reference: Trainer) -> None:
    run = tmp_path / "run"
    config = CheckpointConfig(dirpath=run, save_top_k=-1, filename="r-{epoch}")
    scripted = ScriptedMetric("val_loss", [0.4, 0.5, 0.3, 0.2])
    make_trainer(epochs=2).fit(callbacks=[scripted, ModelCheckpoint(config)])

    # Epoch 0 is the best, epoch 1 the newest: resuming from epoch 0 would write over 1.
    for source in ("best", 0):
        with pytest.raises(StepError, match=rf"resume={source!r} is step 0 \(r-0\).*newer.*r-1"):
            make_trainer(epochs=EPOCHS).fit(callbacks=[ModelCheckpoint(config)], resume=source)
    # The newest step continues the run; then its epoch 2 is the best and the newest.
    resumed = make_trainer(epochs=EPOCHS, seed=1)
    resumed.fit(callbacks=[scripted, ModelCheckpoint(config)], resume=1)
    assert_same_run(resumed, reference)
    longer = make_trainer(epochs=EPOCHS + 1, seed=1)
    longer.fit(callbacks=[scripted, ModelCheckpoint(config)], resume="best")
    assert longer.initial_epoch == EPOCHS and step_dirs(run) == {f"r-{e}" for e in range(4)}

    # Another run's checkpoint, by path, into a new directory: fine-tuning. Numbering
    # continues from the restored epoch and global step.
    tuned = make_trainer(epochs=EPOCHS, seed=2)
    target = ModelCheckpoint(
        CheckpointConfig(dirpath=tmp_path / "tuned", filename="t-{epoch}-{step}")
    )
    tuned.fit(callbacks=[target], resume=run / "r-0")
    assert tuned.initial_epoch == 1
    assert step_dirs(tmp_path / "tuned") == {"t-1-8", "t-2-12"}
    assert_same_run(tuned, reference)

    with pytest.raises(CheckpointNotFoundError, match="is not a checkpoint of"):
        make_trainer(epochs=EPOCHS).fit(
            callbacks=[ModelCheckpoint(CheckpointConfig(tmp_path / "other"))],
            resume=run / "r-9",
        )


# --- data position ----------------------------------------------------------------------


def _records(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, x @ (np.arange(8, dtype=np.float32).reshape(4, 2) / 8)


def grain_dataset() -> Any:
    x, y = _records(48)
    return (
        grain.MapDataset.source(np.arange(48))
        .shuffle(seed=7)
        .repeat(2)
        .map(lambda i: {"x": x[i], "y": y[i]})
        .batch(8)
        .to_iter_dataset()
    )


def grain_loader() -> Any:
    x, y = _records(48)
    sampler = grain.samplers.IndexSampler(
        num_records=48,
        shuffle=True,
        seed=11,
        num_epochs=2,
        shard_options=grain.sharding.NoSharding(),
    )

    class Source:
        def __len__(self) -> int:
            return 48

        def __getitem__(self, i: int) -> dict[str, np.ndarray]:
            return {"x": x[i], "y": y[i]}

        def __repr__(self) -> str:
            return "Source(48 records)"  # grain checks the source by its repr on restore

    return grain.DataLoader(
        data_source=Source(),
        sampler=sampler,
        operations=[grain.transforms.Batch(8)],
        worker_count=0,
    )


def grain_trainer(data: Any, seed: int = 0) -> Trainer:
    model = TinyMLP(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return Trainer(
        model, optimizer, mse_loss, data, batches(2, 2), epochs=EPOCHS, steps_per_epoch=4
    )


@pytest.mark.parametrize(
    "make_data",
    # The IterDataset and DataLoader themselves: Trainer iterates each once, as a stream.
    [grain_dataset, grain_loader],
    ids=["IterDataset", "DataLoader"],
)
def test_shuffled_grain_data_preempted_mid_epoch_resumes_bit_for_bit(
    tmp_path: Path, make_data: Callable[[], Any]
) -> None:
    straight = grain_trainer(make_data())
    straight.fit()
    assert straight.step == EPOCHS * 4

    config = CheckpointConfig(dirpath=tmp_path, filename="g-{epoch}-{step}")
    with pytest.raises(TrainingPreempted) as info:
        grain_trainer(make_data()).fit(callbacks=[Signal(at=6), ModelCheckpoint(config)])
    assert info.value.checkpoint is not None
    assert (Path(info.value.checkpoint) / DATA_ITEM / "process_0-of-1.json").is_file()

    resumed = grain_trainer(make_data(), seed=9)
    resumed.fit(callbacks=[ModelCheckpoint(config)], resume=True)
    assert_same_run(resumed, straight)


def test_an_epoch_function_resumes_mid_epoch_exactly(tmp_path: Path) -> None:
    def data(epoch: int) -> list[dict[str, np.ndarray]]:
        return batches(4, seed=100 + epoch)

    def trainer(seed: int = 0) -> Trainer:
        model = TinyMLP(nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        return Trainer(model, optimizer, mse_loss, data, batches(2, 2), epochs=EPOCHS)

    straight = trainer()
    straight.fit()
    config = CheckpointConfig(dirpath=tmp_path, filename="f-{epoch}")
    with pytest.raises(TrainingPreempted):
        trainer().fit(callbacks=[Signal(at=7), ModelCheckpoint(config)])
    resumed = trainer(seed=3)
    resumed.fit(callbacks=[ModelCheckpoint(config)], resume=True)
    assert_same_run(resumed, straight)


def test_a_one_shot_iterator_resumes_by_replaying_its_start(tmp_path: Path) -> None:
    def stream() -> Iterator[dict[str, np.ndarray]]:
        yield from batches(EPOCHS * 4, seed=5)

    def trainer(seed: int = 0) -> Trainer:
        model = TinyMLP(nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        return Trainer(
            model, optimizer, mse_loss, stream(), batches(2, 2), epochs=EPOCHS, steps_per_epoch=4
        )

    assert not is_grain_source(stream())
    config = CheckpointConfig(dirpath=tmp_path, filename="o-{epoch}")
    with pytest.raises(TrainingPreempted) as info:
        trainer().fit(callbacks=[Signal(at=6), ModelCheckpoint(config)])
    assert info.value.checkpoint is not None
    assert not (Path(info.value.checkpoint) / DATA_ITEM).exists()  # no position to save
    resumed = trainer(seed=2)
    resumed.fit(callbacks=[ModelCheckpoint(config)], resume=True)
    # The run completes: a fresh generator starts over, so epoch 1's last two steps see
    # the stream's first two batches again.
    assert resumed.step == EPOCHS * 4 and resumed.epoch == EPOCHS - 1
