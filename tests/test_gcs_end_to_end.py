"""gs:// end to end, against the local GCS emulator: everything a local directory can do.

`ModelCheckpoint` with top-k eviction and resume, `setup_checkpoint_manager`,
`save_checkpoint` and `load_checkpoint` with the fallback past a damaged best checkpoint, and
the command line (`ls`, `best`, `demo`) as a subprocess. The bucket is inspected with fresh
gcsfs listings, never through the library under test. The emulator ignores generation
preconditions, so nothing here relies on them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from artifex_ckpt import (
    BaseCallback,
    CheckpointConfig,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    MetricCheckpointManager,
    ModelCheckpoint,
    TrainerLike,
    load_checkpoint,
    save_checkpoint,
    setup_checkpoint_manager,
)
from artifex_ckpt.history import HISTORY_FILE, DecisionHistory
from artifex_ckpt.listing import COMMIT_RECORD
from artifex_ckpt.manifest import MANIFEST_FILE
from artifex_ckpt.ownership import LEASE_FILE
from artifex_ckpt.settings import SETTINGS_FILE
from artifex_ckpt.table import human_size
from tests.conftest import TinyMLP, assert_trees_equal, pure
from tests.gcs_emulator import Emulator
from tests.runs import fill_json_only
from tests.training import make_trainer

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "m-{epoch:02d}-{val_loss:.4f}"
# What a run directory holds besides its checkpoints once every manager closed.
RUN_FILES = {SETTINGS_FILE, HISTORY_FILE}


def listing(path: epath.Path) -> dict[str, int]:
    """Object name (relative to `path`) -> size, from a fresh listing of the bucket."""
    fs, root = fsspec.core.url_to_fs(os.fspath(path))
    fs.invalidate_cache()
    found = fs.find(root, detail=True)
    return {name[len(root) + 1 :]: int(info["size"]) for name, info in found.items()}


def top_level(path: epath.Path) -> set[str]:
    return {name.split("/", 1)[0] for name in listing(path)}


def history_kinds(path: epath.Path) -> list[tuple[str, str | None]]:
    return [(d.kind, d.name) for d in DecisionHistory(path).read()]


class StateAtStart(BaseCallback):
    """The model's state as training begins (after a resume restored it)."""

    def __init__(self) -> None:
        self.state: object = None

    def on_train_begin(self, trainer: TrainerLike) -> None:
        self.state = pure(trainer.model)


# ModelCheckpoint and Trainer


def test_model_checkpoint_keeps_top_k_on_gcs_and_resumes(gcs_dir: epath.Path) -> None:
    def config() -> CheckpointConfig:
        return CheckpointConfig(dirpath=os.fspath(gcs_dir), filename=TEMPLATE, save_top_k=2)

    first = make_trainer(epochs=4)
    checkpoint = ModelCheckpoint(config())
    first.fit(callbacks=[checkpoint])

    kinds = history_kinds(gcs_dir)
    scores = {d.step: d.score for d in DecisionHistory(gcs_dir).read() if d.kind == "saved"}
    assert sorted(scores) == [0, 1, 2, 3]
    kept = sorted(scores, key=lambda s: (scores[s], s))[:2]
    names = {step: f"m-{step:02d}-{scores[step]:.4f}" for step in scores}
    assert top_level(gcs_dir) == {names[s] for s in kept} | RUN_FILES
    for step in set(scores) - set(kept):
        assert ("evicted", names[step]) in kinds
        assert not any(n.startswith(names[step] + "/") for n in listing(gcs_dir))
    for step in kept:
        objects = {n.split("/", 1)[1] for n in listing(gcs_dir) if n.startswith(names[step] + "/")}
        assert {MANIFEST_FILE, "commit_success.txt", "_CHECKPOINT_METADATA"} <= objects

    best = checkpoint.best_checkpoint_path
    assert isinstance(best, epath.Path)
    assert os.fspath(best) == f"{os.fspath(gcs_dir)}/{names[kept[0]]}"
    assert checkpoint.best_score == pytest.approx(scores[kept[0]])
    assert [os.fspath(p) for _, p in checkpoint.saved_checkpoints] == [
        f"{os.fspath(gcs_dir)}/{names[s]}" for s in kept
    ]
    last = checkpoint.last_checkpoint_path
    assert last is not None and os.fspath(last) == f"{os.fspath(gcs_dir)}/{names[3]}"
    checkpoint.manager.close()
    assert LEASE_FILE not in top_level(gcs_dir)

    resumed = make_trainer(epochs=6, seed=7)
    at_start = StateAtStart()
    again = ModelCheckpoint(config())
    resumed.fit(callbacks=[again, at_start], resume=True)
    # The newest checkpoint is the first run's final state, bit for bit.
    assert_trees_equal(at_start.state, first.model)
    assert resumed.initial_epoch == 4 and resumed.epoch == 5
    assert ("restored", names[3]) in history_kinds(gcs_dir)
    decisions = DecisionHistory(gcs_dir).read()
    scores = {d.step: d.score for d in decisions if d.kind == "saved"}
    assert sorted(scores) == list(range(6))
    retained = {
        s for s in scores if not any(d.kind == "evicted" and d.step == s for d in decisions)
    }
    assert top_level(gcs_dir) == {f"m-{s:02d}-{scores[s]:.4f}" for s in retained} | RUN_FILES
    assert 5 in retained and len(retained) == 2
    again.manager.close()


