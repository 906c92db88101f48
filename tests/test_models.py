"""Model zoo: every registered model through the same checks, exact parameter counts,
and single blocks against an independent reference written with jax.lax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_resnet as fr
from flax_resnet.models import blocks, layers, registry, summary
from flax_resnet.errors import UserError

# torchvision's parameter counts (torchvision.models.*().parameters()).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "wide_resnet50_2": 68_883_240,
    "resnext50_32x4d": 25_028_904, "wide_resnet101_2": 126_886_696,
    "resnext101_32x8d": 88_791_336,
}
# He et al. 2015, Table 6: ResNet-20 0.27M, 32 0.46M, 44 0.66M, 56 0.85M, 110 1.7M, 1202 19.4M.
PAPER_CIFAR_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6,
                      "resnet56": 0.85e6, "resnet110": 1.7e6, "resnet1202": 19.4e6}
# The exact counts (BUILD_NOTES.md): with n = (depth - 2) / 6 blocks per stage, option-A
# (parameter-free) shortcuts and 10 classes, counting conv kernels, BatchNorm scale+bias and fc,
# ResNet-20 has 432 + 32 + 14,016 + 51,072 + 203,520 + 650 = 269,722 parameters and each further
# block per stage adds 16: 4,672 + 32: 18,560 + 64: 73,984 = 97,216.
CIFAR_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
                "resnet56": 853_018, "resnet110": 1_727_962, "resnet1202": 19_421_274}

# The numerical checks compile each model, which costs seconds to minutes per network on
# 2 CPU cores. Depth does not change what they check, so each distinct architecture (every
# registry option but the per-stage depths) is checked once, at one block per stage.
def _family(name):
    spec = registry.get_spec(name)
    return spec.builder.__name__, tuple(sorted((k, v) for k, v in spec.kwargs.items() if k != "layers"))


FAMILIES = list({_family(n): n for n in reversed(fr.list_models())}.values())


def abstract_model(name, **kw):
    return nnx.eval_shape(lambda: fr.create_model(name, **kw))


@pytest.mark.parametrize("name,expected", sorted(TORCHVISION_PARAMS.items()))
def test_param_counts_equal_torchvision(name, expected):
    assert fr.count_params(abstract_model(name)) == expected


@pytest.mark.parametrize("name,expected", sorted(CIFAR_PARAMS.items()))
def test_cifar_param_counts_are_exact_and_round_to_the_papers(name, expected):
    depth = int(name[len("resnet"):])
    assert expected == 269_722 + ((depth - 2) // 6 - 3) * 97_216  # the closed form above
    unit = 1e4 if expected < 1e6 else 1e5  # the paper's last digit: 0.01M below 1M, 0.1M above
    assert abs(expected - PAPER_CIFAR_PARAMS[name]) <= unit / 2
    assert fr.count_params(abstract_model(name)) == expected


def test_plain_and_residual_have_equal_params():
    # Option A shortcuts are parameter-free: plain-n and resnet-n differ only in wiring.
    assert fr.count_params(abstract_model("plain56")) == fr.count_params(abstract_model("resnet56"))


def test_registry_lists_issue_names():
    names = set(fr.list_models())
    required = {f"resnet{d}" for d in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110, 1202)}
    required |= {f"plain{d}" for d in (20, 32, 44, 56, 110)}
    required |= {f"preact_resnet{d}" for d in (18, 34, 50, 101, 152, 110, 164)}
    required |= {"wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d",
                 "resnext101_32x8d", "article_resnet", "article_resnet_widened"}
    assert required <= names


def test_unknown_model_is_a_user_error_with_suggestion():
    with pytest.raises(UserError, match=r"unknown model 'resnet5'.*did you mean.*resnet50.*flax-resnet models"):
        fr.create_model("resnet5")


def test_torchvision_attribute_names():
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract_model("resnet50")))}
    for key in ["conv1/kernel", "bn1/scale", "bn1/mean", "layer1/0/conv3/kernel",
                "layer1/0/downsample/0/kernel", "layer1/0/downsample/1/var",
                "layer4/2/bn3/bias", "fc/kernel", "fc/bias"]:
        assert key in paths, key


@pytest.mark.parametrize("name", fr.list_models())
def test_every_model_shapes(name):
    """Every registered model, abstractly: logits and feature shapes at a small input."""
    spec = registry.get_spec(name)
    model = abstract_model(name, num_classes=7)
    size = 32 if spec.input_size == 32 else 64
    graphdef, state = nnx.split(model)

    def run(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        feats = m.forward_features(x)
        return m.forward_head(feats), feats

    logits, feats = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    assert logits.shape == (2, 7)
    assert feats.shape[0] == 2 and feats.shape[-1] == model.num_features


def _train_forward(graphdef, params, stats, x):
    def loss_fn(params):
        m = nnx.merge(graphdef, params, stats, copy=True)
        m.train()
        logits = m(x)
        return jnp.mean(logits ** 2), (logits, nnx.state(m, nnx.BatchStat))

    (_, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return logits, new_stats, grads


def _kind(spec):
    return spec.builder, spec.kwargs.get("block"), spec.kwargs.get("stem")


def test_families_cover_every_block_and_stem():
    kinds = {_kind(registry.get_spec(n)) for n in FAMILIES}
    assert len(FAMILIES) >= 10 and len(kinds) == len({_kind(s) for s in map(registry.get_spec, fr.list_models())})
    assert "article_resnet" in FAMILIES and "article_resnet_widened" in FAMILIES


@pytest.mark.parametrize("name", FAMILIES)
def test_every_architecture_numerics(name):
    """Finite logits, jit == eager, BN stats move only in train mode, gradients reach conv1."""
    spec = registry.get_spec(name)
    # One block per stage; the article's network (no stages) as it is.
    shallow = {"layers": (1,) * len(spec.kwargs["layers"])} if "layers" in spec.kwargs else {}
    model = fr.create_model(name, num_classes=5, seed=1, **shallow)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))   # ImageNet nets end at 1x1
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    logits, new_stats, grads = jax.jit(_train_forward, static_argnums=0)(graphdef, params, stats, x)
    chex.assert_shape(logits, (2, 5))
    chex.assert_tree_all_finite((logits, new_stats, grads))
    assert float(jnp.abs(grads["conv1"]["kernel"][...]).sum()) > 0, "no gradient at the first conv"
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats, new_stats)
    assert all(jax.tree.leaves(moved)), "train mode must update every running statistic"

    model.eval()
    eval_graphdef, eval_state = nnx.split(model)   # the mode is part of the graphdef

    @jax.jit
    def jit_eval(state, x):
        m = nnx.merge(eval_graphdef, state)
        return m(x), nnx.state(m, nnx.BatchStat)

    jit_logits, after = jit_eval(eval_state, x)
    eager_logits = model(x)
    chex.assert_trees_all_close(jit_logits, eager_logits, atol=2e-4, rtol=2e-4)
    chex.assert_trees_all_equal(after, stats)  # eval mode leaves the statistics alone


def test_bfloat16_compute_float32_params():
    model = fr.create_model("resnet8", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}
    model.eval()
    assert model(jnp.ones((1, 32, 32, 3))).dtype == jnp.bfloat16


def test_zero_init_residual_zeroes_last_bn():
    model = abstract_model("resnet50", zero_init_residual=True)
    m = fr.create_model("resnet18", zero_init_residual=True)
    assert float(jnp.abs(m.layer1[0].bn2.scale[...]).sum()) == 0.0
    assert float(jnp.abs(m.layer1[0].bn1.scale[...]).sum()) > 0
    assert model.layer1[0].bn3.scale.shape == (256,)


def test_head_swap_and_feature_split():
    model = fr.create_model("resnet8", num_classes=10)
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    # forward_features is the stem and stages, unpooled (computed here block by block) ...
    y = nnx.relu(model.bn1(model.conv1(x)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            y = block(y)
    feats = model.forward_features(x)
    assert feats.shape == (2, 8, 8, 64)
    chex.assert_trees_all_close(feats, y, atol=1e-6)
    # ... and forward_head the global average pool and fc, as model(x) ends (here in NumPy).
    pooled = np.asarray(y, np.float64).mean(axis=(1, 2))
    logits = pooled @ np.asarray(model.fc.kernel[...], np.float64) + np.asarray(model.fc.bias[...], np.float64)
    np.testing.assert_allclose(model.forward_head(feats, pre_logits=True), pooled, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.forward_head(feats), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model(x), logits, rtol=1e-5, atol=1e-5)
    before = model.layer3[0].conv2.kernel[...]
    model.reset_classifier(3, rngs=nnx.Rngs(5))
    assert model(x).shape == (2, 3)
    assert model.fc.kernel.shape == (64, 3)
    chex.assert_trees_all_equal(model.layer3[0].conv2.kernel[...], before)
    feats, inter = model.forward_features(x, return_intermediates=True)
    assert [k for k in inter] == ["stem", "layer1", "layer2", "layer3"]
    assert inter["layer2"].shape == (2, 16, 16, 32)


def test_batchnorm_matches_pytorch_conventions():
    bn = fr.create_model("resnet8").bn1
    assert bn.momentum == pytest.approx(0.9) and bn.epsilon == pytest.approx(1e-5)


# ---------------------------------------------------------------- independent reference

def _ref_conv(x, w, stride, pad, groups=1):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)


def _ref_bn_train(x, scale, bias, eps=1e-5):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias), mean, var


def _randomise_bn(block, key):
    """Give every BatchNorm non-trivial scale/bias so the reference test can fail."""
    for path, bn in nnx.iter_graph(block):
        if isinstance(bn, nnx.BatchNorm):
            key, k1, k2 = jax.random.split(key, 3)
            bn.scale[...] = jax.random.uniform(k1, bn.scale.shape, minval=0.5, maxval=1.5)
            bn.bias[...] = jax.random.normal(k2, bn.bias.shape) * 0.1


def _relu(x):
    return np.maximum(x, 0)


def test_basic_block_matches_reference():
    make = layers.Layers(nnx.Rngs(0))
    block = blocks.BasicBlock(8, 16, 2, make=make, shortcut="B")
    _randomise_bn(block, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (4, 9, 9, 8))   # odd size: padding must be symmetric
    got = block(x)

    def conv_bn(mod_conv, mod_bn, h, stride, pad):
        y = _ref_conv(h, mod_conv.kernel[...], stride, pad)
        return _ref_bn_train(y, mod_bn.scale[...], mod_bn.bias[...])

    h, m1, v1 = conv_bn(block.conv1, block.bn1, x, 2, 1)
    h, _, _ = conv_bn(block.conv2, block.bn2, jnp.asarray(_relu(h), jnp.float32), 1, 1)
    s, _, _ = conv_bn(block.downsample[0], block.downsample[1], x, 2, 0)
    want = _relu(h + s)
    assert got.shape == (4, 5, 5, 16)
    chex.assert_trees_all_close(np.asarray(got), want.astype(np.float32), atol=1e-4, rtol=1e-4)
    # Running statistics: new = 0.9 * old + 0.1 * batch (PyTorch momentum 0.1, unbiased var).
    n = 4 * 5 * 5
    chex.assert_trees_all_close(block.bn1.mean[...], (0.1 * m1).astype(np.float32), atol=1e-5)
    chex.assert_trees_all_close(block.bn1.var[...], (0.9 + 0.1 * v1 * n / (n - 1)).astype(np.float32),
                                atol=1e-4)


def test_bottleneck_block_matches_reference():
    make = layers.Layers(nnx.Rngs(0))
    block = blocks.Bottleneck(16, 8, 2, make=make, groups=2, base_width=32)  # width 8, out 32
    _randomise_bn(block, jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 16))
    got = block(x)

    def conv_bn(c, b, h, stride, pad, groups=1):
        return _ref_bn_train(_ref_conv(h, c.kernel[...], stride, pad, groups), b.scale[...], b.bias[...])[0]

    f32 = lambda a: jnp.asarray(a, jnp.float32)
    h = _relu(conv_bn(block.conv1, block.bn1, x, 1, 0))
    h = _relu(conv_bn(block.conv2, block.bn2, f32(h), 2, 1, groups=2))   # v1.5: stride on the 3x3
    h = conv_bn(block.conv3, block.bn3, f32(h), 1, 0)
    s = conv_bn(block.downsample[0], block.downsample[1], x, 2, 0)
    chex.assert_shape(got, (2, 4, 4, 32))
    chex.assert_trees_all_close(np.asarray(got), _relu(h + s).astype(np.float32), atol=1e-4, rtol=1e-4)


def test_option_a_shortcut_is_strided_zero_padded_identity():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = layers.pad_identity(x, 7, 2)
    chex.assert_shape(y, (2, 2, 2, 7))
    chex.assert_trees_all_equal(y[..., 2:5], x[:, ::2, ::2, :])
    assert float(jnp.abs(y[..., :2]).sum() + jnp.abs(y[..., 5:]).sum()) == 0.0
    assert registry.get_spec("resnet20").kwargs["shortcut"] == "A"
    assert fr.create_model("resnet20").layer2[0].downsample is None


# ---------------------------------------------------------------- FLOPs, derivatives, export, layer classes
def test_forward_flops_are_counted_from_the_layers_shapes():
    # ResNet-8 at 32x32 by hand: 2 x multiply-adds of every conv (full padded window) and the head.
    macs = (32 * 32 * 16 * 3 * 9                              # stem 3x3, 3 -> 16
            + 2 * 32 * 32 * 16 * 16 * 9                       # layer1: two 3x3 16 -> 16
            + 16 * 16 * 32 * 16 * 9 + 16 * 16 * 32 * 32 * 9   # layer2: 3x3/2 16 -> 32, 3x3 32 -> 32
            + 8 * 8 * 64 * 32 * 9 + 8 * 8 * 64 * 64 * 9       # layer3
            + 64 * 10)                                        # fc
    assert summary.forward_flops("resnet8") == 2 * macs
    # The published figures (torchvision: 4.09 GMACs for ResNet-50; He et al. 2015: ~41M for ResNet-20).
    assert summary.forward_flops("resnet50") / 1e9 == pytest.approx(8.18, abs=0.005)
    assert summary.forward_flops("resnet20") / 1e9 == pytest.approx(0.081, abs=0.0005)
    assert summary.forward_flops("resnet8", 64) == pytest.approx(4 * summary.forward_flops("resnet8"), rel=1e-4)


def _functional(model):
    graph, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    def loss(params, x):
        y = nnx.merge(graph, params, stats)(x)
        return jnp.sum(jnp.sin(y))

    return loss, params


def test_create_model_supports_every_derivative_and_export():
    """The plain model on this backend: grad, jvp, a Hessian-vector product, a gradient of a gradient
    (train-mode BatchNorm included), and jax.export with a symbolic batch size (eval mode)."""
    model = fr.create_model("resnet8", num_classes=3)
    loss, params = _functional(model)
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
    g = jax.grad(loss)(params, x)
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape), params)
    # jvp along v equals <grad, v>; the HVP by forward-over-reverse equals reverse-over-reverse.
    _, tangent = jax.jvp(lambda p: loss(p, x), (params,), (v,))
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    chex.assert_trees_all_close(tangent, dot, rtol=1e-4)
    hvp_fwd = jax.jvp(lambda p: jax.grad(loss)(p, x), (params,), (v,))[1]
    hvp_rev = jax.grad(lambda p: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(jax.grad(loss)(p, x)),
                                                                       jax.tree.leaves(v))))(params)
    chex.assert_trees_all_close(hvp_fwd, hvp_rev, rtol=2e-3, atol=2e-4)
    gradgrad = jax.grad(lambda x: jnp.sum(jnp.square(jax.grad(loss, argnums=1)(params, x))))(x)
    assert gradgrad.shape == x.shape and float(jnp.max(jnp.abs(gradgrad))) > 0
    model.eval()
    graph, state = nnx.split(model)
    state = nnx.to_pure_dict(state)
    fn = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
    batch = jax.export.symbolic_shape("b")[0]
    exported = jax.export.export(fn)(state, jax.ShapeDtypeStruct((batch, 12, 12, 3), jnp.float32))
    assert "flax_resnet_conv" not in exported.mlir_module()  # none of the CPU backend's custom calls
    for n in (1, 5):
        xs = jax.random.normal(jax.random.key(n), (n, 12, 12, 3))
        chex.assert_trees_all_close(exported.call(state, xs), fn(state, xs), atol=1e-5)


def test_layer_classes_are_injected_through_the_factory():
    class TaggedConv(nnx.Conv):
        pass

    class TaggedNorm(layers.BatchNorm):
        pass

    plain = fr.create_model("resnet8")
    tagged = fr.create_model("resnet8", conv=TaggedConv, norm=TaggedNorm)
    convs = [m for _, m in nnx.iter_graph(tagged) if isinstance(m, nnx.Conv)]
    norms = [m for _, m in nnx.iter_graph(tagged) if isinstance(m, nnx.BatchNorm)]
    assert len(convs) == 7 and all(type(m) is TaggedConv for m in convs)
    assert len(norms) == 7 and all(type(m) is TaggedNorm for m in norms)
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(tagged)), nnx.to_pure_dict(nnx.state(plain)))
