"""``flax-resnet convert``: weights of a PyTorch file or of one of our runs, as PyTorch-layout ``.safetensors``
(torchvision's for the ResNet family, the article's code's for ``article_resnet``)."""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from flax_resnet import pretrained
from flax_resnet.errors import UserError
from flax_resnet.models import create_model, get_spec
from flax_resnet.training.restore import restore_model


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, model: str | None = None,
            which: str = "best") -> str:
    """``flax-resnet convert``: checks weights against a model and writes PyTorch-layout ``.safetensors``.

    ``src`` is either a PyTorch/timm weights file (``.pth``/``.pt``/``.safetensors``;
    ``model`` names its architecture) or a flax_resnet run directory (its ``which``
    checkpoint is exported; the model comes from the run's config). The weights go
    through our model's layout and back, so the output is exactly what
    :func:`flax_resnet.pretrained.load_pretrained` reads, and loads into the PyTorch original
    (torchvision's model; the article's for ``article_resnet``) with ``load_state_dict(strict=True)``.
    Returns a one-line summary.
    """
    src_path = Path(src).expanduser()
    dst_path = Path(dst).expanduser()
    if dst_path.suffix.lower() not in pretrained.SAFETENSORS_SUFFIXES:
        raise UserError(f"output {dst_path} must end in .safetensors")
    if src_path.is_dir():
        restored = restore_model(src_path, which)
        name = restored.config.model
        if model and model != name:
            raise UserError(f"{src_path} holds a {name} run, not {model}: drop --model or pass --model {name}")
        sd = pretrained.to_torch_state_dict(restored.state.params, restored.state.batch_stats,
                                            model_cls=get_spec(name).builder)
        meta = {"model": name, "source": str(src_path.absolute()), "step": str(restored.step)}
    else:
        if not model:
            raise UserError("pass --model NAME (e.g. --model resnet50): the architecture the weights were made for")
        given = pretrained.read_state_dict(src_path)
        classes = pretrained.head_classes(given)
        abstract = nnx.eval_shape(lambda: create_model(model, num_classes=classes))
        _, params, stats = pretrained.split_state(abstract)
        model_cls = get_spec(model).builder
        params, stats, _ = pretrained.from_torch_state_dict(given, params, stats, source=str(src_path),
                                                            model_cls=model_cls)
        sd = pretrained.to_torch_state_dict(params, stats, model_cls=model_cls)
        name = model
        meta = {"model": name, "source": src_path.name}
    pretrained.save_safetensors(sd, dst_path, meta)
    n = sum(1 for k in sd if not k.endswith(pretrained.IGNORED_SUFFIXES))
    layout = "torchvision" if getattr(get_spec(name).builder, "torch_keys", None) is None else "the original's"
    return f"wrote {dst_path} ({name}, {n} tensors, {layout} layout)"
