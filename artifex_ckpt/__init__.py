"""artifex_ckpt: keep the k best and the newest checkpoints of a JAX/Flax run, on Orbax."""

from __future__ import annotations

from artifex_ckpt.callbacks import (
    BaseCallback,
    CallbackList,
    EarlyStopping,
    EarlyStoppingConfig,
    ModelCheckpoint,
    ProgressBarCallback,
    ProgressBarConfig,
    TrainerLike,
)
from artifex_ckpt.checkpointing import load_checkpoint, save_checkpoint, setup_checkpoint_manager
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
from artifex_ckpt.trainer import Trainer

__all__ = [
    "BaseCallback",
    "BestNByRank",
    "CallbackList",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "ConfigError",
    "CorruptCheckpointWarning",
    "EarlyStopping",
    "EarlyStoppingConfig",
    "EveryNEpochs",
    "FilenameTemplate",
    "MetricCheckpointManager",
    "MetricError",
    "MetricRanking",
    "ModelCheckpoint",
    "ProgressBarCallback",
    "ProgressBarConfig",
    "RetainedOnArrival",
    "RetentionSettings",
    "SettingsMismatchError",
    "StepError",
    "Trainer",
    "TrainerLike",
    "WeightsOnlyError",
    "load_checkpoint",
    "save_checkpoint",
    "setup_checkpoint_manager",
]
