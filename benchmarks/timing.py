"""The one timing helper of the suite: interleaved trials, paired ratios, spreads.

The machine is shared and its speed drifts, so no absolute time is comparable between
runs. Every figure is therefore a ratio of two cases measured in the same trial, one
right after the other, summarised as the median over trials with its min-max range.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# One run of a case: named durations in seconds (e.g. {"blocked": .., "total": ..}).
Sample = dict[str, float]
Case = Callable[[], Sample]


class Laps:
    """Split times from one start: `laps.mark("blocked")` ... `laps.mark("total")`."""

    def __init__(self) -> None:
        self.sample: Sample = {}
        self._start = time.perf_counter()

    def mark(self, name: str) -> Sample:
        self.sample[name] = time.perf_counter() - self._start
        return self.sample


def timed(fn: Callable[[], object], name: str = "total") -> Sample:
    """One call of `fn`, timed."""
    laps = Laps()
    fn()
    return laps.mark(name)


def per_call(fn: Callable[[], object], calls: int) -> Case:
    """A case timing `calls` back-to-back calls of `fn`; its sample is seconds per call."""

    def case() -> Sample:
        laps = Laps()
        for _ in range(calls):
            fn()
        return {"call": laps.mark("call")["call"] / calls}

    return case


def settle() -> None:
    """Start every case from the same state: no garbage, no dirty pages being written
    back by the previous case, and a moment for its background threads to end."""
    gc.collect()
    os.sync()
    time.sleep(0.02)


def run_trials(cases: Mapping[str, Case], trials: int, warmup: int = 1) -> dict[str, list[Sample]]:
    """Run every case once per trial, in a fresh random order, and collect the samples.

    A shuffled order (seeded, so runs are repeatable) keeps any case from always
    following the same one; load from other processes falls on all cases alike.
    Warm-up rounds (JIT, first directory scans, allocator growth) are discarded.
    """
    order = random.Random(0)
    names = list(cases)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for trial in range(warmup + trials):
        order.shuffle(names)
        for name in names:
            settle()
            sample = cases[name]()
            if trial >= warmup:
                samples[name].append(sample)
    return samples


def column(samples: Sequence[Sample], key: str) -> list[float]:
    """One named duration across trials."""
    return [sample[key] for sample in samples]


@dataclass(frozen=True)
class Spread:
    """Median of per-trial values with min, max and quartiles."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    values: tuple[float, ...]  # per trial, in run order

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        ordered = sorted(values)
        q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
        return cls(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, tuple(values))

    def text(self, fmt: str = ".3f") -> str:
        return f"{self.median:{fmt}} ({self.low:{fmt}} to {self.high:{fmt}})"


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
    """Per-trial ratios of two cases measured side by side."""
    return Spread.of([a / b for a, b in zip(numerator, denominator, strict=True)])


def difference(minuend: Sequence[float], subtrahend: Sequence[float]) -> Spread:
    """Per-trial differences of two cases measured side by side."""
    return Spread.of([a - b for a, b in zip(minuend, subtrahend, strict=True)])
