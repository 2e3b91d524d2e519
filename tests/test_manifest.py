"""The manifest of a real Orbax checkpoint, and the damage `verify` finds in it, on a local
disk and in a bucket of the local GCS emulator (`gs://`)."""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import fsspec
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
    _Listed,
    _listed_entry,
    _listed_problem,
    _listing,
    read_manifest,
    verify,
    write_manifest,
)
from tests.conftest import TinyMLP
from tests.gcs_emulator import Emulator

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


def test_check_carries_the_manifest_it_compared_with(step_dir: Path) -> None:
    # A caller learns which files a check covered without reading the manifest again.
    manifest = read_manifest(step_dir)
    assert manifest is not None
    for deep in (False, True):
        assert verify(step_dir, deep=deep).manifest == manifest
    (step_dir / "model" / "_METADATA").unlink()
    assert verify(step_dir, deep=False).manifest == manifest
    (step_dir / MANIFEST_FILE).unlink()
    assert verify(step_dir).manifest is None


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
    (step / "model" / "dirlink").symlink_to(tmp_path)  # listed, never walked into
    manifest = write_manifest(step)  # would block forever if it opened the FIFO
    recorded = {entry.path for entry in manifest.entries}
    assert {"pipe", "link", "model/dirlink"}.isdisjoint(recorded)
    assert not any(path.startswith("model/dirlink/") for path in recorded)
    check = verify(step)
    assert check.status == "ok"
    assert check.unlisted == ("link", "model/dirlink", "pipe")


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


# On gs:// the checkpoint saved above is uploaded object by object; the damage is done
# by rewriting or deleting objects, which is all a bucket allows.


def _store(path: epath.Path) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(os.fspath(path))
    return fs, str(root).rstrip("/")


def _upload(local: Path, remote: epath.Path) -> None:
    fs, root = _store(remote)
    fs.pipe({f"{root}/{relative}": path.read_bytes() for relative, path in _files(local).items()})


@pytest.fixture
def remote_step(run: Path, gcs_dir: epath.Path) -> epath.Path:
    """The saved checkpoint copied into the bucket, with no manifest yet."""
    remote = gcs_dir / str(STEP)
    _upload(run / str(STEP), remote)
    return remote


def _rewrite(remote: epath.Path, relative: str, data: bytes) -> None:
    fs, root = _store(remote)
    fs.pipe_file(f"{root}/{relative}", data)


def _requests(emulator: Emulator, call: Callable[[], object]) -> int:
    emulator.reset_count()
    call()
    return emulator.request_count()


def test_gcs_manifest_is_the_local_one_and_costs_a_listing_and_a_write(
    run: Path, remote_step: epath.Path, gcs_bucket: Emulator
) -> None:
    local = run / str(STEP)
    objects = len(_files(local))
    assert objects >= 15  # enough that a request per object would show
    requests = _requests(gcs_bucket, lambda: write_manifest(remote_step))
    assert requests <= 3, f"write_manifest made {requests} requests for {objects} objects"
    # The very bytes of the local manifest: a run copied either way still verifies.
    assert (remote_step / MANIFEST_FILE).read_bytes() == _manifest_bytes(local)
    assert read_manifest(remote_step) == read_manifest(local)
    for deep in (False, True):
        requests = _requests(gcs_bucket, functools.partial(verify, remote_step, deep=deep))
        assert requests <= 3, f"verify(deep={deep}) made {requests} requests"
        check = verify(remote_step, deep=deep)
        assert (check.status, check.problems, check.unlisted) == ("ok", (), ())
        assert check.directory == os.fspath(remote_step)
        assert check.manifest == read_manifest(local)


def _manifest_bytes(local: Path) -> bytes:
    write_manifest(local)
    return (local / MANIFEST_FILE).read_bytes()


def test_gcs_run_copied_to_disk_still_verifies(remote_step: epath.Path, tmp_path: Path) -> None:
    write_manifest(remote_step)
    fs, root = _store(remote_step)
    copy = tmp_path / "copy"
    for name in fs.find(root):
        target = copy / name[len(root) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(name))
    assert (copy / MANIFEST_FILE).exists()
    check = verify(copy, deep=True)
    assert (check.status, check.problems, check.unlisted) == ("ok", (), ())


def test_gcs_deleted_object_is_missing(remote_step: epath.Path) -> None:
    write_manifest(remote_step)
    size = len((remote_step / "model" / "_METADATA").read_bytes())
    (remote_step / "model" / "_METADATA").unlink()
    for deep in (False, True):
        check = verify(remote_step, deep=deep)
        assert check.status == "mismatch"
        assert check.problems == (f"model/_METADATA: missing (expected {size} bytes)",)


