"""A tiny real regression task for tests: data, loss and a Trainer factory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from artifex_ckpt import BaseCallback, Trainer
from tests.conftest import TinyMLP


def batches(n: int, seed: int, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    w = np.arange(8, dtype=np.float32).reshape(4, 2) / 8
    out: list[dict[str, np.ndarray]] = []
    for _ in range(n):
        x = rng.normal(size=(batch_size, 4)).astype(np.float32)
        out.append({"x": x, "y": x @ w})
    return out


def mse_loss(model: nnx.Module, batch: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    pred = model(batch["x"])
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"accuracy": jnp.mean(jnp.abs(pred - batch["y"]) < 0.5)}


def make_trainer(epochs: int = 3, seed: int = 0, n_train: int = 4) -> Trainer:
    model = TinyMLP(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return Trainer(model, optimizer, mse_loss, batches(n_train, 1), batches(2, 2), epochs=epochs)


class ScriptedMetric(BaseCallback):
    """Overwrites one metric in the epoch logs (before later callbacks see them)."""

    __slots__ = ("name", "values")

    def __init__(self, name: str, values: list[Any]) -> None:
        self.name, self.values = name, values

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
        logs[self.name] = self.values[epoch]
