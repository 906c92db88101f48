"""The native CPU convolutions (flax_resnet/cpu/native): against XLA's, in the fast layers, and their fallbacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_resnet import cpu, parallel
from flax_resnet.configs import load_config
from flax_resnet.cpu import native
from flax_resnet.models import Layers
from flax_resnet.training import split_model, train_and_evaluate

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the native kernels cannot be built")


@pytest.fixture(autouse=True)
def no_onednn(monkeypatch):
    """These tests count and compare the native kernels' calls: oneDNN (tests/test_onednn.py) stays out."""
    monkeypatch.setattr(cpu.onednn, "SERVES", {})


def _lax(x, k, stride, pads):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_kernels_build_and_load():
    # With a compiler present they must build: a silent fallback would make every test below vacuous.
    status = native.status()
    assert status["available"], status["error"]
    assert status["lanes"] in (8, 16) and os.path.exists(status["library"])


def _geometries():
    v = native.lanes() or 8
    return [  # n, h, w, c, co, kh, kw, stride, pads
        (4, 9, 9, 16, 2 * v, 3, 3, 1, ((1, 1), (1, 1))),         # odd size, two vectors of outputs
        (3, 10, 7, 8, 3 * v, 3, 3, 2, ((1, 1), (1, 1))),         # stride 2, non-square, a one-vector tail
        (2, 7, 6, 32, v, 2, 1, 1, ((0, 1), (0, 0))),             # a sub-pixel kernel: 2x1, one-sided pads
        (1, 14, 14, 24, 2 * v, 3, 3, 1, ((1, 1), (1, 1))),       # batch 1: rows split across threads
        (17, 8, 8, 64, 4 * v, 3, 3, 1, ((1, 1), (1, 1))),        # 17 images in 8 gradient chunks
        (2, 11, 11, 9, v, 5, 5, 2, ((2, 2), (2, 2))),            # 5x5/2, odd channel count in
        (2, 6, 6, 8, v, 3, 3, 1, ((0, 0), (0, 0))),              # no padding
    ]


@pytest.mark.parametrize("geom", range(7))
def test_forward_and_kernel_gradient_match_xla(geom):
    n, h, w, c, co, kh, kw, stride, pads = _geometries()[geom]
    rng = np.random.default_rng(geom)
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kh, kw, c, co)), jnp.float32)
    want = _lax(x, k, stride, pads)
    got = jax.jit(lambda x, k: native.conv_forward(x, k, stride, pads))(x, k)
    assert got.shape == want.shape
    scale = float(jnp.max(jnp.abs(want)))
    chex.assert_trees_all_close(got, want, rtol=0, atol=2e-6 * scale)
    g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    dw_want = jax.vjp(lambda k: _lax(x, k, stride, pads), k)[1](g)[0]
    dw = jax.jit(lambda x, g: native.conv_wgrad(x, g, (kh, kw), stride, pads))(x, g)
    chex.assert_trees_all_close(dw, dw_want, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(dw_want))))
    # Deterministic: the same sums in the same order on every call (bit-exact resumes rely on it).
    chex.assert_trees_all_equal(jax.jit(lambda x, g: native.conv_wgrad(x, g, (kh, kw), stride, pads))(x, g), dw)


