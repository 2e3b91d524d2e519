"""Filename templates: validation when built, rendering, safe names, reading names back."""

from __future__ import annotations

import errno
import math
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt import (
    ConfigError,
    FilenameTemplate,
    MetricCheckpointManager,
    MetricError,
    StepError,
)
from artifex_ckpt.cli import main as cli_main
from artifex_ckpt.errors import CheckpointWarning
from artifex_ckpt.naming import NAME_BUDGET, PARTIAL_TAGS, TemplateNameFormat, safe_name

SEED_TEMPLATES = [
    "model-{epoch:02d}-{val_loss:.4f}",
    "best-model-{epoch:02d}-{val_accuracy:.4f}",
    "model-epoch{epoch:03d}-loss{val_loss:.6f}-acc{val_accuracy:.4f}",
]
EXTREMES = [0.0, 1.0, -1.0, 1e300, 1e-300, math.nan, math.inf, -math.inf, -1e300, -1e-300]
COUNTERS = [0, 7, 12345, 10**9]


def written(value: float, spec: str) -> float:
    """What a metric's text says, computed independently of the library: the spec's text,
    or scientific notation with the spec's precision when that text exceeds 24 characters."""
    text = format(value, spec)
    if len(text) > 24:
        precision = re.search(r"\.(\d+)", spec)
        text = format(value, f".{precision.group(1) if precision else 4}e")
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


# --- rendering -------------------------------------------------------------------------


def test_default_template_renders_seed_name() -> None:
    template = FilenameTemplate("model-{epoch:02d}-{val_loss:.4f}")
    assert template.render(epoch=3, metrics={"val_loss": 0.12344}) == "model-03-0.1234"


def test_one_positional_argument_keeps_the_epoch_as_key() -> None:
    template = FilenameTemplate("m-{epoch}")
    assert template.key == "epoch"
    assert template == FilenameTemplate("m-{epoch}", key="epoch")
    assert template != FilenameTemplate("m-{epoch}-{step}", key="step")


@pytest.mark.parametrize("template_text", SEED_TEMPLATES)
def test_seed_templates_read_back_every_extreme(template_text: str) -> None:
    template = FilenameTemplate(template_text)
    specs = dict(re.findall(r"\{(\w+):([^}]*)\}", template_text))
    for epoch in COUNTERS:
        for value in EXTREMES:
            metrics = dict.fromkeys(template.metric_fields, value)
            name = template.render(epoch=epoch, metrics=metrics)
            assert len(name.encode()) <= 255
            parsed = template.parse(name)
            assert parsed is not None, name
            assert parsed["epoch"] == epoch and template.parse_step(name) == epoch
            for metric in template.metric_fields:
                assert same(parsed[metric], written(value, specs[metric])), (name, metric)


def test_huge_values_switch_to_scientific_notation_and_tiny_ones_round() -> None:
    template = FilenameTemplate("model-{epoch:02d}-{val_loss:.4f}")
    assert template.render(epoch=1, metrics={"val_loss": 1e300}) == "model-01-1.0000e+300"
    assert template.render(epoch=1, metrics={"val_loss": -2.5e30}) == "model-01--2.5000e+30"
    assert template.render(epoch=1, metrics={"val_loss": 1e-300}) == "model-01-0.0000"
    assert template.parse("model-01-1.0000e+300") == {"epoch": 1, "val_loss": 1e300}
    # Up to 24 characters the spec's own text is kept; the sign option carries over.
    assert template.render(epoch=1, metrics={"val_loss": 1.5e18}) == (
        "model-01-1500000000000000000.0000"
    )
    assert template.render(epoch=1, metrics={"val_loss": 1.5e19}) == "model-01-1.5000e+19"
    assert FilenameTemplate("m-{epoch}-{a:+.2f}").render(epoch=0, metrics={"a": 1e25}) == (
        "m-0-+1.00e+25"
    )
    wide = FilenameTemplate("m-{epoch}-{a:030.4f}")
    assert wide.render(epoch=0, metrics={"a": 0.5}) == "m-0-" + "0" * 24 + "0.5000"