# setup_checkpoint_manager, save_checkpoint, load_checkpoint


def _write_run(directory: epath.Path) -> dict[int, object]:
    """Steps 0..2 with val_loss 0.5, 0.2, 0.4 (step 1 best, step 2 next); their states."""
    manager, path = setup_checkpoint_manager(
        directory, monitor="val_loss", save_top_k=3, filename="ck-{epoch}"
    )
    assert os.fspath(path) == os.fspath(directory)
    model = TinyMLP(nnx.Rngs(0))
    states = {}
    with manager:
        for step, loss in enumerate([0.5, 0.2, 0.4]):
            model.out.kernel[...] = model.out.kernel[...] + 1.0
            assert save_checkpoint(manager, model, step, metrics={"val_loss": loss})
            states[step] = pure(model)
    return states


def _largest_array_object(step_dir: epath.Path) -> str:
    # Array bytes live in OCDBT data files (`.../d/<hash>`); metadata files are elsewhere.
    sizes = {n: s for n, s in listing(step_dir).items() if n.startswith("model/") and "/d/" in n}
    return f"{os.fspath(step_dir).removeprefix('gs://')}/{max(sizes, key=lambda n: sizes[n])}"


def _delete(fs: fsspec.AbstractFileSystem, name: str) -> None:
    fs.rm_file(name)


def _truncate(fs: fsspec.AbstractFileSystem, name: str) -> None:
    data = fs.cat_file(name)
    fs.pipe_file(name, data[: len(data) // 2])


def _overwrite(fs: fsspec.AbstractFileSystem, name: str) -> None:
    # Same size, other bytes: only the checksum can tell.
    data = fs.cat_file(name)
    fs.pipe_file(name, bytes(255 - b for b in data))


@pytest.mark.parametrize("damage", [_delete, _truncate, _overwrite], ids=lambda f: f.__name__[1:])
def test_load_best_falls_back_past_a_damaged_object(
    gcs_dir: epath.Path, damage: Callable[[fsspec.AbstractFileSystem, str], None]
) -> None:
    states = _write_run(gcs_dir)
    fs, _ = fsspec.core.url_to_fs(os.fspath(gcs_dir))
    damage(fs, _largest_array_object(gcs_dir / "ck-1"))
    before = {n: s for n, s in listing(gcs_dir).items() if n != HISTORY_FILE}

    manager, _ = setup_checkpoint_manager(gcs_dir)  # the stored settings are adopted
    with manager:
        assert manager.settings.save_top_k == 3 and manager.best_step() == 1
        model = TinyMLP(nnx.Rngs(5))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert load_checkpoint(manager, model, "best") is model
        with pytest.raises(CorruptCheckpointError, match="ck-1 does not match its manifest"):
            load_checkpoint(manager, TinyMLP(nnx.Rngs(6)), 1)
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptCheckpointWarning)]
    assert len(messages) == 1 and f"{os.fspath(gcs_dir)}/ck-1" in messages[0], messages
    assert_trees_equal(model, states[2])
    # Recovery deletes and changes nothing; the history tells what happened.
    assert {n: s for n, s in listing(gcs_dir).items() if n != HISTORY_FILE} == before
    kinds = history_kinds(gcs_dir)
    assert kinds[-3:] == [
        ("skipped_corrupt", "ck-1"),
        ("restored", "ck-2"),
        ("skipped_corrupt", "ck-1"),
    ]


