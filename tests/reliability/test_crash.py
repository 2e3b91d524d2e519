"""SIGKILL a training process at random moments; nothing committed may be lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifex_ckpt import MetricCheckpointManager, ModelCheckpoint, load_checkpoint
from artifex_ckpt.ownership import LEASE_FILE, StaleLeaseWarning
from tests.reference import RetentionRule, best_step, kept_steps
from tests.reliability.crash_child import TOP_K, config, digest, make_trainer

ROOT = Path(__file__).resolve().parents[2]


def _read_journal(path: Path) -> tuple[dict[int, str], dict[int, float], set[int]]:
    digests, values, committed = {}, {}, set()
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when the kill landed
        if "committed" in entry:
            committed.add(entry["committed"])
        else:
            digests[entry["epoch"]] = entry["digest"]
            values[entry["epoch"]] = entry["val_loss"]
    return digests, values, committed


def _kill_during_training(root: Path, journal: Path, seed: int) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.crash_child", str(root), str(seed), str(journal)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not journal.exists() or not journal.read_text():
            assert child.poll() is None, "child died before training"
            assert time.monotonic() < deadline, "child never started training"
            time.sleep(0.02)
        time.sleep(random.Random(seed).uniform(0.0, 2.5))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def _open_after_kill(root: Path) -> MetricCheckpointManager:
    # The killed writer's lease names a process that no longer exists: taken over, with a
    # warning naming it.
    if not (root / LEASE_FILE).exists():
        return MetricCheckpointManager(root)
    with pytest.warns(StaleLeaseWarning, match="no longer exists"):
        return MetricCheckpointManager(root)


def _check_directory(root: Path, journal: Path) -> int:
    digests, values, committed = _read_journal(journal)
    with _open_after_kill(root) as manager:
        listed = set(manager.all_steps())
        leftovers = [p.name for p in root.iterdir() if "orbax-checkpoint-tmp" in p.name]
        assert leftovers == [], "temporary directories must be cleaned on open"
        assert not (root / ".artifex-deleted").exists()
        assert listed <= set(digests), "only checkpoints of journaled epochs may be listed"
        for step in sorted(listed):
            trainer = make_trainer(seed=1000 + step, epochs=1)
            load_checkpoint(manager, trainer.model, step, optimizer=trainer.optimizer)
            assert digest(trainer.model, trainer.optimizer) == digests[step], step
        # Everything retention keeps among what committed must still be there.
        known = [(s, values[s]) for s in sorted(committed | listed)]
        assert kept_steps(known, RetentionRule(TOP_K, keep_last=True)) <= listed
        on_disk = [(s, manager.metrics(s)["val_loss"]) for s in sorted(listed)]
        assert manager.best_step() == best_step(on_disk, "min")
        assert manager.latest_step() == (max(listed) if listed else None)
    return max(listed) if listed else -1


def _resume(root: Path, latest: int) -> None:
    if latest < 0:
        return
    trainer = make_trainer(seed=7, epochs=latest + 2)
    checkpoint = ModelCheckpoint(config(str(root)))
    trainer.fit(callbacks=[checkpoint], resume=True)
    assert trainer.epoch == latest + 1
    assert checkpoint.manager.latest_step() == latest + 1


def _trial(tmp_path: Path, seed: int) -> None:
    print(f"crash trial seed={seed}")
    root, journal = tmp_path / f"run-{seed}", tmp_path / f"journal-{seed}.jsonl"
    _kill_during_training(root, journal, seed)
    latest = _check_directory(root, journal)
    _resume(root, latest)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_sigkill_loses_nothing(tmp_path: Path, seed: int) -> None:
    _trial(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120))
def test_sigkill_loses_nothing_many_trials(tmp_path: Path, seed: int) -> None:
    _trial(tmp_path, seed)


def test_journal_parser_skips_a_torn_line(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    journal.write_text('{"epoch": 0, "digest": "a", "val_loss": 0.5}\n{"committed": 0}\n{"epo')
    assert _read_journal(journal) == ({0: "a"}, {0: 0.5}, {0})
    os.remove(journal)
