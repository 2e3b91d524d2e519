"""One writer per checkpoint directory: the lease file, on real files, processes and gs://."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from etils import epath

from artifex_ckpt.errors import CheckpointError, CheckpointWarning, ConfigError
from artifex_ckpt.lease_store import LocalFile
from artifex_ckpt.ownership import (
    LEASE_FILE,
    OwnershipError,
    StaleLeaseWarning,
    acquire,
    live_owner,
    read_owner,
    require_free,
)

SUBPROCESS_TIMEOUT_S = 60.0
ON_LINUX = Path("/proc/self/stat").exists()


def foreign(**changes: Any) -> dict[str, Any]:
    """A lease as another host's run would write it, refreshed just now."""
    now = time.time()
    lease = {
        "host": "other-host",
        "pid": 4242,
        "process_start": 123,
        "pid_scope": "other-boot|pid:[1]",
        "token": "f" * 32,
        "created": now - 60,
        "refreshed": now,
        "command": "train.py --other",
    }
    return {**lease, **changes}


def write_lease(directory: Path, lease: dict[str, Any]) -> bytes:
    directory.mkdir(parents=True, exist_ok=True)
    data = json.dumps(lease).encode()
    (directory / LEASE_FILE).write_bytes(data)
    return data


def on_disk(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / LEASE_FILE).read_bytes()))


def snapshot(directory: Path) -> dict[str, tuple[int, bytes | None, int]]:
    """Every entry under `directory`: mode, bytes (regular files only), mtime in ns."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            data = Path(path).read_bytes() if Path(path).is_file() else None
            found[os.path.relpath(path, directory)] = (info.st_mode, data, info.st_mtime_ns)
    return found


def bounded(call: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """`call()` in a thread, failing the test instead of hanging if it blocks."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{call} still blocks after {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


def test_acquire_writes_the_lease_and_release_removes_it(tmp_path: Path) -> None:
    run = tmp_path / "new" / "run"
    lease = acquire(run)
    stored = on_disk(run)
    assert stored["pid"] == os.getpid()
    assert stored["token"] == lease.owner.token and len(stored["token"]) == 32
    assert stored["created"] == stored["refreshed"] == pytest.approx(time.time(), abs=5)
    if ON_LINUX:
        assert stored["process_start"] is not None and stored["pid_scope"] is not None
    assert lease.held and lease.still_ours()
    assert read_owner(run) == lease.owner
    lease.release()
    assert not (run / LEASE_FILE).exists()
    assert not lease.held and not lease.still_ours()
    lease.release()  # idempotent
    with pytest.raises(OwnershipError, match="was released"):
        lease.refresh()
    with acquire(run) as again:
        assert again.still_ours()
    assert not (run / LEASE_FILE).exists()


@pytest.mark.parametrize("stale_after_s", [0, -1.0, float("nan"), float("inf"), True, "900"])
def test_stale_after_s_must_be_positive_seconds(tmp_path: Path, stale_after_s: Any) -> None:
    with pytest.raises(ConfigError, match=r"stale_after_s=.* use a number of seconds > 0"):
        acquire(tmp_path, stale_after_s=stale_after_s)
    assert not (tmp_path / LEASE_FILE).exists()


