"""`python -m benchmarks [--quick] [--only B1,B3] [sizes...]`: run, print a table, write JSON."""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from benchmarks import (
    bench_callback,
    bench_manifest,
    bench_open,
    bench_requests,
    bench_restore,
    bench_save,
    bench_training,
)
from benchmarks.report import RESULTS, Figure, show, write

Bench = Callable[[argparse.Namespace], list[Figure]]
BENCHES: dict[str, Bench] = {
    "B1": bench_callback.run,
    "B2": bench_save.run,  # also yields B3: both come from the same save trials
    "B4": bench_training.run,
    "B5": bench_open.run,
    "B6": bench_restore.run,
    "B7": bench_requests.bench,
    "B8": bench_manifest.figures,
}
ALIASES = {"B3": "B2"}
# Sizes of the full run, and of --quick (under 2 minutes on 2 cores).
FULL = dict(
    trials=11,
    save_trials=21,
    calls=100_000,
    state_mib=256.0,
    train_mib=95.4,
    epochs=20,
    steps=150,
    batch=32,
    train_trials=3,
    checkpoints=1000,
)
QUICK = dict(
    trials=5,
    save_trials=5,
    calls=20_000,
    state_mib=256.0,
    train_mib=95.4,
    epochs=5,
    steps=10,
    batch=32,
    train_trials=3,
    checkpoints=200,
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    parser.add_argument(
        "--only", default=",".join(BENCHES), help="e.g. B1,B3 (B2 and B3 run together)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--trials", type=int, help="trials per figure (B1, B5, B6)")
    parser.add_argument("--save-trials", type=int, help="B2/B3: trials (blocked times are noisy)")
    parser.add_argument("--calls", type=int, help="B1: hook calls per trial")
    parser.add_argument("--state-mib", type=float, help="B2/B3/B6: model + optimizer MiB")
    parser.add_argument("--train-mib", type=float, help="B4: model + optimizer MiB")
    parser.add_argument("--epochs", type=int, help="B4: epochs per training run")
    parser.add_argument("--steps", type=int, help="B4: train steps per epoch")
    parser.add_argument("--batch", type=int, help="B4: batch size")
    parser.add_argument("--train-trials", type=int, help="B4: runs of each variant")
    parser.add_argument("--checkpoints", type=int, help="B5: checkpoints in the directory")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    # Orbax logs a warning per manager; the table is the output.
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    figures: list[Figure] = []
    start = time.perf_counter()
    for name in dict.fromkeys(
        ALIASES.get(n.strip(), n.strip()) for n in args.only.upper().split(",")
    ):
        figures += BENCHES[name](args)
    elapsed = time.perf_counter() - start
    show(figures, f"artifex_ckpt benchmarks ({'quick' if args.quick else 'full'}, {elapsed:.0f} s)")
    params = {**vars(args), "output": str(args.output), "seconds": round(elapsed, 1)}
    write(figures, params, args.output)


if __name__ == "__main__":
    main()
