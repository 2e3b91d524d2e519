"""Ranking by a monitored metric, and the Orbax policies built on it.

The ranking is total: NaN and +-inf rank worst, and among equal scores the older checkpoint
ranks better (Orbax's plain `BestN` keeps the newer). A checkpoint without a monitored value
(unscored: saved without metrics, or its metrics unreadable) is never evicted by rank; a
provisional one (`is_provisional`: partial, or a run's unscored end) is kept while newest.

Example:
    ```python
    from orbax.checkpoint import checkpoint_managers as ocm

    ranking = MetricRanking("val_loss", "min")
    best_two = BestNByRank(ranking, 2)
    infos = [ScoredStep(s, {"val_loss": v}) for s, v in enumerate([0.5, 0.2, 0.2, 0.9])]
    kept = best_two.should_preserve(infos, context=ocm.PreservationContext())
    assert list(kept) == [False, True, True, False]
    ```
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orbax.checkpoint import checkpoint_managers as ocm

from artifex_ckpt.validation import Mode

if TYPE_CHECKING:
    from artifex_ckpt.config import CheckpointConfig

# Stored with a checkpoint written mid-epoch (preemption, exception): it is kept only while
# it is the newest, so that each interruption does not leave an unscored checkpoint forever.
PARTIAL_METRIC = "artifex_partial"
# Stored with the last checkpoint of a run that ended without the monitored value
# (`save(..., last=True)`): kept only while it is the newest too, like Lightning's last.ckpt,
# so that each resumed run does not leave its unscored end behind for good.
LAST_METRIC = "artifex_last"

__all__ = [
    "LAST_METRIC",
    "PARTIAL_METRIC",
    "BestNByRank",
    "EveryInterval",
    "EveryNEpochs",
    "MetricRanking",
    "Mode",
    "NewestN",
    "RetainedOnArrival",
    "RetentionGate",
    "ScoredStep",
    "cadence_policy",
    "is_partial",
    "is_provisional",
    "retention_policy",
    "would_keep",
]

# Larger is better: (has a finite score, signed score, -step).
RankKey = tuple[bool, float, int]


@dataclass(frozen=True)
class ScoredStep:
    """A checkpoint as retention sees it (Orbax's `PolicyCheckpointInfo` protocol)."""

    step: int
    metrics: Mapping[str, Any] | None
    time: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(tz=datetime.UTC), compare=False
    )


