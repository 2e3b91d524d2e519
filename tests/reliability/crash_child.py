"""Child process for the crash tests: trains with ModelCheckpoint until it is killed.

Usage: python -m tests.reliability.crash_child ROOT SEED JOURNAL

Before each epoch's save it appends {"epoch", "digest", "val_loss"} to JOURNAL, and once
ModelCheckpoint has waited for the previous save it appends {"committed": epoch - 1}.
Each line is fsync'ed, so whatever the parent reads was true before the kill.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from artifex_ckpt import BaseCallback, CheckpointConfig, ModelCheckpoint, Trainer

WIDTH = 1024  # two 4 MiB kernels; with Adam's two moments about 25 MiB per checkpoint
TOP_K = 2


class Wide(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.out = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


def loss_fn(model: Wide, batch: dict[str, Any]) -> jax.Array:
    return jnp.mean((model(batch["x"]) - batch["x"]) ** 2)


def make_trainer(seed: int, epochs: int) -> Trainer:
    rng = np.random.default_rng(0)
    data = [{"x": rng.normal(size=(8, WIDTH)).astype(np.float32)} for _ in range(2)]
    model = Wide(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    return Trainer(model, optimizer, loss_fn, data, data[:1], epochs=epochs)


def config(root: str) -> CheckpointConfig:
    return CheckpointConfig(
        dirpath=root, filename="ck-{epoch:03d}-{val_loss:.4f}", save_top_k=TOP_K
    )


def digest(model: nnx.Module, optimizer: nnx.Optimizer) -> str:
    h = hashlib.sha256()
    for tree in (nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(optimizer))):
        for leaf in jax.tree.leaves(tree):
            h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


class _Journal:
    def __init__(self, path: str) -> None:
        self._file = open(path, "a")  # noqa: SIM115 - lives as long as the process

    def write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


class RecordState(BaseCallback):
    """Scripts a random val_loss and journals the state that is about to be saved."""

    __slots__ = ("journal", "rng")

    def __init__(self, journal: _Journal, seed: int) -> None:
        self.journal, self.rng = journal, np.random.default_rng(seed)

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
        logs["val_loss"] = round(float(self.rng.uniform(0, 1)), 4)
        entry = {"epoch": epoch, "val_loss": logs["val_loss"]}
        self.journal.write({**entry, "digest": digest(trainer.model, trainer.optimizer)})


class RecordCommit(BaseCallback):
    """After ModelCheckpoint's save of `epoch`, the save of `epoch - 1` has committed."""

    __slots__ = ("journal",)

    def __init__(self, journal: _Journal) -> None:
        self.journal = journal

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
        if epoch > 0:
            self.journal.write({"committed": epoch - 1})


def main(root: str, seed: int, journal_path: str) -> None:
    journal = _Journal(journal_path)
    trainer = make_trainer(seed, epochs=10_000)
    callbacks = [RecordState(journal, seed), ModelCheckpoint(config(root)), RecordCommit(journal)]
    trainer.fit(callbacks=callbacks)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
