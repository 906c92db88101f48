"""Training: state, pure train/eval steps, schedules, the loop, and run logging."""

from flax_resnet.training.loop import TrainSummary, evaluate, predict, restore_model, train_and_evaluate
from flax_resnet.training.schedules import create_learning_rate_fn, step_schedule, warmup_cosine_schedule
from flax_resnet.training.state import (TrainState, abstract_train_state, create_optimizer, create_train_state,
                                        weight_decay_mask)
from flax_resnet.training.steps import cross_entropy_loss, eval_step, jit_eval_step, jit_train_step, train_step

__all__ = [
    "TrainState", "TrainSummary", "abstract_train_state", "create_learning_rate_fn", "create_optimizer",
    "create_train_state", "cross_entropy_loss", "eval_step", "evaluate", "jit_eval_step", "jit_train_step",
    "predict", "restore_model", "step_schedule", "train_and_evaluate", "train_step", "warmup_cosine_schedule",
    "weight_decay_mask",
]
