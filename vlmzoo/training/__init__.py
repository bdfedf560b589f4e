"""Multi-stage training on transformers' ``Trainer``: module groups, per-group learning rates, resumable runs."""

from .groups import GroupLayout, StagePlan, group_layout
from .runner import RunResult, StageResult, run_training, train_stage
from .trainer import VLMTrainer

__all__ = [
    "GroupLayout",
    "RunResult",
    "StagePlan",
    "StageResult",
    "VLMTrainer",
    "group_layout",
    "run_training",
    "train_stage",
]
