"""Max-pooling with its backward pass written out (a ``custom_vjp``), for XLA:CPU.

JAX differentiates ``nnx.max_pool`` (``lax.reduce_window`` max) through a variadic
reduce-window that carries int32 index arrays the size of the padded input, then a scatter.
Here the forward pass is the elementwise max of the ``k*k`` strided slices ("taps") of the
input, each padded with ``-inf`` where it reads the padding (one loop fusion, the same values
as ``reduce_window``); for the backward pass a second fusion records, per output, which tap
won (``int8``, written out: see :func:`_fwd`). The backward pass sends each output's cotangent
to that tap: for each tap, ``where(winner == tap, g, 0)`` placed back with ``lax.pad``
(interior padding ``stride - 1``), summed over taps: elementwise, one fusion, no index arrays,
no scatter. Differentiable once, like the rest of the CPU backend.

Ties follow PyTorch's ``max_pool2d``: the gradient goes to the *first* maximal element in
row-major window order, and never to the padding (not even in a window of ``-inf``s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx


def max_pool(x: jax.Array, window: int, stride: int, pad: int = 0) -> jax.Array:
    """PyTorch's ``MaxPool2d(window, stride, pad)`` on NHWC ``x``: the drop-in for
    :func:`flax_resnet.models.layers.max_pool` that :func:`flax_resnet.cpu.layers` passes.

    The same values as ``nnx.max_pool``; its gradient is :func:`max_pool_2d`'s hand-written one.
    Inputs that are not NHWC are ``nnx.max_pool``'s own.
    """
    if x.ndim != 4 or not 0 <= pad < window:
        return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=((pad, pad), (pad, pad)))
    return max_pool_2d(x, window, stride, pad)  # looked up at trace time: cpu_probes.py can swap it


def max_pool_2d(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
    """Max over ``window x window`` windows of NHWC ``x``, ``stride`` apart, ``pad`` of ``-inf`` each side."""
    return _max_pool(x, window, stride, pad, x.shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, stride, pad, hw):
    y = None
    for _, tap in _taps(x, window, stride, pad):
        y = tap if y is None else lax.max(y, tap)
    return y


def _out_size(n: int, window: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - window) // stride + 1


def _taps(x: jax.Array, window: int, stride: int, pad: int, fill: float = -jnp.inf):
    """``(tap index, strided slice)`` for each window position in row-major order.

    Each tap is the strided slice of the rows and columns it reads, padded with ``fill`` only
    where it reads the padding: no padded copy of ``x``, each tap fuses into its consumer.
    """
    n, h, w, c = x.shape
    ho, wo = _out_size(h, window, stride, pad), _out_size(w, window, stride, pad)
    padding = jnp.array(fill, x.dtype)
    rows = [_reads(i - pad, h, ho, stride) for i in range(window)]
    cols = [_reads(j - pad, w, wo, stride) for j in range(window)]
    for i, (r0, r1, rlo, rhi) in enumerate(rows):
        for j, (c0, c1, clo, chi) in enumerate(cols):
            if r1 <= r0 or c1 <= c0:  # reads only padding (a map smaller than the window)
                yield i * window + j, jnp.full((n, ho, wo, c), padding)
                continue
            tap = lax.slice(x, (0, r0, c0, 0), (n, r1, c1, c), (1, stride, stride, 1))
            if rlo or rhi or clo or chi:
                tap = lax.pad(tap, padding, ((0, 0, 0), (rlo, rhi, 0), (clo, chi, 0), (0, 0, 0)))
            yield i * window + j, tap


def _reads(offset: int, n: int, n_out: int, stride: int) -> tuple[int, int, int, int]:
    """Output ``a`` reads input ``offset + stride * a``: the slice ``[start, stop)`` of those in
    range, and how many outputs fall before and after it (into the padding)."""
    first = -(offset // stride) if offset < 0 else 0  # ceil(-offset / stride)
    last = min(n_out - 1, (n - 1 - offset) // stride)
    start = offset + stride * first
    return start, offset + stride * last + 1, first, n_out - 1 - last


def _fwd(x, window, stride, pad, hw):
    y = _max_pool(x, window, stride, pad, hw)
    # A conditional whose branches are the same: XLA fuses nothing across its boundary, so the
    # winners are written out here (one byte an output) rather than fused into the backward
    # pass, which would recompute them, taps and all, for every tap of every input it writes.
    # Either branch is right, whatever the predicate (NaN or not).
    winners = functools.partial(_winners, window=window, stride=stride, pad=pad)
    if not y.size:
        return y, winners(x, y)
    first = lax.slice(y, (0, 0, 0, 0), (1, 1, 1, 1)).reshape(())
    return y, lax.cond(first == first, winners, winners, x, y)


def _winners(x, y, *, window, stride, pad):
    """Per output, the index of the first tap (row-major) equal to the max: PyTorch's rule on ties.
    Taps read NaN where they read the padding: equal to nothing, the padding never wins."""
    winner = jnp.zeros(y.shape, jnp.int8)
    for t, tap in reversed(list(_taps(x, window, stride, pad, fill=jnp.nan))):
        winner = jnp.where(tap == y, jnp.int8(t), winner)
    return winner


def _bwd(window, stride, pad, hw, winner, g):
    h, w = hw
    ho, wo = g.shape[1:3]
    if not ho or not wo:  # an empty output (a map smaller than the window, unpadded)
        return (jnp.zeros((g.shape[0], h, w, g.shape[3]), g.dtype),)
    acc = jnp.promote_types(g.dtype, jnp.float32)  # sum the (up to ceil(k/s)^2) contributions in float32
    dx = None
    zero = jnp.array(0, acc)
    for t in range(window * window):
        i, j = divmod(t, window)
        part = jnp.where(winner == t, g.astype(acc), zero)
        # Output (a, b) took input row i - pad + stride * a, column j - pad + stride * b: spread the
        # outputs stride apart (interior padding) and offset them; negative edge padding crops.
        lo_h, lo_w = i - pad, j - pad
        part = lax.pad(part, zero, ((0, 0, 0), (lo_h, h - lo_h - stride * (ho - 1) - 1, stride - 1),
                                    (lo_w, w - lo_w - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
        dx = part if dx is None else dx + part
    return (dx.astype(g.dtype),)


_max_pool.defvjp(_fwd, _bwd)
