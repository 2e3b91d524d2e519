"""Run directories prepared for tests and benchmarks (`benchmarks/` imports this too)."""

from __future__ import annotations

import orbax.checkpoint as ocp
from etils import epath

from artifex_ckpt import MetricCheckpointManager


def fill_json_only(directory: epath.Path, checkpoints: int) -> None:
    """`checkpoints` small JSON-only checkpoints, all kept, scored 1.0, 0.99, ...: the newest
    is the best."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with MetricCheckpointManager(directory, save_top_k=-1, options=options) as manager:
        for step in range(checkpoints):
            item = ocp.args.Composite(trainer_state=ocp.args.JsonSave({"epoch": step}))
            manager.save(step, args=item, metrics={"val_loss": 1.0 - step / 100})
