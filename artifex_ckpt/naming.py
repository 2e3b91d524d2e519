"""Filename templates and the Orbax `NameFormat` that makes them real directory names.

A template such as `"model-{epoch:02d}-{val/loss:.4f}"` renders to `model-03-0.1234`.
`{epoch}` is the manager's step, `{step}` the global step, and any other placeholder is
a metric. The step is parsed back from a directory name, so a manager reopened on the
directory rebuilds its step-to-name cache from disk.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from etils import epath
from orbax.checkpoint.path import step as step_lib

from artifex_ckpt.errors import ConfigError, MetricError, StepError

__all__ = ["FilenameTemplate", "TemplateNameFormat", "safe_name"]

_UNSAFE = re.compile(r"[^\w.=+@,%-]")
_RESERVED = {"epoch", "step"}
# Values that every format spec must accept at validation time, so a bad spec fails
# when the config is built rather than after a training epoch.
_SAMPLE_METRIC = 0.5
_SAMPLE_EPOCHS = (0, 7, 42, 12345)
_SAMPLE_VALUES = (0.5, -3.0, 1e-05, 12345.678, math.nan, -math.inf)
# What a formatted number can look like once made safe: padding, sign, digits with
# separators, exponent, nan/inf, percent. Anything else (a ".bak" copy) is not ours.
_NUMBER = r"_*[-+]?(?:[\d,]*\.?\d+(?:[eE][-+]?\d+)?|nan|inf|NAN|INF)%?"


def safe_name(text: str) -> str:
    """Replace every character that is unsafe in a directory name (`/`, spaces, ...) by `_`."""
    return _UNSAFE.sub("_", text)


@dataclass(frozen=True)
class _Piece:
    literal: str
    field: str | None
    spec: str


@dataclass(frozen=True)
class FilenameTemplate:
    """A validated filename template.

    Example:
        ```python
        template = FilenameTemplate("model-{epoch:02d}-{val/loss:.4f}")
        name = template.render(epoch=3, metrics={"val/loss": 0.1234})
        assert name == "model-03-0.1234"
        assert template.parse_epoch(name) == 3
        ```
    """

    template: str
    _pieces: tuple[_Piece, ...] = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pieces = _parse(self.template)
        object.__setattr__(self, "_pieces", pieces)
        object.__setattr__(self, "_pattern", _step_pattern(pieces))
        self._check_renders()

    @property
    def metric_fields(self) -> tuple[str, ...]:
        """Placeholders that are filled from metrics (everything but epoch and step)."""
        return tuple(p.field for p in self._pieces if p.field and p.field not in _RESERVED)

    def render(
        self, *, epoch: int, metrics: Mapping[str, float] | None = None, step: int | None = None
    ) -> str:
        """Render the directory name for `epoch`; `step` defaults to `epoch`."""
        values: dict[str, object] = dict(metrics or {})
        values["epoch"] = epoch
        values["step"] = epoch if step is None else step
        out = []
        for piece in self._pieces:
            out.append(piece.literal)
            if piece.field is None:
                continue
            if piece.field not in values:
                raise MetricError(
                    f"filename template {self.template!r} needs metric {piece.field!r}, "
                    f"which is missing; metrics given: {sorted(metrics or {})}"
                )
            out.append(format(values[piece.field], piece.spec))
        return safe_name("".join(out))

    def parse_epoch(self, name: str) -> int | None:
        """The epoch encoded in a directory name, or None if the name is not ours."""
        fields = self.parse(name)
        return None if fields is None else int(fields["epoch"])

    def parse(self, name: str) -> dict[str, float] | None:
        """Every placeholder's value read back from a directory name (None if not ours).

        Values are as precise as the format spec wrote them; `float("nan")` for "nan".
        """
        match = self._pattern.fullmatch(name)
        if match is None:
            return None
        values: dict[str, float] = {}
        for index, piece in enumerate(self._pieces):
            text = match.group(f"f{index}") if piece.field is not None else None
            if text is not None and piece.field is not None:
                values[piece.field] = _read_number(text)
        return values

    def _check_renders(self) -> None:
        sample = dict.fromkeys(self.metric_fields, _SAMPLE_METRIC)
        for piece in self._pieces:
            if piece.field is None:
                continue
            value = 7 if piece.field in _RESERVED else _SAMPLE_METRIC
            try:
                format(value, piece.spec)
            except (ValueError, TypeError) as err:
                kind = "an integer" if piece.field in _RESERVED else "a float metric"
                raise ConfigError(
                    f"filename template {self.template!r}: format spec {piece.spec!r} of "
                    f"{{{piece.field}}} cannot format {kind} ({value!r}): {err}"
                ) from None
        epoch_spec = next(p.spec for p in self._pieces if p.field == "epoch")
        for epoch, value in itertools.product(_SAMPLE_EPOCHS, _SAMPLE_VALUES):
            name = self.render(epoch=epoch, metrics=dict.fromkeys(sample, value))
            if self.parse_epoch(name) != epoch:
                raise ConfigError(
                    f"filename template {self.template!r}: with spec {epoch_spec!r}, "
                    f"epoch {epoch} (metrics {value}) renders as {name!r}, "
                    "from which the epoch cannot be read back; give {epoch} a plain integer "
                    "spec such as '{epoch:02d}' and separate it from other placeholders"
                )
        if step_lib.TMP_DIR_SUFFIX in name:
            raise ConfigError(
                f"filename template {self.template!r} contains Orbax's temporary suffix "
                f"{step_lib.TMP_DIR_SUFFIX!r}; choose another name"
            )


def _parse(template: object) -> tuple[_Piece, ...]:
    if not isinstance(template, str) or not template:
        raise ConfigError(
            f"filename={template!r} is not a template; pass a non-empty str such as "
            "'model-{epoch:02d}-{val_loss:.4f}'"
        )
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(f"filename template {template!r} does not parse: {err}") from None
    pieces = []
    previous_field: str | None = None
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
            if not literal and previous_field is not None and "epoch" in (name, previous_field):
                raise ConfigError(
                    f"filename template {template!r}: {{{previous_field}}} and {{{name}}} "
                    "touch, so the epoch cannot be read back; put a separator such as '-' "
                    "between them"
                )
        pieces.append(_Piece(literal, name, spec or ""))
        previous_field = name
    if not any(p.field == "epoch" for p in pieces):
        raise ConfigError(
            f"filename template {template!r} has no {{epoch}} placeholder, so two "
            "checkpoints could share a name; add one, e.g. 'model-{epoch:02d}'"
        )
    return tuple(pieces)


def _step_pattern(pieces: tuple[_Piece, ...]) -> re.Pattern[str]:
    parts = []
    seen: set[str] = set()
    for index, piece in enumerate(pieces):
        parts.append(re.escape(safe_name(piece.literal)))
        if piece.field is None:
            continue
        number = r"\d+" if piece.field in _RESERVED else _NUMBER
        if piece.field in seen:
            parts.append(number)
        else:
            # Group names must be identifiers; metric names such as "val/loss" are not.
            parts.append(f"(?P<f{index}>{number})")
            seen.add(piece.field)
    return re.compile("".join(parts))


def _read_number(text: str) -> float:
    text = text.lstrip("_").replace(",", "")
    if text.endswith("%"):
        return float(text[:-1]) / 100
    return float(text)


def _named_final(path: epath.Path) -> bool:
    return step_lib.TMP_DIR_SUFFIX not in path.name


class TemplateNameFormat(step_lib.NameFormat[step_lib.Metadata]):
    """Orbax `NameFormat` whose step directories carry rendered template names.

    Orbax's `build_name(step)` receives only the step, so the name rendered at save
    time is remembered here (`remember`), and rebuilt from disk by `find_all` when a
    directory is opened. Unfinished `*.orbax-checkpoint-tmp-*` directories are ignored.
    """

    def __init__(self, template: FilenameTemplate) -> None:
        self.template = template
        self._names: dict[int, str] = {}

    def __str__(self) -> str:
        return f"TemplateNameFormat({self.template.template!r})"

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

    def find_all(self, base_path: epath.PathLike) -> Iterator[step_lib.Metadata]:
        base = epath.Path(base_path)
        if not base.is_dir():
            return
        # On a local disk a save commits by renaming away the temporary suffix, so the
        # name tells; Orbax's general check costs ~1 ms per directory (B5 in the benchmarks).
        local = "://" not in os.fspath(base)
        seen: dict[int, epath.Path] = {}
        for path in base.iterdir():
            step = self.template.parse_epoch(path.name)
            if step is None or not path.is_dir():
                continue
            finalized = _named_final(path) if local else step_lib.is_path_finalized(path)
            if not finalized:
                continue
            if step in seen:
                # Orbax would count both as one step and delete both on eviction.
                raise StepError(
                    f"{seen[step].name!r} and {path.name!r} in {base} both read as step "
                    f"{step} under template {self.template.template!r}; move one away"
                )
            seen[step] = path
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
