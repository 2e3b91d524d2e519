"""Callbacks for `Trainer`: checkpointing, early stopping and a progress bar."""

from __future__ import annotations

from artifex_ckpt.callbacks.base import (
    BaseCallback,
    CallbackList,
    Resumable,
    ResumeFrom,
    ResumePoint,
    TrainerLike,
)
from artifex_ckpt.callbacks.checkpoint import ModelCheckpoint
from artifex_ckpt.callbacks.early_stopping import EarlyStopping, EarlyStoppingConfig
from artifex_ckpt.callbacks.progress import ProgressBarCallback, ProgressBarConfig
from artifex_ckpt.config import CheckpointConfig

__all__ = [
    "BaseCallback",
    "CallbackList",
    "CheckpointConfig",
    "EarlyStopping",
    "EarlyStoppingConfig",
    "ModelCheckpoint",
    "ProgressBarCallback",
    "ProgressBarConfig",
    "Resumable",
    "ResumeFrom",
    "ResumePoint",
    "TrainerLike",
]
