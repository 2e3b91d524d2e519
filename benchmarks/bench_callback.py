"""B1: what `ModelCheckpoint.on_epoch_end` adds on an epoch that writes nothing, and what
`on_batch_end` adds on a batch that writes nothing (it runs after every training step)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from artifex_ckpt import BaseCallback, CheckpointConfig, ModelCheckpoint
from benchmarks.fixtures import MLP, scratch
from benchmarks.report import Figure
from benchmarks.timing import Sample, Spread, column, difference, per_call, ratio, run_trials

NS = 1e9


def run(args: argparse.Namespace) -> list[Figure]:
    # All a callback reads; step 1 is not a multiple of every_n_train_steps below.
    trainer = SimpleNamespace(
        model=MLP(16, 2, nnx.Rngs(0)), optimizer=None, data_iterator=None, epoch=0, step=1
    )
    value = jnp.asarray(0.9)  # a JAX scalar: reading it syncs with the device
    logs = {"val_loss": value}
    noop = BaseCallback()
    # Deciding "not top-k" costs far more than an integer test, so fewer calls suffice.
    calls, few = args.calls, max(args.calls // 20, 100)
    with scratch("callback") as root:
        every2 = ModelCheckpoint(CheckpointConfig(dirpath=root / "every2", every_n_epochs=2))
        top1 = ModelCheckpoint(
            CheckpointConfig(dirpath=root / "top1", save_top_k=1, save_last=False)
        )
        top1.on_epoch_end(trainer, 0, {"val_loss": jnp.asarray(0.1)})  # the best, on disk
        top1.manager.wait_until_finished()
        # Batch-end cadences on a batch that saves nothing; the logs are a step's metrics.
        steps = ModelCheckpoint(_step_config(root / "steps", every_n_train_steps=1000))
        timed = ModelCheckpoint(_step_config(root / "time", train_time_interval=3600.0))
        epochs = ModelCheckpoint(CheckpointConfig(dirpath=root / "epochs"))
        batch_logs = {"loss": value, "accuracy": value}
        cases = {
            "noop": per_call(lambda: noop.on_epoch_end(trainer, 2, logs), calls),
            # every_n_epochs=2: epochs 1, 3, ... are eligible (0-based), epoch 2 is not.
            "ineligible": per_call(lambda: every2.on_epoch_end(trainer, 2, logs), calls),
            "noop-few": per_call(lambda: noop.on_epoch_end(trainer, 1, logs), few),
            "not-top-k": per_call(lambda: top1.on_epoch_end(trainer, 1, logs), few),
            # The floor of any decision by score: reading the JAX value once, as float()
            # does it and as the library does (through numpy, about 4x cheaper).
            "read": per_call(lambda: float(value), few),
            "read-numpy": per_call(lambda: float(np.asarray(value)), few),
            "noop-batch": per_call(lambda: noop.on_batch_end(trainer, 1, batch_logs), calls),
            "batch-steps": per_call(lambda: steps.on_batch_end(trainer, 1, batch_logs), calls),
            "batch-time": per_call(lambda: timed.on_batch_end(trainer, 1, batch_logs), calls),
            "batch-epochs": per_call(lambda: epochs.on_batch_end(trainer, 1, batch_logs), calls),
        }
        try:
            samples = run_trials(cases, args.trials)
        finally:
            for callback in (every2, top1):
                callback.manager.close()
    return _figures(samples, calls, few)


def _step_config(dirpath: Path, **cadence: Any) -> CheckpointConfig:
    return CheckpointConfig(dirpath=dirpath, filename="m-{step}", monitor="loss", **cadence)


def _sums(a: list[float], b: list[float]) -> list[float]:
    return [x + y for x, y in zip(a, b, strict=True)]


def _figures(samples: dict[str, list[Sample]], calls: int, few: int) -> list[Figure]:
    def per(name: str) -> list[float]:
        return [t * NS for t in column(samples[name], "call")]

    return [
        Figure(
            "B1",
            "added per call, ineligible epoch (ns)",
            difference(per("ineligible"), per("noop")),
            fmt=".0f",
            target=1000,
            note=f"every_n_epochs=2, epoch 2; {calls} calls/trial",
        ),
        Figure(
            "B1", "per call: ineligible / no-op callback", ratio(per("ineligible"), per("noop"))
        ),
        Figure(
            "B1",
            "added per call, not top-k (ns)",
            difference(per("not-top-k"), per("noop-few")),
            fmt=".0f",
            note=f"save_top_k=1, save_last=False; {few} calls/trial",
        ),
        Figure(
            "B1",
            "  float(JAX scalar) (ns)",
            Spread.of(per("read")),
            fmt=".0f",
            note="reading the monitored value: the floor of the target",
        ),
        Figure(
            "B1",
            "added per call, not top-k, beyond float(JAX scalar) (ns)",
            difference(per("not-top-k"), _sums(per("noop-few"), per("read"))),
            fmt=".0f",
            target=1000,
            note="issue 10's target: within 1 us of the float-conversion floor",
        ),
        Figure(
            "B1",
            "  float(np.asarray(JAX scalar)) (ns)",
            Spread.of(per("read-numpy")),
            fmt=".0f",
            note="the same read as the library makes it",
        ),
        Figure(
            "B1",
            "added per call, not top-k, beyond the library's read (ns)",
            difference(per("not-top-k"), _sums(per("noop-few"), per("read-numpy"))),
            fmt=".0f",
            note="the decision itself, beyond reading the value",
        ),
        Figure(
            "B1",
            "added per batch end, step cadence, not due (ns)",
            difference(per("batch-steps"), per("noop-batch")),
            fmt=".0f",
            target=1000,
            note=f"every_n_train_steps=1000, step 1; {calls} calls/trial",
        ),
        Figure(
            "B1",
            "added per batch end, time cadence, not due (ns)",
            difference(per("batch-time"), per("noop-batch")),
            fmt=".0f",
            target=1000,
            note="train_time_interval=1 h: one clock read",
        ),
        Figure(
            "B1",
            "added per batch end, epoch cadence (ns)",
            difference(per("batch-epochs"), per("noop-batch")),
            fmt=".0f",
            target=1000,
            note="the default: returns at once",
        ),
    ]
