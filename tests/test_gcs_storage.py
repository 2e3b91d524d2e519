"""gs:// through a local GCS emulator: the fixture, the path layer, Orbax and our manager.

The emulator ignores generation preconditions, so nothing here relies on them.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

import fsspec
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from artifex_ckpt import MetricCheckpointManager
from artifex_ckpt.checkpointing import load_checkpoint, save_checkpoint
from artifex_ckpt.directory import (
    TrashPurger,
    absolute,
    read_object,
    remove_uncommitted,
    remove_unfinished,
    require_writable,
    tree_size,
    write_atomic,
    write_atomic_text,
)
from artifex_ckpt.errors import ConfigError, CorruptCheckpointError, CorruptCheckpointWarning
from artifex_ckpt.history import HISTORY_FILE, Decision, DecisionHistory, to_json_line
from artifex_ckpt.listing import COMMIT_RECORD, commit_problem
from artifex_ckpt.quarantine import quarantine
from artifex_ckpt.settings import SETTINGS_FILE, RetentionSettings
from tests.conftest import TinyMLP, assert_trees_equal
from tests.gcs_emulator import BUCKET, Emulator

SYNC = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)


def objects_under(path: epath.Path) -> set[str]:
    """Object names under `path`, relative to it, straight from a fresh listing."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(path))
    fs.invalidate_cache()
    return {name[len(root) + 1 :] for name in fs.find(root)}


# The emulator fixture.


def test_each_test_gets_an_empty_prefix_and_objects_round_trip(
    gcs_dir: epath.Path, gcs_bucket: Emulator
) -> None:
    assert os.fspath(gcs_dir).startswith(f"gs://{BUCKET}/")
    assert objects_under(gcs_dir) == set()
    (gcs_dir / "a" / "b.txt").write_text("hello")
    assert (gcs_dir / "a" / "b.txt").read_text() == "hello"
    assert objects_under(gcs_dir) == {"a/b.txt"}


def test_request_counter_counts_and_resets(gcs_dir: epath.Path, gcs_bucket: Emulator) -> None:
    gcs_bucket.reset_count()
    assert gcs_bucket.request_count() == 0
    write_atomic_text(gcs_dir / "x", "1")
    counts = gcs_bucket.request_counts()
    assert counts == {"total": 1, "by_method": {"POST": 1}}


def test_rename_uses_the_patched_move_route(gcs_dir: epath.Path, gcs_bucket: Emulator) -> None:
    # Without the moveTo route gcsfs retries for ~33 s before falling back to copy + delete.
    (gcs_dir / "old").write_text("moved")
    gcs_bucket.reset_count()
    (gcs_dir / "old").rename(gcs_dir / "new")
    assert gcs_bucket.request_counts()["by_method"].get("POST") == 1
    assert objects_under(gcs_dir) == {"new"}
    assert (gcs_dir / "new").read_text() == "moved"


def test_reads_carry_a_generation_for_conditional_writes(gcs_dir: epath.Path) -> None:
    # OCDBT updates its manifest by read, then write-if-unchanged; the patched download
    # route reports the generation that the conditional write needs.
    import tensorstore as ts

    bucket, _, prefix = os.fspath(gcs_dir).removeprefix("gs://").partition("/")
    store = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": f"{prefix}/"}).result()
    store.write("manifest", b"v1").result()
    read = store.read("manifest").result()
    store.write("manifest", b"v2", if_equal=read.stamp.generation).result()
    assert store.read("manifest").result().value == b"v2"


# absolute()


def test_absolute_keeps_object_store_urls() -> None:
    assert os.fspath(absolute("gs://bucket/run/")) == "gs://bucket/run"
    assert os.fspath(absolute(epath.Path("gs://bucket/run"))) == "gs://bucket/run"
    assert os.fspath(absolute("GS://bucket/run")) == "gs://bucket/run"
    assert os.fspath(absolute("s3://bucket/run")) == "s3://bucket/run"


