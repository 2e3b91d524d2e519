"""One of two JAX processes saving and restoring a globally sharded state.

Usage: python -m tests.reliability.two_process_child PORT PROCESS_ID ROOT PHASE
PHASE is "save" (save three steps, restore the best) or "restore" (restore the best only).
Prints one JSON line: the directory names, the best step, and whether every local shard
came back bit for bit.
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from artifex_ckpt import MetricCheckpointManager  # noqa: E402

SHAPE = (16, 4)
LOSSES = [0.5, 0.2, 0.4]


def _host_data(step: int) -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 100 * step) / 7


def main(port: int, process_id: int, root: str, phase: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    mesh = jax.make_mesh((4,), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec("x"))

    def global_array(step: int) -> jax.Array:
        data = _host_data(step)
        return jax.make_array_from_callback(SHAPE, sharding, lambda index: data[index])

    if phase == "save":
        manager = MetricCheckpointManager(
            root, filename="g-{epoch:02d}-{val_loss:.3f}", save_top_k=2
        )
        for step, loss in enumerate(LOSSES):
            args = ocp.args.StandardSave({"w": global_array(step)})
            manager.save(step, args=args, metrics={"val_loss": loss})
        manager.wait_until_finished()
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
    print(json.dumps({"names": names, "best": best, "shards_ok": bool(shards_ok)}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
