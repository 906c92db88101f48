"""The layers a ResNet is built from, and the factory that builds them.

:class:`Layers` makes every convolution and BatchNorm of one network, so all of them share
dtypes and BatchNorm settings. Its ``conv`` and ``norm`` arguments are the layer *classes*
(as the Flax ImageNet example passes ``conv``/``norm`` module types), its ``pool`` the max-pool
function: a backend substitutes its own (:mod:`flax_resnet.cpu` does, on CPU) without the
model knowing. Any substitute must keep the constructor signature and the parameters of
``nnx.Conv`` / :class:`BatchNorm` (and :func:`max_pool`'s signature and values), so
checkpoints and converted weights fit either way.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


def conv_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """torchvision's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``: an *untruncated*
    normal with variance ``2 / fan_out`` (``nnx.initializers.variance_scaling(2.0, "fan_out",
    "normal")``, value for value).

    The same values whether it runs op by op or inside one ``jit`` (the trainer builds its
    model in one compiled program): there the barrier keeps XLA from folding the standard
    deviation into the normal's own constant, a change of rounding in the last bit.
    """
    fan_out = shape[-1] * math.prod(shape[:-2])  # output channels x receptive field
    sample = jax.random.normal(key, shape, dtype)
    if isinstance(sample, jax.core.Tracer):
        sample = jax.lax.optimization_barrier(sample)
    return sample * jnp.sqrt(jnp.array(2.0 / fan_out, dtype=dtype))


def uniform_fan_in(fan_in: int):
    """PyTorch's default for ``nn.Conv2d``/``nn.Linear`` weights and biases (kaiming-uniform with
    ``a=sqrt(5)``): uniform in ``+-1/sqrt(fan_in)``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def batch_moments(x: jax.Array, axes: tuple[int, ...], axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over ``axes`` in at least float32: ``E[x]`` and ``E[x^2] - E[x]^2``
    clipped at zero (one pass, NNX's fast variance); averaged over ``axis_name`` under shard_map."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, mean_sq = xf.mean(axes), jnp.square(xf).mean(axes)
    if axis_name is not None:
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
    return mean, jnp.maximum(0.0, mean_sq - jnp.square(mean))


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
              epsilon: float, dtype: Dtype = None) -> jax.Array:
    """``(x - mean) * (rsqrt(var + eps) * scale) + bias`` over the last axis, in NNX's order of operations."""
    y = x - mean
    mul = jax.lax.rsqrt(var + epsilon)
    args = [x]
    if scale is not None:
        mul = mul * scale
        args.append(scale)
    y = y * mul
    if bias is not None:
        y = y + bias
        args.append(bias)
    return jnp.asarray(y, dtype if dtype is not None else jnp.result_type(*args))


def max_pool(x: jax.Array, window: int, stride: int, pad: int = 0) -> jax.Array:
    """PyTorch's ``MaxPool2d(window, stride, pad)`` on NHWC ``x``: ``nnx.max_pool`` with symmetric
    padding, which is ``-inf`` and so never wins the max."""
    return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` over the last (channel) axis whose running variance follows PyTorch.

    In train mode both frameworks normalise with the *biased* batch variance, but PyTorch's
    ``BatchNorm2d`` folds the *unbiased* one (``var * n / (n - 1)``, ``n`` values per channel)
    into ``running_var``, where stock NNX folds the biased one; converted torchvision weights
    would drift from PyTorch's statistics during fine-tuning. Parameters (``scale``, ``bias``),
    statistics (``mean``, ``var``), the ``use_running_average`` view and eval mode are NNX's;
    the train-mode arithmetic is written here on the public API (:func:`batch_moments`,
    :func:`normalize`) and is NNX's, operation for operation. Under ``jit`` with a sharded
    batch the statistics are over the *global* batch (GSPMD inserts the all-reduce).
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if use_ra:
            return super().__call__(x, use_running_average=True, mask=mask)
        if mask is not None or self.axis_index_groups is not None or self.axis not in (-1, x.ndim - 1):
            raise NotImplementedError("flax_resnet BatchNorm: train mode over the last axis, without mask "
                                      "or axis_index_groups")
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        axes = tuple(range(x.ndim - 1))
        y, mean, var = self.normalize_batch(x, scale, bias)
        n = math.prod(x.shape[a] for a in axes)
        if self.axis_name is not None:
            n = n * jax.lax.psum(1, self.axis_name)
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        # Running statistics are state, not a function of the parameters to differentiate. Whole-value
        # set_value, not `[...] =`: NNX's indexed set asks a tracer for its sharding, and the error
        # JAX builds for that walks the whole jaxpr traced so far (~0.1 s of ResNet-20's trace).
        self.mean.set_value(jax.lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean))
        self.var.set_value(jax.lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * unbiased))
        return y

    def normalize_batch(self, x: jax.Array, scale: jax.Array | None, bias: jax.Array | None):
        """Train mode: ``(y, batch mean, biased batch variance)``. The hook a backend overrides."""
        mean, var = batch_moments(x, tuple(range(x.ndim - 1)), self.axis_name)
        return normalize(x, mean, var, scale, bias, self.epsilon, self.dtype), mean, var


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
    """Factory for the convs and norms of one network.

    Args:
      rngs: NNX random streams; one key is drawn from ``rngs.params`` and every layer's
        parameters are initialised from keys folded in from it.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` keeps float32.
      param_dtype: storage dtype of parameters and BatchNorm statistics.
      bn_momentum: Flax convention (weight of the *old* running value): 0.9 equals PyTorch's 0.1.
      bn_epsilon: 1e-5, as PyTorch.
      conv: the convolution class (``nnx.Conv`` or a subclass with its signature and parameters).
      norm: the BatchNorm class (:class:`BatchNorm` or a subclass).
      pool: the max-pool function, called as ``make.max_pool(x, window, stride, pad)``
        (:func:`max_pool` or a function with its signature and values). A model keeps it as an
        attribute (a static one: no parameters, nothing in a checkpoint).
      init: "torchvision" (convs kaiming-normal, fan-out) or "pytorch" (``nn.Conv2d``'s
        default, :func:`uniform_fan_in` for weight and bias), for networks written with
        PyTorch's defaults, such as the article's.
    """

    def __init__(self, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 bn_momentum: float = 0.9, bn_epsilon: float = 1e-5, *,
                 conv: type[nnx.Conv] = nnx.Conv, norm: type[BatchNorm] = BatchNorm,
                 pool: Callable[..., jax.Array] = max_pool, init: str = "torchvision"):
        if init not in ("torchvision", "pytorch"):
            raise ValueError(f"init must be 'torchvision' or 'pytorch', got {init!r}")
        self.init = init
        self.rngs = _LayerKeys(rngs.params())
        self.dtype, self.param_dtype = dtype, param_dtype
        self.bn_momentum, self.bn_epsilon = bn_momentum, bn_epsilon
        self.conv_cls, self.norm_cls = conv, norm
        self.max_pool = pool

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, *, groups: int = 1,
             bias: bool = False) -> nnx.Conv:
        """A conv with PyTorch's symmetric padding ``kernel // 2`` (not XLA's asymmetric 'SAME')."""
        pad = kernel // 2
        inits = {"kernel_init": conv_init}
        if self.init == "pytorch":
            default = uniform_fan_in(cin // groups * kernel * kernel)
            inits = {"kernel_init": default, "bias_init": default}
        return self.conv_cls(
            cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
            feature_group_count=groups, use_bias=bias, **inits,
            dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

    def norm(self, features: int, *, zero_scale: bool = False) -> BatchNorm:
        return self.norm_cls(
            features, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
            dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

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
