"""The manager against the installed Orbax's call order.

`MetricCheckpointManager` relies on when Orbax calls back into it, not only on what Orbax
does: `save` waits for the previous save through `self.wait_until_finished()` (where the
post-commit housekeeping is finished) before it marks the new save in progress; `close`
waits the same way; the constructor's directory scan calls `self.metrics(step)`; and evicted
steps leave the directory before `is_saving_in_progress()` turns False. These tests hold a
real save in flight (a 64 MiB array takes far longer to write than the checks take) and
fail if any of that changes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import pytest

from artifex_ckpt import CorruptCheckpointWarning, MetricCheckpointManager
from artifex_ckpt.directory import TRASH
from tests.conftest import step_dirs

TEMPLATE = "m-{epoch:02d}-{val_loss:.4f}"
BIG = 8 * 1024 * 1024  # float64 elements: 64 MiB, written for a few hundred milliseconds
READ_ONLY = ocp.CheckpointManagerOptions(read_only=True)


def state(step: int, size: int = BIG) -> ocp.args.StandardSave:
    return ocp.args.StandardSave({"w": np.full(size, step, np.float64)})


def unfinished(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if "orbax-checkpoint-tmp" in p.name}


def housekeeping_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("artifex-ckpt")]


def snapshot(root: Path, skip: set[str]) -> dict[str, int]:
    """Every path under `root` (except the top-level entries in `skip`) and its mtime."""
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.relative_to(root).parts[0] not in skip
    }


class RecordingManager(MetricCheckpointManager):
    """The real manager, recording the overridden methods Orbax calls back into, and when."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Orbax's constructor already calls `metrics`; the log must exist before it.
        self.calls: list[tuple[str, object]] = []
        super().__init__(*args, **kwargs)

    def wait_until_finished(self) -> None:
        self.calls.append(("wait_until_finished", self.is_saving_in_progress()))
        super().wait_until_finished()

    def metrics(self, step: int) -> Any:
        self.calls.append(("metrics", step))
        return super().metrics(step)


