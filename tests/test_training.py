"""Training system: schedules, optimiser mask, loss, padded eval, data-parallel equality, checkpoints.

Uses the tiny ``resnet8`` on 16x16 single-channel inputs so every compile is a few
seconds; compiled steps and trained states are shared through module fixtures.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import chex
import pytest

from flax_resnet import cpu as cpu_backend, parallel
from flax_resnet.checkpoint import Checkpointer
from flax_resnet.configs import apply_overrides, get_config, list_configs, load_config
from flax_resnet.errors import UserError
from flax_resnet.training import epoch, evaluation, schedules, steps
from flax_resnet.training.evaluation import evaluate_split
from flax_resnet.training.optimizer import create_optimizer, weight_decay_mask
from flax_resnet.training.state import abstract_train_state, create_train_state

NUM_CLASSES = 10
IMAGE = (16, 16, 1)
BATCH = 16
N_STEPS = 3


def tiny_config(**over):
    c = get_config("digits_resnet20")
    c.model = "resnet8"
    c.schedule = "constant"
    c.warmup_epochs = 0.0
    c.learning_rate = 0.1
    c.weight_decay = 1e-4
    c.nesterov = True
    # Plain XLA arithmetic: every per-example computation is then bit-identical however the
    # batch is split, so 8 devices == 1 device to 1e-6 even on this tiny, ill-conditioned
    # model. The CPU fast path is checked on a well-conditioned one in tests/test_cpu.py.
    c.cpu_fast_path = False
    for k, v in over.items():
        c[k] = v
    return c


def make_batches(n, batch=BATCH, seed=0):
    rs = np.random.RandomState(seed)
    return [{"image": rs.randn(batch, *IMAGE).astype(np.float32),
             "label": rs.randint(0, NUM_CLASSES, batch).astype(np.int32)} for _ in range(n)]


def run_steps(config, devices, batches):
    mesh = parallel.create_mesh(devices)
    lr_fn = schedules.create_learning_rate_fn(config, 10, 100)
    tx = create_optimizer(config, lr_fn)
    state, graph = create_train_state(config, NUM_CLASSES, IMAGE[-1], tx, mesh)
    fn = steps.jit_train_step(mesh, graph=graph, tx=tx, learning_rate_fn=lr_fn, num_classes=NUM_CLASSES,
                              label_smoothing=config.label_smoothing,
                              compute_dtype=jnp.bfloat16 if config.half_precision else jnp.float32)
    history = []
    for b in batches:
        state, metrics = fn(state, parallel.shard_batch(b, mesh))
        history.append(metrics)
    return mesh, graph, tx, state, jax.device_get(history)


@pytest.fixture(scope="module")
def runs():
    """The same N_STEPS on 1 device and on all 8 simulated devices, same global batches."""
    if jax.device_count() < 8:  # an accelerator's real devices (the GPU check): nothing to compare
        pytest.skip(f"needs 8 devices, has {jax.device_count()} (tests/conftest.py simulates 8 on CPU)")
    assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
    config = tiny_config()
    batches = make_batches(N_STEPS)
    one = run_steps(config, jax.devices()[:1], batches)
    eight = run_steps(config, jax.devices(), batches)
    return config, one, eight


# --------------------------------------------------------------------------- data parallel
def test_eight_devices_match_one_device(runs):
    _, (_, _, _, s1, m1), (mesh8, _, _, s8, m8) = runs
    leaf = jax.tree.leaves(s8.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    assert int(s1.step) == int(s8.step) == N_STEPS
    s1, s8 = jax.device_get(s1), jax.device_get(s8)
    chex.assert_trees_all_close(s1.params, s8.params, rtol=1e-5, atol=1e-6)
    # BatchNorm running statistics are over the global batch, so they match too.
    chex.assert_trees_all_close(s1.batch_stats, s8.batch_stats, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s1.opt_state, s8.opt_state, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(m1, m8, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_compiled_init_is_the_op_by_op_init_bit_for_bit(fast):
    """The trainer builds its state in one jitted program; checkpoints, resumes and reference runs
    rely on its values being those of building the model eagerly."""
    from flax import nnx

    from flax_resnet.models.layers import conv_init
    from flax_resnet.training.state import create_model, init_train_state, split_model, start_train_state

    config = apply_overrides(get_config("digits_resnet20"), ["--config.model=resnet8", "--config.seed=3",
                                                             f"--config.cpu_fast_path={fast}", "--config.ema_decay=0.9"])
    tx = create_optimizer(config, schedules.create_learning_rate_fn(config, 10, 100), 10)
    state, graph = init_train_state(config, 10, 1, tx)
    _, params, stats = split_model(create_model(config, 10, 1))
    chex.assert_trees_all_equal(state.params, params)
    chex.assert_trees_all_equal(state.batch_stats, stats)
    chex.assert_trees_all_equal(state.ema, {"params": params, "batch_stats": stats})
    chex.assert_trees_all_equal(state.opt_state, tx.init(params))
    np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(3))
    assert graph.cpu_fast_path is fast
    leaves = jax.tree.leaves(state)
    assert len({x.unsafe_buffer_pointer() for x in leaves}) == len(leaves)  # own buffers: the step donates them
    # The trainer's start-up: the abstract state (to lower the step against) while the initialiser compiles.
    abstract, _, result = start_train_state(config, 10, 1, tx, parallel.create_mesh())
    started = result()
    chex.assert_trees_all_equal(started, state)
    assert (jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding, x.weak_type), started)
            == jax.tree.map(lambda s: (s.shape, s.dtype, s.sharding, s.weak_type), abstract))
    key = jax.random.key(0)  # and the initialiser is variance_scaling's, value for value
    reference = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
    np.testing.assert_array_equal(conv_init(key, (3, 3, 16, 32)), reference(key, (3, 3, 16, 32)))


def test_train_metrics(runs):
    _, (_, _, _, _, history), _ = runs
    m = history[0]
    assert set(m) == {"loss", "top1", "top5", "lr", "grad_norm"}
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert 0 <= m["top1"] <= m["top5"] <= 1
    chex.assert_trees_all_close(m["lr"], 0.1)
    # One update on a fixed batch with a random init: the loss is about log(10).
    assert abs(m["loss"] - np.log(NUM_CLASSES)) < 1.0


class LinearGraph:
    """A stand-in for ModelGraph: logits = flatten(x) @ w (no BatchNorm)."""

    cpu_fast_path = False  # plain XLA, as ModelGraph says for a model without the CPU backend's layers

    def apply(self, params, batch_stats, x, *, train):
        return x.reshape(x.shape[0], -1) @ params["w"], batch_stats


def test_top5_only_with_more_than_5_classes():
    from flax_resnet.training.state import TrainState

    rs = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rs.randn(4, 2, 2, 1), jnp.float32), "label": jnp.array([0, 1, 2, 0])}
    for k in (3, 7):
        params = {"w": jnp.asarray(rs.randn(4, k), jnp.float32)}
        tx = optax.sgd(0.1)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                           opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
        _, m = steps.train_step(state, batch, graph=LinearGraph(), tx=tx,
                                learning_rate_fn=optax.constant_schedule(0.1), num_classes=k)
        e = steps.eval_step(state, batch, graph=LinearGraph(), num_classes=k)
        assert ("top5" in m) == ("correct5" in e) == (k > 5)
        assert float(e["count"]) == 4


class StatsGraph(LinearGraph):
    """LinearGraph with a BatchNorm-like running statistic: ``m <- 0.9 m + 0.1 mean(x)`` in training."""

    def apply(self, params, batch_stats, x, *, train):
        logits, _ = super().apply(params, batch_stats, x, train=train)
        return logits, ({"m": 0.9 * batch_stats["m"] + 0.1 * x.mean(axis=0).reshape(-1)} if train else batch_stats)


def test_ema_of_params_and_stats_follows_the_recurrence():
    """Three steps with ema_decay d: ema_k = d * ema_(k-1) + (1 - d) * w_k, from ema_0 = w_0,
    for the params and the running statistics alike (numpy, float64)."""
    from flax_resnet.training.state import TrainState

    d, rs = 0.7, np.random.RandomState(0)
    params = {"w": jnp.asarray(rs.randn(4, 3), jnp.float32)}
    stats = {"m": jnp.asarray(rs.randn(4), jnp.float32)}
    tx = optax.sgd(0.5, momentum=0.9)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0), ema={"params": params, "batch_stats": stats})
    want = jax.tree.map(lambda x: np.asarray(x, np.float64), state.ema)
    step = jax.jit(lambda st, b: steps.train_step(st, b, graph=StatsGraph(), tx=tx, ema_decay=d, num_classes=3,
                                                  learning_rate_fn=optax.constant_schedule(0.5)))
    for i in range(3):
        batch = {"image": jnp.asarray(rs.randn(8, 2, 2, 1), jnp.float32), "label": jnp.asarray(rs.randint(0, 3, 8))}
        state, _ = step(state, batch)
        new = {"params": state.params, "batch_stats": state.batch_stats}
        want = jax.tree.map(lambda e, w: d * e + (1 - d) * np.asarray(w, np.float64), want, new)
        assert not np.allclose(want["params"]["w"], np.asarray(state.params["w"]))  # the EMA trails the weights
        chex.assert_trees_all_close(state.ema, want, rtol=1e-5, atol=1e-6)


def _accumulated_step(k, graph, state, batch, tx):
    return jax.jit(lambda st, b: steps.train_step(st, b, graph=graph, tx=tx, num_classes=3, grad_accum_steps=k,
                                                  learning_rate_fn=optax.constant_schedule(0.5)))(state, batch)


def test_gradient_accumulation_averages_micro_batch_gradients():
    """k = 2 micro-batches == one batch of 16 where nothing couples the examples (a linear model:
    the mean gradient is the mean of the halves' means), for the loss, accuracy, gradient norm and
    updated params; the 8-device mesh keeps each micro-batch spread over all devices. A running
    statistic is updated once per micro-batch, in order, over the strided rows (0, 2, 4, ...
    then 1, 3, 5, ...), as documented."""
    from flax_resnet.training.state import TrainState

    rs = np.random.RandomState(0)
    params = {"w": jnp.asarray(rs.randn(4, 3), jnp.float32)}
    stats = {"m": jnp.asarray(rs.randn(4), jnp.float32)}
    tx = optax.sgd(0.5, momentum=0.9)
    batch = {"image": rs.randn(16, 2, 2, 1).astype(np.float32), "label": rs.randint(0, 3, 16).astype(np.int32)}
    mesh = parallel.create_mesh(jax.devices())
    fresh = lambda: parallel.replicate(TrainState(step=jnp.zeros((), jnp.int32), params=params,  # noqa: E731
                                                  batch_stats=stats, opt_state=tx.init(params),
                                                  rng=jax.random.PRNGKey(0)), mesh)
    sharded = parallel.shard_batch(batch, mesh)
    one, m1 = _accumulated_step(1, StatsGraph(), fresh(), sharded, tx)
    two, m2 = _accumulated_step(2, StatsGraph(), fresh(), sharded, tx)
    chex.assert_trees_all_close(jax.device_get(two.params), jax.device_get(one.params), rtol=1e-6, atol=1e-6)
    for key in ("loss", "top1", "grad_norm"):
        chex.assert_trees_all_close(m2[key], m1[key], rtol=1e-6, atol=1e-7)
    means = [batch["image"][j::2].mean(axis=0).reshape(-1) for j in (0, 1)]
    want = 0.9 * (0.9 * np.asarray(stats["m"]) + 0.1 * means[0]) + 0.1 * means[1]
    chex.assert_trees_all_close(np.asarray(two.batch_stats["m"]), want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(one.batch_stats["m"]), want)  # k = 1: one update over the whole batch


def test_resnet_gradient_accumulation_differs_only_through_batchnorm():
    """On resnet8 k = 2 is not k = 1 exactly: BatchNorm normalises each micro-batch of 8 by its
    own mean and variance, not the batch of 16's, so activations, loss and gradients move by
    the sampling noise of those statistics (a few per cent on this random batch: 2% on the
    loss, 10% on the gradient norm bound it); the step itself runs and averages as above."""
    config = tiny_config()
    mesh = parallel.create_mesh(jax.devices()[:1])
    lr_fn = optax.constant_schedule(0.1)
    tx = create_optimizer(config, lr_fn)
    batch = parallel.shard_batch(make_batches(1, batch=16, seed=3)[0], mesh)
    out = {}
    for k in (1, 2):
        state, graph = create_train_state(config, NUM_CLASSES, IMAGE[-1], tx, mesh)
        fn = steps.jit_train_step(mesh, graph=graph, tx=tx, learning_rate_fn=lr_fn, num_classes=NUM_CLASSES,
                                  grad_accum_steps=k)
        out[k] = jax.device_get(fn(state, batch)[1])
    chex.assert_trees_all_close(out[2]["loss"], out[1]["loss"], rtol=0.02)
    chex.assert_trees_all_close(out[2]["grad_norm"], out[1]["grad_norm"], rtol=0.1)
    assert out[2]["loss"] != out[1]["loss"]


# --------------------------------------------------------------------------- padded evaluation
def test_padded_eval_counts_every_example_once(runs):
    """A 37-example split in batches of 16: the last batch has 5 real rows and 11 padded ones."""
    config, (_, graph, _, state1, _), (mesh8, _, _, state8, _) = runs
    n, bs = 37, BATCH
    rs = np.random.RandomState(1)
    images = rs.randn(n, *IMAGE).astype(np.float32)
    labels = rs.randint(0, NUM_CLASSES, n).astype(np.int32)

    def padded_batches():
        for s in range(0, n, bs):
            x, y = images[s:s + bs], labels[s:s + bs]
            mask = np.arange(bs) < len(x)
            pad = bs - len(x)
            # Padding rows are garbage on purpose: the mask must remove them.
            yield {"image": np.concatenate([x, np.full((pad, *IMAGE), 99.0, np.float32)]),
                   "label": np.concatenate([y, np.full(pad, 3, np.int32)]), "mask": mask}

    eval_fn = steps.jit_eval_step(mesh8, graph=graph, num_classes=NUM_CLASSES)
    got = evaluate_split(eval_fn, state8, padded_batches(), mesh8)
    assert got["count"] == n

    # Reference: the unpadded split in one batch, computed directly.
    s = jax.device_get(state8)
    logits, _ = graph.apply(s.params, s.batch_stats, jnp.asarray(images), train=False)
    ref_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    ref_top1 = float((np.argmax(logits, -1) == labels).mean())
    assert got["top1"] == pytest.approx(ref_top1, abs=1e-6)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)


# --------------------------------------------------------------------------- loss
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_formula(alpha):
    rs = np.random.RandomState(0)
    logits = rs.randn(6, NUM_CLASSES).astype(np.float32)
    labels = rs.randint(0, NUM_CLASSES, 6)
    got = steps.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels), NUM_CLASSES, alpha)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    target = (1 - alpha) * np.eye(NUM_CLASSES)[labels] + alpha / NUM_CLASSES
    chex.assert_trees_all_close(got, -(target * logp).sum(-1), rtol=1e-5)
    # Equivalently: (1 - a) * NLL + a * mean over classes of -log p.
    chex.assert_trees_all_close(
        got, (1 - alpha) * -logp[np.arange(6), labels] + alpha * -logp.mean(-1), rtol=1e-5)


def test_loss_is_float32_for_bfloat16_logits():
    logits = jnp.ones((2, NUM_CLASSES), jnp.bfloat16)
    assert steps.cross_entropy_loss(logits, jnp.array([0, 1]), NUM_CLASSES, 0.1).dtype == jnp.float32


# --------------------------------------------------------------------------- weight decay mask
def test_weight_decay_mask_selects_only_kernels(runs):
    config, (_, _, _, state, _), _ = runs
    mask = weight_decay_mask(state.params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["conv1/kernel"] and flat["fc/kernel"]
    assert not flat["fc/bias"] and not flat["bn1/scale"] and not flat["bn1/bias"]
    for name, decayed in flat.items():
        assert decayed == name.endswith("kernel"), name


def test_weight_decay_applies_to_kernels_only():
    """With zero gradients and no momentum, one step shrinks kernels by lr*wd and leaves the rest."""
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2))}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
              "fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    config = tiny_config(weight_decay=0.5, momentum=0.0, nesterov=False)
    tx = create_optimizer(config, optax.constant_schedule(0.1))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(new["conv"]["kernel"], 1 - 0.1 * 0.5)
    chex.assert_trees_all_close(new["fc"]["kernel"], 1 - 0.1 * 0.5)
    for leaf in (new["bn"]["scale"], new["bn"]["bias"], new["fc"]["bias"]):
        chex.assert_trees_all_close(leaf, 1.0)


# --------------------------------------------------------------------------- optimisers and clipping
def _opt_params():
    rs = np.random.RandomState(1)
    return {"conv": {"kernel": rs.randn(3, 3, 2, 4)}, "bn": {"scale": rs.rand(4) + 0.5, "bias": rs.randn(4)},
            "fc": {"kernel": rs.randn(4, 3), "bias": rs.randn(3)}}


def _one_step(config, params, grads, lr=0.1):
    """One update of ``create_optimizer(config)`` (float32), as numpy float64 arrays."""
    params32, grads32 = (jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t) for t in (params, grads))
    tx = create_optimizer(config, optax.constant_schedule(lr))
    updates, _ = tx.update(grads32, tx.init(params32), params32)
    return jax.tree.map(lambda x: np.asarray(x, np.float64), optax.apply_updates(params32, updates))


@pytest.mark.parametrize("name, clip", [("sgd", 0.0), ("sgd", 1.5), ("adamw", 0.0), ("adamw", 1.5), ("lamb", 0.0),
                                        ("lamb", 1.5)])
def test_one_step_of_each_optimizer_matches_its_formula(name, clip):
    """First update from a fresh state, in numpy: decay only on kernels; SGD's decay is L2 on
    the gradient, AdamW's and LAMB's decoupled; LAMB scales each array by ||w|| / ||update||;
    clipping scales the gradient to global norm <= clip before anything else."""
    lr, wd, mu, eps = 0.1, 0.05, 0.9, 1e-8
    params = _opt_params()
    grads = jax.tree.map(lambda p: np.random.RandomState(p.size).randn(*p.shape), params)
    config = tiny_config(optimizer=name, weight_decay=wd, momentum=mu, nesterov=True, grad_clip_norm=clip,
                         adam_eps=eps)
    got = _one_step(config, params, grads, lr)

    norm = np.sqrt(sum(np.sum(g * g) for g in jax.tree.leaves(grads)))
    assert norm > 1.5  # so clipping is active when asked for
    scale = min(1.0, clip / norm) if clip else 1.0
    decay = {"conv": {"kernel": 1.0}, "bn": {"scale": 0.0, "bias": 0.0}, "fc": {"kernel": 1.0, "bias": 0.0}}
    want = {}
    for mod in params:
        want[mod] = {}
        for k, w in params[mod].items():
            g, d = grads[mod][k] * scale, decay[mod][k] * wd * w
            if name == "sgd":  # Nesterov's first step: (1 + mu) * (g + wd w)
                u = (1 + mu) * (g + d)
            else:  # Adam's first bias-corrected step is g / (|g| + eps)
                u = g / (np.abs(g) + eps) + d
                if name == "lamb":
                    u = u * np.linalg.norm(w) / np.linalg.norm(u)
            want[mod][k] = w - lr * u
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)


def test_optimizer_and_clip_are_validated():
    with pytest.raises(UserError, match="--config.optimizer='adam': must be one of sgd, adamw, lamb"):
        load_config(None, ["--config.optimizer=adam"])
    with pytest.raises(UserError, match="grad_clip_norm"):
        load_config(None, ["--config.grad_clip_norm=-1.0"])
    with pytest.raises(UserError, match="adam_b2"):
        load_config(None, ["--config.adam_b2=1.0"])
    with pytest.raises(UserError, match="--config.grad_accum_steps=3: must divide --config.batch_size=64"):
        load_config(None, ["--config.grad_accum_steps=3"])


# --------------------------------------------------------------------------- schedules
def test_paper_step_schedule():
    lr = schedules.step_schedule(0.1, (32_000, 48_000))
    for step, want in [(0, 0.1), (31_999, 0.1), (32_000, 0.01), (47_999, 0.01), (48_000, 0.001), (63_999, 0.001)]:
        assert float(lr(step)) == pytest.approx(want, rel=1e-6), step


def test_cifar_recipe_schedule_values():
    c = get_config("cifar10_resnet56")
    assert (c.batch_size, c.learning_rate, c.momentum, c.weight_decay, c.num_train_steps) == (128, 0.1, 0.9, 1e-4, 64_000)
    lr = schedules.create_learning_rate_fn(c, steps_per_epoch=391, total_steps=c.num_train_steps)
    assert [float(lr(s)) for s in (0, 32_000, 48_000)] == pytest.approx([0.1, 0.01, 0.001])


def test_warmup_cosine_schedule():
    lr = schedules.warmup_cosine_schedule(0.4, total_steps=1000, warmup_steps=100)
    assert float(lr(0)) == pytest.approx(0.0)
    assert float(lr(50)) == pytest.approx(0.2)
    assert float(lr(100)) == pytest.approx(0.4)
    assert float(lr(550)) == pytest.approx(0.2, rel=1e-5)  # half-way through the cosine
    assert float(lr(1000)) == pytest.approx(0.0, abs=1e-7)


def test_imagenet_recipe_linear_scaling_and_warmup():
    c = get_config("imagenet_resnet50")
    spe = 1251  # 1,281,167 / 1024
    total = c.num_epochs * spe
    lr = schedules.create_learning_rate_fn(c, spe, total)
    assert schedules.scaled_learning_rate(c.learning_rate, c.batch_size, c.linear_scaling) == pytest.approx(0.4)
    assert float(lr(5 * spe)) == pytest.approx(0.4)  # end of the 5-epoch warm-up
    assert float(lr(int(2.5 * spe))) == pytest.approx(0.2, rel=1e-3)
    assert float(lr(total)) == pytest.approx(0.0, abs=1e-6)


def test_step_schedule_in_epochs_with_warmup():
    c = tiny_config(schedule="step", learning_rate=0.1, lr_boundaries_epochs=(2, 3), warmup_steps=5)
    lr = schedules.create_learning_rate_fn(c, steps_per_epoch=10, total_steps=40)
    assert [float(lr(s)) for s in (0, 5, 19, 20, 30)] == pytest.approx([0.0, 0.1, 0.1, 0.01, 0.001])


def test_unknown_schedule_is_user_error():
    with pytest.raises(UserError, match="schedule"):
        schedules.create_learning_rate_fn(tiny_config(schedule="linear"), 10, 100)


# --------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("fast", [False, True])
def test_bfloat16_compute_keeps_float32_state(runs, fast):
    """half_precision: bfloat16 convolutions and logits, float32 params, BatchNorm statistics
    and loss, with the plain layers and with the CPU fast path's (whose native kernels serve
    float32 only: bfloat16 runs XLA's convolutions inside the same formulations). The first
    step's loss is the float32 run's to bfloat16 accuracy, but not equal to it."""
    config = tiny_config(half_precision=True, cpu_fast_path=fast)
    _, graph, _, state, history = run_steps(config, jax.devices()[:1], make_batches(1))
    assert graph.cpu_fast_path == fast
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.batch_stats))
    logits = jax.eval_shape(lambda: graph.apply(state.params, state.batch_stats, jnp.zeros((2, *IMAGE)), train=False)[0])
    assert logits.dtype == jnp.bfloat16
    f32_loss = runs[1][4][0]["loss"]  # the same first batch in float32, plain layers
    assert history[0]["loss"].dtype == np.float32 and history[0]["loss"] != f32_loss
    chex.assert_trees_all_close(history[0]["loss"], f32_loss, rtol=1e-2)


# --------------------------------------------------------------------------- configs
def test_every_recipe_loads_and_documents_how_to_run():
    import importlib

    names = list_configs()
    assert {"digits_resnet20", "cifar10_resnet20", "cifar10_resnet56", "cifar10_resnet110",
            "cifar10_article", "imagenet_resnet50"} <= set(names)
    for name in names:
        c = get_config(name)
        doc = importlib.import_module(f"flax_resnet.configs.{name}").__doc__
        assert "Run:" in doc and "Expect" in doc, name
        # A recipe either names its dataset or its docstring says how to pass one.
        assert c.model and (c.dataset or "--dataset" in doc), name


def test_article_recipe_is_the_articles_and_defaults_flip_and_normalise():
    c = get_config("cifar10_article")
    assert (c.model, c.dataset, c.batch_size, c.num_epochs) == ("article_resnet", "cifar10", 128, 10)
    assert (c.learning_rate, c.schedule, c.momentum, c.weight_decay) == (0.1, "constant", 0.9, 0.0)
    assert c.augment and not c.augment_flip and not c.normalize  # RandomCrop(32, padding=4) + ToTensor()
    d = get_config("cifar10_resnet20")
    assert d.augment and d.augment_flip and d.normalize


def test_config_overrides_and_errors(tmp_path):
    c = load_config(None, ["--config.num_epochs=3", "--config.nesterov=true", "--config.learning_rate", "0.5",
                           "--config.lr_boundaries_steps=(10,20)", "--config.data_dir=/x"])
    assert (c.num_epochs, c.nesterov, c.learning_rate, c.lr_boundaries_steps, c.data_dir) == (3, True, 0.5, (10, 20), "/x")
    with pytest.raises(UserError, match="num_epochs"):
        apply_overrides(get_config(None), ["--config.num_epoch=3"])
    with pytest.raises(UserError, match="num_epochs"):
        apply_overrides(get_config(None), ["--config.num_epochs=three"])
    with pytest.raises(UserError, match="unknown config"):
        get_config("cifar10_resnet57")
    path = tmp_path / "mine.py"
    path.write_text("from flax_resnet.configs import digits_resnet20\n"
                    "def get_config():\n    c = digits_resnet20.get_config()\n    c.num_epochs = 1\n    return c\n")
    assert get_config(str(path)).num_epochs == 1


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_saved_on_8_devices_restores_on_1(runs, tmp_path):
    config, _, (mesh8, _, tx, state8, _) = runs
    ref = jax.device_get(state8)
    ck = Checkpointer(tmp_path, save_every_steps=2)
    assert not ck.should_save(1) and ck.should_save(2)
    assert ck.save(3, state8, {"epoch": 1, "index": 3}, config.to_dict(), {"dataset_info": {"num_classes": 10}},
                   force=True)
    assert ck.save_best(3, state8, {"epoch": 1}, config.to_dict(), {}, test_top1=0.5)
    assert not ck.save_best(4, state8, {"epoch": 1}, config.to_dict(), {}, test_top1=0.4)  # not better
    ck.wait()
    ck.close()

    mesh1 = parallel.create_mesh(jax.devices()[:1])
    abstract, _ = abstract_train_state(config, NUM_CLASSES, IMAGE[-1], tx, mesh1)
    with Checkpointer(tmp_path, read_only=True) as ck:
        assert (ck.latest_step(), ck.best_step(), ck.best_metric()) == (3, 3, 0.5)
        state, data_state, cfg, meta = ck.restore(abstract, "latest")
    assert data_state == {"epoch": 1, "index": 3} and cfg["model"] == "resnet8"
    assert meta["dataset_info"]["num_classes"] == 10
    assert jax.tree.leaves(state.params)[0].sharding.device_set == {jax.devices()[0]}
    chex.assert_trees_all_equal(jax.device_get(state), ref)


def test_restore_without_checkpoint_is_user_error(tmp_path):
    with Checkpointer(tmp_path, read_only=True) as ck:
        with pytest.raises(UserError, match="flax-resnet train"):
            ck.restore_config("best")


def test_batch_size_must_split_over_devices():
    with pytest.raises(UserError, match="multiple of 8"):
        parallel.check_batch_size(12, parallel.create_mesh())


# --------------------------------------------------------------------------- steps in flight
@pytest.mark.parametrize("in_flight", [0, 1, 2])
def test_loops_bound_the_steps_in_flight_waiting_after_the_next_fetch(monkeypatch, in_flight):
    events, tags = [], {}
    monkeypatch.setattr(jax, "block_until_ready", lambda x: events.append(f"wait {tags[id(x)]}"))

    def batches():
        for i in range(4):
            events.append(f"fetch {i}")
            yield {"image": np.zeros((1, 2), np.float32), "label": np.zeros(1, np.int32), "n": i}

    def train_fn(state, batch):
        events.append(f"step {batch['n']}")
        metrics = {"loss": jnp.float32(1.0)}
        tags[id(metrics)] = batch["n"]
        return f"state {batch['n']}", metrics

    class Log:
        def log(self, *args):
            pass

    def expected():  # step i waits for step i - in_flight, after fetching its batch
        return [e for i in range(4)
                for e in (f"fetch {i}", *([f"wait {i - in_flight}"] if in_flight and i >= in_flight else []), f"step {i}")]

    _, _, rows, _, _ = epoch.train_epoch(
        lambda step: train_fn, "state init", batches(), step=0, epoch=0, num_epochs=1, epoch_start=0, epoch_end=4,
        config=tiny_config(log_every_steps=2, batch_size=1), logger=Log(), save=None, should_save=lambda s: False,
        check_metrics=lambda rows, first: None, should_stop=lambda s: False, max_in_flight=in_flight)
    assert events == expected() and len(rows) == 4

    events.clear()
    sums = {"loss": jnp.float32(2.0), "correct": jnp.float32(1.0), "count": jnp.float32(2.0)}

    def eval_fn(state, batch):
        events.append(f"step {batch['n']}")
        out = dict(sums)
        tags[id(out)] = batch["n"]
        return out

    monkeypatch.setattr(parallel, "shard_batch", lambda batch, mesh: batch)
    assert evaluation.evaluate_split(eval_fn, None, batches(), None, max_in_flight=in_flight) == {
        "loss": 1.0, "top1": 0.5, "count": 8}
    assert events == expected()


def test_steps_in_flight_follows_the_compiled_steps_temporaries(monkeypatch):
    class Compiled:
        def __init__(self, temp):
            self.temp = temp

        def memory_analysis(self):
            if self.temp is None:
                raise NotImplementedError
            return types.SimpleNamespace(temp_size_in_bytes=self.temp)

    limit = cpu_backend.QUEUE_TEMP_BYTES
    assert [cpu_backend.steps_in_flight(c) for c in (Compiled(limit), Compiled(limit + 1), Compiled(None), None)] \
        == [2, 1, 1, 1]
    compiled = jax.jit(lambda x: jnp.sin(x) @ x.T).lower(jnp.ones((64, 64))).compile()
    assert cpu_backend.steps_in_flight(compiled) == 2  # XLA:CPU's memory analysis read, a few KB of temporaries
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cpu_backend.steps_in_flight(Compiled(1)) == 0  # the device runtime plans its own memory


def test_the_default_eval_batch_pads_the_split_least():
    """eval_batch_size 0: from the train batch up to twice it, a multiple of the data shards, the
    smallest that pads the eval split least; an explicit size or another split keeps its own."""
    info = types.SimpleNamespace(eval_size=360, eval_split="test")
    config = apply_overrides(get_config("digits_resnet20"), ["--config.batch_size=64"])
    one, eight = parallel.create_mesh(jax.devices()[:1]), parallel.create_mesh()
    assert evaluation.eval_batch_size(config, one, info) == 72  # 5 batches, none padded (64: 6, 24 rows padded)
    assert evaluation.eval_batch_size(config, eight, info) == 72  # 9 rows a device
    odd = types.SimpleNamespace(eval_size=375, eval_split="test")
    assert evaluation.eval_batch_size(config, one, odd) == 75  # 5 x 75
    assert evaluation.eval_batch_size(config, eight, odd) == 64  # 6 x 64 = 384, as 96 and 128 pad, but smaller
    assert evaluation.eval_batch_size(config, one, types.SimpleNamespace(eval_size=10000, eval_split="test")) == 80
    assert evaluation.eval_batch_size(config, one, info, "train") == 64
    assert evaluation.eval_batch_size(config, one) == 64
    explicit = apply_overrides(get_config("digits_resnet20"), ["--config.batch_size=64", "--config.eval_batch_size=96"])
    assert evaluation.eval_batch_size(explicit, one, info) == 96


def test_a_small_eval_split_is_read_once_and_kept_on_the_mesh(digits_data_dir, monkeypatch):
    """eval_pass: digits' test split is read and sharded on the first pass, reused after (the same
    arrays, no reads); a split over KEPT_EVAL_BYTES is read each pass."""
    config = apply_overrides(get_config("digits_resnet20"), [f"--config.data_dir={digits_data_dir}"])
    from flax_resnet import data
    info = data.get_dataset_info(config.dataset, config.data_dir)
    reads = []
    original = evaluation.data.eval_batches
    monkeypatch.setattr(evaluation.data, "eval_batches", lambda *a, **k: reads.append(1) or original(*a, **k))
    mesh = parallel.create_mesh()
    passes = evaluation.eval_pass(config, info, 72, mesh, uint8=True)
    first, second = list(passes()), list(passes())
    assert len(reads) == 1 and len(first) == 5 and all(a is b for a, b in zip(first, second))
    assert sum(int(b["mask"].sum()) for b in first) == 360 and first[0]["image"].dtype == jnp.uint8
    fresh = [parallel.shard_batch(b, mesh) for b in evaluation.eval_batches(config, info, 72, uint8=True)]
    for kept, want in zip(first, fresh):
        assert kept["image"].sharding == want["image"].sharding
        np.testing.assert_array_equal(np.asarray(kept["image"]), np.asarray(want["image"]))
    other_split = apply_overrides(config.copy_and_resolve_references(), ["--config.eval_split=train"])
    monkeypatch.setattr(evaluation, "KEPT_EVAL_BYTES", 360 * 32 * 32 - 1)
    for cfg in (config, other_split):  # too large; a split whose size info does not give
        reads.clear()
        passes = evaluation.eval_pass(cfg, info, 72, mesh, uint8=True)
        list(passes()), list(passes())
        assert len(reads) == 2
    monkeypatch.setattr(evaluation, "KEPT_EVAL_BYTES", 64 << 20)
    reads.clear()
    passes = evaluation.eval_pass(other_split, info, 72, mesh, uint8=True)
    assert sum(int(b["mask"].sum()) for b in passes()) == 1437 and len(list(passes())) == 20 and len(reads) == 2
