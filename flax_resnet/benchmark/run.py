"""``flax-resnet benchmark``: our real train/eval steps, optionally against the PyTorch twin.

``flax-resnet benchmark --model resnet20 --batch 128 --image-size 32`` times the very
step training uses (:func:`flax_resnet.training.steps.jit_train_step` on a real
:class:`~flax_resnet.training.state.TrainState` with the recipe's SGD + momentum + weight
decay), on a fixed synthetic batch, and reports as JSON:

* ``compile_s``: lowering + compiling the train step (and ``eval_compile_s``); ``compile_cache``
  says whether that compile was a load from the persistent compilation cache (``"hit"``), which
  the ``flax-resnet benchmark`` command turns on as ``train`` does: its second run of one
  command times a cached restart (``FLAX_RESNET_NO_COMPILATION_CACHE=1``: always a compile);
* ``train`` / ``eval``: steady-state images/s, the *median* over ``repeats`` timed
  repeats of ``steps`` steps each, after ``warmup`` untimed steps (plus every repeat's
  rate, so the spread is visible);
* ``memory``: XLA's buffer plan of the compiled train step (arguments, outputs, temporaries,
  the peak estimate), the device allocator's peak where it reports one (GPUs), and the
  process's peak resident memory;
* ``flops``: the model's forward FLOPs per image (counted from the layers' shapes,
  :func:`flax_resnet.models.forward_flops`: multiply-add = 2), train FLOPs per image (3x
  forward, the usual model-FLOPs convention) and the achieved train/eval FLOP/s.

With ``compare_torch`` an equivalent PyTorch model (:mod:`flax_resnet.benchmark.torch_twin`,
channels_last, ``torch.optim.SGD`` with the same momentum and kernel-only weight decay) runs
in its own process (:mod:`~flax_resnet.benchmark.torch_worker`: our tuned ``malloc`` and oneDNN
settings would otherwise be PyTorch's too, fragmenting its memory and shifting its speed), its
repeats *interleaved* with ours (ours, theirs, ours, ...), so both see the same machine load;
``ratio`` is ours/theirs images/s (> 1: we are faster). With ``torch_compile`` the same model
under ``torch.compile`` is a third runner in that interleaving, its result and ratios in
``variants["torch_compile"]`` (or the error, where it does not compile).

:func:`loop_overhead` measures the other half of the story: images/s through the real
training loop (:func:`~flax_resnet.training.loop.train_and_evaluate`: data pipeline,
sharding, metric fetches, logging, progress bar) against the bare step on the same model
(:mod:`flax_resnet.benchmark.loop`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
from typing import Any, Callable

import jax

from flax_resnet import cpu, models
from flax_resnet.benchmark.runners import (DTYPES, BenchmarkConfig, Runner, TorchWorkerError, build_ours, build_torch,
                                           rate_summary)
from flax_resnet.benchmark.torch_worker import error_line
from flax_resnet.errors import UserError

# The keys every result carries (tests check them; documented in the module docstring).
RESULT_KEYS = ("model", "cpu_fast_path", "batch", "image_size", "in_channels", "num_classes", "dtype", "steps", "repeats",
               "warmup", "device", "num_devices", "compile_s", "eval_compile_s", "compile_cache", "train", "eval", "memory",
               "flops", "variants", "torch", "ratio", "environment")
# Dense bfloat16 tensor-core peaks (vendor data sheets, no sparsity), matched against the
# device name JAX reports; --peak-tflops overrides. CPUs have no entry (see BUILD_NOTES.md).
BF16_PEAK_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
                   "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}


def _cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def interleaved(runners: list[Runner], kind: str, steps: int, repeats: int,
                warmup: int) -> tuple[list[list[float]], list[list[float]]]:
    """Wall and process-CPU seconds per repeat for each runner, repeats alternating (A B A B ...).

    Each runner first runs ``warmup`` untimed steps; each repeat is preceded by one untimed
    step of the same runner, so caches and thread pools are warm when its clock starts.
    CPU seconds (all threads of the runner's own process: this one, or the child a
    ``Runner.cpu_seconds`` reports for) are what a loaded machine cannot inflate much: time
    spent waiting for a core does not count.
    """
    fns = [getattr(r, kind) for r in runners]
    for fn in fns:
        if warmup:
            fn(warmup)
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, (runner, fn) in enumerate(zip(runners, fns)):
            fn(1)
            c = _cpu_seconds()
            walls[i].append(fn(steps))
            cpus[i].append(runner.cpu_seconds() if runner.cpu_seconds else _cpu_seconds() - c)
    return walls, cpus


def environment() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "jax": jax.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "load_average": load, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
            "host_allocator_tuned": cpu.host_allocator_tuned(),
            "native_conv": cpu.native.status() if jax.default_backend() == "cpu" else None}


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
    out = rate_summary(walls, batch, steps)
    out["cpu_s_per_step"] = statistics.median(cpus) / steps
    return out


def run_benchmark(cfg: BenchmarkConfig, *, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Times our train (and eval) step, and optionally PyTorch's, interleaved. Returns the JSON dict.

    With ``cfg.compare_plain`` our step is also built from the plain layers (no CPU fast path)
    and timed in the same interleaving (``variants["plain"]``).
    """
    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if cfg.steps < 1 or cfg.repeats < 1 or cfg.batch < 1:
        raise UserError("--steps, --repeats and --batch must be >= 1")
    spec = models.get_spec(cfg.model)
    size = cfg.image_size or spec.input_size
    num_classes = cfg.num_classes or spec.num_classes
    env_before = environment()

    log(f"compiling {cfg.model} (batch {cfg.batch}, {size}x{size}x{cfg.in_channels}, {cfg.dtype}, "
        f"cpu_fast_path {cfg.cpu_fast_path}) ...")
    ours = build_ours(cfg, size, num_classes)
    log(f"compiled train step in {ours.info['compile_s']:.1f}s")
    runners = [ours]
    compile_error = None
    try:  # PyTorch runners are child processes: closed however this ends
        if cfg.compare_plain:
            other = build_ours(dataclasses.replace(cfg, cpu_fast_path=False), size, num_classes)
            other.name = "flax_resnet[plain]"
            runners.append(other)
        if cfg.compare_torch or cfg.torch_compile:
            log("building the PyTorch reference ...")
            runners.append(build_torch(cfg, size, num_classes))
        if cfg.torch_compile:
            log("compiling the PyTorch reference with torch.compile ...")
            try:
                runners.append(build_torch(cfg, size, num_classes, compiled=True))
            except Exception as e:  # noqa: BLE001 - inductor needs a working C++ toolchain on CPU
                compile_error = str(e) if isinstance(e, TorchWorkerError) else error_line(e)
                log(f"torch.compile failed, timing eager PyTorch only ({compile_error})")
        kinds = ["train"] + (["eval"] if cfg.eval else [])
        walls: dict[str, list[list[float]]] = {}
        cpus: dict[str, list[list[float]]] = {}
        for kind in kinds:
            log(f"timing {kind}: {cfg.repeats} x {cfg.steps} steps"
                + (f", interleaved: {', '.join(r.name for r in runners)}" if len(runners) > 1 else ""))
            walls[kind], cpus[kind] = interleaved(runners, kind, cfg.steps, cfg.repeats, cfg.warmup)
    finally:
        for r in runners:
            r.close()

    fwd_flops = models.forward_flops(cfg.model, size, cfg.in_channels)
    train_flops = 3.0 * fwd_flops
    out: dict[str, Any] = {
        "model": cfg.model, "cpu_fast_path": ours.info["cpu_fast_path"], "batch": cfg.batch, "image_size": size,
        "in_channels": cfg.in_channels, "num_classes": num_classes, "dtype": cfg.dtype, "steps": cfg.steps,
        "repeats": cfg.repeats, "warmup": cfg.warmup, "device": str(jax.devices()[0].device_kind),
        "num_devices": jax.device_count(), "compile_s": ours.info["compile_s"],
        "eval_compile_s": ours.info.get("eval_compile_s"), "compile_cache": ours.info["compile_cache"],
    }
    for kind in ("train", "eval"):
        out[kind] = _timing(walls[kind][0], cpus[kind][0], cfg.batch, cfg.steps) if kind in kinds else None
    out["memory"] = {**ours.info["memory"], "device_peak_bytes": _peak_device_bytes(),
                     "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    out["flops"] = {
        "forward_per_image": fwd_flops,
        "train_per_image": train_flops,
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
    index = {r.name: i for i, r in enumerate(runners)}
    if cfg.compare_plain:
        out["variants"]["plain"] = against(index["flax_resnet[plain]"])
    out["torch"], out["ratio"] = None, None
    if "torch" in index:
        t = against(index["torch"])
        out["torch"], out["ratio"] = t["result"], t["ratio"]
    if "torch.compile" in index:
        out["variants"]["torch_compile"] = against(index["torch.compile"])
    elif compile_error:
        out["variants"]["torch_compile"] = {"error": compile_error}
    env_after = environment()
    out["environment"] = {**env_after, "load_average_before": env_before["load_average"]}
    return out


def format_summary(r: dict[str, Any]) -> str:
    """A few human-readable lines for a result of :func:`run_benchmark`."""
    lines = [f"{r['model']} batch {r['batch']} {r['image_size']}x{r['image_size']} {r['dtype']} on "
             f"{r['num_devices']} x {r['device']}: compile {r['compile_s']:.1f}s (persistent cache {r['compile_cache']})"]
    for kind in ("train", "eval"):
        if r.get(kind):
            s = f"  {kind}: {r[kind]['images_per_sec']:.1f} images/s ({r[kind]['step_ms']:.1f} ms/step)"
            s += f", {r[kind]['cpu_s_per_step']:.3f} CPU-s/step"
            for name, v in (r.get("variants") or {}).items():
                if "error" in v:
                    continue
                s += (f"\n    {name}: {v['result'][kind]['images_per_sec']:.1f} images/s -> "
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
