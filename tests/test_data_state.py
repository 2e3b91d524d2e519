"""Data pipeline positions: grain iterators through real Orbax managers, and skip_batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import pytest

from artifex_ckpt.data_state import (
    DATA_ITEM,
    data_restore_args,
    data_save_args,
    has_data_state,
    is_grain_iterator,
    skip_batches,
)
from artifex_ckpt.errors import ConfigError
from artifex_ckpt.manager import MetricCheckpointManager

# grain is an optional dependency of artifex_ckpt.
grain = pytest.importorskip("grain")

ROOT = Path(__file__).resolve().parents[1]
N, BATCH = 40, 4


def shuffled_dataset() -> Any:
    return grain.MapDataset.source(range(N)).shuffle(seed=7).batch(BATCH).to_iter_dataset()


def shuffled_loader() -> Any:
    sampler = grain.samplers.IndexSampler(
        num_records=N,
        shuffle=True,
        seed=11,
        num_epochs=2,
        shard_options=grain.sharding.NoSharding(),
    )
    return grain.DataLoader(
        data_source=grain.sources.RangeDataSource(0, N, 1),
        sampler=sampler,
        operations=[grain.transforms.Batch(BATCH)],
        worker_count=0,
    )


def dataset_iterator() -> Iterator[Any]:
    return iter(shuffled_dataset())


def loader_iterator() -> Iterator[Any]:
    return iter(shuffled_loader())


def assert_batches_equal(got: Sequence[Any], want: Sequence[Any]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("make_iterator", "consumed"),
    # 13 batches of the loader cross its first epoch (10 batches) into the second.
    [(dataset_iterator, 3), (loader_iterator, 13)],
    ids=["IterDataset", "DataLoader"],
)
def test_a_restored_grain_iterator_continues_where_the_saved_one_was(
    tmp_path: Path, make_iterator: Callable[[], Iterator[Any]], consumed: int
) -> None:
    uninterrupted = list(make_iterator())
    assert len({tuple(b) for b in uninterrupted[:10]}) == 10, "the pipeline is shuffled"
    iterator = make_iterator()
    for _ in range(consumed):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "run") as manager:
        manager.save(0, args=ocp.args.Composite(**{DATA_ITEM: data_save_args(iterator)}))
        # Batches drawn while the save commits in the background are not in it.
        next(iterator)
        next(iterator)
        manager.wait_until_finished()
        fresh = make_iterator()
        restored = manager.restore(
            0, args=ocp.args.Composite(**{DATA_ITEM: data_restore_args(fresh)})
        )
    assert restored[DATA_ITEM] is fresh
    assert_batches_equal(list(fresh), uninterrupted[consumed:])
    assert has_data_state(tmp_path / "run" / "0")
    assert (tmp_path / "run" / "0" / DATA_ITEM / "process_0-of-1.json").is_file()


def test_the_dataset_state_on_disk_is_grains_json(tmp_path: Path) -> None:
    iterator = dataset_iterator()
    next(iterator)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(**{DATA_ITEM: data_save_args(iterator)}))
    state = json.loads((tmp_path / "3" / DATA_ITEM / "process_0-of-1.json").read_text())
    assert state == {"next_index": 1}


def test_data_state_beside_the_model_in_a_metric_checkpoint_manager(tmp_path: Path) -> None:
    # The manager's own handler registry lacks grain's args; Orbax's global one has them.
    weights = {"w": np.arange(6, dtype=np.float32)}
    iterator = loader_iterator()
    uninterrupted = list(loader_iterator())
    for _ in range(4):
        next(iterator)
    with MetricCheckpointManager(tmp_path / "run") as manager:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(weights), **{DATA_ITEM: data_save_args(iterator)}
        )
        manager.save(0, args=args, metrics={"val_loss": 0.5})
        manager.wait_until_finished()
    with MetricCheckpointManager(tmp_path / "run") as manager:
        fresh = loader_iterator()
        restored = manager.restore(
            0,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(weights), **{DATA_ITEM: data_restore_args(fresh)}
            ),
        )
        assert has_data_state(manager.step_path(0))
    np.testing.assert_array_equal(restored["model"]["w"], weights["w"])
    assert_batches_equal(list(fresh), uninterrupted[4:])


def _flip_a_byte_of_the_arrays(step_dir: Path) -> None:
    # Same size, other bytes: only the checksums read beside Orbax's restore notice.
    data_file = max((step_dir / "model" / "d").iterdir(), key=lambda p: p.stat().st_size)
    with open(data_file, "r+b") as file:
        file.seek(data_file.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))


def test_a_failed_restore_leaves_the_grain_iterator_where_it_was(tmp_path: Path) -> None:
    from flax import nnx

    from artifex_ckpt import CorruptCheckpointError, CorruptCheckpointWarning
    from artifex_ckpt.checkpointing import checkpoint_args, restore_checkpoint
    from tests.conftest import TinyMLP

    uninterrupted = list(dataset_iterator())
    model = TinyMLP(nnx.Rngs(0))
    iterator = dataset_iterator()
    with MetricCheckpointManager(tmp_path) as manager:
        for step, (consumed, loss) in enumerate(((2, 0.5), (3, 0.4))):
            for _ in range(consumed):
                next(iterator)
            args = checkpoint_args(model, data_iterator=iterator)
            manager.save(step, args=args, metrics={"val_loss": loss})
        manager.wait_until_finished()
        _flip_a_byte_of_the_arrays(Path(manager.step_path(1)))
        fresh = dataset_iterator()
        next(fresh)
        with pytest.raises(CorruptCheckpointError, match="does not match its manifest"):
            restore_checkpoint(manager, model, 1, data_iterator=fresh)
        assert_batches_equal(list(fresh), uninterrupted[1:])  # not moved to step 1's 5
        # A fallback sets the position again (step 0's), with or without the guard.
        fresh = dataset_iterator()
        with pytest.warns(CorruptCheckpointWarning, match="trying step 0"):
            restored = restore_checkpoint(manager, model, "latest", data_iterator=fresh)
        assert restored.step == 0
        assert_batches_equal(list(fresh), uninterrupted[2:])


def test_restoring_into_a_different_pipeline_is_refused(tmp_path: Path) -> None:
    iterator = loader_iterator()
    next(iterator)
    other = grain.DataLoader(
        data_source=grain.sources.RangeDataSource(0, N, 1),
        sampler=grain.samplers.IndexSampler(
            num_records=N, shuffle=True, seed=12, shard_options=grain.sharding.NoSharding()
        ),
        worker_count=0,
    )
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(0, args=ocp.args.Composite(**{DATA_ITEM: data_save_args(iterator)}))
        manager.wait_until_finished()
        with pytest.raises(ValueError, match="seed=11"):
            manager.restore(
                0, args=ocp.args.Composite(**{DATA_ITEM: data_restore_args(iter(other))})
            )


def test_only_grain_iterators_have_a_position_to_save() -> None:
    assert is_grain_iterator(dataset_iterator())
    assert is_grain_iterator(loader_iterator())
    others: list[object] = [shuffled_dataset(), shuffled_loader(), [1, 2], iter([1, 2])]
    for other in [*others, (b for b in range(3))]:
        assert not is_grain_iterator(other)
        assert data_save_args(other) is None
        assert data_restore_args(other) is None


def test_without_grain_nothing_is_imported_and_nothing_is_a_grain_iterator() -> None:
    script = (
        "import sys\n"
        "sys.modules['grain'] = None  # as if grain were not installed\n"
        "from artifex_ckpt import data_state\n"
        "print(data_state.is_grain_iterator(iter([1])), data_state.data_save_args([1]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "False None\n"


def test_has_data_state_is_false_for_a_checkpoint_without_the_item(tmp_path: Path) -> None:
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(0, args=ocp.args.Composite(model=ocp.args.StandardSave({"w": np.ones(2)})))
    assert (tmp_path / "0").is_dir()
    assert not has_data_state(tmp_path / "0")
    assert not has_data_state(str(tmp_path / "missing"))


class CountingBatches(Sequence[int]):
    """A sequence that records which batches were read, to prove nothing is copied."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.read: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            raise AssertionError("skip_batches must not slice the sequence")
        value = range(self.n)[index]
        self.read.append(value)
        return value