@dataclass(frozen=True)
class MetricRanking:
    """Orders checkpoints by `monitor`, best last in `sorted(..., key=self.key)`."""

    monitor: str
    mode: Mode

    def value(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The stored monitored value (NaN included), or None if there is none."""
        if not isinstance(metrics, Mapping) or self.monitor not in metrics:
            return None
        try:
            return float(metrics[self.monitor])
        except (TypeError, ValueError):
            return None

    def score(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The monitored value if it is finite, else None."""
        value = self.value(metrics)
        return value if value is not None and math.isfinite(value) else None

    def key_of(self, step: int, value: float) -> RankKey:
        """The rank of a checkpoint of `step` with monitored `value`."""
        if not math.isfinite(value):
            return (False, 0.0, -step)
        return (True, -value if self.mode == "min" else value, -step)

    def key(self, info: ocm.PolicyCheckpointInfo) -> RankKey:
        """Larger is better: finite first, then by score, then older first."""
        value = self.value(info.metrics)
        return self.key_of(info.step, math.nan if value is None else value)

    def beats(self, value: float, threshold: float | None) -> bool:
        """Whether `value` is strictly better than `threshold` (None: no threshold)."""
        if threshold is None:
            return True
        return value < threshold if self.mode == "min" else value > threshold

    def best_fn(self, metrics: Mapping[str, Any]) -> float:
        """Orbax's `best_fn`: never raises, and never lets NaN outrank a number."""
        score = self.score(metrics)
        if score is not None:
            return score
        return math.inf if self.mode == "min" else -math.inf

    def ranked(
        self, infos: Sequence[ocm.PolicyCheckpointInfo], scored_only: bool = False
    ) -> list[ocm.PolicyCheckpointInfo]:
        """`infos` best first; with `scored_only`, those without a monitored value left out."""
        if scored_only:
            infos = [info for info in infos if self.value(info.metrics) is not None]
        return sorted(infos, key=self.key, reverse=True)

    def best(
        self, infos: Sequence[ocm.PolicyCheckpointInfo], threshold: float | None = None
    ) -> int | None:
        """The step of the best of `infos`; None if none has a finite score, or (as in
        Keras) the best does not beat `threshold`."""
        ranked = self.ranked(infos)
        if not ranked or (score := self.score(ranked[0].metrics)) is None:
            return None
        return ranked[0].step if self.beats(score, threshold) else None


@dataclass(frozen=True)
class BestNByRank:
    """`PreservationPolicy` that keeps the `n` best checkpoints by a `MetricRanking`.

    Unlike `ocp.checkpoint_managers.BestN`, ties keep the older checkpoint, NaN never
    displaces a number, and unscored checkpoints are kept (a provisional one, written
    mid-epoch or unscored at the end of a run, only while it is the newest). `n=None` keeps
    every scored one. With a `threshold`, only scores strictly better than it compete for
    the top n.
    """

    ranking: MetricRanking
    n: int | None
    threshold: float | None = None

    def should_preserve(
        self,
        checkpoints: Sequence[ocm.PolicyCheckpointInfo],
        *,
        context: ocm.PreservationContext,
    ) -> Sequence[bool]:
        competing = sorted(
            (
                (key, index)
                for index, info in enumerate(checkpoints)
                if (key := self._competing_key(info)) is not None
            ),
            reverse=True,
        )
        top = {index for _, index in (competing if self.n is None else competing[: self.n])}
        newest = max((info.step for info in checkpoints), default=None)
        return [
            index in top
            or (
                self.ranking.value(info.metrics) is None
                and (info.step == newest or not is_provisional(info.metrics))
            )
            for index, info in enumerate(checkpoints)
        ]

    def entry_bar(self, checkpoints: Sequence[ocm.PolicyCheckpointInfo]) -> RankKey | None:
        """The rank a new checkpoint must exceed to be kept; None while fewer than n compete."""
        if self.n is None:
            return None
        keys = sorted(
            (key for info in checkpoints if (key := self._competing_key(info)) is not None),
            reverse=True,
        )
        if len(keys) < self.n:
            return None
        return keys[self.n - 1] if self.n > 0 else (True, math.inf, 0)

    def admits(self, step: int, value: float | None, bar: RankKey | None) -> bool:
        """Whether a new checkpoint of `step` with monitored `value` would be kept, given
        `entry_bar(existing)`. The fast path of `should_preserve` for the newest checkpoint."""
        if value is None:
            return True
        if not self.ranking.beats(value, self.threshold):
            return False
        return bar is None or self.ranking.key_of(step, value) > bar

    def bar_value(self, bar: RankKey | None) -> float | None:
        """The score at `entry_bar` (the k-th best), or None when there is no bar."""
        if bar is None or not math.isfinite(bar[1]):
            return None
        if not bar[0]:
            return math.nan
        return -bar[1] if self.ranking.mode == "min" else bar[1]

    def _competing_key(self, info: ocm.PolicyCheckpointInfo) -> RankKey | None:
        value = self.ranking.value(info.metrics)
        if value is None or not self.ranking.beats(value, self.threshold):
            return None
        return self.ranking.key_of(info.step, value)


@dataclass(frozen=True)
class NewestN:
    """`PreservationPolicy` without a monitor: the `n` newest checkpoints (`n=None`: all), as
    Orbax's `LatestN`, except that a provisional one is kept only while it is the newest."""

    n: int | None

    def should_preserve(
        self,
        checkpoints: Sequence[ocm.PolicyCheckpointInfo],
        *,
        context: ocm.PreservationContext,
    ) -> Sequence[bool]:
        latest = ocm.LatestN(n=self.n).should_preserve(checkpoints, context=context)
        newest = max((info.step for info in checkpoints), default=None)
        return [
            bool(keep) and (info.step == newest or not is_provisional(info.metrics))
            for keep, info in zip(latest, checkpoints, strict=True)
        ]


def is_partial(metrics: Mapping[str, Any] | None) -> bool:
    """Whether these stored metrics mark a checkpoint written mid-epoch."""
    return isinstance(metrics, Mapping) and bool(metrics.get(PARTIAL_METRIC))


def is_provisional(metrics: Mapping[str, Any] | None) -> bool:
    """Whether these stored metrics mark a checkpoint kept only while it is the newest: one
    written mid-epoch, or the unscored last checkpoint of a run."""
    return isinstance(metrics, Mapping) and bool(
        metrics.get(PARTIAL_METRIC) or metrics.get(LAST_METRIC)
    )


def retention_policy(
    ranking: MetricRanking | None,
    save_top_k: int,
    keep_last: bool,
    threshold: float | None = None,
) -> ocm.PreservationPolicy:
    """The k best (`-1`: all, `0`: none by score), plus the newest when `keep_last`.

    Without a ranking (no monitor) the k newest are kept (`NewestN`), as in Lightning.
    """
    n = None if save_top_k == -1 else save_top_k
    base: ocm.PreservationPolicy = (
        NewestN(n) if ranking is None else BestNByRank(ranking, n, threshold)
    )
    if not keep_last:
        # Alone, without AnyPreservationPolicy's numpy and logging: this one is also
        # asked on every eligible epoch that might not be written (B1).
        return base
    return ocm.AnyPreservationPolicy([base, ocm.LatestN(n=1)])


def would_keep(
    policy: ocm.PreservationPolicy,
    candidate: ScoredStep,
    checkpoints: Sequence[ocm.PolicyCheckpointInfo],
    *,
    bar: RankKey | None = None,
) -> bool:
    """Whether `policy` would keep `candidate`, the newest checkpoint, once it is saved.

    `BestNByRank` answers from `bar` (its `entry_bar(checkpoints)`, which a caller may cache);
    other policies are asked the full question.
    """
    if isinstance(policy, BestNByRank):
        return policy.admits(candidate.step, policy.ranking.value(candidate.metrics), bar)
    return RetainedOnArrival(policy).should_save(candidate, checkpoints)


class RetentionGate:
    """Answers `would_keep` for a new newest checkpoint, cheaply enough for every eligible
    epoch (B1): `BestNByRank`'s entry bar is computed once per change of the checkpoint list
    (call `forget` after each change) and the last answer is reused for a repeated question.

    Example:
        ```python
        gate = RetentionGate(BestNByRank(MetricRanking("val_loss", "min"), 1))
        infos = [ScoredStep(0, {"val_loss": 0.5})]
        assert not gate.admits(1, "val_loss", 0.9, lambda: infos)
        assert gate.kth() == 0.5
        ```
    """

    def __init__(self, policy: ocm.PreservationPolicy) -> None:
        self.policy = policy
        self._bar: RankKey | None = None
        self._bar_known = False
        self._kth: float | None = None
        self._last: tuple[int, float | None, bool] | None = None

    def forget(self) -> None:
        """The checkpoint list changed: compute the entry bar anew next time."""
        self._bar_known = False
        self._last = None

    def admits(
        self,
        step: int,
        monitor: str | None,
        value: float | None,
        infos: Callable[[], Sequence[ocm.PolicyCheckpointInfo]],
    ) -> bool:
        """Whether a checkpoint of `step` with monitored `value` would be kept; `infos`
        lists the existing checkpoints (called only when needed)."""
        last = self._last
        if last is not None and last[0] == step and last[1] == value:
            return last[2]
        policy = self.policy
        if isinstance(policy, BestNByRank) and not self._bar_known:
            self._bar, self._bar_known = policy.entry_bar(infos()), True
            self._kth = policy.bar_value(self._bar)
        metrics = None if value is None or monitor is None else {monitor: value}
        existing: Sequence[ocm.PolicyCheckpointInfo] = (
            () if isinstance(policy, BestNByRank) else infos()
        )
        keep = would_keep(policy, ScoredStep(step, metrics), existing, bar=self._bar)
        self._last = (step, value, keep)
        return keep

    def kth(self) -> float | None:
        """The score a declined checkpoint had to beat (the k-th best kept), if known."""
        return self._kth if self._bar_known else None


@dataclass(frozen=True)
class EveryNEpochs:
    """`SaveDecisionPolicy`: steps `n-1, 2n-1, ...` are eligible (every n-th completed epoch)."""

    n: int

    def is_eligible(self, step: int) -> bool:
        """The same decision as `should_save`, cheap enough for every epoch."""
        return (step + 1) % self.n == 0

    def should_save(
        self,
        step: ocm.PolicyCheckpointInfo,
        previous_steps: Sequence[ocm.PolicyCheckpointInfo],
        *,
        context: ocm.DecisionContext,
    ) -> bool:
        return self.is_eligible(step.step) or context.reached_preemption


class EveryInterval:
    """`SaveDecisionPolicy` of Lightning's `train_time_interval`: save once `seconds` have
    passed since the newest checkpoint.

    The training loop reads its clock after each batch (`is_due`, by the primary host's clock
    when there are several) and `grant`s the save it decided; Orbax's own check then agrees
    instead of judging again by checkpoint times on each host's clock. Ungranted, it judges
    by the checkpoints' times (a custom loop), and the first save of a run is due.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._granted = False

    def __repr__(self) -> str:
        return f"EveryInterval(seconds={self.seconds!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EveryInterval) and other.seconds == self.seconds

    def is_due(self, since_last: float) -> bool:
        """Whether `since_last` seconds complete the interval."""
        return since_last >= self.seconds

    def grant(self) -> None:
        """The caller decided that the next save is due."""
        self._granted = True

    def should_save(
        self,
        step: ocm.PolicyCheckpointInfo,
        previous_steps: Sequence[ocm.PolicyCheckpointInfo],
        *,
        context: ocm.DecisionContext,
    ) -> bool:
        granted, self._granted = self._granted, False
        if granted or not previous_steps or context.reached_preemption:
            return True
        return self.is_due((step.time - previous_steps[-1].time).total_seconds())


@dataclass(frozen=True)
class RetainedOnArrival:
    """`SaveDecisionPolicy`: save only what `preservation` would keep once it is saved.

    Orbax calls save-decision policies without the new step's metrics, so this one is asked
    directly (`would_keep`), with a `step` that carries them.
    """

    preservation: ocm.PreservationPolicy

    def should_save(
        self,
        step: ocm.PolicyCheckpointInfo,
        previous_steps: Sequence[ocm.PolicyCheckpointInfo],
        *,
        context: ocm.DecisionContext | None = None,
    ) -> bool:
        kept = self.preservation.should_preserve(
            [*previous_steps, step], context=ocm.PreservationContext()
        )
        return bool(kept[-1])


def cadence_policy(config: CheckpointConfig) -> ocm.SaveDecisionPolicy:
    """The save decision policy of a config's cadence: `EveryNEpochs`, Orbax's
    `FixedIntervalPolicy` over global steps, or `EveryInterval`."""
    if config.every_n_train_steps is not None:
        return ocm.FixedIntervalPolicy(config.every_n_train_steps)
    seconds = config.interval_seconds
    if seconds is not None:
        return EveryInterval(seconds)
    return EveryNEpochs(config.every_n_epochs)
