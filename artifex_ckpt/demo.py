"""The demo: a small VAE on synthetic data, checkpointed by `ModelCheckpoint`.

Everything is made in code (nothing is downloaded): points on a curved 2-D manifold
embedded in 16 dimensions. The reparameterisation noise is part of each batch, so
validation loss is deterministic and a restored checkpoint reproduces its score.

The run directory explains itself afterwards: `artifex_history.jsonl` holds every decision
(`artifex-ckpt log DIR`), and the demo draws it into `DIR/curve.png` (what
`artifex-ckpt plot DIR -o curve.png` draws), when matplotlib is installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from rich.console import Console

from artifex_ckpt.callbacks import (
    EarlyStopping,
    EarlyStoppingConfig,
    ModelCheckpoint,
    ProgressBarCallback,
    ProgressBarConfig,
)
from artifex_ckpt.checkpointing import load_checkpoint
from artifex_ckpt.config import CheckpointConfig
from artifex_ckpt.history import DecisionHistory
from artifex_ckpt.plot import PlotDependencyError, plot_history
from artifex_ckpt.table import checkpoint_table
from artifex_ckpt.trainer import Trainer

__all__ = ["CURVE_FILE", "VAE", "DemoResult", "run_demo", "synthetic_batches", "vae_loss"]

CURVE_FILE = "curve.png"
"""The picture of the run's decision history that the demo writes into its run directory."""
MONITOR = "val_loss"

DATA_DIM, LATENT_DIM, HIDDEN = 16, 2, 64
Batch = Mapping[str, Any]


class VAE(nnx.Module):
    """A Gaussian VAE with MLP encoder and decoder."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.encoder = nnx.Linear(DATA_DIM, HIDDEN, rngs=rngs)
        self.mean = nnx.Linear(HIDDEN, LATENT_DIM, rngs=rngs)
        self.log_var = nnx.Linear(HIDDEN, LATENT_DIM, rngs=rngs)
        self.decoder_hidden = nnx.Linear(LATENT_DIM, HIDDEN, rngs=rngs)
        self.decoder_out = nnx.Linear(HIDDEN, DATA_DIM, rngs=rngs)

    def __call__(self, x: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        h = nnx.gelu(self.encoder(x))
        mean, log_var = self.mean(h), self.log_var(h)
        z = mean + jnp.exp(0.5 * log_var) * eps
        return self.decoder_out(nnx.gelu(self.decoder_hidden(z))), mean, log_var


def vae_loss(model: VAE, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative ELBO per example: reconstruction (squared error) plus KL."""
    reconstruction, mean, log_var = model(batch["x"], batch["eps"])
    recon = jnp.mean(jnp.sum((reconstruction - batch["x"]) ** 2, axis=-1))
    kl = jnp.mean(-0.5 * jnp.sum(1 + log_var - mean**2 - jnp.exp(log_var), axis=-1))
    return recon + kl, {"recon": recon, "kl": kl}


def synthetic_batches(n_batches: int, batch_size: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Points on a curved 2-D manifold in 16-D, with noise, plus fixed VAE noise."""
    rng = np.random.default_rng(seed)
    projection = np.random.default_rng(1234).normal(size=(4, DATA_DIM)).astype(np.float32)
    batches = []
    for _ in range(n_batches):
        u = rng.uniform(-2, 2, size=(batch_size, 2)).astype(np.float32)
        features = np.concatenate([np.sin(u), u**2 / 4], axis=1)
        x = features @ projection + 0.05 * rng.normal(size=(batch_size, DATA_DIM))
        eps = rng.normal(size=(batch_size, LATENT_DIM))
        batches.append({"x": x.astype(np.float32), "eps": eps.astype(np.float32)})
    return batches


@dataclass(frozen=True)
class DemoResult:
    """What the demo did: where, how far, whether the restored best matched, and the
    picture of its decision history (None when matplotlib is not installed)."""

    directory: str
    epochs_run: int
    best_path: str | None
    best_score: float | None
    restored_val_loss: float | None
    curve: str | None = None

    @property
    def matches(self) -> bool:
        if self.best_score is None or self.restored_val_loss is None:
            return False
        return abs(self.best_score - self.restored_val_loss) <= 1e-5 * max(1.0, self.best_score)


def _mean_loss(model: VAE, batches: list[dict[str, np.ndarray]]) -> float:
    """Validation loss computed as `Trainer` does: jitted, summed on device, averaged."""
    model.eval()
    step = nnx.jit(lambda m, b: vae_loss(m, b)[0])
    return float(sum(step(model, b) for b in batches) / len(batches))


def run_demo(
    directory: str | os.PathLike[str],
    *,
    epochs: int = 20,
    console: Console | None = None,
    progress: bool = True,
) -> DemoResult:
    """Train the VAE with checkpointing, early stopping and a progress bar, restore the
    best checkpoint into a fresh model and recompute its validation loss, then draw the
    run's decision history into `directory / CURVE_FILE`.

    Example:
        ```python
        result = run_demo("/tmp/vae-run", epochs=3, progress=False)
        assert result.matches and result.curve is not None
        ```
    """
    console = console or Console()
    train, val = synthetic_batches(32, 64, seed=0), synthetic_batches(8, 64, seed=1)
    model = VAE(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    checkpoint = ModelCheckpoint(
        CheckpointConfig(
            dirpath=directory,
            filename="vae-{epoch:02d}-{val_loss:.4f}",
            monitor=MONITOR,
            save_top_k=3,
        )
    )
    callbacks = [
        checkpoint,
        EarlyStopping(EarlyStoppingConfig(monitor=MONITOR, patience=5, min_delta=1e-4)),
        ProgressBarCallback(ProgressBarConfig(disable=not progress), console=console),
    ]
    trainer = Trainer(model, optimizer, vae_loss, train, val, epochs=epochs)
    trainer.fit(callbacks=callbacks)

    console.print(checkpoint_table(checkpoint.manager))
    restored_loss = None
    if checkpoint.manager.best_step() is not None:
        fresh = VAE(nnx.Rngs(42))
        load_checkpoint(checkpoint.manager, fresh, "best")
        restored_loss = _mean_loss(fresh, val)
    run = checkpoint.manager.directory
    result = DemoResult(
        directory=str(run),
        epochs_run=trainer.epoch + 1,
        best_path=None
        if checkpoint.best_checkpoint_path is None
        else str(checkpoint.best_checkpoint_path),
        best_score=checkpoint.best_score,
        restored_val_loss=restored_loss,
        curve=_draw_curve(run, console),
    )
    console.print(f"best checkpoint: {result.best_path}")
    console.print(
        f"stored val_loss {result.best_score:.6f}; restored model's val_loss "
        f"{result.restored_val_loss:.6f}: {'match' if result.matches else 'MISMATCH'}"
        if result.best_score is not None and result.restored_val_loss is not None
        else "no checkpoint with a finite val_loss to restore"
    )
    if result.curve is not None:
        console.print(
            f"decision history: artifex-ckpt log {run}; drawn in {result.curve}", markup=False
        )
    checkpoint.manager.close()
    return result


def _draw_curve(run: epath.Path, console: Console) -> str | None:
    """Draw the run's history into `run / CURVE_FILE`; None (and a hint) without matplotlib."""
    # The writer closed at the end of training, so every decision is in the file.
    decisions = DecisionHistory(run).read()
    curve = run / CURVE_FILE
    try:
        plot_history(decisions, MONITOR, "min", curve, unit="epoch")
    except PlotDependencyError as err:
        console.print(f"no picture of the run: {err}", markup=False)
        return None
    return str(curve)
