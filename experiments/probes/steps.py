"""Probes of our real train/eval steps: formulations and compiler options A/B, profile, page faults."""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import re
import resource
import statistics
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
from jax._src.lib import _profile_data

from flax_resnet import cpu
from flax_resnet.benchmark import BenchmarkConfig, build_ours
from flax_resnet.cpu import batchnorm as cpu_bn, convs as cpu_convs, xla


def _weightgrad_variants():
    """Gradient formulations to A/B in the real train step: name -> {cpu.convs attribute: replacement}."""
    def barrier_then_xla(x, g, kernel_shape, stride, pad):  # XLA's own dW, its input fenced off
        xb = jax.lax.optimization_barrier(x)
        return jax.vjp(lambda w: cpu_convs.xla_conv(xb, w, stride, pad), jax.numpy.zeros(kernel_shape, x.dtype))[1](g)[0]

    def channel_major_bwd(res, g):  # 1x1: the narrower operand made channel-major, then an NN dot
        x, k2 = res
        dx = jax.lax.dot_general(g, k2, (((3,), (1,)), ((), ())))
        x2d, g2d = x.reshape(-1, k2.shape[0]), g.reshape(-1, k2.shape[1])
        dw = cpu_convs.channel_major(x2d) @ g2d if k2.shape[0] <= k2.shape[1] else (cpu_convs.channel_major(g2d) @ x2d).T
        return dx, dw.astype(k2.dtype)

    channel_major_1x1 = jax.custom_vjp(cpu_convs._matmul_1x1.fun)
    channel_major_1x1.defvjp(cpu_convs._matmul_1x1_fwd, channel_major_bwd)
    return {
        "ours": {},
        "kxk: XLA's autodiff": {"conv_kxk": lambda x, k, s, p: cpu_convs.xla_conv(x, k, s, p)},
        "kxk: barrier + XLA's dW": {"conv_weight_grad": barrier_then_xla},
        "1x1: channel-major copy + dot": {"_matmul_1x1": channel_major_1x1},
        "3x3/2 dx: XLA's transposed conv": {
            "conv_input_grad": lambda x, g, k, s, p: jax.vjp(lambda xx: cpu_convs.xla_conv(xx, k, s, p), x)[1](g)[0]},
    }


def _batchnorm_variants():
    """BatchNorm formulations to A/B in the real train step: name -> {cpu.batchnorm attribute: replacement}."""
    def affine(x, scale, bias, epsilon):  # no statistics at all: a bound, not a model
        return x * scale + bias, jnp.zeros(x.shape[-1], jnp.float32), jnp.ones(x.shape[-1], jnp.float32)

    return {"ours (hand-written backward)": {}, "NNX's, autodiffed": {"batch_norm_train": cpu_bn.batch_norm_train_autodiff},
            "affine only (no statistics; bound)": {"batch_norm_train": affine}}


def batchnorm(args) -> None:
    """Our real train step with each BatchNorm formulation, repeats interleaved."""
    _patch(cpu_bn, args, _batchnorm_variants(), "BatchNorm")


def weightgrads(args) -> None:
    _patch(cpu_convs, args, _weightgrad_variants(), "gradients")


def _patch(module, args, variants: dict, what: str) -> None:
    """:func:`_ab_steps` with each variant's {attribute: replacement} patched into ``module``."""
    _ab_steps(args, {name: (lambda p=patches: mock.patch.multiple(module, **p) if p else contextlib.nullcontext())
                     for name, patches in variants.items()}, what)


_KXK, _ALL, _ANY = {"kxk": 1 << 30}, {"kxk": 1 << 30, "1x1": 1 << 30}, 1 << 30
ONEDNN_TABLES = {  # variant -> oneDNN's SERVES (kind of kernel -> most channels) for every dtype
    "off": {},
    "current": None,  # the table onednn.SERVES holds
    "kxk": {"forward": _KXK, "bwd_data": _KXK, "bwd_weights": _KXK},
    "kxk, dW <= 256": {"forward": _KXK, "bwd_data": _KXK, "bwd_weights": {"kxk": 256}},
    "all": {"forward": _ALL, "bwd_data": _ALL, "bwd_weights": _ALL},
    "eval only": {"fused": _ALL},  # the fused eval step's convolutions; training's stay native/XLA
}


def onednn_steps(args) -> None:
    """Our train and eval steps with oneDNN serving each listed set of convolutions (A/B)."""
    tables = {name: cpu.onednn.SERVES if ONEDNN_TABLES[name] is None
              else {dt: ONEDNN_TABLES[name] for dt in ("float32", "bfloat16")} for name in args.variants}
    _ab_steps(args, {name: (lambda t=t: mock.patch.object(cpu.onednn, "SERVES", t)) for name, t in tables.items()},
              f"{args.dtype} oneDNN", evaluate=True)


