"""``export()``: a run's checkpoint or a weights file -> an ONNX or StableHLO file that states its input contract.

The contract (:func:`input_contract`) goes into the ONNX model's ``metadata_props`` (each key,
plus the whole as JSON under ``input_contract``) and into a ``.json`` file beside a StableHLO
export. Layouts: ONNX takes NCHW (what ONNX runtimes and PyTorch exports use), StableHLO NHWC
(JAX's). ``raw_pixels=True`` puts the normalisation in the graph: the input is then 0-255 pixels.
After writing, the file is run (onnxruntime; ``jax.export.deserialize``) on two random images and
its logits compared with the model's own: a mismatch raises instead of leaving a wrong file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flax_resnet.errors import UserError
from flax_resnet.export import onnx_graph, stablehlo
from flax_resnet.models.graph import Graph, trace
from flax_resnet.export.source import ExportSource, from_run, from_weights

FORMATS = ("onnx", "stablehlo")
VERIFY_TOLERANCE = 1e-4  # max |exported - ours| / max |ours| on the verification batch


@dataclasses.dataclass
class ExportResult:
    """What :func:`export` wrote: the model file, the contract (and its ``.json`` for StableHLO), the check."""

    path: Path
    contract: dict[str, Any]
    contract_path: Path | None
    max_rel_diff: float | None

    def __str__(self) -> str:
        c = self.contract
        check = f"; logits match ours to {self.max_rel_diff:.1e}" if self.max_rel_diff is not None else ""
        extra = f" and {self.contract_path}" if self.contract_path else ""
        return (f"wrote {self.path}{extra} ({c['model']}, {c['format']}, input {c['layout']} "
                f"{c['input_shape']} {c['input_range']}, {c['batchnorm']}){check}")


def contract_path_for(out: Path) -> Path:
    """The ``.json`` beside a StableHLO file: ``model.stablehlo`` -> ``model.json``."""
    return out.with_suffix(".json")


def _check_output(out: Path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; pass --format onnx or --format stablehlo")
    if out.is_dir():
        raise UserError(f"output {out} is a directory; pass a file name such as {out / ('model.' + fmt)}")
    if fmt == "stablehlo" and out.suffix.lower() == ".json":
        raise UserError(f"output {out} ends in .json, the name of the contract beside it; use e.g. model.stablehlo")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: directory {parent} does not exist; create it or choose another --out")
    targets = [out, contract_path_for(out)] if fmt == "stablehlo" else [out]
    if not os.access(parent, os.W_OK) or any(t.exists() and not os.access(t, os.W_OK) for t in targets):
        raise UserError(f"cannot write {out}: permission denied; choose another --out")


def input_contract(src: ExportSource, graph: Graph, fmt: str, raw_pixels: bool) -> dict[str, Any]:
    """What a caller must feed the exported model and what it returns (JSON-serialisable)."""
    h, c = src.image_size, src.in_channels
    if raw_pixels:
        norm = "none: feed pixels 0-255, the graph normalises"
    elif src.mean:
        norm = "(pixel / 255 - mean) / std per channel"
    else:
        norm = "pixel / 255"
    return {
        "format": fmt,
        "model": src.name,
        "layout": "NCHW" if fmt == "onnx" else "NHWC",
        "input_name": onnx_graph.INPUT_NAME if fmt == "onnx" else "x",
        "input_shape": ["batch", c, h, h] if fmt == "onnx" else ["batch", h, h, c],
        "dtype": "float32",
        "channels": "RGB" if c == 3 else ("grayscale" if c == 1 else f"{c} channels"),
        "image_size": h,
        "input_range": "0-255" if raw_pixels else ("normalized" if src.mean else "0-1"),
        "normalization": norm,
        "mean": list(src.mean),
        "std": list(src.std),
        "resize": (f"images of another size: centre crop 87.5% of the shorter side, bilinear resize to "
                   f"{h}x{h} (as flax-resnet predict)"),
        "output": "logits [batch, classes]; softmax gives probabilities",
        "num_classes": graph.num_outputs,
        "class_names": list(src.class_names),
        "batchnorm": (f"{graph.folded} folded into the conv before them, {graph.unfolded} kept as "
                      "per-channel scale and shift (after an addition or a pool)"),
        **{k: v for k, v in src.origin.items()},
    }


def _input_affine(src: ExportSource) -> tuple[np.ndarray, np.ndarray]:
    """``x * scale + shift`` taking 0-255 pixels to what the model was trained on."""
    c = src.in_channels
    mean = np.asarray(src.mean or (0.0,) * c, np.float64)
    std = np.asarray(src.std or (1.0,) * c, np.float64)
    return 1.0 / (255.0 * std), -mean / std


def _verify(src: ExportSource, run_exported, nhwc: bool, raw_pixels: bool) -> float:
    """Max |exported - model| / max |model| on two random images."""
    rng = np.random.default_rng(0)
    h, c = src.image_size, src.in_channels
    pixels = rng.integers(0, 256, (2, h, h, c)).astype(np.float32)
    scale, shift = _input_affine(src)
    normalized = (pixels * scale + shift).astype(np.float32)
    ours = np.asarray(jax.jit(lambda x: src.model(x))(normalized))
    feed = pixels if raw_pixels else normalized
    theirs = np.asarray(run_exported(feed if nhwc else np.ascontiguousarray(feed.transpose(0, 3, 1, 2))))
    rel = float(np.max(np.abs(theirs - ours)) / max(float(np.max(np.abs(ours))), 1e-12))
    if not rel <= VERIFY_TOLERANCE:
        raise RuntimeError(f"the exported model's logits differ from ours by {rel:.2e} of the largest; "
                           "a bug in the exporter: please report it")
    return rel


def _write(path: Path, data: bytes | str) -> None:
    try:
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose another --out") from None


def export(out: str | os.PathLike, *, workdir: str | os.PathLike | None = None, which: str = "best",
           pretrained: str | os.PathLike | None = None, model: str | None = None, format: str = "onnx",
           raw_pixels: bool = False, image_size: int | None = None, verify: bool = True) -> ExportResult:
    """Exports a trained model for serving.

    Args:
      out: the file to write (ONNX model, or serialised StableHLO with ``out.with_suffix('.json')`` beside it).
      workdir: a run directory (``flax-resnet train``/``finetune``); its ``which`` checkpoint
        (``"best"`` or ``"latest"``) is exported. Or:
      pretrained, model: a PyTorch-layout weights file and its architecture (registry name).
      format: ``"onnx"`` (NCHW input) or ``"stablehlo"`` (NHWC input, CPU/CUDA/TPU).
      raw_pixels: put the normalisation in the graph (input 0-255).
      image_size: input side for a weights file (default: the model's); a run's is its training size.
      verify: run the written file on two images and compare with the model (needs onnxruntime for ONNX).
    """
    out = Path(out).expanduser()
    _check_output(out, format)
    if (workdir is None) == (pretrained is None):
        raise UserError("pass either --workdir RUN or --pretrained FILE --model NAME")
    if workdir is not None:
        if image_size is not None:
            raise UserError("--image-size applies to --pretrained weights; a run exports at its training size")
        src = from_run(workdir, which)
    else:
        src = from_weights(pretrained, model, image_size=image_size)
    scale, shift = _input_affine(src) if raw_pixels else (None, None)
    graph = trace(src.model, input_scale=scale, input_shift=shift)
    contract = input_contract(src, graph, format, raw_pixels)
    if format == "onnx":
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in contract.items()}
        meta["input_contract"] = json.dumps(contract)
        proto = onnx_graph.to_onnx(graph, src.image_size, meta, name=src.name)
        _write(out, proto.SerializeToString())
        contract_path, runner = None, _onnx_runner(out) if verify else None
    else:
        exp = stablehlo.exported(graph, src.image_size)
        contract["platforms"] = list(exp.platforms)
        contract["calling_convention_version"] = exp.calling_convention_version
        _write(out, stablehlo.serialize(exp))
        contract_path = contract_path_for(out)
        _write(contract_path, json.dumps(contract, indent=2) + "\n")
        runner = _stablehlo_runner(out) if verify else None
    rel = _verify(src, runner, format == "stablehlo", raw_pixels) if runner is not None else None
    return ExportResult(out, contract, contract_path, rel)


def _onnx_runner(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:  # the check is optional: the file is written
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {onnx_graph.INPUT_NAME: x})[0]


def _stablehlo_runner(path: Path):
    exp = jax.export.deserialize(bytearray(path.read_bytes()))
    return lambda x: exp.call(x)
