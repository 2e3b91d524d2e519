"""save_checkpoint / load_checkpoint round trips, and recovery from corrupt checkpoints."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import optax
import pytest
from flax import nnx

from artifex_ckpt import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointWarning,
    ModelMismatchError,
    WeightsOnlyError,
    load_checkpoint,
    save_checkpoint,
    setup_checkpoint_manager,
)
from artifex_ckpt.history import HISTORY_FILE, DecisionHistory
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.ownership import OwnershipError
from tests.conftest import TinyMLP, assert_trees_equal, pure
from tests.training import make_trainer

LOSSES = [0.5, 0.2, 0.4, 0.3]


def _fresh(seed: int = 7) -> tuple[TinyMLP, nnx.Optimizer]:
    model = TinyMLP(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def _write_run(root: Path) -> list[tuple[object, object]]:
    """Four checkpoints with distinct model/optimizer states; returns their pure states."""
    trainer = make_trainer(epochs=1)
    manager, path = setup_checkpoint_manager(root, filename="ck-{epoch}", save_top_k=-1)
    assert path == manager.directory
    states = []
    for step, loss in enumerate(LOSSES):
        trainer.fit()
        states.append((pure(trainer.model), pure(trainer.optimizer)))
        assert save_checkpoint(
            manager, trainer.model, step, optimizer=trainer.optimizer, metrics={"val_loss": loss}
        )
    manager.close()
    return states


@pytest.mark.parametrize(("which", "expected"), [(None, 3), ("latest", 3), ("best", 1), (2, 2)])
@pytest.mark.parametrize("with_optimizer", [True, False])
def test_round_trips_bit_for_bit(
    tmp_path: Path, which: object, expected: int, with_optimizer: bool
) -> None:
    states = _write_run(tmp_path)
    manager, _ = setup_checkpoint_manager(tmp_path)
    model, optimizer = _fresh()
    untouched = pure(optimizer)
    returned = load_checkpoint(
        manager, model, which, optimizer=optimizer if with_optimizer else None
    )  # type: ignore[arg-type]
    assert returned is model
    assert_trees_equal(model, states[expected][0])
    assert_trees_equal(optimizer, states[expected][1] if with_optimizer else untouched)


def test_missing_step_lists_existing_ones(tmp_path: Path) -> None:
    _write_run(tmp_path)
    manager, _ = setup_checkpoint_manager(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"step 9.*\[0, 1, 2, 3\]"):
        load_checkpoint(manager, _fresh()[0], 9)


def test_load_waits_for_a_pending_save(tmp_path: Path) -> None:
    manager, _ = setup_checkpoint_manager(tmp_path)
    model, _ = _fresh(1)
    save_checkpoint(manager, model, 0, metrics={"val_loss": 1.0})
    target, _ = _fresh(2)
    load_checkpoint(manager, target, "latest")  # no explicit wait before this
    assert_trees_equal(target, model)
    manager.close()


def test_weights_only_checkpoint_refuses_optimizer(tmp_path: Path) -> None:
    from artifex_ckpt import CheckpointConfig, ModelCheckpoint

    trainer = make_trainer(epochs=1)
    trainer.fit(callbacks=[ModelCheckpoint(CheckpointConfig(tmp_path, save_weights_only=True))])
    manager, _ = setup_checkpoint_manager(tmp_path)
    model, optimizer = _fresh()
    with pytest.raises(WeightsOnlyError, match="no optimizer state"):
        load_checkpoint(manager, model, 0, optimizer=optimizer)


def _truncate_array_data(path: Path) -> None:
    for data_file in (path / "model" / "d").iterdir():
        os.truncate(data_file, data_file.stat().st_size // 2)


def _delete_commit_metadata(path: Path) -> None:
    (path / "_CHECKPOINT_METADATA").unlink()


def _garble_metrics(path: Path) -> None:
    (path / "metrics" / "metrics").write_text("{not json")


def _empty_directory(path: Path) -> None:
    for child in path.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _listing(root: Path) -> dict[str, int]:
    # The decision history records the restore; every checkpoint file stays as it was.
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.name != HISTORY_FILE
    }


@pytest.mark.parametrize(
    ("corrupt", "which", "broken", "fallback", "warns"),
    [
        (_truncate_array_data, "latest", 3, 2, True),
        (_truncate_array_data, "best", 1, 3, True),
        (_delete_commit_metadata, "latest", 3, 2, True),
        (_delete_commit_metadata, "best", 1, 3, True),
        (_garble_metrics, "latest", 3, 2, True),
        # Unreadable metrics warn when the directory is opened; the step is then unscored.
        (_garble_metrics, "best", 1, 3, True),
        (_empty_directory, "latest", 3, 2, True),
        # An emptied directory has no score left, so "best" never considers it.
        (_empty_directory, "best", 1, 3, False),
    ],
)
def test_corrupt_checkpoint_is_skipped_with_a_warning(
    tmp_path: Path,
    corrupt: Callable[[Path], None],
    which: str,
    broken: int,
    fallback: int,
    warns: bool,
) -> None:
    states = _write_run(tmp_path)
    corrupt(tmp_path / f"ck-{broken}")
    before = _listing(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricCheckpointManager(tmp_path) as manager:
            model, optimizer = _fresh()
            load_checkpoint(manager, model, which, optimizer=optimizer)
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptCheckpointWarning)]
    assert any(str(tmp_path / f"ck-{broken}") in m for m in messages) == warns, messages
    assert_trees_equal(model, states[fallback][0])
    assert_trees_equal(optimizer, states[fallback][1])
    assert _listing(tmp_path) == before, "recovery must not delete or change anything"
    kinds = [(d.kind, d.name) for d in DecisionHistory(tmp_path).read()]
    assert kinds[-1] == ("restored", f"ck-{fallback}")
    # "best" never tries a checkpoint whose score is gone with its metrics.
    tried = which == "latest" or corrupt not in (_garble_metrics, _empty_directory)
    assert (("skipped_corrupt", f"ck-{broken}") in kinds) == tried


def test_explicit_corrupt_step_raises(tmp_path: Path) -> None:
    _write_run(tmp_path)
    _truncate_array_data(tmp_path / "ck-2")
    manager = MetricCheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="ck-2"):
        load_checkpoint(manager, _fresh()[0], 2)


def test_setup_opens_a_reader_while_a_writer_holds_the_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_run(tmp_path)
    writer, _ = setup_checkpoint_manager(tmp_path)
    assert not writer.plan.read_only
    with caplog.at_level(logging.INFO, logger="artifex_ckpt"):
        reader, _ = setup_checkpoint_manager(tmp_path)
    assert reader.plan.read_only
    assert f"pid {os.getpid()}" in caplog.text and "opened read-only" in caplog.text
    explicit, _ = setup_checkpoint_manager(tmp_path, read_only=True)
    assert explicit.plan.read_only
    with pytest.raises(OwnershipError, match="another manager or callback in this process"):
        setup_checkpoint_manager(tmp_path, read_only=False)
    for manager in (reader, explicit):
        assert manager.best_step() == 1
        with pytest.raises(ConfigError, match="read-only"):
            save_checkpoint(manager, _fresh()[0], 9, metrics={"val_loss": 0.1})
        manager.close()
    writer.close()
    again, _ = setup_checkpoint_manager(tmp_path)  # nobody writes now: the writer
    assert not again.plan.read_only
    again.close()


def test_a_checkpoint_saved_without_optimizer_is_a_mismatch_not_corruption(
    tmp_path: Path,
) -> None:
    manager, _ = setup_checkpoint_manager(tmp_path)
    for step in range(2):
        save_checkpoint(manager, _fresh(step)[0], step, metrics={"val_loss": 0.5})
    model, optimizer = _fresh()
    missing = r"holds no optimizer state.*without optimizer=\.\.\."
    with pytest.raises(ModelMismatchError, match=missing):
        load_checkpoint(manager, model, "latest", optimizer=optimizer)
    load_checkpoint(manager, model, "latest")
    assert_trees_equal(model, _fresh(1)[0])
    manager.close()
    kinds = [d.kind for d in DecisionHistory(tmp_path).read()]
    assert "skipped_corrupt" not in kinds