def test_kernels_reject_shapes_they_do_not_serve():
    x = jnp.ones((1, 8, 8, 16), jnp.float32)
    with pytest.raises(Exception, match="multiple of the vector width"):
        jax.block_until_ready(native.conv_forward(x, jnp.ones((3, 3, 16, native.lanes() + 1)), 1, ((1, 1), (1, 1))))
    with pytest.raises(ValueError, match="window does not fit"):  # a window larger than the padded input
        jax.block_until_ready(native.conv_forward(x[:, :1], jnp.ones((3, 3, 16, native.lanes())), 2, ((0, 1), (1, 1))))
    empty = jnp.ones((0, 8, 8, 16), jnp.float32)
    k = jnp.ones((3, 3, 16, native.lanes()), jnp.float32)
    assert native.conv_forward(empty, k, 1, ((1, 1), (1, 1))).shape == (0, 8, 8, native.lanes())
    chex.assert_trees_all_equal(native.conv_wgrad(empty, jnp.ones((0, 8, 8, native.lanes())), (3, 3), 1, ((1, 1), (1, 1))),
                                jnp.zeros_like(k))
    assert not native.supports((1, 8, 8, 3), (7, 7, 3, 64), jnp.float32)       # RGB stem: XLA's
    assert not native.supports((1, 8, 8, 16), (3, 3, 16, 16), jnp.bfloat16)    # float32 only
    assert not native.supports((1, 8, 8, 16), (3, 3, 16, 16), jnp.float32, jnp.bfloat16)  # every operand
    assert not native.supports((1, 8, 8, 512), (3, 3, 512, 512), jnp.float32)  # wide: XLA's is as fast
    assert native.supports((1, 8, 8, 256), (3, 3, 256, 256), jnp.float32)
    assert not native.supports((1, 8, 8, 128), (3, 3, 128, 128), jnp.float32, op="wgrad")
    assert native.supports((1, 8, 8, 64), (3, 3, 64, 64), jnp.float32, op="wgrad")
    assert native.supports((1, 8, 8, 16), (3, 3, 16, 16), jnp.float32)
    with native.enabled(False):
        assert not native.supports((1, 8, 8, 16), (3, 3, 16, 16), jnp.float32)
    assert native.supports((1, 8, 8, 16), (3, 3, 16, 16), jnp.float32)


def _loss(module, x):
    y = module(x).astype(jnp.float32)
    return jnp.sum(y * jnp.cos(y))


# native forward calls: the jitted forward, the forward inside the gradient, then the input gradient's
@pytest.mark.parametrize("cin,cout,stride,size,calls", [
    (16, 16, 1, 9, 3),   # the input gradient is one forward convolution with the flipped kernel
    (16, 32, 2, 8, 5),   # stride 2, even: the sub-pixel input gradient's 2x1/1x2/2x2 parts (1x1: a matmul)
    (16, 32, 2, 9, 2),   # stride 2, odd: XLA's input gradient
])
def test_model_convolutions_use_the_kernels_and_match_xla(cin, cout, stride, size, calls):
    fast = Layers(nnx.Rngs(0), **cpu.layers()).conv(cin, cout, 3, stride)
    plain = Layers(nnx.Rngs(0)).conv(cin, cout, 3, stride)
    x = jax.random.normal(jax.random.key(1), (3, size, size, cin))
    with mock.patch.object(native, "conv_forward", wraps=native.conv_forward) as fwd, \
         mock.patch.object(native, "conv_wgrad", wraps=native.conv_wgrad) as wgrad:
        y = jax.jit(lambda x: fast(x))(x)
        g_fast = jax.jit(nnx.grad(_loss, argnums=(0, 1)))(fast, x)
    assert fwd.call_count == calls and wgrad.call_count == 1
    chex.assert_trees_all_close(y, plain(x), atol=1e-5, rtol=1e-5)
    g_plain = nnx.grad(_loss, argnums=(0, 1))(plain, x)
    scale = float(jnp.max(jnp.abs(g_plain[0].kernel[...])))
    chex.assert_trees_all_close(g_fast[0].kernel[...], g_plain[0].kernel[...], atol=2e-6 * scale, rtol=1e-5)
    chex.assert_trees_all_close(g_fast[1], g_plain[1], atol=1e-5, rtol=1e-5)


