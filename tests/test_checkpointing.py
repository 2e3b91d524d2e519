"""save_checkpoint / load_checkpoint round trips, and recovery from corrupt checkpoints."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from artifex_ckpt import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    ModelMismatchError,
    WeightsOnlyError,
    load_checkpoint,
    save_checkpoint,
    setup_checkpoint_manager,
)
from artifex_ckpt.handlers import default_handler_registry
from artifex_ckpt.history import HISTORY_FILE, DecisionHistory
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.ownership import OwnershipError
from tests.conftest import TinyMLP, assert_trees_equal, pure
from tests.gcs_emulator import Emulator
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
        manager,
        model,
        which,  # type: ignore[arg-type]
        optimizer=optimizer if with_optimizer else None,
    )
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
            load_checkpoint(manager, model, which, optimizer=optimizer)  # type: ignore[arg-type]
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


class _Dense(nnx.Module):
    """Parameters only: restoring it depends on no stored trainer state."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layer = nnx.Linear(4, 3, rngs=rngs)


def test_a_failing_item_leaves_model_and_optimizer_untouched(tmp_path: Path) -> None:
    # The model's item restores, the optimizer's fails: neither may reach the live objects.
    _write_run(tmp_path)
    step_dir = tmp_path / "ck-3"
    (step_dir / "artifex_manifest.json").unlink()  # nothing stops the damage before Orbax
    for data_file in (step_dir / "optimizer" / "d").iterdir():
        os.truncate(data_file, data_file.stat().st_size // 2)
    model, optimizer = _fresh()
    before = (pure(model), pure(optimizer))
    with MetricCheckpointManager(tmp_path) as manager, pytest.raises(ValueError):
        load_checkpoint(manager, model, 3, optimizer=optimizer)
    assert_trees_equal(model, before[0])
    assert_trees_equal(optimizer, before[1])


def test_weights_only_checkpoint_restores_parameters_of_a_model_with_other_state(
    tmp_path: Path,
) -> None:
    from artifex_ckpt.checkpointing import checkpoint_args

    def fill_stats(module: nnx.Module, value: float) -> None:
        stats = nnx.state(module, nnx.BatchStat)
        nnx.update(module, jax.tree.map(lambda a: np.full(a.shape, value, a.dtype), stats))

    saved, _ = _fresh(1)
    fill_stats(saved, 3.0)  # statistics of the saved run: not in a weights-only checkpoint
    with MetricCheckpointManager(tmp_path) as manager:
        manager.save(0, args=checkpoint_args(saved, weights_only=True))
        manager.wait_until_finished()
        model, _ = _fresh(2)
        fill_stats(model, 7.0)  # the live model's own, which the load must leave alone
        stats = pure(nnx.state(model, nnx.BatchStat))
        assert jax.tree.leaves(stats)
        load_checkpoint(manager, model, 0)
    assert_trees_equal(nnx.state(model, nnx.Param), nnx.state(saved, nnx.Param))
    assert_trees_equal(nnx.state(model, nnx.BatchStat), stats)


def test_load_of_a_parameter_model_needs_no_trainer_state(tmp_path: Path) -> None:
    # Nothing in the trainer state decides how a model of parameters alone is restored, so
    # `load_checkpoint` does not read it; `restore_checkpoint`, which returns it, still
    # finds the damage.
    from artifex_ckpt.checkpointing import restore_checkpoint

    saved = _Dense(nnx.Rngs(1))
    with MetricCheckpointManager(tmp_path) as manager:
        save_checkpoint(manager, saved, 0, metrics={"val_loss": 0.1})
        manager.wait_until_finished()
        step_dir = manager.step_path(0)
        (step_dir / "artifex_manifest.json").unlink()
        (step_dir / "trainer_state" / "metadata").write_text("[not json")
        model = _Dense(nnx.Rngs(2))
        load_checkpoint(manager, model, 0)
        assert_trees_equal(model, saved)
        with pytest.raises(CorruptCheckpointError, match="trainer_state/metadata is not JSON"):
            restore_checkpoint(manager, _Dense(nnx.Rngs(3)), 0)


def _forget_listings() -> None:
    """Forget gcsfs's listing caches, as a fresh process starts without them."""
    import gcsfs

    for fs in list(gcsfs.GCSFileSystem._cache.values()):
        fs.invalidate_cache()


def _orbax_restore(
    raw: ocp.CheckpointManager, model: nnx.Module, optimizer: nnx.Optimizer | None
) -> None:
    items = {"model": ocp.args.StandardRestore(nnx.to_pure_dict(nnx.state(model)))}
    if optimizer is not None:
        items["optimizer"] = ocp.args.StandardRestore(nnx.to_pure_dict(nnx.state(optimizer)))
    raw.restore(raw.best_step(), args=ocp.args.Composite(**items))


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_verified_restore_on_gcs_costs_two_requests_beyond_orbax(
    gcs_dir: epath.Path, gcs_bucket: Emulator, with_optimizer: bool
) -> None:
    # A verified restore reads the step's listing (sizes and CRC-32Cs) and its manifest;
    # the commit record and metrics are covered by the manifest's checksums, and the
    # trainer state decides nothing here, so nothing else is read.
    saved: nnx.Module
    saved, optimizer = _fresh(1) if with_optimizer else (_Dense(nnx.Rngs(1)), None)
    with MetricCheckpointManager(gcs_dir, monitor="val_loss") as manager:
        for step, loss in enumerate((0.3, 0.1, 0.2)):
            save_checkpoint(manager, saved, step, optimizer=optimizer, metrics={"val_loss": loss})
        manager.wait_until_finished()
    model, target = _fresh(2) if with_optimizer else (_Dense(nnx.Rngs(2)), None)
    options = ocp.CheckpointManagerOptions(
        read_only=True, best_fn=lambda metrics: metrics["val_loss"], best_mode="min"
    )
    counts = {}
    with (
        MetricCheckpointManager(
            gcs_dir, options=ocp.CheckpointManagerOptions(read_only=True)
        ) as manager,
        ocp.CheckpointManager(
            gcs_dir, options=options, handler_registry=default_handler_registry()
        ) as raw,
    ):
        for name, restore in (
            ("ours", lambda: load_checkpoint(manager, model, "best", optimizer=target)),
            ("ours, verify=False", lambda: load_checkpoint(manager, model, "best", verify=False)),
            ("raw", lambda: _orbax_restore(raw, model, target)),
        ):
            _forget_listings()
            gcs_bucket.reset_count()
            restore()
            counts[name] = gcs_bucket.request_count()
    assert_trees_equal(model, saved)
    assert counts["ours"] <= counts["raw"] + 2, counts
    # Unverified: the commit record, the metrics, the listing and the manifest (sizes).
    assert counts["ours, verify=False"] <= counts["raw"] + 4, counts


def _rewrite(path: epath.Path, change: Callable[[bytes], bytes]) -> None:
    data = path.read_bytes()
    changed = change(data)
    assert changed != data and len(changed) == len(data)
    path.write_bytes(changed)


def _three_on_gcs(gcs_dir: epath.Path) -> tuple[list[_Dense], epath.Path]:
    """Steps 0-2, all kept, scored 0.3, 0.1 (the best) and 0.2 (the next best): the saved
    models, and the best one's directory."""
    with MetricCheckpointManager(gcs_dir, monitor="val_loss", save_top_k=-1) as manager:
        saved = []
        for step, loss in enumerate((0.3, 0.1, 0.2)):
            model = _Dense(nnx.Rngs(step))
            saved.append(model)
            save_checkpoint(manager, model, step, metrics={"val_loss": loss})
        manager.wait_until_finished()
        return saved, manager.step_path(1)


def test_changed_commit_record_on_gcs_is_skipped(gcs_dir: epath.Path) -> None:
    # Same size, still valid JSON: only the manifest's checksum can tell.
    saved, step_dir = _three_on_gcs(gcs_dir)
    _rewrite(step_dir / "_CHECKPOINT_METADATA", lambda data: data.replace(b"1", b"2", 1))
    _forget_listings()
    with MetricCheckpointManager(gcs_dir) as manager:
        target = _Dense(nnx.Rngs(9))
        with pytest.warns(CorruptCheckpointWarning, match=r"/1 failed to restore.*_CHECKPOINT"):
            load_checkpoint(manager, target, "best")
    assert_trees_equal(target, saved[2])


def test_damaged_commit_record_without_manifest_on_gcs_is_skipped(gcs_dir: epath.Path) -> None:
    # No manifest to vouch for the commit record: it is read, and found wanting.
    saved, step_dir = _three_on_gcs(gcs_dir)
    (step_dir / "artifex_manifest.json").unlink()
    _rewrite(step_dir / "_CHECKPOINT_METADATA", lambda data: b"[" + data[1:])
    _forget_listings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricCheckpointManager(gcs_dir) as manager:
            target = _Dense(nnx.Rngs(9))
            load_checkpoint(manager, target, "best")
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptCheckpointWarning)]
    assert any("/1 failed to restore" in m and "commit" in m for m in messages), messages
    assert_trees_equal(target, saved[2])
