"""Plotting a real decision history: the PNG on disk, its pixels, and what was drawn."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from artifex_ckpt.errors import CheckpointError, ConfigError
from artifex_ckpt.history import Decision, DecisionHistory
from artifex_ckpt.plot import PlotData, PlotDependencyError, Series, plot_data, plot_history

T0 = 1_700_000_000.0
LOSSES = [0.9, 0.5, 0.7, 0.4, math.nan, 0.45, 0.3, 0.6]
GOLD = (1.0, 215 / 255, 0.0)  # the best's star
RED = (214 / 255, 39 / 255, 40 / 255)  # tab:red, evicted crosses


def _run(directory: Path) -> list[Decision]:
    """The history a top-2 run with keep_last=False writes for `LOSSES`, read back."""
    history = DecisionHistory(directory)
    kept: dict[int, float] = {}
    for step, loss in enumerate(LOSSES):
        at = T0 + step
        history.append(Decision.evaluated(step, loss, at=at))
        ranked = sorted(kept.values())
        if math.isnan(loss) or (len(ranked) == 2 and loss >= ranked[-1]):
            history.append(Decision.not_saved(step, loss, k=2, kth=ranked[-1], at=at))
            continue
        name = f"model-{step:02d}"
        kept[step] = loss
        rank = sorted(kept.values()).index(loss) + 1
        history.append(Decision.saved(step, name, loss, rank=rank, k=2, at=at))
        if len(kept) > 2:
            worst = max(kept, key=lambda s: kept[s])
            history.append(
                Decision.evicted(
                    worst,
                    f"model-{worst:02d}",
                    kept.pop(worst),
                    by=name,
                    by_step=step,
                    by_score=loss,
                    at=at,
                )
            )
    return history.read()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _pixels_near(image: np.ndarray, colour: tuple[float, float, float]) -> int:
    distance = np.abs(image[..., :3] - np.asarray(colour)).max(axis=-1)
    return int((distance < 0.03).sum())


def test_plot_is_a_png_of_the_requested_size_and_not_blank(tmp_path: Path) -> None:
    import matplotlib.image

    output = tmp_path / "history.png"
    plot_history(_run(tmp_path / "run"), "val_loss", "min", output, size=(4, 3), dpi=50)
    assert _png_size(output.read_bytes()) == (200, 150)
    image = matplotlib.image.imread(output)
    assert image.shape[:2] == (150, 200)
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 1
    assert _pixels_near(image, GOLD) > 0
    assert _pixels_near(image, RED) > 0


def test_plot_data_are_the_history_values(tmp_path: Path) -> None:
    decisions = _run(tmp_path / "run")
    data = plot_history(decisions, "val_loss", "min", tmp_path / "h.png", size=(3, 2), dpi=40)
    finite = [(step, loss) for step, loss in enumerate(LOSSES) if not math.isnan(loss)]
    assert data == PlotData(
        monitor="val_loss",
        mode="min",
        points=Series(tuple(s for s, _ in finite), tuple(v for _, v in finite)),
        retained=Series((3, 6), (0.4, 0.3)),
        evicted=Series((0, 1, 2, 5), (0.9, 0.5, 0.7, 0.45)),
        best=Series((6,), (0.3,)),
    )
    # And it agrees with the history, decision by decision.
    saved = {d.step for d in decisions if d.kind == "saved"}
    evicted = {d.step for d in decisions if d.kind == "evicted"}
    assert set(data.retained.steps) == saved - evicted
    assert set(data.evicted.steps) == evicted


def test_max_mode_picks_the_highest_and_ties_go_to_the_older() -> None:
    decisions = [
        Decision.saved(1, "a", 0.8, rank=1, k=3, at=T0),
        Decision.saved(2, "b", 0.9, rank=1, k=3, at=T0),
        Decision.saved(3, "c", 0.9, rank=2, k=3, at=T0),
        Decision.saved(4, "d", math.inf, rank=None, k=3, at=T0),
    ]
    data = plot_data(decisions, "val_acc", "max")
    assert data.best == Series((2,), (0.9,))
    assert data.retained == Series((1, 2, 3), (0.8, 0.9, 0.9))
    assert data.points.steps == (1, 2, 3)


def test_without_evictions_nothing_is_crossed_out(tmp_path: Path) -> None:
    import matplotlib.image

    decisions = [Decision.saved(s, f"m{s}", 1.0 / (s + 1), rank=1, k=-1) for s in range(4)]
    output = tmp_path / "kept.png"
    data = plot_history(decisions, "val_loss", "min", output, size=(4, 3), dpi=50)
    assert data.evicted == Series()
    image = matplotlib.image.imread(output)
    assert _pixels_near(image, RED) == 0
    assert _pixels_near(image, GOLD) > 0


def test_empty_history_still_draws(tmp_path: Path) -> None:
    output = tmp_path / "empty.png"
    data = plot_history([], "val_loss", "min", output, size=(2, 2), dpi=30)
    assert data.points == Series() and data.best == Series()
    assert _png_size(output.read_bytes()) == (60, 60)


def test_missing_matplotlib_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "nothing.png"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        # Its submodules too, when an earlier test imported them.
        for module in [m for m in sys.modules if m.startswith("matplotlib.")]:
            patch.setitem(sys.modules, module, None)
        with pytest.raises(PlotDependencyError) as caught:
            plot_history([], "val_loss", "min", output)
    assert "pip install 'artifex-ckpt[plot]'" in str(caught.value)
    assert isinstance(caught.value, CheckpointError) and isinstance(caught.value, ImportError)
    assert not output.exists()


def test_bad_arguments_are_refused_with_the_field_named(tmp_path: Path) -> None:
    output = tmp_path / "x.png"
    with pytest.raises(ConfigError, match=r"mode='lowest' is not accepted; use 'min' or 'max'"):
        plot_history([], "val_loss", "lowest", output)
    with pytest.raises(ConfigError, match=r"size=\(0, 3\) is not accepted"):
        plot_history([], "val_loss", "min", output, size=(0, 3))
    with pytest.raises(ConfigError, match=r"dpi=0 is not accepted"):
        plot_history([], "val_loss", "min", output, dpi=0)
    with pytest.raises(CheckpointError, match=r"cannot write the plot to .*missing.*x\.png"):
        plot_history([], "val_loss", "min", tmp_path / "missing" / "x.png", size=(1, 1), dpi=10)
    assert list(tmp_path.iterdir()) == []
