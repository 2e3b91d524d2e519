"""B8: what a manifest costs, against the Orbax save and restore of the same checkpoint.

Checksum throughput is measured for both candidates, CRC-32C (`google_crc32c`, the one
`artifex_ckpt.manifest` uses) and `zlib.crc32`: over bytes already in memory (the
checksum alone) and over the checkpoint's files (read + checksum, page cache warm).
Then, trial by trial: Orbax saving the state (`CheckpointManager.save` + wait),
`write_manifest`, Orbax restoring the state, and `verify` deep and shallow; restore and
verify run both warm and with the checkpoint dropped from the page cache (cold).

`python -m benchmarks.bench_manifest [--quick]` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import orbax.checkpoint as ocp
from flax import nnx

from artifex_ckpt.manifest import CHUNK_BYTES, ManifestCheck, verify, write_manifest
from benchmarks.fixtures import evict, model_and_optimizer, orbax_kwargs, scratch
from benchmarks.report import Figure
from benchmarks.timing import Case, Sample, Spread, column, ratio, run_trials, timed

STEP = 0
MB = 1e6  # throughputs are in MB/s (10^6 bytes), as disks and networks are quoted
Checksum = Callable[[int, bytes], int]
CHECKSUMS: dict[str, Checksum] = {
    "crc32c": google_crc32c.extend,
    "zlib": lambda crc, chunk: zlib.crc32(chunk, crc),
}
# (state MiB, trials) of the full run and of --quick.
SIZES = {False: (64.0, 7), True: (16.0, 3)}


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _in_memory(chunks: list[bytes], checksum: Checksum) -> Case:
    def case() -> Sample:
        start = time.perf_counter()
        crc = 0
        for chunk in chunks:
            crc = checksum(crc, chunk)
        return {"total": time.perf_counter() - start}

    return case


def _over_files(files: list[Path], checksum: Checksum) -> Case:
    def read_all() -> None:
        for path in files:
            crc = 0
            with open(path, "rb") as file:
                while chunk := file.read(CHUNK_BYTES):
                    crc = checksum(crc, chunk)

    return lambda: timed(read_all)


def _args(model: nnx.Module, optimizer: nnx.Optimizer) -> ocp.args.Composite:
    return ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
        optimizer=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
    )


def _restore_args(model: nnx.Module, optimizer: nnx.Optimizer) -> ocp.args.Composite:
    return ocp.args.Composite(
        model=ocp.args.StandardRestore(nnx.to_pure_dict(nnx.state(model))),
        optimizer=ocp.args.StandardRestore(nnx.to_pure_dict(nnx.state(optimizer))),
    )


def _save_case(root: Path, model: nnx.Module, optimizer: nnx.Optimizer) -> Case:
    """A save into a fresh run directory each trial, its wall time up to the commit."""
    runs = itertools.count()

    def case() -> Sample:
        run = root / f"save-{next(runs)}"
        with ocp.CheckpointManager(run, **orbax_kwargs(compress=False)) as manager:
            sample = timed(
                lambda: (
                    manager.save(STEP, args=_args(model, optimizer)),
                    manager.wait_until_finished(),
                )
            )
        shutil.rmtree(run)
        return sample

    return case


def _cold(directory: Path, fn: Callable[[], object]) -> Case:
    def case() -> Sample:
        evict(directory)
        return timed(fn)

    return case


def _verify(step_dir: Path, deep: bool) -> Callable[[], ManifestCheck]:
    """`verify`, failing the benchmark unless it finds the intact checkpoint ok."""

    def call() -> ManifestCheck:
        result = verify(step_dir, deep=deep)
        if not result.ok:
            raise AssertionError(f"verify found problems in an intact checkpoint: {result}")
        return result

    return call


def run(quick: bool) -> dict[str, Any]:
    """Measure B8; a dict of throughputs (MB/s), median seconds and paired ratios."""
    state_mib, trials = SIZES[quick]
    model, optimizer = model_and_optimizer(state_mib)
    with scratch("manifest") as root:
        run_dir = root / "run"
        with ocp.CheckpointManager(run_dir, **orbax_kwargs(compress=False)) as manager:
            manager.save(STEP, args=_args(model, optimizer))
            manager.wait_until_finished()
            step_dir = run_dir / str(STEP)
            files = _files(step_dir)
            size = sum(p.stat().st_size for p in files)
            chunks = [
                data[i : i + CHUNK_BYTES]
                for data in (p.read_bytes() for p in files)
                for i in range(0, max(len(data), 1), CHUNK_BYTES)
            ]
            write_manifest(step_dir)
            cases: dict[str, Case] = {}
            for name, checksum in CHECKSUMS.items():
                cases[f"{name}-memory"] = _in_memory(chunks, checksum)
                cases[f"{name}-files"] = _over_files(files, checksum)
            deep, shallow = _verify(step_dir, deep=True), _verify(step_dir, deep=False)

            def restore(manager: ocp.CheckpointManager = manager) -> object:
                return manager.restore(STEP, args=_restore_args(model, optimizer))

            cases |= {
                "save": _save_case(root, model, optimizer),
                "manifest": lambda: timed(lambda: write_manifest(step_dir)),
                "restore": lambda: timed(restore),
                "verify-deep": lambda: timed(deep),
                "verify-shallow": lambda: timed(shallow),
                "restore-cold": _cold(step_dir, restore),
                "verify-deep-cold": _cold(step_dir, deep),
            }
            samples = run_trials(cases, trials)
    seconds = {name: column(values, "total") for name, values in samples.items()}
    throughput = {
        name: Spread.of([size / MB / s for s in seconds[name]]).median
        for name in seconds
        if name.endswith(("-memory", "-files"))
    }
    ratios = {
        "manifest write / save": ratio(seconds["manifest"], seconds["save"]),
        "deep verify / restore (warm)": ratio(seconds["verify-deep"], seconds["restore"]),
        "shallow verify / restore (warm)": ratio(seconds["verify-shallow"], seconds["restore"]),
        "deep verify / restore (cold)": ratio(seconds["verify-deep-cold"], seconds["restore-cold"]),
        "crc32c speed / zlib.crc32 speed (in memory)": ratio(
            seconds["zlib-memory"], seconds["crc32c-memory"]
        ),
    }
    return {
        "state_mib": state_mib,
        "checkpoint_bytes": size,
        "files": len(files),
        "trials": trials,
        "throughput_mb_s": {name: round(value) for name, value in throughput.items()},
        "median_s": {name: round(Spread.of(v).median, 4) for name, v in seconds.items()},
        "ratios": {name: _spread_dict(spread) for name, spread in ratios.items()},
    }


def _spread_dict(spread: Spread) -> dict[str, Any]:
    return {
        "median": round(spread.median, 4),
        "low": round(spread.low, 4),
        "high": round(spread.high, 4),
        "values": [round(v, 4) for v in spread.values],
    }


def figures(args: argparse.Namespace) -> list[Figure]:
    """B8 as figures for `python -m benchmarks` (sizes from `--quick` only)."""
    result = run(args.quick)
    notes = {
        "manifest write / save": "crc32c of every file once committed",
        "deep verify / restore (warm)": "reads every byte, as a restore does",
        "shallow verify / restore (warm)": "a stat per file",
        "deep verify / restore (cold)": "checkpoint dropped from the page cache first",
        "crc32c speed / zlib.crc32 speed (in memory)": "the checksum alone, no reads",
    }
    extra = {"throughput_mb_s": result["throughput_mb_s"], "bytes": result["checkpoint_bytes"]}
    return [
        Figure("B8", name, Spread.of(values["values"]), note=notes[name], extra=extra)
        for name, values in result["ratios"].items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_manifest")
    parser.add_argument("--quick", action="store_true", help=f"{SIZES[True][0]:g} MiB state")
    result = run(parser.parse_args(argv).quick)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
