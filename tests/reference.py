"""A plain-Python reference model of retention and best, for tests to compare against.

It shares no code with `artifex_ckpt`: ranks are decided by counting strictly better
checkpoints, not by sort keys, so a bug in the library's ranking cannot hide here.

Rules (`RetentionRule`):

- A checkpoint is `(step, value)`; `value` None means unscored (saved without metrics, or
  metrics unreadable). Unscored checkpoints are always kept.
- Among scored checkpoints, finite values rank by `mode`; NaN, +inf and -inf rank worst and
  equal to each other; equal values rank the older (smaller step) better.
- With a `threshold`, only values strictly better than it compete for the top `k`
  (NaN is never better than anything).
- `k` = -1 keeps every competitor, 0 none, k > 0 the k best.
- `keep_last` also keeps the newest checkpoint, scored or not.
- `mode` None means no monitor: the newest `k` are kept, values ignored.
- With `keep_last=False`, a new checkpoint is written only if it would be kept.

Example:
    ```python
    rule = RetentionRule(k=1, keep_last=False, mode="min")
    outcomes = simulate([(0, 0.5), (1, 0.7), (2, None), (3, 0.2)], rule)
    assert [o.written for o in outcomes] == [True, False, True, True]
    assert outcomes[-1].kept == frozenset({2, 3}) and outcomes[-1].best == 3
    ```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Checkpoint",
    "Outcome",
    "RetentionRule",
    "best_step",
    "better",
    "competes",
    "kept_steps",
    "simulate",
    "would_write",
]

Checkpoint = tuple[int, float | None]


@dataclass(frozen=True)
class RetentionRule:
    """What is kept: the `k` best by `mode` (None: the newest k), and the newest if asked."""

    k: int
    keep_last: bool
    mode: str | None = "min"
    threshold: float | None = None


@dataclass(frozen=True)
class Outcome:
    """What one save did: whether it was written, what is kept after it, and the best."""

    step: int
    written: bool
    kept: frozenset[int]
    best: int | None


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def _strictly_better_value(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def better(a: Checkpoint, b: Checkpoint, mode: str) -> bool:
    """Whether scored checkpoint `a` ranks strictly better than scored checkpoint `b`."""
    (step_a, value_a), (step_b, value_b) = a, b
    assert value_a is not None and value_b is not None, "only scored checkpoints rank"
    if _finite(value_a) != _finite(value_b):
        return _finite(value_a)
    if _finite(value_a) and value_a != value_b:
        return _strictly_better_value(value_a, value_b, mode)
    return step_a < step_b


def competes(value: float | None, rule: RetentionRule) -> bool:
    """Whether a checkpoint with `value` competes for the top k under `rule`."""
    if value is None or rule.mode is None:
        return False
    if rule.threshold is None:
        return True
    return _strictly_better_value(value, rule.threshold, rule.mode)


def kept_steps(checkpoints: Sequence[Checkpoint], rule: RetentionRule) -> set[int]:
    """The steps `rule` keeps among `checkpoints` (all of them present at once)."""
    steps = [step for step, _ in checkpoints]
    kept: set[int] = set()
    if rule.mode is None:
        newest_first = sorted(steps, reverse=True)
        kept.update(newest_first if rule.k == -1 else newest_first[: rule.k])
    else:
        mode = rule.mode
        kept.update(step for step, value in checkpoints if value is None)
        competitors = [c for c in checkpoints if competes(c[1], rule)]
        for candidate in competitors:
            ahead = sum(better(other, candidate, mode) for other in competitors)
            if rule.k == -1 or ahead < rule.k:
                kept.add(candidate[0])
    if rule.keep_last and steps:
        kept.add(max(steps))
    return kept


def best_step(
    retained: Sequence[Checkpoint], mode: str | None, threshold: float | None = None
) -> int | None:
    """The best retained step: the best finite score (None if none has one, or if it does
    not beat `threshold`, as in Keras); without a monitor (`mode` None), the newest."""
    if mode is None:
        return max((step for step, _ in retained), default=None)
    scored = [c for c in retained if c[1] is not None and _finite(c[1])]
    winners = [c for c in scored if not any(better(o, c, mode) for o in scored)]
    if not winners:
        return None
    step, value = winners[0]
    if threshold is not None and not _strictly_better_value(value, threshold, mode):
        return None
    return step


def would_write(retained: Sequence[Checkpoint], candidate: Checkpoint, rule: RetentionRule) -> bool:
    """Whether `candidate`, newer than every retained checkpoint, is written at all."""
    return rule.keep_last or candidate[0] in kept_steps([*retained, candidate], rule)


def simulate(saves: Sequence[Checkpoint], rule: RetentionRule) -> list[Outcome]:
    """Apply `rule` after each save of `saves` (in save order, steps increasing)."""
    retained: list[Checkpoint] = []
    outcomes = []
    for candidate in saves:
        written = would_write(retained, candidate, rule)
        if written:
            everything = [*retained, candidate]
            keep = kept_steps(everything, rule)
            retained = [c for c in everything if c[0] in keep]
        outcomes.append(
            Outcome(
                step=candidate[0],
                written=written,
                kept=frozenset(step for step, _ in retained),
                best=best_step(retained, rule.mode, rule.threshold),
            )
        )
    return outcomes
