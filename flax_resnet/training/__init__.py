"""Training: state, optimiser, pure train/eval steps, schedules, the loop, restore/evaluate/predict, logging."""

from flax_resnet.training.loop import TrainSummary, train_and_evaluate
from flax_resnet.training.optimizer import create_optimizer, weight_decay_mask
from flax_resnet.training.restore import RestoredModel, evaluate, predict, restore_model
from flax_resnet.training.schedules import create_learning_rate_fn, step_schedule, warmup_cosine_schedule
from flax_resnet.training.state import (TrainState, abstract_train_state, compute_dtype, create_model,
                                        create_train_state, split_model)
from flax_resnet.training.steps import (cross_entropy_loss, eval_step, jit_eval_step, jit_predict_step, jit_train_step,
                                        train_step)

__all__ = [
    "RestoredModel", "TrainState", "TrainSummary", "abstract_train_state", "compute_dtype", "create_learning_rate_fn",
    "create_model", "create_optimizer", "create_train_state", "cross_entropy_loss", "eval_step", "evaluate",
    "jit_eval_step", "jit_predict_step", "jit_train_step", "predict", "restore_model", "split_model",
    "step_schedule", "train_and_evaluate", "train_step", "warmup_cosine_schedule", "weight_decay_mask",
]
