"""The benchmark harness (functional only, never a timing assertion), the fast convolution and
BatchNorm formulations against the plain ones, and the PyTorch reference against our model."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_resnet import benchmark, cli, native, parallel
from flax_resnet.models import blocks


# --------------------------------------------------------------------------- harness
def test_benchmark_cli_writes_json_with_the_documented_keys(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    rc = cli.main(["benchmark", "--model", "resnet8", "--batch", "8", "--steps", "2", "--repeats", "1",
                   "--warmup", "1", "--compare-torch", "--output", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed == result
    assert set(benchmark.RESULT_KEYS) <= set(result)
    assert result["model"] == "resnet8" and result["batch"] == 8 and result["image_size"] == 32
    assert result["conv_impl"] == "auto" and result["dtype"] == "float32"
    for kind in ("train", "eval"):
        assert result[kind]["images_per_sec"] > 0 and result[kind]["cpu_s_per_step"] > 0
        assert len(result[kind]["repeats_images_per_sec"]) == 1
        assert result["torch"][kind]["images_per_sec"] > 0
        assert result["ratio"][kind] > 0 and result["ratio"][f"{kind}_paired_median"] > 0
    assert result["compile_s"] > 0 and result["eval_compile_s"] > 0
    assert result["flops"]["forward_per_image"] > 0
    assert result["flops"]["train_per_image"] == pytest.approx(3 * result["flops"]["forward_per_image"])
    assert result["flops"]["train_flops_per_sec"] > 0
    assert result["memory"]["xla_peak_estimate_bytes"] > 0 and result["memory"]["host_max_rss_bytes"] > 0
    assert result["torch"]["memory_format"] == "channels_last"
    assert len(result["environment"]["load_average"]) == 3
    assert result["environment"]["native_conv"]["available"] == native.available()


def test_loop_overhead_runs_the_real_loop(digits_data_dir):
    r = benchmark.loop_overhead("resnet8", batch=16, steps=4, log_every=2, data_dir=str(digits_data_dir))
    assert set(benchmark.LOOP_KEYS) <= set(r)
    assert r["dataset"] == "digits" and r["steps"] == 4
    assert r["loop_images_per_sec"] > 0 and r["bare_images_per_sec"] > 0
    assert r["loop_over_bare"] == pytest.approx(r["loop_images_per_sec"] / r["bare_images_per_sec"])
    assert len(r["loop_interval_images_per_sec"]) == 2  # one train record per logged interval


def test_benchmark_rejects_bad_arguments(capsys):
    assert cli.main(["benchmark", "--model", "resnet5"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli.main(["benchmark", "--model", "resnet8", "--steps", "0"]) == 2


# --------------------------------------------------------------------------- formulations
def _loss(module, x):
    y = module(x).astype(jnp.float32)
    return jnp.sum(y * jnp.cos(y))  # a cotangent that is not uniform


@pytest.mark.parametrize("cin,cout,kernel,stride,size", [
    (5, 6, 3, 1, 9),    # odd size, stride 1
    (5, 6, 3, 2, 8),    # stride 2, even size: g dilated by the stride
    (5, 6, 3, 2, 9),    # stride 2, odd size: the last input row/column is never read
    (8, 12, 1, 1, 7),   # 1x1 as a matmul
    (12, 8, 1, 2, 8),   # strided 1x1: subsampled, then a matmul
    (3, 8, 7, 2, 16),   # the ImageNet stem
])
def test_fast_convolutions_match_lax(cin, cout, kernel, stride, size):
    fast = blocks.Layers(nnx.Rngs(0)).conv(cin, cout, kernel, stride)
    plain = blocks.Layers(nnx.Rngs(0), conv_impl="xla").conv(cin, cout, kernel, stride)
    assert isinstance(fast, nnx.Conv) and fast.kernel.shape == (kernel, kernel, cin, cout)
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
    want = jax.vjp(lambda xx: blocks._conv(xx, kernel, 2, 1), x)[1](g)[0]
    got = jax.jit(blocks.conv_input_grad, static_argnums=(3, 4))(x, g, kernel, 2, 1)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    odd = jax.random.normal(jax.random.key(3), (2, 7, 6, 5))  # odd rows: XLA's own path
    chex.assert_trees_all_close(blocks.conv_input_grad(odd, g, kernel, 2, 1),
                                jax.vjp(lambda xx: blocks._conv(xx, kernel, 2, 1), odd)[1](g)[0], atol=1e-6)


def test_channel_major_is_an_exact_transpose():
    x = jax.random.normal(jax.random.key(0), (300, 16)) * 1e3
    chex.assert_trees_all_equal(jax.jit(blocks.channel_major)(x), x.T)


def test_kxk_kernel_gradient_is_xlas_bit_for_bit():
    # Same convolution as XLA's own weight gradient, only fed from the channel-major copy.
    x = jax.random.normal(jax.random.key(0), (4, 9, 9, 5))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 5, 6))
    for stride in (1, 2):
        g = jax.random.normal(jax.random.key(2), blocks._conv(x, kernel, stride, 1).shape)
        want = jax.jit(lambda x, g: jax.vjp(lambda k: blocks._conv(x, k, stride, 1), kernel)[1](g)[0])(x, g)
        got = jax.jit(lambda x, g: blocks.conv_weight_grad(x, g, kernel.shape, stride, 1))(x, g)
        chex.assert_trees_all_equal(got, want)


def test_model_with_fast_formulations_matches_plain_model():
    # A whole network (strided 3x3 convs, option-A shortcuts): same loss and gradients.
    for name, kw in (("resnet8", {}),):
        fast = fr_model(name, "auto", **kw)
        plain = fr_model(name, "xla", **kw)
        size = 32
        x = jax.random.normal(jax.random.key(2), (4, size, size, 3))
        l_fast, g_fast = nnx.jit(nnx.value_and_grad(_loss))(fast, x)  # nnx.jit: the stats updates reach the model
        l_plain, g_plain = nnx.jit(nnx.value_and_grad(_loss))(plain, x)
        chex.assert_trees_all_close(l_fast, l_plain, rtol=1e-4)
        fa, pa = nnx.state(g_fast, nnx.Param), nnx.state(g_plain, nnx.Param)
        chex.assert_trees_all_close(fa, pa, atol=2e-3, rtol=2e-3)
        # The BatchNorm running statistics the step folded in, too (PyTorch's unbiased variance).
        fs, ps = nnx.state(fast, nnx.BatchStat), nnx.state(plain, nnx.BatchStat)
        assert max(float(jnp.max(jnp.abs(m))) for m in jax.tree.leaves(ps)) > 1e-3  # they moved
        chex.assert_trees_all_close(fs, ps, atol=1e-6, rtol=1e-5)
    # ... and the fast model's BatchNorms did go through batch_norm_train (one call per layer), the plain one's not.
    from unittest import mock

    bns = [m for _, m in nnx.iter_graph(fast) if isinstance(m, blocks.BatchNorm)]
    with mock.patch.object(blocks, "batch_norm_train", wraps=blocks.batch_norm_train) as spy:
        _loss(fast, x)
        assert len(bns) >= 7 and spy.call_count == len(bns)
        _loss(plain, x)
        assert spy.call_count == len(bns)


def fr_model(name, impl, **kw):
    from flax_resnet.models import create_model

    return create_model(name, conv_impl=impl, **kw)


# --------------------------------------------------------------------------- the PyTorch reference
def test_torch_reference_is_our_network():
    torch = pytest.importorskip("torch")
    from flax_resnet import torch_reference
    from flax_resnet.models import create_model
    from flax_resnet.training.state import split_model

    model = create_model("resnet8")
    _, params, stats = split_model(model)
    ref = torch_reference.create_torch_model("resnet8")
    torch_reference.load_flax_weights(ref, params, stats)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    for train in (False, True):
        model.train() if train else model.eval()
        ref.train(train)
        with torch.no_grad():
            want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        chex.assert_trees_all_close(np.asarray(model(jnp.asarray(x))), want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the CPU fast path, end to end
def test_fast_path_gradient_is_the_same_on_8_devices_and_matches_float64():
    """conv_impl="auto" (+ its compiler options), a well-conditioned net: 8 devices == 1 == float64.

    The ReLUs are swapped for GELU here. A ReLU net's gradient jumps wherever a pre-activation
    crosses zero, and float32 rounding moves pre-activations by ~1e-6: with this input a
    layer3 ReLU input sits 7e-6 from zero in float64 (``cpu_probes.py conditioning`` prints
    the nearest kinks), and a compile that rounds it to the other side moved the layer3
    gradients by 0.24 while being as right as float64 is. A smooth activation keeps what is
    tested (the convolutions, matmuls, BatchNorm reductions and cross-device sums) and removes
    that discontinuity (the stem's max-pool stays, with no near-ties here); measured 1.5e-5 to 4.6e-5 over four inputs, float64's own sensitivity to
    1e-6 input noise 3e-5 to 5e-5.
    """
    from unittest import mock

    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from flax_resnet.models import create_model
    from flax_resnet.training import steps
    from flax_resnet.training.state import split_model

    graph, params, stats = split_model(create_model("resnet18", num_classes=10, conv_impl="auto"))
    assert graph.cpu_fast_path and steps.compiler_options(graph) is not None
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)

    def loss(params, x):
        return _loss(lambda x: graph.apply(params, stats, x, train=True)[0], x)

    grad = jax.grad(loss)
    opts = steps.compiler_options(graph)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    traced = []

    def gelu(v):  # counts its uses: the swap must reach every activation the models trace
        traced.append(v.shape)
        return jax.nn.gelu(v)

    with mock.patch.object(nnx, "relu", gelu):
        one = jax.jit(grad, compiler_options=opts)(params, x)
        eight = jax.jit(grad, in_shardings=(None, NamedSharding(mesh, P("data"))), compiler_options=opts)(params, x)
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


def test_batch_norm_train_is_nnx_batch_norm():
    """The fast path's hand-written BatchNorm backward is NNX's autodiffed one, the statistics'
    cotangents included; the forward is the same arithmetic."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 5, 5, 6)) * 3 + 1, jnp.float32)
    scale, bias = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 1.0, 6)
    w, wm, wv = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (6,), (6,)))
    nnx_bn = functools.partial(blocks.batch_norm_train_autodiff, epsilon=1e-5)

    def loss(bn, x, scale, bias):
        y, mean, var = bn(x, scale, bias)
        return jnp.sum(jnp.sin(y) * w) + jnp.sum(mean * wm) + jnp.sum(var * wv)

    vjp_bn = blocks.batch_norm_train
    want = jax.grad(loss, argnums=(1, 2, 3))(nnx_bn, x, scale, bias)
    got = jax.grad(loss, argnums=(1, 2, 3))(lambda *a: vjp_bn(*a, 1e-5), x, scale, bias)
    np.testing.assert_allclose(vjp_bn(x, scale, bias, 1e-5)[0], nnx_bn(x, scale, bias)[0], rtol=0, atol=1e-6)
    for g, ref in zip(got, want):
        np.testing.assert_allclose(g, ref, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(ref))))


