"""latentdiff.train: one training loop (accelerate) for every objective, EMA, checkpoints, logs.

    from latentdiff.train import DiffusionObjective, TrainConfig, train
    result = train(DiffusionObjective(unet, diffusion, num_classes=10, cond_drop_prob=0.1),
                   dataset, TrainConfig(steps=10_000, batch_size=64), "runs/digits", resume=True)
"""

from .checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_models,
    verify_checkpoint,
)
from .config import TrainConfig, lr_factor
from .ema import EMA, ema_decay
from .logging import MetricsLogger, make_grid, save_grid
from .loop import TrainingDiverged, TrainResult, train
from .objective import DiffusionObjective, Objective

__all__ = [
    "CheckpointError", "DiffusionObjective", "EMA", "MetricsLogger", "Objective", "TrainConfig", "TrainResult",
    "TrainingDiverged", "ema_decay", "find_resume_checkpoint", "latest_checkpoint", "list_checkpoints",
    "load_model_weights", "load_models", "lr_factor", "make_grid", "save_grid", "train", "verify_checkpoint",
]