def test_gcs_object_rewritten_with_same_size_is_caught_by_deep_verify_only(
    run: Path, remote_step: epath.Path
) -> None:
    manifest = write_manifest(remote_step)
    data_file, offset = _kernel_file(run / str(STEP))
    relative = data_file.relative_to(run / str(STEP)).as_posix()
    damaged = bytearray(data_file.read_bytes())
    damaged[offset + 100] ^= 1 << 3
    _rewrite(remote_step, relative, bytes(damaged))

    assert verify(remote_step, deep=False).status == "ok"
    check = verify(remote_step, deep=True)
    expected = next(e for e in manifest.entries if e.path == relative)
    assert check.status == "mismatch"
    assert check.problems == (
        f"{relative}: checksum differs: expected crc32c {expected.crc32c_hex}, "
        f"found {google_crc32c.value(bytes(damaged)):08x}",
    )


def test_gcs_truncated_object_is_a_size_mismatch(remote_step: epath.Path) -> None:
    write_manifest(remote_step)
    metadata = remote_step / "model" / "_METADATA"
    data = metadata.read_bytes()
    _rewrite(remote_step, "model/_METADATA", data[: len(data) // 2])
    for deep in (False, True):
        check = verify(remote_step, deep=deep)
        assert check.status == "mismatch"
        assert check.problems == (
            f"model/_METADATA: size differs: expected {len(data)} bytes, found {len(data) // 2}",
        )


def test_gcs_extra_object_is_listed_but_no_problem(remote_step: epath.Path) -> None:
    write_manifest(remote_step)
    _rewrite(remote_step, "model/notes.txt", b"added later")
    check = verify(remote_step)
    assert (check.status, check.unlisted) == ("ok", ("model/notes.txt",))


def test_gcs_recorded_object_that_became_a_prefix_is_reported(remote_step: epath.Path) -> None:
    write_manifest(remote_step)
    (remote_step / "_CHECKPOINT_METADATA").unlink()
    _rewrite(remote_step, "_CHECKPOINT_METADATA/inner", b"{}")
    check = verify(remote_step, deep=False)
    assert check.problems == ("_CHECKPOINT_METADATA: is a directory now, not a regular file",)


def test_gcs_damaged_or_absent_manifest(remote_step: epath.Path, gcs_bucket: Emulator) -> None:
    requests = _requests(gcs_bucket, lambda: verify(remote_step))
    assert verify(remote_step).status == "unverified"
    assert requests == 1  # the listing shows there is no manifest to read
    assert read_manifest(remote_step) is None
    write_manifest(remote_step)
    text = (remote_step / MANIFEST_FILE).read_bytes()
    _rewrite(remote_step, MANIFEST_FILE, text.replace(b'"size": ', b'"size": 1', 1))
    check = verify(remote_step)
    assert check.status == "mismatch"
    assert "does not match its checksum" in check.problems[0]
    with pytest.raises(DamagedManifestError, match=MANIFEST_FILE):
        read_manifest(remote_step)


def test_gcs_step_that_does_not_exist_is_refused(gcs_dir: epath.Path) -> None:
    _rewrite(gcs_dir, "file", b"an object, not a prefix")
    for missing in (gcs_dir / "does-not-exist", gcs_dir / "file"):
        with pytest.raises(CheckpointNotFoundError, match=str(missing.name)):
            verify(missing)
        with pytest.raises(CheckpointNotFoundError, match=str(missing.name)):
            write_manifest(missing)


def test_object_listed_without_a_checksum_is_downloaded(remote_step: epath.Path) -> None:
    """What happens on a store whose listing has no CRC-32C (S3): the bytes are read."""
    fs, listed = _listing(remote_step)
    stripped = {rel: _Listed(found.name, found.size, None) for rel, found in listed.items()}
    assert all(found.crc32c is not None for found in listed.values())  # GCS lists them
    for relative in listed:
        entry = _listed_entry(fs, relative, stripped[relative])
        assert entry == _listed_entry(fs, relative, listed[relative])
    relative = "model/_METADATA"
    recorded = _listed_entry(fs, relative, listed[relative])
    data = bytearray(fs.cat_file(stripped[relative].name))
    data[0] ^= 1
    _rewrite(remote_step, relative, bytes(data))
    problem = _listed_problem(fs, recorded, stripped[relative], set(), deep=True)
    assert problem == (
        f"{relative}: checksum differs: expected crc32c {recorded.crc32c_hex}, "
        f"found {google_crc32c.value(bytes(data)):08x}"
    )
    assert _listed_problem(fs, recorded, stripped[relative], set(), deep=False) is None