def test_compilation_cache_setting(tmp_path, monkeypatch):
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(parallel.ENV_NO_COMPILATION_CACHE, "1")
        assert parallel.enable_compilation_cache(tmp_path / "c") is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv(parallel.ENV_NO_COMPILATION_CACHE)
        assert parallel.enable_compilation_cache(tmp_path / "c") == str(tmp_path / "c")
        assert (tmp_path / "c").is_dir() and jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        # Already configured (JAX_COMPILATION_CACHE_DIR or jax.config): left as it is.
        assert parallel.enable_compilation_cache(tmp_path / "other") == str(tmp_path / "c")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


_FAULTS_SCRIPT = """
import ctypes, resource, threading
from flax_resnet import parallel
tuned = parallel.tune_host_allocator()
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
print(tuned, parallel.host_allocator_tuned(), faults[1])
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
@pytest.mark.parametrize("opt_out", [False, True])
def test_tuned_host_allocator_reuses_a_freed_100mb_block(opt_out):
    """The second 100 MB block a thread allocates is the first one again (no page faults) once
    tune_host_allocator has run; with glibc's defaults (the opt-out) it is a fresh mmap, faulted in
    (25600 faults with 4 KiB pages, 50 where transparent huge pages are always on)."""
    env = {k: v for k, v in os.environ.items()
           if k != parallel.ENV_NO_MALLOC_TUNING and not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    if opt_out:
        env[parallel.ENV_NO_MALLOC_TUNING] = "1"
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tuned, reported, faults = out.stdout.split()
    assert (tuned, reported) == (("False", "False") if opt_out else ("True", "True"))
    assert (int(faults) >= 40) if opt_out else (int(faults) <= 10), out.stdout