def test_skip_batches_on_a_sequence_is_a_view() -> None:
    batches = CountingBatches(10)
    tail = skip_batches(batches, 7)
    assert isinstance(tail, Sequence)
    assert len(tail) == 3 and batches.read == []
    assert list(tail) == [7, 8, 9]
    assert batches.read == [7, 8, 9]
    assert (tail[0], tail[-1], list(tail[1:])) == (7, 9, [8, 9])
    assert list(skip_batches([1, 2, 3], 2)) == [3]
    past_the_end = skip_batches([1, 2, 3], 5)
    assert isinstance(past_the_end, Sequence) and len(past_the_end) == 0
    assert list(past_the_end) == []


def test_skip_batches_on_a_generator_is_lazy() -> None:
    drawn: list[int] = []

    def generate() -> Iterator[int]:
        for i in range(6):
            drawn.append(i)
            yield i

    tail = skip_batches(generate(), 4)
    assert drawn == []
    assert list(tail) == [4, 5]
    assert drawn == [0, 1, 2, 3, 4, 5]


def test_skip_batches_of_an_epoch_function_matches_the_uninterrupted_epoch() -> None:
    def epoch_batches(epoch: int) -> Iterator[int]:
        return iter(np.random.default_rng(epoch).permutation(12).tolist())

    assert list(skip_batches(epoch_batches(3), 5)) == list(epoch_batches(3))[5:]


def test_skip_zero_returns_the_batches_themselves() -> None:
    batches = [1, 2]
    assert skip_batches(batches, 0) is batches


@pytest.mark.parametrize("n", [-1, 1.5, True, "2"])
def test_skip_batches_refuses_a_bad_count(n: Any) -> None:
    with pytest.raises(ConfigError, match=f"n={n!r} is not accepted"):
        skip_batches([1, 2, 3], n)
