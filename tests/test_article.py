"""``article_resnet``: the article's network as written, against a PyTorch transcription of its
code (``tests/article_torch.py``), in both directions of weight transfer, with fine-tuning's groups.

Weights, BatchNorm affine parameters and running statistics are seeded random values, so a
wrong key, transpose, pool padding or biased/unbiased variance mix-up fails the tests.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
from article_torch import ResNet as TorchResNet  # noqa: E402

from flax_resnet import cpu, pretrained  # noqa: E402
from flax_resnet.configs import default  # noqa: E402
from flax_resnet.convert import convert  # noqa: E402
from flax_resnet.errors import UserError  # noqa: E402
from flax_resnet.models import ArticleResNet, count_params, create_model, get_spec, summary  # noqa: E402
from flax_resnet.training import optimizer  # noqa: E402

torch.set_num_threads(2)
TOL = dict(atol=1e-5, rtol=1e-5)


def torch_article(seed: int = 0, num_classes: int = 10) -> TorchResNet:
    """The article's model with seeded weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TorchResNet(9, num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        model.fc.weight.mul_(10.0)  # logits of order 1, so the tolerance means something
    return model


def inputs(seed: int = 1, n: int = 4):
    x = np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def torch_logits(model, x, *, train: bool = False) -> np.ndarray:
    model.train(train)
    with torch.no_grad():
        return model(x).numpy()


@pytest.fixture(scope="module")
def article_pth(tmp_path_factory):
    """A .pth of the article's state dict, saved the way its users save it."""
    path = tmp_path_factory.mktemp("article") / "article.pth"
    torch.save(torch_article().state_dict(), path)
    return path


# --------------------------------------------------------------------------- the network
def test_parameter_counts_are_the_articles():
    stem, conv, bn = 64 * 3 * 49 + 64, 64 * 64 * 9 + 64, 2 * 64
    for classes, want in ((10, 677_002), (1000, 741_352)):
        model = nnx.eval_shape(lambda: create_model("article_resnet", num_classes=classes))
        assert count_params(model) == want == stem + 18 * conv + 17 * bn + 64 * classes + classes
    spec = get_spec("article_resnet")
    assert spec.builder is ArticleResNet and spec.kwargs == {"num_blocks": 9}
    assert (spec.input_size, spec.num_classes) == (32, 10)
    assert count_params(nnx.eval_shape(lambda: create_model("article_resnet_widened"))) > 4_000_000


def test_feature_maps_collapse_to_one_pixel_from_block_four():
    model = nnx.eval_shape(lambda: create_model("article_resnet"))
    assert (model.num_features, model.num_classes, len(model.stages())) == (64, 10, 9)
    graphdef, state = nnx.split(model)
    feats, inter = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).forward_features(x, return_intermediates=True),
                                  state, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    sizes = {k: v.shape[1:] for k, v in inter.items()}
    assert sizes["stem"] == sizes["layer1"] == (8, 8, 64)
    assert (sizes["layer2"], sizes["layer3"]) == ((4, 4, 64), (2, 2, 64))
    assert all(sizes[f"layer{i}"] == (1, 1, 64) for i in range(4, 10)) and feats.shape == (2, 1, 1, 64)
    # The last block has no max-pool and no pooled BatchNorm.
    assert model.layer8.pool_bn is not None and model.layer9.pool_bn is None
    # FLOPs by hand (2 x multiply-adds): stem at 16x16; blocks 1-2 at 8x8, 3 at 4x4, 4 at 2x2, 5-9 at 1x1.
    macs = 16 * 16 * 64 * 3 * 49 + 2 * 64 * 64 * 9 * (64 + 64 + 16 + 4 + 5) + 64 * 10
    assert summary.forward_flops("article_resnet") == 2 * macs
    assert "article_resnet_widened" in summary.format_model_table("article", with_flops=False)


