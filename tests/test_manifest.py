"""The manifest of a real Orbax checkpoint, and the damage `verify` finds in it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from artifex_ckpt.errors import CheckpointNotFoundError
from artifex_ckpt.handlers import default_handler_registry
from artifex_ckpt.manifest import (
    MANIFEST_FILE,
    DamagedManifestError,
    Manifest,
    ManifestEntry,
    read_manifest,
    verify,
    write_manifest,
)
from tests.conftest import TinyMLP

STEP = 3
# 64 inputs make the first kernel 2 KiB: too big to be inlined in an OCDBT b-tree node,
# so its bytes lie verbatim in a data file under model/ocdbt.process_0/d/.
DIN = 64


def _model() -> TinyMLP:
    return TinyMLP(nnx.Rngs(0), din=DIN)


def _state() -> dict:
    return nnx.to_pure_dict(nnx.state(_model()))


def _restore_model(run: Path) -> dict:
    with ocp.CheckpointManager(run, handler_registry=default_handler_registry()) as manager:
        args = ocp.args.Composite(model=ocp.args.StandardRestore(_state()))
        return manager.restore(STEP, args=args)["model"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One committed checkpoint (model, optimizer, trainer state, metrics), saved once."""
    run = tmp_path_factory.mktemp("saved") / "run"
    model = _model()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    args = ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
        optimizer=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
        trainer_state=ocp.args.JsonSave({"epoch": STEP}),
    )
    with ocp.CheckpointManager(run, handler_registry=default_handler_registry()) as manager:
        manager.save(STEP, args=args, metrics={"val_loss": 0.5})
        manager.wait_until_finished()
    return run


@pytest.fixture
def run(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved run, free to damage."""
    return Path(shutil.copytree(saved, tmp_path / "run"))


@pytest.fixture
def step_dir(run: Path) -> Path:
    step = run / str(STEP)
    write_manifest(step)
    return step


def _files(step: Path) -> dict[str, Path]:
    """Every file under `step` by its relative path, the manifest left out."""
    found = {p.relative_to(step).as_posix(): p for p in step.rglob("*") if not p.is_dir()}
    found.pop(MANIFEST_FILE, None)
    return found


def _kernel_file(step: Path) -> tuple[Path, int]:
    """The OCDBT data file holding the first kernel's bytes, and where they start."""
    kernel = np.asarray(_state()["dense"]["kernel"]).tobytes()
    for path in sorted((step / "model" / "ocdbt.process_0" / "d").iterdir()):
        offset = path.read_bytes().find(kernel)
        if offset >= 0:
            return path, offset
    raise AssertionError(f"no data file under {step} holds the kernel's bytes")


def _flip(path: Path, position: int, bit: int = 0) -> None:
    with open(path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)[0]
        file.seek(position)
        file.write(bytes([byte ^ (1 << bit)]))


def test_manifest_lists_every_file_with_size_and_crc32c(step_dir: Path) -> None:
    manifest = read_manifest(step_dir)
    assert manifest is not None
    files = _files(step_dir)
    assert [entry.path for entry in manifest.entries] == sorted(files)
    assert {"_CHECKPOINT_METADATA", "model/_METADATA", "trainer_state/metadata"} <= set(files)
    for entry in manifest.entries:
        data = files[entry.path].read_bytes()
        assert entry.size == len(data)
        assert entry.crc32c == google_crc32c.value(data)
    assert manifest.total_bytes == sum(p.stat().st_size for p in files.values())
    assert not (step_dir / f"{MANIFEST_FILE}.tmp").exists()


def test_intact_checkpoint_verifies_ok(step_dir: Path) -> None:
    for deep in (False, True):
        check = verify(step_dir, deep=deep)
        assert (check.status, check.problems, check.unlisted) == ("ok", (), ())
        assert check.ok and check.directory == os.fspath(step_dir)


def test_rewritten_manifest_does_not_list_itself(step_dir: Path) -> None:
    first = read_manifest(step_dir)
    assert write_manifest(step_dir) == first
    assert MANIFEST_FILE not in {entry.path for entry in first.entries}


def test_leftover_of_a_crashed_manifest_write_is_neither_listed_nor_kept(run: Path) -> None:
    step = run / str(STEP)
    (step / f"{MANIFEST_FILE}.tmp").write_text('{"half": ')
    manifest = write_manifest(step)
    assert f"{MANIFEST_FILE}.tmp" not in {entry.path for entry in manifest.entries}
    assert not (step / f"{MANIFEST_FILE}.tmp").exists()
    assert verify(step).ok


def test_bit_flip_in_array_data_restores_silently_and_only_deep_verify_sees_it(
    run: Path, step_dir: Path
) -> None:
    data_file, offset = _kernel_file(step_dir)
    _flip(data_file, offset + 100, bit=3)
    # The damage Orbax does not see: the checkpoint restores, with one wrong weight.
    restored = jax.tree.map(np.asarray, _restore_model(run))
    differing = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(_state()), strict=True)
    ]
    assert sum(differing) == 1

    assert verify(step_dir, deep=False).status == "ok"
    check = verify(step_dir, deep=True)
    relative = data_file.relative_to(step_dir).as_posix()
    assert check.status == "mismatch"
    assert len(check.problems) == 1
    assert check.problems[0].startswith(f"{relative}: checksum differs: expected crc32c ")


