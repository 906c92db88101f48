"""The PyTorch reference of ``flax-resnet benchmark --compare-torch``, served from its own process.

Run as a script (``python -P torch_worker.py``), never imported there through ``flax_resnet``: it
imports only the standard library, numpy, torch and two of our JAX-free modules loaded from their
files (:mod:`~flax_resnet.benchmark.torch_job`, :mod:`~flax_resnet.cpu.allocator`), so PyTorch
runs without JAX's or oneDNN's libraries beside it, under the same host-allocator setting as our
step (the build request's ``keep_freed_memory``: what :func:`flax_resnet.cpu.tune_host_allocator`
did in the parent; with glibc's defaults a ResNet-50 batch-64 train step of PyTorch page-faults
its >32 MB tensors in anew every step and ran at a third of its speed). The parent
(:func:`flax_resnet.benchmark.runners.build_torch`)
drives it over stdin/stdout, one JSON object a line each way:

* ``{"cmd": "build", ...}`` (model arguments, batch, recipe, ``compiled``) -> ``{"info": {...}}``
  or ``{"error": "Type: first line"}``;
* ``{"cmd": "train" | "eval", "n": N}`` -> ``{"wall_s": ..., "cpu_s": ...}``: N steps' wall
  seconds and this process's CPU seconds (user + system, all threads) over the call;
* ``{"cmd": "quit"}``: exits.

Its stderr is the parent's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def synthetic_batch(seed: int, batch: int, size: int, in_channels: int, num_classes: int) -> dict[str, np.ndarray]:
    """The benchmark's fixed batch (NHWC float32 images, int32 labels), the same in both processes."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, size, size, in_channels), dtype=np.float32)
    labels = rng.integers(0, num_classes, batch).astype(np.int32)
    return {"image": images, "label": labels}


def error_line(e: BaseException) -> str:
    """``"Type: first line of the message"``: how the benchmark reports a runner that failed to build."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _load_sibling(relative: str):
    """A module of the package loaded from its file (relative to ``flax_resnet/``), not through
    ``flax_resnet`` (which imports JAX)."""
    path = Path(__file__).resolve().parent.parent / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(req: dict[str, Any]) -> tuple[dict[str, Any], Callable[[int], float], Callable[[int], float] | None]:
    """The twin's train/eval runs for a build request: ``(info, run_train, run_eval or None)``.

    Same model, channels_last, SGD momentum + kernel-only weight decay; eager, or under
    ``torch.compile`` (``compiled``: its compilation is in ``compile_s``)."""
    # before torch starts its threads
    tuned = bool(req.get("keep_freed_memory")) and _load_sibling("cpu/allocator.py").keep_freed_memory()
    import torch

    compiled = bool(req["compiled"])
    torch.manual_seed(req["seed"])
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.backends.cudnn.benchmark = True
    torch_job = _load_sibling("benchmark/torch_job.py")
    model = torch_job.build_model({"model_kwargs": req["model_kwargs"], "num_classes": req["num_classes"],
                                  "in_channels": req["in_channels"]})
    model = model.to(device=device, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]          # conv/linear weights
    no_decay = [p for p in model.parameters() if p.ndim <= 1]      # biases, BN
    opt = torch.optim.SGD([{"params": decay, "weight_decay": req["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=req["learning_rate"], momentum=req["momentum"])
    data = synthetic_batch(req["seed"], req["batch"], req["size"], req["in_channels"], req["num_classes"])
    x = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).to(device)
    y = torch.from_numpy(data["label"]).long().to(device)
    amp = bool(req["amp_bfloat16"])
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
    if req["eval"]:
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
            "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
            "pid": os.getpid(), "imports_jax": "jax" in sys.modules,
            "host_allocator_tuned": tuned}
    if compiled and run_eval is not None:  # eval mode is another graph: compile it here, not in a timed call
        t0 = time.perf_counter()
        run_eval(1)
        info["eval_compile_s"] = time.perf_counter() - t0
    return info, run_train, run_eval


def serve(inp, out) -> int:
    """Answers requests until ``quit`` or the end of ``inp``."""
    runs: dict[str, Callable[[int], float] | None] = {}
    for line in inp:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "quit":
            break
        if cmd == "build":
            try:
                info, runs["train"], runs["eval"] = build(req)
                reply: dict[str, Any] = {"info": info}
            except Exception as e:  # noqa: BLE001 - reported to the parent (torch.compile needs a C++ compiler)
                reply = {"error": error_line(e)}
        else:
            c = _cpu_seconds()
            wall = runs[cmd](int(req["n"]))
            reply = {"wall_s": wall, "cpu_s": _cpu_seconds() - c}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


def main() -> int:
    """Serves on the process's stdout, and points its fd 1 at stderr: a stray print (from Python or
    C) cannot break the protocol."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return serve(sys.stdin, out)


if __name__ == "__main__":
    sys.exit(main())
