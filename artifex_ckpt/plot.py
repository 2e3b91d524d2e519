"""A picture of a run's decision history: the monitored metric over steps.

matplotlib is an optional extra (`pip install 'artifex-ckpt[plot]'`); it is imported
only when a plot is drawn, and drawn with the Agg canvas directly, so pyplot's global
backend (a notebook's, say) is left alone.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from etils import epath

from artifex_ckpt.errors import CheckpointError, ConfigError
from artifex_ckpt.history import Decision
from artifex_ckpt.validation import require_mode, require_monitor

__all__ = [
    "PlotData",
    "PlotDependencyError",
    "Series",
    "draw_history",
    "plot_data",
    "plot_history",
]

INSTALL_HINT = "pip install 'artifex-ckpt[plot]'"
# Kinds whose score is the metric's value at that step.
_VALUE_KINDS = frozenset(("evaluated", "saved", "not_saved"))
# Kinds after which a saved checkpoint is no longer in the run.
_GONE_KINDS = frozenset(("evicted", "quarantined"))

# Drawn over the points; a series without points is left out, so the legend lists only
# what is in the picture.
_MARKERS: dict[str, dict[str, Any]] = {
    "retained": {
        "s": 120,
        "facecolors": "none",
        "edgecolors": "tab:green",
        "linewidths": 2,
        "zorder": 3,
    },
    "evicted": {"s": 80, "marker": "x", "color": "tab:red", "linewidths": 2, "zorder": 3},
    "best": {"s": 260, "marker": "*", "color": "gold", "edgecolors": "black", "zorder": 4},
}


class PlotDependencyError(CheckpointError, ImportError):
    """matplotlib, needed to draw the history, is not installed."""


@dataclass(frozen=True)
class Series:
    """Points of one plotted series, in step order."""

    steps: tuple[int, ...] = ()
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class PlotData:
    """What `plot_history` drew. Only finite values can be drawn; others are left out.

    Attributes:
        monitor: The metric on the y axis.
        mode: "min" or "max".
        points: The value seen at each step (evaluated, saved or not saved), last one
            recorded winning.
        retained: Saved checkpoints that were not later evicted or quarantined.
        evicted: Checkpoints evicted by retention, at their own score.
        best: The best retained checkpoint (ties: the older) among those that beat the
            run's `initial_value_threshold`, or no point.
        unit: What numbers the checkpoints, on the x axis ("step" or "epoch").
    """

    monitor: str
    mode: str
    points: Series
    retained: Series
    evicted: Series
    best: Series
    unit: str = "step"


def plot_data(
    decisions: Iterable[Decision], monitor: str, mode: str, *, unit: str = "step"
) -> PlotData:
    """The series `plot_history` draws from `decisions` (in history order), without drawing.

    Example:
        ```python
        data = plot_data(DecisionHistory("/tmp/run").read(), "val_loss", "min")
        print(data.best)
        ```
    """
    require_monitor(monitor)
    require_mode(mode)
    if not isinstance(unit, str) or not unit:
        raise ConfigError(f"unit={unit!r} is not accepted; use a label such as 'step' or 'epoch'")
    values: dict[int, float] = {}
    saved: dict[int, float] = {}
    evicted: dict[int, float] = {}
    gone: set[int] = set()
    # Saved without beating initial_value_threshold: kept as the newest, never the best.
    outside: set[int] = set()
    for decision in decisions:
        raw = decision.score
        score = raw if raw is not None and math.isfinite(raw) else None
        if decision.kind in _VALUE_KINDS and score is not None:
            values[decision.step] = score
        if decision.kind == "saved":
            # A step saved again (after a restart) is in the run again.
            gone.discard(decision.step)
            saved.pop(decision.step, None)
            outside.discard(decision.step)
            if score is not None:
                saved[decision.step] = score
            if "threshold" in decision.details:
                outside.add(decision.step)
        if decision.kind in _GONE_KINDS:
            gone.add(decision.step)
            if decision.kind == "evicted" and score is not None:
                evicted[decision.step] = score
    retained = {step: value for step, value in saved.items() if step not in gone}
    best: dict[int, float] = {}
    competing = [step for step in retained if step not in outside]
    if competing:
        # Better score first, then the older checkpoint, as the manager ranks them.
        sign = 1.0 if mode == "min" else -1.0
        step = min(competing, key=lambda s: (sign * retained[s], s))
        best = {step: retained[step]}
    return PlotData(
        monitor=monitor,
        mode=mode,
        unit=unit,
        points=_series(values),
        retained=_series(retained),
        evicted=_series(evicted),
        best=_series(best),
    )


def plot_history(
    decisions: Iterable[Decision],
    monitor: str,
    mode: str,
    output: str | os.PathLike[str] | epath.Path,
    *,
    size: tuple[float, float] = (8, 5),
    dpi: int = 100,
    unit: str = "step",
) -> PlotData:
    """Draw `monitor` over steps from a decision history into the PNG file `output`.

    Every value seen is a point; retained checkpoints are ringed, evicted ones crossed
    out, the best starred. The image is `size` inches times `dpi` pixels per inch; the x
    axis is labelled `unit` (the run's counter: "step", or "epoch" for an epoch cadence).
    Raises `PlotDependencyError` naming `pip install 'artifex-ckpt[plot]'` when
    matplotlib is missing.

    Example:
        ```python
        history = DecisionHistory("/tmp/run")
        plot_history(history.read(), "val_loss", "min", "/tmp/run-history.png")
        ```
    """
    _require_size(size, dpi)
    data = plot_data(decisions, monitor, mode, unit=unit)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotDependencyError(
            f"plotting the decision history needs matplotlib, which is not installed; "
            f"install it with {INSTALL_HINT}"
        ) from err
    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    draw_history(figure.add_subplot(), data)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    path = epath.Path(output)
    try:
        path.write_bytes(buffer.getvalue())
    except OSError as err:
        raise CheckpointError(
            f"cannot write the plot to {os.fspath(path)!r} ({type(err).__name__}: {err}); "
            "pass a file path in an existing, writable directory"
        ) from err
    return data


def draw_history(axes: Any, data: PlotData) -> None:
    """Draw `data` (from `plot_data`) on matplotlib `axes`: to put the history in a figure
    of your own, such as a notebook's.

    Example:
        ```python
        from matplotlib.figure import Figure

        figure = Figure()
        data = plot_data(DecisionHistory("/tmp/run").read(), "val_loss", "min")
        draw_history(figure.add_subplot(), data)
        ```
    """
    best = (
        f"; best {data.best.values[0]:.6g} at {data.unit} {data.best.steps[0]}"
        if data.best.steps
        else ""
    )
    axes.set_title(f"{data.monitor} ({data.mode}){best}")
    axes.set_xlabel(data.unit)
    # Checkpoints are numbered by integers; a tick at 2.5 would name no checkpoint.
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_ylabel(data.monitor)
    axes.grid(True, alpha=0.3)
    if not data.points.steps and not data.evicted.steps:
        axes.text(
            0.5,
            0.5,
            f"no finite {data.monitor} in the history",
            ha="center",
            transform=axes.transAxes,
        )
        return
    if data.points.steps:
        axes.plot(
            data.points.steps,
            data.points.values,
            "-o",
            color="tab:blue",
            markersize=4,
            linewidth=1,
            alpha=0.7,
            label="seen",
        )
    for label, style in _MARKERS.items():
        series = getattr(data, label)
        if series.steps:
            axes.scatter(series.steps, series.values, label=label, **style)
    axes.legend(loc="best")


def _series(points: dict[int, float]) -> Series:
    steps = tuple(sorted(points))
    return Series(steps=steps, values=tuple(points[step] for step in steps))


def _require_size(size: tuple[float, float], dpi: int) -> None:
    if (
        not isinstance(size, tuple | list)
        or len(size) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ConfigError(f"size={size!r} is not accepted; use (width, height) inches > 0")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ConfigError(f"dpi={dpi!r} is not accepted; use an integer > 0")
