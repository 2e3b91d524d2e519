"""Two JAX processes on localhost: hosts that see different metrics never disagree.

The processes save a globally sharded state into one directory, each passing its own
(different) validation losses with `keep_last=False`: the primary host's losses decide the
names, the skips and the best, on both. Had each decided by its own, one would save a step the
other skips, and both would wait for each other at Orbax's barriers until the timeout. With
`primary_host=None` each host writes its own local directory and keeps it tidy by itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from artifex_ckpt.directory import TRASH
from artifex_ckpt.history import HISTORY_FILE, DecisionHistory
from artifex_ckpt.manifest import MANIFEST_FILE, verify
from artifex_ckpt.ownership import LEASE_FILE
from artifex_ckpt.settings import SETTINGS_FILE
from tests.reliability.two_process_child import LOSSES

ROOT = Path(__file__).resolve().parents[2]
# A pair that finishes takes a few seconds; one whose hosts disagreed would hang.
TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_pair(directory: Path, phase: str) -> list[tuple[dict[str, object], str]]:
    """Each process's JSON result and its standard error."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability.two_process_child",
                str(port),
                str(pid),
                str(directory),
                phase,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    results = []
    try:
        for child in children:
            try:
                out, err = child.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"phase {phase!r}: the processes did not finish in {TIMEOUT_S} s")
            assert child.returncode == 0, err[-3000:]
            results.append((json.loads(out.strip().splitlines()[-1]), err))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    return results


def _step_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name != TRASH)


def _stored_loss(step_dir: Path) -> float:
    return float(json.loads((step_dir / "metrics" / "metrics").read_text())["val_loss"])


def _assert_tidy(directory: Path, names: list[str]) -> None:
    """Only the retained checkpoints, each with an intact manifest; no trash, no lease."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [*names, SETTINGS_FILE, HISTORY_FILE]
    )
    for name in names:
        assert (directory / name / MANIFEST_FILE).is_file()
        assert verify(directory / name).ok


def test_hosts_with_different_metrics_follow_the_primary(tmp_path: Path) -> None:
    directory = (tmp_path / "shared").absolute()
    saved = _run_pair(directory, "save")
    # Process 0's losses: 0.5 and 0.2 saved, 0.6 skipped (not in the top 2), 0.3 saved.
    expected_names = ["g-01-0.200", "g-03-0.300"]
    for process_id, (result, _) in enumerate(saved):
        assert result == {
            "names": expected_names,
            "best": 1,
            "shards_ok": True,
            "saved": [True, True, False, True],
            "flag": False,
            "with_everyone": 0,
            "alone": process_id,
            "too_large": True,
        }
    # Process 1 was told that its own values were overruled; process 0 was not.
    assert "differ from the primary host's" not in saved[0][1]
    assert "process 1: metrics {'val_loss': 0.1} differ" in saved[1][1]

    assert _step_dirs(directory) == expected_names
    _assert_tidy(directory, expected_names)
    for name, loss in zip(expected_names, (LOSSES[0][1], LOSSES[0][3]), strict=True):
        assert _stored_loss(directory / name) == loss
    # One history, written by the primary, with the primary's decisions and scores.
    decisions = [(d.kind, d.step, d.score) for d in DecisionHistory(directory).read()]
    assert sorted(decisions, key=str) == sorted(
        [
            ("saved", 0, 0.5),
            ("saved", 1, 0.2),
            ("not_saved", 2, 0.6),
            ("saved", 3, 0.3),
            ("evicted", 0, 0.5),
        ],
        key=str,
    )

    reopened = _run_pair(directory, "restore")
    for result, _ in reopened:
        assert result == {"names": expected_names, "best": 1, "shards_ok": True}
    assert _step_dirs(directory) == expected_names
    assert not (directory / LEASE_FILE).exists()


@pytest.mark.parametrize("phase", ["local", "local-by-hand"])
def test_each_host_keeps_its_own_directory_with_primary_host_none(
    tmp_path: Path, phase: str
) -> None:
    # "local" sets primary_host=None alone; the manager derives the barriers, the directory
    # creation and the handlers that "local-by-hand" builds as Orbax's docs describe.
    root = (tmp_path / "local").absolute()
    results = _run_pair(root, phase)
    # save_top_k=1, keep_last=False, each host by its own losses: host 0 keeps 0.2 (step 1),
    # host 1 keeps 0.05 (step 2). They skip different steps, and neither waits for the other.
    expected: dict[int, tuple[list[str], int, list[bool]]] = {
        0: (["h-01-0.200"], 1, [True, True, False, False]),
        1: (["h-02-0.050"], 2, [True, False, True, False]),
    }
    for process_id, (result, err) in enumerate(results):
        names, best, saved = expected[process_id]
        assert result == {"names": names, "best": best, "saved": saved, "shards_ok": True}
        assert "differ from the primary host's" not in err
        directory = root / f"host-{process_id}"
        # Each host purged its own trash, wrote its own manifests, settings and history,
        # and released its own lease.
        _assert_tidy(directory, names)
        losses = LOSSES[process_id]
        decisions = [(d.kind, d.step, d.score) for d in DecisionHistory(directory).read()]
        assert sorted(decisions, key=str) == sorted(
            [
                *(("saved" if kept else "not_saved", s, losses[s]) for s, kept in enumerate(saved)),
                ("evicted", 0, losses[0]),
            ],
            key=str,
        )
    assert sorted(p.name for p in root.iterdir()) == ["host-0", "host-1"]
