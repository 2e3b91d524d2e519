"""A run directory that nothing can break: readers during a save, two writers, lost or
damaged small files, flipped bits, symbolic links, failed directory creation.

Every fault is real: a second process holding a save in flight (its commit waits for the
parent, so the timing is fixed), files damaged on disk, links made with `os.symlink`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from artifex_ckpt import (
    BaseCallback,
    CheckpointConfig,
    CheckpointWarning,
    ConfigError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    MetricCheckpointManager,
    ModelCheckpoint,
    ModelMismatchError,
    load_checkpoint,
    save_checkpoint,
    setup_checkpoint_manager,
)
from artifex_ckpt.cli import main as cli_main
from artifex_ckpt.ownership import LEASE_FILE, OwnershipError, StaleLeaseWarning
from tests.conftest import TinyMLP, assert_trees_equal, pure
from tests.reliability.directory_child import TEMPLATE as CHILD_TEMPLATE
from tests.training import make_trainer

ROOT = Path(__file__).resolve().parents[2]
UNFINISHED = ".orbax-checkpoint-tmp"
RUN_LOSSES = (0.5, 0.2, 0.4, 0.3)  # step 1 is the best, step 3 the newest


# ---------------------------------------------------------------- helpers


def _snapshot(root: Path, *, skip: str = "\0") -> dict[str, tuple[int, int]]:
    """Every path under `root` (files, directories, links) with its size and mtime, less
    those whose name contains `skip`."""
    found = {}
    for path in sorted(root.rglob("*")):
        if skip in path.name:
            continue
        info = path.lstat()
        found[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return found


def _write_run(root: Path, template: str | None, din: int = 4) -> None:
    """Four checkpoints of `TinyMLP(nnx.Rngs(step), din)` with `RUN_LOSSES`, all kept."""
    with MetricCheckpointManager(root, filename=template, save_top_k=-1) as manager:
        for step, loss in enumerate(RUN_LOSSES):
            model = TinyMLP(nnx.Rngs(step), din=din)
            save_checkpoint(manager, model, step, metrics={"val_loss": loss})


def _save(manager: MetricCheckpointManager, step: int, loss: float) -> None:
    args = ocp.args.StandardSave({"w": np.full(3, step, np.float32)})
    manager.save(step, args=args, metrics={"val_loss": loss})


def _dir_of(root: Path, step: int) -> Path:
    return next(
        p for p in root.iterdir() if p.name.split("-")[:2] in ([str(step)], ["ck", str(step)])
    )


def _messages(caught: list[warnings.WarningMessage], kind: type[Warning]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, kind)]


class _Child:
    """`directory_child`: a trainer whose third save is held in flight until `release`."""

    def __init__(self, root: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.directory_child", str(root)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.event = self._next()
        assert self.event["event"] == "holding", self.event

    def _next(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            _, err = self.process.communicate(timeout=30)
            raise AssertionError(f"child exited: {err[-3000:]}")
        return dict(json.loads(line))

    def release(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        done = self._next()
        _, err = self.process.communicate(timeout=60)  # also closes the pipes
        assert self.process.returncode == 0, err[-3000:]
        return done

    def kill(self) -> None:
        self.process.kill()
        self.process.communicate(timeout=30)


@pytest.fixture
def child(tmp_path: Path) -> Iterator[_Child]:
    running = _Child(tmp_path / "run")
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.kill()


def _unfinished(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if UNFINISHED in p.name]


# ---------------------------------------------------------------- D1, D3: readers and writers


def test_readers_during_a_save_in_flight_change_nothing_and_writers_are_refused(
    tmp_path: Path, child: _Child, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    assert _unfinished(root) == ["ck-2-0.400" + UNFINISHED]
    # The owner's heartbeat may rewrite its lease meanwhile; its token must stay the same.
    before = _snapshot(root, skip=LEASE_FILE)
    token = json.loads((root / LEASE_FILE).read_text())["token"]
    pid = child.event["pid"]

    # An eval script, as docs/restoring.md recommends: it opens a reader, logged at INFO.
    with caplog.at_level(logging.INFO, logger="artifex_ckpt"):
        manager, _ = setup_checkpoint_manager(root)
    assert manager.plan.read_only
    assert any(f"pid {pid}" in r.message and "read-only" in r.message for r in caplog.records)
    with manager:
        assert manager.all_steps() == [0, 1] and manager.best_step() == 1
        model = TinyMLP(nnx.Rngs(99))
        load_checkpoint(manager, model, "best")
        assert_trees_equal(model, TinyMLP(nnx.Rngs(1)))
    # A notebook reading the score through a new callback.
    notebook = ModelCheckpoint(CheckpointConfig(dirpath=root, filename=CHILD_TEMPLATE))
    assert notebook.best_score == pytest.approx(0.2)
    notebook.manager.close()
    assert _snapshot(root, skip=LEASE_FILE) == before, "a reader wrote, moved or deleted"
    assert json.loads((root / LEASE_FILE).read_text())["token"] == token

    # D3: a second writer (the same job, another loss, an explicit writer) is refused,
    # naming the owner, before it writes anything.
    attempts: list[Callable[[], object]] = [
        lambda: setup_checkpoint_manager(root, read_only=False),
        lambda: MetricCheckpointManager(root, monitor="val_accuracy", mode="max"),
        lambda: make_trainer(epochs=1).fit(
            callbacks=[ModelCheckpoint(CheckpointConfig(dirpath=root, filename=CHILD_TEMPLATE))]
        ),
    ]
    for attempt in attempts:
        with pytest.raises(OwnershipError) as refused:
            attempt()
        message = str(refused.value)
        assert f"pid {pid}" in message and "Stop the other run" in message, message
        assert refused.value.owner is not None and refused.value.owner.pid == pid
    assert _snapshot(root, skip=LEASE_FILE) == before
    assert json.loads((root / LEASE_FILE).read_text())["token"] == token

    done = child.release()
    assert done["names"] == ["ck-1-0.200", "ck-2-0.400"]
    assert _unfinished(root) == []
    with MetricCheckpointManager(root) as reopened:  # a writer again: the child is gone
        assert reopened.all_steps() == [1, 2] and not reopened.plan.read_only


def test_a_dead_writer_is_taken_over_and_its_unfinished_save_removed(
    tmp_path: Path, child: _Child
) -> None:
    root = tmp_path / "run"
    pid = child.event["pid"]
    child.kill()
    assert _unfinished(root) and (root / LEASE_FILE).exists()

    with pytest.warns(StaleLeaseWarning, match=rf"pid {pid}.*no longer exists"):
        manager, _ = setup_checkpoint_manager(root)
    with manager:
        assert not manager.plan.read_only
        assert _unfinished(root) == []
        assert manager.all_steps() == [0, 1]
        assert save_checkpoint(manager, TinyMLP(nnx.Rngs(2)), 2, metrics={"val_loss": 0.1})
    assert not (root / LEASE_FILE).exists()


def _foreign_lease(root: Path, refreshed_ago_s: float) -> None:
    now = time.time()
    lease = {
        "host": "another-host",
        "pid": 4242,
        "process_start": 1,
        "pid_scope": "elsewhere",
        "token": "f" * 32,
        "created": now - 3600,
        "refreshed": now - refreshed_ago_s,
        "command": "train.py",
    }
    (root / LEASE_FILE).write_text(json.dumps(lease))


def test_lease_of_another_host_is_stale_only_after_stale_after_s(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _write_run(root, "ck-{epoch}")
    _foreign_lease(root, refreshed_ago_s=10)
    before = _snapshot(root)
    with pytest.raises(OwnershipError, match="host 'another-host', pid 4242"):
        MetricCheckpointManager(root)
    assert _snapshot(root) == before
    manager, _ = setup_checkpoint_manager(root)  # a reader: the other host may be alive
    assert manager.plan.read_only
    manager.close()

    _foreign_lease(root, refreshed_ago_s=301)  # manager.STALE_AFTER_S is 300 s
    with pytest.warns(StaleLeaseWarning, match=r"another-host.*more than stale_after_s=300"):
        manager, _ = setup_checkpoint_manager(root)
    assert not manager.plan.read_only
    manager.close()


@pytest.mark.parametrize(
    "second",
    [
        pytest.param({}, id="same config twice"),
        pytest.param({"monitor": "val_accuracy", "mode": "max"}, id="another monitor"),
    ],
)
@pytest.mark.parametrize("used", [False, True], ids=["new dirpath", "used dirpath"])
def test_two_callbacks_on_one_dirpath_are_refused_before_anything_is_written(
    tmp_path: Path, second: dict[str, Any], used: bool
) -> None:
    root = tmp_path / "run"
    first = CheckpointConfig(dirpath=root, filename="ck-{epoch}")
    if used:
        make_trainer(epochs=1).fit(callbacks=[ModelCheckpoint(first)])
    # Resuming a used run records the restore in its history; nothing else may change.
    before = _snapshot(root, skip="history") if used else {}
    other = CheckpointConfig(dirpath=root, filename="ck-{epoch}", **second)
    trainer = make_trainer(epochs=6)
    with pytest.raises(OwnershipError, match="another manager or callback in this process"):
        trainer.fit(callbacks=[ModelCheckpoint(first), ModelCheckpoint(other)], resume=used)
    if used:
        assert _snapshot(root, skip="history") == before
    else:
        assert not root.exists()


# ---------------------------------------------------------------- D2: lost metrics of the best


def _lose_metrics(step_dir: Path, how: str) -> None:
    metrics = step_dir / "metrics"
    if how == "deleted":
        (metrics / "metrics").unlink()
    elif how == "item deleted":
        shutil.rmtree(metrics)
    else:
        (metrics / "metrics").write_text('{"val_loss": 0.2')


@pytest.mark.parametrize(
    ("template", "how"),
    [
        ("ck-{epoch}-{val_loss:.3f}", "deleted"),
        ("ck-{epoch}-{val_loss:.3f}", "garbled"),
        ("ck-{epoch}", "deleted"),
        ("ck-{epoch}", "garbled"),
        (None, "deleted"),
        (None, "item deleted"),  # only the manifest remembers that it had metrics
    ],
)
def test_the_best_is_kept_when_its_metrics_are_lost(
    tmp_path: Path, template: str | None, how: str
) -> None:
    root = tmp_path / "run"
    with MetricCheckpointManager(root, filename=template, save_top_k=2) as manager:
        for step, loss in enumerate(RUN_LOSSES):  # keeps 1 (the best) and 3 (the newest)
            _save(manager, step, loss)
    best = _dir_of(root, 1)
    _lose_metrics(best, how)
    recovered = template is not None and "val_loss" in template
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricCheckpointManager(root) as manager:
            _save(manager, 4, 0.9)
            _save(manager, 5, 0.8)  # the top 2 by score are full again: one is evicted
            manager.wait_until_finished()
            assert best.is_dir(), "the best checkpoint was evicted"
            assert manager.all_steps() == [1, 3, 5]
            assert (manager.best_step() == 1) == recovered
            assert (1 in manager.ranked_steps()) == recovered
    messages = _messages(caught, CorruptCheckpointWarning)
    assert len(messages) == 1 and str(best) in messages[0], messages
    outcome = "is read from its name" if recovered else "treated as unscored and kept"
    assert outcome in messages[0]


# ---------------------------------------------------------------- W1: one flipped bit


def test_one_flipped_bit_is_not_restored_silently(tmp_path: Path) -> None:
    root = tmp_path / "run"
    # A (64, 8) kernel is stored outside OCDBT's checksummed b-tree nodes, in a data file
    # that nothing but the manifest checks (smaller values are inlined and checked).
    _write_run(root, "ck-{epoch}", din=64)
    kernel = np.asarray(TinyMLP(nnx.Rngs(1), din=64).dense.kernel[...]).tobytes()
    data = next(
        f for f in (root / "ck-1/model/ocdbt.process_0/d").iterdir() if kernel in f.read_bytes()
    )
    content = bytearray(data.read_bytes())
    content[content.find(kernel) + 5] ^= 0x01
    data.write_bytes(bytes(content))

    manager, _ = setup_checkpoint_manager(root)
    with manager:
        assert manager.check_intact(1).ok  # sizes only: a flipped bit keeps them
        with pytest.raises(CorruptCheckpointError, match=r"ck-1 does not match its manifest"):
            manager.check_intact(1, deep=True)
        model = TinyMLP(nnx.Rngs(99), din=64)
        with pytest.warns(CorruptCheckpointWarning, match=r"ck-1 failed to restore.*manifest"):
            load_checkpoint(manager, model, "best")
        assert_trees_equal(model, TinyMLP(nnx.Rngs(3), din=64))  # the next best, 0.3
        # What verification prevents: without it the flipped weight restores silently.
        unchecked = TinyMLP(nnx.Rngs(99), din=64)
        load_checkpoint(manager, unchecked, "best", verify=False)
    saved = jax.tree.leaves(pure(TinyMLP(nnx.Rngs(1), din=64)))
    leaves = zip(jax.tree.leaves(pure(unchecked)), saved, strict=True)
    assert sum(int(np.sum(a != b)) for a, b in leaves) == 1


def test_checkpoints_written_before_manifests_restore_unverified(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _write_run(root, "ck-{epoch}")
    for step_dir in root.glob("ck-*"):
        (step_dir / "artifex_manifest.json").unlink()
    with MetricCheckpointManager(root) as manager:
        assert manager.check_intact(1, deep=True).status == "unverified"
        model = TinyMLP(nnx.Rngs(99))
        load_checkpoint(manager, model, "best")
    assert_trees_equal(model, TinyMLP(nnx.Rngs(1)))


# ---------------------------------------------------------------- U1: one bad small file


def _rewrite_commit_record(step_dir: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    record = step_dir / "_CHECKPOINT_METADATA"
    record.write_text(json.dumps(change(json.loads(record.read_text()))))


def _replace_by_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


SMALL_FILE_DAMAGE: dict[str, Callable[[Path], None]] = {
    "metrics is a directory": lambda p: _replace_by_directory(p / "metrics" / "metrics"),
    "metrics is a FIFO": lambda p: _replace_by_fifo(p / "metrics" / "metrics"),
    "commit record [1, 2]": lambda p: _rewrite_commit_record(p, lambda d: [1, 2]),
    "commit timestamp 'x'": lambda p: _rewrite_commit_record(
        p, lambda d: {**d, "commit_timestamp_nsecs": "x"}
    ),
    "custom_metadata []": lambda p: _rewrite_commit_record(
        p, lambda d: {**d, "custom_metadata": []}
    ),
    "commit record is a FIFO": lambda p: _replace_by_fifo(p / "_CHECKPOINT_METADATA"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run with numeric names and one with template names, four checkpoints each."""
    base = tmp_path_factory.mktemp("runs")
    made = {}
    for label, template in (("numeric", None), ("template", "ck-{epoch}")):
        _write_run(base / label, template)
        made[label] = base / label
    return made