def test_orbax_save_and_close_wait_through_the_override(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with RecordingManager(root, monitor="val_loss", save_top_k=-1) as mgr:
        assert mgr.save(0, args=state(0), metrics={"val_loss": 0.5})
        assert mgr.is_saving_in_progress(), "the first save must still be in flight"
        mgr.calls.clear()
        assert mgr.save(1, args=state(1), metrics={"val_loss": 0.4})
        # Orbax's `save` waited for the pending save through our override, while it was
        # still in flight, and only then marked the new save in progress.
        assert mgr.calls == [("wait_until_finished", True)], "Orbax's save no longer waits here"
        assert mgr.is_saving_in_progress()
        mgr.calls.clear()
    assert ("wait_until_finished", True) in mgr.calls, "close no longer waits through it"
    assert step_dirs(root) == {"0", "1"}


def test_orbax_scan_calls_the_metrics_override_in_the_constructor(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with MetricCheckpointManager(root, monitor="val_loss", save_top_k=-1) as mgr:
        for step, loss in enumerate([0.5, 0.4, 0.6]):
            mgr.save(step, args=state(step, 4), metrics={"val_loss": loss})
    with RecordingManager(root, options=READ_ONLY) as reader:
        assert sorted(reader.calls) == [("metrics", 0), ("metrics", 1), ("metrics", 2)]
        assert reader.best_step() == 1


def test_a_save_issued_while_another_is_in_flight(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with MetricCheckpointManager(
        root, monitor="val_loss", save_top_k=1, keep_last=False, filename=TEMPLATE
    ) as mgr:
        assert mgr.save(0, args=state(0), metrics={"val_loss": 0.5})
        assert mgr.is_saving_in_progress(), "the first save must still be in flight"
        assert mgr.save(1, args=state(1), metrics={"val_loss": 0.4})
        # Step 0 committed before step 1 started; it is evicted when step 1 commits.
        assert step_dirs(root) == {"m-00-0.5000"}
        assert unfinished(root) == {"m-01-0.4000.orbax-checkpoint-tmp"}
        assert mgr.save(2, args=state(2), metrics={"val_loss": 0.3})
        # Waiting for step 1 inside that save also finished the housekeeping: step 0 went
        # to the trash when step 1 committed, and is purged now, not later.
        assert step_dirs(root) == {"m-01-0.4000"}
        assert not (root / TRASH / "m-00-0.5000").exists()
        mgr.wait_until_finished()
        assert step_dirs(root) == {"m-02-0.3000"}
        assert not (root / TRASH).exists()
        assert unfinished(root) == set()
        assert mgr.all_steps() == [2]
        assert mgr.best_step() == 2
        restored = mgr.restore(2, args=ocp.args.StandardRestore())
        np.testing.assert_array_equal(restored["w"], np.full(BIG, 2, np.float64))


def test_eviction_is_done_before_orbax_reports_the_save_finished(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with MetricCheckpointManager(root, monitor="val_loss", save_top_k=1, keep_last=False) as mgr:
        mgr.save(0, args=state(0, 4), metrics={"val_loss": 0.5})
        mgr.wait_until_finished()
        assert mgr.save(1, args=state(1), metrics={"val_loss": 0.4})
        assert mgr.is_saving_in_progress()
        assert step_dirs(root) == {"0"}  # evicted only once step 1 commits
        while mgr.is_saving_in_progress():
            time.sleep(0.001)
        # The housekeeping thread starts purging at this very moment; step 0 must be out
        # of the way (in the trash, or purged) already.
        assert step_dirs(root) == {"1"}
        # The trash is emptied beside the loop, without a call to wait_until_finished.
        deadline = time.monotonic() + 10
        while (root / TRASH).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not (root / TRASH).exists()


def test_close_while_a_save_is_pending_commits_it_and_purges(tmp_path: Path) -> None:
    root = tmp_path / "run"
    mgr = MetricCheckpointManager(
        root, monitor="val_loss", save_top_k=1, keep_last=False, filename=TEMPLATE
    )
    try:
        mgr.save(0, args=state(0, 4), metrics={"val_loss": 0.5})
        assert mgr.save(1, args=state(1), metrics={"val_loss": 0.4})
        assert mgr.is_saving_in_progress(), "the save must still be in flight"
    finally:
        mgr.close()
    assert step_dirs(root) == {"m-01-0.4000"}
    assert unfinished(root) == set()
    assert not (root / TRASH).exists()
    assert housekeeping_threads() == []
    with MetricCheckpointManager(root, options=READ_ONLY) as reader:
        assert reader.all_steps() == [1]
        restored = reader.restore(1, args=ocp.args.StandardRestore())
        np.testing.assert_array_equal(restored["w"], np.full(BIG, 1, np.float64))


def test_a_reader_opened_during_a_save_sees_committed_steps_and_changes_nothing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    with MetricCheckpointManager(root, monitor="val_loss", save_top_k=-1, filename=TEMPLATE) as w:
        w.save(0, args=state(0, 4), metrics={"val_loss": 0.5})
        w.wait_until_finished()
        assert w.save(1, args=state(1), metrics={"val_loss": 0.4})
        in_flight = unfinished(root)
        assert in_flight == {"m-01-0.4000.orbax-checkpoint-tmp"}
        before = snapshot(root, skip=in_flight)

        with MetricCheckpointManager(root, options=READ_ONLY) as reader:
            seen = reader.all_steps()
            best = reader.best_step()
        assert w.is_saving_in_progress(), "the save must outlast the reader"

        assert seen == [0]
        assert best == 0
        assert unfinished(root) == in_flight  # the writer's save was left alone
        assert snapshot(root, skip=in_flight) == before
        w.wait_until_finished()
    with MetricCheckpointManager(root, options=READ_ONLY) as reader:
        assert reader.all_steps() == [0, 1]
        assert reader.best_step() == 1


def damage_metrics(step_dir: Path) -> None:
    (step_dir / "metrics" / "metrics").write_bytes(b"{not json")


def test_garbled_metrics_are_recovered_from_the_name_during_the_scan(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with MetricCheckpointManager(root, monitor="val_loss", save_top_k=2, filename=TEMPLATE) as m:
        for step, loss in enumerate([0.5, 0.3, 0.7]):
            m.save(step, args=state(step, 4), metrics={"val_loss": loss})
    damage_metrics(root / "m-01-0.3000")

    with pytest.warns(CorruptCheckpointWarning, match=r"m-01-0\.3000.*read from its name"):
        mgr = MetricCheckpointManager(root)
    with mgr:
        assert mgr.score(1) == 0.3
        assert mgr.best_step() == 1
        assert mgr.ranked_steps() == [1, 0, 2]
        for step, loss in [(3, 0.9), (4, 0.4)]:
            mgr.save(step, args=state(step, 4), metrics={"val_loss": loss})
        mgr.wait_until_finished()
        # It ranks by its recovered score: the best, so it stays while others go.
        assert step_dirs(root) == {"m-01-0.3000", "m-04-0.4000"}
        assert mgr.best_step() == 1


@pytest.mark.parametrize("filename", [None, "m-{epoch:02d}"], ids=["numeric", "no-monitor"])
def test_garbled_metrics_without_a_score_in_the_name_are_never_evicted(
    tmp_path: Path, filename: str | None
) -> None:
    root = tmp_path / "run"
    with MetricCheckpointManager(
        root, monitor="val_loss", save_top_k=1, keep_last=False, filename=filename
    ) as m:
        m.save(0, args=state(0, 4), metrics={"val_loss": 0.5})
    name = "0" if filename is None else "m-00"
    damage_metrics(root / name)

    with pytest.warns(CorruptCheckpointWarning, match=rf"{name} cannot be read.*unscored"):
        mgr = MetricCheckpointManager(root)
    with mgr:
        assert mgr.score(0) is None
        assert mgr.best_step() is None
        for step, loss in [(1, 0.4), (2, 0.3), (3, 0.2)]:
            assert mgr.save(step, args=state(step, 4), metrics={"val_loss": loss})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [0, 3]
        assert mgr.best_step() == 3
    assert step_dirs(root) == {name, "3" if filename is None else "m-03"}
