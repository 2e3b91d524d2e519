"""The decision history of real runs (written by `ModelCheckpoint` and by direct
`manager.save` alike), read back by `artifex-ckpt log` and drawn by `artifex-ckpt plot`,
and the demo's self-explaining run directory."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx
from matplotlib.figure import Figure
from rich.console import Console

from artifex_ckpt import (
    CheckpointConfig,
    ConfigError,
    CorruptCheckpointWarning,
    MetricCheckpointManager,
    ModelCheckpoint,
    StepError,
    load_checkpoint,
)
from artifex_ckpt.cli import main
from artifex_ckpt.demo import CURVE_FILE, run_demo
from artifex_ckpt.history import (
    DEFAULT_MAX_BYTES,
    HISTORY_FILE,
    Decision,
    DecisionHistory,
    HistoryWarning,
    explain,
    to_json_line,
)
from artifex_ckpt.journal import Journal
from artifex_ckpt.plan import plan_manager
from artifex_ckpt.plot import PlotData, Series, draw_history, plot_data
from artifex_ckpt.trainer import Trainer
from tests.conftest import TinyMLP, step_dirs
from tests.test_habits import ValidateEvery
from tests.training import ScriptedMetric, make_trainer

ROOT = Path(__file__).resolve().parents[1]
DOCS_IMAGE = ROOT / "docs" / "img" / "demo-curve.png"
GOLD = (1.0, 215 / 255, 0.0)  # the best's star
RED = (214 / 255, 39 / 255, 40 / 255)  # evicted crosses
GREEN = (44 / 255, 160 / 255, 44 / 255)  # retained rings

# Top 2, save_last=False: what each epoch's val_loss makes of the run.
LOSSES = [0.5, 0.4, 0.6, 0.3, 0.35]
TEMPLATE = "model-{epoch:02d}-{val_loss:.4f}"
Row = tuple[str, int, str | None, float | None, dict[str, Any]]
EXPECTED: list[Row] = [
    ("saved", 0, "model-00-0.5000", 0.5, {"rank": 1, "k": 2}),
    ("saved", 1, "model-01-0.4000", 0.4, {"rank": 1, "k": 2}),
    ("not_saved", 2, None, 0.6, {"k": 2, "kth": 0.5}),
    ("saved", 3, "model-03-0.3000", 0.3, {"rank": 1, "k": 2}),
    ("evicted", 0, "model-00-0.5000", 0.5, dict(by="model-03-0.3000", by_step=3, by_score=0.3)),
    ("saved", 4, "model-04-0.3500", 0.35, {"rank": 2, "k": 2}),
    ("evicted", 1, "model-01-0.4000", 0.4, dict(by="model-04-0.3500", by_step=4, by_score=0.35)),
]  # fmt: skip


@pytest.fixture(scope="module")
def shared() -> Trainer:
    """One trainer for the module, so its steps compile once; scripted metrics decide."""
    return make_trainer(n_train=1)


def _rows(root: Path) -> list[Row]:
    return [
        (d.kind, d.step, d.name, d.score, dict(d.details)) for d in DecisionHistory(root).read()
    ]


def _callback_run(trainer: Trainer, root: Path, values: list[float], **config: Any) -> None:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=root, **config))
    trainer.epochs = len(values)
    trainer.fit(callbacks=[ScriptedMetric("val_loss", values), checkpoint])


def _manager_run(root: Path, values: list[float]) -> None:
    with MetricCheckpointManager(
        root, monitor="val_loss", save_top_k=2, keep_last=False, filename=TEMPLATE
    ) as manager:
        for step, value in enumerate(values):
            manager.save(
                step,
                args=ocp.args.StandardSave({"w": np.full(3, float(step))}),
                metrics={"val_loss": value},
            )


@pytest.mark.parametrize("writer", ["callback", "manager"])
def test_the_history_tells_the_run_in_order(tmp_path: Path, shared: Trainer, writer: str) -> None:
    if writer == "callback":
        _callback_run(shared, tmp_path, LOSSES, save_top_k=2, save_last=False)
    else:
        _manager_run(tmp_path, LOSSES)
    assert _rows(tmp_path) == EXPECTED
    assert step_dirs(tmp_path) == {"model-03-0.3000", "model-04-0.3500"}


def test_log_lists_and_explains_the_decisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    _manager_run(tmp_path, LOSSES)
    assert main(["log", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if "model-0" in line or "not_saved" in line]
    assert [line.split("│")[2].strip() for line in lines] == [row[0] for row in EXPECTED]
    assert "top 2 full; k-th best 0.5" in table

    assert main(["log", str(tmp_path), "--why", "model-00-0.5000"]) == 0
    why = capsys.readouterr().out
    assert "model-00-0.5000 was saved" in why and "(rank 1 of 2)" in why
    assert "evicted" in why and "by model-03-0.3000 (val_loss 0.3)" in why


def _damage(step_dir: Path) -> None:
    """Cut the largest array file of the model item short, as a full disk might."""
    files = [p for p in (step_dir / "model").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:-7])


def test_resume_records_the_skipped_damaged_checkpoint_and_the_restored_one(
    tmp_path: Path, shared: Trainer, capsys: pytest.CaptureFixture[str]
) -> None:
    _callback_run(shared, tmp_path, [0.5, 0.4, 0.3])
    _damage(tmp_path / "model-02-0.3000")

    shared.epochs = 4
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path))
    with (
        pytest.warns(CorruptCheckpointWarning, match="model-02-0.3000"),
        pytest.raises(StepError, match="quarantine"),
    ):
        shared.fit(callbacks=[checkpoint], resume=True)

    skipped, restored = DecisionHistory(tmp_path).read()[-2:]
    assert (skipped.kind, skipped.name, skipped.details["by"]) == (
        "skipped_corrupt",
        "model-02-0.3000",
        "resume",
    )
    assert "does not match its manifest" in str(skipped.details["error"])
    assert (restored.kind, restored.name, restored.details["by"]) == (
        "restored",
        "model-01-0.4000",
        "resume",
    )
    assert main(["log", str(tmp_path), "--why", "model-02-0.3000"]) == 0
    assert "skipped as corrupt" in capsys.readouterr().out


def test_a_reader_records_nothing(tmp_path: Path, shared: Trainer) -> None:
    _callback_run(shared, tmp_path, [0.5, 0.4])
    before = (tmp_path / HISTORY_FILE).read_bytes()
    with MetricCheckpointManager(
        tmp_path, options=ocp.CheckpointManagerOptions(read_only=True)
    ) as reader:
        load_checkpoint(reader, TinyMLP(nnx.Rngs(1)), "best")
    assert (tmp_path / HISTORY_FILE).read_bytes() == before


def test_the_history_is_append_only_across_runs(tmp_path: Path, shared: Trainer) -> None:
    _callback_run(shared, tmp_path, [0.5, 0.4])
    earlier = (tmp_path / HISTORY_FILE).read_bytes()
    shared.epochs = 4
    shared.fit(callbacks=[ModelCheckpoint(CheckpointConfig(dirpath=tmp_path))], resume=True)
    later = (tmp_path / HISTORY_FILE).read_bytes()
    assert later.startswith(earlier) and len(later) > len(earlier)
    kinds = [(d.kind, d.step) for d in DecisionHistory(tmp_path).read()]
    assert ("restored", 1) in kinds and ("saved", 3) in kinds


def test_a_damaged_history_is_skipped_and_continued(
    tmp_path: Path, shared: Trainer, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path.mkdir(exist_ok=True)
    old = Decision.saved(99, "model-99-0.1000", 0.1, rank=1, k=3, at=1.0)
    damage = b"\x00\xffnot json\n" + to_json_line(old).encode() + b'{"time": 2, "kind": "sav'
    (tmp_path / HISTORY_FILE).write_bytes(damage)
    _callback_run(shared, tmp_path, [0.5, 0.4])
    decisions = DecisionHistory(tmp_path).read()
    assert [(d.kind, d.step) for d in decisions] == [("saved", 99), ("saved", 0), ("saved", 1)]
    assert step_dirs(tmp_path) == {"model-00-0.5000", "model-01-0.4000"}
    assert main(["log", str(tmp_path)]) == 0
    assert "model-01-0.4000" in capsys.readouterr().out


def test_a_history_that_cannot_be_written_never_stops_training(
    tmp_path: Path, shared: Trainer
) -> None:
    (tmp_path / HISTORY_FILE).mkdir(parents=True)
    with pytest.warns(HistoryWarning, match="checkpointing is unaffected"):
        _callback_run(shared, tmp_path, [0.5, 0.4, 0.3], save_top_k=1)
    assert step_dirs(tmp_path) - {HISTORY_FILE} == {"model-02-0.3000"}


def test_the_history_stays_bounded(tmp_path: Path, shared: Trainer) -> None:
    tmp_path.mkdir(exist_ok=True)
    line = to_json_line(Decision.saved(0, "x" * 200, 0.5, rank=1, k=3, at=1.0)).encode()
    (tmp_path / HISTORY_FILE).write_bytes(line * (DEFAULT_MAX_BYTES // len(line)))
    _callback_run(shared, tmp_path, [0.5, 0.4, 0.3])
    size = (tmp_path / HISTORY_FILE).stat().st_size
    assert size <= DEFAULT_MAX_BYTES // 2 + 4096
    newest = [(d.kind, d.step) for d in DecisionHistory(tmp_path).read()][-3:]
    assert newest == [("saved", 0), ("saved", 1), ("saved", 2)]


# Pictures


def _drawn(data: PlotData) -> dict[str, list[tuple[float, float]]]:
    """What `draw_history` put on the axes: the line and each labelled scatter series."""
    figure = Figure()
    axes = figure.add_subplot()
    draw_history(axes, data)
    drawn = {"seen": [tuple(p) for p in axes.lines[0].get_xydata()]}
    for collection in axes.collections:
        drawn[collection.get_label()] = [tuple(p) for p in collection.get_offsets()]
    return drawn


def test_plotted_points_are_the_history_and_the_directory(tmp_path: Path, shared: Trainer) -> None:
    _callback_run(shared, tmp_path, LOSSES, save_top_k=2, save_last=False)
    data = plot_data(DecisionHistory(tmp_path).read(), "val_loss", "min", unit="epoch")
    drawn = _drawn(data)
    assert drawn["seen"] == list(enumerate(LOSSES))
    reader = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path))
    on_disk = sorted((step, reader.manager.score(step)) for step in reader.manager.all_steps())
    assert drawn["retained"] == on_disk == [(3, 0.3), (4, 0.35)]
    assert drawn["evicted"] == [(0, 0.5), (1, 0.4)]
    best = reader.manager.best_step()
    assert drawn["best"] == [(best, reader.best_score)] == [(3, 0.3)]
    reader.manager.close()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _pixels_near(image: np.ndarray, colour: tuple[float, float, float]) -> int:
    distance = np.abs(image[..., :3] - np.asarray(colour)).max(axis=-1)
    return int((distance < 0.03).sum())


def _assert_history_picture(path: Path, *, evicted: bool) -> None:
    assert _png_size(path.read_bytes()) == (800, 500)
    image = matplotlib.image.imread(path)
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10
    assert _pixels_near(image, GOLD) > 50 and _pixels_near(image, GREEN) > 50
    assert (_pixels_near(image, RED) > 50) is evicted


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("demo") / "run"
    console = Console(file=io.StringIO(), width=200)
    yield root, run_demo(root, epochs=5, console=console, progress=False)


def test_the_demo_draws_its_history_into_the_run_directory(demo_run: tuple[Path, Any]) -> None:
    root, result = demo_run
    assert result.matches
    assert result.curve == str(root / CURVE_FILE)
    _assert_history_picture(root / CURVE_FILE, evicted=True)
    saved = {d.step: d.score for d in DecisionHistory(root).read() if d.kind == "saved"}
    data = plot_data(DecisionHistory(root).read(), "val_loss", "min", unit="epoch")
    assert _drawn(data)["seen"] == sorted(saved.items())
    assert len(saved) == result.epochs_run == 5
    assert data.best.steps[0] == int(Path(result.best_path).name[4:6])


def test_log_and_plot_work_on_the_demo_directory(
    demo_run: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = demo_run
    assert main(["log", str(root)]) == 0
    assert "vae-00-" in capsys.readouterr().out
    evicted = next(d for d in DecisionHistory(root).read() if d.kind == "evicted")
    assert main(["log", str(root), "--why", str(evicted.name)]) == 0
    assert "evicted at" in capsys.readouterr().out
    output = tmp_path / "curve.png"
    assert main(["plot", str(root), "-o", str(output)]) == 0
    _assert_history_picture(output, evicted=True)


def test_the_docs_picture_is_a_small_demo_curve() -> None:
    assert DOCS_IMAGE.stat().st_size < 100_000
    _assert_history_picture(DOCS_IMAGE, evicted=True)


def test_finite_values_only_are_drawn(tmp_path: Path, shared: Trainer) -> None:
    _callback_run(shared, tmp_path, [0.5, math.nan, 0.4], save_top_k=3)
    data = plot_data(DecisionHistory(tmp_path).read(), "val_loss", "min")
    assert _drawn(data)["seen"] == [(0, 0.5), (2, 0.4)]


def test_why_tells_why_a_checkpoint_was_kept_and_how_it_went(
    tmp_path: Path, shared: Trainer
) -> None:
    # Validation every second epoch; the final epoch has none and is written unscored.
    shared.epochs = 5
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=tmp_path, save_top_k=1, every_n_epochs=2))
    values = [9.0, 0.3, 9.0, 0.5, 9.0]
    shared.fit(callbacks=[ScriptedMetric("val_loss", values), ValidateEvery(2), checkpoint])
    history = DecisionHistory(tmp_path)
    kept_as_newest = explain("model-03-0.5000", history.why("model-03-0.5000"), monitor="val_loss")
    assert "(rank 2, outside the top 1: kept as the newest)" in kept_as_newest
    assert "evicted at" in kept_as_newest and "by model-04-none (val_loss -)" in kept_as_newest
    unscored = explain("model-04-none", history.why("model-04-none"), monitor="val_loss")
    assert "(unscored: never the best, kept only while it is the newest)" in unscored
    assert step_dirs(tmp_path) == {"model-01-0.3000", "model-04-none"}


def test_the_journal_names_a_threshold_that_was_not_beaten(tmp_path: Path) -> None:
    settings = {"save_top_k": 2, "initial_value_threshold": 0.45}
    journal = Journal.of(plan_manager(epath.Path(tmp_path), None, settings))
    journal.declined(0, {"val_loss": 0.5}, kth=None)
    journal.declined(1, {"val_loss": 0.4}, kth=0.3)
    journal.flush()
    history = DecisionHistory(tmp_path)
    first, second = history.read()
    assert (first.details.get("threshold"), second.details.get("threshold")) == (0.45, None)
    text = explain("m", [Decision.not_saved(0, 0.5, k=2, kth=None, threshold=0.45, name="m")])
    assert text.endswith("score 0.5 does not beat initial_value_threshold 0.45.")


def test_a_checkpoint_short_of_the_threshold_is_never_drawn_as_the_best() -> None:
    below = Decision.saved(0, "m-0", 0.5, rank=None, k=2, threshold=0.45, at=1.0)
    assert plot_data([below], "val_loss", "min").best == Series()
    better = Decision.saved(1, "m-1", 0.4, rank=1, k=2, at=2.0)
    assert plot_data([below, better], "val_loss", "min").best.steps == (1,)
    with pytest.raises(ConfigError, match="unit="):
        plot_data([below], "val_loss", "min", unit="")
