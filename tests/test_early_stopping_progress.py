"""EarlyStopping rules and the rich progress bar, on a real Trainer."""

from __future__ import annotations

import copy
import functools
import io
import math
import pickle
from typing import Any

import pytest
from rich.console import Console

from artifex_ckpt import (
    ConfigError,
    EarlyStopping,
    EarlyStoppingConfig,
    MetricError,
    ProgressBarCallback,
    ProgressBarConfig,
)
from artifex_ckpt.trainer import Trainer
from tests.training import ScriptedMetric, make_trainer


@functools.cache
def _trainer() -> Trainer:
    """One trainer for the scripted runs, so its steps compile once: the scripted
    metric, not the model, decides when to stop."""
    return make_trainer(n_train=1)


def _run(values: list[float], **config: Any) -> tuple[EarlyStopping, int]:
    stopper = EarlyStopping(EarlyStoppingConfig(**config))
    trainer = _trainer()
    trainer.epochs = len(values)
    monitor = config.get("monitor", "val_loss")
    trainer.fit(callbacks=[ScriptedMetric(monitor, values), stopper])
    return stopper, trainer.epoch


def test_patience_counts_epochs_without_improvement() -> None:
    stopper, last = _run([1.0, 0.9, 0.95, 0.93, 0.92, 0.5], patience=3)
    assert (stopper.stopped_epoch, last) == (4, 4)
    assert stopper.best_score == 0.9
    assert "did not improve" in (stopper.stop_reason or "")


def test_min_delta_ignores_tiny_improvements() -> None:
    stopper, _ = _run([1.0, 0.99, 0.98, 0.97], patience=2, min_delta=0.05)
    assert stopper.stopped_epoch == 2


def test_max_mode() -> None:
    stopper, _ = _run([0.1, 0.5, 0.4, 0.3, 0.9], monitor="acc", mode="max", patience=2)
    assert stopper.stopped_epoch == 3


def test_nan_stops_at_once_when_check_finite() -> None:
    stopper, _ = _run([1.0, math.nan, 0.5], patience=5)
    assert stopper.stopped_epoch == 1 and "not finite" in (stopper.stop_reason or "")
    unchecked, _ = _run([1.0, math.nan, 0.5], patience=5, check_finite=False)
    assert unchecked.stopped_epoch is None


def test_stopping_and_divergence_thresholds() -> None:
    stopper, _ = _run([1.0, 0.2, 0.05, 0.01], stopping_threshold=0.1)
    assert stopper.stopped_epoch == 2
    stopper, _ = _run([1.0, 3.0, 12.0, 0.5], divergence_threshold=10.0)
    assert stopper.stopped_epoch == 2 and "diverged" in (stopper.stop_reason or "")


def test_missing_monitor_is_named() -> None:
    stopper = EarlyStopping(EarlyStoppingConfig(monitor="val_fid"))
    with pytest.raises(MetricError, match=r"'val_fid'.*logs have"):
        make_trainer(epochs=1).fit(callbacks=[stopper])


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"patience": -1}, "patience"),
        ({"mode": "up"}, "mode"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"monitor": ""}, "monitor"),
    ],
)
def test_config_errors(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        EarlyStoppingConfig(**kwargs)


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200, force_terminal=False, color_system=None), buffer


def test_progress_bar_batch_total_is_the_number_of_batches() -> None:
    console, buffer = _console()
    trainer = make_trainer(epochs=2, n_train=5)
    bar = ProgressBarCallback(ProgressBarConfig(show_eta=False), console=console)
    trainer.fit(callbacks=[bar])
    text = buffer.getvalue()
    assert "5/5" in text  # batches of the last epoch, out of the real total
    assert "2/2" in text  # epochs
    assert "val_loss=" in text


def test_disabled_progress_bar_writes_nothing() -> None:
    console, buffer = _console()
    bar = ProgressBarCallback(ProgressBarConfig(disable=True), console=console)
    make_trainer(epochs=1).fit(callbacks=[bar])
    assert buffer.getvalue() == ""


def test_progress_bar_copies_share_the_console_and_pickles_leave_it() -> None:
    console, buffer = _console()
    bar = ProgressBarCallback(ProgressBarConfig(show_eta=False), console=console)
    for twin in (copy.copy(bar), copy.deepcopy(bar)):
        assert twin is not bar and twin.config == bar.config and twin.console is console
    unpickled = pickle.loads(pickle.dumps(bar))
    assert unpickled.config == bar.config and unpickled.console is None
    twin = copy.deepcopy(bar)
    make_trainer(epochs=1, n_train=3).fit(callbacks=[twin])
    assert "3/3" in buffer.getvalue()


def test_early_stopping_copies_count_on_their_own() -> None:
    stopper = EarlyStopping(EarlyStoppingConfig(patience=1))
    for twin in (copy.deepcopy(stopper), pickle.loads(pickle.dumps(stopper))):
        trainer = _trainer()
        trainer.epochs = 4
        trainer.fit(callbacks=[ScriptedMetric("val_loss", [0.5, 0.6, 0.4, 0.3]), twin])
        assert (twin.stopped_epoch, twin.best_score) == (1, 0.5)
    assert stopper.stopped_epoch is None and stopper.best_score is None
