"""Probes of single operations: convolutions, their gradients, BatchNorm's reductions, alone."""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax_resnet import cpu
from flax_resnet.cpu import convs as cpu_convs, xla

CONV_SHAPES = ((128, 32, 16, 16), (128, 16, 32, 32), (128, 8, 64, 64), (16, 56, 64, 64),  # N, H=W, Cin, Cout
               (16, 28, 128, 128), (16, 14, 256, 256), (16, 7, 512, 512))


def _best_ms(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def convs(args) -> None:
    for n, h, cin, cout in CONV_SHAPES:
        x = jax.random.normal(jax.random.key(0), (n, h, h, cin))
        k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.1
        flops = 2 * n * h * h * cin * cout * 9
        line = [f"3x3 {cin}->{cout} @{h}x{h} b{n} GFLOP/s fwd / fwd+bwd:"]
        variants = (("YNNPACK (default)", None, cpu_convs.xla_conv), ("XLA own", cpu.COMPILER_OPTIONS, cpu_convs.xla_conv),
                    ("ours (native where served)", cpu.COMPILER_OPTIONS, cpu_convs.conv_kxk))
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


# ResNet-50 (v1.5, batch 16, 224x224): N, H=W in, Cin, Cout, k, stride, how many in the network
RESNET50_KXK = ((16, 224, 3, 64, 7, 2, 1), (16, 56, 64, 64, 3, 1, 3), (16, 56, 128, 128, 3, 2, 1),
                (16, 28, 128, 128, 3, 1, 3), (16, 28, 256, 256, 3, 2, 1), (16, 14, 256, 256, 3, 1, 5),
                (16, 14, 512, 512, 3, 2, 1), (16, 7, 512, 512, 3, 1, 2))


def layers(args) -> None:
    """Each kxk convolution shape of ResNet-50 under our compiler options: forward, input and kernel
    gradients (ours: conv_input_grad, conv_weight_grad; XLA's autodiff beside), ms per call and summed."""
    opts = cpu.COMPILER_OPTIONS
    total = collections.Counter()
    for n, h, cin, cout, k, stride, count in RESNET50_KXK:
        pad = k // 2
        x = jax.random.normal(jax.random.key(0), (n, h, h, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
        g = jax.random.normal(jax.random.key(2), (n, h // stride, h // stride, cout))
        fns = {
            "fwd": (jax.jit(lambda x, w: cpu_convs.xla_conv(x, w, stride, pad), compiler_options=opts), (x, w)),
            "dx ours": (jax.jit(lambda g, w: cpu_convs.conv_input_grad(x, g, w, stride, pad), compiler_options=opts), (g, w)),
            "dx XLA": (jax.jit(lambda g, w: jax.vjp(lambda xx: cpu_convs.xla_conv(xx, w, stride, pad), x)[1](g)[0],
                               compiler_options=opts), (g, w)),
            "dW ours": (jax.jit(lambda x, g: cpu_convs.conv_weight_grad(x, g, w.shape, stride, pad), compiler_options=opts), (x, g)),
            "dW XLA": (jax.jit(lambda x, g: jax.vjp(lambda ww: cpu_convs.xla_conv(x, ww, stride, pad), w)[1](g)[0],
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
    for n, h, c in WINOGRAD_SHAPES:
        x = jax.random.normal(jax.random.key(0), (n, h, h, c))
        k = jax.random.normal(jax.random.key(1), (3, 3, c, c)) / np.sqrt(9 * c)
        ref = np.asarray(jax.jit(lambda x, k: cpu_convs.xla_conv(x, k, 1, 1))(x, k), np.float64)
        err = np.max(np.abs(np.asarray(jax.jit(winograd_3x3)(x, k)) - ref)) / np.max(np.abs(ref))
        flops = 2 * n * h * h * c * c * 9
        line = [f"3x3 {c}->{c} @{h}x{h} b{n} (Winograd error {err:.0e}) direct-equivalent GFLOP/s fwd / fwd+bwd:"]
        for name, fn in (("XLA own", lambda x, k: cpu_convs.xla_conv(x, k, 1, 1)), ("Winograd", winograd_3x3)):
            fwd = jax.jit(fn, compiler_options=cpu.COMPILER_OPTIONS)
            both = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)),
                           compiler_options=cpu.COMPILER_OPTIONS)
            line.append(f"{name} {flops / _best_ms(fwd, x, k) / 1e6:.0f} / {3 * flops / _best_ms(both, x, k) / 1e6:.0f}")
        print(" ".join(line), flush=True)


def native_ops(args) -> None:
    """Each operation alone: XLA's forward and kernel gradients (autodiff, and the channel-major
    one "auto" used before the native kernels) beside the native kernels', 3x3 stride 1."""
    if not cpu.native.available():
        raise RuntimeError(f"native kernels unavailable: {cpu.native.status()['error']}")
    opts, pads = cpu.COMPILER_OPTIONS, ((1, 1), (1, 1))
    for n, h, cin, cout in CONV_SHAPES:
        x = jax.random.normal(jax.random.key(0), (n, h, h, cin))
        k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
        g = jax.random.normal(jax.random.key(2), (n, h, h, cout))
        gflop = 2 * n * h * h * cin * cout * 9 / 1e6  # per ms
        with cpu.native.enabled(False):  # traced here: the "before" paths must not pick up the kernels
            variants = {
                "fwd XLA": (jax.jit(lambda x, k: cpu_convs.xla_conv(x, k, 1, 1), compiler_options=opts), x, k),
                "fwd native": (jax.jit(lambda x, k: cpu.native.conv_forward(x, k, 1, pads)), x, k),
                "dW XLA autodiff": (jax.jit(lambda x, g: jax.vjp(lambda kk: cpu_convs.xla_conv(x, kk, 1, 1), k)[1](g)[0],
                                            compiler_options=opts), x, g),
                "dW channel-major": (jax.jit(lambda x, g: cpu_convs.conv_weight_grad(x, g, k.shape, 1, 1),
                                             compiler_options=opts), x, g),
                "dW native": (jax.jit(lambda x, g: cpu.native.conv_wgrad(x, g, (3, 3), 1, pads)), x, g),
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
    variants = (("defaults", None), ("matmuls only", xla.ynn_fusion_options("INDIVIDUAL_DOT")),
                ("ours (matmuls+reductions)", cpu.COMPILER_OPTIONS),
                ("matmuls+reductions+elementwise", xla.ynn_fusion_options("INDIVIDUAL_DOT", "REDUCE", "ELTWISE")))
    for shape in ((16, 28, 28, 512), (16, 56, 56, 64), (128, 32, 32, 16)):
        x = jax.random.normal(jax.random.key(0), shape)
        line = [f"E[x], E[x^2] per channel of {shape}:"]
        for name, opts in variants:
            stats = jax.jit(lambda x: (jnp.mean(x, (0, 1, 2)), jnp.mean(x * x, (0, 1, 2))), compiler_options=opts)
            line.append(f"{name} {_best_ms(stats, x):.2f} ms")
        print(" ".join(line), flush=True)


# Every convolution shape of ResNet-20 (batch 128) and ResNet-50 (batch 16 @224; --batch scales
# the latter): N, H=W in, Cin, Cout, k, stride.
RESNET20_CONVS = ((128, 32, 16, 16, 3, 1), (128, 32, 16, 32, 3, 2), (128, 16, 32, 32, 3, 1), (128, 16, 32, 64, 3, 2),
                  (128, 8, 64, 64, 3, 1))
RESNET50_CONVS = ((16, 224, 3, 64, 7, 2), (16, 56, 64, 64, 3, 1), (16, 56, 128, 128, 3, 2), (16, 28, 128, 128, 3, 1),
                  (16, 28, 256, 256, 3, 2), (16, 14, 256, 256, 3, 1), (16, 14, 512, 512, 3, 2), (16, 7, 512, 512, 3, 1),
                  (16, 56, 64, 256, 1, 1), (16, 56, 256, 64, 1, 1), (16, 56, 256, 128, 1, 1), (16, 28, 128, 512, 1, 1),
                  (16, 28, 512, 128, 1, 1), (16, 14, 256, 1024, 1, 1), (16, 14, 1024, 256, 1, 1),
                  (16, 7, 512, 2048, 1, 1), (16, 7, 2048, 512, 1, 1), (16, 56, 256, 512, 1, 2))


def onednn_ops(args) -> None:
    """Each convolution of ResNet-20 and ResNet-50 alone, ms per call: forward, input gradient (dx) and
    kernel gradient (dW) by XLA's paths (our formulations without custom calls), the native kernels
    (where they take the shape) and oneDNN, in ``args.dtype``."""
    if not cpu.onednn.available():
        raise RuntimeError(f"oneDNN unavailable: {cpu.onednn.status()['error']}")
    dt, opts = jnp.dtype(args.dtype), cpu.COMPILER_OPTIONS
    shapes = [s for s in RESNET20_CONVS if "resnet20" in args.models]
    shapes += [(args.batch, *s[1:]) for s in RESNET50_CONVS if "resnet50" in args.models]
    for n, h, cin, cout, k, stride in shapes:
        pad, pads = k // 2, ((k // 2,) * 2,) * 2
        x = jax.random.normal(jax.random.key(0), (n, h, h, cin), dt)
        w = (jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05).astype(dt)
        ho = (h + 2 * pad - k) // stride + 1
        g = jax.random.normal(jax.random.key(2), (n, ho, ho, cout), dt)
        fns = {}
        with cpu.native.enabled(False):  # XLA's paths: no custom call traced in
            if k == 1:
                fns["fwd XLA"] = (lambda x, w: cpu_convs.conv1x1(x, w, stride), x, w)
                vjp = lambda x, w, g: jax.vjp(lambda x, w: cpu_convs.conv1x1(x, w, stride), x, w)[1](g)  # noqa: E731
                fns["dx XLA"] = (lambda g, w: vjp(x, w, g)[0], g, w)
                fns["dW XLA"] = (lambda x, g: vjp(x, w, g)[1], x, g)
            else:
                fns["fwd XLA"] = (lambda x, w: cpu_convs.xla_conv(x, w, stride, pad), x, w)
                fns["dx XLA"] = (lambda g, w: cpu_convs.conv_input_grad(x, g, w, stride, pad), g, w)
                fns["dW XLA"] = (lambda x, g: cpu_convs.conv_weight_grad(x, g, w.shape, stride, pad), x, g)
            fns = {name: (jax.jit(f, compiler_options=opts), a, b) for name, (f, a, b) in fns.items()}
        if k > 1 and cpu.native.supports(x.shape, w.shape, x.dtype, w.dtype):
            fns["fwd native"] = (jax.jit(lambda x, w: cpu_convs.conv2d(x, w, stride, pads)), x, w)
            if stride == 1:
                fns["dx native"] = (jax.jit(lambda g, w: cpu_convs.conv_input_grad(x, g, w, stride, pad),
                                            compiler_options=opts), g, w)
        if k > 1 and cpu.native.supports(x.shape, w.shape, x.dtype, w.dtype, op="wgrad"):
            fns["dW native"] = (jax.jit(lambda x, g: cpu.native.conv_wgrad(x, g, (k, k), stride, pads)), x, g)
        fns["fwd oneDNN"] = (jax.jit(lambda x, w: cpu.onednn.conv_forward(x, w, stride, pads)), x, w)
        if cin > 3:
            fns["dx oneDNN"] = (jax.jit(lambda g, w: cpu.onednn.conv_bwd_data(g, w, x.shape, stride, pads)), g, w)
        else:
            del fns["dx XLA"]
        fns["dW oneDNN"] = (jax.jit(lambda x, g: cpu.onednn.conv_bwd_weights(x, g, (k, k), stride, pads)), x, g)
        times = {name: _best_ms(f, a, b, repeats=args.repeats) for name, (f, a, b) in sorted(fns.items())}
        gflop = 2 * n * ho * ho * cin * cout * k * k / 1e9
        print(f"{k}x{k}/{stride} {cin}->{cout} @{h} b{n} {dt.name} ({gflop:.2f} GFLOP), ms: "
              + "; ".join(f"{name} {t:.2f}" for name, t in times.items()), flush=True)
