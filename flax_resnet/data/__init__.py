"""Data: TFDS datasets prepared as array_record, read through Grain into numpy batches.

``get_dataset_info`` describes a dataset, ``train_iterator`` yields augmented,
shuffled, per-process training batches with a saveable position, ``eval_batches``
one padded and masked pass over the held-out split, and ``prepare`` writes a
dataset to disk (what ``flax-resnet prepare`` runs).

Modules, each depending only on those before it: ``folders`` (image-folder
datasets), ``sources`` (names, opening prepared datasets), ``preparing`` (writing
them), ``info`` (dataset description, normalisation, batch recipe), ``augment``
(image transforms), ``batches`` (what each batch is), ``pipeline`` (Grain
iterators); ``synthetic`` writes random stand-ins for tests and benchmarks.
"""

from flax_resnet.data.augment import open_image, preprocess_for_eval
from flax_resnet.data.info import DatasetInfo, get_dataset_info
from flax_resnet.data.pipeline import (TrainIterator, enable_worker_processes, eval_batches, num_eval_batches,
                                       train_iterator)
from flax_resnet.data.preparing import prepare
from flax_resnet.data.sources import prepare_command

__all__ = [
    "DatasetInfo",
    "TrainIterator",
    "enable_worker_processes",
    "eval_batches",
    "get_dataset_info",
    "num_eval_batches",
    "open_image",
    "prepare",
    "prepare_command",
    "preprocess_for_eval",
    "train_iterator",
]