def test_absolute_expands_home_and_makes_local_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert os.fspath(absolute("~/runs")) == str(tmp_path / "runs")
    assert os.fspath(absolute(Path("~/runs"))) == str(tmp_path / "runs")
    assert os.fspath(absolute("runs")) == str(tmp_path / "runs")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "is empty"),
        ("runs\0x", "NUL"),
        ("weird://x", "scheme 'weird://'"),
        ("file:///tmp/x", "scheme 'file://'"),
        ("/tmp/a://b", "not a scheme"),
        ("gs://", "names no bucket"),
        ("gs:///x", "names no bucket"),
        (b"/tmp/x", "not a path"),
        (3, "not a path"),
    ],
)
def test_absolute_rejects_what_is_no_directory(value: object, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        absolute(value)
    assert repr(value) in str(info.value)
    assert "gs://bucket/prefix" in str(info.value)


# require_writable()


def test_writable_probe_costs_two_requests_and_leaves_nothing(
    gcs_dir: epath.Path, gcs_bucket: Emulator
) -> None:
    gcs_bucket.reset_count()
    require_writable(gcs_dir)
    assert gcs_bucket.request_count() == 2
    assert objects_under(gcs_dir) == set()


def test_missing_bucket_is_not_writable(gcs_bucket: Emulator) -> None:
    directory = epath.Path(f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/run")
    with pytest.raises(ConfigError, match="is not writable") as info:
        require_writable(directory)
    assert os.fspath(directory) in str(info.value)


def test_local_file_in_the_way_is_not_writable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        require_writable(epath.Path(tmp_path / "file" / "run"))


# tree_size()


def test_tree_size_on_gcs_is_one_listing(gcs_dir: epath.Path, gcs_bucket: Emulator) -> None:
    (gcs_dir / "1" / "a").write_bytes(b"x" * 5)
    (gcs_dir / "1" / "deep" / "b").write_bytes(b"x" * 7)
    (gcs_dir / "2" / "c").write_bytes(b"x" * 11)
    gcs_bucket.reset_count()
    assert tree_size(gcs_dir) == 23
    assert gcs_bucket.request_count() == 1
    assert tree_size(gcs_dir / "1") == 12
    assert tree_size(gcs_dir / "2" / "c") == 11
    assert tree_size(gcs_dir / "absent") == 0


def test_tree_size_local_counts_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "a").write_bytes(b"x" * 5)
    (tmp_path / "d" / "e" / "b").write_bytes(b"x" * 7)
    (tmp_path / "outside").write_bytes(b"x" * 1000)
    (tmp_path / "d" / "link").symlink_to(tmp_path / "outside")
    os.mkfifo(tmp_path / "d" / "fifo")
    sizes: list[int] = []
    # Opening the FIFO would block forever; a thread lets the test fail instead of hang.
    worker = threading.Thread(target=lambda: sizes.append(tree_size(epath.Path(tmp_path / "d"))))
    worker.start()
    worker.join(timeout=10)
    assert sizes == [12]
    assert tree_size(epath.Path(tmp_path / "d" / "a")) == 5
    assert tree_size(epath.Path(tmp_path / "absent")) == 0


# write_atomic_text()


def test_write_atomic_text_on_gcs_is_one_request(gcs_dir: epath.Path, gcs_bucket: Emulator) -> None:
    target = gcs_dir / "settings.json"
    write_atomic_text(target, "old")
    gcs_bucket.reset_count()
    write_atomic_text(target, "new")
    assert gcs_bucket.request_count() == 1
    assert target.read_text() == "new"
    assert objects_under(gcs_dir) == {"settings.json"}


def test_write_atomic_text_locally_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = epath.Path(tmp_path / "settings.json")
    write_atomic_text(target, "old")
    write_atomic_text(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["settings.json"]


def test_write_atomic_text_failing_rename_keeps_old_and_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "settings.json").mkdir()  # a directory cannot be replaced by a file
    with pytest.raises(OSError):
        write_atomic_text(epath.Path(tmp_path / "settings.json"), "new")
    assert os.listdir(tmp_path) == ["settings.json"]
    assert (tmp_path / "settings.json").is_dir()


# remove_unfinished() and the trash


def test_remove_unfinished_on_gcs_removes_suffixed_prefixes_and_objects(
    gcs_dir: epath.Path,
) -> None:
    (gcs_dir / "3.orbax-checkpoint-tmp-17" / "d" / "x").write_text("partial")
    (gcs_dir / "4.orbax-checkpoint-tmp-18").write_text("stray object")
    (gcs_dir / "2" / "commit_success.txt").write_text("ok")
    remove_unfinished(gcs_dir)
    assert objects_under(gcs_dir) == {"2/commit_success.txt"}


def test_trash_purger_on_gcs_sends_no_request(gcs_dir: epath.Path, gcs_bucket: Emulator) -> None:
    purger = TrashPurger(gcs_dir)
    gcs_bucket.reset_count()
    purger.finish()
    assert gcs_bucket.request_count() == 0


# Orbax and our manager on gs://


def test_plain_orbax_saves_and_restores_on_gcs(gcs_dir: epath.Path) -> None:
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
    with ocp.CheckpointManager(gcs_dir, options=SYNC) as manager:
        manager.save(0, args=ocp.args.StandardSave(tree))
    with ocp.CheckpointManager(gcs_dir) as manager:
        assert manager.all_steps() == [0]
        restored = manager.restore(0, args=ocp.args.StandardRestore(tree))
    assert_trees_equal(restored, tree)
    assert "0/commit_success.txt" in objects_under(gcs_dir)


def test_metric_manager_keeps_best_and_last_on_gcs(gcs_dir: epath.Path, model: TinyMLP) -> None:
    losses = [0.5, 0.3, 0.4]
    with MetricCheckpointManager(gcs_dir, monitor="val_loss", save_top_k=1) as manager:
        for step, loss in enumerate(losses):
            model.out.kernel[...] = model.out.kernel[...] + 1.0
            assert save_checkpoint(manager, model, step, metrics={"val_loss": loss})
            if step == 1:
                best_state = TinyMLP(nnx.Rngs(1))
                load_checkpoint(manager, best_state, 1)
        manager.wait_until_finished()
        assert manager.best_step() == 1
        assert sorted(manager.all_steps()) == [1, 2]
    top = {name.split("/", 1)[0] for name in objects_under(gcs_dir)}
    assert "0" not in top
    assert {"1", "2"} <= top
    assert not any(name.startswith(".") for name in top)
    with MetricCheckpointManager(gcs_dir) as reopened:
        assert reopened.best_step() == 1
        assert reopened.score(1) == pytest.approx(0.3)
        restored = load_checkpoint(reopened, TinyMLP(nnx.Rngs(2)), "best")
    assert_trees_equal(restored, best_state)


# Requests per read and write of the manager's own small files


def commit_record(**fields: object) -> str:
    """A `_CHECKPOINT_METADATA` as Orbax writes it, with `fields` over its defaults."""
    record: dict[str, object] = {"item_handlers": None, "metrics": {}, "custom_metadata": {}}
    record.update(fields)
    return json.dumps(record)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (commit_record(commit_timestamp_nsecs=1_700_000_000_000_000_000), None),
        (None, "it has no commit record"),
        (commit_record(commit_timestamp_nsecs=None), "it has no commit record"),
        ("{not json", "it has no commit record"),
        ("[1, 2]", "cannot be read (ValueError"),
        (commit_record(commit_timestamp_nsecs="x"), "cannot be read ("),
        (commit_record(commit_timestamp_nsecs=1, custom_metadata=[]), "cannot be read ("),
    ],
)
def test_commit_check_on_gcs_is_one_request_and_agrees_with_the_local_one(
    gcs_dir: epath.Path,
    gcs_bucket: Emulator,
    tmp_path: Path,
    content: str | None,
    problem: str | None,
) -> None:
    local = epath.Path(tmp_path / "3")
    local.mkdir()
    if content is not None:
        (local / COMMIT_RECORD).write_text(content)
        (gcs_dir / "3" / COMMIT_RECORD).write_text(content)
    gcs_bucket.reset_count()
    found = commit_problem(gcs_dir / "3", 3)
    assert gcs_bucket.request_count() == 1
    expected = commit_problem(local, 3)
    assert found == expected  # the same verdict, and the same words, as Orbax's reader
    assert found is None if problem is None else found is not None and problem in found


