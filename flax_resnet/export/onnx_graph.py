"""A :class:`~flax_resnet.models.graph.Graph` as an ONNX model, written with the ``onnx`` package's helper API.

The ONNX model takes NCHW (``images``: float32 ``[batch, C, H, W]``, the layout ONNX runtimes
and PyTorch exports use) and returns ``logits`` ``[batch, classes]``; ``batch`` is symbolic.
Weights move from our NHWC/HWIO layout to ONNX's OIHW once, here. Operators (opset 17):
Conv, Relu, Add, Mul, MaxPool, Slice, Pad, GlobalAveragePool, Flatten, Gemm.
``onnx`` is an optional dependency (the ``[export]`` extra), imported when a model is written.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flax_resnet.errors import UserError
from flax_resnet.models.graph import INPUT, Graph, Op

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17: runtimes from onnxruntime 1.13 on load it
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'flax-resnet[export]'") from None
    return onnx


def _pads(pads) -> list[int]:
    """Our ((top, bottom), (left, right)) -> ONNX's [top, left, bottom, right]."""
    (t, b), (l, r) = pads
    return [int(t), int(l), int(b), int(r)]


class _Writer:
    def __init__(self, onnx):
        self.onnx, self.h = onnx, onnx.helper
        self.nodes, self.inits = [], []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op_type: str, inputs, output: str, **attrs) -> str:
        self.nodes.append(self.h.make_node(op_type, list(inputs), [output], name=output, **attrs))
        return output

    def op(self, op: Op, names: list[str], out: str) -> None:
        a, x = op.attrs, names[0]
        if op.kind == "conv":
            w = self.const(f"{out}.weight", np.transpose(a["kernel"], (3, 2, 0, 1)))  # HWIO -> OIHW
            b = self.const(f"{out}.bias", a["bias"])
            kh, kw = a["kernel"].shape[:2]
            self.node("Conv", [x, w, b], out, kernel_shape=[kh, kw], strides=list(a["strides"]),
                      pads=_pads(a["pads"]), group=a["groups"], dilations=[1, 1])
        elif op.kind == "affine":
            c = len(a["scale"])
            s = self.const(f"{out}.scale", a["scale"].reshape(1, c, 1, 1))
            t = self.const(f"{out}.shift", a["shift"].reshape(1, c, 1, 1))
            self.node("Add", [self.node("Mul", [x, s], f"{out}.mul"), t], out)
        elif op.kind == "relu":
            self.node("Relu", [x], out)
        elif op.kind == "add":
            self.node("Add", names, out)
        elif op.kind == "max_pool":
            self.node("MaxPool", [x], out, kernel_shape=list(a["window"]), strides=list(a["strides"]),
                      pads=_pads(a["pads"]))
        elif op.kind == "subsample":
            big = np.iinfo(np.int64).max
            consts = {"starts": [0, 0], "ends": [big, big], "axes": [2, 3], "steps": [a["stride"]] * 2}
            args = [self.const(f"{out}.{k}", np.asarray(v, np.int64)) for k, v in consts.items()]
            self.node("Slice", [x, *args], out)
        elif op.kind == "pad_channels":
            pads = self.const(f"{out}.pads", np.asarray([0, a["before"], 0, 0, 0, a["after"], 0, 0], np.int64))
            self.node("Pad", [x, pads], out, mode="constant")
        elif op.kind == "mean":
            self.node("Flatten", [self.node("GlobalAveragePool", [x], f"{out}.pool")], out, axis=1)
        elif op.kind == "linear":
            w, b = self.const(f"{out}.weight", a["kernel"]), self.const(f"{out}.bias", a["bias"])
            self.node("Gemm", [x, w, b], out)
        else:
            raise ValueError(f"unknown op {op.kind!r}")


def to_onnx(graph: Graph, image_size: int, metadata: Mapping[str, str], *, name: str = "flax_resnet"):
    """The ONNX ``ModelProto`` of ``graph`` for NCHW inputs of side ``image_size``, checked by ``onnx.checker``.

    ``metadata`` becomes the model's ``metadata_props`` (string keys and values).
    """
    onnx = _onnx()
    w = _Writer(onnx)
    names = {INPUT: INPUT_NAME}
    for op in graph.ops:
        out = OUTPUT_NAME if op.output == graph.output else op.output
        w.op(op, [names[i] for i in op.inputs], out)
        names[op.output] = out
    h, f32 = onnx.helper, onnx.TensorProto.FLOAT
    inp = h.make_tensor_value_info(INPUT_NAME, f32, ["batch", graph.in_channels, image_size, image_size])
    out = h.make_tensor_value_info(OUTPUT_NAME, f32, ["batch", graph.num_outputs])
    model = h.make_model(h.make_graph(w.nodes, name, [inp], [out], w.inits),
                         opset_imports=[h.make_opsetid("", OPSET)], producer_name="flax_resnet")
    model.ir_version = IR_VERSION
    h.set_model_props(model, {str(k): str(v) for k, v in metadata.items()})
    onnx.checker.check_model(model)
    return model