def test_zero_padded_nan_reads_back() -> None:
    template = FilenameTemplate("m-{epoch}-{a:08.3f}")
    name = template.render(epoch=2, metrics={"a": math.nan})
    assert name == "m-2-00000nan"
    parsed = template.parse(name)
    assert parsed is not None and math.isnan(parsed["a"])


def test_metric_names_with_slash_and_at_render_one_directory() -> None:
    template = FilenameTemplate("m {epoch:03d}-{val/loss:.3f}-{acc@1:.2f}")
    name = template.render(epoch=7, metrics={"val/loss": 0.5, "acc@1": 0.25})
    assert name == "m_007-0.500-0.25"
    assert "/" not in name
    assert template.parse(name) == {"epoch": 7, "val/loss": 0.5, "acc@1": 0.25}


@pytest.mark.parametrize(
    ("template", "character", "fixed"),
    [
        ("m-{epoch}/x", "/", "m-{epoch}-x"),
        ("runs/{val/loss:.3f}-{epoch:02d}", "/", "runs-{val/loss:.3f}-{epoch:02d}"),
        ("m\\{epoch}", "\\", "m-{epoch}"),
    ],
)
def test_a_directory_separator_in_literal_text_is_refused(
    template: str, character: str, fixed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        FilenameTemplate(template)
    message = str(info.value)
    for words in (
        repr(template),
        f"has {character!r} in its literal text",
        "placeholders' values are made safe",
        "literals must not contain '/'",
        repr(fixed),
    ):
        assert words in message, (words, message)
    FilenameTemplate(fixed)  # the suggestion is accepted


def test_other_unsafe_literal_characters_are_written_safe_and_found_again(
    tmp_path: Path,
) -> None:
    template = FilenameTemplate("run {epoch:02d} (val?loss={val_loss:.2f}):")
    name = template.render(epoch=3, metrics={"val_loss": 0.5})
    assert name == "run_03__val_loss=0.50__"
    (tmp_path / name).mkdir()
    found = [(m.step, m.path.name) for m in TemplateNameFormat(template).find_all(tmp_path)]
    assert found == [(3, name)]
    assert template.parse(name) == {"epoch": 3, "val_loss": 0.5}


def test_step_placeholder_is_the_global_step() -> None:
    template = FilenameTemplate("e{epoch}-s{step}")
    assert template.render(epoch=2, step=300) == "e2-s300"
    assert template.render(epoch=2) == "e2-s2"
    assert template.parse("e2-s300") == {"epoch": 2, "step": 300}


def test_counters_must_be_non_negative_integers() -> None:
    template = FilenameTemplate("m-{epoch}-s{step}")
    with pytest.raises(StepError, match=r"epoch=-1 .*'m-\{epoch\}-s\{step\}'.*>= 0"):
        template.render(epoch=-1)
    with pytest.raises(StepError, match=r"step=True"):
        template.render(epoch=1, step=True)
    with pytest.raises(StepError, match=r"step=2.5"):
        template.render(epoch=1, step=2.5)  # type: ignore[arg-type]


def test_missing_metric_names_placeholder_and_given_keys() -> None:
    template = FilenameTemplate("model-{epoch}-{val_acc:.2f}")
    with pytest.raises(MetricError, match=r"'val_acc'.*metrics given: \['loss'\].*missing='none'"):
        template.render(epoch=1, metrics={"loss": 1.0})


def test_missing_metric_can_be_written_as_none_and_reads_back_absent() -> None:
    template = FilenameTemplate("model-{epoch:02d}-{val_loss:.4f}-{acc:.1%}")
    name = template.render(epoch=4, metrics={"acc": 0.5}, missing="none")
    assert name == "model-04-none-50.0%"
    assert template.parse(name) == {"epoch": 4, "acc": 0.5}
    assert template.parse_step(name) == 4
    # NaN is a value, "none" is its absence.
    nan_name = template.render(epoch=5, metrics={"val_loss": math.nan, "acc": 0.5})
    parsed = template.parse(nan_name)
    assert parsed is not None and math.isnan(parsed["val_loss"])
    with pytest.raises(ConfigError, match=r"missing='skip'.*'raise' or 'none'"):
        template.render(epoch=4, missing="skip")  # type: ignore[arg-type]


def test_metric_that_is_not_a_number_is_refused_by_name() -> None:
    template = FilenameTemplate("m-{epoch}-{val_loss:.2f}")
    with pytest.raises(MetricError, match=r"'val_loss' is 'low'"):
        template.render(epoch=1, metrics={"val_loss": "low"})


# --- the key -----------------------------------------------------------------------------


def test_step_key_reads_the_global_step_back() -> None:
    template = FilenameTemplate("ckpt-{step:06d}-e{epoch}-{val_loss:.3f}", key="step")
    name = template.render(step=1500, epoch=3, metrics={"val_loss": 0.25})
    assert name == "ckpt-001500-e3-0.250"
    assert template.parse_step(name) == 1500
    assert template.parse_epoch(name) == 3
    # The other counter defaults to the key.
    assert template.render(step=20, metrics={"val_loss": 0.25}) == "ckpt-000020-e20-0.250"
    with pytest.raises(StepError, match=r"keyed by \{step\}.*step="):
        template.render(epoch=3, metrics={"val_loss": 0.25})


def test_step_key_without_epoch_placeholder() -> None:
    template = FilenameTemplate("ckpt-{step:06d}", key="step")
    assert template.parse_step("ckpt-000042") == 42
    assert template.parse_epoch("ckpt-000042") is None
    assert template.parse_step("ckpt-x") is None


# --- reading names back ----------------------------------------------------------------


def test_foreign_and_temporary_names_do_not_parse() -> None:
    template = FilenameTemplate("model-{epoch:02d}-{val_loss:.4f}")
    assert template.parse_epoch("model-xx-0.1") is None
    assert template.parse_epoch("artifex_ckpt.json") is None
    assert template.parse_epoch("12") is None
    assert template.parse_step("model-03-0.1234.orbax-checkpoint-tmp-17") is None
    # Digits of other scripts are not steps, though int() would accept them.
    assert template.parse_step("model-\u0663-0.1234") is None
    assert template.parse("model-03-nonesuch") is None


def test_copies_with_extra_text_are_not_checkpoints() -> None:
    template = FilenameTemplate("m-{epoch:02d}-{val_loss:.2f}")
    assert template.parse_epoch("m-00-0.50") == 0
    assert template.parse_epoch("m-00-0.50.bak") is None
    assert template.parse_epoch("m-00-0.50 (copy)") is None


@pytest.mark.parametrize("value", [-3.0, 1e-05, 12345.678, math.nan, -math.inf, 0.5, 1e300])
@pytest.mark.parametrize(
    "template",
    ["{val_loss:.0f}-{epoch}-{acc:.2f}", "m-{val_loss}-{epoch}-{acc}", "m-{epoch}-{acc:.1%}"],
)
def test_metric_values_never_shift_the_epoch(template: str, value: float) -> None:
    parsed = FilenameTemplate(template)
    name = parsed.render(epoch=7, metrics={"val_loss": value, "acc": value})
    assert parsed.parse_epoch(name) == 7, name


# --- refused templates -------------------------------------------------------------------

BAD_TEMPLATES = [
    # (template, key, words the message must contain)
    (
        "m-{epoch}-{val_loss:<2g}",
        "epoch",
        ["{val_loss:<2g}", "val_loss=0.0", "'m-0-0_'", "cannot be read back", "'{val_loss:.4f}'"],
    ),
    ("m-{epoch:>5}", "epoch", ["{epoch:>5}", "'>5'", "epoch=0", "read back", "'{epoch:02d}'"]),
    ("m-{epoch:x}", "epoch", ["{epoch:x}", "epoch=12345", "3039", "'{epoch:02d}'"]),
    ("m-{epoch:,d}", "epoch", ["epoch=12345", "'12,345'", "an integer"]),
    ("m-{epoch}-{step:+d}", "epoch", ["{step:+d}", "step=0", "'+0'", "'{step:02d}'"]),
    ("m-{epoch:.2f}", "epoch", ["{epoch:.2f}", "'{epoch:02d}'"]),
    ("m-{epoch}-{val_loss:d}", "epoch", ["'d'", "{val_loss}", "float metric", "'.4f'"]),
    ("m-{epoch}-{a:0<6.0f}", "epoch", ["{a:0<6.0f}", "a=1.0", "100000.0", "not 1.0"]),
    ("m-{epoch}-{a:#.0f}", "epoch", ["{a:#.0f}", "a=0.0", "'0.'"]),
    ("m-{epoch}-{a:n}", "epoch", ["'n'", "{a}", "locale", "'.4f'"]),
    ("{epoch}-{a:.0f}e{b:.0f}", "epoch", ["{a}", "as written", "separate"]),
    ("m-{val_loss:.2f}", "epoch", ["no {epoch}", "'model-{epoch:02d}'"]),
    ("m-{epoch:02d}", "step", ["no {step}", "'model-{step:06d}'"]),
    ("{epoch}{val_loss}", "epoch", ["{epoch} and {val_loss} touch", "'-'"]),
    ("e{epoch}-{step}{val_loss}", "step", ["{step} and {val_loss} touch"]),
    ("m-{a}{b}-{epoch}", "epoch", ["{a} and {b} touch"]),
    ("m-{epoch", "epoch", ["does not parse"]),
    ("m-{epoch}-{}", "epoch", ["positional", "{}"]),
    ("m-{epoch!r}", "epoch", ["{epoch}", "conversion"]),
    (".m-{epoch}", "epoch", ["starts with '.'", "hidden", ".artifex"]),
    ("m-{epoch}.orbax-checkpoint-tmp-1", "epoch", ["temporary suffix", "unfinished"]),
    ("m-{epoch}-" + "x" * 243, "epoch", ["256 bytes", "{epoch} writes 10", "255-byte limit"]),
    (
        "m-{epoch}-{val_loss:.4f}-" + "x" * 191,
        "epoch",
        ["{val_loss:.4f} writes 24", "fit in 224 bytes", "'.3e'"],
    ),
    ("\u00e9" * 107 + "-{epoch}", "epoch", ["225 bytes", "UTF-8"]),
    ("m-{epoch}/x", "epoch", ["'/'", "literal text", "'m-{epoch}-x'"]),
]


@pytest.mark.parametrize(("template", "key", "words"), BAD_TEMPLATES)
def test_bad_templates_are_refused_when_built(template: str, key: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        FilenameTemplate(template, key=key)  # type: ignore[arg-type]
    message = str(info.value)
    assert repr(template) in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    ("template", "key", "words"),
    [
        ("", "epoch", ["filename=''", "non-empty str", "'model-{epoch:02d}-{val_loss:.4f}'"]),
        (None, "epoch", ["filename=None", "non-empty str"]),
        ("m-{epoch}", "global", ["key='global'", "'m-{epoch}'", "'epoch' or 'step'"]),
    ],
)
def test_not_a_template_or_key(template: object, key: object, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        FilenameTemplate(template, key=key)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_byte_budget_is_255_less_orbax_suffix_and_longest_partial_tag() -> None:
    # Read from the installed Orbax: 0.12.8 writes "<name>.orbax-checkpoint-tmp", no timestamp.
    assert step_lib.TMP_DIR_SUFFIX == ".orbax-checkpoint-tmp"
    longest_tag = max(len(f"-{tag}".encode()) for tag in PARTIAL_TAGS)
    assert longest_tag == len(b"-preempted") == len(b"-exception") == 10
    assert NAME_BUDGET == 255 - 21 - 10 == 224


def test_byte_limit_counts_utf8_and_accepts_exactly_the_budget() -> None:
    # 213 bytes of text + "-" + a ten-digit epoch (10**9) = 224 bytes.
    ascii_edge = FilenameTemplate("x" * 213 + "-{epoch}")
    assert len(ascii_edge.render(epoch=10**9).encode()) == 224
    unicode_edge = FilenameTemplate("\u00e9" * 106 + "x-{epoch}")
    name = unicode_edge.render(epoch=10**9)
    assert len(name) == 118 and len(name.encode()) == 224
    with pytest.raises(ConfigError) as info:
        FilenameTemplate("x" * 214 + "-{epoch}")
    message = str(info.value)
    for words in (
        "225 bytes",
        "must fit in 224 bytes",
        "leaving room for Orbax's temporary suffix '.orbax-checkpoint-tmp' (21 bytes)",
        "a -preempted tag (10 bytes)",
        "255-byte limit",
    ):
        assert words in message, (words, message)


@pytest.mark.parametrize("tag", PARTIAL_TAGS)
def test_longest_partial_name_is_written_by_orbax_and_found_again(tmp_path: Path, tag: str) -> None:
    if os.pathconf(tmp_path, "PC_NAME_MAX") != 255:
        pytest.skip("the temporary directory's filesystem does not allow 255-byte names")
    root = tmp_path / "run"
    template = "x" * 213 + "-{epoch}"
    name = FilenameTemplate(template).render(epoch=10**9) + f"-{tag}"
    # While Orbax writes it, the directory is named exactly 255 bytes; one more is refused.
    assert len((name + step_lib.TMP_DIR_SUFFIX).encode()) == 255
    with pytest.raises(OSError) as too_long:
        (tmp_path / ("y" + name + step_lib.TMP_DIR_SUFFIX)).mkdir()
    assert too_long.value.errno == errno.ENAMETOOLONG
    weights = np.arange(3, dtype=np.float32)
    with MetricCheckpointManager(root, filename=template, save_top_k=-1) as manager:
        args = ocp.args.StandardSave({"w": weights})
        manager.save(10**9, args=args, metrics={"val_loss": 0.5}, partial=tag)
        manager.wait_until_finished()
    assert [p.name for p in root.iterdir() if p.is_dir()] == [name]
    with MetricCheckpointManager(root) as reopened:
        assert reopened.all_steps() == [10**9] and reopened.is_partial(10**9)
        restored = reopened.restore(10**9, args=ocp.args.StandardRestore({"w": np.zeros(3)}))
    np.testing.assert_array_equal(restored["w"], weights)


def test_unicode_metric_names_and_literals_are_kept() -> None:
    template = FilenameTemplate("modèle-{epoch:02d}-{损失:.3f}")
    name = template.render(epoch=1, metrics={"损失": 0.5})
    assert name == "modèle-01-0.500"
    assert template.parse(name) == {"epoch": 1, "损失": 0.5}


def test_rendered_names_are_never_hidden_or_special() -> None:
    # A metric first is fine: numbers never start with "."; the name may start with "-".
    template = FilenameTemplate("{val_loss:.2f}-{epoch}")
    for value in EXTREMES:
        name = template.render(epoch=0, metrics={"val_loss": value})
        assert name not in ("", ".", "..") and not name.startswith(".")
        assert template.parse_step(name) == 0


def test_safe_name_replaces_separators() -> None:
    assert safe_name("a/b\\c d:e") == "a_b_c_d_e"
    assert safe_name("é-1") == "é-1"


# --- the Orbax name format --------------------------------------------------------------


def test_name_format_finds_steps_by_the_key(tmp_path: Path) -> None:
    template = FilenameTemplate("ckpt-{step:06d}-{val_loss:.4f}", key="step")
    for name in [
        "ckpt-000100-0.5000",
        "ckpt-000200-none",
        "ckpt-000300-0.1000.orbax-checkpoint-tmp",  # unfinished (Orbax 0.12.8: no timestamp)
        "ckpt-000350-0.1000.orbax-checkpoint-tmp-1712",  # unfinished (older Orbax)
        "ckpt-000400-0.5000.bak",  # a copy
    ]:
        (tmp_path / name).mkdir()
    (tmp_path / "ckpt-000500-0.5000").write_text("a file, not a checkpoint")
    names = TemplateNameFormat(template)
    found = sorted((m.step, m.path.name) for m in names.find_all(tmp_path))
    assert found == [(100, "ckpt-000100-0.5000"), (200, "ckpt-000200-none")]
    assert names.build_name(200) == "ckpt-000200-none"
    assert "key='step'" in str(names)


def test_name_format_refuses_two_directories_of_one_step(tmp_path: Path) -> None:
    template = FilenameTemplate("m-{epoch:02d}-{val_loss:.2f}")
    (tmp_path / "m-03-0.50").mkdir()
    (tmp_path / "m-03-0.90").mkdir()
    (tmp_path / "m-03-0.70").mkdir()
    with pytest.raises(StepError) as info:
        list(TemplateNameFormat(template).find_all(tmp_path))
    message = str(info.value)
    assert "'m-03-0.50', 'm-03-0.70' and 'm-03-0.90'" in message
    assert f"in {tmp_path} all read as step 3" in message
    for name in ("m-03-0.50", "m-03-0.70", "m-03-0.90"):
        assert f"`artifex-ckpt quarantine {shlex.quote(str(tmp_path))} {name}`" in message


def _save(manager: MetricCheckpointManager, step: int, loss: float) -> None:
    args = ocp.args.StandardSave({"w": np.full(3, step, np.float32)})
    manager.save(step, args=args, metrics={"val_loss": loss})


def test_two_directories_of_one_step_name_both_and_the_quarantine_that_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "my run"  # a space, so the command must quote it
    with MetricCheckpointManager(
        root, filename="m-{epoch:02d}-{val_loss:.2f}", save_top_k=-1
    ) as manager:
        _save(manager, 2, 0.6)
        _save(manager, 3, 0.5)
    shutil.copytree(root / "m-03-0.50", root / "m-03-0.90")  # a copy, renamed by hand
    with pytest.raises(StepError) as info:
        MetricCheckpointManager(root)
    message = str(info.value)
    assert f"'m-03-0.50' and 'm-03-0.90' in {root} both read as step 3" in message
    commands = re.findall(r"`(artifex-ckpt quarantine [^`]+)`", message)
    assert commands == [
        f"artifex-ckpt quarantine '{root}' m-03-0.50",
        f"artifex-ckpt quarantine '{root}' m-03-0.90",
    ]
    # The command, run as given, fixes the run.
    assert cli_main(shlex.split(commands[1])[1:]) == 0
    capsys.readouterr()
    assert (root / ".artifex-quarantine" / "m-03-0.90").is_dir()
    with MetricCheckpointManager(root) as manager:
        assert manager.all_steps() == [2, 3] and manager.step_path(3).name == "m-03-0.50"


# --- symbolic links ----------------------------------------------------------------------

LINKED = FilenameTemplate("m-{epoch:02d}-{val_loss:.2f}")


def _steps(names: TemplateNameFormat, root: Path) -> list[tuple[int, str]]:
    return sorted((m.step, m.path.name) for m in names.find_all(root))


def test_a_checkpoint_moved_to_another_disk_and_linked_back_is_listed_and_restores(
    tmp_path: Path,
) -> None:
    root, disk = tmp_path / "run", tmp_path / "other-disk"
    disk.mkdir()
    with MetricCheckpointManager(root, filename=LINKED.template, save_top_k=-1) as manager:
        _save(manager, 0, 0.5)
        _save(manager, 1, 0.9)
    shutil.move(root / "m-00-0.50", disk / "m-00-0.50")
    os.symlink(disk / "m-00-0.50", root / "m-00-0.50")
    assert _steps(TemplateNameFormat(LINKED), root) == [(0, "m-00-0.50"), (1, "m-01-0.90")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricCheckpointManager(root) as manager:
            assert manager.all_steps() == [0, 1] and manager.best_step() == 0
            restored = manager.restore(0, args=ocp.args.StandardRestore({"w": np.ones(3)}))
    np.testing.assert_array_equal(restored["w"], np.zeros(3, np.float32))
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("m-07-0.10", "."),  # the run itself: a loop
        ("m-08-0.10", ".."),  # above the run
        ("m-09-0.10", "m-00-0.50"),  # into the run: a second name for a step
        ("m-06-0.10", "nested/deeper"),  # into the run, below it
    ],
)
def test_a_link_into_or_above_the_run_is_skipped(tmp_path: Path, link: str, target: str) -> None:
    root = tmp_path / "run"
    (root / "m-00-0.50").mkdir(parents=True)
    (root / "nested" / "deeper").mkdir(parents=True)
    os.symlink(target, root / link)
    names = TemplateNameFormat(LINKED)
    assert _steps(names, root) == [(0, "m-00-0.50")]
    # Spelled through a link of its own, the run is still recognised.
    os.symlink(root, tmp_path / "alias")
    assert _steps(names, tmp_path / "alias") == [(0, "m-00-0.50")]


@pytest.mark.parametrize("link", ["m-03-0.10", "m-03-0.90"], ids=["sorts first", "sorts last"])
def test_a_link_reading_as_a_real_directorys_step_is_skipped_with_a_warning(
    tmp_path: Path, link: str
) -> None:
    root, disk = tmp_path / "run", tmp_path / "other-disk"
    (root / "m-03-0.50").mkdir(parents=True)
    (disk / "copy").mkdir(parents=True)
    os.symlink(disk / "copy", root / link)
    names = TemplateNameFormat(LINKED)
    with pytest.warns(CheckpointWarning) as caught:
        assert _steps(names, root) == [(3, "m-03-0.50")]
    [message] = [str(w.message) for w in caught]
    assert str(root / link) in message and str(root / "m-03-0.50") in message
    assert str(disk / "copy") in message and "reads as step 3" in message
    assert "Remove the link" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # told once per format, not at every listing
        assert _steps(names, root) == [(3, "m-03-0.50")]
    assert names.build_name(3) == "m-03-0.50"


def test_a_run_with_a_link_of_a_real_step_still_opens(tmp_path: Path) -> None:
    root, disk = tmp_path / "run", tmp_path / "other-disk"
    with MetricCheckpointManager(root, filename=LINKED.template, save_top_k=-1) as manager:
        _save(manager, 3, 0.5)
    shutil.copytree(root / "m-03-0.50", disk / "m-03-0.90")
    os.symlink(disk / "m-03-0.90", root / "m-03-0.90")
    with pytest.warns(CheckpointWarning, match=r"m-03-0\.90 is a symbolic link.*m-03-0\.50"):
        manager = MetricCheckpointManager(root)
    with manager:
        assert manager.all_steps() == [3] and manager.step_path(3).name == "m-03-0.50"


def test_two_links_of_one_step_are_neither_listed(tmp_path: Path) -> None:
    root, disk = tmp_path / "run", tmp_path / "other-disk"
    for name in ("a", "b"):
        (disk / name).mkdir(parents=True)
    (root / "m-01-0.50").mkdir(parents=True)
    os.symlink(disk / "a", root / "m-03-0.50")
    os.symlink(disk / "b", root / "m-03-0.90")
    with pytest.warns(CheckpointWarning) as caught:
        assert _steps(TemplateNameFormat(LINKED), root) == [(1, "m-01-0.50")]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    for message in messages:
        assert "'m-03-0.50' and 'm-03-0.90'" in message and "neither is listed" in message
    assert str(disk / "a") in messages[0] and str(disk / "b") in messages[1]


# --- properties --------------------------------------------------------------------------

metric_names = st.text(
    alphabet=st.characters(codec="ascii", exclude_characters="{}:!"), min_size=1, max_size=8
).filter(lambda s: s not in ("epoch", "step") and not s.isdigit() and "[" not in s and "." not in s)
values = st.floats(allow_nan=True, allow_infinity=True, width=32)


@given(
    prefix=st.text(alphabet="ab-_/\\ =:?", max_size=4),
    epoch_spec=st.sampled_from(["", "d", "02d", "04d", "3d"]),
    metric=metric_names,
    value=values,
    epoch=st.integers(0, 10**6),
)
def test_epoch_round_trips_through_rendered_name(
    prefix: str, epoch_spec: str, metric: str, value: float, epoch: int
) -> None:
    template_text = f"{prefix}x{{epoch:{epoch_spec}}}-{{{metric}:.3f}}"
    try:
        template = FilenameTemplate(template_text)
    except ValueError as err:
        # A directory separator in literal text is refused; so is "3d", which pads with
        # spaces that cannot be read back.
        separator = "/" in prefix or "\\" in prefix
        assert separator or epoch_spec == "3d", str(err)
        assert not separator or "literals must not contain '/'" in str(err)
        return
    assert "/" not in prefix and "\\" not in prefix
    name = template.render(epoch=epoch, metrics={metric: value})
    assert "/" not in name and name == safe_name(name)
    assert template.parse_epoch(name) == epoch
    if math.isnan(value):
        assert name.endswith("nan")


metric_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([*EXTREMES, None, 1.5e18, -1.5e17, 1.5e19, 0.015, -9.99995e15]),
)