def test_settings_load_on_gcs_is_one_request(gcs_dir: epath.Path, gcs_bucket: Emulator) -> None:
    gcs_bucket.reset_count()
    assert RetentionSettings.load(gcs_dir) is None
    assert gcs_bucket.request_count() == 1
    stored = RetentionSettings(monitor="val_acc", mode="max", save_top_k=2)
    write_atomic_text(gcs_dir / SETTINGS_FILE, stored.to_json())
    gcs_bucket.reset_count()
    assert RetentionSettings.load(gcs_dir) == stored
    assert gcs_bucket.request_count() == 1
    write_atomic_text(gcs_dir / SETTINGS_FILE, stored.to_json().replace("max", "min"))
    with pytest.raises(ConfigError, match="do not match their checksum"):
        RetentionSettings.load(gcs_dir)
    write_atomic_text(gcs_dir / SETTINGS_FILE, "{half")
    with pytest.raises(ConfigError, match=rf"{SETTINGS_FILE} cannot be read"):
        RetentionSettings.load(gcs_dir)


def test_history_on_gcs_reads_once_and_writes_once_per_flush(
    gcs_dir: epath.Path, gcs_bucket: Emulator
) -> None:
    write_atomic_text(gcs_dir / HISTORY_FILE, to_json_line(Decision.restored(0, "0", by="resume")))
    history = DecisionHistory(gcs_dir, flush_interval_s=3600)
    gcs_bucket.reset_count()
    history.append(Decision.saved(1, "1", 0.4, rank=1, k=3))
    assert gcs_bucket.request_count() == 1  # the stored history, read once
    history.flush()
    assert gcs_bucket.request_count() == 2  # one upload
    history.append(Decision.saved(2, "2", 0.3, rank=1, k=3))
    history.flush()
    assert gcs_bucket.request_count() == 3
    assert [d.step for d in DecisionHistory(gcs_dir).read()] == [0, 1, 2]


