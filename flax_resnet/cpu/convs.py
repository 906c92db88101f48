"""Convolutions formulated for XLA:CPU, each a ``custom_vjp`` with a hand-written backward pass.

XLA:CPU is slow on two parts of a ResNet's convolutions (docs/performance.md):
 * 1x1 convolutions: a 1x1 conv *is* a matmul over N*H*W, and XLA runs dot_general much
   faster than the equivalent convolution, forward and backward;
 * kernel (weight) gradients. XLA contracts over the batch, so it first transposes an NHWC
   operand to make N (or N*H*W) the minor dimension, and it fuses that operand's whole
   producer chain into the transpose, recomputed per element with a cache-hostile stride
   (in ResNet-20, cost quadratic in depth).
Here the kxk kernel gradients read a *channel-major* copy of the layer input made by a
matmul with the identity (an "NT" dot that XLA's matmul library reads in place, from the
materialised input; exact for finite values: each output is one product by 1.0 plus exact
zeros). A kxk kernel gradient is then the very convolution XLA would have built (N as the
contracted feature dimension: the same values, bit for bit, and the same all-reduce of a
batch-sharded contraction under GSPMD), fed from that copy; a 1x1 kernel gradient is one
transposed-operand matmul. The input gradient of a 3x3 stride-2 convolution is computed per
output parity (sub-pixel) instead of as XLA's dilated transposed convolution.
Where :mod:`flax_resnet.cpu.native` serves the shape (float32, 8-256 channels; kernel gradients up to 64),
the forward convolution, the stride-1 input gradient (a forward convolution of g with the
flipped kernel), the sub-pixel parts and the kernel gradient run as its direct CPU kernels
instead of XLA's convolutions, which reach well under half of the FMA peak at these widths.
Where oneDNN is installed (:mod:`flax_resnet.cpu.onednn`), the operations and kinds of kernel
its ``SERVES`` table lists go to oneDNN's primitives first (the custom-VJP rules pick them; the
functions above stay the XLA/native formulations).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flax_resnet.cpu import native, onednn


def _sym(pad: int):
    return ((pad, pad), (pad, pad))


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, pads) -> jax.Array:
    """NHWC x HWIO convolution with zero ``pads = ((top, bottom), (left, right))``: oneDNN's or the
    native CPU kernel where :func:`onednn.supports` / :func:`native.supports` the shape, else
    ``lax.conv_general_dilated``."""
    if onednn.supports(x.shape, kernel.shape, (x.dtype, kernel.dtype), "forward", stride, pads):
        return onednn.conv_forward(x, kernel, stride, pads)
    if native.supports(x.shape, kernel.shape, x.dtype, kernel.dtype):
        return native.conv_forward(x, kernel, stride, pads)
    return _lax_conv(x, kernel, stride, pads)


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int, pads) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """XLA's convolution with symmetric padding (differentiable by JAX, unlike the native kernels)."""
    return _lax_conv(x, kernel, stride, ((pad, pad), (pad, pad)))


def channel_major(x2d: jax.Array) -> jax.Array:
    """``[P, C] -> [C, P]`` as ``eye(C) @ x2d.T``: read in place by the matmul, no fused transpose."""
    eye = jnp.eye(x2d.shape[1], dtype=x2d.dtype)
    return jax.lax.dot_general(eye, x2d, (((1,), (1,)), ((), ())))


