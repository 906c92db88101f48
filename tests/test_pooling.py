"""The CPU backend's max-pool (flax_resnet.cpu.pooling): nnx.max_pool's values, and the gradient of
PyTorch's max_pool2d, for every pool the models use (odd sizes, float32 and bfloat16)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_resnet import cpu
from flax_resnet.cpu import pooling
from flax_resnet.models import create_model, layers

# (window, stride, pad): ResNet's stem (3x3/2, pad 1), the article stem's 2x2/2 pools between
# stages, the article network's MaxPool2d(3, 1 or 2, padding=1).
POOLS = [(3, 2, 1), (2, 2, 0), (3, 1, 1)]
SIZES = [(9, 8), (1, 2)]  # odd rows, even columns; smaller than the window
DTYPES = [jnp.float32, jnp.bfloat16]


def _inputs(shape):
    """A batch of six: random floats (no ties), then five kinds of input with heavy ties."""
    rng = np.random.default_rng(0)
    return np.concatenate([
        rng.normal(size=shape),
        np.maximum(rng.normal(size=shape), 0),  # after a ReLU: about half zeros
        np.round(rng.uniform(size=shape) * 3),  # 0..3: ties in most windows
        np.ones(shape),
        np.full(shape, -7.0),
        np.where(rng.uniform(size=shape) < 0.7, -np.inf, 0.0),  # windows of -inf: still not the padding
    ])


@functools.cache
def _case(window, stride, pad, dtype, size):
    """Inputs, cotangents, and (ours, nnx's) values and input gradients, in one compiled call."""
    x = jnp.asarray(_inputs((1, *size, 3)), dtype)
    out_shape = jax.eval_shape(lambda x: layers.max_pool(x, window, stride, pad), x).shape
    # Small integers: every sum of them is exact in bfloat16 too, so gradients compare bit for bit
    # whatever the order in which a backward pass adds an input's contributions.
    g = jnp.asarray(np.random.default_rng(1).integers(-4, 5, out_shape), dtype)

    def both(x, g):
        (y, vjp), (y_nnx, vjp_nnx) = (jax.vjp(lambda v, p=pool: p(v, window, stride, pad), x)
                                      for pool in (cpu.max_pool, layers.max_pool))
        return y, y_nnx, vjp(g)[0], vjp_nnx(g)[0]

    return (x, g, *jax.jit(both)(x, g))


def _torch_grad(x, g, window, stride, pad):
    """PyTorch's max_pool2d backward (NCHW there, NHWC here): the gradient goes to the first maximal
    element of each window in row-major scan order; the padding never wins."""
    def to_torch(a):
        return torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2)
    dtype = torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
    xt = to_torch(x).to(dtype).requires_grad_(True)
    torch.nn.functional.max_pool2d(xt, window, stride, pad).backward(to_torch(g).to(dtype))
    return jnp.asarray(xt.grad.float().permute(0, 2, 3, 1).numpy()).astype(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,stride,pad", POOLS)
def test_values_are_nnx_max_pool_bit_for_bit(window, stride, pad, dtype):
    for size in SIZES:
        _, _, y, y_nnx, _, _ = _case(window, stride, pad, dtype, size)
        chex.assert_trees_all_equal(y, y_nnx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,stride,pad", POOLS)
def test_gradient_without_ties_is_jax_autodiff(window, stride, pad, dtype):
    # Random floats: one maximal element per window, a single right answer.
    for size in SIZES:
        _, _, _, _, dx, dx_nnx = _case(window, stride, pad, dtype, size)
        chex.assert_trees_all_equal(dx[0], dx_nnx[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,stride,pad", POOLS)
def test_gradient_with_ties_is_pytorchs(window, stride, pad, dtype):
    """With ties the gradient of a max is a convention. We follow PyTorch's: the first maximal
    element in row-major window order takes it all, and the padding never does. It is what the
    models are checked against (torchvision, the article's code) and what a PyTorch user expects.
    JAX's autodiff of ``reduce_window`` picks the first one too in this JAX (checked here), but
    that is its implementation's choice, not a documented rule, and it has changed formulation
    between versions; in a window of ``-inf``s it gives the gradient to the padding (lost), where
    PyTorch gives it to the first element. PyTorch is the reference this test holds us to."""
    for size in SIZES:
        x, g, y, _, dx, dx_nnx = _case(window, stride, pad, dtype, size)
        if y.size == 0:  # PyTorch refuses an empty output
            continue
        chex.assert_trees_all_equal(dx, _torch_grad(x, g, window, stride, pad))
        chex.assert_trees_all_equal(dx[:-1], dx_nnx[:-1])  # all but the -inf input


def test_rank_other_than_4_is_nnx_max_pool():
    x = jax.random.normal(jax.random.key(0), (7, 9, 3))  # unbatched HWC
    chex.assert_trees_all_equal(cpu.max_pool(x, 3, 2, 1), layers.max_pool(x, 3, 2, 1))


def test_backward_has_no_scatter_and_no_index_arrays():
    """What the hand-written backward is for: no reduce-window (with or without int32 index arrays),
    no (select-and-)scatter."""
    x = jnp.zeros((2, 16, 16, 8))
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(cpu.max_pool(x, 3, 2, 1)))).lower(x).as_text()
    assert "scatter" not in hlo and "reduce_window" not in hlo
    plain = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool(x, 3, 2, 1)))).lower(x).as_text()
    assert "scatter" in plain  # JAX's autodiff does: the check above would see one


def test_cpu_layers_pass_the_pool_to_the_models():
    assert cpu.layers()["pool"] is pooling.max_pool
    for name in ("resnet18", "article_resnet", "article_resnet_widened"):
        fast = nnx.eval_shape(lambda: cpu.create_model(name))
        plain = nnx.eval_shape(lambda: create_model(name))
        assert fast.max_pool is pooling.max_pool and plain.max_pool is layers.max_pool