@pytest.mark.parametrize("damage", sorted(SMALL_FILE_DAMAGE))
@pytest.mark.parametrize("names", ["numeric", "template"])
def test_one_bad_small_file_leaves_the_run_usable(
    runs: dict[str, Path], tmp_path: Path, damage: str, names: str, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "run"
    shutil.copytree(runs[names], root, symlinks=True)
    damaged = _dir_of(root, 1)  # the best, an old checkpoint
    SMALL_FILE_DAMAGE[damage](damaged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager, _ = setup_checkpoint_manager(root)  # a writer
        with manager:
            assert not manager.plan.read_only
            assert manager.all_steps() == [0, 1, 2, 3]
            model = TinyMLP(nnx.Rngs(99))
            # Skipped when restoring, or unscored: either way the next best, step 3 (0.3).
            load_checkpoint(manager, model, "best")
            assert_trees_equal(model, TinyMLP(nnx.Rngs(3)))
            assert save_checkpoint(manager, TinyMLP(nnx.Rngs(4)), 4, metrics={"val_loss": 0.9})
    messages = _messages(caught, CorruptCheckpointWarning)
    assert messages and all(str(damaged) in m for m in messages), messages
    assert damaged.is_dir(), "the damaged checkpoint was deleted"
    # The CLI lists the run too. For a FIFO it refuses, naming the checkpoint to move aside
    # (cli.py checks before opening a manager; the manager itself no longer blocks on one).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        listed = cli_main(["ls", str(root)])
    shown = capsys.readouterr()
    if "FIFO" in damage:
        assert listed == 1 and f"quarantine {root} {damaged.name}" in shown.err, shown.err
    else:
        assert listed == 0 and damaged.name in shown.out, shown.err


def test_resume_past_a_damaged_old_checkpoint(tmp_path: Path) -> None:
    config = CheckpointConfig(dirpath=tmp_path / "run", filename="e-{epoch}", save_top_k=-1)
    make_trainer(epochs=2).fit(callbacks=[ModelCheckpoint(config)])
    _rewrite_commit_record(tmp_path / "run" / "e-0", lambda d: [1, 2])
    trainer = make_trainer(epochs=3)
    with pytest.warns(CorruptCheckpointWarning, match="e-0"):
        trainer.fit(callbacks=[ModelCheckpoint(config)], resume=True)
    assert trainer.initial_epoch == 2 and trainer.epoch == 2
    assert (tmp_path / "run" / "e-2").is_dir() and (tmp_path / "run" / "e-0").is_dir()


# ---------------------------------------------------------------- U2: symbolic links


def test_evicting_a_symlinked_checkpoint_removes_the_link_only(tmp_path: Path) -> None:
    root, disk = tmp_path / "run", tmp_path / "other-disk"
    disk.mkdir()
    with MetricCheckpointManager(root, save_top_k=1) as manager:
        _save(manager, 0, 0.5)
        _save(manager, 1, 0.9)
    shutil.move(root / "0", disk / "0")
    os.symlink(disk / "0", root / "0")
    moved = _snapshot(disk)

    link_note = rf"was a symbolic link to {disk / '0'}"
    with pytest.warns(CheckpointWarning, match=link_note), MetricCheckpointManager(root) as manager:
        assert manager.all_steps() == [0, 1] and manager.best_step() == 0
        restored = manager.restore(0, args=ocp.args.StandardRestore({"w": np.zeros(3)}))
        np.testing.assert_array_equal(restored["w"], np.zeros(3))
        _save(manager, 2, 0.1)  # evicts 0, the link
        _save(manager, 3, 0.8)
    assert not os.path.lexists(root / "0")
    assert _snapshot(disk) == moved, "the link's target was touched"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["2", "3"]
    with MetricCheckpointManager(root) as manager:  # no warning, no error at later opens
        assert manager.all_steps() == [2, 3]


@pytest.mark.parametrize(
    ("names", "link", "target"),
    [
        ("ck-{epoch}-{val_loss:.3f}", "ck-7-0.100", "."),
        (None, "7", "."),
        (None, "8", ".."),
        (None, "9", "0"),
    ],
    ids=["template to the run", "numeric to the run", "numeric to the parent", "to a step"],
)
def test_a_link_back_into_the_run_is_not_a_checkpoint(
    tmp_path: Path, names: str | None, link: str, target: str
) -> None:
    root = tmp_path / "run"
    with MetricCheckpointManager(root, filename=names, save_top_k=1) as manager:
        _save(manager, 0, 0.5)
    os.symlink(target, root / link)
    (tmp_path / "beside-the-run").write_text("kept")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricCheckpointManager(root) as manager:
            assert manager.all_steps() == [0] and manager.latest_step() == 0
            _save(manager, 1, 0.9)
            _save(manager, 2, 0.1)  # evicts 0 and 1, never the link
    for message in _messages(caught, CheckpointWarning):
        assert link in message and "not a checkpoint" in message, message
    assert os.readlink(root / link) == target
    assert (tmp_path / "beside-the-run").read_text() == "kept"
    assert sorted(p.name for p in root.iterdir() if not p.is_symlink() and p.is_dir()) == [
        "2" if names is None else "ck-2-0.100"
    ]


@pytest.mark.parametrize("kind", ["file", "link to a directory"])
def test_a_trash_that_is_not_a_directory_is_refused_not_followed(tmp_path: Path, kind: str) -> None:
    root, elsewhere = tmp_path / "run", tmp_path / "precious"
    with MetricCheckpointManager(root, save_top_k=1) as manager:
        _save(manager, 0, 0.5)
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    trash = root / ".artifex-deleted"
    if kind == "file":
        trash.write_text("not a directory")
    else:
        os.symlink(elsewhere, trash)
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"\.artifex-deleted is .*Move it out"):
        MetricCheckpointManager(root)
    with MetricCheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True)) as r:
        assert r.all_steps() == [0]
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------- U3: failed directory creation

