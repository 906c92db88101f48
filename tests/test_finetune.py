"""Fine-tuning: per-group optimiser (frozen params bit for bit, lr factor, gradual unfreezing),
and ``flax-resnet finetune`` end to end on a generated image folder, from converted weights."""

from __future__ import annotations

import chex
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import random_weights, restore_state, run_cli

from flax_resnet import data, pretrained
from flax_resnet.configs import default, get_config
from flax_resnet.errors import UserError
from flax_resnet.models import create_model
from flax_resnet.training import optimizer
from flax_resnet.training.optimizer import create_optimizer
from flax_resnet.training.state import create_model as create_train_model
from flax_resnet.training.state import split_model


def _config(**kw) -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model = "resnet8"
    c.weight_decay, c.momentum, c.nesterov = 0.1, 0.9, True
    c.update(kw)
    return c


def _model(num_classes: int = 3):
    """resnet8 with seeded random weights, made without its eager initialisers (slow to compile)."""
    abstract = nnx.eval_shape(lambda: create_model("resnet8", num_classes=num_classes))
    graphdef, params, stats = pretrained.split_state(abstract)
    params, stats = random_weights(params, stats, bias_std=0.1)
    return nnx.merge(graphdef, params, stats)


def _params():
    """A small tree with resnet8's top-level layout (stem, layer1..3, fc) and two leaf shapes:
    the optimiser's groups depend only on the top-level names, and few shapes compile fast."""
    rng = np.random.default_rng(0)

    def module(kind):
        if kind == "bn":
            return {"scale": jnp.asarray(rng.normal(size=4), jnp.float32), "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}
        return {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}

    block = lambda: {"conv1": module("conv"), "bn1": module("bn"), "conv2": module("conv"), "bn2": module("bn")}  # noqa: E731
    return {"conv1": module("conv"), "bn1": module("bn"), "layer1": {0: block()}, "layer2": {0: block()},
            "layer3": {0: block()}, "fc": {**module("conv"), "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}}


def _grads(params, i: int):
    return jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(i), p.shape), params)


def _run(tx, params, steps: int):
    """``steps`` updates with random gradients (eagerly: op compilations are shared between
    optimisers, where a jit per optimiser would compile each); returns the params after each."""
    state, out = tx.init(params), []
    for i in range(steps):
        updates, state = tx.update(_grads(params, i), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --------------------------------------------------------------------------- optimiser
@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb"])
def test_frozen_backbone_gets_exactly_zero_update_despite_decay_and_momentum(name):
    params = _params()
    lr = optax.constant_schedule(0.1)
    after = _run(create_optimizer(_config(freeze_backbone=True, optimizer=name, grad_clip_norm=1.0), lr), params, 3)[-1]
    for key in params:
        if key == "fc":
            assert not _same(after[key], params[key])
        else:
            assert _same(after[key], params[key]), key  # bit for bit


def test_groups_match_plain_sgd_and_backbone_lr_factor():
    params = _params()
    lr = optax.constant_schedule(0.1)
    plain = _run(create_optimizer(_config(), lr), params, 3)[-1]
    # a factor of 1 through the grouped optimiser is plain SGD, bit for bit
    grouped = _run(optimizer.param_group_optimizer(_config(), lr), params, 3)[-1]
    assert _same(plain, grouped)
    # a factor of 1/2 (exact in binary) halves every backbone update; the head's is unchanged
    plain = _run(create_optimizer(_config(), lr), params, 1)[-1]
    half = _run(create_optimizer(_config(backbone_lr_mult=0.5), lr), params, 1)[-1]
    for key in params:
        moved = jax.tree.map(lambda a, p: np.asarray(a) - np.asarray(p), half[key], params[key])
        full = jax.tree.map(lambda a, p: np.asarray(a) - np.asarray(p), plain[key], params[key])
        ratio = 1.0 if key == "fc" else 0.5
        for m, f in zip(jax.tree.leaves(moved), jax.tree.leaves(full)):
            chex.assert_trees_all_close(m, ratio * f, rtol=1e-5, atol=1e-7)


def test_gradual_unfreezing_starts_each_group_fresh():
    """resnet8's groups from the top: layer3, layer2, layer1, stem. unfreeze_epochs=(1, 2) with
    2 steps/epoch: layer3 moves from update 2, layer2 from update 4, the rest never; a group's
    first update equals a fresh optimiser's (no momentum or decay gathered while frozen)."""
    params = _params()
    lr = optax.constant_schedule(0.1)
    tx = create_optimizer(_config(unfreeze_epochs=(1, 2)), lr, steps_per_epoch=2)
    seq = _run(tx, params, 5)
    assert optimizer.backbone_groups(_config()) == ["layer3", "layer2", "layer1", "stem"]
    assert _same(seq[1]["layer3"], params["layer3"]) and not _same(seq[2]["layer3"], seq[1]["layer3"])
    assert _same(seq[3]["layer2"], params["layer2"]) and not _same(seq[4]["layer2"], seq[3]["layer2"])
    for key in ("layer1", "conv1", "bn1"):
        assert _same(seq[4][key], params[key]), key
    # layer3's first update (step 2) == one step of plain SGD from the same params with the same gradient
    fresh = create_optimizer(_config(), lr)
    updates, _ = fresh.update(_grads(seq[1], 2), fresh.init(seq[1]), seq[1])
    want = optax.apply_updates(seq[1], updates)
    assert _same(seq[2]["layer3"], want["layer3"])
    assert "layer3 lr x1 from step 2" in optimizer.describe(_config(unfreeze_epochs=(1, 2)), 2)


def test_freeze_bn_stats_keeps_running_statistics():
    model = _model()
    frozen, params, stats = split_model(model, freeze_bn_stats=True)
    normal, _, _ = split_model(model)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3)) * 3 + 1

    @jax.jit
    def run(params, stats, x):
        return (frozen.apply(params, stats, x, train=True), frozen.apply(params, stats, x, train=False)[0],
                normal.apply(params, stats, x, train=True)[1])

    (logits, frozen_stats), eval_logits, normal_stats = run(params, stats, x)
    assert _same(frozen_stats, stats) and not _same(normal_stats, stats)
    chex.assert_trees_all_close(np.asarray(logits), np.asarray(eval_logits), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- end to end
def _pattern(k: int, rng, size: int = 32):
    """Class 0 checkerboard, 1 horizontal stripes, 2 vertical stripes (random period, phase,
    colours; channel ``k`` brighter), plus noise."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    period, phase = rng.integers(4, 9), rng.uniform(0, 2 * np.pi)
    sx, sy = np.sin(2 * np.pi * x / period + phase), np.sin(2 * np.pi * y / period + phase)
    v = {0: sx * sy, 1: sy, 2: sx}[k]
    c1, c2 = rng.uniform(0, 90, 3), rng.uniform(0, 90, 3)
    c1[k] += 160
    img = np.where(v[..., None] > 0, c1, c2) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3-class image folder (24 train / 8 val per class, 32x32 PNG), prepared, and
    'pretrained' weights: a resnet8 with a 10-class head exported as torchvision-layout safetensors."""
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for k, name in enumerate(("checker", "hstripes", "vstripes")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _pattern(k, rng).save(root / split / name / f"{i}.png")
    data_dir = tmp_path_factory.mktemp("tfds")
    data.prepare(f"folder:{root}", str(data_dir), verbose=False)
    weights = tmp_path_factory.mktemp("weights") / "resnet8_10class.safetensors"
    pretrained.export_safetensors(_model(num_classes=10), weights)
    return root, data_dir, weights


def _argv(folder, workdir, *extra):
    root, data_dir, weights = folder
    return ["finetune", "--pretrained", str(weights), "--model", "resnet8", "--dataset", f"folder:{root}",
            "--data_dir", str(data_dir), "--workdir", str(workdir), "--config.image_size=32",
            "--config.batch_size=16", "--config.augment=false", "--config.label_smoothing=0",
            "--config.log_every_steps=4", "--config.async_checkpointing=false", *extra]


def _evals(workdir) -> list[dict]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"]


def test_finetune_learns_from_converted_weights_and_exports(folder, tmp_path):
    workdir = tmp_path / "run"
    rc, out, err = run_cli(_argv(folder, workdir, "--config.num_epochs=3", "--config.learning_rate=0.1",
                                 "--backbone-lr-mult", "1"))
    assert rc == 0, err[-2000:]
    assert f"initialised from {folder[2]} (new 3-class head)" in out
    evals = _evals(workdir)
    print("test top-1 by epoch:", [round(e["test_top1"], 3) for e in evals])
    assert evals[-1]["test_top1"] >= 0.9 and evals[-1]["test_count"] == 24  # chance: 1/3
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]

    # export the fine-tuned run as torchvision-layout safetensors; importing it gives the checkpoint back
    exported = tmp_path / "finetuned.safetensors"
    rc, out, err = run_cli(["convert", str(workdir), str(exported), "--checkpoint", "latest"])
    assert rc == 0 and "wrote" in out, err
    state = restore_state(workdir, 12)
    model = create_model("resnet8", num_classes=3)
    pretrained.load_pretrained(model, exported)
    _, params, stats = pretrained.split_state(model)
    assert _same(params, state.params) and _same(stats, state.batch_stats)


def _check_backbone(state, src, moved: set[str]):
    """Every backbone parameter and BatchNorm statistic outside the groups ``moved`` is
    bit-identical to the pretrained file ``src``; in each group of ``moved`` both a weight and
    a running statistic changed; the new head is not all zeros."""
    got = pretrained.to_torch_state_dict(state.params, state.batch_stats)
    for key, value in got.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        group = key.split(".")[0] if key.startswith("layer") else "stem"
        if group not in moved:
            assert np.array_equal(value, src[key]), key  # bit for bit
    for group in moved:
        for kind in ("weight", "running_var"):
            assert any(not np.array_equal(got[k], src[k]) for k in got
                       if k.startswith(group + ".") and k.endswith(kind) and k in src), (group, kind)
    assert not np.array_equal(got["fc.weight"][:3], np.zeros((3, 64)))


def test_freeze_backbone_is_a_linear_probe(folder, tmp_path):
    """--freeze-backbone alone: the backbone's parameters *and* BatchNorm statistics stay
    bit-identical (freeze_bn_stats follows freeze_backbone) while the head learns."""
    workdir = tmp_path / "run"
    rc, out, err = run_cli(_argv(folder, workdir, "--config.num_epochs=1", "--freeze-backbone"))
    assert rc == 0, err[-2000:]
    assert "layer3 frozen, layer2 frozen, layer1 frozen, stem frozen; BatchNorm statistics frozen" in out
    state = restore_state(workdir, 4)
    _check_backbone(state, pretrained.read_state_dict(folder[2]), moved=set())
    config = get_config("finetune_folder")
    config.model = "resnet8"
    start = nnx.state(create_train_model(config, 3, 3).fc)  # the new head the run started from
    assert not np.array_equal(np.asarray(state.params["fc"]["kernel"]), np.asarray(start["kernel"][...]))


def test_frozen_layers_bit_for_bit_gradual_unfreezing_and_resume(folder, tmp_path):
    """Backbone frozen (with its BatchNorm statistics, by default) for epoch 1, layer3 trains
    (weights and statistics) from epoch 2 while the groups below stay frozen, statistics too.

    The run is stopped after epoch 1 and resumed with the weights file gone: the checkpoint,
    not the file, is where a resumed run starts from.
    """
    workdir = tmp_path / "run"
    root, data_dir, weights = folder
    src = pretrained.read_state_dict(weights)
    extra = ("--unfreeze-epochs", "1", "--config.learning_rate=0.1")
    rc, out, err = run_cli(_argv(folder, workdir, "--config.num_epochs=1", *extra))
    assert rc == 0, err[-2000:]
    assert ("fine-tuning: head lr x1, layer3 lr x0.1 from step 4, layer2 frozen, layer1 frozen, stem frozen; "
            "BatchNorm statistics frozen with their group") in out

    def check(state, moved: set[str]):
        _check_backbone(state, src, moved)

    check(restore_state(workdir, 4), moved=set())

    moved_away = weights.with_suffix(".moved")
    weights.rename(moved_away)
    try:
        rc, out, err = run_cli(_argv(folder, workdir, "--config.num_epochs=2", *extra))
    finally:
        moved_away.rename(weights)
    assert rc == 0, err[-2000:]
    assert "resumed from" in out and "initialised from" not in out
    check(restore_state(workdir, 8), moved={"layer3"})


def test_finetune_user_errors(folder, tmp_path):
    rc, _, err = run_cli(["finetune", "--pretrained", str(tmp_path / "nope.safetensors"), "--model", "resnet8",
                          "--dataset", f"folder:{folder[0]}", "--workdir", str(tmp_path / "a")])
    assert rc == 2 and "nope.safetensors not found" in err
    rc, _, err = run_cli([a if a != "resnet8" else "resnet20" for a in _argv(folder, tmp_path / "b")])
    assert rc == 2 and "does not fit this model" in err and "layer1.1.conv1.weight" in err


def test_freeze_bn_stats_follows_the_parameters_unless_set():
    groups = lambda step, **kw: optimizer.frozen_bn_groups(_config(**kw), step, steps_per_epoch=2)  # noqa: E731
    everything = {"layer3", "layer2", "layer1", "stem"}
    assert groups(0) == set() and groups(0, backbone_lr_mult=0.1) == set()
    assert groups(5, freeze_backbone=True) == everything
    assert groups(5, freeze_backbone=True, freeze_bn_stats=False) == set()
    assert groups(0, freeze_bn_stats=True) == everything  # today's explicit flag: the whole run
    # gradual unfreezing: layer3 from step 2, layer2 from step 4; the statistics follow
    assert groups(1, unfreeze_epochs=(1, 2)) == everything
    assert groups(2, unfreeze_epochs=(1, 2)) == {"layer2", "layer1", "stem"}
    assert groups(4, unfreeze_epochs=(1, 2)) == {"layer1", "stem"}
    assert groups(4, unfreeze_epochs=(1, 2), freeze_bn_stats="true") == everything  # an override's text


def test_resume_compares_what_freeze_bn_stats_does():
    """A run saved under the old default (False) resumes under None where both mean the same
    (no frozen backbone); with a frozen backbone they differ, and the resume is refused."""
    from flax_resnet.training.loop import _check_resumable

    saved = {**json.loads(json.dumps(_config().to_dict())), "freeze_bn_stats": False}  # as a checkpoint holds it
    ok = _config()
    assert ok.freeze_bn_stats is None
    _check_resumable(saved, {}, ok, _Info(), "w")
    with pytest.raises(UserError, match="freeze_bn_stats=False"):
        _check_resumable({**saved, "freeze_backbone": True}, {}, _config(freeze_backbone=True), _Info(), "w")
    _check_resumable({**saved, "freeze_backbone": True}, {}, _config(freeze_backbone=True, freeze_bn_stats=False),
                     _Info(), "w")


class _Info:
    num_classes, image_shape = 10, (32, 32, 3)
