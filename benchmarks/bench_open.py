"""B5: open a directory of many retained checkpoints and answer `best_step()`."""

from __future__ import annotations

import argparse
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import orbax.checkpoint as ocp
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt import CheckpointConfig, MetricCheckpointManager
from artifex_ckpt.naming import FilenameTemplate, TemplateNameFormat
from benchmarks.fixtures import scratch
from benchmarks.report import Figure
from benchmarks.timing import Case, Laps, Sample, Spread, column, ratio, run_trials

TEMPLATE = CheckpointConfig().filename
Opener = Callable[[], ocp.CheckpointManager]


def _fill(path: Path, count: int) -> None:
    """`count` small checkpoints with random scores, saved synchronously (fast to make)."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    rng = random.Random(0)
    with MetricCheckpointManager(path, filename=TEMPLATE, save_top_k=-1, options=options) as mgr:
        for step in range(count):
            item = ocp.args.Composite(trainer_state=ocp.args.JsonSave({"epoch": step}))
            mgr.save(step, args=item, metrics={"val_loss": rng.random()})


def _renumber(source: Path, target: Path) -> None:
    """The same checkpoints under Orbax's numeric step names (copies; names aside, the
    step directories are exactly what Orbax writes)."""
    names = TemplateNameFormat(FilenameTemplate(TEMPLATE))
    for metadata in names.find_all(source):
        shutil.copytree(metadata.path, target / str(metadata.step))


def _orbax(path: Path, names: step_lib.NameFormat | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m["val_loss"], best_mode="min", step_name_format=names
    )
    return ocp.CheckpointManager(path, options=options)


def _open_case(open_manager: Opener, found: set[int | None]) -> Case:
    def case() -> Sample:
        laps = Laps()
        manager = open_manager()
        found.add(manager.best_step())
        sample = laps.mark("total")
        manager.close()
        return sample

    return case


def run(args: argparse.Namespace) -> list[Figure]:
    found: set[int | None] = set()
    with scratch("open") as root:
        path, numeric = root / "run", root / "numeric"
        _fill(path, args.checkpoints)
        _renumber(path, numeric)

        def lib() -> ocp.CheckpointManager:
            return MetricCheckpointManager(path)

        def raw() -> ocp.CheckpointManager:
            # Orbax sees template-named steps only through the library's name format.
            return _orbax(path, TemplateNameFormat(FilenameTemplate(TEMPLATE)))

        openers = {"lib": lib, "raw": raw, "numeric": lambda: _orbax(numeric)}
        cases = {name: _open_case(opener, found) for name, opener in openers.items()}
        samples = run_trials(cases, args.trials)
    if len(found) != 1:
        raise AssertionError(f"the managers disagree on the best step: {found}")
    return _figures(samples, f"{args.checkpoints} checkpoints")


def _figures(samples: dict[str, list[Sample]], note: str) -> list[Figure]:
    lib = column(samples["lib"], "total")
    return [
        Figure(
            "B5",
            "open + best_step(), lib (seconds)",
            Spread.of(lib),
            target=0.5,
            note=f"{note}; absolute time",
        ),
        Figure(
            "B5",
            "open + best_step(): lib / raw Orbax",
            ratio(lib, column(samples["raw"], "total")),
            target=1.1,
            note=f"{note}; same dir, Orbax given the lib's NameFormat",
        ),
        Figure(
            "B5",
            "open + best_step(): lib / Orbax, numeric names",
            ratio(lib, column(samples["numeric"], "total")),
            note="same steps, copied",
        ),
    ]