_EXIT_CHILD = """
import os, shutil, subprocess, sys, time
import numpy as np, orbax.checkpoint as ocp
from artifex_ckpt import CheckpointSaveError, MetricCheckpointManager
root, how = sys.argv[1], sys.argv[2]
manager = MetricCheckpointManager(root, filename="ck-{epoch}")
args = lambda: ocp.args.StandardSave({"w": np.zeros(3, np.float32)})
manager.save(0, args=args(), metrics={"val_loss": 0.5})
manager.wait_until_finished()
if how == "read-only file system":
    subprocess.run(["mount", "-o", "remount,ro", os.path.dirname(root)], check=True)
else:
    shutil.rmtree(root)
    open(root, "w").close()
try:
    manager.save(1, args=args(), metrics={"val_loss": 0.4})
    manager.wait_until_finished()
except CheckpointSaveError as err:
    print("failed:", err, flush=True)
print("exiting", flush=True)
"""


@pytest.mark.parametrize("how", ["run directory replaced by a file", "read-only file system"])
def test_a_failed_directory_creation_lets_the_process_exit(tmp_path: Path, how: str) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if how == "read-only file system":
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip("cannot mount a tmpfs here; needs root and mount rights")
    try:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", _EXIT_CHILD, str(disk / "run"), how],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
    finally:
        if how == "read-only file system":
            subprocess.run(["umount", "-l", str(disk)], check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed: saving checkpoint 'ck-1'" in result.stdout, result.stdout
    assert took < 30, f"the process took {took:.0f} s to exit"


def test_a_name_too_long_for_its_unfinished_form_is_refused_when_built(tmp_path: Path) -> None:
    root = tmp_path / "run"
    # 219 + 35 bytes fit in 255, but not with "-exception" and Orbax's suffix.
    with pytest.raises(
        ConfigError, match=r"fit in 224 bytes.*orbax-checkpoint-tmp.*-preempted tag"
    ):
        MetricCheckpointManager(root, filename="x" * 219 + "-{epoch}-{val_loss:.3f}")
    assert not root.exists()


# ---------------------------------------------------------------- U6 and cosmetics


@pytest.mark.parametrize("which", ["best", "latest", 2])
def test_a_model_of_the_wrong_shape_is_a_mismatch_not_corruption(
    runs: dict[str, Path], which: Any
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager, _ = setup_checkpoint_manager(runs["template"], read_only=True)
        with manager, pytest.raises(ModelMismatchError, match=r"dense/kernel.*\(4, 8\)"):
            load_checkpoint(manager, TinyMLP(nnx.Rngs(0), din=5), which)
    assert _messages(caught, CorruptCheckpointWarning) == []


def test_nan_and_infinities_are_stored_as_standard_json(tmp_path: Path) -> None:
    root = tmp_path / "run"

    def strict(constant: str) -> None:
        raise ValueError(f"{constant} is not standard JSON")

    with MetricCheckpointManager(root, filename="m-{epoch}", save_top_k=-1) as manager:
        for step, loss in enumerate([float("nan"), float("inf"), float("-inf"), 0.5]):
            _save(manager, step, loss)
    stored = [
        json.loads((root / f"m-{step}" / "metrics" / "metrics").read_text(), parse_constant=strict)
        for step in range(4)
    ]
    assert [s["val_loss"] for s in stored] == ["nan", "inf", "-inf", 0.5]
    with MetricCheckpointManager(root) as manager:
        assert manager.best_step() == 3 and manager.ranked_steps()[0] == 3
        assert manager.score(1) == float("inf")


class _PathWhileSaving(BaseCallback):
    """Reads `best_checkpoint_path` right after the epoch's save started, then waits."""

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.paths: list[tuple[Path, bool]] = []

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
        path = self.checkpoint.best_checkpoint_path
        assert path is not None
        self.checkpoint.manager.wait_until_finished()
        self.paths.append((Path(path), Path(path).is_dir()))


def test_best_checkpoint_path_exists_once_its_save_has_committed(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path / "run", save_top_k=1))
    peek = _PathWhileSaving(checkpoint)
    make_trainer(epochs=2).fit(callbacks=[checkpoint, peek])
    assert [exists for _, exists in peek.paths] == [True, True]
    assert all(path.parent == tmp_path / "run" for path, _ in peek.paths)
