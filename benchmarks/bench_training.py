"""B4: wall time of a real training run that checkpoints every epoch, against none."""

from __future__ import annotations

import argparse
import itertools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from artifex_ckpt import (
    BaseCallback,
    CheckpointConfig,
    ModelCheckpoint,
    Trainer,
)
from benchmarks.fixtures import (
    MiB,
    model_and_optimizer,
    nbytes,
    orbax_kwargs,
    scratch,
    state_arrays,
)
from benchmarks.report import Figure
from benchmarks.timing import Case, Sample, column, ratio, run_trials, timed

Batch = dict[str, np.ndarray]


def _batches(count: int, size: int, width: int, seed: int) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(size, width)).astype(np.float32),
            "y": rng.normal(size=(size, width)).astype(np.float32),
        }
        for _ in range(count)
    ]


def _mse(model: Any, batch: Batch) -> jax.Array:
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


class _WaitEachEpoch(BaseCallback):
    """Makes saving synchronous: save, then wait until committed, every epoch."""

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
        self.checkpoint.manager.wait_until_finished()


def _checkpoint(path: Path, compress: bool) -> ModelCheckpoint:
    return ModelCheckpoint(CheckpointConfig(dirpath=path), **orbax_kwargs(compress))


def _fit_case(trainer: Trainer, root: Path, callbacks: Callable[[Path], list]) -> Case:
    runs = itertools.count()

    def case() -> Sample:
        path = root / f"run-{next(runs)}"
        hooks = callbacks(path)
        sample = timed(lambda: trainer.fit(callbacks=hooks))
        for hook in hooks:
            if isinstance(hook, ModelCheckpoint):
                hook.manager.close()
        shutil.rmtree(path, ignore_errors=True)
        return sample

    return case


def run(args: argparse.Namespace) -> list[Figure]:
    model, optimizer = model_and_optimizer(args.train_mib)
    width = model.layers[0].kernel.shape[0]
    size = nbytes(state_arrays(model, optimizer))
    trainer = Trainer(
        model,
        optimizer,
        _mse,
        _batches(args.steps, args.batch, width, 0),
        _batches(2, args.batch, width, 1),
        epochs=1,
    )
    trainer.fit()  # compile once, outside every timing (fit reuses the jitted steps)
    trainer.epochs = args.epochs

    def sync(path: Path) -> list:
        checkpoint = _checkpoint(path, True)
        return [checkpoint, _WaitEachEpoch(checkpoint)]

    with scratch("train") as root:
        cases = {
            "none": _fit_case(trainer, root, lambda p: []),
            "async-zstd": _fit_case(trainer, root, lambda p: [_checkpoint(p, True)]),
            "sync-zstd": _fit_case(trainer, root, sync),
            "async-none": _fit_case(trainer, root, lambda p: [_checkpoint(p, False)]),
        }
        samples = run_trials(cases, args.train_trials, warmup=0)
    return _figures(samples, args, size)


def _figures(samples: dict[str, list[Sample]], args: argparse.Namespace, size: int) -> list[Figure]:
    none = column(samples["none"], "total")
    epoch_s = sorted(none)[len(none) // 2] / args.epochs
    figures = []
    for name in ("async-zstd", "async-none"):
        with_ckpt = column(samples[name], "total")
        spread = ratio(with_ckpt, none)
        added = (spread.median - 1) * epoch_s
        figures.append(
            Figure(
                "B4",
                f"wall: checkpointing / none, {name}",
                spread,
                target=1.05,
                note=f"+{added:.2f} s/epoch; 5% needs epochs >= {added / 0.05:.1f} s",
            )
        )
    figures.append(
        Figure(
            "B4",
            "wall: sync / async saving, zstd",
            ratio(column(samples["sync-zstd"], "total"), column(samples["async-zstd"], "total")),
            note=f"{args.epochs} epochs x {epoch_s:.2f} s, {size / MiB:.0f} MiB state",
        )
    )
    return figures