def test_read_object_is_one_request_and_refuses_local_paths(
    gcs_dir: epath.Path, gcs_bucket: Emulator, tmp_path: Path
) -> None:
    write_atomic(gcs_dir / "a", b"\x00bytes")
    gcs_bucket.reset_count()
    assert read_object(gcs_dir / "a") == b"\x00bytes"
    assert read_object(gcs_dir / "absent") is None
    assert gcs_bucket.request_count() == 2
    with pytest.raises(ValueError, match="not an object-store URL"):
        read_object(epath.Path(tmp_path / "a"))


# remove_uncommitted()


def _numeric(name: str) -> bool:
    return name.isdigit()


def test_remove_uncommitted_asks_only_what_the_listing_did_not_find_committed(
    gcs_dir: epath.Path, gcs_bucket: Emulator
) -> None:
    for name in ("1", "2"):
        (gcs_dir / name / "commit_success.txt").write_text("ok")
        (gcs_dir / name / "d" / "x").write_text("data")
    (gcs_dir / "3" / "d" / "x").write_text("a crashed save")  # no commit mark
    (gcs_dir / "late" / "commit_success.txt").write_text("ok")  # not named like a step
    (gcs_dir / SETTINGS_FILE).write_text("{}")
    (gcs_dir / ".artifex-quarantine" / "0" / "d" / "x").write_text("moved aside")
    (gcs_dir / "tensorboard" / "events").write_text("the user's own")
    assert remove_uncommitted(gcs_dir, {"1", "2"}, _numeric) == ["3"]
    assert objects_under(gcs_dir) == {
        "1/commit_success.txt",
        "1/d/x",
        "2/commit_success.txt",
        "2/d/x",
        "late/commit_success.txt",
        ".artifex-quarantine/0/d/x",
        "tensorboard/events",
        SETTINGS_FILE,
    }
    (gcs_dir / "4" / "commit_success.txt").write_text("ok")  # committed, not listed
    gcs_bucket.reset_count()
    assert remove_uncommitted(gcs_dir, {"1", "2", "4"}, _numeric) == []
    assert gcs_bucket.request_count() == 1  # one listing; Orbax's scan asks every entry
    gcs_bucket.reset_count()
    assert remove_uncommitted(gcs_dir, {"1", "2"}, _numeric) == []
    assert gcs_bucket.request_count() == 2  # and one look at the one prefix not known


