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
    Resumable,
    ResumePoint,
    TrainerLike,
)
from artifex_ckpt.checkpointing import load_checkpoint, save_checkpoint, setup_checkpoint_manager
from artifex_ckpt.config import CheckpointConfig
from artifex_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointWarning,
    ConfigError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    MetricError,
    ModelMismatchError,
    SettingsMismatchError,
    StepError,
    WeightsOnlyError,
)
from artifex_ckpt.manager import MetricCheckpointManager
from artifex_ckpt.naming import FilenameTemplate
from artifex_ckpt.ownership import OwnershipError, StaleLeaseWarning
from artifex_ckpt.policies import (
    BestNByRank,
    EveryInterval,
    EveryNEpochs,
    MetricRanking,
    RetainedOnArrival,
)
from artifex_ckpt.preemption import TrainingPreempted
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
    "CheckpointWarning",
    "ConfigError",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "EarlyStopping",
    "EarlyStoppingConfig",
    "EveryInterval",
    "EveryNEpochs",
    "FilenameTemplate",
    "MetricCheckpointManager",
    "MetricError",
    "MetricRanking",
    "ModelCheckpoint",
    "ModelMismatchError",
    "OwnershipError",
    "ProgressBarCallback",
    "ProgressBarConfig",
    "Resumable",
    "ResumePoint",
    "RetainedOnArrival",
    "RetentionSettings",
    "SettingsMismatchError",
    "StaleLeaseWarning",
    "StepError",
    "Trainer",
    "TrainerLike",
    "TrainingPreempted",
    "WeightsOnlyError",
    "load_checkpoint",
    "save_checkpoint",
    "setup_checkpoint_manager",
]
