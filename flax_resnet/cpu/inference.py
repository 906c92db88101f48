"""Eval-mode forward passes with BatchNorm folded and each conv's bias, residual and ReLU fused in.

A ResNet's eval forward is convolutions, each followed by BatchNorm with running statistics,
often a residual add and a ReLU: elementwise passes that each re-read and re-write the whole
activation. Here the model's own :func:`flax_resnet.models.graph.trace` (``xp=jax.numpy``:
float32 folding on the live, traced parameters, inside the jitted step) folds every BatchNorm
that follows a conv into it, :func:`fuse` merges ``conv -> [add] -> [relu]`` chains into one
``fused_conv`` op, and :func:`run` executes the list: oneDNN's convolution with its bias, sum and
ReLU post-ops (:func:`flax_resnet.cpu.onednn.conv_forward`) where :func:`onednn.supports` the
shape, else the CPU backend's convolution (:func:`flax_resnet.cpu.convs.conv2d`, ``conv1x1``)
followed by the elementwise rest, which XLA fuses into one pass.

:func:`trace` then :func:`run` is what the trainer's eval and predict steps do for a model with
the CPU backend's layers on one device; the arithmetic differs from the model's own eval pass
only by float32 rounding (folded kernels and biases).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_resnet.cpu import convs, library, onednn, pooling
from flax_resnet.errors import UserError
from flax_resnet.models import graph as graph_lib
from flax_resnet.models.graph import INPUT, Graph, Op


def _consumers(ops: list[Op], output: str) -> dict[str, int]:
    counts: dict[str, int] = {output: 1}
    for op in ops:
        for name in op.inputs:
            counts[name] = counts.get(name, 0) + 1
    return counts


def fuse(graph: Graph) -> Graph:
    """``graph`` with every ``conv -> [add] -> [relu]`` chain (each value used only by the next op)
    as one ``fused_conv`` op: the conv's attributes plus ``relu`` (bool) and, with an add, the
    other addend as a second input (the residual). A fused op takes the place of the chain's
    last op, where all its inputs exist."""
    ops, uses = graph.ops, _consumers(graph.ops, graph.output)
    by_input: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            by_input.setdefault(name, []).append(i)
    merged: set[int] = set()
    placed: dict[int, Op] = {}  # index of a chain's last op -> the fused op
    for i, op in enumerate(ops):
        if op.kind != "conv" or op.attrs["groups"] != 1:
            continue
        chain, residual, relu, out = [i], None, False, op.output
        nxt = ops[by_input[out][0]] if uses.get(out) == 1 and out in by_input else None
        if nxt is not None and nxt.kind == "add" and nxt.inputs[0] != nxt.inputs[1] and by_input[out][0] not in merged:
            j = by_input[out][0]  # (an add of two convs' outputs goes with the first)
            residual = nxt.inputs[1] if nxt.inputs[0] == out else nxt.inputs[0]
            chain.append(j)
            out = nxt.output
            nxt = ops[by_input[out][0]] if uses.get(out) == 1 and out in by_input else None
        if nxt is not None and nxt.kind == "relu":
            chain.append(by_input[out][0])
            relu, out = True, nxt.output
        if len(chain) == 1:
            continue
        inputs = op.inputs + ((residual,) if residual is not None else ())
        merged.update(chain)
        placed[max(chain)] = Op("fused_conv", inputs, out, {**op.attrs, "relu": relu})
    fused = [placed[i] if i in placed else op for i, op in enumerate(ops) if i in placed or i not in merged]
    return Graph(fused, graph.output, graph.in_channels, graph.num_outputs, graph.folded, graph.unfolded)


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int, pads, residual: jax.Array | None = None,
         relu: bool = False) -> jax.Array:
    """``relu(conv(x, kernel) + bias + residual)`` (NHWC, HWIO; ``residual`` and ``relu`` optional) in
    ``x``'s dtype: one oneDNN call with post-ops where :func:`onednn.supports` it ("fused"), else
    the CPU backend's convolution and the elementwise rest in float32 (one XLA fusion)."""
    kernel = kernel.astype(x.dtype)
    if residual is not None:
        residual = residual.astype(x.dtype)
    if onednn.supports(x.shape, kernel.shape, (x.dtype, kernel.dtype), "fused", stride, pads):
        return onednn.conv_forward(x, kernel, stride, pads, bias=bias.astype(jnp.float32), residual=residual,
                                   relu=relu)
    if kernel.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
        y = convs.conv1x1(x, kernel, stride)
    else:
        y = convs.conv2d(x, kernel, stride, pads)
    y = y.astype(jnp.float32) + bias
    if residual is not None:
        y = y + residual
    return (jax.nn.relu(y) if relu else y).astype(x.dtype)


def _run_conv(op: Op, args: list[jax.Array]) -> jax.Array:
    a = op.attrs
    (stride, stride_w) = a["strides"]
    if a["groups"] != 1 or stride != stride_w:
        y = graph_lib.run_op(Op("conv", op.inputs[:1], op.output, a), args[:1])
        y = y + args[1] if len(args) > 1 else y
        return jax.nn.relu(y) if a.get("relu") else y
    return conv(args[0], a["kernel"], a["bias"], stride, tuple(map(tuple, a["pads"])),
                args[1] if len(args) > 1 else None, bool(a.get("relu")))


def _square_pool(a) -> bool:
    return len(set(a["window"])) == len(set(a["strides"])) == 1 and len({p for pair in a["pads"] for p in pair}) == 1


def run(graph: Graph, x: jax.Array) -> jax.Array:
    """Applies a (fused or plain) ``graph`` to an NHWC batch, every activation in ``x``'s dtype;
    the convolutions as :func:`conv`, max-pools as :func:`flax_resnet.cpu.pooling.max_pool` (the
    strided taps' max: far quicker on XLA:CPU than a reduce-window), the other ops as
    :func:`flax_resnet.models.graph.run_op`."""
    dtype = x.dtype
    values = {INPUT: x}
    for op in graph.ops:
        args = [values[i] for i in op.inputs]
        if op.kind in ("conv", "fused_conv"):
            values[op.output] = _run_conv(op, args)
        elif op.kind == "max_pool" and _square_pool(op.attrs):
            values[op.output] = pooling.max_pool(args[0], op.attrs["window"][0], op.attrs["strides"][0],
                                                 op.attrs["pads"][0][0])
        else:
            values[op.output] = graph_lib.run_op(op, args).astype(dtype)
    return values[graph.output]


def trace(model) -> Graph | None:
    """The fused eval graph of ``model`` where it is to run fused, else None: custom calls on (one
    device: :func:`flax_resnet.cpu.jit`), the CPU backend, and a model
    :func:`flax_resnet.models.graph.trace` knows. Folded in float32 from the variables' current
    (under ``jax.jit``, traced) values; the BatchNorms' running statistics are what is folded."""
    if not library.custom_calls_on() or jax.default_backend() != "cpu":
        return None
    try:
        return fuse(graph_lib.trace(model, xp=jnp))
    except UserError:
        return None
