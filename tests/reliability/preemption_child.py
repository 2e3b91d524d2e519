"""Child process for the preemption trials: trains with ModelCheckpoint until told to stop.

Usage: python -m tests.reliability.preemption_child ROOT KIND MARKER [slow-exit]

KIND is "sequence" (a list of batches, a checkpoint per epoch) or "grain" (a shuffled
grain pipeline, one stream, a checkpoint every 5 steps). Once the first step has trained
(so `Trainer.fit` has installed its SIGTERM handler), the child creates MARKER. A
SIGTERM then ends `fit` with `TrainingPreempted`, which is left uncaught: the process
exits non-zero and its message is the last line of stderr, as a scheduler would see it.
With `slow-exit`, the stop lingers two seconds before the preemption checkpoint is saved,
so that a second signal surely arrives while the first is being handled.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import grain
import numpy as np
import optax
from flax import nnx

from artifex_ckpt import BaseCallback, CheckpointConfig, ModelCheckpoint, Trainer
from tests.conftest import TinyMLP
from tests.training import batches, mse_loss

KINDS = ("sequence", "grain")
EPOCHS, STEPS = 6, 8
PAUSE_S = 0.015  # per step, so that a run lasts about a second and signals land mid-run


def _grain_data() -> Any:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = x @ (np.arange(8, dtype=np.float32).reshape(4, 2) / 8)
    return (
        grain.MapDataset.source(np.arange(64))
        .shuffle(seed=5)
        .repeat(EPOCHS)
        .map(lambda i: {"x": x[i], "y": y[i]})
        .batch(8)
        .to_iter_dataset()
    )


def make_trainer(kind: str, seed: int = 0) -> Trainer:
    """The same run in every process: `seed` only sets the initial weights."""
    model = TinyMLP(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    if kind == "sequence":
        data: Any = batches(STEPS, seed=1)
        return Trainer(model, optimizer, mse_loss, data, batches(2, 2), epochs=EPOCHS)
    return Trainer(
        model,
        optimizer,
        mse_loss,
        _grain_data(),
        batches(2, 2),
        epochs=EPOCHS,
        steps_per_epoch=STEPS,
    )


def config(kind: str, root: str | Path) -> CheckpointConfig:
    if kind == "sequence":
        return CheckpointConfig(
            dirpath=root, filename="p-{epoch:02d}-{step:03d}-{val_loss:.4f}", save_top_k=2
        )
    return CheckpointConfig(
        dirpath=root,
        filename="g-{epoch:02d}-{step:03d}-{loss:.4f}",
        monitor="loss",
        save_top_k=2,
        every_n_train_steps=5,
    )


class Started(BaseCallback):
    """Creates the marker after the first step, and paces the run."""

    __slots__ = ("marker",)

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_batch_end(self, trainer: Any, batch: int, logs: Any) -> None:
        if not self.marker.exists():
            self.marker.touch()
        time.sleep(PAUSE_S)


class SlowExit(BaseCallback):
    """Lingers in `on_exception`, before the callbacks after it save."""

    __slots__ = ()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        time.sleep(2.0)


def main(root: str, kind: str, marker: str, *options: str) -> None:
    trainer = make_trainer(kind)
    callbacks: list[BaseCallback] = [Started(Path(marker))]
    if "slow-exit" in options:
        callbacks.append(SlowExit())
    callbacks.append(ModelCheckpoint(config(kind, root)))
    trainer.fit(callbacks=callbacks)
    print(f"finished at step {trainer.step}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
