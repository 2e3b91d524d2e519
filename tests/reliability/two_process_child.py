"""One of two JAX processes checkpointing together (or each on its own).

Usage: python -m tests.reliability.two_process_child PORT PROCESS_ID ROOT PHASE

PHASE is one of

- "save": both processes save a globally sharded state into ROOT with `keep_last=False`,
  each passing its OWN validation losses (the primary's decide), then restore the best;
- "restore": both reopen ROOT and restore the best only;
- "local": `primary_host=None`: each process saves host-local arrays into its own directory
  ROOT/host-<id>, deciding by its own losses, then restores its best; with nothing else
  set, the manager derives the rest (`StandardSave`);
- "local-by-hand": the same with Orbax's options and handlers built by hand (`PyTreeSave`).

Prints one JSON line: the directory names, the best step, whether every local shard came back
bit for bit, and (for "save") what each `save` returned and what the shared helpers answered.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import jax

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from artifex_ckpt import MetricCheckpointManager, MetricError  # noqa: E402
from artifex_ckpt.agreement import MAX_METRICS_BYTES, primary_value, shared_metrics  # noqa: E402

SHAPE = (16, 4)
# Each process validates on its own shard, so its losses differ. Decided by process 0's:
# steps 0 and 1 saved, step 2 not (it would not enter the top 2), step 3 saved (evicting 0).
# Process 1's own would save step 2 and skip step 3: had it decided, both would hang.
LOSSES = {0: [0.5, 0.2, 0.6, 0.3], 1: [0.1, 0.9, 0.05, 0.8]}
SHARED_TEMPLATE = "g-{epoch:02d}-{val_loss:.3f}"
LOCAL_TEMPLATE = "h-{epoch:02d}-{val_loss:.3f}"


def _host_data(step: int, process_id: int = 0) -> np.ndarray:
    base = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    return (base + 100 * step + 1000 * process_id) / 7


def _shared_run(root: str, process_id: int, phase: str) -> dict[str, Any]:
    mesh = jax.make_mesh((4,), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec("x"))

    def global_array(step: int) -> jax.Array:
        data = _host_data(step)
        return jax.make_array_from_callback(SHAPE, sharding, lambda index: data[index])

    result: dict[str, Any] = {}
    if phase == "save":
        manager = MetricCheckpointManager(
            root, filename=SHARED_TEMPLATE, save_top_k=2, keep_last=False
        )
        saved = []
        for step, loss in enumerate(LOSSES[process_id]):
            args = ocp.args.StandardSave({"w": global_array(step)})
            saved.append(manager.save(step, args=args, metrics={"val_loss": loss}))
        manager.wait_until_finished()
        result["saved"] = saved
        result["flag"] = primary_value(process_id == 1, primary_host=0)
        # Orbax's active_processes: all of them share; this process alone keeps its own.
        result["with_everyone"] = primary_value(process_id, primary_host=0, processes={0, 1})
        result["alone"] = primary_value(process_id, primary_host=0, processes={process_id})
        result["too_large"] = _too_large_fails_everywhere(process_id)
    else:
        manager = MetricCheckpointManager(root)
    best = manager.best_step()
    assert best is not None
    target = {"w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=sharding)}
    restored = manager.restore(best, args=ocp.args.StandardRestore(target))["w"]
    expected = _host_data(best)
    shards_ok = restored.sharding == sharding and all(
        np.array_equal(np.asarray(shard.data), expected[shard.index])
        for shard in restored.addressable_shards
    )
    names = sorted(manager.step_path(step).name for step in manager.all_steps())
    manager.close()
    return {"names": names, "best": best, "shards_ok": bool(shards_ok), **result}


def _too_large_fails_everywhere(process_id: int) -> bool:
    # Only the primary's metrics are too large; every process must raise, none may hang.
    count = MAX_METRICS_BYTES // 8 if process_id == 0 else 1
    try:
        shared_metrics({f"m{i:05d}": 0.0 for i in range(count)}, primary_host=0)
    except MetricError:
        return True
    return False


def _local_manager(root: str, process_id: int, by_hand: bool) -> MetricCheckpointManager:
    directory = f"{root}/host-{process_id}"
    if not by_hand:
        # primary_host=None alone: the manager derives the rest, as built by hand below.
        processes = ocp.options.MultiprocessingOptions(primary_host=None)
        return MetricCheckpointManager(
            directory,
            filename=LOCAL_TEMPLATE,
            save_top_k=1,
            keep_last=False,
            options=ocp.CheckpointManagerOptions(multiprocessing_options=processes),
        )
    # Each host writes its own directory (a local disk): every host is primary there, only
    # this process takes part in the manager's synchronisation, and each host writes the
    # shards of the global array it holds, holding its own data.
    processes = ocp.options.MultiprocessingOptions(
        primary_host=None,
        active_processes={process_id},
        barrier_sync_key_prefix=f"host-{process_id}",
    )
    arrays = ocp.type_handlers.create_type_handler_registry(
        (
            jax.Array,
            ocp.type_handlers.ArrayHandler(
                primary_host=None, replica_id=None, use_replica_parallel=False
            ),
        )
    )
    handler = ocp.PyTreeCheckpointHandler(
        multiprocessing_options=processes, type_handler_registry=arrays
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(None, ocp.args.PyTreeSave, handler)
    registry.add(None, ocp.args.PyTreeRestore, handler)
    return MetricCheckpointManager(
        directory,
        filename=LOCAL_TEMPLATE,
        save_top_k=1,
        keep_last=False,
        # Directory creation is signalled between threads through the coordination service;
        # per process, so that one host's signal is not taken for another's.
        options=ocp.CheckpointManagerOptions(
            multiprocessing_options=processes, enable_per_process_directory_creation=True
        ),
        handler_registry=registry,
    )


def _local_run(root: str, process_id: int, by_hand: bool) -> dict[str, Any]:
    sharding = NamedSharding(jax.make_mesh((4,), ("x",)), PartitionSpec("x"))

    def local_array(step: int) -> jax.Array:
        data = _host_data(step, process_id)
        return jax.make_array_from_callback(SHAPE, sharding, lambda index: data[index])

    manager = _local_manager(root, process_id, by_hand)
    save, restore = (
        (ocp.args.PyTreeSave, ocp.args.PyTreeRestore)
        if by_hand
        else (ocp.args.StandardSave, ocp.args.StandardRestore)
    )
    saved = []
    for step, loss in enumerate(LOSSES[process_id]):
        args: Any = save({"w": local_array(step)})
        if not by_hand:  # as ModelCheckpoint saves (arrays, a JSON trainer state), and PyTree
            args = ocp.args.Composite(
                state=args,
                info=ocp.args.JsonSave({"host": process_id}),
                tree=ocp.args.PyTreeSave({"v": local_array(step)}),
            )
        saved.append(manager.save(step, args=args, metrics={"val_loss": loss}))
    manager.wait_until_finished()
    best = manager.best_step()
    assert best is not None
    target = {"w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=sharding)}
    if by_hand:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = manager.restore(best, args=restore(target, restore_args=restore_args))["w"]
    else:
        tree_args = ocp.checkpoint_utils.construct_restore_args({"v": target["w"]})
        items = manager.restore(
            best,
            args=ocp.args.Composite(
                state=restore(target),
                info=ocp.args.JsonRestore(),
                tree=ocp.args.PyTreeRestore({"v": target["w"]}, restore_args=tree_args),
            ),
        )
        assert items["info"] == {"host": process_id}, items["info"]
        tree = items["tree"]["v"]
        assert all(
            np.array_equal(np.asarray(shard.data), _host_data(best, process_id)[shard.index])
            for shard in tree.addressable_shards
        )
        restored = items["state"]["w"]
    expected = _host_data(best, process_id)
    shards_ok = all(
        np.array_equal(np.asarray(shard.data), expected[shard.index])
        for shard in restored.addressable_shards
    )
    names = sorted(manager.step_path(step).name for step in manager.all_steps())
    manager.close()
    return {"names": names, "best": best, "shards_ok": bool(shards_ok), "saved": saved}


def main(port: int, process_id: int, root: str, phase: str) -> None:
    # The agreement logs, on a host whose own metrics were overruled, go to stderr.
    logging.getLogger("artifex_ckpt").setLevel(logging.INFO)
    logging.getLogger("artifex_ckpt").addHandler(logging.StreamHandler(sys.stderr))
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    if phase.startswith("local"):
        result = _local_run(root, process_id, by_hand=phase == "local-by-hand")
    else:
        result = _shared_run(root, process_id, phase)
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
