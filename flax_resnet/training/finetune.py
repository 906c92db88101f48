"""Fine-tuning on your own images: ``flax-resnet finetune``, ordinary training from pretrained weights.

Fine-tuning is :func:`~flax_resnet.training.loop.train_and_evaluate` with a few config
fields (see :mod:`flax_resnet.configs.finetune_folder`); the parameter groups, frozen
layers and per-group learning rates they set up are :mod:`flax_resnet.training.optimizer`'s.
"""

from __future__ import annotations

from pathlib import Path

from flax_resnet import data
from flax_resnet.checkpoint import has_checkpoint
from flax_resnet.configs import validate_config
from flax_resnet.data.sources import FOLDER_PREFIX
from flax_resnet.errors import DatasetNotPreparedError, UserError
from flax_resnet.training.loop import train_and_evaluate


def finetune(config, workdir, *, print_fn=print):
    """``flax-resnet finetune``: checks the inputs, prepares a ``folder:`` dataset if needed, trains.

    ``config.pretrained`` is a weights file (loaded when the state is created) or a
    flax_resnet run directory (its best checkpoint's weights, through
    ``train_and_evaluate(init_from=...)``). A fresh run needs it to exist; a run resumed
    from ``workdir``'s checkpoint does not read it again. Returns the
    :class:`~flax_resnet.training.loop.TrainSummary`.
    """
    validate_config(config)  # before a folder is prepared
    if not config.dataset:
        raise UserError("no dataset: pass --dataset folder:PATH (PATH/train/<class>/*, PATH/val/<class>/*)")
    init_from = None
    source = Path(config.get("pretrained") or "").expanduser()
    if config.get("pretrained") and source.is_dir():  # a flax_resnet run: start from its best checkpoint
        init_from = source
        with config.ignore_type():
            config.pretrained = ""
            config.init_from = str(source)  # recorded in the run's config
    elif not has_checkpoint(workdir):
        if not config.get("pretrained"):
            raise UserError("no pretrained weights: pass --pretrained FILE (.safetensors or .pth) or a run directory")
        if not source.is_file():
            raise UserError(f"pretrained weights {config.pretrained} not found: pass an existing .safetensors or "
                            ".pth file, or a flax_resnet run directory (see README: fine-tune on your own images)")
    try:
        data.get_dataset_info(config.dataset, config.data_dir)
    except DatasetNotPreparedError:
        if not config.dataset.startswith(FOLDER_PREFIX):
            raise
        print_fn(data.prepare(config.dataset, config.data_dir))
    return train_and_evaluate(config, workdir, print_fn=print_fn, init_from=init_from,
                              new_head=not config.get("keep_pretrained_head", False))
