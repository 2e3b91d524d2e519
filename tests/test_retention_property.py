"""Retention and best tracking on real Orbax, against a plain-Python reference model."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from hypothesis import given, settings
from hypothesis import strategies as st

from artifex_ckpt import MetricCheckpointManager
from tests.conftest import step_dirs

TEMPLATE = "e{epoch:02d}-{val_loss:.2f}"


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def _better(a: tuple[int, float], b: tuple[int, float], mode: str) -> bool:
    """Is checkpoint a = (step, value) strictly better than b?"""
    (step_a, va), (step_b, vb) = a, b
    if _finite(va) != _finite(vb):
        return _finite(va)
    if _finite(va) and va != vb:
        return va < vb if mode == "min" else va > vb
    return step_a < step_b  # equal scores (or both non-finite): the older wins


def _reference_keep(
    candidates: list[tuple[int, float]], k: int, keep_last: bool, mode: str
) -> set[int]:
    kept = set()
    for c in candidates:
        n_better = sum(_better(o, c, mode) for o in candidates if o is not c)
        if k == -1 or n_better < k:
            kept.add(c[0])
    if keep_last and candidates:
        kept.add(max(step for step, _ in candidates))
    return kept


def _reference_best(retained: list[tuple[int, float]], mode: str) -> int | None:
    best = None
    for c in retained:
        if _finite(c[1]) and (best is None or _better(c, best, mode)):
            best = c
    return None if best is None else best[0]


metric_values = st.one_of(
    st.sampled_from([0.5, 0.25, 1.0, math.nan, math.inf, -math.inf]),
    st.floats(min_value=-2, max_value=2, allow_nan=False).map(lambda v: round(v, 1)),
)


@settings(max_examples=40)
@given(
    values=st.lists(metric_values, min_size=1, max_size=7),
    k=st.integers(-1, 4),
    keep_last=st.booleans(),
    mode=st.sampled_from(["min", "max"]),
)
def test_disk_and_best_step_match_reference(
    values: list[float], k: int, keep_last: bool, mode: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        retained: list[tuple[int, float]] = []
        with MetricCheckpointManager(
            root,
            monitor="val_loss",
            mode=mode,
            save_top_k=k,
            keep_last=keep_last,
            filename=TEMPLATE,
        ) as mgr:
            for step, value in enumerate(values):
                candidates = [*retained, (step, value)]
                keep = _reference_keep(candidates, k, keep_last, mode)
                expect_written = keep_last or step in keep
                written = mgr.save(
                    step,
                    args=ocp.args.StandardSave({"w": np.full(2, step, np.float32)}),
                    metrics={"val_loss": np.float32(value)},
                )
                assert written == expect_written, (step, value)
                if written:
                    retained = [c for c in candidates if c[0] in keep]
                mgr.wait_until_finished()
                expected_names = {f"e{s:02d}-{v:.2f}" for s, v in retained}
                assert step_dirs(root) == expected_names
                assert sorted(mgr.all_steps()) == sorted(s for s, _ in retained)
                assert mgr.best_step() == _reference_best(retained, mode)
