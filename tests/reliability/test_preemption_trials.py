"""SIGTERM a training process at random moments; `fit(resume=True)` must then finish the run
with the very weights of a run that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest

from artifex_ckpt import ModelCheckpoint, StaleLeaseWarning, Trainer
from tests.conftest import assert_trees_equal, step_dirs
from tests.reliability.preemption_child import EPOCHS, KINDS, STEPS, config, make_trainer

ROOT = Path(__file__).resolve().parents[2]


@cache
def reference(kind: str) -> Trainer:
    trainer = make_trainer(kind)
    trainer.fit()
    return trainer


def _start(root: Path, kind: str, marker: Path, *options: str) -> subprocess.Popen[str]:
    module = "tests.reliability.preemption_child"
    return subprocess.Popen(
        [sys.executable, "-m", module, str(root), kind, str(marker), *options],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(marker: Path, child: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"child died before training:\n{child.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "child never started training"
        time.sleep(0.01)


def _resume_and_compare(root: Path, kind: str) -> Trainer:
    resumed = make_trainer(kind, seed=1234)  # other initial weights: all must come from disk
    checkpoint = ModelCheckpoint(config(kind, root))
    resumed.fit(callbacks=[checkpoint], resume=True)
    straight = reference(kind)
    assert resumed.step == straight.step == EPOCHS * STEPS
    assert_trees_equal(resumed.model, straight.model)
    assert_trees_equal(resumed.optimizer, straight.optimizer)
    assert not any(name.endswith("-preempted") for name in step_dirs(root))
    return resumed


def _trial(tmp_path: Path, seed: int) -> None:
    kind = KINDS[seed % len(KINDS)]
    delay = random.Random(seed).uniform(0.0, 1.2)
    print(f"preemption trial seed={seed} kind={kind} delay={delay:.3f}s")
    root, marker = tmp_path / f"run-{seed}", tmp_path / f"started-{seed}"
    child = _start(root, kind, marker)
    try:
        _wait_for(marker, child)
        time.sleep(delay)
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if "finished at step" in stdout:
        # Too late: fit had returned (the process may then have died of the signal, since
        # the handler is only installed during fit).
        print(f"the run had finished before the signal (exit {child.returncode})")
    else:
        assert child.returncode == 1, (child.returncode, stderr[-3000:])
        last = stderr.strip().splitlines()[-1]
        prefix = "artifex_ckpt.preemption.TrainingPreempted: training stopped by SIGTERM at step "
        assert last.startswith(prefix), stderr[-3000:]
        assert "holds the state; continue with Trainer.fit(resume=True)" in last, last
    _resume_and_compare(root, kind)


@pytest.mark.parametrize("seed", [1, 2])
def test_sigterm_at_a_random_moment_then_resume_is_bit_for_bit(tmp_path: Path, seed: int) -> None:
    _trial(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 116))
def test_sigterm_at_a_random_moment_many_trials(tmp_path: Path, seed: int) -> None:
    _trial(tmp_path, seed)


def test_a_second_sigterm_ends_the_process_at_once(tmp_path: Path) -> None:
    # The first SIGTERM asks for a clean stop; the second gets the default action: the
    # process dies at once, before its preemption checkpoint, and the directory stays usable.
    root, marker = tmp_path / "run", tmp_path / "started"
    child = _start(root, "sequence", marker, "slow-exit")
    try:
        _wait_for(marker, child)
        time.sleep(0.3)
        child.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the child lingers 2 s in its stop: the signal was handled by now
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGTERM
    # Killed, the child could not release the directory; its lease names a dead process.
    with pytest.warns(StaleLeaseWarning, match="no longer exists"):
        _resume_and_compare(root, "sequence")
