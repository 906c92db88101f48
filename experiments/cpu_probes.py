"""The probes behind BUILD_NOTES.md "Performance": where XLA:CPU loses time, and how well conditioned a gradient is.

    python experiments/cpu_probes.py convs          # 3x3 conv GFLOP/s: YNNPACK vs XLA's own vs ours vs PyTorch
    python experiments/cpu_probes.py weightgrads --model resnet20 --batch 128
                                                    # our gradient formulations vs alternatives, in the real step (A/B)
    python experiments/cpu_probes.py batchnorm --model resnet20 --batch 128
                                                    # BatchNorm: our backward vs NNX's autodiff vs no statistics (bound), A/B
    python experiments/cpu_probes.py native         # fwd and dW alone: XLA's vs the native kernels', GFLOP/s
    python experiments/cpu_probes.py layers         # ResNet-50's kxk convolutions one by one: fwd, dx, dW, totals
    python experiments/cpu_probes.py winograd       # 3x3 convs by Winograd F(2x2,3x3) vs XLA's own (tried, dropped)
    python experiments/cpu_probes.py reduction      # BatchNorm statistics under three YNNPACK fusion lists
    python experiments/cpu_probes.py fusions --model resnet50 --batch 16
                                                    # our train/eval steps under YNNPACK fusion lists (A/B);
                                                    # --options NAME=VALUE: our list plus other XLA options
    python experiments/cpu_probes.py faults --model resnet20 --batch 128 --steps 10
                                                    # per step: MB page-faulted in, sys/user CPU ms, max RSS
    python experiments/cpu_probes.py profile --model resnet50 --batch 16 --conv-impl xla
                                                    # per-op thread time of one train step, by op kind
    python experiments/cpu_probes.py conditioning --model resnet18 --batch 8 --size 32
                                                    # gradient vs float64, and float64's sensitivity to 1e-6 noise

Each prints one line per measurement. Timings are minima of repeats (convs, layers, winograd,
reduction), medians of interleaved repeats of our real steps (fusions, weightgrads, batchnorm) or thread
time summed over the profiled steps (profile); run them on a quiet machine. fusions,
weightgrads, batchnorm and layers on ResNet-50 take several minutes each on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import sys
import time

CONV_SHAPES = ((128, 32, 16, 16), (128, 16, 32, 32), (128, 8, 64, 64), (16, 56, 64, 64),  # N, H=W, Cin, Cout
               (16, 28, 128, 128), (16, 14, 256, 256), (16, 7, 512, 512))


def _best_ms(fn, *args, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def convs(args) -> None:
    import jax
    import jax.numpy as jnp

    from flax_resnet.training import steps

    from flax_resnet.models.blocks import _conv, conv_kxk

    for n, h, cin, cout in CONV_SHAPES:
        x = jax.random.normal(jax.random.key(0), (n, h, h, cin))
        k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.1
        flops = 2 * n * h * h * cin * cout * 9
        line = [f"3x3 {cin}->{cout} @{h}x{h} b{n} GFLOP/s fwd / fwd+bwd:"]
        variants = (("YNNPACK (default)", None, _conv), ("XLA own", steps.CPU_COMPILER_OPTIONS, _conv),
                    ("ours (native where served)", steps.CPU_COMPILER_OPTIONS, conv_kxk))
        for name, opts, conv in variants:
            fwd = jax.jit(lambda x, k: conv(x, k, 1, 1), compiler_options=opts)
            both = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k, 1, 1) ** 2), argnums=(0, 1)),
                           compiler_options=opts)
            line.append(f"{name} {flops / _best_ms(fwd, x, k) / 1e6:.0f} / {3 * flops / _best_ms(both, x, k) / 1e6:.0f}")
        try:
            line.append(_torch_conv(n, h, cin, cout, flops))
        except ImportError:
            pass
        print("; ".join(line), flush=True)


def _weightgrad_variants():
    """Gradient formulations to A/B in the real train step: name -> {blocks attribute: replacement}."""
    import jax

    from flax_resnet.models import blocks

    def barrier_then_xla(x, g, kernel_shape, stride, pad):  # XLA's own dW, its input fenced off
        xb = jax.lax.optimization_barrier(x)
        return jax.vjp(lambda w: blocks._conv(xb, w, stride, pad), jax.numpy.zeros(kernel_shape, x.dtype))[1](g)[0]

    def channel_major_bwd(res, g):  # 1x1: the narrower operand made channel-major, then an NN dot
        x, k2 = res
        dx = jax.lax.dot_general(g, k2, (((3,), (1,)), ((), ())))
        x2d, g2d = x.reshape(-1, k2.shape[0]), g.reshape(-1, k2.shape[1])
        dw = blocks.channel_major(x2d) @ g2d if k2.shape[0] <= k2.shape[1] else (blocks.channel_major(g2d) @ x2d).T
        return dx, dw.astype(k2.dtype)

    channel_major_1x1 = jax.custom_vjp(blocks._matmul_1x1.fun)
    channel_major_1x1.defvjp(blocks._matmul_1x1_fwd, channel_major_bwd)
    return {
        "ours": {},
        "kxk: XLA's autodiff": {"conv_kxk": lambda x, k, s, p: blocks._conv(x, k, s, p)},
        "kxk: barrier + XLA's dW": {"conv_weight_grad": barrier_then_xla},
        "1x1: channel-major copy + dot": {"_matmul_1x1": channel_major_1x1},
        "3x3/2 dx: XLA's transposed conv": {
            "conv_input_grad": lambda x, g, k, s, p: jax.vjp(lambda xx: blocks._conv(xx, k, s, p), x)[1](g)[0]},
    }


def _batchnorm_variants():
    """BatchNorm formulations to A/B in the real train step: name -> {blocks attribute: replacement}."""
    import jax.numpy as jnp

    from flax_resnet.models import blocks

    def affine(x, scale, bias, epsilon):  # no statistics at all: a bound, not a model
        return x * scale + bias, jnp.zeros(x.shape[-1], jnp.float32), jnp.ones(x.shape[-1], jnp.float32)

    return {"ours (hand-written backward)": {}, "NNX's, autodiffed": {"batch_norm_train": blocks.batch_norm_train_autodiff},
            "affine only (no statistics; bound)": {"batch_norm_train": affine}}


def batchnorm(args) -> None:
    """Our real train step with each BatchNorm formulation, repeats interleaved."""
    _patch_blocks(args, _batchnorm_variants(), "BatchNorm")


def weightgrads(args) -> None:
    _patch_blocks(args, _weightgrad_variants(), "gradients")


def _patch_blocks(args, variants: dict, what: str) -> None:
    """:func:`_ab_steps` with each variant's {attribute: replacement} patched into models.blocks."""
    from unittest import mock

    from flax_resnet.models import blocks

    _ab_steps(args, {name: (lambda p=patches: mock.patch.multiple(blocks, **p) if p else contextlib.nullcontext())
                     for name, patches in variants.items()}, what)


