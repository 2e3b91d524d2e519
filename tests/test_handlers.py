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


def test_primary_host_none_derives_per_host_options_and_keeps_the_callers(
    tmp_path: Path,
) -> None:
    from etils import epath

    from artifex_ckpt.plan import plan_manager

    alone = ocp.options.MultiprocessingOptions(primary_host=None)
    plan = plan_manager(
        epath.Path(tmp_path),
        None,
        {},
        ocp.CheckpointManagerOptions(multiprocessing_options=alone),
        process_index=3,
    )
    processes = plan.options.multiprocessing_options
    assert (processes.primary_host, processes.active_processes) == (None, {3})
    assert processes.barrier_sync_key_prefix == "host-3"
    assert plan.options.enable_per_process_directory_creation and plan.is_writer
    own = ocp.options.MultiprocessingOptions(
        primary_host=None, active_processes={7}, barrier_sync_key_prefix="mine"
    )
    kept = plan_manager(
        epath.Path(tmp_path),
        None,
        {},
        ocp.CheckpointManagerOptions(multiprocessing_options=own),
        process_index=3,
    ).options.multiprocessing_options
    assert (kept.active_processes, kept.barrier_sync_key_prefix) == ({7}, "mine")
    shared = plan_manager(epath.Path(tmp_path), None, {}, None, process_index=0)
    assert shared.options.multiprocessing_options.active_processes is None
    assert not shared.options.enable_per_process_directory_creation


def test_primary_host_none_refuses_host_side_values_instead_of_losing_them(
    tmp_path: Path,
) -> None:
    # Orbax writes numpy values from process 0 only: the other hosts' directories would lack
    # them. Per-host handlers take jax.Arrays (each host's own shards) and refuse the rest.
    import jax.numpy as jnp

    alone = ocp.options.MultiprocessingOptions(primary_host=None)
    # Synchronous: an asynchronous save refused this way leaves Orbax's signalling threads
    # waiting for a directory that is never created.
    options = ocp.CheckpointManagerOptions(
        multiprocessing_options=alone, enable_async_checkpointing=False
    )
    with MetricCheckpointManager(tmp_path, options=options) as manager:
        manager.save(0, args=ocp.args.StandardSave({"w": jnp.arange(4.0)}), metrics={"val_loss": 1})
        manager.wait_until_finished()
        restored = manager.restore(0, args=ocp.args.StandardRestore({"w": jnp.zeros(4)}))
        np.testing.assert_array_equal(restored["w"], np.arange(4.0))
        with pytest.raises(ValueError, match="TypeHandler lookup failed for: type=<class 'numpy"):
            manager.save(1, args=ocp.args.StandardSave({"w": np.ones(2)}), metrics={"val_loss": 1})
        assert manager.all_steps() == [0]
