"""B7: HTTP requests to object storage (gs://) per operation, ours against raw Orbax.

On a bucket, latency and cost follow the number of requests, not local CPU time, so
this counts them: the local GCS emulator of `tests/gcs_emulator.py` (started here, in
a subprocess) counts every request it serves. Both managers get the same items, the
same handler registry and equivalent retention (k best by `val_loss`, plus the
newest); the raw one is `ocp.CheckpointManager` with `best_fn`, `best_mode` and an
`AnyPreservationPolicy([BestN, LatestN(1)])`.

Operations, each counted alone, in a fresh prefix per trial:

- `first_save`, `save`: a save into a fresh directory, then one that evicts nothing;
- `save_evict`: a save that makes retention delete an older checkpoint;
- `open_best`: open a directory of N checkpoints (a new process: no listing cache)
  and call `best_step()`;
- `restore_best`: ours `load_checkpoint(manager, model, "best")`, raw
  `mgr.restore(mgr.best_step(), args=...)`, model only.

A count varies by a few requests from trial to trial (tensorstore batches OCDBT writes
by timing), so each figure is the median of a few trials, and the ratio's spread is that
of the per-trial ratios. The target is ours <= 1.1x raw for every operation.

Example:
    ```python
    result = run(quick=True, trials=1)
    print(result["requests"]["ours"]["save"], result["ratio"]["save"])
    ```
"""

from __future__ import annotations

import argparse
import statistics
import uuid
from collections.abc import Callable
from typing import Any

import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import checkpoint_managers as ocm

from artifex_ckpt import MetricCheckpointManager
from artifex_ckpt.checkpointing import checkpoint_args, load_checkpoint
from artifex_ckpt.handlers import default_handler_registry
from benchmarks.fixtures import MLP
from benchmarks.report import Figure
from benchmarks.timing import Spread
from tests.gcs_emulator import BUCKET, Emulator, configure_environment
from tests.runs import fill_json_only

TOP_K = 2
TARGET = 1.1
TRIALS = 3
OPERATIONS = ("first_save", "save", "save_evict", "open_best", "restore_best")
# Losses of the saves: the third is best, so with k=2 it evicts the first.
LOSSES = (0.5, 0.4, 0.3)
Opener = Callable[[epath.Path], ocp.CheckpointManager]


def _ours(path: epath.Path) -> ocp.CheckpointManager:
    return MetricCheckpointManager(path, monitor="val_loss", mode="min", save_top_k=TOP_K)


def _raw(path: epath.Path) -> ocp.CheckpointManager:
    def loss(metrics: Any) -> float:
        return float(metrics["val_loss"])

    retention = ocm.AnyPreservationPolicy(
        [ocm.BestN(get_metric_fn=loss, reverse=True, n=TOP_K), ocm.LatestN(n=1)]
    )
    options = ocp.CheckpointManagerOptions(
        best_fn=loss, best_mode="min", preservation_policy=retention
    )
    return ocp.CheckpointManager(path, options=options, handler_registry=default_handler_registry())


def _fresh_listings() -> None:
    """Forget gcsfs's listing caches, as a new process would start without them.

    fsspec keeps one filesystem instance per thread (its instance cache is keyed by the
    thread's id), each with its own listing cache, and Orbax works from pool threads:
    forgetting the calling thread's cache alone would leave the pool's warm.
    """
    import gcsfs

    for fs in list(gcsfs.GCSFileSystem._cache.values()):
        fs.invalidate_cache()


class _Counter:
    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def __call__(self, fn: Callable[[], object]) -> int:
        self.emulator.reset_count()
        fn()
        return self.emulator.request_count()


