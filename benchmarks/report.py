"""Figures, the rich table and `results/latest.json`."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp
from rich.console import Console
from rich.table import Table

from benchmarks.timing import Spread

RESULTS = Path(__file__).parent / "results" / "latest.json"


@dataclass(frozen=True)
class Figure:
    """One measured figure; `met` compares the median with the target, if there is one."""

    bench: str
    name: str
    spread: Spread
    fmt: str = ".3f"
    target: float | None = None
    sense: Literal["<=", ">="] = "<="
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.sense == "<=":
            return self.spread.median <= self.target
        return self.spread.median >= self.target

    @property
    def target_text(self) -> str:
        return "" if self.target is None else f"{self.sense} {self.target:g}"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "orbax": ocp.__version__,
    }


def show(figures: list[Figure], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("id", "figure", "median (min to max)", "target", "met", "note"):
        table.add_column(column, overflow="fold")
    marks = {True: "[green]yes[/]", False: "[red]NO[/]", None: ""}
    for fig in figures:
        table.add_row(
            fig.bench,
            fig.name,
            fig.spread.text(fig.fmt),
            fig.target_text,
            marks[fig.met],
            fig.note,
        )
    Console(width=160).print(table)


def write(figures: list[Figure], params: dict[str, Any], path: Path = RESULTS) -> None:
    rows = [
        {
            "bench": f.bench,
            "figure": f.name,
            **dataclasses.asdict(f.spread),
            "n": len(f.spread.values),
            "target": f.target_text or None,
            "met": f.met,
            "note": f.note,
            **f.extra,
        }
        for f in figures
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "params": params, "figures": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
