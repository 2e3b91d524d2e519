from __future__ import annotations

import artifex_ckpt


def test_all_is_pinned() -> None:
    assert sorted(artifex_ckpt.__all__) == sorted(
        [
            "BaseCallback",
            "TrainingPreempted",
            "StaleLeaseWarning",
            "ResumePoint",
            "Resumable",
            "OwnershipError",
            "ModelMismatchError",
            "EveryInterval",
            "CorruptCheckpointError",
            "CheckpointWarning",
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
    )


def test_every_export_exists() -> None:
    for name in artifex_ckpt.__all__:
        assert hasattr(artifex_ckpt, name), name