def test_acquire_refuses_a_file_as_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file; pass a directory"):
        acquire(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_second_acquire_in_this_process_is_refused_under_any_spelling(tmp_path: Path) -> None:
    run = tmp_path / "run"
    alias = tmp_path / "alias"
    with acquire(run) as lease:
        alias.symlink_to(run)
        before = (run / LEASE_FILE).read_bytes()
        for spelling in (run, str(run) + "/", alias, epath.Path(run)):
            with pytest.raises(OwnershipError, match="this process") as caught:
                acquire(spelling)
            message = str(caught.value)
            assert f"pid {os.getpid()}" in message
            assert "same CheckpointConfig passed twice" in message
            assert "same dirpath" in message and "read_only=True" in message
            assert caught.value.owner == lease.owner
            assert isinstance(caught.value, CheckpointError | RuntimeError)
        assert (run / LEASE_FILE).read_bytes() == before
    with acquire(alias) as again:
        assert on_disk(run)["token"] == again.owner.token


def test_threads_racing_for_one_directory_leave_exactly_one_owner(tmp_path: Path) -> None:
    run = tmp_path / "run"
    barrier = threading.Barrier(6)
    leases, refusals = [], []

    def contend() -> None:
        barrier.wait()
        try:
            leases.append(acquire(run))
        except OwnershipError as err:
            refusals.append(str(err))

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(leases) == 1 and len(refusals) == 5
    assert all("this process" in message for message in refusals)
    assert on_disk(run)["token"] == leases[0].owner.token
    leases[0].release()


RACER = """
import os, sys, time
from artifex_ckpt.ownership import OwnershipError, acquire
run, go, out = sys.argv[1:]
open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
try:
    lease = acquire(run)
    result = "won"
except OwnershipError as err:
    result = "refused: " + str(err)
with open(out + ".tmp", "w") as f:
    f.write(result)
os.rename(out + ".tmp", out)
sys.stdin.read()  # hold (or not) until the test has every answer
"""


def test_processes_racing_for_one_directory_leave_exactly_one_owner(tmp_path: Path) -> None:
    run, go = tmp_path / "run", tmp_path / "go"
    outs = [tmp_path / f"racer-{i}" for i in range(3)]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(run), str(go), str(out)], stdin=subprocess.PIPE
        )
        for out in outs
    ]
    try:
        wait_for(lambda: all(Path(f"{out}.ready").exists() for out in outs), "racers to start")
        go.touch()
        wait_for(lambda: all(out.exists() for out in outs), "every racer's answer")
        answers = sorted(out.read_text() for out in outs)
        assert answers[-1] == "won" and answers[-2].startswith("refused: "), answers
        winner = racers[[out.read_text() for out in outs].index("won")]
        assert on_disk(run)["pid"] == winner.pid
    finally:
        for racer in racers:
            racer.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert not (run / LEASE_FILE).exists()  # the winner's exit released it


def test_local_creation_is_exclusive(tmp_path: Path) -> None:
    # The primitive two processes starting at once rely on: of two creators, one wins.
    path = epath.Path(tmp_path / LEASE_FILE)
    assert LocalFile(path).create(b"first")
    assert not LocalFile(path).create(b"second")
    assert path.read_bytes() == b"first"


HOLDER = """
import sys, time
from artifex_ckpt.ownership import acquire
lease = acquire(sys.argv[1])
time.sleep(120)
"""


@pytest.mark.skipif(not ON_LINUX, reason="needs /proc to see a zombie")
def test_live_process_refuses_then_its_killed_lease_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)])
    try:
        wait_for(
            lambda: (run / LEASE_FILE).exists() and on_disk(run)["pid"] == holder.pid,
            "the holder's lease",
        )
        held = (run / LEASE_FILE).read_bytes()
        with pytest.raises(OwnershipError, match="being written by another run") as caught:
            acquire(run)
        message = str(caught.value)
        assert f"pid {holder.pid}" in message and "since 20" in message
        assert "last refresh" in message and "read_only=True" in message
        assert "pick another dirpath" in message and f"delete {run / LEASE_FILE}" in message
        assert (run / LEASE_FILE).read_bytes() == held
        holder.send_signal(signal.SIGKILL)  # no release, as after a crash
        wait_for(
            lambda: Path(f"/proc/{holder.pid}/stat").read_text().split(") ")[1][0] == "Z",
            "the killed holder to become a zombie",
        )
        with pytest.warns(StaleLeaseWarning, match=rf"pid {holder.pid}.*zombie") as warned:
            lease = acquire(run)
        assert issubclass(warned[0].category, CheckpointWarning)
        holder.wait(SUBPROCESS_TIMEOUT_S)
        assert on_disk(run)["token"] == lease.owner.token and lease.still_ours()
        lease.release()
    finally:
        holder.kill()
        holder.wait(SUBPROCESS_TIMEOUT_S)


