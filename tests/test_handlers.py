"""Arrays are written uncompressed, through a private attribute of Orbax's standard handler.

`UncompressedStandardCheckpointHandler` replaces `StandardCheckpointHandler._impl`. If Orbax
renamed or retyped that attribute, the replacement would silently stop mattering; these
tests fail loudly instead, by looking at the attribute and at the zarr metadata on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from artifex_ckpt import MetricCheckpointManager
from artifex_ckpt.handlers import UncompressedStandardCheckpointHandler, default_handler_registry
from tests.conftest import assert_trees_equal

ZEROS = np.zeros(1024 * 1024, np.float64)  # 8 MiB that any codec shrinks to almost nothing


def test_orbax_standard_handler_still_delegates_to_a_pytree_handler() -> None:
    # The attribute our handler replaces; a rename in Orbax must fail here, not in production.
    assert isinstance(ocp.StandardCheckpointHandler()._impl, ocp.PyTreeCheckpointHandler)
    ours = UncompressedStandardCheckpointHandler()
    assert isinstance(ours, ocp.StandardCheckpointHandler)
    assert type(ours._impl) is ocp.PyTreeCheckpointHandler


def zarr_metadata(item: Path) -> dict[str, dict[str, Any]]:
    """The `.zarray` metadata of every array of an item, read from its OCDBT store."""
    kvstore = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()
    keys = [key for key in kvstore.list().result() if key.endswith(b"/.zarray")]
    return {
        key.decode().removesuffix("/.zarray"): json.loads(kvstore.read(key).result().value)
        for key in keys
    }


def item_bytes(item: Path) -> int:
    return sum(f.stat().st_size for f in item.rglob("*") if f.is_file())


def save_zeros(root: Path, composite: bool, **kwargs: Any) -> Path:
    state = {"w": ZEROS}
    args: ocp.args.CheckpointArgs = ocp.args.StandardSave(state)
    if composite:
        args = ocp.args.Composite(model=args)
    with MetricCheckpointManager(root, monitor=None, **kwargs) as mgr:
        assert mgr.save(0, args=args)
        mgr.wait_until_finished()
        return Path(mgr.step_path(0)) / ("model" if composite else "default")


@pytest.mark.parametrize("composite", [True, False], ids=["composite-item", "default-item"])
def test_arrays_are_stored_without_a_compressor(tmp_path: Path, composite: bool) -> None:
    item = save_zeros(tmp_path / "ours", composite)
    metadata = zarr_metadata(item)
    assert list(metadata) == ["w"]
    assert metadata["w"]["compressor"] is None
    assert item_bytes(item) >= ZEROS.nbytes

    restored = ocp.StandardCheckpointer().restore(item)
    assert_trees_equal(restored, {"w": ZEROS})


def test_orbax_default_registry_brings_compression_back(tmp_path: Path) -> None:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    item = save_zeros(tmp_path / "zstd", True, handler_registry=registry)
    assert zarr_metadata(item)["w"]["compressor"] is not None
    assert item_bytes(item) < ZEROS.nbytes // 20
    assert_trees_equal(ocp.StandardCheckpointer().restore(item), {"w": ZEROS})


def test_default_registry_serves_standard_items_of_any_name() -> None:
    registry = default_handler_registry()
    # A general entry (item None) is what Orbax falls back to for every item name.
    handler = registry.get(None, ocp.args.StandardSave)
    assert isinstance(handler, UncompressedStandardCheckpointHandler)
    assert registry.get(None, ocp.args.StandardRestore) is handler