def test_remove_uncommitted_is_a_no_op_locally_and_on_an_absent_prefix(
    gcs_dir: epath.Path, tmp_path: Path
) -> None:
    (tmp_path / "3").mkdir()
    assert remove_uncommitted(epath.Path(tmp_path), set(), _numeric) == []
    assert (tmp_path / "3").is_dir()
    assert remove_uncommitted(gcs_dir / "absent", set(), _numeric) == []


# A writer on a bucket it cannot write


def test_a_writer_on_a_missing_bucket_is_refused_by_its_lease(gcs_bucket: Emulator) -> None:
    directory = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    with pytest.raises(ConfigError, match="is not writable: creating the lease file") as info:
        MetricCheckpointManager(directory)
    assert directory in str(info.value)


def test_the_emulator_keeps_binary_uploads_byte_for_byte(gcs_dir: epath.Path) -> None:
    # Its own multipart parser dropped a final carriage return (an OCDBT manifest ends in
    # one now and then), so checksums of uploaded copies differed from the local files.
    fs, root = fsspec.core.url_to_fs(os.fspath(gcs_dir / "blob"))
    for data in (b"ends in CR\r", b"\r\n\r\n", b"\n", bytes(range(256)) * 3 + b"\r"):
        fs.pipe_file(root, data)
        assert fs.cat_file(root) == data


def test_unreadable_metrics_on_gcs_fail_the_intact_check_in_one_request(
    gcs_dir: epath.Path, gcs_bucket: Emulator
) -> None:
    with MetricCheckpointManager(gcs_dir, filename="m-{epoch}-{val_loss:.2f}") as manager:
        for step, loss in enumerate((0.3, 0.5)):
            state = {"w": np.full(3, step, np.float32)}
            manager.save(step, args=ocp.args.StandardSave(state), metrics={"val_loss": loss})
    fs, root = fsspec.core.url_to_fs(os.fspath(gcs_dir / "m-0-0.30" / "metrics" / "metrics"))
    fs.pipe_file(root, b'{"val_loss": ')
    reader = ocp.CheckpointManagerOptions(read_only=True)
    with (
        pytest.warns(CorruptCheckpointWarning, match="read from its name"),
        MetricCheckpointManager(gcs_dir, options=reader) as manager,
    ):
        assert manager.best_step() == 0
        with pytest.raises(CorruptCheckpointError, match="unreadable metrics"):
            manager.check_intact(0)
        gcs_bucket.reset_count()
        manager.check_intact(1)
        # The commit record, the metrics and the manifest's listing and object.
        assert gcs_bucket.request_count() <= 4


def test_a_writer_opening_on_gcs_leaves_the_quarantine_and_other_prefixes_alone(
    gcs_dir: epath.Path,
) -> None:
    with MetricCheckpointManager(gcs_dir, filename="m-{epoch}", save_top_k=-1) as manager:
        for step in range(2):
            state = {"w": np.full(3, step, np.float32)}
            manager.save(step, args=ocp.args.StandardSave(state), metrics={"val_loss": 0.1})
    moved = quarantine(gcs_dir, "m-0", reason="test")
    (gcs_dir / "tensorboard" / "events").write_text("the user's own")
    (gcs_dir / "m-7" / "d" / "x").write_text("a crashed save")  # named like a step, no mark
    before = objects_under(moved)
    with MetricCheckpointManager(gcs_dir) as manager:
        assert manager.all_steps() == [1]
    assert objects_under(moved) == before and before
    assert (gcs_dir / "tensorboard" / "events").read_text() == "the user's own"
    assert not any(name.startswith("m-7/") for name in objects_under(gcs_dir))