def _ab_steps(args, contexts: dict, what: str, *, evaluate: bool = False) -> None:
    """Our real train (and eval) steps traced and compiled inside each variant's context (name ->
    context-manager factory), their repeats interleaved; one line per variant."""
    from flax_resnet import benchmark

    runners = {}
    for name, context in contexts.items():
        with context():
            cfg = benchmark.BenchmarkConfig(model=args.model, batch=args.batch, conv_impl="auto", eval=evaluate)
            runners[name] = benchmark.build_ours(cfg, _image_size(args), 10)  # traced and compiled here
    for name, (train, evaluation) in _interleaved(runners, args).items():
        print(f"{args.model} batch {args.batch} {what} {name}: train {train:.2f} images/s"
              + (f", eval {evaluation:.1f} images/s" if evaluate else ""), flush=True)


# ResNet-50 (v1.5, batch 16, 224x224): N, H=W in, Cin, Cout, k, stride, how many in the network
RESNET50_KXK = ((16, 224, 3, 64, 7, 2, 1), (16, 56, 64, 64, 3, 1, 3), (16, 56, 128, 128, 3, 2, 1),
                (16, 28, 128, 128, 3, 1, 3), (16, 28, 256, 256, 3, 2, 1), (16, 14, 256, 256, 3, 1, 5),
                (16, 14, 512, 512, 3, 2, 1), (16, 7, 512, 512, 3, 1, 2))


