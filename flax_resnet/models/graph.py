"""A model's inference graph, read off its own layers, with BatchNorm folded into the conv before it.

:func:`trace` walks the NNX module tree of a :class:`~flax_resnet.models.resnet.ResNet` or an
:class:`~flax_resnet.models.article.ArticleResNet` and writes its eval-mode forward pass as a
short list of :class:`Op` (conv, relu, add, max-pool, per-channel affine, option-A shortcut,
global mean, linear) over numpy arrays. Both exporters read this one list: the ONNX writer
(:mod:`~flax_resnet.export.onnx_graph`) emits one ONNX node per op, and :func:`run` replays it in
JAX for StableHLO, so both carry the same folded arithmetic.

Folding: a BatchNorm applied directly to a convolution's output (eval mode: running statistics)
becomes part of that convolution, ``W' = W * g`` and ``b' = (b - mean) * g + beta`` with
``g = scale / sqrt(var + eps)``, computed in float64 numpy for the exporters. ``trace(model,
xp=jnp)`` folds in float32 ``jax.numpy`` instead, on whatever the model's variables hold: under
``jax.jit`` the live (traced) parameters, so a jitted step can fold and run the graph itself
(:mod:`flax_resnet.cpu.inference`). A BatchNorm after an addition or a pool
(pre-activation units' first BN, the article's BN after each residual sum and after each
pool) has no conv directly before it and stays a per-channel affine ``x * g + (beta - mean * g)``.

Each block type's order of operations is transcribed here from its ``__call__``
(:mod:`flax_resnet.models.blocks`, :mod:`~flax_resnet.models.article`); the parity tests compare
the result with the model itself, so a block that changes there fails them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_resnet.errors import UserError
from flax_resnet.models.article import ArticleLayer, ArticleResNet
from flax_resnet.models.blocks import (ArticleBlock, BasicBlock, Bottleneck, PlainBlock, PreActBasicBlock,
                                       PreActBottleneck)
from flax_resnet.models.resnet import ResNet

INPUT = "input"


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation: ``kind`` applied to the named ``inputs``, giving ``output``.

    ``attrs`` holds hyperparameters and arrays (NHWC/HWIO conventions, float32):

    * ``conv``: ``kernel`` [kh, kw, cin/groups, cout], ``bias`` [cout], ``strides``, ``pads``
      ((top, bottom), (left, right)), ``groups``.
    * ``affine``: ``scale``, ``shift`` [C] (``x * scale + shift`` per channel).
    * ``max_pool``: ``window``, ``strides``, ``pads``; padding never wins the max.
    * ``subsample``: ``stride``; ``pad_channels``: ``before``, ``after`` (option-A shortcut).
    * ``mean``: global average over H, W -> [N, C]; ``linear``: ``kernel`` [in, out], ``bias``.
    * ``relu``, ``add``: none.
    """

    kind: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict[str, Any]


@dataclasses.dataclass
class Graph:
    """The ops in execution order (each input is :data:`INPUT` or an earlier op's output)."""

    ops: list[Op]
    output: str
    in_channels: int
    num_outputs: int
    folded: int      # BatchNorms folded into a conv
    unfolded: int    # BatchNorms kept as a per-channel affine

    def count(self, kind: str) -> int:
        return sum(op.kind == kind for op in self.ops)


class _Numpy:
    """Folding arithmetic of the exporters: float64 numpy on the parameters' values, float32 results."""

    xp = np

    @staticmethod
    def array(v):
        return np.asarray(jax.device_get(v[...]), np.float64)

    @staticmethod
    def out(a):
        return a.astype(np.float32)


class _Jax:
    """Folding arithmetic under ``jax.jit``: float32 ``jax.numpy`` on the variables' (traced) values."""

    xp = jnp

    @staticmethod
    def array(v):
        return jnp.asarray(v[...], jnp.float32)

    @staticmethod
    def out(a):
        return a


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(int(a) for a in v)


def _bn_terms(bn, f=_Numpy) -> tuple[Any, Any]:
    """``(g, shift)`` with ``bn(x) == x * g + shift`` in eval mode, in ``f``'s arithmetic."""
    g = 1.0 / f.xp.sqrt(f.array(bn.var) + bn.epsilon)
    if bn.scale is not None:
        g = g * f.array(bn.scale)
    shift = -f.array(bn.mean) * g
    if bn.bias is not None:
        shift = shift + f.array(bn.bias)
    return g, shift


