"""The fused eval forward (flax_resnet/cpu/inference.py): oneDNN's convolution with bias, residual and
ReLU post-ops against XLA's, the fused graph's logits against the model's own, and the trainer's
eval step against the unfused one. The oneDNN tests are skipped where it is not installed (CI);
the fallback (the same fused graph on the CPU backend's convolutions) is tested everywhere."""

from __future__ import annotations

import dataclasses
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_resnet import cpu, parallel
from flax_resnet.cpu import inference, library, onednn
from flax_resnet.models import graph as graph_lib
from flax_resnet.training import split_model, steps
from flax_resnet.training.state import TrainState

needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason=f"oneDNN not usable here: {onednn.status()['error']}")
TARGET = "flax_resnet_onednn_forward"

GEOMETRIES = [  # n, h, w, c, co, kh, kw, stride, pads
    (4, 9, 9, 16, 32, 3, 3, 1, ((1, 1), (1, 1))),       # 3x3, odd size
    (3, 10, 8, 8, 24, 3, 3, 2, ((1, 1), (1, 1))),       # 3x3 stride 2, non-square
    (2, 7, 6, 32, 16, 1, 1, 1, ((0, 0), (0, 0))),       # 1x1
    (2, 9, 9, 24, 40, 1, 1, 2, ((0, 0), (0, 0))),       # 1x1 stride 2 (a projection shortcut)
    (2, 11, 11, 3, 16, 7, 7, 2, ((3, 3), (3, 3))),      # the 7x7 RGB stem
]
DTYPES = {"float32": (jnp.float32, 2e-6), "bfloat16": (jnp.bfloat16, 1e-2)}  # atol per max |reference|


def _operands(geom, dtype, seed=0):
    n, h, w, c, co, kh, kw, stride, pads = geom
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), dtype)
    k = jnp.asarray(rng.normal(size=(kh, kw, c, co)) / np.sqrt(kh * kw * c), dtype)
    b = jnp.asarray(rng.normal(size=(co,)), jnp.float32)
    oh, ow = (h + sum(pads[0]) - kh) // stride + 1, (w + sum(pads[1]) - kw) // stride + 1
    r = jnp.asarray(rng.normal(size=(n, oh, ow, co)), dtype)
    return x, k, b, r