def layers(args) -> None:
    """Each kxk convolution shape of ResNet-50 under our compiler options: forward, input and kernel
    gradients (ours: conv_input_grad, conv_weight_grad; XLA's autodiff beside), ms per call and summed."""
    import jax
    import jax.numpy as jnp

    from flax_resnet.models.blocks import _conv, conv_input_grad, conv_weight_grad
    from flax_resnet.training import steps

    opts = steps.CPU_COMPILER_OPTIONS
    total = collections.Counter()
    for n, h, cin, cout, k, stride, count in RESNET50_KXK:
        pad = k // 2
        x = jax.random.normal(jax.random.key(0), (n, h, h, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
        g = jax.random.normal(jax.random.key(2), (n, h // stride, h // stride, cout))
        fns = {
            "fwd": (jax.jit(lambda x, w: _conv(x, w, stride, pad), compiler_options=opts), (x, w)),
            "dx ours": (jax.jit(lambda g, w: conv_input_grad(x, g, w, stride, pad), compiler_options=opts), (g, w)),
            "dx XLA": (jax.jit(lambda g, w: jax.vjp(lambda xx: _conv(xx, w, stride, pad), x)[1](g)[0],
                               compiler_options=opts), (g, w)),
            "dW ours": (jax.jit(lambda x, g: conv_weight_grad(x, g, w.shape, stride, pad), compiler_options=opts), (x, g)),
            "dW XLA": (jax.jit(lambda x, g: jax.vjp(lambda ww: _conv(x, ww, stride, pad), w)[1](g)[0],
                               compiler_options=opts), (x, g)),
        }
        if cin == 3:  # the stem: nothing needs the image's gradient
            del fns["dx ours"], fns["dx XLA"]
        times = {name: _best_ms(fn, *a, repeats=3) for name, (fn, a) in fns.items()}
        total.update({name: t * count for name, t in times.items()})
        gflop = 2 * n * (h // stride) ** 2 * cin * cout * k * k / 1e9
        print(f"{k}x{k}/{stride} {cin}->{cout} @{h} (x{count}, {gflop:.1f} GFLOP each): "
              + ", ".join(f"{name} {t:.0f} ms ({gflop / t * 1e3:.0f} GFLOP/s)" for name, t in times.items()), flush=True)
    print("summed over the network, ms per step: " + ", ".join(f"{name} {t:.0f}" for name, t in total.items()))


WINOGRAD_SHAPES = ((16, 56, 64), (16, 28, 128), (16, 14, 256), (16, 7, 512), (128, 32, 16), (128, 16, 32),
                   (128, 8, 64))  # N, H=W, C: ResNet-50's and ResNet-20's 3x3 stride-1 convolutions


def winograd_3x3(x, kernel):
    """A 3x3, stride-1, pad-1 convolution (NHWC, HWIO) by Winograd F(2x2, 3x3): 16 batched matmuls
    on transformed 4x4 input tiles, 2.25x fewer multiplies than the direct convolution."""
    import jax
    import jax.numpy as jnp

    def bt(d0, d1, d2, d3):  # B^T d along one axis
        return d0 - d2, d1 + d2, d2 - d1, d1 - d3

    def g3(g0, g1, g2):  # G g along one axis
        return g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2

    n, h, w, c = x.shape
    th, tw = -(-h // 2), -(-w // 2)
    xp = jnp.pad(x, ((0, 0), (1, 1 + 2 * th - h), (1, 1 + 2 * tw - w), (0, 0)))
    d = [[xp[:, i:i + 2 * th:2, j:j + 2 * tw:2, :] for j in range(4)] for i in range(4)]
    rows = [bt(*(d[i][j] for i in range(4))) for j in range(4)]
    v = jnp.stack([t for a in range(4) for t in bt(*(rows[j][a] for j in range(4)))]).reshape(16, -1, c)
    gk = jnp.stack(g3(*kernel))  # [4, 3, ci, co]
    u = jnp.stack(g3(gk[:, 0], gk[:, 1], gk[:, 2]), 1).reshape(16, c, -1)
    m = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))).reshape(4, 4, n, th, tw, -1)
    r = [(m[0, j] + m[1, j] + m[2, j], m[1, j] - m[2, j] - m[3, j]) for j in range(4)]  # A^T m
    y = [[r[0][a] + r[1][a] + r[2][a], r[1][a] - r[2][a] - r[3][a]] for a in range(2)]
    y = jnp.stack([jnp.stack(y[a], 3) for a in range(2)], 2)  # [n, th, 2, tw, 2, co]
    return y.reshape(n, 2 * th, 2 * tw, -1)[:, :h, :w]


def winograd(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax_resnet.models.blocks import _conv
    from flax_resnet.training import steps

    for n, h, c in WINOGRAD_SHAPES:
        x = jax.random.normal(jax.random.key(0), (n, h, h, c))
        k = jax.random.normal(jax.random.key(1), (3, 3, c, c)) / np.sqrt(9 * c)
        ref = np.asarray(jax.jit(lambda x, k: _conv(x, k, 1, 1))(x, k), np.float64)
        err = np.max(np.abs(np.asarray(jax.jit(winograd_3x3)(x, k)) - ref)) / np.max(np.abs(ref))
        flops = 2 * n * h * h * c * c * 9
        line = [f"3x3 {c}->{c} @{h}x{h} b{n} (Winograd error {err:.0e}) direct-equivalent GFLOP/s fwd / fwd+bwd:"]
        for name, fn in (("XLA own", lambda x, k: _conv(x, k, 1, 1)), ("Winograd", winograd_3x3)):
            fwd = jax.jit(fn, compiler_options=steps.CPU_COMPILER_OPTIONS)
            both = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)),
                           compiler_options=steps.CPU_COMPILER_OPTIONS)
            line.append(f"{name} {flops / _best_ms(fwd, x, k) / 1e6:.0f} / {3 * flops / _best_ms(both, x, k) / 1e6:.0f}")
        print(" ".join(line), flush=True)


def native_ops(args) -> None:
    """Each operation alone: XLA's forward and kernel gradients (autodiff, and the channel-major
    one "auto" used before the native kernels) beside the native kernels', 3x3 stride 1."""
    import jax

    from flax_resnet import native
    from flax_resnet.models import blocks
    from flax_resnet.training import steps

    if not native.available():
        raise RuntimeError(f"native kernels unavailable: {native.status()['error']}")
    opts, pads = steps.CPU_COMPILER_OPTIONS, ((1, 1), (1, 1))
    for n, h, cin, cout in CONV_SHAPES:
        x = jax.random.normal(jax.random.key(0), (n, h, h, cin))
        k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
        g = jax.random.normal(jax.random.key(2), (n, h, h, cout))
        gflop = 2 * n * h * h * cin * cout * 9 / 1e6  # per ms
        with native.enabled(False):  # traced here: the "before" paths must not pick up the kernels
            variants = {
                "fwd XLA": (jax.jit(lambda x, k: blocks._conv(x, k, 1, 1), compiler_options=opts), x, k),
                "fwd native": (jax.jit(lambda x, k: native.conv_forward(x, k, 1, pads)), x, k),
                "dW XLA autodiff": (jax.jit(lambda x, g: jax.vjp(lambda kk: blocks._conv(x, kk, 1, 1), k)[1](g)[0],
                                            compiler_options=opts), x, g),
                "dW channel-major": (jax.jit(lambda x, g: blocks.conv_weight_grad(x, g, k.shape, 1, 1),
                                             compiler_options=opts), x, g),
                "dW native": (jax.jit(lambda x, g: native.conv_wgrad(x, g, (3, 3), 1, pads)), x, g),
            }
            rates = [f"{name} {gflop / _best_ms(fn, a, b, repeats=7):.0f}" for name, (fn, a, b) in variants.items()]
        print(f"3x3 {cin}->{cout} @{h}x{h} b{n} GFLOP/s: " + "; ".join(rates), flush=True)


def _torch_conv(n, h, cin, cout, flops) -> str:
    import torch

    x = torch.randn(n, cin, h, h).to(memory_format=torch.channels_last).requires_grad_()
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(memory_format=torch.channels_last)

    def fwd():
        with torch.no_grad():
            conv(x)

    def both():
        (conv(x) ** 2).sum().backward()

    rates = []
    for fn, mult in ((fwd, 1), (both, 3)):
        fn()
        best = min(_timed(fn) for _ in range(5))
        rates.append(mult * flops / best / 1e9)
    return f"PyTorch {rates[0]:.0f} / {rates[1]:.0f}"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def reduction(args) -> None:
    """BatchNorm's statistics under XLA's defaults and three YNNPACK fusion lists."""
    import jax
    import jax.numpy as jnp

    from flax_resnet.training import steps

    variants = (("defaults", None), ("matmuls only", steps.ynn_fusion_options("INDIVIDUAL_DOT")),
                ("ours (matmuls+reductions)", steps.CPU_COMPILER_OPTIONS),
                ("matmuls+reductions+elementwise", steps.ynn_fusion_options("INDIVIDUAL_DOT", "REDUCE", "ELTWISE")))
    for shape in ((16, 28, 28, 512), (16, 56, 56, 64), (128, 32, 32, 16)):
        x = jax.random.normal(jax.random.key(0), shape)
        line = [f"E[x], E[x^2] per channel of {shape}:"]
        for name, opts in variants:
            stats = jax.jit(lambda x: (jnp.mean(x, (0, 1, 2)), jnp.mean(x * x, (0, 1, 2))), compiler_options=opts)
            line.append(f"{name} {_best_ms(stats, x):.2f} ms")
        print(" ".join(line), flush=True)


FUSION_LISTS = ("INDIVIDUAL_DOT", "INDIVIDUAL_DOT,REDUCE", "INDIVIDUAL_DOT,REDUCE,ELTWISE")


def _option_value(text: str):
    return {"true": True, "false": False}.get(text, int(text) if text.isdigit() else text)


def fusions(args) -> None:
    """Our real train and eval steps ("auto" model) under each YNNPACK fusion list, and under our list
    plus other XLA:CPU options (``--options name=value[+name=value]``), repeats interleaved."""
    import os
    from unittest import mock

    from flax_resnet.training import steps

    if steps._YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit(f"XLA_FLAGS sets {steps._YNN_FLAG}, which overrides every list compared here: unset it")
    variants = {kinds: steps.ynn_fusion_options(*kinds.split(",")) for kinds in args.lists}
    for spec in args.options:
        extra = dict(kv.split("=", 1) for kv in spec.split("+"))
        variants[f"ours+{spec}"] = {**steps.CPU_COMPILER_OPTIONS, **{k: _option_value(v) for k, v in extra.items()}}
    _ab_steps(args, {name: (lambda o=options: mock.patch.object(steps, "CPU_COMPILER_OPTIONS", o))
                     for name, options in variants.items()}, "YNNPACK fusions", evaluate=True)


def _interleaved(runners: dict, args) -> dict:
    """Median train (and eval, where the runner has one) images/s per runner, repeats interleaved."""
    import statistics

    for r in runners.values():  # warm-up
        r.train(1)
        if r.eval is not None:
            r.eval(1)
    rates = {name: ([], []) for name in runners}
    for _ in range(args.repeats):
        for name, r in runners.items():
            rates[name][0].append(args.batch * args.steps / r.train(args.steps))
            if r.eval is not None:
                rates[name][1].append(args.batch * args.steps / r.eval(args.steps))
    return {name: (statistics.median(t), statistics.median(e) if e else None) for name, (t, e) in rates.items()}


def _image_size(args) -> int:
    return args.size or (224 if args.model.startswith(("resnet18", "resnet34", "resnet50", "resnet101")) else 32)


def profile(args) -> None:
    import glob
    import tempfile

    import jax
    from jax._src.lib import _profile_data

    from flax_resnet import benchmark

    size = _image_size(args)
    cfg = benchmark.BenchmarkConfig(model=args.model, batch=args.batch, conv_impl=args.conv_impl, eval=False)
    runner = benchmark.build_ours(cfg, size, 10)
    runner.train(2)
    trace_dir = tempfile.mkdtemp(prefix="flax_resnet_profile_")
    with jax.profiler.trace(trace_dir):
        runner.train(args.steps)
    data = _profile_data.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[-1])
    kinds = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads
                for event in line.events:
                    if not event.name.startswith(("ThunkExecutor", "end:")):
                        kinds[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns
    print(f"{args.model} batch {args.batch} conv_impl {args.conv_impl}: thread time per step by op kind "
          "(Eigen convolutions run in untraced pool tasks and are missing)")
    for kind, ns in kinds.most_common(12):
        print(f"  {ns / args.steps / 1e6:9.1f} ms  {kind}")


def faults(args) -> None:
    """Per train step of our real step: wall time, memory page-faulted in, kernel and user CPU time,
    peak resident memory. What :func:`flax_resnet.parallel.tune_host_allocator` removes; run with
    FLAX_RESNET_NO_MALLOC_TUNING=1 for glibc's defaults."""
    import resource

    from flax_resnet import benchmark, parallel

    cfg = benchmark.BenchmarkConfig(model=args.model, batch=args.batch, conv_impl="auto", eval=False)
    runner = benchmark.build_ours(cfg, _image_size(args), 10)
    runner.train(1)
    print(f"{args.model} batch {args.batch}, host allocator tuned: {parallel.host_allocator_tuned()}", flush=True)
    for i in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        wall = runner.train(1)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faulted = (after.ru_minflt - before.ru_minflt) * resource.getpagesize() / 2**20
        print(f"step {i}: {wall * 1e3:.0f} ms, {faulted:.0f} MB faulted in, sys "
              f"{(after.ru_stime - before.ru_stime) * 1e3:.0f} ms, user {(after.ru_utime - before.ru_utime) * 1e3:.0f} ms, "
              f"max RSS {after.ru_maxrss / 1024:.0f} MB", flush=True)


def conditioning(args) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from flax_resnet.models import create_model
    from flax_resnet.training.state import split_model
    from flax_resnet.training import steps

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)), jnp.float32)
    noise = 1e-6 * rng.normal(size=x.shape)

    def rel(a, b):  # worst difference relative to each leaf's largest entry
        return max(jax.tree.leaves(jax.tree.map(
            lambda u, w: float(jnp.max(jnp.abs(u - w)) / (jnp.max(jnp.abs(w)) + 1e-30)), a, b)))

    for impl in ("xla", "auto"):
        graph, params, stats = split_model(create_model(args.model, num_classes=10, conv_impl=impl))

        def loss(params, stats, x):
            y = graph.apply(params, stats, x, train=True)[0]
            return jnp.sum(y * jnp.cos(y))

        grad = jax.grad(loss)
        p64, s64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, stats))
        ref = jax.jit(grad)(p64, s64, x.astype(jnp.float64))
        noisy = jax.jit(grad)(p64, s64, x.astype(jnp.float64) + noise)
        default = jax.jit(grad)(params, stats, x)
        own_convs = jax.jit(grad, compiler_options=steps.CPU_COMPILER_OPTIONS)(params, stats, x)
        print(f"{args.model} b{args.batch} {args.size}x{args.size} conv_impl={impl}: float64 sensitivity to 1e-6 "
              f"input noise {rel(noisy, ref):.1e}; float32 error vs float64: XLA's defaults {rel(default, ref):.1e}, "
              f"our compiler options {rel(own_convs, ref):.1e}", flush=True)
    kinks = relu_kinks(graph, p64, s64, x.astype(jnp.float64))  # the same parameters for both paths
    print("ReLU inputs nearest zero in float64, per ReLU in forward order (HxW:channels min|input|): "
          + " ".join(f"{h}x{w}:{c} {m:.0e}" for (h, w, c), m in kinks), flush=True)
    print(f"bfloat16 compute vs float32, gradient relative L2: {_bf16_gap(args.model, x)}", flush=True)