def conv_weight_grad(x: jax.Array, g: jax.Array, kernel_shape, stride: int, pad: int) -> jax.Array:
    """The kernel gradient of ``xla_conv(x, kernel, stride, pad)`` for the output cotangent ``g``.

    ``dW[i, j, ci, co] = sum_{n, r, q} xpad[n, s*r + i, s*q + j, ci] * g[n, r, q, co]``: XLA's own
    weight-gradient convolution (batch contracted as the feature dimension, ``g`` as the
    kernel dilated by the stride), with the input given channel-major by :func:`channel_major`
    instead of through XLA's fused transpose.
    """
    n, h, w, c = x.shape
    k = kernel_shape[0]
    if native.supports(x.shape, kernel_shape, x.dtype, g.dtype, op="wgrad"):
        return native.conv_wgrad(x, g, (k, k), stride, ((pad, pad), (pad, pad)))
    xt = channel_major(x.reshape(-1, c)).reshape(c, n, h, w)
    # High padding so that the dilated g window fits exactly (PyTorch's floor for strided convs).
    hi_h = (g.shape[1] - 1) * stride + k - h - pad
    hi_w = (g.shape[2] - 1) * stride + k - w - pad
    dw = jax.lax.conv_general_dilated(xt, g, (1, 1), ((pad, hi_h), (pad, hi_w)), rhs_dilation=(stride, stride),
                                      dimension_numbers=("NCHW", "IHWO", "NHWC"))
    return dw.transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_kxk(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """:func:`conv2d` (NHWC, HWIO, symmetric padding) with :func:`conv_weight_grad` and
    :func:`conv_input_grad` as its backward pass (native kernels where they serve the shape, so
    differentiable once: higher derivatives need the plain ``nnx.Conv``)."""
    return conv2d(x, kernel, stride, ((pad, pad), (pad, pad)))


def _conv_kxk_fwd(x, kernel, stride, pad):
    return conv2d(x, kernel, stride, ((pad, pad), (pad, pad))), (x, kernel)


def conv_input_grad(x: jax.Array, g: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """The input gradient of ``xla_conv(x, kernel, stride, pad)``: XLA's own, except for 3x3 stride-2
    convolutions of even-sized inputs, which go through :func:`_stride2_input_grad`."""
    if stride == 2 and pad == 1 and kernel.shape[:2] == (3, 3) and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
        return _stride2_input_grad(g, kernel)
    k, _, cin, cout = kernel.shape
    if stride == 1 and pad <= k - 1 and native.supports(g.shape, (k, k, cout, cin), g.dtype, kernel.dtype):
        q = k - 1 - pad  # a forward convolution of g with the flipped kernel, I and O swapped
        return native.conv_forward(g, kernel[::-1, ::-1].swapaxes(2, 3), 1, ((q, q), (q, q)))
    return jax.vjp(lambda xx: xla_conv(xx, kernel, stride, pad), x)[1](g)[0]


# For each parity of an input row (or column) of a 3x3, stride-2, pad-1 convolution: which kernel
# row (column) meets g[a] and, for odd ones, g[a + 1]. dx[2a] = g[a] k[1]; dx[2a+1] = g[a] k[2] + g[a+1] k[0].
_STRIDE2_TAPS = ((1,), (2, 0))


def _stride2_input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
    """Sub-pixel input gradient of a 3x3/2 convolution: one small stride-1 convolution of ``g`` per
    output parity (1x1, 1x2, 2x1, 2x2 taps: the FLOPs of the forward pass, none on inserted zeros),
    interleaved. XLA's transposed convolution dilates ``g`` instead, and multiplies the
    inserted zeros too (docs/performance.md)."""
    n, ho, wo, _ = g.shape
    rows = []
    for taps_h in _STRIDE2_TAPS:
        cols = []
        for taps_w in _STRIDE2_TAPS:
            sub = jnp.stack([jnp.stack([kernel[i, j] for j in taps_w]) for i in taps_h]).swapaxes(2, 3)  # I = co
            if sub.shape[:2] == (1, 1):
                cols.append(jax.lax.dot_general(g, sub[0, 0], (((3,), (0,)), ((), ()))))
            else:
                cols.append(conv2d(g, sub, 1, ((0, len(taps_h) - 1), (0, len(taps_w) - 1))))
        rows.append(jnp.stack(cols, 3))
    return jnp.stack(rows, 2).reshape(n, 2 * ho, 2 * wo, kernel.shape[2])


def _conv_kxk_bwd(stride, pad, res, g):
    x, kernel = res
    pads = _sym(pad)
    if onednn.supports(x.shape, kernel.shape, (g.dtype, kernel.dtype), "bwd_data", stride, pads):
        dx = onednn.conv_bwd_data(g, kernel, x.shape, stride, pads)
    else:
        dx = conv_input_grad(x, g, kernel, stride, pad)
    if onednn.supports(x.shape, kernel.shape, (x.dtype, g.dtype), "bwd_weights", stride, pads):
        dw = onednn.conv_bwd_weights(x, g, kernel.shape[:2], stride, pads)
    else:
        dw = conv_weight_grad(x, g, kernel.shape, stride, pad)
    return dx, dw.astype(kernel.dtype)


conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def _onednn_1x1(x_shape, kernel2d, op: str, *dtypes) -> bool:
    return onednn.supports(x_shape, (1, 1, *kernel2d.shape), (kernel2d.dtype, *dtypes), op)


@jax.custom_vjp
def _matmul_1x1(x: jax.Array, kernel2d: jax.Array) -> jax.Array:
    if _onednn_1x1(x.shape, kernel2d, "forward", x.dtype):
        return onednn.conv_forward(x, kernel2d[None, None], 1, _sym(0))
    return jax.lax.dot_general(x, kernel2d, (((3,), (0,)), ((), ())))


def _matmul_1x1_fwd(x, kernel2d):
    return _matmul_1x1(x, kernel2d), (x, kernel2d)


def _matmul_1x1_bwd(res, g):
    x, kernel2d = res
    cin, cout = kernel2d.shape
    if _onednn_1x1(x.shape, kernel2d, "bwd_data", g.dtype):
        dx = onednn.conv_bwd_data(g, kernel2d[None, None], x.shape, 1, _sym(0))
    else:
        dx = jax.lax.dot_general(g, kernel2d, (((3,), (1,)), ((), ())))
    if _onednn_1x1(x.shape, kernel2d, "bwd_weights", x.dtype, g.dtype):
        return dx, onednn.conv_bwd_weights(x, g, (1, 1), 1, _sym(0))[0, 0].astype(kernel2d.dtype)
    # dW = x2d.T @ g2d as one transposed-operand dot (no channel-major copy: docs/performance.md).
    dw = jax.lax.dot_general(x.reshape(-1, cin), g.reshape(-1, cout), (((0,), (0,)), ((), ())))
    return dx, dw.astype(kernel2d.dtype)


_matmul_1x1.defvjp(_matmul_1x1_fwd, _matmul_1x1_bwd)


def conv1x1(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """A 1x1 convolution as a matmul over N*H*W (strided: subsample first). Kernel ``(1, 1, cin, cout)``."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    return _matmul_1x1(x, kernel[0, 0])


