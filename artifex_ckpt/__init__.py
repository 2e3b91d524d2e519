"""artifex_ckpt: keep the k best and the newest checkpoints of a JAX/Flax run, on Orbax."""

from __future__ import annotations

from artifex_ckpt.config import CheckpointConfig
from artifex_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    ConfigError,
    CorruptCheckpointWarning,
    MetricError,
    SettingsMismatchError,
    StepError,
    WeightsOnlyError,
)
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.naming import FilenameTemplate
from artifex_ckpt.policies import BestNByRank, EveryNEpochs, MetricRanking, RetainedOnArrival
from artifex_ckpt.settings import RetentionSettings

__all__ = [
    "BestNByRank",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "ConfigError",
    "CorruptCheckpointWarning",
    "EveryNEpochs",
    "FilenameTemplate",
    "MetricCheckpointManager",
    "MetricError",
    "MetricRanking",
    "RetainedOnArrival",
    "RetentionSettings",
    "SettingsMismatchError",
    "StepError",
    "WeightsOnlyError",
]
