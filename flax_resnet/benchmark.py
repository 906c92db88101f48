"""Benchmark harness: our real train/eval steps, optionally against a PyTorch reference.

``flax-resnet benchmark --model resnet20 --batch 128 --image-size 32`` times the very
step training uses (:func:`flax_resnet.training.steps.jit_train_step` on a real
:class:`~flax_resnet.training.state.TrainState` with the recipe's SGD + momentum + weight
decay), on a fixed synthetic batch, and reports as JSON:

* ``compile_s``: lowering + compiling the train step (and ``eval_compile_s``);
* ``train`` / ``eval``: steady-state images/s, the *median* over ``repeats`` timed
  repeats of ``steps`` steps each, after ``warmup`` untimed steps (plus every repeat's
  rate, so the spread is visible);
* ``memory``: XLA's buffer plan of the compiled train step (arguments, outputs, temporaries,
  the peak estimate), the device allocator's peak where it reports one (GPUs), and the
  process's peak resident memory;
* ``flops``: the model's forward FLOPs per image (XLA cost analysis, multiply-add = 2),
  train FLOPs per image (3x forward, the usual model-FLOPs convention), what XLA counts for
  the compiled train step, and the achieved train/eval FLOP/s.

With ``compare_torch`` an equivalent PyTorch model (:mod:`flax_resnet.torch_reference`,
channels_last, ``torch.optim.SGD`` with the same momentum and kernel-only weight decay) runs
in the same process, its repeats *interleaved* with ours (ours, theirs, ours, ...), so both
see the same machine load; ``ratio`` is ours/theirs images/s (> 1: we are faster).

:func:`loop_overhead` measures the other half of the story: images/s through the real
training loop (:func:`~flax_resnet.training.loop.train_and_evaluate`: data pipeline,
sharding, metric fetches, logging, progress bar) against the bare step on the same model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_resnet.errors import UserError

# The keys every result carries (tests check them; documented in the module docstring).
RESULT_KEYS = ("model", "conv_impl", "batch", "image_size", "in_channels", "num_classes", "dtype", "steps", "repeats",
               "warmup", "device", "num_devices", "compile_s", "eval_compile_s", "train", "eval", "memory",
               "flops", "variants", "torch", "ratio", "environment")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Dense bfloat16 tensor-core peaks (vendor data sheets, no sparsity), matched against the
# device name JAX reports; --peak-tflops overrides. CPUs have no entry (see BUILD_NOTES.md).
BF16_PEAK_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
                   "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}


@dataclasses.dataclass
class BenchmarkConfig:
    """What to benchmark.

    Attributes:
      model: a registered model name.
      batch: global batch size.
      image_size: square input side (default: the model's).
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      steps: steps per timed repeat; repeats: timed repeats (the median is reported);
      warmup: untimed steps run first (after compilation).
      eval: also time the eval step.
      compare_torch: also time the PyTorch reference, interleaved with ours.
      torch_compile: wrap the PyTorch model in ``torch.compile`` (for GPUs; slow to compile on CPU).
      in_channels, num_classes: input channels and classifier size (default: the model's).
      conv_impl: the model's ``conv_impl``: "auto" (the default, the CPU fast path) or "xla"
        (plain ``nnx.Conv``/``nnx.BatchNorm``), see :mod:`flax_resnet.models.blocks`.
      compare_conv_impl: also time our step built with this other formulation, interleaved.
      peak_flops: the device's peak FLOP/s for ``fraction_of_peak`` (default: bfloat16 tensor-core
        peak of a known GPU, else none).
      seed: parameter/data seed.
    """

    model: str = "resnet20"
    batch: int = 128
    image_size: int | None = None
    dtype: str = "float32"
    steps: int = 10
    repeats: int = 5
    warmup: int = 2
    eval: bool = True
    compare_torch: bool = False
    torch_compile: bool = False
    in_channels: int = 3
    num_classes: int | None = None
    conv_impl: str = "auto"
    compare_conv_impl: str | None = None
    peak_flops: float | None = None
    seed: int = 0


def _rate_summary(times: list[float], batch: int, steps: int) -> dict[str, Any]:
    """Median images/s over repeats (each ``steps`` steps of ``batch`` images) and the raw rates."""
    rates = [batch * steps / t for t in times]
    med = statistics.median(rates)
    return {"images_per_sec": med, "step_ms": 1e3 * batch / med,
            "repeats_images_per_sec": [round(r, 2) for r in rates]}


# --------------------------------------------------------------------------- ours
@dataclasses.dataclass
class _Runner:
    """Runs ``n`` steps and blocks until they are done; returns the seconds taken."""

    name: str
    train: Callable[[int], float]
    eval: Callable[[int], float] | None
    info: dict[str, Any]


def _train_config(cfg: BenchmarkConfig):
    from flax_resnet.configs import default

    c = default.get_config()
    c.model = cfg.model
    c.batch_size = cfg.batch
    c.half_precision = cfg.dtype == "bfloat16"
    c.seed = cfg.seed
    c.schedule = "constant"
    c.model_kwargs.conv_impl = cfg.conv_impl
    return c


def _synthetic_batch(cfg: BenchmarkConfig, size: int, num_classes: int, *, torch_layout: bool = False):
    rng = np.random.default_rng(cfg.seed)
    images = rng.standard_normal((cfg.batch, size, size, cfg.in_channels), dtype=np.float32)
    labels = rng.integers(0, num_classes, cfg.batch).astype(np.int32)
    return {"image": images, "label": labels}


def _memory_analysis(compiled) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        m = None
    if m is not None:
        for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                    "alias_size_in_bytes", "generated_code_size_in_bytes"):
            if hasattr(m, key):
                out[key.replace("_in_bytes", "_bytes")] = int(getattr(m, key))
        if {"argument_size_bytes", "output_size_bytes", "temp_size_bytes"} <= set(out):
            out["xla_peak_estimate_bytes"] = (out["argument_size_bytes"] + out["output_size_bytes"]
                                              + out["temp_size_bytes"] - out.get("alias_size_bytes", 0))
    return out


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def build_ours(cfg: BenchmarkConfig, size: int, num_classes: int) -> _Runner:
    """Our jitted train/eval steps on a real TrainState, compiled ahead of time (timed)."""
    from flax_resnet import parallel
    from flax_resnet.training import schedules, steps
    from flax_resnet.training.state import compute_dtype, create_optimizer, create_train_state

    config = _train_config(cfg)
    mesh = parallel.create_mesh()
    parallel.check_batch_size(cfg.batch, mesh)
    lr_fn = schedules.create_learning_rate_fn(config, 100, 100)
    tx = create_optimizer(config, lr_fn)
    state, graph = create_train_state(config, num_classes, cfg.in_channels, tx, mesh)
    dtype = compute_dtype(config)
    batch = parallel.shard_batch(_synthetic_batch(cfg, size, num_classes), mesh)

    t0 = time.perf_counter()
    train_fn = steps.jit_train_step(mesh, graph=graph, tx=tx, learning_rate_fn=lr_fn, num_classes=num_classes,
                                    compute_dtype=dtype).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    info: dict[str, Any] = {"compile_s": compile_s, "memory": _memory_analysis(train_fn),
                            "xla_train_step_flops": _cost_flops(train_fn)}
    holder = {"state": state}

    def run_train(n: int) -> float:
        st = holder["state"]
        t = time.perf_counter()
        for _ in range(n):
            st, metrics = train_fn(st, batch)
        jax.block_until_ready((st, metrics))
        dt = time.perf_counter() - t
        holder["state"] = st
        return dt

    run_eval = None
    if cfg.eval:
        t0 = time.perf_counter()
        eval_fn = steps.jit_eval_step(mesh, graph=graph, num_classes=num_classes, compute_dtype=dtype)
        eval_fn = eval_fn.lower(state, batch).compile()
        info["eval_compile_s"] = time.perf_counter() - t0
        info["xla_eval_step_flops"] = _cost_flops(eval_fn)

        def run_eval(n: int) -> float:
            st = holder["state"]
            t = time.perf_counter()
            for _ in range(n):
                out = eval_fn(st, batch)
            jax.block_until_ready(out)
            return time.perf_counter() - t

    return _Runner("flax_resnet", run_train, run_eval, info)


# --------------------------------------------------------------------------- PyTorch
def build_torch(cfg: BenchmarkConfig, size: int, num_classes: int) -> _Runner:
    """The PyTorch reference: same model, channels_last, SGD momentum 0.9 + kernel-only weight decay."""
    from flax_resnet import torch_reference

    import torch

    config = _train_config(cfg)
    torch.manual_seed(cfg.seed)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.backends.cudnn.benchmark = True
    model = torch_reference.create_torch_model(cfg.model, num_classes, cfg.in_channels)
    model = model.to(device=device, memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]          # conv/linear weights
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]      # biases, BN
    opt = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=config.learning_rate, momentum=config.momentum)
    data = _synthetic_batch(cfg, size, num_classes)
    x = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).to(device)
    y = torch.from_numpy(data["label"]).long().to(device)
    amp = cfg.dtype == "bfloat16"
    fwd = torch.compile(model) if cfg.torch_compile else model
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(fwd(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    model.train()
    step()
    sync()
    compile_s = time.perf_counter() - t0

    def run_train(n: int) -> float:
        model.train()
        t = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return time.perf_counter() - t

    run_eval = None
    if cfg.eval:
        def run_eval(n: int) -> float:
            model.eval()
            t = time.perf_counter()
            with torch.no_grad(), autocast():
                for _ in range(n):
                    fwd(x)
            sync()
            return time.perf_counter() - t

    info = {"compile_s": compile_s, "version": torch.__version__, "threads": torch.get_num_threads(),
            "compiled": bool(cfg.torch_compile), "amp_bfloat16": amp, "memory_format": "channels_last",
            "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"}
    return _Runner("torch", run_train, run_eval, info)


# --------------------------------------------------------------------------- timing
def _cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def interleaved(runners: list[_Runner], kind: str, steps: int, repeats: int,
                warmup: int) -> tuple[list[list[float]], list[list[float]]]:
    """Wall and process-CPU seconds per repeat for each runner, repeats alternating (A B A B ...).

    Each runner first runs ``warmup`` untimed steps; each repeat is preceded by one untimed
    step of the same runner, so caches and thread pools are warm when its clock starts.
    CPU seconds (all threads of this process) are what a loaded machine cannot inflate much:
    time spent waiting for a core does not count.
    """
    fns = [getattr(r, kind) for r in runners]
    for fn in fns:
        if warmup:
            fn(warmup)
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            fn(1)
            c = _cpu_seconds()
            walls[i].append(fn(steps))
            cpus[i].append(_cpu_seconds() - c)
    return walls, cpus


def _environment() -> dict[str, Any]:
    from flax_resnet import native, parallel

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "jax": jax.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "load_average": load, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
            "host_allocator_tuned": parallel.host_allocator_tuned(),
            "native_conv": native.status() if jax.default_backend() == "cpu" else None}


def _peak_device_bytes() -> int | None:
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices report nothing
        stats = None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _known_peak(device_kind: str) -> float | None:
    for name, peak in BF16_PEAK_FLOPS.items():  # most specific names first
        if name.lower() in device_kind.lower():
            return peak
    return None


def _timing(walls: list[float], cpus: list[float], batch: int, steps: int) -> dict[str, Any]:
    out = _rate_summary(walls, batch, steps)
    out["cpu_s_per_step"] = statistics.median(cpus) / steps
    return out


def run_benchmark(cfg: BenchmarkConfig, *, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Times our train (and eval) step, and optionally PyTorch's, interleaved. Returns the JSON dict.

    With ``cfg.compare_conv_impl`` our step is also built with that convolution formulation
    (e.g. "xla", the plain ``nnx.Conv``) and timed in the same interleaving (``variants``).
    """
    from flax_resnet.models import registry

    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if cfg.steps < 1 or cfg.repeats < 1 or cfg.batch < 1:
        raise UserError("--steps, --repeats and --batch must be >= 1")
    spec = registry.get_spec(cfg.model)
    size = cfg.image_size or spec.input_size
    num_classes = cfg.num_classes or spec.num_classes
    env_before = _environment()

    log(f"compiling {cfg.model} (batch {cfg.batch}, {size}x{size}x{cfg.in_channels}, {cfg.dtype}, "
        f"conv_impl {cfg.conv_impl}) ...")
    ours = build_ours(cfg, size, num_classes)
    log(f"compiled train step in {ours.info['compile_s']:.1f}s")
    runners = [ours]
    if cfg.compare_conv_impl:
        other = build_ours(dataclasses.replace(cfg, conv_impl=cfg.compare_conv_impl), size, num_classes)
        other.name = f"flax_resnet[conv_impl={cfg.compare_conv_impl}]"
        runners.append(other)
    if cfg.compare_torch:
        log("building the PyTorch reference ...")
        runners.append(build_torch(cfg, size, num_classes))
    kinds = ["train"] + (["eval"] if cfg.eval else [])
    walls: dict[str, list[list[float]]] = {}
    cpus: dict[str, list[list[float]]] = {}
    for kind in kinds:
        log(f"timing {kind}: {cfg.repeats} x {cfg.steps} steps"
            + (f", interleaved: {', '.join(r.name for r in runners)}" if len(runners) > 1 else ""))
        walls[kind], cpus[kind] = interleaved(runners, kind, cfg.steps, cfg.repeats, cfg.warmup)

    fwd_flops = registry.forward_flops(cfg.model, size, cfg.in_channels)
    train_flops = 3.0 * fwd_flops
    out: dict[str, Any] = {
        "model": cfg.model, "conv_impl": cfg.conv_impl, "batch": cfg.batch, "image_size": size,
        "in_channels": cfg.in_channels, "num_classes": num_classes, "dtype": cfg.dtype, "steps": cfg.steps,
        "repeats": cfg.repeats, "warmup": cfg.warmup, "device": str(jax.devices()[0].device_kind),
        "num_devices": jax.device_count(), "compile_s": ours.info["compile_s"],
        "eval_compile_s": ours.info.get("eval_compile_s"),
    }
    for kind in ("train", "eval"):
        out[kind] = _timing(walls[kind][0], cpus[kind][0], cfg.batch, cfg.steps) if kind in kinds else None
    out["memory"] = {**ours.info["memory"], "device_peak_bytes": _peak_device_bytes(),
                     "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    out["flops"] = {
        "forward_per_image": fwd_flops,
        "train_per_image": train_flops,
        "xla_train_step": ours.info.get("xla_train_step_flops"),
        "xla_eval_step": ours.info.get("xla_eval_step_flops"),
        "train_flops_per_sec": train_flops * out["train"]["images_per_sec"],
        "eval_flops_per_sec": fwd_flops * out["eval"]["images_per_sec"] if out["eval"] else None,
    }
    peak = cfg.peak_flops or _known_peak(out["device"])
    out["flops"]["peak_flops"] = peak
    out["flops"]["train_fraction_of_peak"] = out["flops"]["train_flops_per_sec"] / peak if peak else None

    def against(i: int) -> dict[str, Any]:
        """Runner ``i``'s timings and our speed relative to it (> 1: ours is faster)."""
        res: dict[str, Any] = {**{k: v for k, v in runners[i].info.items() if k != "memory"}}
        ratio: dict[str, float] = {}
        for kind in kinds:
            res[kind] = _timing(walls[kind][i], cpus[kind][i], cfg.batch, cfg.steps)
            # Ratio of medians; the median of per-repeat ratios (each pair ran back to back); CPU-time ratio.
            ratio[kind] = out[kind]["images_per_sec"] / res[kind]["images_per_sec"]
            ratio[f"{kind}_paired_median"] = statistics.median(
                [b / a for a, b in zip(walls[kind][0], walls[kind][i])])
            ratio[f"{kind}_cpu_time"] = res[kind]["cpu_s_per_step"] / out[kind]["cpu_s_per_step"]
        return {"result": res, "ratio": ratio}

    out["variants"] = {}
    if cfg.compare_conv_impl:
        out["variants"][cfg.compare_conv_impl] = against(1)
    out["torch"], out["ratio"] = None, None
    if cfg.compare_torch:
        t = against(len(runners) - 1)
        out["torch"], out["ratio"] = t["result"], t["ratio"]
    env_after = _environment()
    out["environment"] = {**env_after, "load_average_before": env_before["load_average"]}
    return out


def format_summary(r: dict[str, Any]) -> str:
    """A few human-readable lines for a result of :func:`run_benchmark`."""
    lines = [f"{r['model']} batch {r['batch']} {r['image_size']}x{r['image_size']} {r['dtype']} on "
             f"{r['num_devices']} x {r['device']}: compile {r['compile_s']:.1f}s"]
    for kind in ("train", "eval"):
        if r.get(kind):
            s = f"  {kind}: {r[kind]['images_per_sec']:.1f} images/s ({r[kind]['step_ms']:.1f} ms/step)"
            s += f", {r[kind]['cpu_s_per_step']:.3f} CPU-s/step"
            for name, v in (r.get("variants") or {}).items():
                s += (f"\n    conv_impl={name}: {v['result'][kind]['images_per_sec']:.1f} images/s -> "
                      f"ours {v['ratio'][kind]:.2f}x (CPU time {v['ratio'][kind + '_cpu_time']:.2f}x)")
            if r.get("torch") and r["torch"].get(kind):
                s += (f"\n    PyTorch: {r['torch'][kind]['images_per_sec']:.1f} images/s, "
                      f"{r['torch'][kind]['cpu_s_per_step']:.3f} CPU-s/step -> ours {r['ratio'][kind]:.2f}x "
                      f"(paired {r['ratio'][kind + '_paired_median']:.2f}x, CPU time {r['ratio'][kind + '_cpu_time']:.2f}x)")
            lines.append(s)
    f = r["flops"]
    lines.append(f"  {f['forward_per_image'] / 1e9:.3f} GFLOPs/image forward; train "
                 f"{f['train_flops_per_sec'] / 1e9:.1f} GFLOP/s achieved"
                 + (f" ({100 * f['train_fraction_of_peak']:.1f}% of {f['peak_flops'] / 1e12:.0f} TFLOP/s peak)"
                    if f.get("train_fraction_of_peak") else ""))
    mem = r["memory"].get("xla_peak_estimate_bytes")
    if mem:
        lines.append(f"  XLA buffer peak estimate {mem / 2**20:.1f} MiB")
    lines.append(f"  load average {r['environment']['load_average']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the loop vs the bare step
LOOP_KEYS = ("model", "batch", "steps", "log_every_steps", "dataset", "loop_images_per_sec", "bare_images_per_sec",
             "loop_over_bare", "overhead_fraction", "loop_interval_images_per_sec", "bare_repeats_images_per_sec",
             "environment")


def loop_overhead(model: str = "resnet20", batch: int = 128, steps: int = 40, *, log_every: int = 5,
                  recipe: str | None = None, data_dir: str | None = None, synthetic_train_images: int = 0,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Images/s through the real training loop against the bare step, same model and batch.

    The loop is :func:`~flax_resnet.training.loop.train_and_evaluate` on ``recipe`` (the
    embedded digits data by default: 32x32x1, real Grain pipeline with augmentation, metric
    fetches every ``log_every`` steps, metrics.jsonl + TensorBoard + progress bar, a checkpoint
    and an evaluation per epoch) for ``steps`` steps in a temporary workdir; its rate is its own
    median over log intervals (evaluation and epoch-end checkpoints fall between intervals).
    The bare step is the same jitted train step on one fixed device batch, timed in repeats of
    ``log_every`` steps before *and* after the loop run (median), so both see the same load.
    ``overhead_fraction = 1 - loop / bare`` (the issue's bar: <= 0.05).

    ``synthetic_train_images > 0`` instead writes a synthetic CIFAR-10 of that many training
    images (PNG-encoded, TFDS layout: :func:`flax_resnet.data.synthetic.write_synthetic`) to a
    temporary directory and runs the ``cifar10_resnet20`` recipe on it: the same pipeline with
    enough steps per epoch for a fast accelerator (digits has 1,437 images).
    """
    from flax_resnet import data
    from flax_resnet.configs import get_config
    from flax_resnet.training import train_and_evaluate

    tmp = tempfile.TemporaryDirectory(prefix="flax_resnet_loop_data_") if synthetic_train_images else None
    if tmp is not None:
        from flax_resnet.data.synthetic import write_synthetic

        recipe, data_dir = recipe or "cifar10_resnet20", tmp.name
        log(f"writing a synthetic cifar10 ({synthetic_train_images} train images) to {data_dir} ...")
        write_synthetic("cifar10", data_dir, {"train": int(synthetic_train_images), "test": batch})
    config = get_config(recipe or "digits_resnet20")
    config.model, config.batch_size = model, batch
    config.num_train_steps, config.log_every_steps = steps, log_every
    config.eval_batch_size = 0
    if data_dir is not None:
        config.data_dir = data_dir
    info = data.get_dataset_info(config.dataset, config.data_dir)
    size = int(info.image_shape[0])
    bench_cfg = BenchmarkConfig(model=model, batch=batch, image_size=size, in_channels=int(info.image_shape[-1]),
                                num_classes=int(info.num_classes), steps=log_every, eval=False)
    log(f"bare step: compiling {model} batch {batch} ({size}x{size}x{bench_cfg.in_channels}) ...")
    bare = build_ours(bench_cfg, size, bench_cfg.num_classes)
    bare.train(2)
    repeats = max(3, steps // (2 * log_every))
    bare_times = [bare.train(log_every) for _ in range(repeats)]
    env_before = _environment()
    log(f"training loop: {steps} steps of {recipe} ({config.dataset}), logging every {log_every} ...")
    with tempfile.TemporaryDirectory(prefix="flax_resnet_loop_") as workdir:
        summary = train_and_evaluate(config, workdir, print_fn=lambda *a, **k: None)
        from flax_resnet.training import logging as run_logging

        intervals = [r["images_per_sec"] for r in run_logging.read_metrics(workdir, "train")]
    bare_times += [bare.train(log_every) for _ in range(repeats)]
    if tmp is not None:
        tmp.cleanup()
    bare_rate = _rate_summary(bare_times, batch, log_every)
    loop_rate = float(summary.images_per_sec)
    return {
        "model": model, "batch": batch, "steps": steps, "log_every_steps": log_every, "dataset": config.dataset,
        "loop_images_per_sec": loop_rate, "bare_images_per_sec": bare_rate["images_per_sec"],
        "loop_over_bare": loop_rate / bare_rate["images_per_sec"],
        "overhead_fraction": 1.0 - loop_rate / bare_rate["images_per_sec"],
        "loop_interval_images_per_sec": [round(r, 2) for r in intervals],
        "bare_repeats_images_per_sec": bare_rate["repeats_images_per_sec"],
        "environment": {**_environment(), "load_average_before": env_before["load_average"]},
    }


def format_loop_summary(r: dict[str, Any]) -> str:
    return (f"{r['model']} batch {r['batch']} on {r['dataset']}: training loop {r['loop_images_per_sec']:.1f} images/s, "
            f"bare step {r['bare_images_per_sec']:.1f} images/s -> loop/bare {r['loop_over_bare']:.3f} "
            f"(overhead {100 * r['overhead_fraction']:.1f}%); load average {r['environment']['load_average']}")
