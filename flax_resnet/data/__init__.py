"""Data: TFDS datasets prepared as array_record, read through Grain into numpy batches.

``get_dataset_info`` describes a dataset, ``train_iterator`` yields augmented,
shuffled, per-process training batches with a saveable position, ``eval_batches``
one padded and masked pass over the held-out split, and ``prepare`` writes a
dataset to disk (what ``flax-resnet prepare`` runs).
"""

from flax_resnet.data.pipeline import (
    DatasetInfo,
    TrainIterator,
    eval_batches,
    get_dataset_info,
    num_eval_batches,
    preprocess_for_eval,
    train_iterator,
)
from flax_resnet.data.sources import prepare, prepare_command

__all__ = [
    "DatasetInfo",
    "TrainIterator",
    "eval_batches",
    "get_dataset_info",
    "num_eval_batches",
    "prepare",
    "prepare_command",
    "preprocess_for_eval",
    "train_iterator",
]
