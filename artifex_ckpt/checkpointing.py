"""Save and restore flax nnx models and optimizers through a `MetricCheckpointManager`.

A checkpoint holds the items `model` (a pure dict of `nnx.state(model)`, or of its
`nnx.Param` state when weights-only), `optimizer` (a pure dict of `nnx.state(optimizer)`)
and `trainer_state` (JSON: epoch, global step, logs, weights_only). Each array item is
a standard Orbax checkpoint.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from artifex_ckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointWarning,
    WeightsOnlyError,
)
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.metrics import jsonable

__all__ = [
    "RestoredCheckpoint",
    "checkpoint_args",
    "load_checkpoint",
    "read_trainer_state",
    "restore_checkpoint",
    "save_checkpoint",
    "setup_checkpoint_manager",
]

MODEL, OPTIMIZER, TRAINER_STATE = "model", "optimizer", "trainer_state"
StepSpec = int | Literal["latest", "best"] | None


class RestoredCheckpoint(NamedTuple):
    """What `restore_checkpoint` restored: the step (after any fallback), its directory,
    and its trainer state (epoch, global_step, logs, weights_only)."""

    step: int
    path: epath.Path
    trainer_state: Mapping[str, Any]


def setup_checkpoint_manager(
    directory: str | os.PathLike[str] | epath.Path, **kwargs: Any
) -> tuple[MetricCheckpointManager, epath.Path]:
    """Open (or create) a checkpoint directory; settings stored there are adopted.

    Example:
        ```python
        manager, path = setup_checkpoint_manager("/tmp/setup-example", save_top_k=2)
        manager.close()
        ```
    """
    manager = MetricCheckpointManager(directory, **kwargs)
    return manager, manager.directory


def _model_state(model: nnx.Module, weights_only: bool) -> nnx.State:
    return nnx.state(model, nnx.Param) if weights_only else nnx.state(model)


def checkpoint_args(
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    weights_only: bool = False,
    trainer_state: Mapping[str, Any] | None = None,
) -> ocp.args.Composite:
    """The Orbax save args for a model (and optimizer) in this project's layout."""
    items: dict[str, ocp.args.CheckpointArgs] = {
        MODEL: ocp.args.StandardSave(nnx.to_pure_dict(_model_state(model, weights_only)))
    }
    if optimizer is not None and not weights_only:
        items[OPTIMIZER] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer)))
    info = {**jsonable(dict(trainer_state or {})), "weights_only": weights_only}
    items[TRAINER_STATE] = ocp.args.JsonSave(info)
    return ocp.args.Composite(**items)


def save_checkpoint(
    manager: MetricCheckpointManager,
    model: nnx.Module,
    step: int,
    *,
    optimizer: nnx.Optimizer | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> bool:
    """Save `model` (and `optimizer`) as `step`; returns whether a checkpoint was written.

    Example:
        ```python
        saved = save_checkpoint(manager, model, 0, metrics={"val_loss": 0.3})
        ```
    """
    args = checkpoint_args(model, optimizer, trainer_state={"epoch": step, "global_step": step})
    return manager.save(step, args=args, metrics=metrics)


def read_trainer_state(manager: MetricCheckpointManager, step: int) -> dict[str, Any]:
    """The JSON `trainer_state` item of `step` (epoch, global_step, logs, weights_only)."""
    if not (manager.step_path(step) / TRAINER_STATE).exists():
        # Written by a custom loop without our helpers: a full-state checkpoint.
        return {"epoch": step, "global_step": step, "weights_only": False}
    restored = manager.restore(step, args=ocp.args.Composite(trainer_state=ocp.args.JsonRestore()))
    return dict(restored[TRAINER_STATE])


def load_checkpoint(
    manager: MetricCheckpointManager,
    model: nnx.Module,
    step: StepSpec = None,
    *,
    optimizer: nnx.Optimizer | None = None,
) -> nnx.Module:
    """Restore a checkpoint into `model` (and `optimizer`) in place, and return `model`.

    `step` is an int, `None`/`"latest"` (the newest) or `"best"`. Pending saves are
    waited for first. With `"latest"` or `"best"`, a checkpoint that fails to restore is
    skipped with a `CorruptCheckpointWarning` naming its path and the error, and the
    next newest (or next best) one is tried; nothing is deleted. An explicit int step
    that fails raises.

    Example:
        ```python
        load_checkpoint(manager, model, "best")
        ```
    """
    restore_checkpoint(manager, model, step, optimizer=optimizer)
    return model


def restore_checkpoint(
    manager: MetricCheckpointManager,
    model: nnx.Module,
    step: StepSpec = None,
    *,
    optimizer: nnx.Optimizer | None = None,
) -> RestoredCheckpoint:
    """`load_checkpoint`, returning what was restored (after any fallback).

    Example:
        ```python
        restored = restore_checkpoint(manager, model, "latest", optimizer=optimizer)
        next_epoch = restored.trainer_state["epoch"] + 1
        ```
    """
    manager.wait_until_finished()
    candidates = _candidates(manager, step)
    for index, candidate in enumerate(candidates):
        try:
            state = _restore_into(manager, candidate, model, optimizer)
            return RestoredCheckpoint(candidate, manager.step_path(candidate), state)
        except WeightsOnlyError:
            raise
        except Exception as err:
            if isinstance(step, int) or index == len(candidates) - 1:
                raise
            warnings.warn(
                CorruptCheckpointWarning(
                    f"checkpoint {manager.step_path(candidate)} failed to restore "
                    f"({type(err).__name__}: {err}); trying step {candidates[index + 1]}"
                ),
                stacklevel=3,
            )
    raise AssertionError("unreachable: _candidates never returns an empty list")


def _candidates(manager: MetricCheckpointManager, step: StepSpec) -> list[int]:
    steps = sorted(manager.all_steps(), reverse=True)
    if isinstance(step, int) and not isinstance(step, bool):
        if step not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {manager.directory}; "
                f"retained steps: {sorted(steps)}"
            )
        return [step]
    if step is None or step == "latest":
        found = steps
    elif step == "best":
        scores = {s: manager.score(s) for s in manager.ranked_steps()}
        found = [s for s, v in scores.items() if v is not None and math.isfinite(v)]
    else:
        raise ValueError(f"step={step!r} is not accepted; use an int, None, 'latest' or 'best'")
    if not found:
        what = (
            "checkpoint"
            if step != "best"
            else f"checkpoint with a finite {manager.settings.monitor!r}"
        )
        raise CheckpointNotFoundError(f"no {what} in {manager.directory}")
    return found


def _restore_into(
    manager: MetricCheckpointManager,
    step: int,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None,
) -> dict[str, Any]:
    manager.check_intact(step)
    info = read_trainer_state(manager, step)
    weights_only = bool(info.get("weights_only", False))
    if optimizer is not None and weights_only:
        raise WeightsOnlyError(
            f"checkpoint {manager.step_path(step)} holds model weights only; it can be "
            "restored into a model, but has no optimizer state to resume training from"
        )
    model_state = _model_state(model, weights_only)
    items = {MODEL: ocp.args.StandardRestore(nnx.to_pure_dict(model_state))}
    if optimizer is not None:
        optimizer_state = nnx.state(optimizer)
        items[OPTIMIZER] = ocp.args.StandardRestore(nnx.to_pure_dict(optimizer_state))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    nnx.replace_by_pure_dict(model_state, restored[MODEL])
    nnx.update(model, model_state)
    if optimizer is not None:
        nnx.replace_by_pure_dict(optimizer_state, restored[OPTIMIZER])
        nnx.update(optimizer, optimizer_state)
    return info