def test_truncated_file_is_a_size_mismatch_without_reading(step_dir: Path) -> None:
    metadata = step_dir / "model" / "_METADATA"
    size = metadata.stat().st_size
    os.truncate(metadata, size // 2)
    for deep in (False, True):
        check = verify(step_dir, deep=deep)
        assert check.status == "mismatch"
        assert check.problems == (
            f"model/_METADATA: size differs: expected {size} bytes, found {size // 2}",
        )


def test_deleted_file_is_missing(step_dir: Path) -> None:
    data_file, _ = _kernel_file(step_dir)
    size = data_file.stat().st_size
    data_file.unlink()
    relative = data_file.relative_to(step_dir).as_posix()
    check = verify(step_dir, deep=False)
    assert check.status == "mismatch"
    assert check.problems == (f"{relative}: missing (expected {size} bytes)",)


def test_garbled_manifest_is_reported_as_damaged(step_dir: Path) -> None:
    path = step_dir / MANIFEST_FILE
    text = path.read_bytes()
    path.write_bytes(text[:40] + b"\x00garbage\xff" + text[60:])
    check = verify(step_dir)
    assert check.status == "mismatch"
    assert len(check.problems) == 1
    assert check.problems[0].startswith(f"{MANIFEST_FILE}: damaged manifest: it is not JSON")
    with pytest.raises(DamagedManifestError, match=f"manifest {path} is damaged"):
        read_manifest(step_dir)


def test_edited_manifest_fails_its_own_checksum(step_dir: Path) -> None:
    """A valid JSON manifest whose entry was changed (a size "fixed" by hand)."""
    path = step_dir / MANIFEST_FILE
    stored = json.loads(path.read_text())
    stored["files"][0]["size"] += 1
    path.write_text(json.dumps(stored))
    check = verify(step_dir, deep=False)
    assert check.status == "mismatch"
    assert "does not match its checksum" in check.problems[0]


def test_checkpoint_without_manifest_is_unverified(run: Path) -> None:
    step = run / str(STEP)
    assert read_manifest(step) is None
    check = verify(step)
    assert (check.status, check.problems, check.ok) == ("unverified", (), False)


def test_extra_file_is_listed_but_no_problem(step_dir: Path) -> None:
    (step_dir / "model" / "notes.txt").write_text("added later")
    check = verify(step_dir)
    assert check.status == "ok"
    assert check.unlisted == ("model/notes.txt",)


def test_fifo_and_symlink_are_not_recorded_or_opened(run: Path, tmp_path: Path) -> None:
    step = run / str(STEP)
    os.mkfifo(step / "pipe")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not part of the checkpoint")
    (step / "link").symlink_to(outside)
    manifest = write_manifest(step)  # would block forever if it opened the FIFO
    assert {"pipe", "link"}.isdisjoint(entry.path for entry in manifest.entries)
    check = verify(step)
    assert check.status == "ok"
    assert check.unlisted == ("link", "pipe")


def test_recorded_file_replaced_by_fifo_or_symlink_is_reported_not_opened(
    step_dir: Path,
) -> None:
    metadata = step_dir / "_CHECKPOINT_METADATA"
    copy = step_dir.parent / "metadata-copy"
    shutil.copyfile(metadata, copy)
    metadata.unlink()
    os.mkfifo(metadata)
    data_file, _ = _kernel_file(step_dir)
    relative = data_file.relative_to(step_dir).as_posix()
    target = step_dir.parent / "data-copy"
    shutil.copyfile(data_file, target)
    data_file.unlink()
    data_file.symlink_to(target)  # same bytes, but no longer the checkpoint's own file
    check = verify(step_dir, deep=True)
    assert check.status == "mismatch"
    assert set(check.problems) == {
        "_CHECKPOINT_METADATA: is a FIFO now, not a regular file",
        f"{relative}: is a symlink now, not a regular file",
    }


def test_verify_refuses_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does-not-exist"):
        verify(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointNotFoundError, match="does-not-exist"):
        write_manifest(tmp_path / "does-not-exist")


def test_manifest_round_trips_through_json() -> None:
    manifest = Manifest((ManifestEntry("a/b", 3, 0xDEADBEEF), ManifestEntry("c", 0, 0)))
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.entries[0].crc32c_hex == "deadbeef"


@settings(max_examples=25)
@given(data=st.data())
def test_any_single_bit_flip_is_detected_by_deep_verify(
    step_dir: Path, data: st.DataObject
) -> None:
    files = _files(step_dir)
    files[MANIFEST_FILE] = step_dir / MANIFEST_FILE
    relative = data.draw(st.sampled_from(sorted(files)), label="file")
    path = files[relative]
    position = data.draw(st.integers(0, path.stat().st_size - 1), label="position")
    bit = data.draw(st.integers(0, 7), label="bit")
    _flip(path, position, bit)
    try:
        check = verify(step_dir, deep=True)
    finally:
        _flip(path, position, bit)
    assert check.status == "mismatch"
    expected = "damaged manifest" if relative == MANIFEST_FILE else "checksum differs"
    assert check.problems[0].startswith(f"{relative}: {expected}")
    assert verify(step_dir).ok  # the flip undone, nothing else was touched


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[epath.Path]:
    """A prefix in a bucket of a local GCS emulator, reached as gs:// through gcsfs."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://localhost:{port}")
    server = create_server("localhost", port, in_memory=True, default_bucket="artifex")
    server.start()
    try:
        yield epath.Path(f"gs://artifex/run-{port}")
    finally:
        server.stop()
        import gcsfs

        with contextlib.suppress(Exception):
            gcsfs.GCSFileSystem.clear_instance_cache()


def test_manifest_on_an_object_store(run: Path, bucket: epath.Path) -> None:
    local = run / str(STEP)
    remote = bucket / str(STEP)
    for relative, path in _files(local).items():
        (remote / relative).write_bytes(path.read_bytes())
    manifest = write_manifest(remote)
    assert manifest == write_manifest(local)
    assert read_manifest(remote) == manifest
    assert verify(remote).status == "ok"

    data_file, offset = _kernel_file(local)
    relative = data_file.relative_to(local).as_posix()
    damaged = bytearray(data_file.read_bytes())
    damaged[offset] ^= 1
    (remote / relative).write_bytes(bytes(damaged))
    (remote / "model" / "_METADATA").unlink()
    check = verify(remote)
    assert check.status == "mismatch"
    assert sorted(check.problems)[0].startswith("model/_METADATA: missing")
    assert sorted(check.problems)[1].startswith(f"{relative}: checksum differs")