def test_cpu_jit_uses_the_kernels_on_one_device_only():
    graph, params, stats = split_model(cpu.create_model("resnet8", num_classes=10))
    x = jnp.zeros((8, 32, 32, 3), jnp.float32)

    def fwd(params, x):
        return graph.apply(params, stats, x, train=False)[0]

    for devices, expect in ((jax.devices()[:1], True), (jax.devices(), len(jax.devices()) == 1)):
        hlo = cpu.jit(fwd, mesh=parallel.create_mesh(devices)).lower(params, x).as_text()
        assert ("flax_resnet_conv_forward" in hlo) == expect, len(devices)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_without_a_compiler_or_when_disabled_xla_convolutions_are_used(tmp_path):
    code = ("import warnings, jax.numpy as jnp; from flax_resnet import cpu;"
            "warnings.simplefilter('always');"
            "m = cpu.create_model('resnet8'); m.eval(); print(float(m(jnp.ones((1, 32, 32, 3))).sum()));"
            "s = cpu.native.status(); print(s['available'], s['error'])")
    broken = _python(code, CXX="false", PATH=str(tmp_path), FLAX_RESNET_NATIVE_DIR=str(tmp_path / "lib"))
    assert broken.returncode == 0, broken.stderr
    assert "False RuntimeError: no C++ compiler found" in broken.stdout
    assert "native CPU convolutions unavailable, using XLA's" in broken.stderr
    off = _python(code, FLAX_RESNET_NO_NATIVE_CONV="1")
    assert off.returncode == 0, off.stderr
    assert "False FLAX_RESNET_NO_NATIVE_CONV is set" in off.stdout
    on = _python(code)
    assert on.returncode == 0 and "True None" in on.stdout, on.stderr
    # The same logits either way (up to float rounding).
    assert float(broken.stdout.split()[0]) == pytest.approx(float(on.stdout.split()[0]), rel=1e-5)


def test_one_device_training_with_the_kernels_resumes_bit_for_bit(digits_data_dir, tmp_path):
    """The README's main job runs on one CPU device, so through the kernels: stopping at step 4 and
    resuming to 8 gives the very state of 8 straight steps (the kernels' sums are deterministic)."""
    from helpers import restore_state, train_argv

    one = parallel.create_mesh(jax.devices()[:1])

    def train(work, steps):
        argv = train_argv(work, digits_data_dir, f"--config.num_train_steps={steps}")
        with mock.patch.object(native, "conv_wgrad", wraps=native.conv_wgrad) as wgrad:
            summary = train_and_evaluate(load_config(argv[4], argv[5:]), work, mesh=one, print_fn=lambda *a: None)
        assert wgrad.call_count > 0  # the step was traced through the kernels
        assert summary.steps == steps

    train(tmp_path / "straight", 8)
    train(tmp_path / "resumed", 4)
    train(tmp_path / "resumed", 8)
    chex.assert_trees_all_equal(restore_state(tmp_path / "resumed", 8), restore_state(tmp_path / "straight", 8))


def test_a_cache_other_users_can_write_is_refused(tmp_path, monkeypatch):
    # The library is code every process runs: a directory or file writable by group/others is not trusted.
    built = native.status()["library"]
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    planted = lib_dir / os.path.basename(built)
    shutil.copy(built, planted)
    os.chmod(lib_dir, 0o777)
    monkeypatch.setenv(native.ENV_DIR, str(lib_dir))
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match=r"refusing the cached library: .*writable by group or others"):
        assert not native.available()
    os.chmod(lib_dir, 0o700)
    os.chmod(planted, 0o666)
    assert "writable by group or others" in parallel.unsafe_cache(planted)
    assert parallel.unsafe_cache(lib_dir) is None and parallel.unsafe_cache(tmp_path / "missing") is None


def test_a_library_that_fails_to_load_is_rebuilt_once(tmp_path):
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir(mode=0o700)
    damaged = lib_dir / os.path.basename(native.status()["library"])
    damaged.write_bytes(b"\x7fELF truncated")
    damaged.chmod(0o600)
    code = "from flax_resnet.cpu import native; s = native.status(); print(s['available'], s['library'])"
    out = _python(code, FLAX_RESNET_NATIVE_DIR=str(lib_dir))
    assert out.returncode == 0 and out.stdout.split() == ["True", str(damaged)], out.stderr
    assert damaged.stat().st_size > 10_000 and parallel.unsafe_cache(damaged) is None
