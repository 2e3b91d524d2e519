"""The artifex-ckpt command on real run directories, intact and damaged at the OS level.

Most tests copy one small run written by a real `MetricCheckpointManager` (three retained
checkpoints, with manifests and a decision history), damage the copy, and run the command
in-process; a few run `python -m artifex_ckpt` as a subprocess, as a user would.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from rich.console import Console

from artifex_ckpt import CheckpointConfig, MetricCheckpointManager, ModelCheckpoint
from artifex_ckpt.cli import main
from artifex_ckpt.table import checkpoint_table
from tests.gcs_emulator import Emulator
from tests.training import ScriptedMetric, make_trainer

TEMPLATE = "ck-{epoch}-{val_loss:.3f}"
LOSSES = (0.5, 0.3, 0.4, 0.6)
# save_top_k=2 keeps the two best (0.3, 0.4) and the newest (0.6); 0.5 is evicted.
RETAINED = ("ck-1-0.300", "ck-2-0.400", "ck-3-0.600")
SUBPROCESS_TIMEOUT_S = 60
THREAD_TIMEOUT_S = 30


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def _write_run(directory: str | os.PathLike[str], filename: str | None = TEMPLATE) -> None:
    with MetricCheckpointManager(
        directory, monitor="val_loss", save_top_k=2, filename=filename
    ) as manager:
        for step, loss in enumerate(LOSSES):
            state = {"w": np.arange(4, dtype=np.float32) * step}
            manager.save(step, args=ocp.args.StandardSave(state), metrics={"val_loss": loss})
        manager.wait_until_finished()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared") / "run"
    _write_run(root)
    return root


@pytest.fixture
def run(prepared: Path, tmp_path: Path) -> Path:
    """A fresh copy of the prepared run, free to damage."""
    target = tmp_path / "run"
    shutil.copytree(prepared, target, symlinks=True)
    return target


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_error(err: str) -> str:
    """The single `error:` line of stderr, which holds nothing but warning/error lines."""
    lines = err.splitlines()
    assert "Traceback" not in err
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def warnings_of(err: str) -> list[str]:
    lines = err.splitlines()
    assert all(line.startswith("warning: ") for line in lines), err
    return lines


def rows(output: str) -> dict[str, list[str]]:
    """Table rows by checkpoint name: the cells of each row."""
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines()]
    return {row[1]: row for row in cells if len(row) == 7 and row[0].isdigit()}


def data_file(step_dir: Path) -> Path:
    """The largest array file of a checkpoint."""
    files = [p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


# --- ls and best on runs written by ModelCheckpoint --------------------------------------


def _model_checkpoint_run(root: Path) -> ModelCheckpoint:
    checkpoint = ModelCheckpoint(CheckpointConfig(dirpath=root, save_top_k=2))
    make_trainer(epochs=4).fit(
        callbacks=[ScriptedMetric("val_loss", [0.5, 0.3, 0.4, 0.6]), checkpoint]
    )
    return checkpoint


def test_ls_and_best_on_a_model_checkpoint_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _model_checkpoint_run(tmp_path)
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    cells = {
        row[1]: row
        for line in out.splitlines()
        if "│ model-" in line
        for row in [[c.strip() for c in line.split("│")[1:-1]]]
    }
    assert set(cells) == {"model-01-0.3000", "model-02-0.4000", "model-03-0.6000"}
    # columns: step, name, val_loss, best, last, size, time
    assert [cells[n][3] for n in sorted(cells)] == ["*", "", ""]
    assert [cells[n][4] for n in sorted(cells)] == ["", "", "*"]
    assert cells["model-01-0.3000"][0] == "1" and cells["model-01-0.3000"][2] == "0.3"
    assert all(cell[5].endswith("KiB") for cell in cells.values())
    assert main(["best", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(checkpoint.best_checkpoint_path)


@pytest.mark.parametrize("command", ["ls", "best", "verify", "log"])
def test_missing_or_empty_directory_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    status, _, err = cli(capsys, command, tmp_path / "nope")
    assert status == 1 and "no such checkpoint directory" in one_error(err)
    (tmp_path / "empty").mkdir()
    status, _, err = cli(capsys, command, tmp_path / "empty")
    assert status == 1
    assert ("no checkpoint" if command != "log" else "no decision history") in one_error(err)
    assert list((tmp_path / "empty").iterdir()) == []


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", str(tmp_path / "demo"), "--epochs", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "vae-02-" in out and ": match" in out
    assert len([p for p in (tmp_path / "demo").iterdir() if p.name.startswith("vae-")]) == 3


def test_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for word in ("demo", "ls", "best", "verify", "quarantine", "log", "plot"):
        assert word in help_text


def test_module_entry_point_exit_status(tmp_path: Path) -> None:
    failed = subprocess.run(
        [sys.executable, "-m", "artifex_ckpt", "best", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert failed.returncode == 1
    assert (
        one_error(failed.stderr) == f"error: {tmp_path / 'missing'}: no such checkpoint directory"
    )


# --- verify ------------------------------------------------------------------------------


def test_verify_reports_every_checkpoint_ok(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flags in ([], ["--shallow"]):
        status, out, err = cli(capsys, "verify", run, *flags)
        assert (status, err) == (0, "")
        assert out.splitlines() == [f"{name}: ok" for name in RETAINED]


def test_verify_deep_finds_a_flipped_byte_that_shallow_misses(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = data_file(run / "ck-2-0.400")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    status, out, _ = cli(capsys, "verify", run)
    assert status == 1
    lines = out.splitlines()
    assert lines[0] == "ck-1-0.300: ok" and lines[2] == "ck-3-0.600: ok"
    relative = damaged.relative_to(run / "ck-2-0.400").as_posix()
    assert lines[1].startswith(f"ck-2-0.400: MISMATCH: {relative}: checksum differs")
    # Same size: a check of sizes alone cannot see it.
    status, out, _ = cli(capsys, "verify", run, "--shallow")
    assert status == 0 and "ck-2-0.400: ok" in out.splitlines()


def test_verify_names_one_checkpoint_by_step_or_name(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "verify", run, "3")[:2] == (0, "ck-3-0.600: ok\n")
    assert cli(capsys, "verify", run, "ck-1-0.300")[:2] == (0, "ck-1-0.300: ok\n")
    status, out, err = cli(capsys, "verify", run, "ck-9-0.100")
    assert (status, out) == (1, "")
    message = one_error(err)
    assert "no checkpoint 'ck-9-0.100'" in message and "2 (ck-2-0.400)" in message


def test_verify_calls_a_checkpoint_without_manifest_unverified(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "ck-1-0.300" / "artifex_manifest.json").unlink()
    status, out, _ = cli(capsys, "verify", run)
    assert status == 0
    assert out.splitlines()[0] == (
        "ck-1-0.300: unverified (no manifest: written before manifests existed)"
    )


# --- quarantine, log, plot -----------------------------------------------------------------


def test_quarantine_moves_a_checkpoint_aside_and_says_how_to_undo(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = cli(capsys, "quarantine", run, "ck-2-0.400", "--reason", "bad bytes")
    assert (status, err) == (0, "")
    target = run / ".artifex-quarantine" / "ck-2-0.400"
    lines = out.splitlines()
    assert lines[0] == f"moved ck-2-0.400 to {target}"
    assert target.is_dir() and not (run / "ck-2-0.400").exists()
    assert set(rows(cli(capsys, "ls", run)[1])) == {"ck-1-0.300", "ck-3-0.600"}
    why = cli(capsys, "log", run, "--why", "ck-2-0.400")[1]
    assert "quarantined at" in why and f"to {target}: bad bytes" in why
    # Still verifiable where it is, by name.
    pen = run / ".artifex-quarantine"
    assert cli(capsys, "verify", pen, "ck-2-0.400")[:2] == (0, "ck-2-0.400: ok\n")
    # The printed undo command, run as printed, brings it back.
    undo = lines[-1].removeprefix("to undo, move it back: ")
    assert undo != lines[-1]
    subprocess.run(shlex.split(undo), check=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert set(rows(cli(capsys, "ls", run)[1])) == set(RETAINED)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../run", "not a checkpoint name"),
        ("artifex_ckpt.json", "is a regular file, not a checkpoint directory"),
        (".artifex-quarantine", "is hidden"),
        ("ck-9-0.100", "does not exist; checkpoints: ['ck-1-0.300', 'ck-2-0.400', 'ck-3-0.600']"),
    ],
)
def test_quarantine_refuses_what_is_not_a_checkpoint(
    run: Path, capsys: pytest.CaptureFixture[str], name: str, expected: str
) -> None:
    (run / ".artifex-quarantine").mkdir()
    before = sorted(p.name for p in run.iterdir())
    status, out, err = cli(capsys, "quarantine", run, name)
    assert (status, out) == (1, "")
    assert expected in one_error(err)
    assert sorted(p.name for p in run.iterdir()) == before
    assert list((run / ".artifex-quarantine").iterdir()) == []


def test_log_prints_the_history_oldest_first(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(capsys, "log", run)
    assert (status, err) == (0, "")
    table = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines()]
    events = [(row[1], row[3]) for row in table if len(row) == 6 and row[1] != "kind"]
    assert events == [
        ("saved", "ck-0-0.500"),
        ("saved", "ck-1-0.300"),
        ("saved", "ck-2-0.400"),
        ("evicted", "ck-0-0.500"),
        ("saved", "ck-3-0.600"),
    ]
    assert "val_loss" in out.splitlines()[2]


def test_log_why_explains_an_evicted_checkpoint(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = cli(capsys, "log", run, "--why", "ck-0-0.500")
    assert status == 0
    assert out.startswith("ck-0-0.500 was saved at ")
    assert "with val_loss 0.5" in out and "evicted at" in out
    assert "by ck-2-0.400 (val_loss 0.4)" in out


def test_log_and_plot_without_history_exit_1(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / "artifex_history.jsonl").unlink()
    for argv in (["log", run], ["plot", run, "-o", run / "x.png"]):
        status, _, err = cli(capsys, *argv)
        assert status == 1 and "has no decision history" in one_error(err)
    assert not (run / "x.png").exists()


def test_plot_writes_a_png_of_the_monitored_metric(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "curve.png"
    status, out, err = cli(capsys, "plot", run, "-o", output)
    assert (status, err) == (0, "")
    assert out.strip() == f"wrote {output}: 4 values of val_loss (min); best 0.3 at step 1"
    assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_without_matplotlib_names_the_install_command(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry makes the import fail, as it does where matplotlib is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    status, _, err = cli(capsys, "plot", run, "-o", tmp_path / "curve.png")
    assert status == 1
    assert one_error(err).endswith("install it with pip install 'artifex-ckpt[plot]'")
    assert not (tmp_path / "curve.png").exists()


# --- robustness: damage at the OS level ----------------------------------------------------


def test_garbled_metrics_are_read_from_the_name_with_one_warning(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "ck-2-0.400" / "metrics" / "metrics").write_text('{"val_loss": 0.4')
    status, out, err = cli(capsys, "ls", run)
    assert status == 0 and set(rows(out)) == set(RETAINED)
    assert rows(out)["ck-2-0.400"][2] == "0.4"
    (warning,) = warnings_of(err)
    assert "ck-2-0.400" in warning and "cannot be read" in warning
    status, out, _ = cli(capsys, "best", run)
    assert (status, out.strip()) == (0, str(run / "ck-1-0.300"))


@pytest.mark.parametrize("damage", ["[]", "null", "directory"])
def test_damaged_settings_file_is_one_error_line(
    run: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    settings = run / "artifex_ckpt.json"
    settings.unlink()
    if damage == "directory":
        settings.mkdir()
    else:
        settings.write_text(damage)
    for command in ("ls", "best", "verify"):
        status, out, err = cli(capsys, command, run)
        assert (status, out) == (1, "")
        assert str(settings) in one_error(err)
    # The history needs no settings: it falls back to calling the value "score".
    status, out, err = cli(capsys, "log", run)
    assert status == 0 and "ck-3-0.600" in out
    (warning,) = warnings_of(err)
    assert str(settings) in warning and "'score'" in warning


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root reads through chmod 000; "
    "test_wrong_file_types_inside_a_checkpoint damages the same files by type instead",
)
def test_unreadable_subdirectory_is_reported_not_raised(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = run / "ck-2-0.400" / "metrics"
    metrics.chmod(0)
    try:
        for command in ("ls", "best"):
            status, out, err = cli(capsys, command, run)
            assert "Traceback" not in err and len(err.splitlines()) <= 1
            assert status == 0 or one_error(err)
        status, out, _ = cli(capsys, "verify", run)
        assert status == 1 and "ck-2-0.400: MISMATCH: metrics/" in out
    finally:
        metrics.chmod(0o755)


def test_wrong_file_types_inside_a_checkpoint(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    step = run / "ck-2-0.400"
    shutil.rmtree(step / "metrics")
    (step / "metrics").write_text("not a directory")
    (step / "_CHECKPOINT_METADATA").unlink()
    (step / "_CHECKPOINT_METADATA").mkdir()
    status, out, err = cli(capsys, "ls", run)
    assert status == 0 and set(rows(out)) == set(RETAINED)
    assert rows(out)["ck-2-0.400"][6] == "?"  # no readable commit time
    assert all("ck-2-0.400" in line for line in warnings_of(err))
    status, out, _ = cli(capsys, "verify", run)
    assert status == 1
    assert out.splitlines()[1].startswith("ck-2-0.400: MISMATCH: ")
    assert "_CHECKPOINT_METADATA: is a directory now" in out


def test_rich_markup_in_paths_is_printed_verbatim(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "x[/]y[bold red]"
    shutil.copytree(prepared, run)
    status, out, _ = cli(capsys, "ls", run)
    assert status == 0 and str(run) in out and set(rows(out)) == set(RETAINED)
    assert cli(capsys, "best", run)[1].strip() == str(run / "ck-1-0.300")
    missing = tmp_path / "gone[/red]:smile:"
    status, _, err = cli(capsys, "best", missing)
    assert one_error(err) == f"error: {missing}: no such checkpoint directory"


@pytest.mark.parametrize("command", ["ls", "best", "verify", "log"])
@pytest.mark.parametrize("relative", ["metrics/metrics", "_CHECKPOINT_METADATA"])
def test_a_fifo_in_a_checkpoint_never_blocks(
    run: Path, capsys: pytest.CaptureFixture[str], command: str, relative: str
) -> None:
    fifo = run / "ck-2-0.400" / relative
    fifo.unlink()
    os.mkfifo(fifo)
    status = _main_or_fail(fifo, [command, str(run)])
    out, err = capsys.readouterr()
    if command in ("ls", "best"):
        # A manager opening the run would block on it: refused, naming the way out.
        assert status == 1
        message = one_error(err)
        assert f"{fifo} is a FIFO" in message
        assert f"artifex-ckpt quarantine {run} ck-2-0.400" in message
        # The way out works, and the run opens again without it.
        assert _main_or_fail(fifo, ["quarantine", str(run), "ck-2-0.400"]) == 0
        capsys.readouterr()
        assert _main_or_fail(fifo, [command, str(run)]) == 0
        out = capsys.readouterr().out
        assert "ck-2-0.400" not in out and "ck-1-0.300" in out
    elif command == "verify":
        assert status == 1
        assert f"ck-2-0.400: MISMATCH: {relative}: is a FIFO now" in out
    else:
        assert status == 0 and "ck-2-0.400" in out


@pytest.mark.parametrize("command", ["log", "plot"])
def test_a_fifo_in_place_of_the_history_never_blocks(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    fifo = run / "artifex_history.jsonl"
    fifo.unlink()
    os.mkfifo(fifo)
    argv = [command, str(run)] + (["-o", str(tmp_path / "c.png")] if command == "plot" else [])
    assert _main_or_fail(fifo, argv) == 1
    assert f"{fifo} is a FIFO" in one_error(capsys.readouterr().err)


def _main_or_fail(fifo: Path, argv: Sequence[str]) -> int:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    thread.start()
    thread.join(THREAD_TIMEOUT_S)
    if thread.is_alive():
        # Opening the write end releases the blocked reader, so the thread ends.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(THREAD_TIMEOUT_S)
        pytest.fail(f"artifex-ckpt {' '.join(argv)} blocked on the FIFO {fifo}")
    return result[0]


def test_a_fifo_never_blocks_a_subprocess_whose_error_is_one_line(run: Path) -> None:
    fifo = run / "ck-2-0.400" / "metrics" / "metrics"
    fifo.unlink()
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "artifex_ckpt", "ls", str(run)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env={**os.environ, "COLUMNS": "40"},  # a long message, a narrow terminal
    )
    assert done.returncode == 1 and done.stdout == ""
    message = one_error(done.stderr)
    assert f"{fifo} is a FIFO" in message
    assert len(message) > 200 and done.stderr.count("\n") == 1


def test_deleted_settings_with_template_names_say_what_is_missing(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "artifex_ckpt.json").unlink()
    for command in ("ls", "best", "verify"):
        status, _, err = cli(capsys, command, run)
        assert status == 1
        assert one_error(err).startswith(
            f"error: {run} has 3 checkpoint directories (ck-1-0.300, ck-2-0.400, ck-3-0.600) "
            "but no artifex_ckpt.json; without its filename template"
        )


def test_deleted_settings_with_numeric_names_still_list_them_without_links(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_run(tmp_path / "numeric", filename=None)
    (tmp_path / "numeric" / "artifex_ckpt.json").unlink()
    # Orbax's numeric names list this link as step 7, the newest; it is not a checkpoint.
    (tmp_path / "numeric" / "7").symlink_to(".")
    status, out, _ = cli(capsys, "ls", tmp_path / "numeric")
    assert status == 0
    listed = rows(out)
    assert list(listed) == ["1", "2", "3"]
    assert listed["1"][3] == "*" and listed["3"][4] == "*"
    assert cli(capsys, "best", tmp_path / "numeric")[1].strip() == str(tmp_path / "numeric" / "1")


def test_a_symlink_named_like_a_checkpoint_is_not_one(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its name claims the best score of all; it leads back to the run itself.
    (run / "ck-7-0.100").symlink_to(".")
    status, out, _ = cli(capsys, "ls", run)
    assert status == 0 and set(rows(out)) == set(RETAINED)
    assert rows(out)["ck-3-0.600"][4] == "*"  # still the newest
    assert cli(capsys, "best", run)[1].strip() == str(run / "ck-1-0.300")
    status, out, _ = cli(capsys, "verify", run)
    assert status == 0 and "ck-7" not in out


def test_a_checkpoint_linked_from_another_disk_is_listed_chosen_and_verified(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The best checkpoint moved to another disk and linked back: the manager restores it
    # through the link, so the CLI shows, chooses and checks it as well.
    elsewhere = tmp_path / "other-disk" / "ck-1-0.300"
    elsewhere.parent.mkdir()
    shutil.move(run / "ck-1-0.300", elsewhere)
    (run / "ck-1-0.300").symlink_to(elsewhere)
    status, out, _ = cli(capsys, "ls", run)
    assert status == 0 and set(rows(out)) == set(RETAINED)
    assert rows(out)["ck-1-0.300"][3] == "*"
    assert rows(out)["ck-1-0.300"][5] == rows(out)["ck-2-0.400"][5]  # sized through the link
    assert cli(capsys, "best", run)[1].strip() == str(run / "ck-1-0.300")
    status, out, _ = cli(capsys, "verify", run)
    assert status == 0 and "ck-1-0.300" in out


def test_table_marks_a_checkpoint_that_vanished_after_listing(run: Path) -> None:
    options = ocp.CheckpointManagerOptions(read_only=True)
    with MetricCheckpointManager(run, options=options) as manager:
        shutil.rmtree(run / "ck-2-0.400")
        buffer = io.StringIO()
        Console(file=buffer, width=200).print(checkpoint_table(manager))
        table = rows(buffer.getvalue())
    assert set(table) == set(RETAINED)
    assert table["ck-2-0.400"][5:] == ["-", "gone"]
    assert table["ck-1-0.300"][6] != "gone"


# --- object store --------------------------------------------------------------------------


def test_every_command_on_gcs(
    gcs_dir: epath.Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], gcs_bucket: Emulator
) -> None:
    _write_run(gcs_dir)
    status, out, _ = cli(capsys, "ls", gcs_dir)
    assert status == 0 and set(rows(out)) == set(RETAINED)
    assert cli(capsys, "verify", gcs_dir)[:2] == (0, "".join(f"{n}: ok\n" for n in RETAINED))
    status, out, err = cli(capsys, "quarantine", gcs_dir, "ck-2-0.400", "--reason", "test")
    assert (status, err) == (0, "")
    target = f"{gcs_dir}/.artifex-quarantine/ck-2-0.400"
    assert out.splitlines()[0] == f"moved ck-2-0.400 to {target}"
    assert out.splitlines()[-1] == (
        f"to undo, move it back: gcloud storage mv {target} {gcs_dir}/ck-2-0.400"
    )
    assert "quarantined at" in cli(capsys, "log", gcs_dir, "--why", "ck-2-0.400")[1]
    assert cli(capsys, "plot", gcs_dir, "-o", tmp_path / "c.png")[0] == 0
    # A subprocess finds the emulator through the inherited environment.
    done = subprocess.run(
        [sys.executable, "-m", "artifex_ckpt", "verify", str(gcs_dir)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert (done.returncode, done.stdout) == (0, "ck-1-0.300: ok\nck-3-0.600: ok\n")
