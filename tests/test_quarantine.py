"""`quarantine` on real runs: what moves, what it refuses, what a manager sees afterwards."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from artifex_ckpt import MetricCheckpointManager
from artifex_ckpt.errors import CheckpointError, CheckpointNotFoundError
from artifex_ckpt.history import DecisionHistory, HistoryWarning
from artifex_ckpt.manifest import verify
from artifex_ckpt.ownership import OwnershipError, acquire
from artifex_ckpt.quarantine import QUARANTINE, quarantine

TEMPLATE = "ck-{epoch}-{val_loss:.3f}"
LOSSES = (0.5, 0.3, 0.4, 0.6)
RETAINED = ["ck-1-0.300", "ck-2-0.400", "ck-3-0.600"]


def _save(manager: MetricCheckpointManager, step: int, loss: float) -> None:
    state = {"w": np.arange(4, dtype=np.float32) * step}
    manager.save(step, args=ocp.args.StandardSave(state), metrics={"val_loss": loss})


def _write_run(directory: str | os.PathLike[str]) -> None:
    with MetricCheckpointManager(
        directory, monitor="val_loss", save_top_k=2, filename=TEMPLATE
    ) as manager:
        for step, loss in enumerate(LOSSES):
            _save(manager, step, loss)
        manager.wait_until_finished()


def _listed(directory: str | os.PathLike[str]) -> list[str]:
    options = ocp.CheckpointManagerOptions(read_only=True)
    with MetricCheckpointManager(directory, options=options) as manager:
        return [manager.step_path(step).name for step in sorted(manager.all_steps())]


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared") / "run"
    _write_run(root)
    return root


@pytest.fixture
def run(prepared: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(prepared, target, symlinks=True)
    return target


def test_moves_the_directory_whole_and_records_why(run: Path) -> None:
    before = _tree(run / "ck-2-0.400")
    moved = quarantine(run, "ck-2-0.400", reason="checksum mismatch")
    assert moved == epath.Path(run / QUARANTINE / "ck-2-0.400")
    assert not (run / "ck-2-0.400").exists()
    assert _tree(Path(moved)) == before and verify(moved).ok
    assert _listed(run) == ["ck-1-0.300", "ck-3-0.600"]
    last = DecisionHistory(run).read()[-1]
    assert (last.kind, last.step, last.name, last.score) == ("quarantined", 2, "ck-2-0.400", 0.4)
    assert dict(last.details) == {"to": os.fspath(moved), "reason": "checksum mismatch"}


def test_a_resume_continues_past_the_quarantined_newest(run: Path) -> None:
    quarantine(run, "ck-3-0.600")
    with MetricCheckpointManager(run) as manager:
        assert manager.latest_step() == 2
        _save(manager, 3, 0.2)
        manager.wait_until_finished()
        assert manager.best_step() == 3
    assert (run / "ck-3-0.200").is_dir() and (run / QUARANTINE / "ck-3-0.600").is_dir()


def test_a_second_quarantine_of_the_same_name_gets_a_suffix(run: Path) -> None:
    first = quarantine(run, "ck-2-0.400")
    shutil.copytree(Path(first), run / "ck-2-0.400")
    second = quarantine(run, "ck-2-0.400")
    assert second.name == "ck-2-0.400.1" and first.is_dir() and second.is_dir()
    assert _tree(Path(first)) == _tree(Path(second))


def test_a_checkpoint_no_manager_lists_is_recognised_by_its_marker(run: Path) -> None:
    shutil.copytree(run / "ck-1-0.300", run / "ck-1-0.300.bak")
    moved = quarantine(run, "ck-1-0.300.bak")
    assert moved.name == "ck-1-0.300.bak"
    # Its step is unknown, so the history has nothing to record.
    assert all(d.kind != "quarantined" for d in DecisionHistory(run).read())


@pytest.mark.parametrize(
    ("make", "name", "error", "expected"),
    [
        (None, "../run", CheckpointError, "not a checkpoint name"),
        (None, "ck-1-0.300/default", CheckpointError, "not a checkpoint name"),
        (None, "", CheckpointError, "not a checkpoint name"),
        (None, "ck-9-0.100", CheckpointNotFoundError, "does not exist; checkpoints: ["),
        ("file", "ck-9-0.100", CheckpointError, "is a regular file, not a checkpoint"),
        ("fifo", "ck-9-0.100", CheckpointError, "is a FIFO, not a checkpoint directory"),
        ("link", "ck-9-0.100", CheckpointError, "is a symbolic link"),
        ("empty", "notes", CheckpointError, "no manager lists it and it has no"),
        ("empty", ".hidden", CheckpointError, "is hidden"),
        ("empty", "ck-9.orbax-checkpoint-tmp-1", CheckpointError, "unfinished save"),
    ],
)
def test_refuses_what_is_not_a_checkpoint_and_moves_nothing(
    run: Path, make: str | None, name: str, error: type[Exception], expected: str
) -> None:
    target = run / name if name and "/" not in name else None
    if target is not None and make == "file":
        target.write_text("x")
    elif target is not None and make == "fifo":
        os.mkfifo(target)
    elif target is not None and make == "link":
        target.symlink_to(run / "ck-1-0.300")
    elif target is not None and make == "empty":
        target.mkdir()
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(error) as raised:
        quarantine(run, name)
    assert expected in str(raised.value)
    assert sorted(p.name for p in run.iterdir()) == before


def test_refuses_while_a_live_run_owns_the_directory(run: Path) -> None:
    with acquire(run):
        with pytest.raises(OwnershipError, match="written by a live run") as raised:
            quarantine(run, "ck-2-0.400")
        assert f"pid {os.getpid()}" in str(raised.value)
        assert (run / "ck-2-0.400").is_dir()
    assert quarantine(run, "ck-2-0.400").is_dir()


def test_refuses_when_the_lease_file_is_damaged(run: Path) -> None:
    (run / "artifex_owner.json").write_text("{not json")
    with pytest.raises(OwnershipError, match="cannot tell whether a run writes"):
        quarantine(run, "ck-2-0.400")
    assert (run / "ck-2-0.400").is_dir()


def test_a_fifo_history_is_left_alone_and_the_move_stands(run: Path) -> None:
    history = run / "artifex_history.jsonl"
    history.unlink()
    os.mkfifo(history)
    with pytest.warns(HistoryWarning, match="is a FIFO, not a regular file"):
        moved = quarantine(run, "ck-2-0.400")
    assert moved.is_dir() and not (run / "ck-2-0.400").exists()


def test_the_score_comes_from_the_metrics_file_not_the_name(run: Path) -> None:
    metrics = run / "ck-2-0.400" / "metrics" / "metrics"
    metrics.write_text(json.dumps({"val_loss": 0.25}))
    quarantine(run, "ck-2-0.400")
    assert DecisionHistory(run).read()[-1].score == 0.25


def test_on_gcs_it_copies_checks_then_deletes(gcs_dir: epath.Path) -> None:
    _write_run(gcs_dir)
    source = gcs_dir / "ck-2-0.400"
    before = {
        os.fspath(path)[len(os.fspath(source)) :]: path.read_bytes() for path in _files(source)
    }
    moved = quarantine(gcs_dir, "ck-2-0.400", reason="remote")
    assert os.fspath(moved) == f"{gcs_dir}/{QUARANTINE}/ck-2-0.400"
    after = {os.fspath(p)[len(os.fspath(moved)) :]: p.read_bytes() for p in _files(moved)}
    assert after == before and verify(moved).ok
    assert not source.exists()
    assert _listed(gcs_dir) == ["ck-1-0.300", "ck-3-0.600"]
    last = DecisionHistory(gcs_dir).read()[-1]
    assert (last.kind, last.name, last.details["reason"]) == ("quarantined", "ck-2-0.400", "remote")


def _files(directory: epath.Path) -> list[epath.Path]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(directory))
    scheme = os.fspath(directory).split("://", 1)[0]
    return [epath.Path(f"{scheme}://{key}") for key in sorted(fs.find(root))]