def _bf16_gap(model: str, x) -> str:
    """Relative L2 distance of the bfloat16-compute gradient from float32's, with ReLU and with GELU."""
    from unittest import mock

    import jax
    import numpy as np
    from flax import nnx

    from flax_resnet.models import create_model
    from flax_resnet.training.state import split_model

    def grad(act, dtype):
        graph, params, stats = split_model(create_model(model, num_classes=10, conv_impl="xla", dtype=dtype))

        def loss(params):
            y = graph.apply(params, stats, x, train=True)[0].astype("float32")
            return (y * jax.numpy.cos(y)).sum()

        with mock.patch.object(nnx, "relu", act):
            g = jax.jit(jax.grad(loss))(params)
        return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(g)]), params, stats

    out = []
    for name, act in (("ReLU", nnx.relu), ("GELU", jax.nn.gelu)):
        (g32, params, stats), (g16, _, _) = grad(act, "float32"), grad(act, "bfloat16")
        out.append(f"{name} {np.linalg.norm(g16 - g32) / np.linalg.norm(g32):.3f}")
        if name == "ReLU":
            try:  # the same float32 weights in PyTorch
                out.append(f"PyTorch autocast(bfloat16) on the same weights (ReLU) "
                           f"{_torch_bf16_gap(model, params, stats, x):.3f}")
            except ImportError:
                pass
    return ", ".join(out)


