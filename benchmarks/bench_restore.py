"""B6: restore the best checkpoint, against raw Orbax and against the disk's read speed.

Both sides do the same work: look the best step up (the raw manager ranks by `val_loss`
as the library does), restore the model and the Adam state from it, and write them into
the live model and optimizer.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from artifex_ckpt import MetricCheckpointManager, load_checkpoint, save_checkpoint
from artifex_ckpt.naming import FilenameTemplate, TemplateNameFormat
from benchmarks.fixtures import (
    codec,
    evict,
    model_and_optimizer,
    orbax_kwargs,
    read_npy,
    scratch,
    state_arrays,
    write_npy,
)
from benchmarks.report import Figure
from benchmarks.timing import Case, Sample, column, ratio, run_trials, timed

TEMPLATE = "model-{epoch:02d}-{val_loss:.4f}"


def _cold(directory: Path, fn: Callable[[], object]) -> Case:
    """Time `fn` with `directory` dropped from the page cache first: reads hit the disk."""

    def case() -> Sample:
        evict(directory)
        return timed(fn)

    return case


def _check_plain_restore(step_dir: Path, model: nnx.Module) -> None:
    """An uncompressed item is still a standard Orbax checkpoint: plain Orbax reads it."""
    with ocp.StandardCheckpointer() as checkpointer:
        restored = jax.tree.leaves(checkpointer.restore(step_dir / "model"))
    expected = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
    if not all(np.array_equal(a, b) for a, b in zip(restored, expected, strict=True)):
        raise AssertionError(f"StandardCheckpointer read back other values from {step_dir}")


def _raw_manager(path: Path, compress: bool) -> ocp.CheckpointManager:
    """Plain Orbax over the same directory, ranking by `val_loss` as the library does, so
    that both sides look the best step up before restoring it."""
    options = ocp.CheckpointManagerOptions(
        step_name_format=TemplateNameFormat(FilenameTemplate(TEMPLATE)),
        best_fn=lambda metrics: float(metrics["val_loss"]),
        best_mode="min",
    )
    return ocp.CheckpointManager(path, options=options, **orbax_kwargs(compress))


def _raw_restore(raw: ocp.CheckpointManager, model: nnx.Module, opt: nnx.Optimizer) -> None:
    # What a plain Orbax user writes: targets from the live objects, restore, update.
    model_state, opt_state = nnx.state(model), nnx.state(opt)
    args = ocp.args.Composite(
        model=ocp.args.StandardRestore(nnx.to_pure_dict(model_state)),
        optimizer=ocp.args.StandardRestore(nnx.to_pure_dict(opt_state)),
    )
    restored = raw.restore(raw.best_step(), args=args)
    nnx.replace_by_pure_dict(model_state, restored["model"])
    nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
    nnx.update(model, model_state)
    nnx.update(opt, opt_state)


def run(args: argparse.Namespace) -> list[Figure]:
    model, optimizer = model_and_optimizer(args.state_mib)
    managers: list[ocp.CheckpointManager] = []
    with scratch("restore") as root:
        disk = root / "disk"
        disk.mkdir()
        write_npy(state_arrays(model, optimizer), disk)
        cases: dict[str, Case] = {"disk": _cold(disk, lambda: read_npy(disk))}
        for compress in (True, False):
            path = root / codec(compress)
            lib = MetricCheckpointManager(path, filename=TEMPLATE, **orbax_kwargs(compress))
            # Two checkpoints, so that "best" (step 0) is not simply the newest.
            for step, loss in enumerate((0.1, 0.5)):
                save_checkpoint(lib, model, step, optimizer=optimizer, metrics={"val_loss": loss})
            lib.wait_until_finished()
            _check_plain_restore(Path(lib.step_path(0)), model)
            raw = _raw_manager(path, compress)
            managers += [lib, raw]
            if raw.best_step() != 0 or lib.best_step() != 0:
                raise AssertionError(f"best step of {path}: {raw.best_step()}, expected 0")
            lib_restore = functools.partial(
                load_checkpoint, lib, model, "best", optimizer=optimizer
            )
            cases[f"lib-{codec(compress)}"] = _cold(path, lib_restore)
            # The same restore without checksums (sizes are still checked).
            cases[f"lib-nv-{codec(compress)}"] = _cold(
                path, functools.partial(lib_restore, verify=False)
            )
            cases[f"raw-{codec(compress)}"] = _cold(
                path, functools.partial(_raw_restore, raw, model, optimizer)
            )
        try:
            samples = run_trials(cases, args.trials)
        finally:
            for manager in managers:
                manager.close()
    return _figures(samples)


def _figures(samples: dict[str, list[Sample]]) -> list[Figure]:
    disk = column(samples["disk"], "total")
    figures = []
    for c in ("zstd", "none"):
        lib, raw = column(samples[f"lib-{c}"], "total"), column(samples[f"raw-{c}"], "total")
        unverified = column(samples[f"lib-nv-{c}"], "total")
        figures += [
            Figure(
                "B6",
                f"restore best, verify=False: lib / raw Orbax, {c}",
                ratio(unverified, raw),
                target=1.0,
                note="sizes checked, no checksums",
            ),
            Figure(
                "B6",
                f"restore best: verified / verify=False, {c}",
                ratio(lib, unverified),
                target=1.10,
                note="the checksum's cost on restore",
            ),
            Figure("B6", f"restore best: lib / raw Orbax, {c}", ratio(lib, raw), target=1.05),
            Figure("B6", f"read speed: lib / disk, {c}", ratio(disk, lib), target=0.8, sense=">="),
            Figure(
                "B6",
                f"read speed: raw Orbax / disk, {c}",
                ratio(disk, raw),
                note="what Orbax itself reaches",
            ),
        ]
    return figures
