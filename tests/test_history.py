"""The decision history on real directories: what is on disk, what reads back, what it says."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from etils import epath
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from artifex_ckpt.errors import ConfigError
from artifex_ckpt.history import (
    HISTORY_FILE,
    KINDS,
    Decision,
    DecisionHistory,
    HistoryWarning,
    explain,
    format_table,
    to_json_line,
)

T0 = 1_700_000_000.0


def _norm(decision: Decision) -> tuple[Any, ...]:
    """A comparable form: NaN equals NaN, and details compare as a sorted tuple."""

    def value(v: Any) -> Any:
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return (
        decision.time,
        decision.kind,
        decision.step,
        decision.name,
        value(decision.score),
        tuple(sorted((k, value(v)) for k, v in decision.details.items())),
    )


def _norms(decisions: Sequence[Decision]) -> list[tuple[Any, ...]]:
    return [_norm(d) for d in decisions]


def _one_of_each() -> list[Decision]:
    return [
        Decision.evaluated(0, 0.9, eligible=False, at=T0),
        Decision.saved(1, "model-01-0.5000", 0.5, rank=1, k=2, at=T0 + 1),
        Decision.not_saved(2, 0.7, k=2, kth=0.6, name="model-02-0.7000", at=T0 + 2),
        Decision.evicted(
            1, "model-01-0.5000", 0.5, by="model-03-0.4000", by_step=3, by_score=0.4, at=T0 + 3
        ),
        Decision.skipped_corrupt(
            3, "model-03-0.4000", by="resume", error="ValueError: bad chunk", at=T0 + 4
        ),
        Decision.restored(2, "model-02-0.6000", by="load best", score=0.6, at=T0 + 5),
        Decision.quarantined(3, "model-03-0.4000", to="/q/model-03", reason="no commit", at=T0 + 6),
    ]


def _strict_json(line: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in {line!r} is not standard JSON")

    return json.loads(line, parse_constant=refuse)


def test_append_then_read_round_trips_every_kind(tmp_path: Path) -> None:
    decisions = _one_of_each()
    assert {d.kind for d in decisions} == KINDS
    history = DecisionHistory(tmp_path / "run")
    for decision in decisions:
        history.append(decision)
    assert _norms(DecisionHistory(tmp_path / "run").read()) == _norms(decisions)
    lines = (tmp_path / "run" / HISTORY_FILE).read_text().splitlines()
    assert len(lines) == len(decisions)
    assert _strict_json(lines[1]) == {
        "time": T0 + 1,
        "kind": "saved",
        "step": 1,
        "name": "model-01-0.5000",
        "score": 0.5,
        "details": {"rank": 1, "k": 2},
    }


def test_non_finite_scores_are_standard_json_and_read_back(tmp_path: Path) -> None:
    history = DecisionHistory(tmp_path)
    history.append(Decision.saved(1, "a", math.nan, rank=None, k=3, at=T0))
    history.append(Decision.not_saved(2, math.inf, k=3, kth=-math.inf, at=T0))
    history.append(Decision.evicted(1, "a", -math.inf, by="b", by_step=3, by_score=math.nan, at=T0))
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    records = [_strict_json(line) for line in lines]
    assert [r["score"] for r in records] == ["nan", "inf", "-inf"]
    assert records[1]["details"]["kth"] == "-inf"
    assert records[2]["details"]["by_score"] == "nan"
    saved, not_saved, evicted = history.read()
    assert saved.score is not None and math.isnan(saved.score)
    assert not_saved.score == math.inf and not_saved.details["kth"] == -math.inf
    assert evicted.score == -math.inf
    by_score = evicted.details["by_score"]
    assert isinstance(by_score, float) and math.isnan(by_score)


def test_damaged_lines_are_skipped(tmp_path: Path) -> None:
    history = DecisionHistory(tmp_path)
    decisions = [Decision.evaluated(step, 1.0 / (step + 1), at=T0 + step) for step in range(4)]
    for decision in decisions:
        history.append(decision)
    path = tmp_path / HISTORY_FILE
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:17] + b"\xff\xfe garbage"  # cut short, invalid UTF-8
    lines[2] = b'{"time": 1, "kind": "launched", "step": 2}'  # valid JSON, not a decision
    path.write_bytes(b"\n".join(lines))
    assert _norms(DecisionHistory(tmp_path).read()) == _norms([decisions[0], decisions[3]])


def test_a_line_cut_short_by_a_crash_does_not_swallow_the_next_decision(tmp_path: Path) -> None:
    first = Decision.evaluated(0, 0.5, at=T0)
    DecisionHistory(tmp_path).append(first)
    path = tmp_path / HISTORY_FILE
    with path.open("ab") as out:
        out.write(to_json_line(Decision.evaluated(1, 0.4, at=T0)).encode()[:25])
    after_restart = Decision.saved(2, "model-02", 0.3, rank=1, k=3, at=T0 + 2)
    DecisionHistory(tmp_path).append(after_restart)
    assert _norms(DecisionHistory(tmp_path).read()) == _norms([first, after_restart])


def test_a_history_replaced_by_a_fifo_or_a_link_reads_empty_without_waiting(
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    DecisionHistory(elsewhere).append(_one_of_each()[0])
    for kind in ("fifo", "link"):
        run = tmp_path / kind
        run.mkdir()
        if kind == "fifo":
            os.mkfifo(run / HISTORY_FILE)  # reading it would wait for a writer
        else:
            (run / HISTORY_FILE).symlink_to(elsewhere / HISTORY_FILE)  # not this run's
        assert DecisionHistory(run).read() == []
    assert len(DecisionHistory(elsewhere).read()) == 1


def test_absent_history_reads_empty_and_reading_creates_nothing(tmp_path: Path) -> None:
    run = tmp_path / "never-written"
    history = DecisionHistory(run)
    assert history.read() == []
    assert history.why("model-01") == []
    DecisionHistory(tmp_path).read()
    assert list(tmp_path.iterdir()) == []


def test_history_path_that_is_a_directory_reads_empty_and_writes_warn_once(
    tmp_path: Path,
) -> None:
    (tmp_path / HISTORY_FILE).mkdir()
    history = DecisionHistory(tmp_path)
    assert history.read() == []
    with pytest.warns(HistoryWarning, match=f"{HISTORY_FILE}.*cannot be written") as caught:
        history.append(Decision.evaluated(0, 0.5, at=T0))
        history.append(Decision.evaluated(1, 0.4, at=T0))
    assert len(caught) == 1
    assert history.read() == []
    assert list((tmp_path / HISTORY_FILE).iterdir()) == []


@pytest.mark.parametrize("kind", ["a FIFO", "a symlink"])
def test_a_history_replaced_between_two_decisions_is_not_written_through(
    tmp_path: Path, kind: str
) -> None:
    # Each decision opens the file again: one swapped in since the last is refused, without
    # waiting for a reader of the FIFO and without writing into the link's target.
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere.jsonl"
    history = DecisionHistory(run)
    history.append(Decision.evaluated(0, 0.5, at=T0))
    (run / HISTORY_FILE).rename(elsewhere)
    if kind == "a FIFO":
        os.mkfifo(run / HISTORY_FILE)
    else:
        (run / HISTORY_FILE).symlink_to(elsewhere)
    with pytest.warns(HistoryWarning, match=f"is {kind}, not a regular file"):
        writer = threading.Thread(target=history.append, args=(Decision.evaluated(1, 0.4),))
        writer.start()
        writer.join(timeout=10)
        if writer.is_alive():  # blocked opening the FIFO: a reader releases it
            os.close(os.open(run / HISTORY_FILE, os.O_RDONLY | os.O_NONBLOCK))
            pytest.fail("appending waited on a FIFO")
    assert len(elsewhere.read_text().splitlines()) == 1


def test_compaction_keeps_the_newest_and_stays_under_the_cap(tmp_path: Path) -> None:
    cap = 4096
    history = DecisionHistory(tmp_path, max_bytes=cap)
    path = tmp_path / HISTORY_FILE
    written = []
    sizes = []
    for step in range(300):
        decision = Decision.saved(step, f"model-{step:04d}", 1.0 / (step + 1), rank=1, k=3)
        history.append(decision)
        written.append(decision)
        sizes.append(path.stat().st_size)
    assert max(sizes) <= cap
    # It was compacted (shrank), more than once, and to at most half the cap.
    shrinks = [after for before, after in itertools.pairwise(sizes) if after < before]
    assert len(shrinks) >= 2 and all(after <= cap // 2 for after in shrinks)
    kept = history.read()
    assert _norms(kept) == _norms(written[-len(kept) :])
    assert 10 < len(kept) < 300
    assert [p.name for p in tmp_path.iterdir()] == [HISTORY_FILE]


def test_a_second_writer_continues_the_size_count(tmp_path: Path) -> None:
    cap = 4096
    for step in range(60):
        # A new writer per decision, as after restarts: each must stat the file.
        DecisionHistory(tmp_path, max_bytes=cap).append(Decision.evaluated(step, 0.5, at=T0))
        assert (tmp_path / HISTORY_FILE).stat().st_size <= cap
    assert DecisionHistory(tmp_path).read()[-1].step == 59


def _eviction_story() -> list[Decision]:
    return [
        Decision.evaluated(3, 0.3, at=T0),
        Decision.saved(3, "model-03-0.3000", 0.3, rank=1, k=3, at=T0 + 10),
        Decision.saved(5, "model-05-0.4000", 0.4, rank=2, k=3, at=T0 + 20),
        Decision.saved(7, "model-07-0.2000", 0.2, rank=1, k=1, at=T0 + 30),
        Decision.evicted(
            3, "model-03-0.3000", 0.3, by="model-07-0.2000", by_step=7, by_score=0.2, at=T0 + 31
        ),
        Decision.evicted(
            5, "model-05-0.4000", 0.4, by="model-07-0.2000", by_step=7, by_score=0.2, at=T0 + 32
        ),
    ]


def _clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def test_why_finds_the_checkpoint_and_what_it_evicted(tmp_path: Path) -> None:
    history = DecisionHistory(tmp_path)
    story = _eviction_story()
    for decision in story:
        history.append(decision)
    assert _norms(history.why("model-03-0.3000")) == _norms([story[1], story[4]])
    assert _norms(history.why("model-07-0.2000")) == _norms([story[3], story[4], story[5]])
    assert history.why("model-09") == []


def test_explain_tells_the_story_in_one_paragraph() -> None:
    story = _eviction_story()
    text = explain("model-03-0.3000", story, monitor="val_loss")
    assert text == (
        f"model-03-0.3000 was saved at {_clock(T0 + 10)} (step 3) with val_loss 0.3 "
        f"(rank 1 of 3); evicted at {_clock(T0 + 31)} (step 3) by model-07-0.2000 "
        "(val_loss 0.2)."
    )
    evictor = explain("model-07-0.2000", story, monitor="val_loss")
    assert evictor.startswith("model-07-0.2000 was saved at")
    assert "of model-03-0.3000 (val_loss 0.3)" in evictor
    assert "of model-05-0.4000 (val_loss 0.4)" in evictor
    assert "no decision about it" in explain("model-99", story)


def _render(decisions: Sequence[Decision], monitor: str = "val_loss") -> str:
    out = io.StringIO()
    Console(file=out, width=240, color_system=None).print(
        format_table(decisions, monitor=monitor, title="[bold]run[/]")
    )
    return out.getvalue()


def test_table_rows_are_in_history_order_with_details() -> None:
    text = _render(_eviction_story())
    header = next(line for line in text.splitlines() if "┃" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == [
        "time",
        "kind",
        "step",
        "name",
        "val_loss",
        "details",
    ]
    rows = [line for line in text.splitlines() if "│" in line]
    kinds = [line.split("│")[2].strip() for line in rows]
    assert kinds == ["evaluated", "saved", "saved", "saved", "evicted", "evicted"]
    assert "rank 1 of 3" in rows[1]
    assert "by model-07-0.2000 (step 7, val_loss 0.2)" in rows[4]
    assert "[bold]run[/]" in text


def test_markup_in_names_is_shown_verbatim() -> None:
    name = "ckpt-[/]-[bold red]x[/bold red]-[link=file:///]"
    decisions = [
        Decision.saved(1, name, 0.5, rank=1, k=2, at=T0),
        Decision.skipped_corrupt(1, name, by="resume", error="[/] unexpected", at=T0 + 1),
    ]
    text = _render(decisions)
    assert name in text
    assert "during resume: [/] unexpected" in text
    assert explain(name, decisions).startswith(f"{name} was saved at")


def test_decisions_refuse_bad_fields() -> None:
    with pytest.raises(ConfigError, match=r"kind='launched' is not accepted; use one of"):
        Decision(kind="launched", step=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"step=-1 is not accepted"):
        Decision.evaluated(-1, 0.5)
    with pytest.raises(ConfigError, match=r"score='low' is not accepted"):
        Decision(kind="evaluated", step=1, score="low")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"details\['x'\]=\[1\] is not accepted"):
        Decision(kind="evaluated", step=1, details={"x": [1]})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"max_bytes=100 is not accepted; use >= 4096"):
        DecisionHistory("/tmp", max_bytes=100)
    with pytest.raises(TypeError):
        Decision.evaluated(1, 0.5).details["eligible"] = False  # type: ignore[index]


def test_long_error_texts_are_shortened() -> None:
    decision = Decision.skipped_corrupt(1, "a", by="resume", error="x" * 10_000)
    assert len(str(decision.details["error"])) == 500


def test_object_store_buffers_until_flush_and_compacts(gcs_dir: epath.Path) -> None:
    writer = DecisionHistory(gcs_dir, max_bytes=4096, flush_interval_s=3600)
    first = [Decision.evaluated(step, 0.5, at=T0 + step) for step in range(3)]
    for decision in first:
        writer.append(decision)
    assert DecisionHistory(gcs_dir).read() == []
    assert _norms(writer.read()) == _norms(first)
    writer.close()
    assert _norms(DecisionHistory(gcs_dir).read()) == _norms(first)
    many = [Decision.evaluated(step, 0.25, at=T0 + step) for step in range(3, 120)]
    with DecisionHistory(gcs_dir, max_bytes=4096, flush_interval_s=3600) as again:
        for decision in many:
            again.append(decision)
    stored = (gcs_dir / HISTORY_FILE).read_bytes()
    assert len(stored) <= 2048
    kept = DecisionHistory(gcs_dir).read()
    assert _norms(kept) == _norms((first + many)[-len(kept) :])
    assert kept[-1].step == 119


# -- property: reading after appends, restarts and compactions ---------------------------

_scores = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
_names = st.text(max_size=160)


@st.composite
def _decisions(draw: st.DrawFn) -> Decision:
    kind: Any = draw(st.sampled_from(sorted(KINDS)))
    step = draw(st.integers(0, 10**9))
    name = draw(st.one_of(st.none(), _names))
    score = draw(_scores)
    at = draw(st.floats(0, 4e9))
    by_kind: dict[str, dict[str, Any]] = {
        "evaluated": {"eligible": draw(st.booleans())},
        "saved": {"rank": draw(st.one_of(st.none(), st.integers(1, 9))), "k": 3},
        "not_saved": {"k": 3, "kth": draw(_scores)},
        "evicted": {"by": draw(_names), "by_step": step + 1, "by_score": draw(_scores)},
        "skipped_corrupt": {"by": "resume", "error": draw(_names)},
        "restored": {"by": draw(st.sampled_from(["resume", "load best", "load step"]))},
        "quarantined": {"to": draw(_names), "reason": draw(_names)},
    }
    details = by_kind[kind]
    return Decision(time=at, kind=kind, step=step, name=name, score=score, details=details)


# A decision appended 1-12 times in a row, or a restart (a new writer on the same file).
_operations = st.lists(
    st.one_of(st.tuples(_decisions(), st.integers(1, 12)), st.just("restart")),
    min_size=5,
    max_size=60,
)


@settings(max_examples=40)
@given(operations=_operations)
def test_read_matches_a_list_model_after_appends_and_compactions(
    operations: list[tuple[Decision, int] | str],
) -> None:
    cap = 4096
    with tempfile.TemporaryDirectory() as directory:
        history = DecisionHistory(directory, max_bytes=cap)
        model: list[tuple[Decision, int]] = []
        for operation in operations:
            if isinstance(operation, str):
                history = DecisionHistory(directory, max_bytes=cap)
                continue
            decision, times = operation
            for _ in range(times):
                history.append(decision)
                model.append((decision, len(to_json_line(decision).encode())))
                if sum(size for _, size in model) > cap:
                    # Compaction: the newest whole lines within half the cap.
                    kept, total = [], 0
                    for line, size in reversed(model):
                        if total + size > cap // 2:
                            break
                        kept.append((line, size))
                        total += size
                    model = kept[::-1]
        assert _norms(DecisionHistory(directory).read()) == _norms([d for d, _ in model])
        path = Path(directory) / HISTORY_FILE
        assert not path.exists() or path.stat().st_size <= cap
