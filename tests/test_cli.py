"""The artifex-ckpt command on real directories written by ModelCheckpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from artifex_ckpt import CheckpointConfig, ModelCheckpoint
from artifex_ckpt.cli import main
from tests.test_callbacks import ScriptedMetric
from tests.training import make_trainer


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def _run_dir(root: Path) -> ModelCheckpoint:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=root, save_top_k=2))
    losses = [0.5, 0.3, 0.4, 0.6]
    make_trainer(epochs=4).fit(callbacks=[ScriptedMetric("val_loss", losses), checkpoint])
    return checkpoint


def _rows(output: str) -> dict[str, str]:
    return {line.split("│")[2].strip(): line for line in output.splitlines() if "│ model-" in line}


def test_ls_lists_every_checkpoint_and_marks_best_and_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_dir(tmp_path)
    assert main(["ls", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"model-01-0.3000", "model-02-0.4000", "model-03-0.6000"}
    cells = {name: [c.strip() for c in line.split("│")[1:-1]] for name, line in rows.items()}
    # columns: step, name, val_loss, best, last, size, time
    assert [cells[n][3] for n in sorted(cells)] == ["*", "", ""]
    assert [cells[n][4] for n in sorted(cells)] == ["", "", "*"]
    assert cells["model-01-0.3000"][0] == "1" and cells["model-01-0.3000"][2] == "0.3"
    assert all(cell[5].endswith("KiB") for cell in cells.values())


def test_best_prints_the_callbacks_best_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _run_dir(tmp_path)
    assert main(["best", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(checkpoint.best_checkpoint_path)


@pytest.mark.parametrize("command", ["ls", "best"])
def test_missing_or_empty_directory_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert main([command, str(tmp_path / "nope")]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([command, str(tmp_path / "empty")]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", str(tmp_path / "demo"), "--epochs", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "vae-02-" in out and ": match" in out
    assert len([p for p in (tmp_path / "demo").iterdir() if p.name.startswith("vae-")]) == 3


def test_module_entry_point_help_and_exit_status(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "artifex_ckpt", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for word in ("demo", "ls", "best"):
        assert word in help_text
    failed = subprocess.run(
        [sys.executable, "-m", "artifex_ckpt", "best", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and "no such checkpoint directory" in failed.stderr
