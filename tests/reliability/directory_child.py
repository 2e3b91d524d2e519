"""A trainer process whose last save stays in flight until its parent says so.

Usage: python -m tests.reliability.directory_child ROOT

Writes three checkpoints of `TinyMLP(nnx.Rngs(step))` with val_loss 0.5, 0.2, 0.4 under the
template `TEMPLATE` (steps 0 and 1 commit), and holds the save of step 2 open: its files are
written, but it cannot commit before a line arrives on stdin. Prints one JSON line when the
save is held ({"event": "holding", "pid": ...}), and one when it has committed and the
manager is closed ({"event": "done", "steps": [...], "names": [...]}).

The hold is an extra item, `gate`, whose Orbax handler returns a commit future that waits
for the parent: so the parent can open readers while a save is provably in flight. "holding"
is printed once every writer thread of that save has ended, so its files no longer change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from artifex_ckpt import MetricCheckpointManager
from artifex_ckpt.checkpointing import checkpoint_args
from tests.conftest import TinyMLP

TEMPLATE = "ck-{epoch}-{val_loss:.3f}"
LOSSES = (0.5, 0.2, 0.4)
RELEASE = threading.Event()
# Orbax's threads of a save that wait for its commit futures, and so for the gate.
_WAITING_FOR_THE_GATE = {"async_save", "save_finalize"}


class _HeldUntilReleased:
    """An Orbax commit future that completes once the parent releases the save."""

    def result(self, timeout: float | None = None) -> None:
        RELEASE.wait(timeout)

    def cancel(self) -> None:
        return None


class GatedJsonHandler(ocp.handlers.JsonCheckpointHandler):
    """`JsonCheckpointHandler` whose save commits only after `RELEASE` is set."""

    async def async_save(
        self, directory: epath.Path, item: Any = None, args: Any = None
    ) -> list[Any]:
        futures = await super().async_save(directory, item, args)
        return [*(futures or []), _HeldUntilReleased()]


@ocp.args.register_with_handler(GatedJsonHandler, for_save=True)
@dataclasses.dataclass
class GatedSave(ocp.args.JsonSave):
    """Save args of the gated item."""


@ocp.args.register_with_handler(GatedJsonHandler, for_restore=True)
@dataclasses.dataclass
class GatedRestore(ocp.args.JsonRestore):
    """Restore args of the gated item (Orbax registers handlers in pairs)."""


def _args(step: int, *, gated: bool) -> ocp.args.Composite:
    items = dict(checkpoint_args(TinyMLP(nnx.Rngs(step))).items())
    if gated:
        items["gate"] = GatedSave({"held": True})
    return ocp.args.Composite(**items)


def _say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main(root: str) -> None:
    manager = MetricCheckpointManager(root, filename=TEMPLATE, save_top_k=2)
    for step, loss in enumerate(LOSSES[:-1]):
        manager.save(step, args=_args(step, gated=False), metrics={"val_loss": loss})
        manager.wait_until_finished()
    before = set(threading.enumerate())
    step = len(LOSSES) - 1
    manager.save(step, args=_args(step, gated=True), metrics={"val_loss": LOSSES[step]})
    # Every file of the held save is written once its writer threads end; what remains
    # waits for the gate (Orbax's commit thread and its finalizer, our housekeeper).
    for thread in set(threading.enumerate()) - before:
        if not thread.daemon and thread.name not in _WAITING_FOR_THE_GATE:
            thread.join(timeout=60)
    _say("holding", pid=os.getpid())
    sys.stdin.readline()
    RELEASE.set()
    manager.wait_until_finished()
    steps = manager.all_steps()
    names = sorted(manager.step_path(step).name for step in steps)
    manager.close()
    _say("done", steps=sorted(steps), names=names)


if __name__ == "__main__":
    main(sys.argv[1])
