"""Residual blocks (Flax NNX, NHWC).

Every block takes explicit input and output widths, so a network is a plain stack of
them. Attribute names follow torchvision (``conv1``, ``bn1``, ..., ``downsample``) so
that converting a PyTorch state dict is a mechanical renaming (see
:mod:`flax_resnet.pretrained`).

Blocks:
  * :class:`BasicBlock`        two 3x3 convs (ResNet-18/34, CIFAR ResNets).
  * :class:`Bottleneck`        1x1 -> 3x3 -> 1x1, stride on the 3x3 ("v1.5", as torchvision);
                               ``groups``/``base_width`` give ResNeXt and Wide ResNet.
  * :class:`PreActBasicBlock`, :class:`PreActBottleneck`   ResNet v2 (He et al. 2016b):
                               BN -> ReLU before each conv, nothing after the addition.
  * :class:`PlainBlock`        a BasicBlock without the shortcut (the degradation study).
  * :class:`ArticleBlock`      the article's conv3x3 -> ReLU -> conv3x3 (+ shortcut), whose
                               BatchNorm/ReLU come after the addition.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet import native

Dtype = Any
Shortcut = Literal["A", "B"]

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu): an
# *untruncated* normal with variance 2 / fan_out.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` whose running variance is updated as PyTorch's ``BatchNorm2d`` does.

    In train mode both frameworks normalise with the *biased* batch variance, but PyTorch
    folds the *unbiased* one (``var * n / (n - 1)``, ``n`` values per channel) into
    ``running_var``, while stock NNX folds the biased one. Converted torchvision weights
    would drift away from PyTorch's statistics during fine-tuning; this class keeps them
    equal. Everything else (``scale``/``bias`` Params, ``mean``/``var`` BatchStats, the
    ``use_running_average`` view, eval mode) is NNX's own.

    With ``impl="auto"`` on the CPU backend, train mode with statistics over every axis but the
    last (no mask, no ``axis_name``, scale and bias, fast variance) runs :func:`batch_norm_train`:
    NNX's forward arithmetic with a hand-written backward pass. Being a ``custom_vjp``, that path
    has no forward-mode derivative (``jax.jvp``/``jacfwd`` through a train-mode CPU BatchNorm:
    use ``impl="xla"``). Elsewhere, and with ``impl="xla"``, it is NNX's code, autodiffed.
    """

    def __init__(self, *args, impl: str = "auto", **kwargs):
        if impl not in CONV_IMPLS:
            raise ValueError(f"batch norm impl {impl!r}: choose one of {CONV_IMPLS}")
        super().__init__(*args, **kwargs)
        self.impl = impl

    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if use_ra:
            return super().__call__(x, use_running_average=True, mask=mask)
        if self.axis_index_groups is not None:
            raise NotImplementedError("BatchNorm with axis_index_groups")
        # flax pinned in pyproject: these helpers are what nnx.BatchNorm.__call__ itself uses.
        from flax.nnx.nn.normalization import _canonicalize_axes, _compute_stats, _normalize

        feature_axes = _canonicalize_axes(x.ndim, self.axis)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
        fast = (self.impl == "auto" and jax.default_backend() == "cpu" and mask is None and self.axis_name is None
                and feature_axes == (x.ndim - 1,) and scale is not None and bias is not None
                and self.use_fast_variance)
        if fast:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        else:
            mean, var = _compute_stats(
                x, reduction_axes, dtype=self.dtype, axis_name=self.axis_name,
                use_fast_variance=self.use_fast_variance, mask=mask)
        # n: values per channel behind the batch statistics (the global batch under GSPMD).
        if mask is None:
            n = math.prod(x.shape[a] for a in reduction_axes)
        else:
            n = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=reduction_axes)
        if self.axis_name is not None:
            n = n * jax.lax.psum(1, self.axis_name)
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        stop = jax.lax.stop_gradient if (self.mean._can_update or self.var._can_update) else (lambda v: v)
        self.mean[...] = stop(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
        self.var[...] = stop(self.momentum * self.var[...] + (1 - self.momentum) * unbiased)
        if fast:
            return y
        return _normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, self.dtype, self.epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Train-mode BatchNorm over every axis but the last: ``(y, mean, biased var)``.

    The forward pass is NNX's arithmetic (``E[x]``, ``E[x^2]`` in at least float32, the same
    normalisation); the backward pass is written out: two per-channel sums (``g`` and
    ``g * (x - mean)``) and one elementwise pass for ``dx``, the statistics' own cotangents
    included. XLA's autodiff of the same forward costs ResNet-20/ResNet-50 train steps ~4% on
    CPU (``experiments/cpu_probes.py batchnorm``; BUILD_NOTES.md, "Performance").
    tests/test_benchmark.py checks it against NNX's autodiff.
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def batch_norm_train_autodiff(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """:func:`batch_norm_train` as NNX's own code, differentiated by JAX (what ``impl="xla"``
    runs for the same layer); the reference of its tests and of ``cpu_probes.py batchnorm``."""
    from flax.nnx.nn.normalization import _compute_stats, _normalize

    axes = tuple(range(x.ndim - 1))
    mean, var = _compute_stats(x, axes, dtype=None)
    return _normalize(x, mean, var, scale, bias, axes, (x.ndim - 1,), None, epsilon), mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(axes)
    var = jnp.maximum(0.0, jnp.square(xf).mean(axes) - jnp.square(mean))
    y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
    return (y.astype(jnp.result_type(x, scale, bias)), mean, var), (x, mean, var, scale, bias)


def _batch_norm_train_bwd(epsilon, res, cts):
    x, mean, var, scale, bias = res
    g, g_mean, g_var = cts  # the statistics' cotangents: zero where they only feed running averages
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    gf, xc, inv = g.astype(mean.dtype), x.astype(mean.dtype) - mean, jax.lax.rsqrt(var + epsilon)
    sum_g, sum_gx = gf.sum(axes), (gf * xc).sum(axes)
    mul = inv * scale
    # dx = mul * (g - mean(g) - xhat * mean(g * xhat)) + dmean/n + 2 dvar (x - mean)/n, xhat = (x - mean) * inv
    dx = gf * mul + (g_mean - mul * sum_g) / n + xc * ((2 * g_var - mul * inv * inv * sum_gx) / n)
    return dx.astype(x.dtype), (sum_gx * inv).astype(scale.dtype), sum_g.astype(bias.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


# ----------------------------------------------------------------------------- convolutions
# XLA:CPU is slow on two parts of a ResNet's convolutions (BUILD_NOTES.md, "Performance"):
#  * 1x1 convolutions: a 1x1 conv *is* a matmul over N*H*W, and XLA runs dot_general much
#    faster than the equivalent convolution, forward and backward;
#  * kernel (weight) gradients. XLA contracts over the batch, so it first transposes an NHWC
#    operand to make N (or N*H*W) the minor dimension, and it fuses that operand's whole
#    producer chain into the transpose, recomputed per element with a cache-hostile stride.
#    In ResNet-20 the residual chain of every earlier block of the stage was recomputed in
#    each transpose (cost quadratic in depth): half of the train step.
# Here the kxk kernel gradients read a *channel-major* copy of the layer input made by a
# matmul with the identity (an "NT" dot that XLA's matmul library reads in place, from the
# materialised input; exact for finite values: each output is one product by 1.0 plus exact
# zeros). A kxk kernel gradient is then the very convolution XLA would have built (N as the
# contracted feature dimension: the same values, bit for bit, and the same all-reduce of a
# batch-sharded contraction under GSPMD), fed from that copy; a 1x1 kernel gradient is one
# transposed-operand matmul. The input gradient of a 3x3 stride-2 convolution is computed per
# output parity (sub-pixel) instead of as XLA's dilated transposed convolution.
# Where flax_resnet.native serves the shape (float32, 8-256 channels; kernel gradients up to 64),
# the forward convolution, the stride-1 input gradient (a forward convolution of g with the
# flipped kernel), the sub-pixel parts and the kernel gradient run as its direct CPU kernels
# instead of XLA's convolutions, which reach well under half of the FMA peak at these widths.
# tests/test_benchmark.py and tests/test_native.py check outputs and gradients against nnx.Conv.
CONV_IMPLS = ("auto", "xla")


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, pads) -> jax.Array:
    """NHWC x HWIO convolution with zero ``pads = ((top, bottom), (left, right))``: the native CPU
    kernel where :func:`flax_resnet.native.supports` the shape, else ``lax.conv_general_dilated``."""
    if native.supports(x.shape, kernel.shape, x.dtype, kernel.dtype):
        return native.conv_forward(x, kernel, stride, pads)
    return _lax_conv(x, kernel, stride, pads)


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int, pads) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """XLA's convolution with symmetric padding (differentiable by JAX, unlike the native kernels)."""
    return _lax_conv(x, kernel, stride, ((pad, pad), (pad, pad)))


