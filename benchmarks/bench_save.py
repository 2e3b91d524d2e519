"""B2: how long one async save blocks the loop; B3: save throughput against the disk."""

from __future__ import annotations

import argparse
import itertools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from artifex_ckpt import MetricCheckpointManager, save_checkpoint
from artifex_ckpt.checkpointing import checkpoint_args
from benchmarks.fixtures import (
    MiB,
    model_and_optimizer,
    nbytes,
    orbax_kwargs,
    scratch,
    state_arrays,
    write_npy,
)
from benchmarks.report import Figure
from benchmarks.timing import Case, Laps, Sample, column, ratio, run_trials

TEMPLATE = "model-{epoch:02d}-{val_loss:.4f}"
Save = Callable[[ocp.CheckpointManager, int], object]


def _metrics(step: int) -> dict[str, float]:
    return {"val_loss": 1.0 / (step + 1)}  # improving: every new save is the best


def _saves(model: nnx.Module, optimizer: nnx.Optimizer) -> tuple[Save, Save]:
    def lib(manager: ocp.CheckpointManager, step: int) -> object:
        return save_checkpoint(manager, model, step, optimizer=optimizer, metrics=_metrics(step))

    def raw(manager: ocp.CheckpointManager, step: int) -> object:
        # The very args save_checkpoint builds, so both sides write identical items.
        state = {"epoch": step, "global_step": step}
        args = checkpoint_args(model, optimizer, trainer_state=state)
        return manager.save(step, args=args, metrics=_metrics(step))

    return lib, raw


def _save_case(manager: ocp.CheckpointManager, save: Save, free: bool) -> Case:
    steps = itertools.count()

    def case() -> Sample:
        step = next(steps)
        laps = Laps()
        save(manager, step)
        laps.mark("blocked")
        # Until the save committed and (for the library) its post-commit work is done.
        manager.wait_until_finished()
        sample = laps.mark("total")
        if free:
            sample["bytes"] = _du(Path(manager.directory))  # this step alone (+ a few KiB)
            # Untimed: free the bytes as the disk case does, so that every case starts
            # from the same memory state (freed pages go back to the hypervisor here).
            manager.delete(step)
            manager.wait_until_finished()
        return sample

    return case


def _disk_case(arrays: list, root: Path) -> Case:
    runs = itertools.count()

    def case() -> Sample:
        target = root / f"disk-{next(runs)}"
        target.mkdir()
        laps = Laps()
        write_npy(arrays, target)
        sample = laps.mark("total")
        shutil.rmtree(target)
        return sample

    return case


def _pair(root: Path, compress: bool, keep: int | None) -> list[ocp.CheckpointManager]:
    """The library and raw Orbax, same codec and async options; `keep` None keeps all."""
    kwargs: dict[str, Any] = orbax_kwargs(compress)
    lib = MetricCheckpointManager(root / "lib", filename=TEMPLATE, save_top_k=keep or -1, **kwargs)
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m["val_loss"], best_mode="min", max_to_keep=keep
    )
    return [lib, ocp.CheckpointManager(root / "raw", options=options, **orbax_kwargs(compress))]


def run(args: argparse.Namespace) -> list[Figure]:
    model, optimizer = model_and_optimizer(args.state_mib)
    arrays = state_arrays(model, optimizer)
    lib_save, raw_save = _saves(model, optimizer)
    managers: dict[str, ocp.CheckpointManager] = {}
    with scratch("save") as root:
        # zstd/none: no retention at work (each case deletes its step, untimed).
        # top1: retention evicts the previous checkpoint at every save.
        for name, compress, keep in (
            ("zstd", True, None),
            ("none", False, None),
            ("top1", True, 1),
        ):
            lib, raw = _pair(root / name, compress, keep)
            managers |= {f"lib-{name}": lib, f"raw-{name}": raw}
        cases = {
            name: _save_case(
                m, lib_save if name.startswith("lib") else raw_save, "top1" not in name
            )
            for name, m in managers.items()
        }
        cases["disk"] = _disk_case(arrays, root)
        try:
            samples = run_trials(cases, args.save_trials)
        finally:
            for manager in managers.values():
                manager.close()
    return _figures(samples, nbytes(arrays))


def _du(path: Path) -> float:
    return float(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))


def _figures(samples: dict[str, list[Sample]], size: int) -> list[Figure]:
    disk = column(samples["disk"], "total")
    figures = []
    for c in ("zstd", "none", "top1"):
        lib, raw = samples[f"lib-{c}"], samples[f"raw-{c}"]
        blocked, total = column(lib, "blocked"), column(lib, "total")
        what = "zstd, save evicting the previous" if c == "top1" else c
        figures += [
            Figure(
                "B2",
                f"blocked: lib / raw Orbax, {what}",
                ratio(blocked, column(raw, "blocked")),
                target=1.05,
            ),
            Figure(
                "B2", f"blocked / until committed, lib, {what}", ratio(blocked, total), target=0.05
            ),
        ]
        if c != "top1":
            figures += [
                Figure(
                    "B3",
                    f"throughput: lib / disk, {c}",
                    ratio(disk, total),
                    target=0.8,
                    sense=">=",
                    note=f"{size / MiB:.0f} MiB state",
                ),
                Figure(
                    "B3",
                    f"throughput: raw Orbax / disk, {c}",
                    ratio(disk, column(raw, "total")),
                    note="what Orbax itself reaches",
                ),
            ]
    figures.append(
        Figure(
            "B3",
            "bytes on disk: zstd / none",
            ratio(column(samples["lib-zstd"], "bytes"), column(samples["lib-none"], "bytes")),
            note="space zstd saves on float weights",
        )
    )
    return figures
