"""Shared fixtures: tiny real nnx models, optax optimizers and temp directories."""

from __future__ import annotations

import os

from tests.gcs_emulator import emulator_environment, gcs_bucket, gcs_dir  # noqa: F401

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Before anything imports fsspec, gcsfs or tensorstore: gs:// goes to a local emulator.
os.environ.update(emulator_environment())

from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("default")


class TinyMLP(nnx.Module):
    """Two layers and a BatchNorm, so model state has Params and BatchStats."""

    def __init__(self, rngs: nnx.Rngs, din: int = 4, dout: int = 2) -> None:
        self.dense = nnx.Linear(din, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.norm(self.dense(x))))


@pytest.fixture
def model() -> TinyMLP:
    return TinyMLP(nnx.Rngs(0))


@pytest.fixture
def optimizer(model: TinyMLP) -> nnx.Optimizer:
    return nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "ckpts"


def pure(tree: object) -> object:
    """A model's or optimizer's state as a pure dict of numpy arrays, for bit-exact compares."""
    if isinstance(tree, nnx.Module | nnx.Optimizer):
        tree = nnx.to_pure_dict(nnx.state(tree))
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a: object, b: object) -> None:
    """Same structure, same dtypes, same bits."""
    a, b = pure(a), pure(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def step_dirs(directory: Path) -> set[str]:
    """Names of the committed checkpoint directories on disk."""
    if not directory.exists():
        return set()
    return {
        p.name
        for p in directory.iterdir()
        if p.is_dir() and "orbax-checkpoint-tmp" not in p.name and not p.name.startswith(".")
    }
