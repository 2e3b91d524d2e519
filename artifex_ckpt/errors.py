"""Exceptions and warnings raised by artifex_ckpt.

Every error subclasses both `CheckpointError` and the builtin a caller would
already catch (`ValueError`, `FileNotFoundError`, ...), so `except ValueError`
keeps working while `except CheckpointError` catches everything of ours.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointWarning",
    "ConfigError",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "MetricError",
    "ModelMismatchError",
    "SettingsMismatchError",
    "StepError",
    "WeightsOnlyError",
]


class CheckpointError(Exception):
    """Base class of every error artifex_ckpt raises."""


class ConfigError(CheckpointError, ValueError):
    """A setting (config field, template, option) has a value we cannot use."""


class SettingsMismatchError(ConfigError):
    """Explicit settings contradict the ones stored in the checkpoint directory."""


class MetricError(CheckpointError, ValueError):
    """A metric is missing or is not a real scalar."""


class StepError(CheckpointError, ValueError):
    """A step is negative, or not newer than the newest checkpoint."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No retained checkpoint matches the request."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's files are damaged: missing, truncated, or not matching their checksums."""


class ModelMismatchError(CheckpointError, ValueError):
    """A checkpoint is intact but does not fit the model or optimizer it is restored into."""


class WeightsOnlyError(CheckpointError, ValueError):
    """A weights-only checkpoint was asked for optimizer state or training progress."""


class CheckpointSaveError(CheckpointError, RuntimeError):
    """A save failed, possibly in the background; the cause is chained."""


class CheckpointWarning(UserWarning):
    """Something in a checkpoint directory needs attention; nothing was lost."""


class CorruptCheckpointWarning(CheckpointWarning):
    """A checkpoint failed to restore and was skipped in favour of another one."""
