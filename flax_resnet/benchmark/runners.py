"""What the benchmark times: our jitted steps and the PyTorch twin's, each behind a :class:`Runner`."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flax_resnet import cpu, parallel
from flax_resnet.benchmark import torch_twin, torch_worker
from flax_resnet.configs import default
from flax_resnet.training import schedules, steps
from flax_resnet.training.optimizer import create_optimizer
from flax_resnet.training.state import compute_dtype, create_train_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
      torch_compile: also time the PyTorch model under ``torch.compile`` (beside eager, interleaved;
        implies ``compare_torch``). Slow to compile on CPU, and needs a C++ compiler there.
      in_channels, num_classes: input channels and classifier size (default: the model's).
      cpu_fast_path: on CPU, build the model from :mod:`flax_resnet.cpu`'s layers (as training does).
      compare_plain: also time our step built from the plain layers, interleaved.
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
    cpu_fast_path: bool = True
    compare_plain: bool = False
    peak_flops: float | None = None
    seed: int = 0


def rate_summary(times: list[float], batch: int, steps: int) -> dict[str, Any]:
    """Median images/s over repeats (each ``steps`` steps of ``batch`` images) and the raw rates."""
    rates = [batch * steps / t for t in times]
    med = statistics.median(rates)
    return {"images_per_sec": med, "step_ms": 1e3 * batch / med,
            "repeats_images_per_sec": [round(r, 2) for r in rates]}


# --------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Runner:
    """Runs ``n`` steps and blocks until they are done; returns the seconds taken.

    ``cpu_seconds``: the CPU seconds of the runner's last call, where it runs in another process
    (None: it runs in this one, measured here). ``close``: releases what it holds (its process).
    """

    name: str
    train: Callable[[int], float]
    eval: Callable[[int], float] | None
    info: dict[str, Any]
    cpu_seconds: Callable[[], float] | None = None
    close: Callable[[], None] = lambda: None


def _train_config(cfg: BenchmarkConfig):
    c = default.get_config()
    c.model = cfg.model
    c.batch_size = cfg.batch
    c.half_precision = cfg.dtype == "bfloat16"
    c.seed = cfg.seed
    c.schedule = "constant"
    c.cpu_fast_path = cfg.cpu_fast_path
    return c


def _synthetic_batch(cfg: BenchmarkConfig, size: int, num_classes: int):
    return torch_worker.synthetic_batch(cfg.seed, cfg.batch, size, cfg.in_channels, num_classes)


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


class CompilationCacheEvents:
    """Counts JAX's persistent-cache hits and misses while it is entered: whether a ``compile_s``
    was a compilation or a load from the cache (``"hit"``, ``"miss"``, or ``"off"`` without one)."""

    _counts: dict[str, int] = {}
    _registered = False

    def __enter__(self):
        if not CompilationCacheEvents._registered:
            jax.monitoring.register_event_listener(CompilationCacheEvents._record)
            CompilationCacheEvents._registered = True
        self.before = dict(self._counts)
        return self

    @classmethod
    def _record(cls, event: str, **_) -> None:
        if event.startswith("/jax/compilation_cache/cache_"):
            cls._counts[event] = cls._counts.get(event, 0) + 1

    def __exit__(self, *exc):
        new = {k: v - self.before.get(k, 0) for k, v in self._counts.items()}
        if not jax.config.jax_compilation_cache_dir:
            self.outcome = "off"
        elif new.get("/jax/compilation_cache/cache_misses", 0):
            self.outcome = "miss"
        else:
            self.outcome = "hit" if new.get("/jax/compilation_cache/cache_hits", 0) else "miss"


def build_ours(cfg: BenchmarkConfig, size: int, num_classes: int) -> Runner:
    """Our jitted train/eval steps on a real TrainState, compiled ahead of time (timed)."""
    config = _train_config(cfg)
    mesh = parallel.create_mesh()
    parallel.check_batch_size(cfg.batch, mesh)
    lr_fn = schedules.create_learning_rate_fn(config, 100, 100)
    tx = create_optimizer(config, lr_fn)
    state, graph = create_train_state(config, num_classes, cfg.in_channels, tx, mesh)
    dtype = compute_dtype(config)
    batch = parallel.shard_batch(_synthetic_batch(cfg, size, num_classes), mesh)

    t0 = time.perf_counter()
    with CompilationCacheEvents() as cache:
        train_fn = steps.jit_train_step(mesh, graph=graph, tx=tx, learning_rate_fn=lr_fn, num_classes=num_classes,
                                        compute_dtype=dtype).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    info: dict[str, Any] = {"compile_s": compile_s, "compile_cache": cache.outcome,
                            "memory": _memory_analysis(train_fn), "cpu_fast_path": graph.cpu_fast_path}
    holder = {"state": state}
    in_flight = cpu.steps_in_flight(train_fn)  # as the train loop runs its steps
    info["steps_in_flight"] = in_flight

    def run_train(n: int) -> float:
        st = holder["state"]
        window = cpu.StepWindow(in_flight)
        t = time.perf_counter()
        for _ in range(n):
            window.wait()
            st, metrics = train_fn(st, batch)
            window.add(metrics)
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

        def run_eval(n: int) -> float:
            st = holder["state"]
            window = cpu.StepWindow(in_flight)
            t = time.perf_counter()
            for _ in range(n):
                window.wait()
                out = eval_fn(st, batch)
                window.add(out)
            jax.block_until_ready(out)
            return time.perf_counter() - t

    return Runner("flax_resnet", run_train, run_eval, info)


class TorchWorkerError(RuntimeError):
    """The PyTorch worker could not build its runner; the message is its one-line error."""


# How the PyTorch worker starts: ``-P`` keeps its folder (this package's modules) off ``sys.path``.
TORCH_WORKER_ARGV = [sys.executable, "-P", torch_worker.__file__]


class TorchProcess:
    """One :mod:`~flax_resnet.benchmark.torch_worker` child, driven over its pipes (JSON lines)."""

    def __init__(self, name: str):
        self.name = name
        self.proc = subprocess.Popen(TORCH_WORKER_ARGV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.last_cpu_s = 0.0

    def call(self, **req: Any) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:  # a broken pipe: it died
            line = ""
        if not line:
            raise RuntimeError(f"the {self.name} runner's process died (exit status {self.proc.wait()})")
        return json.loads(line)

    def run(self, kind: str, n: int) -> float:
        reply = self.call(cmd=kind, n=n)
        self.last_cpu_s = reply["cpu_s"]
        return reply["wall_s"]

    def close(self, timeout: float = 10.0) -> None:
        """Asks the child to quit and waits for it; kills it if it does not exit in ``timeout`` s."""
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:  # it died
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def build_torch(cfg: BenchmarkConfig, size: int, num_classes: int, *, compiled: bool = False) -> Runner:
    """The PyTorch reference (:func:`flax_resnet.benchmark.torch_worker.build`), in its own process:
    same model, channels_last, SGD momentum 0.9 + kernel-only weight decay; eager, or under
    ``torch.compile`` (``compiled``: its compilation is in ``compile_s``). Call the runner's
    ``close`` when done.

    Raises:
      TorchWorkerError: the child could not build it (e.g. ``torch.compile`` without a C++ compiler).
    """
    config = _train_config(cfg)
    request = {"cmd": "build", "compiled": compiled, "model_kwargs": torch_twin.twin_arguments(cfg.model),
               "num_classes": num_classes, "in_channels": cfg.in_channels, "size": size, "batch": cfg.batch,
               "seed": cfg.seed, "eval": cfg.eval, "amp_bfloat16": cfg.dtype == "bfloat16",
               "weight_decay": float(config.weight_decay), "learning_rate": float(config.learning_rate),
               "momentum": float(config.momentum),
               # PyTorch under the same host-allocator setting as our step (flax-resnet tunes it):
               # with glibc's defaults its >32 MB tensors are fresh mmaps faulted in on every step.
               "keep_freed_memory": cpu.host_allocator_tuned()}
    name = "torch.compile" if compiled else "torch"
    child = TorchProcess(name)
    try:
        reply = child.call(**request)
        if "error" in reply:
            raise TorchWorkerError(reply["error"])
    except BaseException:
        child.close()
        raise
    run_eval = (lambda n: child.run("eval", n)) if cfg.eval else None
    return Runner(name, lambda n: child.run("train", n), run_eval, reply["info"],
                  cpu_seconds=lambda: child.last_cpu_s, close=child.close)
