"""Reading and writing PyTorch-layout state dicts as files, executing no code.

``.safetensors`` with safetensors' numpy API (no PyTorch needed); ``.pth``/``.pt``/``.bin``
only through ``torch.load(weights_only=True)``. A checkpoint that needs arbitrary pickled
objects is refused with a :class:`UserError`. :mod:`flax_resnet.pretrained` maps the keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from flax_resnet.errors import UserError

StateDict = dict[str, np.ndarray]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Wrappers training scripts put around a state dict (torchvision's references, timm's train.py, Lightning).
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "state_dict_ema", "model_ema", "module")


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads a PyTorch-layout state dict as float/int numpy arrays, executing no code.

    ``.safetensors``: safetensors' numpy API (bfloat16 tensors, through ``ml_dtypes``,
    are widened to float32). ``.pth``/``.pt``/``.bin``/``.ckpt``:
    ``torch.load(weights_only=True)`` (needs PyTorch). A dict wrapped as
    ``{"state_dict": ...}`` / ``{"model": ...}`` is unwrapped and a ``module.`` prefix
    (``DataParallel``) stripped.

    Raises:
      UserError: missing file, unknown suffix, unreadable file, or a pickle that needs code.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {path} not found: pass an existing .safetensors or .pth file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        sd = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        sd = _read_torch(path)
    else:
        raise UserError(f"cannot tell the format of {path}: name it *.safetensors or *.pth/*.pt")
    return _normalize_keys(sd, path)


def _read_safetensors(path: Path) -> StateDict:
    import ml_dtypes  # registers numpy's "bfloat16" (a JAX dependency), which bf16 files need
    from safetensors.numpy import load_file

    try:
        sd = dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise UserError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}); "
                        "re-download or re-export the file") from None
    return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in sd.items()}


def _read_torch(path: Path) -> StateDict:
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {path} needs PyTorch (pip install torch); or, where PyTorch is "
                        f"installed, run `flax-resnet convert {path} OUT.safetensors --model NAME` "
                        "and use the .safetensors file") from None
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
        if blocked is None:  # not a pickle that asks for code: a damaged or foreign file
            raise UserError(f"cannot read {path} as a PyTorch checkpoint ({str(e).strip().splitlines()[-1][:120]}"
                            "); re-download it or export it with torch.save(model.state_dict(), ...)") from None
        raise UserError(
            f"refusing to load {path}: unpickling it would run Python code ({blocked.group(1)}), which "
            "torch.load(weights_only=True) does not allow; where you trust the file, save just the weights "
            "with torch.save(model.state_dict(), 'weights.pth'), or use a .safetensors file") from None
    except Exception as e:
        raise UserError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                        "re-download the file or export it with torch.save(model.state_dict(), ...)") from None
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict; save "
                        "model.state_dict() rather than the model")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            if v.dtype == torch.bfloat16:
                v = v.float()
            out[str(k)] = v.numpy()
    return out


def _unwrap(obj):
    """``{"state_dict": {...}, "epoch": 3, ...}`` -> the inner dict (repeatedly)."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            return obj
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _normalize_keys(sd: Mapping[str, Any], path) -> StateDict:
    sd = {k: np.asarray(v) for k, v in _unwrap(dict(sd)).items() if hasattr(v, "shape")}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise UserError(f"{path} holds no tensors: pass a file saved from model.state_dict()")
    return sd


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays as ``.safetensors`` (contiguous copies; metadata as strings)."""
    from safetensors.numpy import save_file

    path = Path(path).expanduser()
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise UserError(f"output {path} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path), metadata=meta)