def _saves(open_manager: Opener, root: epath.Path, count: _Counter) -> dict[str, int]:
    model = MLP(16, 2, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    counts: dict[str, int] = {}
    with open_manager(root) as manager:
        for step, (name, loss) in enumerate(zip(OPERATIONS[:3], LOSSES, strict=True)):
            args = checkpoint_args(model, optimizer, trainer_state={"epoch": step})

            def save(step: int = step, args: Any = args, loss: float = loss) -> None:
                manager.save(step, args=args, metrics={"val_loss": loss})
                manager.wait_until_finished()

            counts[name] = count(save)
        if sorted(manager.all_steps()) != [1, 2]:
            raise AssertionError(f"retention kept {manager.all_steps()} in {root}, not [1, 2]")
    return counts


def _restore(open_manager: Opener, root: epath.Path, count: _Counter, ours: bool) -> int:
    model = MLP(16, 2, nnx.Rngs(1))
    _fresh_listings()
    with open_manager(root) as manager:
        if ours:
            assert isinstance(manager, MetricCheckpointManager)
            return count(lambda: load_checkpoint(manager, model, "best"))

        def restore() -> None:
            state = nnx.state(model)
            target = ocp.args.StandardRestore(nnx.to_pure_dict(state))
            restored = manager.restore(manager.best_step(), args=ocp.args.Composite(model=target))
            nnx.replace_by_pure_dict(state, restored["model"])
            nnx.update(model, state)

        return count(restore)


def _open_best(open_manager: Opener, root: epath.Path, count: _Counter, best: int) -> int:
    found: list[int | None] = []

    def open_and_ask() -> None:
        with open_manager(root) as manager:
            found.append(manager.best_step())

    _fresh_listings()
    requests = count(open_and_ask)
    if found != [best]:
        raise AssertionError(f"best step of {root}: {found}, expected {best}")
    return requests


def run(quick: bool, trials: int = TRIALS) -> dict[str, Any]:
    """Count requests per operation for ours and raw Orbax; N = 10 checkpoints if quick, else 50.

    Returns `{"checkpoints": N, "trials": trials, "requests": {"ours": {...}, "raw": {...}},
    "ratio": {operation: ours / raw}, "per_trial": [{"ours": {...}, "raw": {...}}, ...]}`,
    where `requests` holds the median counts (the lower median for an even number of
    trials, so that a count stays a count) and `ratio` the median per-trial ratio.
    """
    checkpoints = 10 if quick else 50
    with Emulator(configure_environment()) as emulator:
        count = _Counter(emulator)
        per_trial = [_trial(count, checkpoints) for _ in range(trials)]
    requests = {
        name: {op: statistics.median_low(t[name][op] for t in per_trial) for op in OPERATIONS}
        for name in ("ours", "raw")
    }
    ratio = {op: statistics.median(_ratios(per_trial, op)) for op in OPERATIONS}
    return {
        "checkpoints": checkpoints,
        "trials": trials,
        "requests": requests,
        "ratio": ratio,
        "per_trial": per_trial,
    }


def _trial(count: _Counter, checkpoints: int) -> dict[str, dict[str, int]]:
    openers: dict[str, Opener] = {"ours": _ours, "raw": _raw}
    requests: dict[str, dict[str, int]] = {name: {} for name in openers}
    base = epath.Path(f"gs://{BUCKET}/bench-requests-{uuid.uuid4().hex[:8]}")
    many = base / "many"
    fill_json_only(many, checkpoints)
    for name, open_manager in openers.items():
        root = base / name
        requests[name].update(_saves(open_manager, root, count))
        requests[name]["restore_best"] = _restore(open_manager, root, count, name == "ours")
        requests[name]["open_best"] = _open_best(open_manager, many, count, checkpoints - 1)
    return requests


def _ratios(per_trial: list[dict[str, dict[str, int]]], op: str) -> list[float]:
    return [t["ours"][op] / t["raw"][op] for t in per_trial]


def bench(args: argparse.Namespace) -> list[Figure]:
    """`run` as figures for `python -m benchmarks`: per operation, ours / raw requests."""
    result = run(quick=args.quick)
    note = (
        f"median of {result['trials']} trials; gs:// emulator; "
        f"open_best over {result['checkpoints']} checkpoints"
    )
    figures = []
    for op in OPERATIONS:
        ours, raw = result["requests"]["ours"][op], result["requests"]["raw"][op]
        figures.append(
            Figure(
                "B7",
                f"requests, {op}: ours / raw Orbax",
                Spread.of(_ratios(result["per_trial"], op)),
                fmt=".2f",
                target=TARGET,
                note=f"{ours} / {raw}; {note}",
                extra={"ours": ours, "raw": raw},
            )
        )
    return figures


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
