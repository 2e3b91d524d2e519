"""The one safe reader of local files the library shares: what it refuses, and how."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import pickle
from pathlib import Path

import pytest

from artifex_ckpt.directory import NotRegularFileError, read_regular


def _read_within(path: Path, limit: int, seconds: float = 10.0) -> bytes:
    """`read_regular`, failing the test instead of hanging if it waits on a FIFO."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(read_regular, os.fspath(path), limit)
        try:
            return future.result(timeout=seconds)
        except concurrent.futures.TimeoutError:
            with open(path, "wb"):  # a writer releases the blocked reader
                pass
            pytest.fail(f"read_regular waited on {path}")


def test_reads_a_regular_file_up_to_one_byte_past_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"0123456789")
    assert _read_within(path, 64) == b"0123456789"
    assert _read_within(path, 10) == b"0123456789"
    assert _read_within(path, 4) == b"01234"  # limit + 1: the caller sees "too large"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(NotRegularFileError, match="is a FIFO, not a regular file") as caught:
        _read_within(path, 64)
    assert caught.value.kind == "a FIFO"
    assert caught.value.errno == errno.EINVAL
    assert caught.value.filename == os.fspath(path)


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"secret")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(NotRegularFileError, match="is a symlink, not a regular file") as caught:
        _read_within(link, 64)
    assert caught.value.errno == errno.ELOOP


def test_the_error_keeps_its_kind_across_pickling(tmp_path: Path) -> None:
    error = NotRegularFileError("a FIFO", os.fspath(tmp_path / "fifo"))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.errno, copy.strerror, copy.filename) == (
        "a FIFO",
        errno.EINVAL,
        "is a FIFO, not a regular file",
        error.filename,
    )


def test_a_directory_is_refused_and_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotRegularFileError, match="is a directory"):
        _read_within(tmp_path, 64)
    with pytest.raises(FileNotFoundError):
        _read_within(tmp_path / "absent", 64)