def _torch_bf16_gap(model: str, params, stats, x) -> float:
    import numpy as np
    import torch

    from flax_resnet import torch_reference

    grads = []
    for autocast in (False, True):
        net = torch_reference.create_torch_model(model, 10, 3)
        torch_reference.load_flax_weights(net, params, stats)
        net.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = net(torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2).contiguous()).float()
        (y * torch.cos(y)).sum().backward()
        grads.append(torch.cat([p.grad.double().flatten() for p in net.parameters()]))
    return float((grads[1] - grads[0]).norm() / grads[0].norm())


def relu_kinks(graph, params, stats, x) -> list[tuple[tuple[int, int, int], float]]:
    """Each ReLU's input nearest zero in a train-mode forward (run eagerly, in the inputs' dtype).

    A ReLU net's gradient jumps where a pre-activation crosses zero, so a pre-activation within
    float32 rounding (~1e-6) of zero makes float32 gradients legitimately differ between
    compiles; input noise (the sensitivity above) rarely lands on such a unit, this finds them.
    """
    from unittest import mock

    import jax.numpy as jnp
    from flax import nnx

    found, relu = [], nnx.relu

    def recording(v):
        found.append(((v.shape[1], v.shape[2], v.shape[3]), float(jnp.min(jnp.abs(v)))))
        return relu(v)

    with mock.patch.object(nnx, "relu", recording):
        graph.apply(params, stats, x, train=True)
    if not found:
        raise RuntimeError("no ReLU went through flax.nnx.relu: the models no longer call it, update this probe")
    return found


