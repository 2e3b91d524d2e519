"""Filename templates and the Orbax `NameFormat` that makes them real directory names.

A template such as `"model-{epoch:02d}-{val/loss:.4f}"` renders to `model-03-0.1234`.
`{epoch}` is the epoch, `{step}` the global step, and any other placeholder is a metric.
One of `{epoch}` and `{step}`, the template's *key*, is the manager's step: it is read
back from each directory name, so a manager reopened on the directory rebuilds its
step-to-name cache from disk. A template is checked when it is built, by rendering
extreme values and reading them back, so that a name can never be written that the next
run could not find.

`TemplateNameFormat` is the Orbax `NameFormat` that lists a run directory by those names.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
import re
import shlex
import string
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, SupportsIndex, cast

from etils import epath
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt.errors import CheckpointWarning, ConfigError, MetricError, StepError
from artifex_ckpt.metrics import to_float

__all__ = [
    "NAME_BUDGET",
    "PARTIAL_TAGS",
    "FilenameTemplate",
    "Key",
    "Missing",
    "PartialTag",
    "TemplateNameFormat",
    "safe_name",
]

Key = Literal["epoch", "step"]
# Why a checkpoint was written mid-epoch; appended to its directory name.
PartialTag = Literal["preempted", "exception"]
PARTIAL_TAGS: tuple[str, ...] = ("preempted", "exception")
Missing = Literal["raise", "none"]

MAX_NAME_BYTES = 255
"""Longest directory name, in UTF-8 bytes, that common filesystems (ext4, APFS, NTFS) allow."""
TMP_SUFFIX_BYTES = len(step_lib.TMP_DIR_SUFFIX.encode())
"""What Orbax appends to a step's name while it is written: `.orbax-checkpoint-tmp`, 21 bytes.
(orbax-checkpoint 0.12.8 appends no timestamp: `atomicity._get_tmp_directory`.)"""
PARTIAL_TAG_BYTES = max(len(f"-{tag}".encode()) for tag in PARTIAL_TAGS)
"""What a partial checkpoint appends to its name: `-preempted` or `-exception`, 10 bytes."""
NAME_BUDGET = MAX_NAME_BYTES - TMP_SUFFIX_BYTES - PARTIAL_TAG_BYTES
"""Longest rendered name, in UTF-8 bytes (224): a partial checkpoint's name while Orbax writes
it, `<name>-preempted.orbax-checkpoint-tmp`, must still fit in `MAX_NAME_BYTES`."""
FIXED_POINT_CHARS = 24
"""A metric whose formatted text is longer than this (or than the spec's width) is written
in scientific notation instead, so 1e300 under `.4f` does not become a 300-digit name."""
MISSING = "none"
"""What `render(..., missing="none")` writes for a metric that was not given."""

_UNSAFE = re.compile(r"[^\w.=+@,%-]")
# Separate directories (on POSIX or Windows); never accepted in a template's literal text.
_SEPARATORS = ("/", "\\")
_RESERVED = ("epoch", "step")
_KEYS = frozenset(_RESERVED)
_DEFAULT_PRECISION = 4
# What a formatted number can look like once made safe: padding, sign, digits with
# separators, exponent, nan/inf, percent. Anything else (a ".bak" copy) is not ours.
# [0-9], not \d: \d also matches other scripts' digits, which int() and float() accept.
_NUMBER = r"_*[-+]?_*(?:[0-9,_]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|0*(?:nan|inf|NAN|INF))%?"
_METRIC = f"(?:{_NUMBER}|{MISSING})"
_COUNTER = r"[0-9]+"
_SPEC = re.compile(
    r"(?:(?P<fill>.)?(?P<align>[<>=^]))?(?P<sign>[-+ ]?)(?P<z>z?)(?P<alt>#?)0?"
    r"(?P<width>[0-9]*)(?P<grouping>[,_]?)(?:\.(?P<precision>[0-9]+))?(?P<type>[a-zA-Z%]?)",
    re.DOTALL,
)
# Values every template must render and read back when it is built: the counters the
# manager can reach and metric values from the awkward ends of the float range. None
# stands for a missing metric (written as "none").
_COUNTER_SAMPLES = (0, 7, 12345, 10**9)
_METRIC_SAMPLES: tuple[float | None, ...] = (
    0.0,
    1.0,
    -1.0,
    1e300,
    1e-300,
    math.nan,
    math.inf,
    -math.inf,
    -1e300,
    -1e-300,
    0.5,
    -3.0,
    1e-05,
    12345.678,
    1.5e18,
    None,
)
# For the length bound: the longest text of each decade, both signs, and the float limits.
_LENGTH_PROBES = (
    *(
        sign * mantissa * 10.0**exponent
        for sign in (1.0, -1.0)
        for mantissa in (1.2345678901234567, 9.999999999999999)
        for exponent in (*range(-30, 31), -300, 300, 307)
    ),
    -1.7976931348623157e308,
    -2.2250738585072014e-308,
    -5e-324,
    math.nan,
    -math.inf,
)


def safe_name(text: str) -> str:
    """Replace every character that is unsafe in a directory name (`/`, spaces, ...) by `_`.

    Letters of any script are kept (they count as several bytes towards the 255-byte limit).

    Example:
        ```python
        assert safe_name("val/loss 0.5") == "val_loss_0.5"
        ```
    """
    return _UNSAFE.sub("_", text)


@dataclass(frozen=True)
class _Piece:
    literal: str
    field: str | None
    spec: str
    # For metrics: the longest fixed-point text kept, and the spec of the fallback.
    bound: int = FIXED_POINT_CHARS
    fallback: str = f".{_DEFAULT_PRECISION}e"
    # The spec without fill, alignment and width: the number as written, unpadded.
    plain: str = ""

    @property
    def shown(self) -> str:
        return f"{{{self.field}:{self.spec}}}" if self.spec else f"{{{self.field}}}"


@dataclass(frozen=True)
class _Compiled:
    pieces: tuple[_Piece, ...]
    pattern: re.Pattern[str]
    groups: dict[str, str]  # field -> regex group of its first occurrence


@dataclass(frozen=True)
class FilenameTemplate:
    """A validated filename template.

    `key` names the placeholder that is the manager's step: `"epoch"` (the default) or
    `"step"` (the global step). The key placeholder is required.

    The template is refused with `ConfigError` when it is built unless every name it can
    render reads back: the counters 0, 7, 12345 and 10**9 exactly, and metrics (0, ±1,
    ±1e300, ±1e-300, nan, ±inf, a missing metric, ...) as the spec wrote them, in at
    most 224 bytes (UTF-8; `NAME_BUDGET`: 255 less Orbax's temporary suffix and a
    `-preempted` tag), never hidden (starting with `.`) and never looking like an
    unfinished Orbax save.

    Placeholders' values are made safe (`val/loss` is written `val_loss`), and so is the
    literal text, by the same rule (`safe_name`: a space is written `_`), except that
    literal text must not contain a directory separator (`/` or `\\`): such a template
    is refused.

    Example:
        ```python
        template = FilenameTemplate("model-{epoch:02d}-{val/loss:.4f}")
        name = template.render(epoch=3, metrics={"val/loss": 0.1234})
        assert name == "model-03-0.1234"
        assert template.parse_step(name) == 3
        assert template.parse(name) == {"epoch": 3, "val/loss": 0.1234}

        by_step = FilenameTemplate("ckpt-{step:06d}-{val_loss:.3f}", key="step")
        assert by_step.render(step=1500, metrics={}, missing="none") == "ckpt-001500-none"
        assert by_step.parse_step("ckpt-001500-none") == 1500
        ```
    """

    template: str
    key: Key = "epoch"
    _compiled: _Compiled = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not self.template:
            raise ConfigError(
                f"filename={self.template!r} is not a template; pass a non-empty str such as "
                "'model-{epoch:02d}-{val_loss:.4f}'"
            )
        if not isinstance(self.key, str) or self.key not in _KEYS:
            raise ConfigError(
                f"key={self.key!r} is not accepted for filename template {self.template!r}; "
                "use 'epoch' or 'step' (the placeholder that is the manager's step)"
            )
        object.__setattr__(self, "_compiled", _compile(self.template, self.key))

    @property
    def metric_fields(self) -> tuple[str, ...]:
        """Placeholders that are filled from metrics (everything but epoch and step)."""
        return tuple(f for f in self._compiled.groups if f not in _KEYS)

    def render(
        self,
        *,
        epoch: int | None = None,
        metrics: Mapping[str, object] | None = None,
        step: int | None = None,
        missing: Missing = "raise",
    ) -> str:
        """The directory name for these counters and metrics.

        The key counter (`epoch=` or `step=`, see `key`) is required; the other one defaults
        to it. Counters must be integers >= 0 (`StepError` otherwise).

        Metrics are formatted as floats with their spec. A text longer than 24 characters
        (or than the spec's width) is written in scientific notation instead, with the spec's
        precision (default 4) and sign option: `{val_loss:.4f}` writes `1e300` as
        `1.0000e+300`, not as 301 digits.

        A metric missing from `metrics` raises `MetricError` (`missing="raise"`), or is
        written as the literal `none` (`missing="none"`), which `parse` reads as absent.

        Example:
            ```python
            template = FilenameTemplate("m-{epoch:02d}-{val_loss:.4f}")
            assert template.render(epoch=1, metrics={"val_loss": 1e300}) == "m-01-1.0000e+300"
            assert template.render(epoch=2, missing="none") == "m-02-none"
            ```
        """
        if missing not in ("raise", "none"):
            raise ConfigError(f"missing={missing!r} is not accepted; use 'raise' or 'none'")
        counters = self._counters(epoch, step)
        given = metrics or {}
        values: dict[str, float | None] = {}
        for name in self.metric_fields:
            if name in given:
                values[name] = to_float(name, given[name])
            elif missing == "none":
                values[name] = None
            else:
                raise MetricError(
                    f"filename template {self.template!r} needs metric {name!r}, which is "
                    f"missing; metrics given: {sorted(given)}. Pass it, or render with "
                    f"missing='none' to write {MISSING!r} in its place"
                )
        return _render(self._compiled.pieces, counters, values)[0]

    def parse(self, name: str) -> dict[str, float] | None:
        """Every placeholder's value read back from a directory name (None if not ours).

        `epoch` and `step` are ints; metrics are floats as precise as their spec wrote
        them (`float("nan")` for "nan"). A metric written as `none` has no entry.

        Example:
            ```python
            template = FilenameTemplate("m-{epoch}-{acc:.1%}-{loss:.2f}")
            assert template.parse("m-4-50.0%-none") == {"epoch": 4, "acc": 0.5}
            assert template.parse("m-4-50.0%-none.bak") is None
            ```
        """
        return _parse(self._compiled, name)

    def parse_step(self, name: str) -> int | None:
        """The manager's step (the `key` placeholder) encoded in a name, or None if not ours.

        Example:
            ```python
            assert FilenameTemplate("s{step}-e{epoch}", key="step").parse_step("s90-e2") == 90
            ```
        """
        match = self._compiled.pattern.fullmatch(name)
        return None if match is None else int(match.group(self._compiled.groups[self.key]))

    def parse_epoch(self, name: str) -> int | None:
        """The `{epoch}` encoded in a name; None if the name is not ours or has no epoch.

        With the default `key="epoch"` this is `parse_step`.
        """
        group = self._compiled.groups.get("epoch")
        match = self._compiled.pattern.fullmatch(name)
        return None if match is None or group is None else int(match.group(group))

    def _counters(self, epoch: int | None, step: int | None) -> dict[str, int]:
        given = {"epoch": epoch, "step": step}
        if given[self.key] is None:
            raise StepError(
                f"filename template {self.template!r} is keyed by {{{self.key}}}; "
                f"render needs {self.key}= (the manager's step)"
            )
        counters = {}
        for name in _RESERVED:
            value = given[self.key] if given[name] is None else given[name]
            number = _counter(value)
            if number is None or number < 0:
                raise StepError(
                    f"{name}={value!r} cannot fill filename template {self.template!r}; "
                    "use an integer >= 0"
                )
            counters[name] = number
        return counters


def _counter(value: object) -> int | None:
    """`value` as an int (numpy and JAX integers too), or None; a bool is not a counter."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(cast(SupportsIndex, value))
    except TypeError:
        return None


def _render(
    pieces: tuple[_Piece, ...], counters: Mapping[str, int], metrics: Mapping[str, float | None]
) -> tuple[str, dict[str, str]]:
    """The safe name, and each placeholder's first text as written (unpadded)."""
    out = []
    written: dict[str, str] = {}
    for piece in pieces:
        out.append(piece.literal)
        if piece.field is None:
            continue
        if piece.field in _KEYS:
            text = format(counters[piece.field], piece.spec)
            plain = str(counters[piece.field])
        else:
            text, plain = _metric_text(piece, metrics[piece.field])
        out.append(text)
        written.setdefault(piece.field, plain)
    return safe_name("".join(out)), written


def _metric_text(piece: _Piece, value: float | None) -> tuple[str, str]:
    if value is None:
        return MISSING, MISSING
    text = format(value, piece.spec)
    if len(text) > piece.bound:
        text = format(value, piece.fallback)
        return text, text
    return text, format(value, piece.plain)


def _parse(compiled: _Compiled, name: str) -> dict[str, float] | None:
    match = compiled.pattern.fullmatch(name)
    if match is None:
        return None
    values: dict[str, float] = {}
    for field_name, group in compiled.groups.items():
        text = match.group(group)
        if field_name in _KEYS:
            values[field_name] = int(text)
        elif text != MISSING:
            values[field_name] = _read_number(text)
    return values


def _read_number(text: str) -> float:
    body = text.replace("_", "").replace(",", "").removesuffix("%")
    if body[-3:].lower() in ("nan", "inf"):
        # Zero padding ("08.4f") writes nan as "0000nan", which float() refuses.
        body = body[:-3].rstrip("0") + body[-3:]
    return float(body) / 100 if text.endswith("%") else float(body)


@functools.lru_cache(maxsize=256)
def _compile(template: str, key: str) -> _Compiled:
    pieces = _split(template, key)
    compiled = _Compiled(pieces, *_pattern(pieces))
    _check_literals(template, pieces)
    _check_read_back(template, key, compiled)
    _check_length(template, pieces)
    return compiled


def _split(template: str, key: str) -> tuple[_Piece, ...]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(f"filename template {template!r} does not parse: {err}") from None
    pieces = []
    previous: str | None = None
    for literal, name, spec, conversion in parsed:
        if name is not None:
            if not name or name.isdigit():
                raise ConfigError(
                    f"filename template {template!r} has a positional placeholder "
                    f"{{{name}}}; name it, e.g. {{epoch}} or {{val_loss:.4f}}"
                )
            if conversion or (spec and "{" in spec):
                raise ConfigError(
                    f"filename template {template!r}: placeholder {{{name}}} uses a "
                    "conversion or nested field; only '{name:spec}' is accepted"
                )
            if not literal and previous is not None:
                raise ConfigError(
                    f"filename template {template!r}: {{{previous}}} and {{{name}}} touch, "
                    "so they cannot be told apart when read back; put a separator such as "
                    "'-' between them"
                )
            pieces.append(_piece(template, literal, name, spec or ""))
        elif literal:
            pieces.append(_Piece(literal, None, ""))
        previous = name
    if not any(p.field == key for p in pieces):
        example = "model-{epoch:02d}" if key == "epoch" else "model-{step:06d}"
        raise ConfigError(
            f"filename template {template!r} has no {{{key}}} placeholder (its key), so two "
            f"checkpoints could share a name; add one, e.g. {example!r}"
        )
    return tuple(pieces)


def _piece(template: str, literal: str, name: str, spec: str) -> _Piece:
    counter = name in _KEYS
    sample: float = 7 if counter else 0.5
    try:
        format(sample, spec)
    except (ValueError, TypeError) as err:
        kind = "an integer" if counter else "a float metric"
        fix = "'d' or '02d'" if counter else "'.4f', '.3e' or '.2%'"
        raise ConfigError(
            f"filename template {template!r}: format spec {spec!r} of {{{name}}} cannot "
            f"format {kind} ({sample!r}): {err}; use a spec such as {fix}"
        ) from None
    parts = _SPEC.fullmatch(spec)
    if parts is None or parts["type"] == "n":
        # "n" follows the locale, which may differ when the name is read back.
        raise ConfigError(
            f"filename template {template!r}: format spec {spec!r} of {{{name}}} depends "
            "on the locale; use a spec such as '.4f'"
        )
    if counter:
        return _Piece(literal, name, spec)
    precision = parts["precision"] or str(_DEFAULT_PRECISION)
    plain = "".join(parts.group("sign", "z", "alt", "grouping"))
    if parts["precision"]:
        plain += f".{parts['precision']}"
    return _Piece(
        literal,
        name,
        spec,
        bound=max(FIXED_POINT_CHARS, int(parts["width"] or 0)),
        fallback=f"{parts['sign']}.{precision}e",
        plain=plain + parts["type"],
    )


def _pattern(pieces: tuple[_Piece, ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    parts = []
    groups: dict[str, str] = {}
    for index, piece in enumerate(pieces):
        parts.append(re.escape(safe_name(piece.literal)))
        if piece.field is None:
            continue
        number = _COUNTER if piece.field in _KEYS else _METRIC
        if piece.field in groups:
            parts.append(number)
        else:
            # Group names must be identifiers; metric names such as "val/loss" are not.
            groups[piece.field] = f"f{index}"
            parts.append(f"(?P<f{index}>{number})")
    return re.compile("".join(parts)), groups


def _check_literals(template: str, pieces: tuple[_Piece, ...]) -> None:
    for piece in pieces:
        separator = next((c for c in _SEPARATORS if c in piece.literal), None)
        if separator is not None:
            # Written as "_", it would make one directory, not the nested ones the template
            # shows, and a checkpoint looked for under the template's text is never found.
            raise ConfigError(
                f"filename template {template!r} has {separator!r} in its literal text "
                f"{piece.literal!r}; placeholders' values are made safe ('val/loss' is "
                "written 'val_loss'), but literals must not contain '/' or '\\', which "
                "separate directories: a checkpoint is one directory directly in the run "
                f"directory. Use '-' or '_' instead, e.g. {_without_separators(pieces)!r}"
            )
    text = safe_name("".join(p.literal for p in pieces))
    if pieces[0].literal.startswith("."):
        raise ConfigError(
            f"filename template {template!r} starts with '.', which makes hidden "
            "directories (the library's own files start with '.artifex'); start it with a "
            "letter or digit, e.g. 'model-{epoch:02d}'"
        )
    if step_lib.TMP_DIR_SUFFIX in text:
        raise ConfigError(
            f"filename template {template!r} contains Orbax's temporary suffix "
            f"{step_lib.TMP_DIR_SUFFIX!r}, so its checkpoints would look unfinished; "
            "choose another name"
        )


def _without_separators(pieces: tuple[_Piece, ...]) -> str:
    """The template with every directory separator in its literal text replaced by '-'."""
    out = []
    for piece in pieces:
        literal = piece.literal
        for separator in _SEPARATORS:
            literal = literal.replace(separator, "-")
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if piece.field is not None:
            out.append(piece.shown)
    return "".join(out)


def _check_read_back(template: str, key: str, compiled: _Compiled) -> None:
    """Render sample counters and metrics, and read each name back."""
    counter_fields = [f for f in _RESERVED if f in compiled.groups]
    metric_fields = [f for f in compiled.groups if f not in _KEYS]
    combos = itertools.product(_COUNTER_SAMPLES, repeat=len(counter_fields))
    for counter_values in combos:
        counters = dict(zip(counter_fields, counter_values, strict=True))
        for index in range(len(_METRIC_SAMPLES)):
            # Each metric gets a different sample, so neighbours differ as in real runs.
            metrics = {
                name: _METRIC_SAMPLES[(index + offset) % len(_METRIC_SAMPLES)]
                for offset, name in enumerate(metric_fields)
            }
            problem = _read_back_problem(compiled, counters, metrics)
            if problem is not None:
                values = ", ".join(
                    f"{n}={v!r}" for n, v in {**counters, **metrics}.items() if v is not None
                )
                missing = [n for n, v in metrics.items() if v is None]
                if missing:
                    values += f" ({', '.join(missing)} missing)"
                raise ConfigError(f"filename template {template!r}: with {values}, {problem}")


def _read_back_problem(
    compiled: _Compiled, counters: Mapping[str, int], metrics: Mapping[str, float | None]
) -> str | None:
    name, written = _render(compiled.pieces, counters, metrics)
    for piece in compiled.pieces:
        if piece.field is not None:
            problem = _piece_problem(piece, name, counters, metrics)
            if problem is not None:
                return problem
    parsed = _parse(compiled, name) or {}
    for field_name, plain in written.items():
        expected = _expected(field_name, plain)
        if not _same(parsed.get(field_name), expected):
            return (
                f"{{{field_name}}} reads back from {name!r} as {parsed.get(field_name)!r}, "
                f"not {expected!r} as written, because the text around it is taken for part "
                "of it; separate the placeholders with literal text such as '-'"
            )
    if name in ("", ".", "..") or name.startswith(".") or step_lib.TMP_DIR_SUFFIX in name:
        return f"it renders {name!r}, which is not a usable directory name"
    return None


def _piece_problem(
    piece: _Piece, name: str, counters: Mapping[str, int], metrics: Mapping[str, float | None]
) -> str | None:
    """Whether this placeholder's own text, alone, reads back as what it wrote."""
    assert piece.field is not None
    counter = piece.field in _KEYS
    if counter:
        text, plain = format(counters[piece.field], piece.spec), str(counters[piece.field])
    else:
        text, plain = _metric_text(piece, metrics[piece.field])
    shown = safe_name(text)
    if re.fullmatch(_COUNTER if counter else _METRIC, shown):
        expected = _expected(piece.field, plain)
        got = _expected(piece.field, shown)
        if _same(got, expected):
            return None
        problem = f"which reads back as {got!r}, not {expected!r}"
    else:
        problem = f"which cannot be read back as {'an integer' if counter else 'a number'}"
    fix = (
        f"give {{{piece.field}}} a plain integer spec such as '{{{piece.field}:02d}}'"
        if counter
        else f"use a spec without fill or alignment, such as '{{{piece.field}:.4f}}'"
    )
    return f"{piece.shown} (spec {piece.spec!r}) writes {shown!r} in {name!r}, {problem}; {fix}"


def _expected(field_name: str, text: str) -> float | None:
    """The value a placeholder's text stands for: None for a missing metric."""
    if field_name in _KEYS:
        return int(text)
    return None if text == MISSING else _read_number(text)


def _same(got: float | None, expected: float | None) -> bool:
    if got is None or expected is None:
        return got is expected
    return got == expected or (math.isnan(got) and math.isnan(expected))


def _check_length(template: str, pieces: tuple[_Piece, ...]) -> None:
    """Refuse templates whose longest name (every field at its longest) exceeds
    `NAME_BUDGET`, so that even a partial checkpoint's name while Orbax writes it fits."""
    total = 0
    longest: list[tuple[int, str]] = []
    for piece in pieces:
        total += len(safe_name(piece.literal).encode())
        if piece.field is None:
            continue
        if piece.field in _KEYS:
            samples: tuple[float | None, ...] = _COUNTER_SAMPLES
            texts = [format(v, piece.spec) for v in _COUNTER_SAMPLES]
        else:
            samples = (*_LENGTH_PROBES, None)
            texts = [_metric_text(piece, v)[0] for v in samples]
        sizes = [len(safe_name(t).encode()) for t in texts]
        size = max(sizes)
        total += size
        longest.append((size, f"{piece.shown} writes {size} for {samples[sizes.index(size)]!r}"))
    if total > NAME_BUDGET:
        worst = ", ".join(text for _, text in sorted(longest, reverse=True)[:3])
        longest_tag = max(PARTIAL_TAGS, key=lambda tag: len(tag.encode()))
        raise ConfigError(
            f"filename template {template!r} renders names of up to {total} bytes ({worst}); "
            f"a name must fit in {NAME_BUDGET} bytes (UTF-8), leaving room for Orbax's "
            f"temporary suffix {step_lib.TMP_DIR_SUFFIX!r} ({TMP_SUFFIX_BYTES} bytes) and a "
            f"-{longest_tag} tag ({PARTIAL_TAG_BYTES} bytes) within the {MAX_NAME_BYTES}-byte "
            "limit of a directory name; shorten the literal text, drop placeholders or use "
            "shorter specs such as '.3e'"
        )


def _named_final(path: epath.Path) -> bool:
    return step_lib.TMP_DIR_SUFFIX not in path.name


def _leads_back(link: str, root: str) -> bool:
    """Whether a local symbolic link leads to the run directory `root` (a real path), into
    it, or to one of its parents: then it is no checkpoint of its own."""
    target = os.path.realpath(link)
    try:
        common = os.path.commonpath([target, root])
    except ValueError:  # different drives (Windows): not related
        return False
    return common in (target, root)


def _quarantine_commands(base: epath.Path, paths: list[epath.Path]) -> str:
    run = shlex.quote(os.fspath(base))
    return " or ".join(f"`artifex-ckpt quarantine {run} {shlex.quote(p.name)}`" for p in paths)


def _listed_together(paths: list[epath.Path]) -> str:
    names = [repr(p.name) for p in paths]
    return f"{', '.join(names[:-1])} and {names[-1]}"


@dataclass(frozen=True)
class _Found:
    path: epath.Path
    link: bool


class TemplateNameFormat(step_lib.NameFormat[step_lib.Metadata]):
    """Orbax `NameFormat` whose step directories carry rendered template names.

    Orbax's `build_name(step)` receives only the step, so the name rendered at save
    time is remembered here (`remember`), and rebuilt from disk by `find_all` when a
    directory is opened: a directory's step is its template's key placeholder
    (`FilenameTemplate.parse_step`). Unfinished `*.orbax-checkpoint-tmp` directories
    are ignored.

    Locally, a symbolic link named like a checkpoint is listed when it leads out of the run
    directory (a checkpoint moved to another disk and linked back), and ignored when it
    leads to the run directory, into it or above it (`ck-7-0.100 -> .`). A link that reads
    as the same step as a real directory is ignored with a `CheckpointWarning` naming both;
    two real directories of one step raise `StepError` (Orbax would count them as one
    checkpoint and delete both), with the `artifex-ckpt quarantine` command that fixes it.

    Example:
        ```python
        names = TemplateNameFormat(FilenameTemplate("ckpt-{step:06d}", key="step"))
        names.remember(1500, "ckpt-001500")
        assert names.build_name(1500) == "ckpt-001500"
        ```
    """

    def __init__(self, template: FilenameTemplate) -> None:
        self.template = template
        self._names: dict[int, str] = {}
        # Orbax lists a directory again after every save; each ignored link is told once.
        self._warned: set[str] = set()

    def __str__(self) -> str:
        return f"TemplateNameFormat({self.template.template!r}, key={self.template.key!r})"

    def remember(self, step: int, name: str) -> None:
        """Record the name the next save of `step` will use."""
        self._names[step] = name

    def forget(self, step: int) -> None:
        """Drop a remembered name whose save did not happen."""
        self._names.pop(step, None)

    def build_name(self, step: int) -> str:
        try:
            return self._names[step]
        except KeyError:
            raise StepError(
                f"no directory name is known for step {step} under template "
                f"{self.template.template!r}; known steps: {sorted(self._names)}"
            ) from None

    def step_of(self, name: str) -> int | None:
        """The step a directory name holds: the template's, or a partial checkpoint's
        (the template's name with `-preempted` or `-exception` appended)."""
        step = self.template.parse_step(name)
        if step is not None:
            return step
        head, _, tag = name.rpartition("-")
        return self.template.parse_step(head) if tag in PARTIAL_TAGS else None

    def find_all(self, base_path: epath.PathLike) -> Iterator[step_lib.Metadata]:
        base = epath.Path(base_path)
        if not base.is_dir():
            return
        # On a local disk a save commits by renaming away the temporary suffix, so the
        # name tells; Orbax's general check costs ~1 ms per directory (B5 in the benchmarks).
        local = "://" not in os.fspath(base)
        root = os.path.realpath(os.fspath(base)) if local else ""
        found: dict[int, list[_Found]] = {}
        for path in base.iterdir():
            step = self.step_of(path.name)
            if step is None:
                continue
            link = local and os.path.islink(path)
            # Listed, `ck-7 -> .` would pass for the newest checkpoint, though it is the run
            # itself; a link that leads out (a step moved to another disk) is a checkpoint.
            if (link and _leads_back(os.fspath(path), root)) or not path.is_dir():
                continue
            finalized = _named_final(path) if local else step_lib.is_path_finalized(path)
            if finalized:
                found.setdefault(step, []).append(_Found(path, link))
        # All read before any is handed out: a link and a directory of one step may come
        # in either order.
        for step, entries in sorted(found.items()):
            path = self._choose(base, step, entries)
            if path is not None:
                self._names[step] = path.name
                yield step_lib.Metadata(step=step, path=path)

    def find_step(self, base_path: epath.PathLike, step: int) -> step_lib.Metadata:
        base = epath.Path(base_path)
        name = self._names.get(step)
        if name is not None and (base / name).is_dir():
            return step_lib.Metadata(step=step, path=base / name)
        for metadata in self.find_all(base):
            if metadata.step == step:
                return metadata
        raise ValueError(f"no committed checkpoint for step {step} under {base}")

    def _choose(self, base: epath.Path, step: int, entries: list[_Found]) -> epath.Path | None:
        """The one directory of `step`, None if only ambiguous links claim it."""
        real = sorted((e.path for e in entries if not e.link), key=lambda p: p.name)
        links = sorted((e.path for e in entries if e.link), key=lambda p: p.name)
        template = repr(self.template.template)
        if len(real) > 1:
            both, other = ("both", "the other") if len(real) == 2 else ("all", "the others")
            raise StepError(
                f"{_listed_together(real)} in {os.fspath(base)} {both} read as step {step} "
                f"under template {template}, so the run cannot be opened: Orbax would count "
                "them as one checkpoint and delete them all when it is evicted. Keep the one "
                f"that is step {step} of this run and move {other} aside with "
                f"{_quarantine_commands(base, real)} (it is moved into the run's "
                ".artifex-quarantine directory, not deleted), then open the run again"
            )
        if real:
            for link in links:
                self._warn(
                    link,
                    f"{os.fspath(link)} is a symbolic link to {os.path.realpath(link)} and "
                    f"reads as step {step}, as does the checkpoint directory "
                    f"{os.fspath(real[0])}; the link is ignored and {real[0].name!r} is step "
                    f"{step}. Remove the link (what it leads to is not touched) to silence this",
                )
            return real[0]
        if len(links) > 1:
            both, neither = ("both", "neither") if len(links) == 2 else ("all", "none")
            for link in links:
                self._warn(
                    link,
                    f"the symbolic links {_listed_together(links)} in {os.fspath(base)} "
                    f"{both} read as step {step} under template {template}; {neither} is "
                    f"listed, since any could be step {step}: remove those that are not "
                    f"({os.fspath(link)} leads to {os.path.realpath(link)})",
                )
            return None
        return links[0]

    def _warn(self, link: epath.Path, message: str) -> None:
        if os.fspath(link) not in self._warned:
            self._warned.add(os.fspath(link))
            warnings.warn(CheckpointWarning(message), stacklevel=4)
