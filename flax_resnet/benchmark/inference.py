"""``flax-resnet benchmark --inference``: serving speed of one network three ways, interleaved.

* ``flax_resnet``: our jitted eval-mode step (:func:`flax_resnet.training.steps.jit_predict_step`,
  the layers training uses: on CPU :mod:`flax_resnet.cpu`'s unless ``cpu_fast_path=False``), on one device;
* ``onnxruntime``: the same weights exported by :mod:`flax_resnet.export` (BatchNorm folded, NCHW),
  in an ``onnxruntime.InferenceSession`` with its default threads;
* ``torch``: the PyTorch twin (:mod:`~flax_resnet.benchmark.torch_twin`) with the same weights, eager,
  ``inference_mode``, channels_last (absent for networks without a twin: pre-activation, article).

Reported as JSON: batch-1 latency (median, p99 and mean over every timed call) and batch-``batch``
throughput (median images/s over repeats). Each repeat runs every engine in turn (A B C A B C ...),
after one untimed call of the same engine, so all see the same machine load. ``ratios``: latency
and throughput of ours and of onnxruntime over PyTorch's (latency < 1, throughput > 1: faster).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet import models, parallel
from flax_resnet.benchmark import torch_twin
from flax_resnet.benchmark.run import environment
from flax_resnet.configs import default
from flax_resnet.errors import UserError
from flax_resnet.export import onnx_graph, plain_model, to_onnx, trace
from flax_resnet.training import steps
from flax_resnet.training.state import TrainState, create_model, split_model

INFERENCE_KEYS = ("model", "image_size", "in_channels", "num_classes", "batch", "latency_calls", "repeats",
                  "engines", "latency_ms", "throughput", "ratios", "environment")


def _random_weights(tree, seed: int):
    """Arrays for an abstract ``(params, batch_stats)``: He-normal kernels, unit BatchNorm scales and
    variances, zero elsewhere (an eager initialisation costs seconds of op-by-op dispatch)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        leaf = path[-1].key
        if leaf == "kernel":
            return jnp.asarray(rng.normal(0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape), s.dtype)
        return jnp.ones(s.shape, s.dtype) if leaf in ("scale", "var") else jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)


def _ours(name: str, num_classes: int, in_channels: int, cpu_fast_path: bool, seed: int):
    """Our predict step on one device, with the model's params and BatchNorm statistics (for the others)."""
    config = default.get_config()
    config.model, config.seed, config.cpu_fast_path = name, seed, cpu_fast_path
    graph, params, stats = split_model(nnx.eval_shape(lambda: create_model(config, num_classes, in_channels)))
    params, stats = _random_weights((params, stats), seed)
    device = jax.devices()[0]
    state = jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, stats, None, jax.random.PRNGKey(seed)), device)
    fn = steps.jit_predict_step(parallel.create_mesh([device]), graph=graph)

    def call(x):
        return fn(state, x).block_until_ready()

    return call, params, stats, {"cpu_fast_path": graph.cpu_fast_path, "device": str(device.device_kind)}


def _onnx(name, params, stats, num_classes, in_channels, size):
    import onnxruntime as ort

    model = plain_model(name, params, stats, num_classes=num_classes, in_channels=in_channels)
    proto = to_onnx(trace(model), size, {"model": name})
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def call(x):
        return session.run(None, {onnx_graph.INPUT_NAME: x})[0]

    return call, {"version": ort.__version__, "layout": "NCHW", "batchnorm_folded": True}


def _torch(name, params, stats, num_classes, in_channels):
    import torch

    model = torch_twin.create_torch_model(name, num_classes, in_channels)
    torch_twin.load_flax_weights(model, params, stats)
    model = model.eval().to(memory_format=torch.channels_last)

    def call(x):
        with torch.inference_mode():
            return model(x)

    return call, {"version": torch.__version__, "threads": torch.get_num_threads(), "memory_format": "channels_last"}


def _inputs(engine: str, x: np.ndarray):
    """The batch in each engine's layout: NHWC device array, NCHW numpy, channels_last tensor."""
    if engine == "flax_resnet":
        return jax.device_put(jnp.asarray(x), jax.devices()[0])
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if engine == "onnxruntime":
        return nchw
    import torch

    return torch.from_numpy(x).permute(0, 3, 1, 2)  # an NCHW view of NHWC memory: channels_last


