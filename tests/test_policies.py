"""The retention policies on made-up checkpoint lists: no disk, no manager.

Like Orbax's own `preservation_policy_test.py`, each case is a list of checkpoint infos and
the preserve flags expected for it. A property test checks the fast path (`entry_bar` +
`admits`, used by `would_keep`) against the general definition (`RetainedOnArrival`) and
against the plain-Python reference model in `tests/reference.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from orbax.checkpoint import checkpoint_managers as ocm
from orbax.checkpoint import options as ocp_options

from artifex_ckpt.policies import (
    LAST_METRIC,
    PARTIAL_METRIC,
    BestNByRank,
    EveryNEpochs,
    MetricRanking,
    NewestN,
    RetainedOnArrival,
    ScoredStep,
    retention_policy,
    would_keep,
)
from tests.reference import RetentionRule, kept_steps

NAN, INF = math.nan, math.inf
# Unscored in three ways: no metrics, metrics without the monitor, an unreadable value.
NO_METRICS: Any = object()
NO_MONITOR: Any = object()
NOT_A_NUMBER: Any = object()


def metrics_for(value: Any) -> dict[str, Any] | None:
    if value is NO_METRICS:
        return None
    if value is NO_MONITOR:
        return {"accuracy": 0.5}
    if value is NOT_A_NUMBER:
        return {"val_loss": "n/a", "accuracy": 0.5}
    return {"val_loss": value, "accuracy": 0.5}


def infos(values: Sequence[Any], steps: Sequence[int] | None = None) -> list[ScoredStep]:
    steps = range(len(values)) if steps is None else steps
    return [ScoredStep(s, metrics_for(v)) for s, v in zip(steps, values, strict=True)]


def preserved(policy: ocm.PreservationPolicy, values: Sequence[Any]) -> list[bool]:
    flags = policy.should_preserve(infos(values), context=ocm.PreservationContext())
    return [bool(flag) for flag in flags]


T, F = True, False

BEST_N_CASES = [
    # (id, mode, n, threshold, values, expected)
    ("min-two-of-four", "min", 2, None, [0.5, 0.2, 0.2, 0.9], [F, T, T, F]),
    ("max-two-of-three", "max", 2, None, [0.1, 0.9, 0.5], [F, T, T]),
    ("min-tie-keeps-older", "min", 1, None, [0.3, 0.3], [T, F]),
    ("max-tie-keeps-older", "max", 1, None, [0.3, 0.3], [T, F]),
    ("tie-at-the-cut", "min", 2, None, [0.1, 0.3, 0.3, 0.3], [T, T, F, F]),
    ("nan-never-beats-a-number", "min", 1, None, [NAN, 0.9], [F, T]),
    ("nan-max", "max", 1, None, [NAN, -5.0], [F, T]),
    ("nan-fills-free-places", "min", 3, None, [NAN, 0.9], [T, T]),
    ("older-nan-outranks-newer-nan", "min", 2, None, [NAN, 0.9, NAN], [T, T, F]),
    ("plus-inf-worst-in-min", "min", 1, None, [INF, 0.9], [F, T]),
    ("minus-inf-worst-in-min", "min", 1, None, [-INF, 5.0], [F, T]),
    ("plus-inf-worst-in-max", "max", 1, None, [INF, 0.1], [F, T]),
    ("minus-inf-worst-in-max", "max", 1, None, [-INF, 0.1], [F, T]),
    ("non-finite-are-equal", "min", 1, None, [INF, NAN, -INF], [T, F, F]),
    ("unscored-always-kept", "min", 1, None, [NO_METRICS, 0.5, NO_METRICS, 0.2], [T, F, T, T]),
    ("no-monitor-is-unscored", "min", 1, None, [NO_MONITOR, 0.5, 0.4], [T, F, T]),
    ("unreadable-is-unscored", "max", 1, None, [NOT_A_NUMBER, 0.5, 0.4], [T, T, F]),
    ("unscored-kept-with-n-0", "min", 0, None, [NO_METRICS, 0.1], [T, F]),
    ("n-0-keeps-no-scored", "min", 0, None, [0.1, 0.2, NAN], [F, F, F]),
    ("n-none-keeps-all", "min", None, None, [NAN, 0.1, NO_METRICS, INF], [T, T, T, T]),
    ("n-larger-than-list", "max", 5, None, [0.1, 0.2], [T, T]),
    ("empty", "min", 2, None, [], []),
    ("threshold-min", "min", 2, 0.5, [0.6, 0.4, 0.5, 0.3, 0.45], [F, T, F, T, F]),
    ("threshold-max", "max", None, 0.5, [0.6, 0.4, 0.5, 0.7], [T, F, F, T]),
    ("threshold-equal-is-not-better", "min", None, 0.5, [0.5], [F]),
    ("threshold-nan-never-competes", "min", None, 0.5, [NAN, 0.4], [F, T]),
    ("threshold-plus-inf-min", "min", None, 0.5, [INF, 0.4], [F, T]),
    ("threshold-unscored-still-kept", "min", 1, 0.5, [NO_METRICS, 0.9], [T, F]),
    ("threshold-n-0", "min", 0, 0.5, [0.1], [F]),
]


@pytest.mark.parametrize(
    ("mode", "n", "threshold", "values", "expected"),
    [case[1:] for case in BEST_N_CASES],
    ids=[case[0] for case in BEST_N_CASES],
)
def test_best_n_by_rank(
    mode: str, n: int | None, threshold: float | None, values: list[Any], expected: list[bool]
) -> None:
    policy = BestNByRank(MetricRanking("val_loss", mode), n, threshold)  # type: ignore[arg-type]
    assert preserved(policy, values) == expected


def test_best_n_by_rank_ignores_the_order_of_the_list() -> None:
    policy = BestNByRank(MetricRanking("val_loss", "min"), 2)
    checkpoints = infos([0.3, 0.1, 0.3, NAN, 0.2], steps=[4, 0, 2, 1, 3])
    flags = policy.should_preserve(checkpoints, context=ocm.PreservationContext())
    assert {info.step for info, keep in zip(checkpoints, flags, strict=True) if keep} == {0, 3}


RETENTION_CASES = [
    # (id, monitored, k, keep_last, values, expected)
    ("best-1-plus-last", True, 1, True, [0.1, 0.5, 0.7], [T, F, T]),
    ("best-1-is-last", True, 1, True, [0.5, 0.1], [F, T]),
    ("best-1-without-last", True, 1, False, [0.1, 0.5, 0.7], [T, F, F]),
    ("best-0-plus-last", True, 0, True, [0.1, 0.5, NO_METRICS, 0.7], [F, F, T, T]),
    ("best-0-only-unscored", True, 0, False, [0.1, NO_METRICS, 0.7], [F, T, F]),
    ("all", True, -1, False, [NAN, 0.1, INF], [T, T, T]),
    ("last-is-nan", True, 1, True, [0.1, 0.2, NAN], [T, F, T]),
    ("latest-2", False, 2, False, [0.1, 0.2, 0.3], [F, T, T]),
    ("latest-ignores-values", False, 1, False, [0.1, NAN, 0.9], [F, F, T]),
    ("latest-ignores-unscored", False, 1, False, [NO_METRICS, 0.1], [F, T]),
    ("latest-all", False, -1, False, [0.1, 0.2, 0.3], [T, T, T]),
    ("latest-0", False, 0, False, [0.1, 0.2], [F, F]),
    ("latest-0-plus-last", False, 0, True, [0.1, 0.2], [F, T]),
    ("latest-2-plus-last", False, 2, True, [0.1, 0.2, 0.3], [F, T, T]),
]


@pytest.mark.parametrize(
    ("monitored", "k", "keep_last", "values", "expected"),
    [case[1:] for case in RETENTION_CASES],
    ids=[case[0] for case in RETENTION_CASES],
)
def test_retention_policy(
    monitored: bool, k: int, keep_last: bool, values: list[Any], expected: list[bool]
) -> None:
    ranking = MetricRanking("val_loss", "min") if monitored else None
    assert preserved(retention_policy(ranking, k, keep_last), values) == expected


def test_retention_policy_shapes() -> None:
    ranking = MetricRanking("val_loss", "max")
    assert retention_policy(ranking, 2, False, 0.5) == BestNByRank(ranking, 2, 0.5)
    assert retention_policy(ranking, -1, False) == BestNByRank(ranking, None)
    assert retention_policy(None, 3, False) == NewestN(3)
    assert retention_policy(None, -1, False) == NewestN(None)
    combined = retention_policy(ranking, 2, True, 0.5)
    assert isinstance(combined, ocm.AnyPreservationPolicy)
    assert list(combined.policies) == [BestNByRank(ranking, 2, 0.5), ocm.LatestN(n=1)]


def test_newest_n_keeps_a_partial_checkpoint_only_while_it_is_the_newest() -> None:
    partial = {PARTIAL_METRIC: 1.0}
    infos = [ScoredStep(0, None), ScoredStep(1, partial), ScoredStep(2, None)]
    context = ocm.PreservationContext()
    assert list(NewestN(3).should_preserve(infos, context=context)) == [T, F, T]
    assert list(NewestN(3).should_preserve(infos[:2], context=context)) == [T, T]
    assert list(NewestN(1).should_preserve(infos[:2], context=context)) == [F, T]


@pytest.mark.parametrize("marker", [PARTIAL_METRIC, LAST_METRIC])
def test_a_provisional_checkpoint_is_kept_only_while_it_is_the_newest(marker: str) -> None:
    # A plain unscored checkpoint (no metrics) is kept for good; a marked one is not.
    provisional = {marker: 1.0}
    context = ocm.PreservationContext()
    best = BestNByRank(MetricRanking("val_loss", "min"), 1)
    infos = [ScoredStep(0, None), ScoredStep(1, provisional), ScoredStep(2, {"val_loss": 0.5})]
    assert list(best.should_preserve(infos, context=context)) == [T, F, T]
    assert list(best.should_preserve(infos[:2], context=context)) == [T, T]
    assert list(NewestN(None).should_preserve(infos, context=context)) == [T, F, T]


def test_retention_policy_passes_the_threshold_on() -> None:
    policy = retention_policy(MetricRanking("val_loss", "min"), 2, True, threshold=0.5)
    assert preserved(policy, [0.4, 0.6, 0.3, 0.7]) == [T, F, T, T]


def decision(*, preempted: bool) -> ocm.DecisionContext:
    return ocm.DecisionContext(
        is_saving_in_progress=False,
        reached_preemption=preempted,
        multiprocessing_options=ocp_options.MultiprocessingOptions(),
    )


@pytest.mark.parametrize(
    ("n", "eligible"),
    [(1, [0, 1, 2, 3, 4, 5, 6, 7, 8]), (3, [2, 5, 8]), (4, [3, 7]), (10, [])],
)
def test_every_n_epochs(n: int, eligible: list[int]) -> None:
    policy = EveryNEpochs(n)
    assert [s for s in range(9) if policy.is_eligible(s)] == eligible
    asked = [
        s
        for s in range(9)
        if policy.should_save(ScoredStep(s, None), [], context=decision(preempted=False))
    ]
    assert asked == eligible


def test_every_n_epochs_saves_any_step_on_preemption() -> None:
    policy = EveryNEpochs(5)
    assert policy.should_save(ScoredStep(1, None), [], context=decision(preempted=True))
    assert not policy.is_eligible(1)


def test_entry_bar() -> None:
    ranking = MetricRanking("val_loss", "min")
    checkpoints = infos([0.3, NO_METRICS, 0.1, 0.9, 0.6])
    assert BestNByRank(ranking, None).entry_bar(checkpoints) is None
    assert BestNByRank(ranking, 5).entry_bar(checkpoints) is None  # only four compete
    assert BestNByRank(ranking, 2).entry_bar(checkpoints) == ranking.key_of(0, 0.3)
    assert BestNByRank(ranking, 2, threshold=0.2).entry_bar(checkpoints) is None
    zero = BestNByRank(ranking, 0)
    bar = zero.entry_bar(checkpoints)
    assert not zero.admits(9, -1e300, bar)
    assert zero.admits(9, None, bar)  # unscored is kept whatever the bar


def test_admits_respects_threshold_and_ties() -> None:
    policy = BestNByRank(MetricRanking("val_loss", "min"), 1, threshold=0.5)
    bar = policy.entry_bar(infos([0.3]))
    assert not policy.admits(1, 0.3, bar)  # a tie goes to the older
    assert policy.admits(1, 0.29, bar)
    assert not policy.admits(1, 0.5, None)  # not strictly better than the threshold
    assert not policy.admits(1, NAN, None)
    assert policy.admits(1, 0.49, None)


def test_would_keep_asks_other_policies_in_full() -> None:
    ranking = MetricRanking("val_loss", "min")
    existing = infos([0.1, 0.2])
    with_last = retention_policy(ranking, 1, True)
    assert would_keep(with_last, ScoredStep(2, {"val_loss": 9.0}), existing)
    alone = ocm.AnyPreservationPolicy([BestNByRank(ranking, 1)])
    assert not would_keep(alone, ScoredStep(2, {"val_loss": 9.0}), existing)
    assert would_keep(alone, ScoredStep(2, {"val_loss": 0.05}), existing)
    assert would_keep(ocm.LatestN(n=1), ScoredStep(2, None), existing)
    assert not would_keep(ocm.LatestN(n=0), ScoredStep(2, None), existing)


def test_retained_on_arrival_is_a_save_decision_policy() -> None:
    policy = RetainedOnArrival(BestNByRank(MetricRanking("val_loss", "max"), 1))
    assert isinstance(policy, ocm.SaveDecisionPolicy)
    existing = infos([0.5])
    assert policy.should_save(ScoredStep(1, {"val_loss": 0.6}), existing)
    assert not policy.should_save(
        ScoredStep(1, {"val_loss": 0.5}), existing, context=decision(preempted=False)
    )


# Property tests: arbitrary existing lists (not only ones retention would leave behind).
VALUES = st.one_of(
    st.sampled_from([0.5, 0.25, 1.0, -1.0, NAN, INF, -INF, None]),
    st.floats(min_value=-2, max_value=2, allow_nan=False).map(lambda v: round(v, 1)),
)
THRESHOLDS = st.one_of(st.none(), st.sampled_from([0.25, 0.5, 0.0, -1.0]))


@st.composite
def checkpoint_lists(draw: st.DrawFn, max_size: int = 8) -> list[tuple[int, float | None]]:
    gaps = draw(st.lists(st.integers(1, 3), max_size=max_size))
    steps = [sum(gaps[: i + 1]) - 1 for i in range(len(gaps))]
    return [(step, draw(VALUES)) for step in steps]


def as_infos(checkpoints: Sequence[tuple[int, float | None]]) -> list[ScoredStep]:
    return [
        ScoredStep(step, None if value is None else {"val_loss": value})
        for step, value in checkpoints
    ]


@settings(max_examples=300)
@given(
    existing=checkpoint_lists(),
    gap=st.integers(1, 3),
    value=VALUES,
    k=st.integers(-1, 4),
    keep_last=st.booleans(),
    mode=st.sampled_from(["min", "max", None]),
    threshold=THRESHOLDS,
)
def test_fast_path_general_definition_and_reference_agree(
    existing: list[tuple[int, float | None]],
    gap: int,
    value: float | None,
    k: int,
    keep_last: bool,
    mode: str | None,
    threshold: float | None,
) -> None:
    threshold = None if mode is None else threshold
    ranking = None if mode is None else MetricRanking("val_loss", mode)  # type: ignore[arg-type]
    policy = retention_policy(ranking, k, keep_last, threshold)
    step = (existing[-1][0] if existing else -1) + gap
    candidate = ScoredStep(step, None if value is None else {"val_loss": value})
    checkpoints = as_infos(existing)
    bar = policy.entry_bar(checkpoints) if isinstance(policy, BestNByRank) else None

    fast = would_keep(policy, candidate, checkpoints, bar=bar)
    general = RetainedOnArrival(policy).should_save(candidate, checkpoints)
    rule = RetentionRule(k=k, keep_last=keep_last, mode=mode, threshold=threshold)
    expected = step in kept_steps([*existing, (step, value)], rule)
    assert fast == general == expected


@settings(max_examples=200)
@given(
    checkpoints=checkpoint_lists(),
    k=st.integers(-1, 4),
    keep_last=st.booleans(),
    mode=st.sampled_from(["min", "max", None]),
    threshold=THRESHOLDS,
)
def test_should_preserve_matches_reference(
    checkpoints: list[tuple[int, float | None]],
    k: int,
    keep_last: bool,
    mode: str | None,
    threshold: float | None,
) -> None:
    threshold = None if mode is None else threshold
    ranking = None if mode is None else MetricRanking("val_loss", mode)  # type: ignore[arg-type]
    policy = retention_policy(ranking, k, keep_last, threshold)
    infos_ = as_infos(checkpoints)
    flags = policy.should_preserve(infos_, context=ocm.PreservationContext())
    kept = {info.step for info, keep in zip(infos_, flags, strict=True) if keep}
    rule = RetentionRule(k=k, keep_last=keep_last, mode=mode, threshold=threshold)
    assert kept == kept_steps(checkpoints, rule)
