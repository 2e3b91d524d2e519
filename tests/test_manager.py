"""MetricCheckpointManager on real Orbax: reopening, interop, errors, custom loops."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from artifex_ckpt import (
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointWarning,
    ConfigError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    MetricCheckpointManager,
    MetricError,
    SettingsMismatchError,
    StepError,
)
from artifex_ckpt.housekeeping import Housekeeper
from artifex_ckpt.ownership import OwnershipError
from artifex_ckpt.settings import SETTINGS_FILE
from tests.conftest import TinyMLP, assert_trees_equal, step_dirs

TEMPLATE = "model-{epoch:02d}-{val/loss:.4f}"


def _args(step: int) -> ocp.args.StandardSave:
    return ocp.args.StandardSave({"w": np.full(3, step, np.float32)})


def _fill(root: Path, losses: list[float], **kwargs: object) -> None:
    with MetricCheckpointManager(root, filename=TEMPLATE, monitor="val/loss", **kwargs) as mgr:
        for step, loss in enumerate(losses):
            mgr.save(step, args=_args(step), metrics={"val/loss": loss, "acc": 1 - loss})


def _snapshot(mgr: MetricCheckpointManager) -> tuple[object, ...]:
    steps = sorted(mgr.all_steps())
    return (
        steps,
        [mgr.score(s) for s in steps],
        mgr.best_step(),
        mgr.latest_step(),
        [str(mgr.step_path(s)) for s in steps],
        mgr.ranked_steps(),
    )


def test_reopen_with_and_without_template_sees_the_same(ckpt_dir: Path) -> None:
    _fill(ckpt_dir, [0.9, 0.4, 0.7, 0.5, 0.8], save_top_k=2)
    with MetricCheckpointManager(ckpt_dir, filename=TEMPLATE, monitor="val/loss") as explicit:
        first = _snapshot(explicit)
    with MetricCheckpointManager(epath.Path(ckpt_dir)) as bare:
        second = _snapshot(bare)
        assert bare.settings.filename == TEMPLATE
        assert bare.settings.save_top_k == 2
    assert first == second
    assert first[0] == [1, 3, 4]
    assert first[2] == 1
    assert step_dirs(ckpt_dir) == {"model-01-0.4000", "model-03-0.5000", "model-04-0.8000"}


def test_reopened_manager_keeps_applying_stored_retention(ckpt_dir: Path) -> None:
    _fill(ckpt_dir, [0.9, 0.4, 0.7], save_top_k=1)
    with MetricCheckpointManager(ckpt_dir) as mgr:
        mgr.save(3, args=_args(3), metrics={"val/loss": 0.6})
    assert step_dirs(ckpt_dir) == {"model-01-0.4000", "model-03-0.6000"}


def test_explicit_argument_overrides_and_is_stored_with_the_next_save(ckpt_dir: Path) -> None:
    _fill(ckpt_dir, [0.9], save_top_k=1)
    with MetricCheckpointManager(ckpt_dir, save_top_k=5) as mgr:
        assert mgr.settings.save_top_k == 5
        assert json.loads((ckpt_dir / SETTINGS_FILE).read_text())["save_top_k"] == 1
        mgr.save(1, args=_args(1), metrics={"val/loss": 0.5})
    stored = json.loads((ckpt_dir / SETTINGS_FILE).read_text())
    assert stored["save_top_k"] == 5 and stored["filename"] == TEMPLATE


def test_nothing_is_created_before_the_first_save(tmp_path: Path) -> None:
    with MetricCheckpointManager(tmp_path / "a" / "b", filename="m-{epoch}") as mgr:
        assert mgr.all_steps() == [] and mgr.best_step() is None
    assert not (tmp_path / "a").exists()


def test_different_template_is_refused_and_nothing_changes(ckpt_dir: Path) -> None:
    _fill(ckpt_dir, [0.9, 0.4])
    before = step_dirs(ckpt_dir), (ckpt_dir / SETTINGS_FILE).read_text()
    with pytest.raises(SettingsMismatchError, match=r"ckpt-\{epoch\}.*differs.*model-"):
        MetricCheckpointManager(ckpt_dir, filename="ckpt-{epoch}")
    assert (step_dirs(ckpt_dir), (ckpt_dir / SETTINGS_FILE).read_text()) == before


def test_no_template_uses_orbax_numeric_names(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir, save_top_k=1, keep_last=False) as mgr:
        for step, loss in enumerate([0.5, 0.2, 0.9]):
            mgr.save(step, args=_args(step), metrics={"val_loss": loss})
    assert step_dirs(ckpt_dir) == {"1"}
    with ocp.CheckpointManager(ckpt_dir) as plain:
        assert plain.all_steps() == [1]


def test_model_item_restores_with_plain_orbax_bit_for_bit(ckpt_dir: Path, model: TinyMLP) -> None:
    state = nnx.to_pure_dict(nnx.state(model))
    with MetricCheckpointManager(ckpt_dir, filename=TEMPLATE, monitor="val/loss") as mgr:
        mgr.save(
            0,
            args=ocp.args.Composite(model=ocp.args.StandardSave(state)),
            metrics={"val/loss": 0.25},
        )
        mgr.wait_until_finished()
        path = mgr.step_path(0)
    assert path.name == "model-00-0.2500"
    restored = ocp.StandardCheckpointer().restore(path / "model")
    assert_trees_equal(restored, state)


def test_metrics_accept_numpy_and_jax_scalars_and_store_floats(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir) as mgr:
        metrics = {"val_loss": jnp.float32(0.5), "n": np.int64(3), "a": np.array([2.0])}
        mgr.save(0, args=_args(0), metrics=metrics)
        mgr.wait_until_finished()
        assert mgr.metrics(0) == {"val_loss": 0.5, "n": 3.0, "a": 2.0}
        assert mgr.score(0) == 0.5


@pytest.mark.parametrize(
    ("metrics", "words"),
    [
        ({"loss": 1.0}, ["'val_loss'", "missing", "['loss']"]),
        ({"val_loss": "low"}, ["'val_loss'", "'low'"]),
        ({"val_loss": None}, ["'val_loss'", "None"]),
        ({"val_loss": np.ones(3)}, ["'val_loss'", "shape (3,)"]),
        ({"val_loss": 0.1, "extra": [1, 2]}, ["'extra'", "list"]),
    ],
)
def test_bad_metrics_raise_and_write_nothing(
    ckpt_dir: Path, metrics: dict[str, object], words: list[str]
) -> None:
    with MetricCheckpointManager(ckpt_dir) as mgr:
        with pytest.raises(MetricError) as info:
            mgr.save(0, args=_args(0), metrics=metrics)
        assert mgr.all_steps() == []
    for word in words:
        assert word in str(info.value)
    assert step_dirs(ckpt_dir) == set()


def test_step_errors(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir) as mgr:
        with pytest.raises(StepError, match=r"step=-1.*>= 0"):
            mgr.save(-1, args=_args(0), metrics={"val_loss": 1.0})
        mgr.save(4, args=_args(4), metrics={"val_loss": 1.0})
        for old in (4, 2):
            with pytest.raises(StepError, match=rf"step {old} is not newer.*step 4"):
                mgr.save(old, args=_args(old), metrics={"val_loss": 0.1}, force=True)
        with pytest.raises(CheckpointNotFoundError, match=r"step 3.*retained steps: \[4\]"):
            mgr.restore(3)
        with pytest.raises(CheckpointNotFoundError, match="step 9"):
            mgr.step_path(9)
    assert step_dirs(ckpt_dir) == {"4"}


def test_retention_options_are_refused(ckpt_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"options.max_to_keep=2.*save_top_k"):
        MetricCheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))


def test_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="existing file"):
        MetricCheckpointManager(file)
    assert file.read_text() == "x"


def test_keep_last_false_skips_saves_that_would_be_deleted(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir, save_top_k=2, keep_last=False) as mgr:
        written = [
            mgr.save(s, args=_args(s), metrics={"val_loss": v})
            for s, v in enumerate([0.5, 0.4, 0.9, math.nan, 0.1])
        ]
    assert written == [True, True, False, False, True]
    assert step_dirs(ckpt_dir) == {"1", "4"}


def test_all_nan_means_no_best(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir, save_top_k=2) as mgr:
        for step in range(3):
            mgr.save(step, args=_args(step), metrics={"val_loss": math.nan})
        assert mgr.best_step() is None
        assert mgr.latest_step() == 2
        assert math.isnan(mgr.score(2) or 0.0)


def test_save_without_metrics_is_unscored_and_never_evicted(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir, save_top_k=1) as mgr:
        mgr.save(0, args=_args(0), metrics={"val_loss": 0.3})
        mgr.save(1, args=_args(1))
        mgr.save(2, args=_args(2))
        mgr.save(3, args=_args(3), metrics={"val_loss": 0.1})
        assert sorted(mgr.all_steps()) == [1, 2, 3]
        assert mgr.best_step() == 3
        assert mgr.score(2) is None


def test_custom_loop_restores_best_with_orbax_args(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir, mode="max", monitor="acc", save_top_k=2) as mgr:
        for step, acc in enumerate([0.1, 0.8, 0.3, 0.2]):
            mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"w": np.full(3, step, np.float32)}),
                    extra=ocp.args.JsonSave({"step": step}),
                ),
                metrics={"acc": acc},
                custom_metadata={"lr": np.float32(0.5)},
            )
        best = mgr.best_step()
        restored = mgr.restore(
            best,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"w": np.zeros(3, np.float32)}),
                extra=ocp.args.JsonRestore(),
            ),
        )
    assert best == 1
    np.testing.assert_array_equal(restored.state["w"], np.full(3, 1, np.float32))
    assert restored.extra == {"step": 1}


def test_would_keep_answers_before_any_state_is_built(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir, save_top_k=1, keep_last=False) as mgr:
        mgr.save(0, args=_args(0), metrics={"val_loss": 0.5})
        assert mgr.should_save(1) is True  # Orbax's own decision, untouched: a newer step
        assert mgr.would_keep(1, {"val_loss": jnp.float32(0.9)}) is False
        assert mgr.would_keep(1, {"val_loss": 0.5}) is False  # a tie keeps the older
        assert mgr.would_keep(1, {"val_loss": 0.1, "other": "ignored"}) is True
        assert mgr.would_keep(1, None) is True  # unscored is never evicted, so it is kept
        with pytest.raises(MetricError, match="'val_loss' is missing"):
            mgr.would_keep(1, {"loss": 0.1})
        assert mgr.save(1, args=_args(1), metrics={"val_loss": 0.9}) is False
        assert mgr.all_steps() == [0]


def _item_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_arrays_are_written_uncompressed_unless_a_registry_is_given(tmp_path: Path) -> None:
    weights = {"w": np.random.default_rng(0).normal(size=64 * 1024).astype(np.float32)}
    sizes = {}
    for name, kwargs in (
        ("ours", {}),
        ("zstd", {"handler_registry": ocp.handlers.DefaultCheckpointHandlerRegistry()}),
    ):
        with MetricCheckpointManager(tmp_path / name, **kwargs) as mgr:
            mgr.save(0, args=ocp.args.Composite(model=ocp.args.StandardSave(weights)))
            mgr.wait_until_finished()
            sizes[name] = _item_bytes(Path(mgr.step_path(0)) / "model")
        restored = ocp.StandardCheckpointer().restore(tmp_path / name / "0" / "model")
        assert_trees_equal(restored, weights)
    assert sizes["ours"] >= weights["w"].nbytes  # all 256 KiB, no codec
    assert sizes["zstd"] < 0.97 * sizes["ours"]  # zstd saves a few percent on float weights


def test_read_only_manager_refuses_to_save_and_deletes_nothing(ckpt_dir: Path) -> None:
    _fill(ckpt_dir, [0.5, 0.7], save_top_k=1)
    before = step_dirs(ckpt_dir)
    options = ocp.CheckpointManagerOptions(read_only=True)
    with (
        MetricCheckpointManager(ckpt_dir, options=options) as mgr,
        pytest.raises(ConfigError, match="read-only"),
    ):
        mgr.save(2, args=_args(2), metrics={"val/loss": 0.1}, force=True)
    assert step_dirs(ckpt_dir) == before == {"model-00-0.5000", "model-01-0.7000"}


def test_a_copied_step_directory_is_refused_not_deleted(ckpt_dir: Path) -> None:
    import shutil

    _fill(ckpt_dir, [0.5, 0.7], save_top_k=1)
    shutil.copytree(ckpt_dir / "model-00-0.5000", ckpt_dir / "model-00-0.5000.bak")
    with MetricCheckpointManager(ckpt_dir) as mgr:  # a ".bak" copy is not a checkpoint
        assert sorted(mgr.all_steps()) == [0, 1]
    shutil.copytree(ckpt_dir / "model-00-0.5000", ckpt_dir / "model-00-0.9000")
    with pytest.raises(StepError, match=r"'model-00-0.\d+' and 'model-00-0.\d+'.*step 0"):
        MetricCheckpointManager(ckpt_dir)
    assert step_dirs(ckpt_dir) == {
        "model-00-0.5000",
        "model-00-0.5000.bak",
        "model-00-0.9000",
        "model-01-0.7000",
    }


def test_changing_monitor_or_mode_of_a_used_directory_is_refused(ckpt_dir: Path) -> None:
    _fill(ckpt_dir, [0.1, 0.2, 0.9], save_top_k=2)
    before = step_dirs(ckpt_dir)
    with pytest.raises(SettingsMismatchError, match=r"monitor='acc' differs.*'val/loss'"):
        MetricCheckpointManager(ckpt_dir, monitor="acc")
    with pytest.raises(SettingsMismatchError, match=r"mode='max' differs"):
        MetricCheckpointManager(ckpt_dir, mode="max")
    assert step_dirs(ckpt_dir) == before


@pytest.mark.parametrize(
    "option", ["lightweight_initialize", "prevent_write_metrics", "enable_background_delete"]
)
def test_options_that_would_hide_scores_are_refused(ckpt_dir: Path, option: str) -> None:
    options = ocp.CheckpointManagerOptions(**{option: True})
    with pytest.raises(ConfigError, match=rf"options.{option}=True is not supported"):
        MetricCheckpointManager(ckpt_dir, options=options)


def test_best_may_score_exactly_zero(ckpt_dir: Path) -> None:
    from artifex_ckpt import load_checkpoint, save_checkpoint

    models = [TinyMLP(nnx.Rngs(seed)) for seed in range(3)]
    with MetricCheckpointManager(ckpt_dir, monitor="err", save_top_k=-1) as mgr:
        for step, (model, err) in enumerate(zip(models, [0.5, 0.0, 0.2], strict=True)):
            save_checkpoint(mgr, model, step, metrics={"err": err})
        target = TinyMLP(nnx.Rngs(9))
        load_checkpoint(mgr, target, "best")
        assert mgr.best_step() == 1
    assert_trees_equal(target, models[1])


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        ("[1, 2]", "hold list [1, 2], not an object"),
        ('{"val/loss": "low"}', "hold val/loss='low', not a number"),
        ('{"val/loss": null}', "hold val/loss=None, not a number"),
        ('"text"', "hold str 'text', not an object"),
    ],
)
def test_malformed_stored_metrics_are_read_from_the_name(
    ckpt_dir: Path, stored: str, problem: str
) -> None:
    _fill(ckpt_dir, [0.9, 0.4, 0.7], save_top_k=2)
    (ckpt_dir / "model-01-0.4000" / "metrics" / "metrics").write_text(stored)
    with pytest.warns(CorruptCheckpointWarning, match=re.escape(problem)) as warned:
        mgr = MetricCheckpointManager(ckpt_dir)
    with mgr:
        assert "val/loss (0.4) is read from its name" in str(warned[0].message)
        assert mgr.best_step() == 1 and mgr.score(1) == 0.4
        mgr.save(3, args=_args(3), metrics={"val/loss": 0.8})
        mgr.save(4, args=_args(4), metrics={"val/loss": 0.6})
    assert step_dirs(ckpt_dir) == {"model-01-0.4000", "model-04-0.6000"}


def test_metrics_removed_from_a_numeric_checkpoint_warn_once(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir, save_top_k=1) as mgr:
        mgr.save(0, args=_args(0), metrics={"val_loss": 0.1})
        mgr.save(1, args=_args(1))  # saved without metrics: unscored, quietly
    shutil.rmtree(ckpt_dir / "0" / "metrics")
    with pytest.warns(CorruptCheckpointWarning) as warned:
        mgr = MetricCheckpointManager(ckpt_dir)
    with mgr:
        mgr.save(2, args=_args(2), metrics={"val_loss": 0.5})
        mgr.save(3, args=_args(3), metrics={"val_loss": 0.4})
    assert [str(w.message) for w in warned] == [
        f"metrics of checkpoint {ckpt_dir / '0'} are missing; it is treated as unscored and kept"
    ]
    assert step_dirs(ckpt_dir) == {"0", "1", "3"}


def test_check_intact_never_opens_a_fifo(ckpt_dir: Path) -> None:
    _fill(ckpt_dir, [0.9, 0.4])
    for damaged in ("_CHECKPOINT_METADATA", "metrics/metrics"):
        path = ckpt_dir / "model-01-0.4000" / damaged
        path.rename(path.with_name(path.name + ".aside"))
        os.mkfifo(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptCheckpointWarning)
            mgr = MetricCheckpointManager(ckpt_dir)
        with mgr, pytest.raises(CorruptCheckpointError, match=f"{damaged} is a FIFO"):
            mgr.check_intact(1)
        path.unlink()
        path.with_name(path.name + ".aside").rename(path)


@pytest.mark.parametrize("kind", ["a FIFO", "a symlink", "a directory"])
def test_stored_settings_of_the_wrong_kind_are_refused_without_waiting(
    ckpt_dir: Path, tmp_path: Path, kind: str
) -> None:
    _fill(ckpt_dir, [0.9, 0.4])
    settings = ckpt_dir / SETTINGS_FILE
    real = tmp_path / "elsewhere.json"
    settings.rename(real)
    if kind == "a FIFO":
        os.mkfifo(settings)  # opening it to read would wait for a writer
    elif kind == "a symlink":
        settings.symlink_to(real)  # same bytes, not the run's own file
    else:
        settings.mkdir()
    with pytest.raises(ConfigError, match=f"{SETTINGS_FILE} is {kind}, not a regular file"):
        MetricCheckpointManager(ckpt_dir)
    assert step_dirs(ckpt_dir) - {SETTINGS_FILE} == {"model-00-0.9000", "model-01-0.4000"}


def test_a_save_whose_directory_cannot_be_created_fails_in_save(ckpt_dir: Path) -> None:
    with MetricCheckpointManager(ckpt_dir, filename="m-{epoch}") as mgr:
        mgr.save(0, args=_args(0), metrics={"val_loss": 0.5})
        mgr.wait_until_finished()
        shutil.rmtree(ckpt_dir)
        ckpt_dir.write_text("a file where the run was")
        with pytest.raises(CheckpointSaveError, match=r"'m-1' \(step 1\).*is not a directory"):
            mgr.save(1, args=_args(1), metrics={"val_loss": 0.4})
        with pytest.warns(CheckpointWarning, match="could not remove the lease file"):
            mgr.close()
    assert ckpt_dir.read_text() == "a file where the run was"


def test_after_a_takeover_declines_raise_and_nothing_more_is_recorded(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short lease, so that the writer looks at it again within the test.
    monkeypatch.setattr("artifex_ckpt.manager.STALE_AFTER_S", 0.4)
    manager = MetricCheckpointManager(ckpt_dir, save_top_k=1, keep_last=False)
    manager.save(0, args=_args(0), metrics={"val_loss": 0.1})
    manager.wait_until_finished()
    history = (ckpt_dir / "artifex_history.jsonl").read_text()
    assert not manager.would_keep(1, {"val_loss": 0.9})
    manager.decline(1, {"val_loss": 0.9})  # recorded at the next flush
    lease = ckpt_dir / "artifex_owner.json"
    other = {**json.loads(lease.read_text()), "token": "f" * 32, "pid": 4242}
    lease.write_text(json.dumps(other))
    time.sleep(0.15)
    with pytest.raises(OwnershipError, match="was taken over"):
        manager.decline(2, {"val_loss": 0.9})
    with pytest.warns(CheckpointWarning, match="was taken over"):
        manager.close()  # the pending decline is not written into the other run's history
    assert (ckpt_dir / "artifex_history.jsonl").read_text() == history
    assert json.loads(lease.read_text())["token"] == "f" * 32


def test_a_forked_child_neither_waits_for_nor_repeats_the_parents_housekeeping(
    tmp_path: Path,
) -> None:
    done = tmp_path / "done"

    def task() -> None:
        with done.open("a") as f:
            f.write(f"{os.getpid()}\n")

    keeper = Housekeeper([task])
    release = threading.Event()
    keeper.after_save(lambda: not release.is_set())  # a save still in flight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns that this process has threads
        child = os.fork()
    if child == 0:
        keeper.finish()  # hung here, waiting for the parent's thread
        keeper.close()
        os._exit(0)
    deadline = time.monotonic() + 20
    while (ended := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if ended[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    release.set()
    keeper.finish()
    keeper.close()
    assert ended[0] == child and os.waitstatus_to_exitcode(ended[1]) == 0
    assert done.read_text().split() == [str(os.getpid())] * 2  # the parent's run, then finish