def test_manager_skips_what_would_not_enter_the_top_k_on_gcs(gcs_dir: epath.Path) -> None:
    tree = {"w": np.arange(4, dtype=np.float32)}
    with MetricCheckpointManager(gcs_dir, save_top_k=1, keep_last=False) as manager:
        assert manager.save(0, args=ocp.args.StandardSave(tree), metrics={"val_loss": 0.3})
        assert not manager.save(1, args=ocp.args.StandardSave(tree), metrics={"val_loss": 0.9})
        assert manager.save(2, args=ocp.args.StandardSave(tree), metrics={"val_loss": 0.1})
        manager.wait_until_finished()
        assert manager.all_steps() == [2]
    assert top_level(gcs_dir) == {"2"} | RUN_FILES
    decisions = [(d.kind, d.step, d.name) for d in DecisionHistory(gcs_dir).read()]
    assert sorted(decisions, key=str) == sorted(
        [("saved", 0, "0"), ("not_saved", 1, None), ("saved", 2, "2"), ("evicted", 0, "0")],
        key=str,
    )


# The command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    # The emulator's settings are in os.environ (tests/conftest.py); the child inherits them.
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "artifex_ckpt", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_ls_and_best_read_a_gcs_run(gcs_dir: epath.Path) -> None:
    _write_run(gcs_dir)
    url = os.fspath(gcs_dir)
    best = _cli("best", url)
    assert best.returncode == 0, best.stderr
    assert best.stdout.strip() == f"{url}/ck-1"

    table = _cli("ls", url)
    assert table.returncode == 0, table.stderr
    objects = listing(gcs_dir)
    rows = {
        cell: [c.strip() for c in line.split("│")]
        for line in table.stdout.splitlines()
        for cell in (c.strip() for c in line.split("│"))
        if cell.startswith("ck-")
    }
    assert set(rows) == {"ck-0", "ck-1", "ck-2"}, table.stdout
    for name, cells in rows.items():
        # Sizes are the store's: the sum of the listed object sizes under the checkpoint.
        size = sum(s for n, s in objects.items() if n.startswith(f"{name}/"))
        assert human_size(size) in cells, (name, cells)


def test_cli_demo_trains_into_a_gcs_directory(gcs_dir: epath.Path) -> None:
    url = os.fspath(gcs_dir)
    demo = _cli("demo", url, "--epochs", "2", "--no-progress")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert ": match" in demo.stdout, demo.stdout[-2000:]
    saved = sorted(name for name in top_level(gcs_dir) if name.startswith("vae-"))
    assert [name[:6] for name in saved] == ["vae-00", "vae-01"]
    assert f"best checkpoint: {url}/vae-" in demo.stdout
    assert LEASE_FILE not in top_level(gcs_dir)


# What opening a run directory costs, and what it cleans


def open_cost(gcs_bucket: Emulator, open_manager: Callable[[], ocp.CheckpointManager]) -> int:
    """Requests to open a manager with cold listing caches, ask its best step, close it."""
    import gcsfs

    for fs in list(gcsfs.GCSFileSystem._cache.values()):
        fs.invalidate_cache()
    gcs_bucket.reset_count()
    with open_manager() as manager:
        assert manager.best_step() == 5
    return gcs_bucket.request_count()


def test_opening_a_writer_costs_about_what_raw_orbax_does(
    gcs_dir: epath.Path, gcs_bucket: Emulator
) -> None:
    # Orbax's own start-up scan would ask each of the 6 checkpoints (and each file beside
    # them) for its commit mark, 2-4 requests apiece; the lease, the settings and the
    # listing of unfinished saves cost a dozen in all, whatever the number of checkpoints.
    fill_json_only(gcs_dir, 6)
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["val_loss"], best_mode="min")
    raw = open_cost(gcs_bucket, lambda: ocp.CheckpointManager(gcs_dir, options=options))
    ours = open_cost(gcs_bucket, lambda: MetricCheckpointManager(gcs_dir))
    assert ours <= raw + 14, (ours, raw)


def test_a_writer_removes_an_uncommitted_save_and_a_reader_leaves_it(
    gcs_dir: epath.Path,
) -> None:
    fill_json_only(gcs_dir, 6)
    # A save cut short by a crash: objects under its final name, no commit mark yet.
    crashed = gcs_dir / "6"
    (crashed / "trainer_state" / "metadata").write_text('{"epoch": 6}')
    (crashed / COMMIT_RECORD).write_text("{}")
    reader = ocp.CheckpointManagerOptions(read_only=True)
    with MetricCheckpointManager(gcs_dir, options=reader) as manager:
        assert manager.all_steps() == [0, 1, 2, 3, 4, 5]
    assert "6" in top_level(gcs_dir)
    with MetricCheckpointManager(gcs_dir) as manager:
        assert manager.all_steps() == [0, 1, 2, 3, 4, 5]
    assert top_level(gcs_dir) == {str(step) for step in range(6)} | RUN_FILES
