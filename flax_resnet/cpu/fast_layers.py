"""The CPU backend's layer classes: drop-in substitutes for the model's ``nnx.Conv`` and BatchNorm.

Same constructor, parameters and statistics as the plain layers (a model built with them
loads the same checkpoints and weights), computed with the formulations of
:mod:`flax_resnet.cpu.convs` and :mod:`flax_resnet.cpu.batchnorm` (looked up there at trace
time, so ``experiments/cpu_probes.py`` can swap one in for an A/B). Being ``custom_vjp``
rules around native kernels, they are differentiable once: forward-mode derivatives,
Hessians and gradients of gradients need the plain layers.
"""

from __future__ import annotations

import jax
from flax import nnx

from flax_resnet.cpu import batchnorm, convs
from flax_resnet.models.layers import BatchNorm


class FastConv(nnx.Conv):
    """``nnx.Conv`` computed the fast way on XLA:CPU.

    1x1 convolutions run as :func:`~flax_resnet.cpu.convs.conv1x1` (a matmul); kxk ones as
    :func:`~flax_resnet.cpu.convs.conv_kxk` (native direct kernels where they serve the shape,
    with channel-major kernel gradients and sub-pixel stride-2 input gradients). Grouped,
    dilated, masked or asymmetrically padded convolutions, and non-NHWC inputs, are
    ``nnx.Conv``'s own.
    """

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        pad, stride = self.padding, self.strides
        specialised = (self.feature_group_count == 1 and inputs.ndim == 4
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
            y = convs.conv1x1(x, kernel, stride)
        else:
            y = convs.conv_kxk(x, kernel, stride, pad)
        return y if bias is None else y + bias.reshape((1, 1, 1, -1))


class FastBatchNorm(BatchNorm):
    """:class:`~flax_resnet.models.layers.BatchNorm` whose train-mode pass is
    :func:`~flax_resnet.cpu.batchnorm.batch_norm_train` (the backward pass written out) where it
    applies: statistics over the whole local batch (no ``axis_name``), with scale and bias."""

    def normalize_batch(self, x, scale, bias):
        if self.axis_name is None and scale is not None and bias is not None and self.use_fast_variance:
            return batchnorm.batch_norm_train(x, scale, bias, self.epsilon)
        return super().normalize_batch(x, scale, bias)
