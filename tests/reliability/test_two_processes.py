"""Two JAX processes on localhost save a globally sharded state and restore the best."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_pair(directory: Path, phase: str) -> list[dict[str, object]]:
    port = _free_port()
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability.two_process_child",
                str(port),
                str(pid),
                str(directory),
                phase,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_save_and_restore_sharded_state(tmp_path: Path) -> None:
    directory = (tmp_path / "shared").absolute()
    saved = _run_pair(directory, "save")
    expected_names = ["g-01-0.200", "g-02-0.400"]
    for result in saved:
        assert result == {"names": expected_names, "best": 1, "shards_ok": True}
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == expected_names

    reopened = _run_pair(directory, "restore")
    assert reopened == saved