def _reference(x, k, b, r, stride, pads, relu):
    """XLA's convolution in float32 at full precision, then the elementwise ops."""
    y = jax.lax.conv_general_dilated(x.astype(jnp.float32), k.astype(jnp.float32), (stride, stride), pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest") + b
    y = y + r.astype(jnp.float32) if r is not None else y
    return jax.nn.relu(y) if relu else y


def _check_fused_conv(geom, dtype_name):
    dtype, tol = DTYPES[dtype_name]
    *_, stride, pads = geom
    x, k, b, r = _operands(geom, dtype)
    for residual, relu in ((None, False), (None, True), (r, False), (r, True)):
        fn = jax.jit(lambda x, k, b, r, relu=relu: inference.conv(x, k, b, stride, pads, r, relu))
        got = fn(x, k, b, residual)
        want = _reference(x, k, b, residual, stride, pads, relu)
        assert got.dtype == dtype and got.shape == want.shape
        chex.assert_trees_all_close(got.astype(jnp.float32), want, rtol=0,
                                    atol=tol * float(jnp.max(jnp.abs(want))))
    return fn.lower(x, k, b, r).as_text()


@needs_onednn
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("geom", range(len(GEOMETRIES)))
def test_onednn_post_ops_match_xla(geom, dtype_name):
    hlo = _check_fused_conv(GEOMETRIES[geom], dtype_name)
    if dtype_name == "bfloat16" and not onednn.status()["bfloat16"]:  # oneDNN 2.x below AVX-512: XLA's conv
        assert TARGET not in hlo
    else:
        assert TARGET in hlo and "relu = true" in hlo and "sum = true" in hlo


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("geom", range(len(GEOMETRIES)))
def test_the_fallback_without_onednn_matches_xla(geom, dtype_name):
    with mock.patch.object(onednn, "SERVES", {}):
        assert TARGET not in _check_fused_conv(GEOMETRIES[geom], dtype_name)


@needs_onednn
def test_a_residual_still_needed_after_the_call_is_copied_not_overwritten():
    x, k, b, r = _operands(GEOMETRIES[0], jnp.float32)
    pads = GEOMETRIES[0][-1]
    y, r_after = jax.jit(lambda x, k, b, r: (onednn.conv_forward(x, k, 1, pads, bias=b, residual=r), r * 1))(x, k, b, r)
    chex.assert_trees_all_equal(r_after, r)
    chex.assert_trees_all_close(y, _reference(x, k, b, r, 1, pads, False), rtol=0, atol=2e-6 * float(jnp.max(y)))


def _model(name, seed=0):
    """A model with the CPU backend's layers, in eval mode, with random parameters and BatchNorm statistics
    (so that folding matters), filled in from numpy: far quicker than the initialisers op by op."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cpu.create_model(name, num_classes=10)))
    rng = np.random.default_rng(seed)

    def fill(path, v):
        shape, key = v.shape, [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if key == "var":
            value = rng.uniform(0.5, 2.0, size=shape)
        elif key == "scale":
            value = rng.uniform(0.5, 1.5, size=shape)
        elif len(shape) > 1:  # kernels: unit-variance outputs
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        else:  # biases, BatchNorm means and shifts
            value = rng.normal(size=shape) * 0.2
        return jnp.asarray(value, v.dtype)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
    model.eval()
    return model


def test_fuse_merges_every_conv_add_relu_chain():
    graph = graph_lib.trace(_model("resnet20"))
    fused = inference.fuse(graph)
    assert graph.count("conv") == fused.count("fused_conv") == 19 and fused.count("conv") == 0
    assert fused.count("add") == fused.count("relu") == 0
    with_residual = [op for op in fused.ops if op.kind == "fused_conv" and len(op.inputs) == 2]
    assert len(with_residual) == 9 and all(op.attrs["relu"] for op in with_residual)
    # Every input exists before its op runs (a fused op takes its chain's last place).
    seen = {graph_lib.INPUT}
    for op in fused.ops:
        assert set(op.inputs) <= seen
        seen.add(op.output)


MODELS = [("resnet20", 32), ("resnet50", 64), ("article_resnet", 32), ("preact_resnet18", 32)]


@pytest.mark.parametrize("onednn_on", [True, False], ids=["onednn", "fallback"])
@pytest.mark.parametrize("name,size", MODELS)
def test_fused_logits_match_the_models_own(name, size, onednn_on):
    if onednn_on and not onednn.available():
        pytest.skip("oneDNN not usable here")
    model = _model(name)
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    want = jax.jit(lambda m, x: m(x))(model, x)
    with mock.patch.object(onednn, "SERVES", onednn.SERVES if onednn_on else {}):
        fused = jax.jit(lambda m, x: inference.run(inference.trace(m), x))
        assert (TARGET in fused.lower(model, x).as_text()) == onednn_on
        got = fused(model, x)
    chex.assert_trees_all_close(got, want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_no_fused_graph_on_several_devices_or_for_an_unknown_model():
    model = _model("resnet8")
    with library.enabled(False):
        assert inference.trace(model) is None
    assert inference.trace(nnx.Linear(2, 3, rngs=nnx.Rngs(0))) is None
    assert inference.trace(model) is not None


def _eval_state(name):
    graph, params, stats = split_model(_model(name))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=(),
                       rng=jax.random.PRNGKey(0))
    return graph, state


def test_the_eval_step_runs_fused_with_the_unfused_sums():
    graph, state = _eval_state("resnet8")
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (16, 32, 32, 3)), jnp.uint8),
             "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
             "mask": jnp.asarray(np.arange(16) < 13, jnp.float32)}
    one = parallel.create_mesh(jax.devices()[:1])
    fused = steps.jit_eval_step(one, graph=graph, num_classes=10)
    unfused = steps.jit_eval_step(one, graph=dataclasses.replace(graph, cpu_fast_path=False), num_classes=10)
    if onednn.available():
        assert TARGET in fused.lower(state, batch).as_text()
    a, b = fused(state, batch), unfused(state, batch)
    assert set(a) == set(b) and float(a["count"]) == 13
    chex.assert_trees_all_close(a["loss"], b["loss"], rtol=1e-5)
    chex.assert_trees_all_equal(a["correct"], b["correct"])
    chex.assert_trees_all_equal(a["correct5"], b["correct5"])
    probs = steps.jit_predict_step(one, graph=graph)(state, batch["image"].astype(jnp.float32) / 255)
    chex.assert_trees_all_close(probs.sum(-1), jnp.ones(16), atol=1e-5)