def main(argv=None) -> int:
    from flax_resnet import parallel

    parallel.tune_host_allocator()  # as training and `flax-resnet` run (FLAX_RESNET_NO_MALLOC_TUNING=1: glibc's defaults)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="probe", required=True)
    sub.add_parser("convs", help="3x3 convolution GFLOP/s")
    sub.add_parser("native", help="forward and kernel gradient alone: XLA's vs the native kernels'")
    sub.add_parser("layers", help="ResNet-50's kxk convolutions one by one")
    sub.add_parser("winograd", help="3x3 convolutions by Winograd F(2x2,3x3) vs XLA's own")
    sub.add_parser("reduction", help="BatchNorm statistics vs YNNPACK fusion lists")
    for name in ("profile", "conditioning", "fusions", "weightgrads", "batchnorm", "faults"):
        q = sub.add_parser(name)
        q.add_argument("--model", default="resnet20")
        q.add_argument("--batch", type=int, default=8 if name == "conditioning" else 128)
        q.add_argument("--size", type=int, default=32 if name == "conditioning" else None)
        if name == "profile":
            q.add_argument("--conv-impl", choices=("auto", "xla"), default="auto")
            q.add_argument("--steps", type=int, default=2)
        if name == "faults":
            q.add_argument("--steps", type=int, default=10, help="steps measured one by one")
        if name in ("fusions", "weightgrads", "batchnorm"):
            q.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
            q.add_argument("--repeats", type=int, default=3)
        if name == "fusions":
            q.add_argument("--lists", nargs="*", default=FUSION_LISTS,
                           help="comma-separated LIBRARY_FUSION_TYPE_ suffixes, one list per variant")
            q.add_argument("--options", nargs="*", default=(), metavar="NAME=VALUE[+NAME=VALUE]",
                           help="more variants: our fusion list plus these XLA:CPU compiler options")
    args = p.parse_args(argv)
    {"convs": convs, "native": native_ops, "layers": layers, "winograd": winograd, "reduction": reduction, "profile": profile,
     "conditioning": conditioning, "fusions": fusions, "weightgrads": weightgrads,
     "batchnorm": batchnorm, "faults": faults}[args.probe](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
