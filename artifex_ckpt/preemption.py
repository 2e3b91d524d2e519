"""`PreemptionGuard`: turn the first termination signal into a request to stop cleanly.

A cluster scheduler ends a job with SIGTERM and, after a grace period, SIGKILL. The
guard records the first SIGTERM (and, if asked, the first SIGINT) instead of dying, so
that the training loop can finish its step, save a checkpoint and stop with
`TrainingPreempted`. A second signal of the same kind gets the behaviour it had before
the guard was installed, so a second Ctrl-C or TERM still ends a stuck process.

With several JAX processes every host must stop at the same step, or the save's
collectives deadlock. JAX's preemption service (on by default after
`jax.distributed.initialize`) finds that step: it catches SIGTERM in C++ and
`reached_preemption_sync_point(step)` turns True on every host at one common step.
Its C++ handler is invisible to Python (`signal.getsignal` still reports SIG_DFL) and
a Python handler installed over it silently disables it, so while the service runs the
guard leaves SIGTERM alone and asks the service instead.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils

from artifex_ckpt.errors import ConfigError

__all__ = ["PreemptionGuard", "TrainingPreempted", "jax_preemption_service_active"]

# What `signal.getsignal` returns: a Python callable, SIG_DFL/SIG_IGN, or None for a
# handler installed outside Python.
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

# Signals that cannot be caught, or whose default action is to be ignored.
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


class TrainingPreempted(Exception):
    """`Trainer.fit` stopped early because the job was told to end.

    The run is not finished: the checkpoint saved at `step` (in `checkpoint`, when
    known) is where `Trainer.fit(resume=True)` continues. It is an `Exception` rather
    than a `CheckpointError`, since nothing failed, and it is raised rather than
    returned so that a script never mistakes a preempted run for a completed one
    (uncaught, the process exits non-zero and the scheduler can requeue it).

    Example:
        ```python
        try:
            trainer.fit(callbacks=[checkpoint])
        except TrainingPreempted as stop:
            print(f"stopped at step {stop.step} by {stop.signal_name}")
        ```
    """

    def __init__(self, step: int, signal_name: str, checkpoint: epath.Path | None = None) -> None:
        # All fields go to `args`, so the exception pickles (multiprocessing, pytest-xdist).
        super().__init__(step, signal_name, checkpoint)
        self.step = step
        self.signal_name = signal_name

    @property
    def checkpoint(self) -> epath.Path | None:
        """The checkpoint that holds the state at `step`; None until one is known."""
        checkpoint: epath.Path | None = self.args[2]
        return checkpoint

    @checkpoint.setter
    def checkpoint(self, path: epath.Path | None) -> None:
        # Set by the callback that saved it; kept in `args` so that a pickled copy has it.
        self.args = (self.step, self.signal_name, path)

    def __str__(self) -> str:
        saved = (
            f"; checkpoint {os.fspath(self.checkpoint)} holds the state"
            if self.checkpoint is not None
            else ""
        )
        return (
            f"training stopped by {self.signal_name} at step {self.step}{saved}; "
            "continue with Trainer.fit(resume=True)"
        )


def jax_preemption_service_active() -> bool:
    """Whether JAX's preemption service owns SIGTERM in this process.

    True after `jax.distributed.initialize` with `jax_enable_preemption_service` on
    (JAX's default). Without `jax.distributed`, Orbax's
    `CheckpointManager.reached_preemption(step)` is always False.

    Example:
        ```python
        assert not jax_preemption_service_active()  # a single process without jax.distributed
        ```
    """
    # The flag is registered at run time, so type checkers cannot see the attribute.
    enabled = getattr(jax.config, "jax_enable_preemption_service", False)
    return bool(jax.distributed.is_initialized() and enabled)


class PreemptionGuard:
    """A context manager that records the first SIGTERM (and opt-in SIGINT) of a run.

    The handler only records the signal; the loop calls `should_stop(step)` after each
    step and stops there. How each installed signal is treated:

    - first one: recorded (`requested`, `signal_name`), and the handler from before
      the guard is put back at once; if that is a Python handler it is called too,
      so a logger or a cluster hook still sees the signal;
    - second one of the same kind: handled as without the guard: SIG_DFL ends the
      process, Python's `default_int_handler` raises `KeyboardInterrupt`, a Python
      handler is called. Since SIG_DFL is back in the kernel, a second TERM ends the
      process even while the main thread is blocked in native code (a hung
      collective, a save that never finishes), where no Python handler could run.

    Not installed (and listed neither in `handled` nor counted in `installed`):

    - any signal, outside the main thread: Python only lets the main thread install
      handlers, so there the guard records nothing and `should_stop` is False;
    - a signal that is ignored (SIG_IGN, e.g. SIGINT of a background job) or whose
      handler was installed outside Python (`getsignal` is None): the guard cannot
      hand such a signal back, so it leaves it as it is;
    - SIGTERM while JAX's preemption service runs (see the module docstring);
    - every signal when there are several JAX processes: a signal reaches one host,
      and hosts stopping at different steps deadlock. There only the JAX service
      (SIGTERM) stops the run, at the step it agrees on with every host.

    Example:
        ```python
        import os, signal

        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGTERM)  # the process survives
            assert guard.should_stop(step=10) and guard.signal_name == "SIGTERM"
        ```

    Args:
        signals: Signals that ask the run to stop [SIGTERM]. SIGKILL and SIGSTOP
            cannot be caught and are refused.
        sigint: Also treat the first SIGINT (Ctrl-C) as a request to stop [False].
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), *, sigint: bool = False) -> None:
        chosen = [_as_signal(value) for value in signals]
        if sigint:
            chosen.append(signal.SIGINT)
        self._signals = tuple(dict.fromkeys(chosen))
        self._previous: dict[signal.Signals, Handler] = {}
        self._received: signal.Signals | None = None
        self._jax_sync = False
        self._entered = False

    @property
    def signals(self) -> tuple[signal.Signals, ...]:
        """The signals this guard was asked to handle."""
        return self._signals

    @property
    def handled(self) -> tuple[signal.Signals, ...]:
        """The signals whose handler the guard has installed now."""
        return tuple(self._previous)

    @property
    def installed(self) -> bool:
        """Whether the guard has a handler installed for at least one signal."""
        return bool(self._previous)

    @property
    def jax_coordinated(self) -> bool:
        """Whether `should_stop` asks JAX's preemption service for the common step."""
        return self._jax_sync

    @property
    def requested(self) -> bool:
        """Whether a stop was requested (by a signal here or JAX's sync point)."""
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal that requested the stop, e.g. "SIGTERM"."""
        return None if self._received is None else self._received.name

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and stop after `step`.

        Call it after every step with the global step, on every process, with the
        same steps everywhere: JAX's sync point is one step that each host must pass
        through this call. Alone, one process stops at the step after the signal.
        """
        if self._jax_sync and multihost_utils.reached_preemption_sync_point(step):
            if self._received is None:
                self._received = signal.SIGTERM
            return True
        return self._received is not None

    def __enter__(self) -> PreemptionGuard:
        if self._entered:
            raise RuntimeError("PreemptionGuard is already entered; use a new guard")
        self._entered = True
        self._received = None
        self._jax_sync = jax_preemption_service_active()
        if threading.current_thread() is not threading.main_thread():
            return self
        if jax.process_count() > 1:
            return self
        for sig in self._signals:
            if sig == signal.SIGTERM and self._jax_sync:
                continue
            previous = signal.getsignal(sig)
            if previous is None or previous == signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        self._entered = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        previous = self._previous.pop(sig, signal.SIG_DFL)
        signal.signal(sig, previous)
        if self._received is None:
            self._received = sig
        # Python's own SIGINT handler would raise KeyboardInterrupt: deferring it is
        # the point, so only a handler someone else installed is chained.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)


def _as_signal(value: int) -> signal.Signals:
    try:
        sig = signal.Signals(value)
    except (ValueError, TypeError):
        raise ConfigError(
            f"signals: {value!r} is not a signal of this platform; use e.g. signal.SIGTERM"
        ) from None
    if sig in _UNCATCHABLE:
        raise ConfigError(
            f"signals: {sig.name} cannot be caught; use SIGTERM, SIGINT, SIGUSR1 or similar"
        )
    return sig
