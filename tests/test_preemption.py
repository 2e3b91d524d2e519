"""PreemptionGuard with real signals sent to this process (or to a child process)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from etils import epath

from artifex_ckpt.errors import ConfigError
from artifex_ckpt.preemption import (
    PreemptionGuard,
    TrainingPreempted,
    jax_preemption_service_active,
)

ROOT = Path(__file__).resolve().parents[1]


def run_script(source: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class Recorder:
    """A Python signal handler that remembers what it was called with."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.calls.append(signum)


def sigterm_handler() -> object:
    return signal.getsignal(signal.SIGTERM)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    handler = Recorder()
    old = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, old)


def test_first_sigterm_is_recorded_and_the_handler_restored_at_once() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert guard.installed and guard.handled == (signal.SIGTERM,)
        assert signal.getsignal(signal.SIGTERM) != before
        assert not guard.requested and not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_name == "SIGTERM"
        assert guard.should_stop(1)
        # Back in the kernel already, so a second TERM kills even a blocked process.
        assert signal.getsignal(signal.SIGTERM) == before
        assert not guard.installed
    assert signal.getsignal(signal.SIGTERM) == before
    assert guard.requested, "the request stays readable after the loop has left the guard"


def test_the_handler_is_restored_on_exit_when_no_signal_came() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before
    assert not guard.requested and guard.signal_name is None


def test_a_python_handler_installed_before_is_chained_and_restored(recorder: Recorder) -> None:
    with PreemptionGuard() as guard:
        assert sigterm_handler() is not recorder
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested
        assert recorder.calls == [signal.SIGTERM]
        assert sigterm_handler() == recorder
        os.kill(os.getpid(), signal.SIGTERM)
        # The second one goes to the earlier handler alone.
        assert recorder.calls == [signal.SIGTERM, signal.SIGTERM]
    assert sigterm_handler() == recorder


def test_a_second_sigterm_really_terminates_the_process() -> None:
    result = run_script(
        """
        import os, signal
        from artifex_ckpt.preemption import PreemptionGuard

        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGTERM)
            print("first", guard.requested, guard.signal_name, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            print("survived", flush=True)
        """
    )
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert result.stdout == "first True SIGTERM\n"


def test_sigint_is_left_to_python_unless_opted_in() -> None:
    with PreemptionGuard() as guard:
        assert guard.handled == (signal.SIGTERM,)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert not guard.requested


def test_opted_in_sigint_waits_for_the_loop_and_a_second_one_interrupts() -> None:
    with PreemptionGuard(sigint=True) as guard:
        assert set(guard.handled) == {signal.SIGTERM, signal.SIGINT}
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested and guard.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        # A later SIGTERM counts separately and leaves the first reason in place.
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_the_guard_installs_nothing() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: dict[str, object] = {}

    def train() -> None:
        with PreemptionGuard(sigint=True) as guard:
            seen["installed"] = guard.installed
            seen["handled"] = guard.handled
            seen["stop"] = guard.should_stop(0)
            seen["handler"] = signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert seen == {"installed": False, "handled": (), "stop": False, "handler": before}


def test_an_ignored_signal_stays_ignored() -> None:
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with PreemptionGuard(signals=(signal.SIGUSR1,)) as guard:
            assert not guard.installed
            os.kill(os.getpid(), signal.SIGUSR1)
            assert not guard.requested
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_other_signals_can_be_chosen() -> None:
    with PreemptionGuard(signals=(signal.SIGUSR1,)) as guard:
        assert guard.handled == (signal.SIGUSR1,)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.signal_name == "SIGUSR1"


@pytest.mark.parametrize(
    ("value", "message"),
    [(signal.SIGKILL, "SIGKILL cannot be caught"), (10_000, "10000 is not a signal")],
)
def test_signals_that_cannot_be_handled_are_refused(value: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PreemptionGuard(signals=(value,))


def test_a_guard_cannot_be_entered_twice_but_can_be_reused() -> None:
    guard = PreemptionGuard()
    with guard:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(RuntimeError, match="already entered"):
            guard.__enter__()
    assert guard.requested
    with guard:
        assert guard.installed and not guard.requested


def test_training_preempted_names_step_signal_and_checkpoint() -> None:
    stop = TrainingPreempted(120, "SIGTERM", epath.Path("/runs/a/7"))
    assert str(stop) == (
        "training stopped by SIGTERM at step 120; checkpoint /runs/a/7 holds the state; "
        "continue with Trainer.fit(resume=True)"
    )
    copy = pickle.loads(pickle.dumps(stop))
    assert (copy.step, copy.signal_name, copy.checkpoint) == (120, "SIGTERM", stop.checkpoint)
    assert "checkpoint" not in str(TrainingPreempted(3, "SIGINT"))


def test_without_jax_distributed_the_guard_handles_sigterm_itself() -> None:
    assert not jax_preemption_service_active()
    with PreemptionGuard() as guard:
        assert not guard.jax_coordinated


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def test_under_jax_distributed_sigterm_is_left_to_the_jax_preemption_service() -> None:
    # A Python SIGTERM handler would silently replace JAX's C++ one, so the guard must
    # not install it; JAX then names the common step at which every host stops.
    result = run_script(
        """
        import json, os, signal, sys, time
        import jax

        jax.distributed.initialize(
            coordinator_address=f"localhost:{sys.argv[1]}", num_processes=1, process_id=0
        )
        from artifex_ckpt.preemption import PreemptionGuard

        with PreemptionGuard(sigint=True) as guard:
            stops = []
            for step in range(200):
                if guard.should_stop(step):
                    stops.append(step)
                    break
                if step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.02)
            report = {
                "handled": [s.name for s in guard.handled],
                "jax": guard.jax_coordinated,
                "stops": stops,
                "signal": guard.signal_name,
            }
        print(json.dumps(report), flush=True)
        jax.distributed.shutdown()
        """,
        str(free_port()),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["handled"] == ["SIGINT"] and report["jax"]
    assert report["signal"] == "SIGTERM"
    # JAX's notifier polls for the signal about once a second, so the stop comes later.
    assert len(report["stops"]) == 1 and report["stops"][0] > 3, report
