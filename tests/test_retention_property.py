"""Retention and best tracking on real Orbax, against the reference model in tests/reference.py."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from hypothesis import given, settings
from hypothesis import strategies as st

from artifex_ckpt import MetricCheckpointManager
from artifex_ckpt.settings import SETTINGS_FILE, RetentionSettings
from tests.conftest import step_dirs
from tests.reference import RetentionRule, simulate

# How step directories are named; a template with the monitor cannot name unscored saves.
TEMPLATES = {
    "scored": "e{epoch:02d}-{val_loss:.2f}",
    "epoch": "e{epoch:02d}",
    "numeric": None,
}


def dir_name(naming: str, step: int, value: float | None) -> str:
    if naming == "scored":
        return f"e{step:02d}-{value:.2f}"
    return f"e{step:02d}" if naming == "epoch" else str(step)


metric_values = st.one_of(
    st.sampled_from([0.5, 0.25, 1.0, math.nan, math.inf, -math.inf, None]),
    st.floats(min_value=-2, max_value=2, allow_nan=False).map(lambda v: round(v, 1)),
)


@settings(max_examples=40)
@given(
    values=st.lists(metric_values, min_size=1, max_size=7),
    k=st.integers(-1, 4),
    keep_last=st.booleans(),
    mode=st.sampled_from(["min", "max"]),
    threshold=st.one_of(st.none(), st.sampled_from([0.25, 0.5, 0.0])),
    naming=st.sampled_from(sorted(TEMPLATES)),
)
def test_disk_and_best_step_match_reference(
    values: list[float | None],
    k: int,
    keep_last: bool,
    mode: str,
    threshold: float | None,
    naming: str,
) -> None:
    if naming == "scored" and None in values:
        naming = "epoch"
    rule = RetentionRule(k=k, keep_last=keep_last, mode=mode, threshold=threshold)
    outcomes = simulate(list(enumerate(values)), rule)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        settings_ = RetentionSettings(
            monitor="val_loss",
            mode=mode,  # type: ignore[arg-type]
            save_top_k=k,
            keep_last=keep_last,
            filename=TEMPLATES[naming],
            initial_value_threshold=threshold,
        )
        if threshold is not None:
            # The threshold is a stored setting: the manager adopts it from the directory.
            root.mkdir()
            (root / SETTINGS_FILE).write_text(settings_.to_json())
        with MetricCheckpointManager(
            root,
            monitor="val_loss",
            mode=settings_.mode,
            save_top_k=k,
            keep_last=keep_last,
            filename=TEMPLATES[naming],
        ) as mgr:
            assert mgr.settings == settings_
            for (step, value), expected in zip(enumerate(values), outcomes, strict=True):
                written = mgr.save(
                    step,
                    args=ocp.args.StandardSave({"w": np.full(2, step, np.float32)}),
                    metrics=None if value is None else {"val_loss": np.float32(value)},
                )
                assert written == expected.written, (step, value)
                mgr.wait_until_finished()
                names = {dir_name(naming, s, values[s]) for s in expected.kept}
                assert step_dirs(root) == names
                assert sorted(mgr.all_steps()) == sorted(expected.kept)
                assert mgr.best_step() == expected.best