def test_lease_of_a_dead_or_recycled_pid_on_this_machine_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with acquire(run):
        ours = on_disk(run)
    dead = subprocess.Popen(["true"])
    dead.wait(SUBPROCESS_TIMEOUT_S)
    write_lease(run, {**ours, "pid": dead.pid, "token": "d" * 32})
    with pytest.warns(StaleLeaseWarning, match=rf"process {dead.pid} no longer exists"):
        acquire(run).release()
    if ON_LINUX:
        # The parent of this test is alive, but started before the time recorded here.
        recycled = {**ours, "pid": os.getppid(), "process_start": 1 << 60, "token": "e" * 32}
        write_lease(run, recycled)
        with pytest.warns(StaleLeaseWarning, match="now belongs to another process"):
            acquire(run).release()


def test_lease_refreshed_too_long_ago_on_another_host_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_lease(run, foreign(refreshed=time.time() - 1000))
    with pytest.warns(StaleLeaseWarning) as warned:
        lease = acquire(run, stale_after_s=900)
    message = str(warned[0].message)
    assert "host 'other-host', pid 4242 (train.py --other)" in message
    assert re.search(r"last refresh was 100\d s ago, more than stale_after_s=900", message)
    assert on_disk(run)["token"] == lease.owner.token
    lease.release()
    assert not (run / LEASE_FILE).exists()


def test_fresh_lease_of_another_host_is_refused_and_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    data = write_lease(run, foreign(refreshed=time.time() - 100))
    with pytest.raises(OwnershipError, match="being written by another run") as caught:
        acquire(run, stale_after_s=900)
    message = str(caught.value)
    assert "host 'other-host', pid 4242 (train.py --other)" in message
    assert "last refresh 20" in message and re.search(r"\(10\d s ago\)", message)
    assert "taken over automatically once it is older than stale_after_s=900 s" in message
    assert caught.value.owner is not None and caught.value.owner.token == "f" * 32
    assert (run / LEASE_FILE).read_bytes() == data
    assert sorted(os.listdir(run)) == [LEASE_FILE]