@settings(max_examples=150)
@given(
    key=st.sampled_from(["epoch", "step"]),
    key_spec=st.sampled_from(["", "d", "03d", "06d"]),
    other_spec=st.sampled_from(["", "d", "03d", "06d", None]),
    specs=st.lists(st.sampled_from([".4f", ".2e", ".3g", ".1%", ""]), min_size=1, max_size=3),
    # " ", ": " and "?" are written "_" and "__": parse reads the rewritten literal.
    separator=st.sampled_from(["-", "_", "-loss", "=", " ", ": ", "?"]),
    counters=st.tuples(st.integers(0, 10**12), st.integers(0, 10**12)),
    data=st.data(),
)
def test_render_then_parse_reads_back_key_exactly_and_metrics_as_written(
    key: str,
    key_spec: str,
    other_spec: str | None,
    specs: list[str],
    separator: str,
    counters: tuple[int, int],
    data: st.DataObject,
) -> None:
    other = "step" if key == "epoch" else "epoch"
    fields = [f"{{{key}:{key_spec}}}"] + [f"{{m{i}:{spec}}}" for i, spec in enumerate(specs)]
    if other_spec is not None:
        fields.append(f"{{{other}:{other_spec}}}")
    order = data.draw(st.permutations(fields))
    template = FilenameTemplate("run-" + separator.join(order), key=key)  # type: ignore[arg-type]
    metrics = {f"m{i}": data.draw(metric_values) for i in range(len(specs))}
    given_metrics = {k: v for k, v in metrics.items() if v is not None}
    name = template.render(
        **{key: counters[0], other: counters[1]},
        metrics=given_metrics,
        missing="none",
    )
    assert len(name.encode()) <= 255
    assert name == safe_name(name)
    parsed = template.parse(name)
    assert parsed is not None, name
    assert template.parse_step(name) == counters[0] == parsed[key]
    if other_spec is not None:
        assert parsed[other] == counters[1]
    for i, spec in enumerate(specs):
        value = metrics[f"m{i}"]
        expected = None if value is None else written(value, spec)
        assert same(parsed.get(f"m{i}"), expected), (name, spec, value)
