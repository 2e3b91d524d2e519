"""The Orbax handlers this library saves arrays with: standard checkpoints, uncompressed.

Orbax's default zstd compression costs about 1.6x save throughput on 2 cores for about
8% of disk space on float weights (docs/benchmarks.md, B3), so arrays are written
uncompressed. The files stay standard Orbax checkpoints: zarr records "no compressor",
and `ocp.StandardCheckpointer().restore(path)` reads them. To get Orbax's default back,
pass `handler_registry=ocp.handlers.DefaultCheckpointHandlerRegistry()`.
"""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

__all__ = ["UncompressedStandardCheckpointHandler", "default_handler_registry"]


class UncompressedStandardCheckpointHandler(ocp.StandardCheckpointHandler):
    """`StandardSave` / `StandardRestore` with arrays written without compression.

    `StandardCheckpointHandler` has no compression switch; the `PyTreeCheckpointHandler`
    it delegates to has one, so the delegate is rebuilt with it off.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._impl = ocp.PyTreeCheckpointHandler(use_compression=False, **kwargs)


def default_handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Orbax's default registry, with standard array items of any name uncompressed."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handler = UncompressedStandardCheckpointHandler()
    registry.add(None, ocp.args.StandardSave, handler)
    registry.add(None, ocp.args.StandardRestore, handler)
    return registry
