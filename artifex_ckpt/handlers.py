"""The Orbax handlers this library saves arrays with: standard checkpoints, uncompressed.

Orbax's default zstd compression costs about 1.6x save throughput on 2 cores for about
8% of disk space on float weights (docs/benchmarks.md, B3), so arrays are written
uncompressed. The files stay standard Orbax checkpoints: zarr records "no compressor",
and `ocp.StandardCheckpointer().restore(path)` reads them. To get Orbax's default back,
pass `handler_registry=ocp.handlers.DefaultCheckpointHandlerRegistry()`.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["UncompressedStandardCheckpointHandler", "default_handler_registry"]


class UncompressedStandardCheckpointHandler(ocp.StandardCheckpointHandler):
    """`StandardSave` / `StandardRestore` with arrays written without compression.

    `StandardCheckpointHandler` has no compression switch; the `PyTreeCheckpointHandler`
    it delegates to has one, so the delegate is rebuilt with it off (and with
    `type_handler_registry`, which only the delegate takes).
    """

    def __init__(
        self,
        *,
        type_handler_registry: ocp.type_handlers.TypeHandlerRegistry | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if type_handler_registry is not None:
            kwargs["type_handler_registry"] = type_handler_registry
        self._impl = ocp.PyTreeCheckpointHandler(use_compression=False, **kwargs)


def default_handler_registry(
    multiprocessing_options: ocp.options.MultiprocessingOptions | None = None,
) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Orbax's default registry, with standard array items of any name uncompressed.

    With `multiprocessing_options` whose `primary_host` is None (each host saves to a
    directory of its own), the handlers of `StandardSave`, `PyTreeSave` and `JsonSave` (and
    their restores) take part with those processes only, and every host writes its JSON
    items (the trainer state) and the shards of the `jax.Array`s it holds: Orbax's default
    writes each shard once, from the host of its first replica, and JSON and host-side
    values (numpy arrays, Python scalars) from process 0 only, which would leave the other
    hosts' directories without them. Host-side values are refused there (Orbax finds no
    handler for their type) rather than lost. Other items (grain's data position) keep
    Orbax's handlers.

    Example:
        ```python
        options = ocp.CheckpointManagerOptions()
        registry = default_handler_registry(options.multiprocessing_options)
        manager = MetricCheckpointManager("/tmp/run", options=options, handler_registry=registry)
        ```
    """
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    standard: ocp.CheckpointHandler = UncompressedStandardCheckpointHandler()
    if multiprocessing_options is not None and multiprocessing_options.primary_host is None:
        arrays = ocp.type_handlers.ArrayHandler(
            primary_host=None, replica_id=None, use_replica_parallel=False
        )
        per_host: dict[str, Any] = {
            "multiprocessing_options": multiprocessing_options,
            "type_handler_registry": ocp.type_handlers.create_type_handler_registry(
                (jax.Array, arrays)
            ),
        }
        standard = UncompressedStandardCheckpointHandler(**per_host)
        pytree = ocp.PyTreeCheckpointHandler(**per_host)
        registry.add(None, ocp.args.PyTreeSave, pytree)
        registry.add(None, ocp.args.PyTreeRestore, pytree)
        json_items = ocp.JsonCheckpointHandler(multiprocessing_options=multiprocessing_options)
        registry.add(None, ocp.args.JsonSave, json_items)
        registry.add(None, ocp.args.JsonRestore, json_items)
    registry.add(None, ocp.args.StandardSave, standard)
    registry.add(None, ocp.args.StandardRestore, standard)
    return registry
