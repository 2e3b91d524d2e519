"""Filename templates: rendering, safe names, parsing the epoch back."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from artifex_ckpt import FilenameTemplate, MetricError
from artifex_ckpt.naming import safe_name


def test_default_template_renders_seed_name() -> None:
    template = FilenameTemplate("model-{epoch:02d}-{val_loss:.4f}")
    assert template.render(epoch=3, metrics={"val_loss": 0.12344}) == "model-03-0.1234"


def test_metric_names_with_slash_and_at_render_one_directory() -> None:
    template = FilenameTemplate("m/{epoch:03d}-{val/loss:.3f}-{acc@1:.2f}")
    name = template.render(epoch=7, metrics={"val/loss": 0.5, "acc@1": 0.25})
    assert name == "m_007-0.500-0.25"
    assert "/" not in name
    assert template.parse_epoch(name) == 7


def test_step_placeholder_is_the_global_step() -> None:
    template = FilenameTemplate("e{epoch}-s{step}")
    assert template.render(epoch=2, step=300) == "e2-s300"
    assert template.render(epoch=2) == "e2-s2"


def test_missing_metric_names_placeholder_and_given_keys() -> None:
    template = FilenameTemplate("model-{epoch}-{val_acc:.2f}")
    with pytest.raises(MetricError, match=r"'val_acc'.*metrics given: \['loss'\]"):
        template.render(epoch=1, metrics={"loss": 1.0})


def test_foreign_and_temporary_names_do_not_parse() -> None:
    template = FilenameTemplate("model-{epoch:02d}-{val_loss:.4f}")
    assert template.parse_epoch("model-xx-0.1") is None
    assert template.parse_epoch("artifex_ckpt.json") is None
    assert template.parse_epoch("12") is None


def test_safe_name_replaces_separators() -> None:
    assert safe_name("a/b\\c d:e") == "a_b_c_d_e"


metric_names = st.text(
    alphabet=st.characters(codec="ascii", exclude_characters="{}:!"), min_size=1, max_size=8
).filter(lambda s: s not in ("epoch", "step") and not s.isdigit() and "[" not in s and "." not in s)
values = st.floats(allow_nan=True, allow_infinity=True, width=32)


@given(
    prefix=st.text(alphabet="ab-_/ =", max_size=4),
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
    except ValueError:
        # "3d" pads with spaces, which cannot be read back: refused at construction.
        assert epoch_spec == "3d"
        return
    name = template.render(epoch=epoch, metrics={metric: value})
    assert "/" not in name and name == safe_name(name)
    assert template.parse_epoch(name) == epoch
    if math.isnan(value):
        assert name.endswith("nan")


@pytest.mark.parametrize("value", [-3.0, 1e-05, 12345.678, math.nan, -math.inf, 0.5])
@pytest.mark.parametrize(
    "template",
    ["{val_loss:.0f}-{epoch}-{acc:.2f}", "m-{val_loss}-{epoch}-{acc}", "m-{epoch}-{acc:.1%}"],
)
def test_metric_values_never_shift_the_epoch(template: str, value: float) -> None:
    parsed = FilenameTemplate(template)
    name = parsed.render(epoch=7, metrics={"val_loss": value, "acc": value})
    assert parsed.parse_epoch(name) == 7, name


def test_copies_with_extra_text_are_not_checkpoints() -> None:
    template = FilenameTemplate("m-{epoch:02d}-{val_loss:.2f}")
    assert template.parse_epoch("m-00-0.50") == 0
    assert template.parse_epoch("m-00-0.50.bak") is None
    assert template.parse_epoch("m-00-0.50 (copy)") is None
