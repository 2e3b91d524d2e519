"""The data pipeline's position, so that a resumed run sees the batches it has not seen yet.

Two kinds of data are covered:

- a grain iterator (`grain.DataLoader` or `grain.IterDataset` iterator) carries its
  own position. It is saved as a checkpoint item (`DATA_ITEM`) with grain's Orbax
  handler, which writes `process_<i>-of-<n>.json` per process, so every host of a
  multi-host run gets its own shard's position back. The state is read when
  `save` is called, so batches drawn while the save commits are not counted.
  A `grain.DataLoader` or `grain.IterDataset` is a source of such iterators
  (`is_grain_source`); `Trainer` iterates it once and treats it as that stream.
- deterministic batches (a `Sequence`, or `epoch -> batches` yielding the same
  batches again) need no item: the number of batches consumed in the epoch,
  stored with the trainer state, is skipped on resume with `skip_batches`.

grain stays optional: nothing here imports it unless the object is a grain iterator,
which means grain was imported already.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar, overload

import orbax.checkpoint as ocp
from etils import epath

from artifex_ckpt.errors import ConfigError

__all__ = [
    "DATA_ITEM",
    "data_restore_args",
    "data_save_args",
    "has_data_state",
    "is_grain_iterator",
    "is_grain_source",
    "position_kept_on_error",
    "skip_batches",
]

T = TypeVar("T")

DATA_ITEM = "data"


def is_grain_iterator(obj: object) -> bool:
    """Whether `obj` is a grain iterator whose position can be checkpointed.

    grain datasets (`MapDataset`, `IterDataset`) are not: only an iterator has a
    position. Returns False, without importing grain, when grain was never imported.

    Example:
        ```python
        import grain

        assert is_grain_iterator(iter(grain.MapDataset.range(8).to_iter_dataset()))
        assert not is_grain_iterator(iter([1, 2, 3]))
        ```
    """
    return _is_grain(obj, ("DatasetIterator", "DataLoaderIterator"))


def is_grain_source(obj: object) -> bool:
    """Whether `obj` is a `grain.DataLoader` or `grain.IterDataset`: not an iterator itself,
    but `iter(obj)` gives one whose position can be checkpointed.

    A `grain.MapDataset` is not: it is indexed, and iterating it again starts over.
    Returns False, without importing grain, when grain was never imported.

    Example:
        ```python
        import grain

        dataset = grain.MapDataset.range(8).to_iter_dataset()
        assert is_grain_source(dataset) and is_grain_iterator(iter(dataset))
        assert not is_grain_source(grain.MapDataset.range(8))
        ```
    """
    return _is_grain(obj, ("DataLoader", "IterDataset"))


def data_save_args(iterator: object) -> ocp.args.CheckpointArgs | None:
    """Orbax save args for the position of `iterator`, or None if it has none to save.

    Put them in the checkpoint's `Composite` under `DATA_ITEM`. For anything but a
    grain iterator the answer is None: its position is the count of batches consumed.

    Example:
        ```python
        args = ocp.args.Composite(model=ocp.args.StandardSave(state),
                                  **{DATA_ITEM: data_save_args(iterator)})
        manager.save(step, args=args)
        ```
    """
    if not is_grain_iterator(iterator):
        return None
    from grain import checkpoint as grain_checkpoint

    save_args: ocp.args.CheckpointArgs = grain_checkpoint.CheckpointSave(iterator)
    return save_args


def data_restore_args(iterator: object) -> ocp.args.CheckpointArgs | None:
    """Orbax restore args that set a fresh `iterator` to the saved position in place.

    `iterator` must come from the same pipeline (same source, seed, transformations)
    as the saved one; the restored item is `iterator` itself. None for anything but a
    grain iterator.

    Example:
        ```python
        iterator = iter(dataset)
        manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: data_restore_args(iterator)}))
        next(iterator)  # the batch after the last one the saved run consumed
        ```
    """
    if not is_grain_iterator(iterator):
        return None
    from grain import checkpoint as grain_checkpoint

    restore_args: ocp.args.CheckpointArgs = grain_checkpoint.CheckpointRestore(iterator)
    return restore_args


@contextlib.contextmanager
def position_kept_on_error(iterator: object) -> Iterator[None]:
    """Put a grain `iterator` back where it was if the block raises.

    Orbax sets the iterator's position while it restores the checkpoint, before the
    checksums read beside it may find the checkpoint damaged; a restore that then fails,
    or falls back to an older checkpoint, must not leave it at the damaged one's position.
    Anything but a grain iterator is left alone.

    Example:
        ```python
        with position_kept_on_error(iterator):
            args = ocp.args.Composite(**{DATA_ITEM: data_restore_args(iterator)})
            manager.restore(step, args=args)
            check_something_that_may_raise()
        ```
    """
    if not is_grain_iterator(iterator):
        yield
        return
    position = iterator.get_state()  # type: ignore[attr-defined]
    try:
        yield
    except BaseException as err:
        try:
            iterator.set_state(position)  # type: ignore[attr-defined]
        except Exception as failed:  # the restore's own error matters more
            err.add_note(f"artifex_ckpt: the data iterator was not put back: {failed!r}")
        raise


def has_data_state(step_path: str | os.PathLike[str] | epath.Path) -> bool:
    """Whether the checkpoint directory `step_path` holds a data pipeline position.

    Example:
        ```python
        if has_data_state(manager.step_path(step)):
            manager.restore(step, args=ocp.args.Composite(data=data_restore_args(iterator)))
        ```
    """
    return (epath.Path(step_path) / DATA_ITEM).is_dir()


def skip_batches(batches: Iterable[T], n: int) -> Iterable[T]:
    """`batches` without its first `n` elements, for resuming in the middle of an epoch.

    A `Sequence` gives a view that keeps `len` and indexing and copies nothing;
    any other iterable is advanced lazily with `itertools.islice`, which draws and
    drops the first `n` batches when the result is first iterated. Skipping more
    batches than there are gives an empty result.

    Example:
        ```python
        assert list(skip_batches([10, 11, 12, 13], 3)) == [13]
        assert list(skip_batches(iter(range(5)), 2)) == [2, 3, 4]
        ```
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"skip_batches: n={n!r} is not accepted; use an integer >= 0")
    if n == 0:
        return batches
    if isinstance(batches, Sequence):
        return _SequenceTail(batches, n)
    return itertools.islice(batches, n, None)


class _SequenceTail(Sequence[T]):
    """A read-only view of `base[start:]`; only slicing it builds a (short) list."""

    __slots__ = ("_base", "_start")

    def __init__(self, base: Sequence[T], start: int) -> None:
        self._base = base
        self._start = min(start, len(base))

    def __len__(self) -> int:
        return len(self._base) - self._start

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...

    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        positions = range(self._start, len(self._base))
        if isinstance(index, slice):
            return [self._base[i] for i in positions[index]]
        return self._base[positions[index]]

    def __iter__(self) -> Iterator[T]:
        for i in range(self._start, len(self._base)):
            yield self._base[i]

    def __repr__(self) -> str:
        return f"_SequenceTail({self._base!r}, start={self._start})"


def _is_grain(obj: object, names: tuple[str, ...]) -> bool:
    # Looked up among loaded modules only, so that grain stays optional.
    grain = sys.modules.get("grain")
    if grain is None:
        return False
    kinds = tuple(kind for name in names if isinstance(kind := getattr(grain, name, None), type))
    return bool(kinds) and isinstance(obj, kinds)
