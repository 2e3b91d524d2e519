"""Models, states, the disk reference and the compression switch shared by the benchmarks."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from artifex_ckpt.handlers import default_handler_registry

MiB = 2**20
# Adam keeps two moments per parameter, so model + optimizer state is ~3x the weights.
_STATE_PER_PARAM = 3 * 4


class MLP(nnx.Module):
    """Square dense layers: a state of any size with a realistic train step."""

    def __init__(self, width: int, depth: int, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


@functools.cache
def model_and_optimizer(state_mib: float, depth: int = 4) -> tuple[MLP, nnx.Optimizer]:
    """An MLP whose model + Adam state is about `state_mib` MiB (built once per size)."""
    width = int((state_mib * MiB / _STATE_PER_PARAM / depth) ** 0.5)
    model = MLP(width, depth, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
    # Fresh Adam moments are zeros, which compress to nothing: take one noisy step so
    # they hold float noise like a real run's (zstd then saves only a few percent).
    key = jax.random.key(1)
    grads = jax.tree.map(
        lambda x: jax.random.normal(key, x.shape, x.dtype), nnx.state(model, nnx.Param)
    )
    optimizer.update(model, grads)
    return model, optimizer


def state_arrays(*modules: nnx.Module | nnx.Optimizer) -> list[np.ndarray]:
    """The arrays a checkpoint of `modules` holds, as numpy."""
    leaves = jax.tree.leaves([nnx.to_pure_dict(nnx.state(m)) for m in modules])
    return [np.asarray(leaf) for leaf in leaves]


def nbytes(arrays: list[np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays)


def write_npy(arrays: list[np.ndarray], directory: Path) -> None:
    """The disk reference: each array to its own .npy, fsynced (as Orbax's writes are)."""
    for index, array in enumerate(arrays):
        with open(directory / f"{index}.npy", "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())


def read_npy(directory: Path) -> list[np.ndarray]:
    return [np.load(path) for path in sorted(directory.glob("*.npy"))]


def evict(directory: str | os.PathLike[str]) -> None:
    """Drop a tree's files from the page cache, so that reads come from the disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def orbax_kwargs(compress: bool) -> dict[str, Any]:
    """Manager kwargs: Orbax's default registry (zstd) or the library's (uncompressed)."""
    if compress:
        return {"handler_registry": ocp.handlers.DefaultCheckpointHandlerRegistry()}
    return {"handler_registry": default_handler_registry()}


def codec(compress: bool) -> str:
    return "zstd" if compress else "none"


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary directory under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"artifex-bench-{prefix}-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
