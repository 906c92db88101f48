"""The CPU backend (flax_resnet.cpu): its formulations against the plain layers, the fast model against
the plain one, the data-parallel step training runs, and the host allocator tuning."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from flax_resnet import cpu, parallel
from flax_resnet.cpu import batchnorm, convs, pooling
from flax_resnet.models import Layers, create_model
from flax_resnet.training import split_model


# --------------------------------------------------------------------------- formulations
def _loss_and_logits(module, x):
    y = module(x).astype(jnp.float32)
    return jnp.sum(y * jnp.cos(y)), y  # a cotangent that is not uniform


def _loss(module, x):
    return _loss_and_logits(module, x)[0]


@pytest.mark.parametrize("cin,cout,kernel,stride,size", [
    (5, 6, 3, 1, 9),    # odd size, stride 1
    (5, 6, 3, 2, 8),    # stride 2, even size: g dilated by the stride
    (5, 6, 3, 2, 9),    # stride 2, odd size: the last input row/column is never read
    (8, 12, 1, 1, 7),   # 1x1 as a matmul
    (12, 8, 1, 2, 8),   # strided 1x1: subsampled, then a matmul
    (3, 8, 7, 2, 16),   # the ImageNet stem
])
def test_fast_convolutions_match_lax(cin, cout, kernel, stride, size):
    fast = Layers(nnx.Rngs(0), **cpu.layers()).conv(cin, cout, kernel, stride)
    plain = Layers(nnx.Rngs(0)).conv(cin, cout, kernel, stride)
    assert isinstance(fast, cpu.FastConv) and type(plain) is nnx.Conv and fast.kernel.shape == (kernel, kernel, cin, cout)
    chex.assert_trees_all_equal(fast.kernel[...], plain.kernel[...])  # same parameters, same init
    x = jax.random.normal(jax.random.key(1), (3, size, size, cin))
    chex.assert_trees_all_close(jax.jit(lambda x: fast(x))(x), plain(x), atol=1e-5, rtol=1e-5)
    g_fast = jax.jit(nnx.grad(_loss, argnums=(0, 1)))(fast, x)
    g_plain = nnx.grad(_loss, argnums=(0, 1))(plain, x)
    scale = float(jnp.max(jnp.abs(g_plain[0].kernel[...])))
    chex.assert_trees_all_close(g_fast[0].kernel[...], g_plain[0].kernel[...], atol=2e-6 * scale, rtol=1e-5)
    chex.assert_trees_all_close(g_fast[1], g_plain[1], atol=1e-5, rtol=1e-5)


def test_stride2_input_gradient_is_xlas():
    # Sub-pixel input gradient of a 3x3/2 conv (non-square, so rows and columns cannot be swapped).
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 5))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 5, 7))
    g = jax.random.normal(jax.random.key(2), (2, 4, 3, 7))
    want = jax.vjp(lambda xx: convs.xla_conv(xx, kernel, 2, 1), x)[1](g)[0]
    got = jax.jit(convs.conv_input_grad, static_argnums=(3, 4))(x, g, kernel, 2, 1)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    odd = jax.random.normal(jax.random.key(3), (2, 7, 6, 5))  # odd rows: XLA's own path
    chex.assert_trees_all_close(convs.conv_input_grad(odd, g, kernel, 2, 1),
                                jax.vjp(lambda xx: convs.xla_conv(xx, kernel, 2, 1), odd)[1](g)[0], atol=1e-6)


def test_channel_major_is_an_exact_transpose():
    x = jax.random.normal(jax.random.key(0), (300, 16)) * 1e3
    chex.assert_trees_all_equal(jax.jit(convs.channel_major)(x), x.T)


def test_kxk_kernel_gradient_is_xlas_bit_for_bit():
    # Same convolution as XLA's own weight gradient, only fed from the channel-major copy.
    x = jax.random.normal(jax.random.key(0), (4, 9, 9, 5))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 5, 6))
    for stride in (1, 2):
        g = jax.random.normal(jax.random.key(2), convs.xla_conv(x, kernel, stride, 1).shape)
        want = jax.jit(lambda x, g: jax.vjp(lambda k: convs.xla_conv(x, k, stride, 1), kernel)[1](g)[0])(x, g)
        got = jax.jit(lambda x, g: convs.conv_weight_grad(x, g, kernel.shape, stride, 1))(x, g)
        chex.assert_trees_all_equal(got, want)


def test_model_with_fast_formulations_matches_plain_model():
    # Whole networks: same loss and gradients. ResNet-8 (strided 3x3 convs, option-A shortcuts);
    # ResNet-18 at 64x64 (the 7x7/2 stem, the 3x3/2 max-pool with its hand-written backward,
    # projection shortcuts).
    for name, kw, size, batch in (("resnet18", {"num_classes": 10}, 64, 2), ("resnet8", {}, 32, 4)):
        fast = cpu.create_model(name, **kw)
        plain = create_model(name, **kw)
        x = jax.random.normal(jax.random.key(2), (batch, size, size, 3))
        with mock.patch.object(pooling, "max_pool_2d", wraps=pooling.max_pool_2d) as pool_spy:
            # nnx.jit: the stats updates reach the model
            (l_fast, y_fast), g_fast = nnx.jit(nnx.value_and_grad(_loss_and_logits, has_aux=True))(fast, x)
        assert pool_spy.call_count == (1 if name == "resnet18" else 0)
        (l_plain, y_plain), g_plain = nnx.jit(nnx.value_and_grad(_loss_and_logits, has_aux=True))(plain, x)
        # Tolerances scale with the logits: the loss is a sum of terms of both signs (ResNet-18's
        # sums 5.6 in magnitude to -0.034), so a relative bound on it measures cancellation, not the
        # layers (oneDNN's AVX2 kernels, machine F: logits 5.9e-6 of the largest apart, loss 4e-4 relative).
        scale = float(jnp.max(jnp.abs(y_plain)))
        chex.assert_trees_all_close(y_fast, y_plain, atol=2e-5 * scale, rtol=0)
        chex.assert_trees_all_close(l_fast, l_plain, atol=2e-5 * float(jnp.sum(jnp.abs(y_plain * jnp.cos(y_plain)))),
                                    rtol=0)
        fa, pa = nnx.state(g_fast, nnx.Param), nnx.state(g_plain, nnx.Param)
        chex.assert_trees_all_close(fa, pa, atol=2e-3, rtol=2e-3)
        # The BatchNorm running statistics the step folded in, too (PyTorch's unbiased variance).
        fs, ps = nnx.state(fast, nnx.BatchStat), nnx.state(plain, nnx.BatchStat)
        assert max(float(jnp.max(jnp.abs(m))) for m in jax.tree.leaves(ps)) > 1e-3  # they moved
        chex.assert_trees_all_close(fs, ps, atol=1e-6, rtol=1e-5)
    # ... and the fast model's BatchNorms did go through batch_norm_train (one call per layer), the plain one's not.
    bns = [m for _, m in nnx.iter_graph(fast) if isinstance(m, cpu.FastBatchNorm)]
    assert cpu.uses_fast_layers(fast) and not cpu.uses_fast_layers(plain)
    with mock.patch.object(batchnorm, "batch_norm_train", wraps=batchnorm.batch_norm_train) as spy:
        _loss(fast, x)
        assert len(bns) >= 7 and spy.call_count == len(bns)
        _loss(plain, x)
        assert spy.call_count == len(bns)


# --------------------------------------------------------------------------- the CPU fast path, end to end
def test_fast_path_gradient_is_the_same_on_8_devices_and_matches_float64():
    """The fast layers jitted as training jits them (cpu.jit: its compiler options, the native kernels
    on one device only), a well-conditioned net: 8 devices == 1 == float64.

    The ReLUs are swapped for GELU here. A ReLU net's gradient jumps wherever a pre-activation
    crosses zero, and float32 rounding moves pre-activations by ~1e-6: with this input a
    layer3 ReLU input sits 7e-6 from zero in float64 (``cpu_probes.py conditioning`` prints
    the nearest kinks), and a compile that rounds it to the other side moved the layer3
    gradients by 0.24 while being as right as float64 is. A smooth activation keeps what is
    tested (the convolutions, matmuls, BatchNorm reductions and cross-device sums) and removes
    that discontinuity (the stem's max-pool stays, with no near-ties here); measured 1.5e-5 to 4.6e-5 over four inputs, float64's own sensitivity to
    1e-6 input noise 3e-5 to 5e-5.
    """
    graph, params, stats = split_model(cpu.create_model("resnet18", num_classes=10))
    assert graph.cpu_fast_path and cpu.compiler_options() == cpu.COMPILER_OPTIONS
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)

    def loss(params, x):
        return _loss(lambda x: graph.apply(params, stats, x, train=True)[0], x)

    grad = jax.grad(loss)
    one_device, mesh = parallel.create_mesh(jax.devices()[:1]), parallel.create_mesh()
    traced = []

    def gelu(v):  # counts its uses: the swap must reach every activation the models trace
        traced.append(v.shape)
        return jax.nn.gelu(v)

    with mock.patch.object(nnx, "relu", gelu):
        one = cpu.jit(grad, mesh=one_device)(params, x)
        eight = cpu.jit(grad, mesh=mesh, in_shardings=(None, NamedSharding(mesh, P("data"))))(params, x)
        with jax.enable_x64(True):
            f64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, stats, x))
            ref = jax.jit(jax.grad(lambda p, x: _loss(lambda x: graph.apply(p, f64[1], x, train=True)[0], x)))(
                f64[0], f64[2])
            ref = jax.tree.map(np.asarray, ref)

    def rel(a, b):  # worst difference relative to each leaf's largest entry
        return max(jax.tree.leaves(jax.tree.map(lambda u, w: float(np.max(np.abs(np.asarray(u, np.float64) - w))
                                                                   / np.max(np.abs(w))), a, b)))

    # ResNet-18's 17 ReLUs per trace; the float32 and float64 gradients are traced at least once each.
    assert len(traced) >= 2 * 17 and len(traced) % 17 == 0
    assert rel(eight, jax.tree.map(lambda a: np.asarray(a, np.float64), one)) < 2e-4
    assert rel(one, ref) < 2e-4 and rel(eight, ref) < 2e-4


def test_batch_norm_train_is_the_plain_batch_norm():
    """The fast path's hand-written BatchNorm backward is the plain layer's autodiffed one, the
    statistics' cotangents included; the forward is the same arithmetic."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 5, 5, 6)) * 3 + 1, jnp.float32)
    scale, bias = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 1.0, 6)
    w, wm, wv = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (6,), (6,)))
    nnx_bn = functools.partial(batchnorm.batch_norm_train_autodiff, epsilon=1e-5)

    def loss(bn, x, scale, bias):
        y, mean, var = bn(x, scale, bias)
        return jnp.sum(jnp.sin(y) * w) + jnp.sum(mean * wm) + jnp.sum(var * wv)

    vjp_bn = batchnorm.batch_norm_train
    want = jax.grad(loss, argnums=(1, 2, 3))(nnx_bn, x, scale, bias)
    got = jax.grad(loss, argnums=(1, 2, 3))(lambda *a: vjp_bn(*a, 1e-5), x, scale, bias)
    chex.assert_trees_all_close(vjp_bn(x, scale, bias, 1e-5)[0], nnx_bn(x, scale, bias)[0], rtol=0, atol=1e-6)
    for g, ref in zip(got, want):
        chex.assert_trees_all_close(g, ref, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(ref))))


_FAULTS_SCRIPT = """
import ctypes, resource, threading
from flax_resnet import cpu
tuned = cpu.tune_host_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
def worker(n=100 << 20):  # on a thread of its own, as XLA's buffers are
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=worker)
t.start()
t.join()
print(tuned, cpu.host_allocator_tuned(), faults[1])
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
@pytest.mark.parametrize("opt_out", [False, True])
def test_tuned_host_allocator_reuses_a_freed_100mb_block(opt_out):
    """The second 100 MB block a thread allocates is the first one again (no page faults) once
    tune_host_allocator has run; with glibc's defaults (the opt-out) it is a fresh mmap, faulted in
    (25600 faults with 4 KiB pages, 50 where transparent huge pages are always on)."""
    env = {k: v for k, v in os.environ.items()
           if k != cpu.ENV_NO_MALLOC_TUNING and not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    if opt_out:
        env[cpu.ENV_NO_MALLOC_TUNING] = "1"
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tuned, reported, faults = out.stdout.split()
    assert (tuned, reported) == (("False", "False") if opt_out else ("True", "True"))
    assert (int(faults) >= 40) if opt_out else (int(faults) <= 10), out.stdout