DAMAGED = {
    "garbled": b'{"host": "x", "pid": ',
    "empty": b"",
    "list": b"[]",
    "not utf-8": b"\xff\xfe{}",
    "no token": json.dumps({k: v for k, v in foreign().items() if k != "token"}).encode(),
    "pid as text": json.dumps(foreign(pid="4242")).encode(),
    "pid zero": json.dumps(foreign(pid=0)).encode(),
    "bool pid": json.dumps(foreign(pid=True)).encode(),
    "nan time": json.dumps(foreign(refreshed=float("nan"))).encode(),
    "empty token": json.dumps(foreign(token="")).encode(),
}
EXPECTED = {
    "garbled": "is not JSON",
    "empty": "is empty",
    "list": "holds list [], not an object",
    "not utf-8": "is not JSON",
    "no token": "lacks the field 'token'",
    "pid as text": "has pid='4242'; expected int",
    "pid zero": "has pid=0; expected an int >= 1",
    "bool pid": "has pid=True; expected int",
    "nan time": "has refreshed=nan; expected a finite number",
    "empty token": "has token=''; expected a non-empty str",
}


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_damaged_lease_is_refused_naming_the_file_and_kept(tmp_path: Path, kind: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    path = run / LEASE_FILE
    path.write_bytes(DAMAGED[kind])
    for attempt in (lambda: acquire(run, stale_after_s=1e-9), lambda: read_owner(run)):
        with pytest.raises(OwnershipError) as caught:
            attempt()
        message = str(caught.value)
        assert f"lease file {path} {EXPECTED[kind]}" in message
        assert f"if no other run writes to {run}, delete {path}" in message
    assert path.read_bytes() == DAMAGED[kind]
    assert sorted(os.listdir(run)) == [LEASE_FILE]


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_lease_that_is_not_a_regular_file_is_refused_without_opening_it(
    tmp_path: Path, kind: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    path = run / LEASE_FILE
    (tmp_path / "target.json").write_text(json.dumps(foreign()))
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it to read would block until a writer appears
    else:
        path.symlink_to(tmp_path / "target.json")
    before = snapshot(tmp_path)
    expected = {"directory": "is a directory", "fifo": "is a FIFO", "symlink": "is a symlink"}
    for attempt in (lambda: acquire(run), lambda: read_owner(run)):
        with pytest.raises(OwnershipError, match=f"{expected[kind]}, not a regular file"):
            bounded(attempt)
    assert snapshot(tmp_path) == before


def test_read_owner_never_writes(tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    assert read_owner(absent) is None
    assert not absent.exists()
    run = tmp_path / "run"
    run.mkdir()
    assert read_owner(run) is None
    write_lease(run, foreign(refreshed=time.time() - 10_000))
    before = snapshot(tmp_path)
    owner = read_owner(run)
    assert owner is not None and owner.host == "other-host" and owner.pid == 4242
    assert owner.stale_reason(900) is not None  # stale, yet a reader takes nothing over
    assert owner.stale_reason(1e6) is None
    assert snapshot(tmp_path) == before


def test_refresh_writes_at_most_every_refresh_interval(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with acquire(run) as slow:
        assert slow.refresh_every_s == 30.0
        before = (run / LEASE_FILE).read_bytes()
        assert slow.refresh() is False
        assert (run / LEASE_FILE).read_bytes() == before
    with acquire(run, stale_after_s=0.4) as lease:
        assert lease.refresh_every_s == pytest.approx(0.1)
        first = on_disk(run)["refreshed"]
        started = time.monotonic()
        skipped = lease.refresh()
        assert skipped is False or time.monotonic() - started >= 0.1
        time.sleep(0.12)
        assert lease.refresh() is True
        stored = on_disk(run)
        assert stored["refreshed"] > first and stored["token"] == lease.owner.token
        assert stored["created"] == lease.owner.created
        assert sorted(os.listdir(run)) == [LEASE_FILE]  # no temporary file left


def test_refresh_detects_a_takeover_and_release_keeps_the_new_lease(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lease = acquire(run, stale_after_s=0.4)
    taken = write_lease(run, foreign())
    assert not lease.still_ours()
    time.sleep(0.12)
    with pytest.raises(OwnershipError, match="was taken over") as caught:
        lease.refresh()
    message = str(caught.value)
    assert "host 'other-host', pid 4242" in message and "must stop writing" in message
    with pytest.raises(OwnershipError, match="was taken over"):
        lease.refresh()  # stays lost, even within the refresh interval
    lease.release()
    assert (run / LEASE_FILE).read_bytes() == taken
    assert sorted(os.listdir(run)) == [LEASE_FILE]


def test_refresh_recreates_a_lease_deleted_by_hand(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with acquire(run, stale_after_s=0.4) as lease:
        (run / LEASE_FILE).unlink()
        assert not lease.still_ours()
        time.sleep(0.12)
        assert lease.refresh() is True
        assert on_disk(run)["token"] == lease.owner.token and lease.still_ours()


def test_keep_alive_refreshes_without_saves_and_stops_at_release(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lease = acquire(run, stale_after_s=0.4).keep_alive()
    first = on_disk(run)["refreshed"]
    wait_for(lambda: on_disk(run)["refreshed"] > first, "a heartbeat", timeout_s=5)
    beating = [t for t in threading.enumerate() if t.name.startswith("artifex-ckpt-lease")]
    assert len(beating) == 1
    write_lease(run, foreign())
    wait_for(lambda: not beating[0].is_alive(), "the heartbeat to notice", timeout_s=5)
    with pytest.raises(OwnershipError, match="was taken over"):
        lease.refresh()
    lease.release()
    assert on_disk(run)["token"] == "f" * 32
    (run / LEASE_FILE).unlink()
    with acquire(run, stale_after_s=0.4).keep_alive() as again:
        assert again.still_ours()
    assert not any(t.name.startswith("artifex-ckpt-lease") for t in threading.enumerate())
    assert not (run / LEASE_FILE).exists()


def test_a_lease_dropped_without_release_is_released_when_collected(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lease = acquire(run)
    del lease
    gc.collect()
    assert not (run / LEASE_FILE).exists()
    with acquire(run) as again:  # no StaleLeaseWarning: nothing was left behind
        assert again.still_ours()


FORK_AND_EXIT = """
import os, sys
from artifex_ckpt.ownership import OwnershipError, acquire
run = sys.argv[1]
lease = acquire(run, stale_after_s=0.2).keep_alive()  # a heartbeat every 0.05 s
child = os.fork()
if child == 0:
    failures = []
    if lease.held or lease.still_ours():
        failures.append("the child thinks it holds the lease")
    try:
        lease.refresh()
        failures.append("the child refreshed")
    except OwnershipError as err:
        if "fork" not in str(err):
            failures.append(str(err))
    lease.release()
    try:
        acquire(run)
        failures.append("the child acquired the parent's directory")
    except OwnershipError as err:
        if "another run" not in str(err):
            failures.append(str(err))
    print("; ".join(failures) or "child ok", flush=True)
    sys.exit(0)  # a normal exit: at-exit finalizers run in the child too
os.waitpid(child, 0)
print("parent still owns" if lease.still_ours() else "parent lost it", flush=True)
# Exits holding the lease, its heartbeat running: the at-exit finalizer releases it.
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_owns_nothing_and_exit_releases(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", FORK_AND_EXIT, str(run)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["child ok", "parent still owns"], done.stderr
    assert not (run / LEASE_FILE).exists()


def test_gcs_one_writer_and_readers(gcs_dir: epath.Path) -> None:
    lease = acquire(gcs_dir)
    owner = read_owner(gcs_dir)
    assert owner is not None and owner.token == lease.owner.token and owner.pid == os.getpid()
    with pytest.raises(OwnershipError, match="this process"):
        acquire(os.fspath(gcs_dir) + "/")
    assert lease.still_ours()
    lease.release()
    assert read_owner(gcs_dir) is None

    other = gcs_dir / "other"
    (other / LEASE_FILE).write_text(json.dumps(foreign()))
    with pytest.raises(OwnershipError, match="host 'other-host', pid 4242"):
        acquire(other)
    assert json.loads((other / LEASE_FILE).read_text())["token"] == "f" * 32
    (other / LEASE_FILE).write_text(json.dumps(foreign(refreshed=time.time() - 1000)))
    with pytest.warns(StaleLeaseWarning, match="other-host"), acquire(other) as taken:
        assert read_owner(other) == taken.owner
    assert read_owner(other) is None


def test_require_free_and_live_owner_look_without_writing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    require_free(run)
    assert live_owner(run) is None
    assert not run.exists()

    write_lease(run, foreign(refreshed=time.time() - 100))  # alive, as far as anyone knows
    before = snapshot(run)
    with pytest.raises(OwnershipError, match="host 'other-host', pid 4242") as caught:
        require_free(run, stale_after_s=900)
    assert caught.value.owner is not None and caught.value.owner.pid == 4242
    owner = live_owner(run, stale_after_s=900)
    assert owner is not None and owner.host == "other-host"
    assert live_owner(run, stale_after_s=60) is None  # stale: acquire would take it over
    require_free(run, stale_after_s=60)
    assert snapshot(run) == before

    (run / LEASE_FILE).write_bytes(b"[]")
    for look in (require_free, live_owner):
        with pytest.raises(OwnershipError, match="holds list"):
            look(run)


def test_live_owner_names_a_manager_of_this_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with acquire(run) as lease:
        owner = live_owner(os.path.join(tmp_path, "run", "..", "run"))
        assert owner is not None and owner.token == lease.owner.token
        with pytest.raises(OwnershipError, match="another manager or callback in this process"):
            require_free(run)
    assert live_owner(run) is None
