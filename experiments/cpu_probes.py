"""The probes behind BUILD_NOTES.md "Performance": where XLA:CPU loses time, and how well conditioned a gradient is.

    python experiments/cpu_probes.py convs          # 3x3 conv GFLOP/s: YNNPACK vs XLA's own vs PyTorch
    python experiments/cpu_probes.py reduction      # BatchNorm statistics under three YNNPACK fusion lists
    python experiments/cpu_probes.py profile --model resnet50 --batch 16 --conv-impl xla
                                                    # per-op thread time of one train step, by op kind
    python experiments/cpu_probes.py conditioning --model resnet18 --batch 8 --size 32
                                                    # gradient vs float64, and float64's sensitivity to 1e-6 noise

Each prints one line per measurement. Timings are minima of repeats (convs, reduction) or
thread time summed over the profiled steps (profile); run them on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time

CONV_SHAPES = ((128, 32, 16, 16), (128, 16, 32, 32), (128, 8, 64, 64), (16, 56, 64, 64))  # N, H=W, Cin, Cout


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

    from flax_resnet.models.blocks import _conv

    for n, h, cin, cout in CONV_SHAPES:
        x = jax.random.normal(jax.random.key(0), (n, h, h, cin))
        k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.1
        flops = 2 * n * h * h * cin * cout * 9
        line = [f"3x3 {cin}->{cout} @{h}x{h} b{n} GFLOP/s fwd / fwd+bwd:"]
        for name, opts in (("YNNPACK (default)", None), ("XLA own", steps.CPU_COMPILER_OPTIONS)):
            fwd = jax.jit(lambda x, k: _conv(x, k, 1, 1), compiler_options=opts)
            both = jax.jit(jax.grad(lambda x, k: jnp.sum(_conv(x, k, 1, 1) ** 2), argnums=(0, 1)),
                           compiler_options=opts)
            line.append(f"{name} {flops / _best_ms(fwd, x, k) / 1e6:.0f} / {3 * flops / _best_ms(both, x, k) / 1e6:.0f}")
        try:
            line.append(_torch_conv(n, h, cin, cout, flops))
        except ImportError:
            pass
        print("; ".join(line), flush=True)


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
    """BatchNorm's statistics under three YNNPACK fusion lists: what ours costs them."""
    import jax
    import jax.numpy as jnp

    from flax_resnet.training import steps

    with_reductions = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                       "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE"}
    for shape in ((16, 28, 28, 512), (16, 56, 56, 64), (128, 32, 32, 16)):
        x = jax.random.normal(jax.random.key(0), shape)
        line = [f"E[x], E[x^2] per channel of {shape}:"]
        for name, opts in (("defaults", None), ("ours (YNNPACK dots only)", steps.CPU_COMPILER_OPTIONS),
                           ("dots+reductions+elementwise", with_reductions)):
            stats = jax.jit(lambda x: (jnp.mean(x, (0, 1, 2)), jnp.mean(x * x, (0, 1, 2))), compiler_options=opts)
            line.append(f"{name} {_best_ms(stats, x):.2f} ms")
        print(" ".join(line), flush=True)


def profile(args) -> None:
    import glob
    import tempfile

    import jax
    from jax._src.lib import _profile_data

    from flax_resnet import benchmark

    size = args.size or (224 if args.model.startswith(("resnet18", "resnet34", "resnet50", "resnet101")) else 32)
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
              f"input noise {rel(noisy, ref):.1e}; float32 error vs float64: YNNPACK convs {rel(default, ref):.1e}, "
              f"XLA's own convs {rel(own_convs, ref):.1e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="probe", required=True)
    sub.add_parser("convs", help="3x3 convolution GFLOP/s")
    sub.add_parser("reduction", help="BatchNorm statistics vs YNNPACK fusion lists")
    for name in ("profile", "conditioning"):
        q = sub.add_parser(name)
        q.add_argument("--model", default="resnet20")
        q.add_argument("--batch", type=int, default=8 if name == "conditioning" else 128)
        q.add_argument("--size", type=int, default=32 if name == "conditioning" else None)
        if name == "profile":
            q.add_argument("--conv-impl", choices=("auto", "xla"), default="auto")
            q.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    {"convs": convs, "reduction": reduction, "profile": profile, "conditioning": conditioning}[args.probe](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
