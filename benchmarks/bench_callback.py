"""B1: what `ModelCheckpoint.on_epoch_end` adds on an epoch that writes nothing."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import jax.numpy as jnp
from flax import nnx

from artifex_ckpt import BaseCallback, CheckpointConfig, ModelCheckpoint
from benchmarks.fixtures import MLP, scratch
from benchmarks.report import Figure
from benchmarks.timing import Sample, Spread, column, difference, per_call, ratio, run_trials

NS = 1e9


def run(args: argparse.Namespace) -> list[Figure]:
    trainer = SimpleNamespace(model=MLP(16, 2, nnx.Rngs(0)))  # all a callback reads
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
        cases = {
            "noop": per_call(lambda: noop.on_epoch_end(trainer, 2, logs), calls),
            # every_n_epochs=2: epochs 1, 3, ... are eligible (0-based), epoch 2 is not.
            "ineligible": per_call(lambda: every2.on_epoch_end(trainer, 2, logs), calls),
            "noop-few": per_call(lambda: noop.on_epoch_end(trainer, 1, logs), few),
            "not-top-k": per_call(lambda: top1.on_epoch_end(trainer, 1, logs), few),
            # The floor of any decision by score: reading the JAX value once.
            "read": per_call(lambda: float(value), few),
        }
        try:
            samples = run_trials(cases, args.trials)
        finally:
            for callback in (every2, top1):
                callback.manager.close()
    return _figures(samples, calls, few)


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
            target=1000,
            note=f"save_top_k=1, save_last=False; {few} calls/trial",
        ),
        Figure(
            "B1",
            "  of which float(JAX scalar) (ns)",
            Spread.of(per("read")),
            fmt=".0f",
            note="reading the monitored value: the floor",
        ),
    ]