def test_head_split_and_reset_classifier():
    model = create_model("article_resnet", seed=2)
    model.eval()
    x = jnp.asarray(inputs()[0])
    feats = model.forward_features(x)
    chex.assert_trees_all_close(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (4, 64)
    before = model.layer9.conv2.kernel[...]
    model.reset_classifier(3, rngs=nnx.Rngs(1))
    assert model(x).shape == (4, 3) and model.num_classes == 3
    chex.assert_trees_all_equal(model.layer9.conv2.kernel[...], before)
    # PyTorch's default initialisation: uniform in +-1/sqrt(fan_in), biases included.
    bound = 1 / np.sqrt(64 * 9)
    for leaf in (model.layer1.conv1.kernel[...], model.layer1.conv1.bias[...]):
        assert bound * 0.9 < float(jnp.max(jnp.abs(leaf))) <= bound


# --------------------------------------------------------------------------- PyTorch parity
def test_articles_weights_load_and_logits_match_in_eval_and_train(article_pth):
    ref = torch_article()
    x, xt = inputs()
    model = create_model("article_resnet", seed=5)
    report = pretrained.load_pretrained(model, article_pth)
    assert report.head == "loaded" and report.tensors == 2 + 9 * 4 + 17 * 4 + 2
    model.eval()
    chex.assert_trees_all_close(np.asarray(model(jnp.asarray(x))), torch_logits(ref, xt), **TOL)

    # Train mode: batch statistics, and running statistics updated with PyTorch's unbiased variance.
    model.train()
    chex.assert_trees_all_close(np.asarray(model(jnp.asarray(x))), torch_logits(ref, xt, train=True), **TOL)
    ours, theirs = pretrained.model_state_dict(model), ref.state_dict()
    stats = [k for k in theirs if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 34
    for k in stats:
        chex.assert_trees_all_close(ours[k], theirs[k].numpy(), **TOL, custom_message=k)


def test_our_weights_export_to_the_articles_code(tmp_path, article_pth):
    model = create_model("article_resnet", seed=7)
    rng = np.random.default_rng(3)
    for _, bn in nnx.iter_graph(model):
        if isinstance(bn, nnx.BatchNorm):
            bn.mean[...] = jnp.asarray(rng.normal(0, 0.2, 64), jnp.float32)
            bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, 64), jnp.float32)
    sd = pretrained.export_safetensors(model, tmp_path / "ours.safetensors")
    ref = TorchResNet(9, 10)
    assert set(sd) == set(ref.state_dict())
    chex.assert_trees_all_equal(sd["layers.53.weight"], sd["fc.weight"])
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in
                         pretrained.read_state_dict(tmp_path / "ours.safetensors").items()}, strict=True)
    x, xt = inputs(2)
    model.eval()
    chex.assert_trees_all_close(np.asarray(model(jnp.asarray(x))), torch_logits(ref, xt), **TOL)

    # A run's (params, batch_stats) with the class (what `convert RUN_DIR` writes), and `convert FILE`.
    _, params, stats = pretrained.split_state(model)
    pair = pretrained.export_safetensors((params, stats), tmp_path / "pair.safetensors", model_cls=ArticleResNet)
    assert set(pair) == set(sd)
    line = convert(article_pth, tmp_path / "converted.safetensors", model="article_resnet")
    assert "article_resnet" in line
    back = TorchResNet(9, 10)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in
                          pretrained.read_state_dict(tmp_path / "converted.safetensors").items()}, strict=True)
    chex.assert_trees_all_close(torch_logits(back, xt), torch_logits(torch_article(), xt), atol=0, rtol=0)


def test_a_duplicate_classifier_that_differs_is_a_one_line_user_error(tmp_path):
    sd = torch_article().state_dict()
    sd["layers.53.weight"] = sd["layers.53.weight"] + 1.0  # breaks the tie to fc.weight
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"'layers\.53\.weight' differs from 'fc\.weight'") as err:
        pretrained.load_pretrained(create_model("article_resnet"), path)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"layers\.53\.weight"):
        convert(path, tmp_path / "out.safetensors", model="article_resnet")
    # torchvision's layout stays torchvision's: a resnet's weights do not fit the article's network.
    _, params, stats = pretrained.split_state(nnx.eval_shape(lambda: create_model("article_resnet")))
    with pytest.raises(UserError, match=r"unexpected key 'bn1\.weight'.*article's PyTorch ResNet"):
        pretrained.from_torch_state_dict({"bn1.weight": np.ones(64, np.float32)}, params, stats,
                                         model_cls=ArticleResNet)


# --------------------------------------------------------------------------- fine-tuning, CPU backend
def _config(**kw):
    c = default.get_config()
    c.model = "article_resnet"
    c.weight_decay, c.momentum = 0.1, 0.9
    c.update(kw)
    return c


def test_backbone_groups_and_a_frozen_backbone():
    assert optimizer.backbone_groups(_config()) == [f"layer{i}" for i in range(9, 0, -1)] + ["stem"]
    assert optimizer.backbone_groups(_config(model_kwargs={"num_blocks": 3})) == ["layer3", "layer2", "layer1",
                                                                                 "stem"]
    assert optimizer.backbone_groups(_config(model="article_resnet_widened"))[0] == "layer4"
    _, params, _ = pretrained.split_state(create_model("article_resnet", seed=1))
    starts = optimizer.group_starts(_config(unfreeze_epochs=(1, 2)), optimizer.backbone_groups(_config()), 2)
    labels = optimizer.param_labels(params, starts)
    assert labels["layer9"]["conv1"]["kernel"] == "layer9" and "pool_bn" not in labels["layer9"]
    assert labels["layer8"]["pool_bn"]["scale"] == "layer8" and labels["layer1"]["bn"]["bias"] == "frozen"
    assert labels["conv1"]["kernel"] == "frozen" and labels["fc"]["kernel"] == "head"

    tx = optimizer.create_optimizer(_config(freeze_backbone=True), optax.constant_schedule(0.1))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    after = optax.apply_updates(params, updates)
    for key in params:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[key]), jax.tree.leaves(params[key])))
        assert same == (key != "fc"), key


def test_cpu_backend_gives_the_plain_models_logits():
    plain, fast = create_model("article_resnet", seed=4), cpu.create_model("article_resnet", seed=4)
    assert cpu.uses_fast_layers(fast) and not cpu.uses_fast_layers(plain)
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(plain)), nnx.to_pure_dict(nnx.state(fast)))
    plain.eval()
    fast.eval()
    x = jnp.asarray(inputs(3)[0])
    chex.assert_trees_all_close(np.asarray(fast(x)), np.asarray(plain(x)), **TOL)