def channel_major(x2d: jax.Array) -> jax.Array:
    """``[P, C] -> [C, P]`` as ``eye(C) @ x2d.T``: read in place by the matmul, no fused transpose."""
    eye = jnp.eye(x2d.shape[1], dtype=x2d.dtype)
    return jax.lax.dot_general(eye, x2d, (((1,), (1,)), ((), ())))


def conv_weight_grad(x: jax.Array, g: jax.Array, kernel_shape, stride: int, pad: int) -> jax.Array:
    """The kernel gradient of ``_conv(x, kernel, stride, pad)`` for the output cotangent ``g``.

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
    differentiable once: a gradient of a gradient needs ``conv_impl="xla"``)."""
    return conv2d(x, kernel, stride, ((pad, pad), (pad, pad)))


def _conv_kxk_fwd(x, kernel, stride, pad):
    return conv2d(x, kernel, stride, ((pad, pad), (pad, pad))), (x, kernel)


def conv_input_grad(x: jax.Array, g: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """The input gradient of ``_conv(x, kernel, stride, pad)``: XLA's own, except for 3x3 stride-2
    convolutions of even-sized inputs, which go through :func:`_stride2_input_grad`."""
    if stride == 2 and pad == 1 and kernel.shape[:2] == (3, 3) and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
        return _stride2_input_grad(g, kernel)
    k, _, cin, cout = kernel.shape
    if stride == 1 and pad <= k - 1 and native.supports(g.shape, (k, k, cout, cin), g.dtype, kernel.dtype):
        q = k - 1 - pad  # a forward convolution of g with the flipped kernel, I and O swapped
        return native.conv_forward(g, kernel[::-1, ::-1].swapaxes(2, 3), 1, ((q, q), (q, q)))
    return jax.vjp(lambda xx: _conv(xx, kernel, stride, pad), x)[1](g)[0]


# For each parity of an input row (or column) of a 3x3, stride-2, pad-1 convolution: which kernel
# row (column) meets g[a] and, for odd ones, g[a + 1]. dx[2a] = g[a] k[1]; dx[2a+1] = g[a] k[2] + g[a+1] k[0].
_STRIDE2_TAPS = ((1,), (2, 0))


def _stride2_input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
    """Sub-pixel input gradient of a 3x3/2 convolution: one small stride-1 convolution of ``g`` per
    output parity (1x1, 1x2, 2x1, 2x2 taps: the FLOPs of the forward pass, none on inserted zeros),
    interleaved. XLA's transposed convolution dilates ``g`` instead and runs 3x slower at
    128 channels @56x56 (BUILD_NOTES.md, "Performance")."""
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
    dx = conv_input_grad(x, g, kernel, stride, pad)
    return dx, conv_weight_grad(x, g, kernel.shape, stride, pad).astype(kernel.dtype)


conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


@jax.custom_vjp
def _matmul_1x1(x: jax.Array, kernel2d: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, kernel2d, (((3,), (0,)), ((), ())))


def _matmul_1x1_fwd(x, kernel2d):
    return _matmul_1x1(x, kernel2d), (x, kernel2d)


def _matmul_1x1_bwd(res, g):
    x, kernel2d = res
    cin, cout = kernel2d.shape
    dx = jax.lax.dot_general(g, kernel2d, (((3,), (1,)), ((), ())))
    # dW = x2d.T @ g2d as one transposed-operand dot. (Making the narrower operand channel-major
    # first, as the kxk kernel gradients do, measured the same or up to 4% slower in ResNet-50:
    # `cpu_probes.py weightgrads`.)
    dw = jax.lax.dot_general(x.reshape(-1, cin), g.reshape(-1, cout), (((0,), (0,)), ((), ())))
    return dx, dw.astype(kernel2d.dtype)


_matmul_1x1.defvjp(_matmul_1x1_fwd, _matmul_1x1_bwd)


def conv1x1(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """A 1x1 convolution as a matmul over N*H*W (strided: subsample first). Kernel ``(1, 1, cin, cout)``."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    return _matmul_1x1(x, kernel[0, 0])


class Conv(nnx.Conv):
    """``nnx.Conv`` (same ``kernel``/``bias`` parameters, shapes and init) computed the fast way.

    With ``impl="auto"`` on the CPU backend: 1x1 convolutions run as :func:`conv1x1` (a
    matmul); kxk ones as :func:`conv2d` (the native kernels of :mod:`flax_resnet.native` where
    they serve the shape, else ``lax.conv_general_dilated``) with the kernel gradient of
    :func:`conv_weight_grad` and the input gradient of :func:`conv_input_grad`. On GPUs/TPUs (whose convolution libraries have no such
    weakness), grouped convolutions, and with ``impl="xla"``, it is ``nnx.Conv`` unchanged.
    Only NHWC inputs with symmetric integer padding are specialised (what
    :meth:`Layers.conv` builds).
    """

    def __init__(self, *args, impl: str = "auto", **kwargs):
        if impl not in CONV_IMPLS:
            raise ValueError(f"conv impl {impl!r}: choose one of {CONV_IMPLS}")
        super().__init__(*args, **kwargs)
        self.impl = impl

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        pad, stride = self.padding, self.strides
        specialised = (self.impl == "auto" and jax.default_backend() == "cpu"
                       and self.feature_group_count == 1 and inputs.ndim == 4
                       and self.mask is None and out_sharding is None and isinstance(stride, int)
                       and isinstance(pad, tuple) and len(set(pad)) == 1 and pad[0][0] == pad[0][1]
                       and self.kernel_size[0] == self.kernel_size[1]
                       and all(d in (None, 1) for d in (self.input_dilation, self.kernel_dilation)))
        if not specialised:
            return super().__call__(inputs, out_sharding=out_sharding)
        pad = pad[0][0]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        if self.kernel_size[0] == 1 and pad == 0:
            y = conv1x1(x, kernel, stride)
        else:
            y = conv_kxk(x, kernel, stride, pad)
        return y if bias is None else y + bias.reshape((1, 1, 1, -1))


class _LayerKeys:
    """What a layer's constructor needs of ``nnx.Rngs`` (``.params()``), without its counter.

    ``nnx.Rngs`` keeps its stream counter in a Variable; under ``nnx.eval_shape`` every
    increment inspects the tracer's sharding, which walks the whole trace so far, so an
    abstract ResNet-1202 took minutes (quadratic in depth). Keys folded in with a Python
    counter cost one op per layer.
    """

    def __init__(self, key: jax.Array):
        self._key, self._count = key, 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count)


class Layers:
    """Factory for the convs and norms of one network, so every layer shares dtypes and BN settings.

    Args:
      rngs: NNX random streams; one key is drawn from ``rngs.params`` and every layer's
        parameters are initialised from keys folded in from it.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` keeps float32.
      param_dtype: storage dtype of parameters and BatchNorm statistics.
      bn_momentum: Flax convention (weight of the *old* running value): 0.9 equals PyTorch's 0.1.
      bn_epsilon: 1e-5, as PyTorch.
      conv_impl: "auto" (on XLA:CPU: 1x1 convs as matmuls, kxk convs and their gradients as
        native direct kernels where they serve the shape, else kxk kernel gradients from a
        channel-major copy, sub-pixel stride-2 input gradients; see :class:`Conv`; BatchNorm's
        backward pass written out, see :class:`BatchNorm`) or "xla" (plain ``nnx.Conv`` and
        NNX BatchNorm arithmetic, autodiffed). Parameters are the same either way.
    """

    def __init__(self, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 bn_momentum: float = 0.9, bn_epsilon: float = 1e-5, conv_impl: str = "auto"):
        self.rngs = _LayerKeys(rngs.params())
        self.dtype, self.param_dtype = dtype, param_dtype
        self.bn_momentum, self.bn_epsilon = bn_momentum, bn_epsilon
        self.conv_impl = conv_impl

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, *, groups: int = 1,
             bias: bool = False) -> Conv:
        """A conv with PyTorch's symmetric padding ``kernel // 2`` (not XLA's asymmetric 'SAME').

        A :class:`Conv` (an ``nnx.Conv`` with the same ``kernel``/``bias``), computed the fast
        way unless ``conv_impl="xla"``.
        """
        pad = kernel // 2
        return Conv(
            cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
            feature_group_count=groups, use_bias=bias, kernel_init=conv_init,
            dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs, impl=self.conv_impl)

    def norm(self, features: int, *, zero_scale: bool = False) -> BatchNorm:
        return BatchNorm(
            features, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
            dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs, impl=self.conv_impl)

    def projection(self, cin: int, cout: int, stride: int, *, norm: bool = True) -> nnx.List:
        """Option B shortcut: 1x1 conv (+ BN). An ``nnx.List`` so keys read ``downsample/0``, ``/1``."""
        layers = [self.conv(cin, cout, 1, stride)]
        if norm:
            layers.append(self.norm(cout))
        return nnx.List(layers)


def pad_identity(x: jax.Array, cout: int, stride: int) -> jax.Array:
    """Option A shortcut (He et al. 2015, CIFAR): strided identity, zero-padded channels.

    The new channels are split evenly before and after the old ones, as in the widely used
    CIFAR reference implementation; the shortcut has no parameters.
    """
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    extra = cout - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


def apply_sequence(layers: nnx.List, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class _Residual(nnx.Module):
    """Holds the shortcut choice shared by all residual blocks."""

    downsample: nnx.List | None

    def _init_shortcut(self, make: Layers, cin: int, cout: int, stride: int,
                       shortcut: Shortcut, *, norm: bool = True) -> None:
        self.out_channels = cout
        self.stride = stride
        self.shortcut_type = shortcut
        needs = stride != 1 or cin != cout
        self.downsample = make.projection(cin, cout, stride, norm=norm) if needs and shortcut == "B" else None

    def shortcut(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            return apply_sequence(self.downsample, x)
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            return pad_identity(x, self.out_channels, self.stride)
        return x


class BasicBlock(_Residual):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", zero_init_residual: bool = False, **_: Any):
        self.conv1 = make.conv(cin, planes, 3, stride)
        self.bn1 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3)
        self.bn2 = make.norm(planes, zero_scale=zero_init_residual)
        self._init_shortcut(make, cin, planes, stride, shortcut)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nnx.relu(out + self.shortcut(x))


class PlainBlock(nnx.Module):
    """A BasicBlock without its shortcut: the "plain" network of the degradation study."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers, **_: Any):
        self.conv1 = make.conv(cin, planes, 3, stride)
        self.bn1 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3)
        self.bn2 = make.norm(planes)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(self.bn2(self.conv2(out)))


class Bottleneck(_Residual):
    """1x1 -> 3x3 (stride, groups) -> 1x1 with 4x expansion; torchvision's ResNet v1.5.

    ``groups`` and ``base_width`` set the inner width ``planes * base_width / 64 * groups``:
    ResNeXt-50 32x4d is groups=32, base_width=4; Wide ResNet-50-2 is base_width=128.
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", zero_init_residual: bool = False,
                 groups: int = 1, base_width: int = 64, **_: Any):
        width = int(planes * (base_width / 64.0)) * groups
        cout = planes * self.expansion
        self.conv1 = make.conv(cin, width, 1)
        self.bn1 = make.norm(width)
        self.conv2 = make.conv(width, width, 3, stride, groups=groups)
        self.bn2 = make.norm(width)
        self.conv3 = make.conv(width, cout, 1)
        self.bn3 = make.norm(cout, zero_scale=zero_init_residual)
        self._init_shortcut(make, cin, cout, stride, shortcut)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = nnx.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return nnx.relu(out + self.shortcut(x))


class PreActBasicBlock(_Residual):
    """ResNet v2 basic unit: BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus the shortcut.

    A projection shortcut takes the *pre-activated* input and has no BatchNorm of its own.
    ``zero_init_residual`` zeroes the last conv (there is no BatchNorm at the branch end).
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", zero_init_residual: bool = False, **_: Any):
        self.bn1 = make.norm(cin)
        self.conv1 = make.conv(cin, planes, 3, stride)
        self.bn2 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3)
        if zero_init_residual:
            self.conv2.kernel[...] = jnp.zeros_like(self.conv2.kernel[...])
        self._init_shortcut(make, cin, planes, stride, shortcut, norm=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        pre = nnx.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.downsample is not None else self.shortcut(x)
        out = self.conv1(pre)
        out = self.conv2(nnx.relu(self.bn2(out)))
        return out + skip


class PreActBottleneck(_Residual):
    """ResNet v2 bottleneck unit (BN -> ReLU before each of the 1x1, 3x3, 1x1 convs)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", zero_init_residual: bool = False,
                 groups: int = 1, base_width: int = 64, **_: Any):
        width = int(planes * (base_width / 64.0)) * groups
        cout = planes * self.expansion
        self.bn1 = make.norm(cin)
        self.conv1 = make.conv(cin, width, 1)
        self.bn2 = make.norm(width)
        self.conv2 = make.conv(width, width, 3, stride, groups=groups)
        self.bn3 = make.norm(width)
        self.conv3 = make.conv(width, cout, 1)
        if zero_init_residual:
            self.conv3.kernel[...] = jnp.zeros_like(self.conv3.kernel[...])
        self._init_shortcut(make, cin, cout, stride, shortcut, norm=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        pre = nnx.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.downsample is not None else self.shortcut(x)
        out = self.conv1(pre)
        out = self.conv2(nnx.relu(self.bn2(out)))
        out = self.conv3(nnx.relu(self.bn3(out)))
        return out + skip


class ArticleBlock(_Residual):
    """The article's residual module, fixed: conv3x3 -> ReLU -> conv3x3, plus the shortcut,
    then BatchNorm -> ReLU after the addition (the article puts BN/ReLU between blocks).

    The article's convs keep PyTorch's default bias; when the width changes (which the
    article's code never does, a bug) the shortcut is a 1x1 projection.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, make: Layers,
                 shortcut: Shortcut = "B", **_: Any):
        self.conv1 = make.conv(cin, planes, 3, stride, bias=True)
        self.conv2 = make.conv(planes, planes, 3, bias=True)
        self.bn = make.norm(planes)
        self._init_shortcut(make, cin, planes, stride, shortcut, norm=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv2(nnx.relu(self.conv1(x)))
        return nnx.relu(self.bn(out + self.shortcut(x)))


BLOCKS = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
    "plain": PlainBlock,
    "article": ArticleBlock,
}
