"""The writer's journal: what happens after a save commits, and the decisions to record.

`save` tells the journal what it started (`started`) or declined (`declined`) in a few
microseconds; the slow parts wait for the housekeeper, which runs `flush` once the
save has committed: a manifest of sizes and checksums is written into the new checkpoint,
and the saved, evicted and not-saved decisions are appended to the run's history. A save that
failed has no committed directory, so it gets neither (its error is raised by
`wait_until_finished`). Each decision carries the time it was taken, not the time it was
written, so the history reads in the order of the run even though a save is recorded only
after it commits.

Example:
    ```python
    import tempfile

    from etils import epath

    from artifex_ckpt.plan import plan_manager

    plan = plan_manager(epath.Path(tempfile.mkdtemp()), None, {"save_top_k": 3})
    journal = Journal.of(plan)
    journal.declined(4, {"val_loss": 0.9}, kth=0.5)
    journal.flush()
    assert journal.history.read()[-1].kind == "not_saved"
    ```
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from etils import epath

from artifex_ckpt.history import Decision, DecisionHistory
from artifex_ckpt.listing import commit_problem
from artifex_ckpt.manifest import write_manifest
from artifex_ckpt.ownership import Claim
from artifex_ckpt.plan import ManagerPlan
from artifex_ckpt.policies import is_provisional

__all__ = ["Committing", "Journal"]


@dataclass(frozen=True)
class Committing:
    """A save in flight: its step, directory, score and rank, the steps it evicts as
    (step, name, score), whether it is kept only while newest (`policies.is_provisional`),
    and when it was started (unix seconds)."""

    step: int
    path: epath.Path
    score: float | None
    rank: int | None
    evicted: tuple[tuple[int, str, float | None], ...] = ()
    provisional: bool = False
    at: float = field(default_factory=time.time)


class Journal:
    """Manifests and decision history of one writer (of `plan`); thread-safe.

    With an `initial_value_threshold`, a score that does not beat it is recorded as such: a
    declined checkpoint names the threshold rather than the k-th best, and a saved one (kept
    only as the newest) has no rank.
    """

    def __init__(
        self, plan: ManagerPlan, history: DecisionHistory, claim: Claim | None = None
    ) -> None:
        self._plan = plan
        self.history = history
        self._claim = claim
        self.k = plan.settings.save_top_k
        self._lock = threading.Lock()
        self._committing: list[Committing] = []
        # Appended without the lock (a deque's append is atomic): it runs on every declined
        # epoch (B1). `flush` takes entries from the other end.
        self._declined: deque[tuple[int, Mapping[str, float] | None, float | None, float]] = deque()
        self._decisions: list[Decision] = []

    @classmethod
    def of(cls, plan: ManagerPlan, claim: Claim | None = None) -> Journal:
        """The journal of a writer's plan: history in its directory, its retention rule;
        nothing is written once `claim` (the writer's hold on the directory) is lost."""
        return cls(plan, DecisionHistory(plan.directory), claim)

    def started(
        self,
        step: int,
        name: str,
        metrics: Mapping[str, float] | None,
        before: Mapping[int, Mapping[str, Any] | None],
        ranked: Sequence[int],
        retained: Sequence[int],
    ) -> None:
        """A save of `step` (directory `name`) started; recorded once it has committed.
        `before` are the metrics of the checkpoints retained before it, `ranked` and
        `retained` the steps after it (so the evicted ones are known)."""
        score = self._score(metrics)
        rank = ranked.index(step) + 1 if step in ranked and score is not None else None
        gone = sorted(before.keys() - set(retained))
        evicted = tuple((s, self._plan.step_name(s), self._score(before[s])) for s in gone)
        path = self._plan.directory / name
        entry = Committing(step, path, score, rank, evicted, is_provisional(metrics))
        with self._lock:
            self._committing.append(entry)

    def declined(
        self, step: int, metrics: Mapping[str, float] | None, *, kth: float | None
    ) -> None:
        """A checkpoint of `step` was not written: it would not enter the top k."""
        self._declined.append((step, metrics, kth, time.time()))  # scored when flushed

    def _score(self, metrics: Mapping[str, Any] | None) -> float | None:
        ranking = self._plan.ranking
        return None if ranking is None else ranking.value(metrics)

    def record(self, decision: Decision) -> None:
        """Any other decision (restored, skipped as corrupt, ...), written at the next flush."""
        with self._lock:
            self._decisions.append(decision)

    def flush(self) -> list[str]:
        """Write manifests of committed saves and append every pending decision; returns what
        went wrong (a manifest that could not be written). Call when no save is in flight.
        Raises `OwnershipError`, writing nothing, if another run took the directory over."""
        if self._claim is not None:
            self._claim.refresh()
        with self._lock:
            committing, self._committing = self._committing, []
            declined = [self._declined.popleft() for _ in range(len(self._declined))]
            decisions, self._decisions = self._decisions, []
        out = [
            Decision.not_saved(
                step, score, k=self.k, kth=kth, threshold=self._failed_threshold(score), at=at
            )
            for step, metrics, kth, at in declined
            for score in [self._score(metrics)]
        ]
        problems = []
        for entry in committing:
            if commit_problem(entry.path, entry.step) is not None:
                continue  # the save failed; `wait_until_finished` raises its error
            try:
                write_manifest(entry.path)
            except Exception as err:  # the decisions below are recorded all the same
                problems.append(f"manifest of {entry.path} not written: {err}")
            below = self._failed_threshold(entry.score)
            out.append(
                Decision.saved(
                    entry.step,
                    entry.path.name,
                    entry.score,
                    rank=None if below is not None else entry.rank,
                    k=self.k,
                    threshold=below,
                    provisional=entry.provisional,
                    at=entry.at,
                )
            )
            out.extend(
                Decision.evicted(
                    step,
                    name,
                    score,
                    by=entry.path.name,
                    by_step=entry.step,
                    by_score=entry.score,
                    at=entry.at,
                )
                for step, name, score in entry.evicted
            )
        out.extend(decisions)
        for decision in sorted(out, key=lambda d: d.time):
            self.history.append(decision)
        self.history.flush()
        return problems

    def _failed_threshold(self, score: float | None) -> float | None:
        """The threshold `score` does not beat (Keras: not considered at all), else None."""
        threshold = self._plan.settings.initial_value_threshold
        ranking = self._plan.ranking
        if threshold is None or score is None or ranking is None:
            return None
        return None if ranking.beats(score, threshold) else threshold
