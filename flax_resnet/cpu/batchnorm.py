"""Train-mode BatchNorm with its backward pass written out (a ``custom_vjp``), for XLA:CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flax_resnet.models.layers import batch_moments, normalize


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Train-mode BatchNorm over every axis but the last: ``(y, mean, biased var)``.

    The forward pass is NNX's arithmetic (``E[x]``, ``E[x^2]`` in at least float32, the same
    normalisation); the backward pass is written out: two per-channel sums (``g`` and
    ``g * (x - mean)``) and one elementwise pass for ``dx``, the statistics' own cotangents
    included, instead of XLA's autodiff of the same forward (``experiments/cpu_probes.py
    batchnorm`` times the two; docs/performance.md).
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def batch_norm_train_autodiff(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """:func:`batch_norm_train` as the plain :class:`~flax_resnet.models.layers.BatchNorm` computes it,
    differentiated by JAX: the reference of its tests and of ``cpu_probes.py batchnorm``."""
    mean, var = batch_moments(x, tuple(range(x.ndim - 1)))
    return normalize(x, mean, var, scale, bias, epsilon), mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    mean, var = batch_moments(x, tuple(range(x.ndim - 1)))
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
