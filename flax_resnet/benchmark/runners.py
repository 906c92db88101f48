"""What the benchmark times: our jitted steps and the PyTorch twin's, each behind a :class:`Runner`."""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_resnet import parallel
from flax_resnet.benchmark import torch_twin
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
    """Runs ``n`` steps and blocks until they are done; returns the seconds taken."""

    name: str
    train: Callable[[int], float]
    eval: Callable[[int], float] | None
    info: dict[str, Any]


def _train_config(cfg: BenchmarkConfig):
    c = default.get_config()
    c.model = cfg.model
    c.batch_size = cfg.batch
    c.half_precision = cfg.dtype == "bfloat16"
    c.seed = cfg.seed
    c.schedule = "constant"
    c.cpu_fast_path = cfg.cpu_fast_path
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

        def run_eval(n: int) -> float:
            st = holder["state"]
            t = time.perf_counter()
            for _ in range(n):
                out = eval_fn(st, batch)
            jax.block_until_ready(out)
            return time.perf_counter() - t

    return Runner("flax_resnet", run_train, run_eval, info)


def build_torch(cfg: BenchmarkConfig, size: int, num_classes: int, *, compiled: bool = False) -> Runner:
    """The PyTorch reference: same model, channels_last, SGD momentum 0.9 + kernel-only weight decay;
    eager, or under ``torch.compile`` (``compiled``: its compilation is in ``compile_s``)."""
    import torch

    config = _train_config(cfg)
    torch.manual_seed(cfg.seed)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.backends.cudnn.benchmark = True
    model = torch_twin.create_torch_model(cfg.model, num_classes, cfg.in_channels)
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
    fwd = torch.compile(model) if compiled else model
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
            "compiled": compiled, "amp_bfloat16": amp, "memory_format": "channels_last",
            "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"}
    if compiled and run_eval is not None:  # eval mode is another graph: compile it here, not in a timed call
        t0 = time.perf_counter()
        run_eval(1)
        info["eval_compile_s"] = time.perf_counter() - t0
    return Runner("torch.compile" if compiled else "torch", run_train, run_eval, info)