class _Builder:
    def __init__(self, f=_Numpy):
        self.ops: list[Op] = []
        self.folded = self.unfolded = 0
        self.f = f

    def emit(self, kind: str, inputs, **attrs) -> str:
        name = f"{kind}_{len(self.ops)}"
        self.ops.append(Op(kind, tuple(inputs), name, attrs))
        return name

    def conv(self, x: str, conv, bn=None) -> str:
        """``bn(conv(x))`` as one conv (or ``conv(x)`` without a ``bn``)."""
        f = self.f
        kernel = f.array(conv.kernel)
        bias = f.array(conv.bias) if conv.bias is not None else f.xp.zeros(kernel.shape[-1], kernel.dtype)
        if bn is not None:
            g, shift = _bn_terms(bn, f)
            kernel, bias = kernel * g, bias * g + shift
            self.folded += 1
        padding = conv.padding
        if isinstance(padding, str):
            raise UserError(f"cannot export a conv with padding {padding!r}; our models use explicit padding")
        pads = tuple(_pair(p) for p in padding)
        return self.emit("conv", [x], kernel=f.out(kernel), bias=f.out(bias),
                         strides=_pair(conv.strides), pads=pads, groups=int(conv.feature_group_count))

    def affine(self, x: str, bn) -> str:
        g, shift = _bn_terms(bn, self.f)
        self.unfolded += 1
        return self.emit("affine", [x], scale=self.f.out(g), shift=self.f.out(shift))

    def relu(self, x: str) -> str:
        return self.emit("relu", [x])

    def add(self, a: str, b: str) -> str:
        return self.emit("add", [a, b])

    def max_pool(self, x: str, window: int, stride: int, pad: int) -> str:
        return self.emit("max_pool", [x], window=(window, window), strides=(stride, stride),
                         pads=((pad, pad), (pad, pad)))

    def shortcut(self, block, x: str, cin: int) -> str:
        """The block's shortcut of ``x`` (``cin`` channels): projection, option A or identity."""
        if block.downsample is not None:
            layers = list(block.downsample)
            return self.conv(x, layers[0], layers[1] if len(layers) > 1 else None)
        if block.stride != 1:
            x = self.emit("subsample", [x], stride=int(block.stride))
        extra = block.out_channels - cin
        if extra:
            x = self.emit("pad_channels", [x], before=extra // 2, after=extra - extra // 2)
        return x


# ----------------------------------------------------------------- blocks (transcribed from their __call__)
def _basic(b: _Builder, m: BasicBlock, x: str) -> str:
    out = b.relu(b.conv(x, m.conv1, m.bn1))
    out = b.conv(out, m.conv2, m.bn2)
    return b.relu(b.add(out, b.shortcut(m, x, m.conv1.in_features)))


def _plain(b: _Builder, m: PlainBlock, x: str) -> str:
    out = b.relu(b.conv(x, m.conv1, m.bn1))
    return b.relu(b.conv(out, m.conv2, m.bn2))


def _bottleneck(b: _Builder, m: Bottleneck, x: str) -> str:
    out = b.relu(b.conv(x, m.conv1, m.bn1))
    out = b.relu(b.conv(out, m.conv2, m.bn2))
    out = b.conv(out, m.conv3, m.bn3)
    return b.relu(b.add(out, b.shortcut(m, x, m.conv1.in_features)))


def _preact_skip(b: _Builder, m, x: str, pre: str) -> str:
    # A projection takes the pre-activated input; an identity/option-A shortcut the raw one.
    return b.shortcut(m, pre if m.downsample is not None else x, m.conv1.in_features)


def _preact_basic(b: _Builder, m: PreActBasicBlock, x: str) -> str:
    pre = b.relu(b.affine(x, m.bn1))
    skip = _preact_skip(b, m, x, pre)
    out = b.relu(b.conv(pre, m.conv1, m.bn2))
    return b.add(b.conv(out, m.conv2), skip)


def _preact_bottleneck(b: _Builder, m: PreActBottleneck, x: str) -> str:
    pre = b.relu(b.affine(x, m.bn1))
    skip = _preact_skip(b, m, x, pre)
    out = b.relu(b.conv(pre, m.conv1, m.bn2))
    out = b.relu(b.conv(out, m.conv2, m.bn3))
    return b.add(b.conv(out, m.conv3), skip)


def _article_block(b: _Builder, m: ArticleBlock, x: str) -> str:
    out = b.conv(b.relu(b.conv(x, m.conv1)), m.conv2)
    return b.relu(b.affine(b.add(out, b.shortcut(m, x, m.conv1.in_features)), m.bn))


def _article_layer(b: _Builder, m: ArticleLayer, x: str) -> str:
    x = b.add(b.conv(b.relu(b.conv(x, m.conv1)), m.conv2), x)
    x = b.relu(b.affine(x, m.bn))
    if m.pool_bn is not None:
        x = b.relu(b.affine(b.max_pool(x, 3, m.pool_stride, 1), m.pool_bn))
    return x


# Exact types: a subclass may change the order of operations, so it must be added here.
_BLOCKS: dict[type, Callable[[_Builder, Any, str], str]] = {
    BasicBlock: _basic, PlainBlock: _plain, Bottleneck: _bottleneck, PreActBasicBlock: _preact_basic,
    PreActBottleneck: _preact_bottleneck, ArticleBlock: _article_block, ArticleLayer: _article_layer,
}


def _block(b: _Builder, m, x: str) -> str:
    fn = _BLOCKS.get(type(m))
    if fn is None:
        raise UserError(f"cannot export block {type(m).__name__}: the exporter knows "
                        f"{', '.join(sorted(t.__name__ for t in _BLOCKS))}")
    return fn(b, m, x)


# ----------------------------------------------------------------- networks
def _resnet(b: _Builder, m: ResNet, x: str) -> str:
    x = b.conv(x, m.conv1, m.bn1)
    if m.bn1 is not None:
        x = b.relu(x)
    if m.stem != "cifar":
        x = b.max_pool(x, 3, 2, 1)
    for i, stage in enumerate(m.stages()):
        if m.stem == "article" and i > 0:
            x = b.max_pool(x, 2, 2, 0)
        for block in stage:
            x = _block(b, block, x)
    if m.bn_final is not None:
        x = b.relu(b.affine(x, m.bn_final))
    return x


def _article(b: _Builder, m: ArticleResNet, x: str) -> str:
    x = b.max_pool(b.conv(x, m.conv1), 3, 2, 1)
    for layer in m.stages():
        x = _block(b, layer, x)
    return x


def trace(model, *, input_scale=None, input_shift=None, xp=np) -> Graph:
    """The eval-mode forward pass of ``model`` (float32 weights) as a folded :class:`Graph`.

    ``input_scale``/``input_shift`` (per channel) put ``x * scale + shift`` in front: the
    normalisation, for a graph that takes raw 0-255 pixels. ``xp``: ``numpy`` (float64 folding,
    numpy arrays: the exporters) or ``jax.numpy`` (float32 folding of the variables' values, jax
    arrays; traceable under ``jax.jit``). The CPU backend's layer classes read as the plain ones.
    """
    if xp not in (np, jnp):
        raise ValueError(f"xp must be numpy or jax.numpy, not {xp!r}")
    b = _Builder(_Numpy if xp is np else _Jax)
    x = INPUT
    if input_scale is not None:
        x = b.emit("affine", [x], scale=np.asarray(input_scale, np.float32),
                   shift=np.asarray(input_shift, np.float32))
    if type(model) is ResNet:
        x = _resnet(b, model, x)
    elif type(model) is ArticleResNet:
        x = _article(b, model, x)
    else:
        raise UserError(f"cannot export a {type(model).__name__}: build it with flax_resnet.models.create_model")
    x = b.emit("mean", [x])
    num_outputs = model.num_features
    if model.fc is not None:
        x = b.emit("linear", [x], kernel=b.f.out(b.f.array(model.fc.kernel)),
                   bias=b.f.out(b.f.array(model.fc.bias)))
        num_outputs = model.fc.out_features
    return Graph(b.ops, x, int(model.conv1.in_features), int(num_outputs), b.folded, b.unfolded)


# ----------------------------------------------------------------- replay in JAX (what StableHLO exports)
def run_op(op: Op, args: list[jax.Array]) -> jax.Array:
    """One op of a graph on its arguments' values, in JAX."""
    a = op.attrs
    x = args[0]
    if op.kind == "conv":
        y = jax.lax.conv_general_dilated(x, jnp.asarray(a["kernel"]), a["strides"], a["pads"],
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=a["groups"])
        return y + jnp.asarray(a["bias"])
    if op.kind == "affine":
        return x * jnp.asarray(a["scale"]) + jnp.asarray(a["shift"])
    if op.kind == "relu":
        return jax.nn.relu(x)
    if op.kind == "add":
        return x + args[1]
    if op.kind == "max_pool":
        pads = ((0, 0), *a["pads"], (0, 0))
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *a["window"], 1), (1, *a["strides"], 1), pads)
    if op.kind == "subsample":
        return x[:, ::a["stride"], ::a["stride"], :]
    if op.kind == "pad_channels":
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (a["before"], a["after"])))
    if op.kind == "mean":
        return jnp.mean(x, axis=(1, 2))
    if op.kind == "linear":
        return x @ jnp.asarray(a["kernel"]) + jnp.asarray(a["bias"])
    raise ValueError(f"unknown op {op.kind!r}")


def run(graph: Graph, x: jax.Array) -> jax.Array:
    """Applies ``graph`` to an NHWC float32 batch in JAX (traceable: :mod:`jax.export` exports this)."""
    values = {INPUT: x}
    for op in graph.ops:
        values[op.output] = run_op(op, [values[i] for i in op.inputs])
    return values[graph.output]
