"""Ranking by a monitored metric, and the Orbax policies built on it.

The ranking is total: NaN, +-inf and missing values rank worst, and among equal
scores the older checkpoint ranks better (Orbax's plain `BestN` keeps the newer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from orbax.checkpoint import checkpoint_managers as ocm

__all__ = [
    "BestNByRank",
    "EveryNEpochs",
    "MetricRanking",
    "RetainedOnArrival",
    "retention_policy",
]

Mode = Literal["min", "max"]
RankKey = tuple[bool, float, int]


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

    def key(self, info: ocm.PolicyCheckpointInfo) -> RankKey:
        """Larger is better: finite first, then by score, then older first."""
        score = self.score(info.metrics)
        if score is None:
            return (False, 0.0, -info.step)
        return (True, -score if self.mode == "min" else score, -info.step)

    def best_fn(self, metrics: Mapping[str, Any]) -> float:
        """Orbax's `best_fn`: never raises, and never lets NaN outrank a number."""
        score = self.score(metrics)
        if score is not None:
            return score
        return math.inf if self.mode == "min" else -math.inf

    def ranked(self, infos: Sequence[ocm.PolicyCheckpointInfo]) -> list[ocm.PolicyCheckpointInfo]:
        """`infos` best first."""
        return sorted(infos, key=self.key, reverse=True)


@dataclass(frozen=True)
class BestNByRank:
    """`PreservationPolicy` that keeps the `n` best checkpoints by a `MetricRanking`.

    Unlike `ocp.checkpoint_managers.BestN`, ties keep the older checkpoint and NaN
    never displaces a number. `n=None` keeps everything.
    """

    ranking: MetricRanking
    n: int | None

    def should_preserve(
        self,
        checkpoints: Sequence[ocm.PolicyCheckpointInfo],
        *,
        context: ocm.PreservationContext,
    ) -> Sequence[bool]:
        if self.n is None:
            return [True] * len(checkpoints)
        order = sorted(
            range(len(checkpoints)), key=lambda i: self.ranking.key(checkpoints[i]), reverse=True
        )
        kept = set(order[: self.n])
        return [i in kept for i in range(len(checkpoints))]


def retention_policy(
    ranking: MetricRanking, save_top_k: int, keep_last: bool
) -> ocm.PreservationPolicy:
    """The k best (`-1`: all, `0`: none by score), plus the newest when `keep_last`."""
    best = BestNByRank(ranking, None if save_top_k == -1 else save_top_k)
    if not keep_last:
        # Alone, without AnyPreservationPolicy's numpy and logging: this one is also
        # asked on every eligible epoch that might not be written (B1).
        return best
    return ocm.AnyPreservationPolicy([best, ocm.LatestN(n=1)])


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


@dataclass(frozen=True)
class RetainedOnArrival:
    """`SaveDecisionPolicy`: save only what `preservation` would keep once it is saved.

    Orbax calls save-decision policies without the new step's metrics, so the manager
    calls this one itself, with a `step` that carries them.
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