def _ab_steps(args, contexts: dict, what: str, *, evaluate: bool = False) -> None:
    """Our real train (and eval) steps traced and compiled inside each variant's context (name ->
    context-manager factory), their repeats interleaved; one line per variant."""
    runners = {}
    for name, context in contexts.items():
        with context():
            cfg = BenchmarkConfig(model=args.model, batch=args.batch, eval=evaluate,
                                  dtype=getattr(args, "dtype", "float32"))
            runners[name] = build_ours(cfg, _image_size(args), 10)  # traced and compiled here
    for name, (train, evaluation) in _interleaved(runners, args).items():
        print(f"{args.model} batch {args.batch} {what} {name}: train {train:.2f} images/s"
              + (f", eval {evaluation:.1f} images/s" if evaluate else ""), flush=True)


FUSION_LISTS = ("INDIVIDUAL_DOT", "INDIVIDUAL_DOT,REDUCE", "INDIVIDUAL_DOT,REDUCE,ELTWISE")


def _option_value(text: str):
    return {"true": True, "false": False}.get(text, int(text) if text.isdigit() else text)


def fusions(args) -> None:
    """Our real train and eval steps ("auto" model) under each YNNPACK fusion list, and under our list
    plus other XLA:CPU options (``--options name=value[+name=value]``), repeats interleaved."""
    if xla._YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit(f"XLA_FLAGS sets {xla._YNN_FLAG}, which overrides every list compared here: unset it")
    variants = {kinds: xla.ynn_fusion_options(*kinds.split(",")) for kinds in args.lists}
    for spec in args.options:
        extra = dict(kv.split("=", 1) for kv in spec.split("+"))
        variants[f"ours+{spec}"] = {**cpu.COMPILER_OPTIONS, **{k: _option_value(v) for k, v in extra.items()}}
    _ab_steps(args, {name: (lambda o=options: mock.patch.object(xla, "COMPILER_OPTIONS", o))
                     for name, options in variants.items()}, "YNNPACK fusions", evaluate=True)


def _interleaved(runners: dict, args) -> dict:
    """Median train (and eval, where the runner has one) images/s per runner, repeats interleaved."""
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
    size = _image_size(args)
    cfg = BenchmarkConfig(model=args.model, batch=args.batch, cpu_fast_path=not args.plain, eval=False)
    runner = build_ours(cfg, size, 10)
    runner.train(2)
    trace_dir = tempfile.mkdtemp(prefix="flax_resnet_profile_")
    before = resource.getrusage(resource.RUSAGE_SELF)
    with jax.profiler.trace(trace_dir):
        runner.train(args.steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    data = _profile_data.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[-1])
    kinds = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads
                for event in line.events:
                    if not event.name.startswith(("ThunkExecutor", "end:")):
                        kinds[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns
    print(f"{args.model} batch {args.batch} {'plain' if args.plain else 'CPU backend'}: thread time per step by op kind "
          "(Eigen convolutions run in untraced pool tasks and are missing)")
    for kind, ns in kinds.most_common(12):
        print(f"  {ns / args.steps / 1e6:9.1f} ms  {kind}")
    # A heap still growing (the step's buffers placed anew: docs/performance.md, "Steps in
    # flight") faults its pages in inside the first ops to write them: such a profile is skewed.
    faulted = _faulted_mb(before, after) / args.steps
    print(f"  page-faulted in: {faulted:.0f} MB per step, system CPU {(after.ru_stime - before.ru_stime) / args.steps:.2f}"
          " s per step" + ("  <- a growing heap; run again" if faulted > 64 else ""))


def _faulted_mb(before, after) -> float:
    """MB of memory page-faulted in between two ``resource.getrusage`` readings."""
    return (after.ru_minflt - before.ru_minflt) * resource.getpagesize() / 2**20


def faults(args) -> None:
    """Per train step of our real step: wall time, memory page-faulted in, kernel and user CPU time,
    peak resident memory. What :func:`flax_resnet.cpu.tune_host_allocator` removes; run with
    FLAX_RESNET_NO_MALLOC_TUNING=1 for glibc's defaults."""
    cfg = BenchmarkConfig(model=args.model, batch=args.batch, eval=False)
    runner = build_ours(cfg, _image_size(args), 10)
    runner.train(1)
    print(f"{args.model} batch {args.batch}, host allocator tuned: {cpu.host_allocator_tuned()}", flush=True)
    for i in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        wall = runner.train(1)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faulted = _faulted_mb(before, after)
        print(f"step {i}: {wall * 1e3:.0f} ms, {faulted:.0f} MB faulted in, sys "
              f"{(after.ru_stime - before.ru_stime) * 1e3:.0f} ms, user {(after.ru_utime - before.ru_utime) * 1e3:.0f} ms, "
              f"max RSS {after.ru_maxrss / 1024:.0f} MB", flush=True)
