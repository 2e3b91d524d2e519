from __future__ import annotations

import artifex_ckpt


def test_all_is_pinned() -> None:
    assert sorted(artifex_ckpt.__all__) == sorted(
        [
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
    )


def test_every_export_exists() -> None:
    for name in artifex_ckpt.__all__:
        assert hasattr(artifex_ckpt, name), name