def _latency(calls: dict[str, Callable], inputs: dict[str, Any], n: int, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    per = max(1, n // repeats)
    for _ in range(repeats):
        for k, call in calls.items():
            call(inputs[k])
            for _ in range(per):
                t = time.perf_counter()
                call(inputs[k])
                times[k].append(time.perf_counter() - t)
    return times


def _throughput(calls, inputs, steps_per_repeat: int, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, call in calls.items():
            call(inputs[k])
            t = time.perf_counter()
            for _ in range(steps_per_repeat):
                call(inputs[k])
            times[k].append(time.perf_counter() - t)
    return times


def run_inference_benchmark(model: str = "resnet50", *, image_size: int | None = None, batch: int = 64,
                            latency_calls: int = 200, steps: int = 5, repeats: int = 5, in_channels: int = 3,
                            num_classes: int | None = None, cpu_fast_path: bool = True, torch: bool = True,
                            seed: int = 0, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Batch-1 latency and batch-``batch`` throughput of our step, the ONNX export in onnxruntime and
    PyTorch eager on the same weights. Returns the JSON dict (:data:`INFERENCE_KEYS`)."""
    if min(batch, latency_calls, steps, repeats) < 1:
        raise UserError("--batch, --latency-calls, --steps and --repeats must be >= 1")
    spec = models.get_spec(model)
    size = image_size or spec.input_size
    num_classes = num_classes or spec.num_classes
    load_before = environment()["load_average"]
    log(f"building {model} ({size}x{size}x{in_channels}) three ways ...")
    calls, info = {}, {}
    calls["flax_resnet"], params, stats, info["flax_resnet"] = _ours(model, num_classes, in_channels,
                                                                      cpu_fast_path, seed)
    calls["onnxruntime"], info["onnxruntime"] = _onnx(model, params, stats, num_classes, in_channels, size)
    if torch:
        try:
            calls["torch"], info["torch"] = _torch(model, params, stats, num_classes, in_channels)
        except UserError as e:  # no PyTorch twin for this architecture
            log(f"skipping PyTorch: {e}")
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {"latency_ms": {}, "throughput": {}}
    for b, kind in ((1, "latency"), (batch, "throughput")):
        x = rng.standard_normal((b, size, size, in_channels), dtype=np.float32)
        inputs = {k: _inputs(k, x) for k in calls}
        for k, call in calls.items():  # compile / warm up
            t = time.perf_counter()
            call(inputs[k])
            info[k][f"first_call_batch{b}_s"] = time.perf_counter() - t
        log(f"timing batch {b} ({kind}): {', '.join(calls)} interleaved")
        if kind == "latency":
            for k, ts in _latency(calls, inputs, latency_calls, repeats).items():
                ms = sorted(1e3 * t for t in ts)
                results["latency_ms"][k] = {"median": statistics.median(ms), "p99": float(np.percentile(ms, 99)),
                                            "mean": statistics.fmean(ms), "calls": len(ms)}
        else:
            for k, ts in _throughput(calls, inputs, steps, repeats).items():
                rates = [b * steps / t for t in ts]
                results["throughput"][k] = {"images_per_sec": statistics.median(rates),
                                            "repeats_images_per_sec": [round(r, 2) for r in rates]}
    lat, thr = results["latency_ms"], results["throughput"]
    ratios = {f"{k}_latency_vs_torch": lat[k]["median"] / lat["torch"]["median"] for k in lat if k != "torch"
              and "torch" in lat}
    ratios.update({f"{k}_throughput_vs_torch": thr[k]["images_per_sec"] / thr["torch"]["images_per_sec"]
                   for k in thr if k != "torch" and "torch" in thr})
    return {"model": model, "image_size": size, "in_channels": in_channels, "num_classes": num_classes,
            "batch": batch, "latency_calls": latency_calls, "repeats": repeats, "engines": info, **results,
            "ratios": ratios, "environment": {**environment(), "load_average_before": load_before}}


def format_inference_summary(r: dict[str, Any]) -> str:
    """A few human-readable lines for a result of :func:`run_inference_benchmark`."""
    lines = [f"{r['model']} {r['image_size']}x{r['image_size']}: batch-1 latency (median / p99 ms), "
             f"batch-{r['batch']} throughput (images/s)"]
    for k, lat in r["latency_ms"].items():
        thr = r["throughput"][k]["images_per_sec"]
        lines.append(f"  {k:12s} {lat['median']:8.2f} / {lat['p99']:8.2f} ms   {thr:9.1f} images/s")
    lines += [f"  {k}: {v:.2f}" for k, v in r["ratios"].items()]
    lines.append(f"  load average {r['environment']['load_average']}")
    return "\n".join(lines)
