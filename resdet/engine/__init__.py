"""Training engine: config-driven trainer, checkpoints, optimizers, LR schedules, distributed helpers,
fine-tuning loader, evaluation/inference entry points and drawing."""
from . import distributed
from .builders import build_dataset, build_evaluator, build_test_loader, build_train_loader
from .checkpoint import CheckpointManager, atomic_save
from .inference import evaluate_checkpoint, evaluate_model, infer_images, load_model
from .logger import MetricsWriter, ProgressBar, setup_logger
from .lr_schedule import LRFactor, build_lr_scheduler
from .optim import build_optimizer, param_groups
from .pretrained import LoadReport, load_pretrained
from .trainer import Trainer, TrainingInterrupted, seed_everything
from .visualize import draw_predictions

__all__ = [
    "distributed",
    "build_dataset",
    "build_evaluator",
    "build_test_loader",
    "build_train_loader",
    "CheckpointManager",
    "atomic_save",
    "evaluate_checkpoint",
    "evaluate_model",
    "infer_images",
    "load_model",
    "MetricsWriter",
    "ProgressBar",
    "setup_logger",
    "LRFactor",
    "build_lr_scheduler",
    "build_optimizer",
    "param_groups",
    "LoadReport",
    "load_pretrained",
    "Trainer",
    "TrainingInterrupted",
    "seed_everything",
    "draw_predictions",
]
