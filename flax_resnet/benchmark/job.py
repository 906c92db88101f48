"""``flax-resnet benchmark --job``: the main job end to end, as a user times it, beside a plain PyTorch loop.

Both jobs run as subprocesses, timed from spawn to exit (wall clock), alternately (ours,
PyTorch, ours, PyTorch, ...) so both see the same load:

* ours: ``python -m flax_resnet.cli train --config RECIPE --workdir FRESH_DIR`` (the
  ``flax-resnet train`` console script imports the same module): every checkpoint, metrics.jsonl,
  TensorBoard events and curves.png it writes;
* PyTorch: :mod:`flax_resnet.benchmark.torch_job`, a plain loop over the same pixels, data
  stream, network, SGD recipe, batch and epochs, with an evaluation after every epoch and
  nothing saved. Where it differs: it reads the pixels from an ``.npz`` this process writes
  before timing (ours opens the prepared dataset through TFDS and Grain), its evaluation's
  last batch is short (ours are one size, padded and masked) and its weights start from PyTorch's
  initialisation (torchvision's, for the twin), not ours.

Unless ``warmup=False``, each job runs once untimed first: our persistent compilation cache
(``~/.cache/flax_resnet/jax``, or ``JAX_COMPILATION_CACHE_DIR``) then holds the job's
executables, and both find their libraries in the page cache. Our breakdown comes from the
time each line of our output arrived (start-up to the model, to the first step, the first
epoch, the steady epochs, the end after the last epoch's line, the exit after the last line)
and the totals the run itself prints (evaluation, checkpoint saves).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flax_resnet import data
from flax_resnet.benchmark import torch_job, torch_twin
from flax_resnet.configs import load_config
from flax_resnet.data import sources
from flax_resnet.data.batches import ShardReader
from flax_resnet.data.info import make_recipe

JOB_KEYS = ("recipe", "model", "batch", "epochs", "steps", "repeats", "warmup", "ours", "torch", "ratio",
            "paired_ratios", "environment")
_EPOCH = re.compile(r"^epoch (\d+)/(\d+)\s+step")
_FINAL = re.compile(r"^final test top-1 ([\d.]+)%.*best (?:EMA )?([\d.]+)%")
_TOTALS = re.compile(r"(\w+) ([\d.]+)s")


def _config(recipe: str, model: str | None, batch: int | None, epochs: int | None, data_dir: str | None,
            extra: Sequence[str]):
    overrides = [f"--config.{k}={v}" for k, v in (("model", model), ("batch_size", batch), ("num_epochs", epochs),
                                                   ("data_dir", data_dir)) if v is not None] + list(extra)
    return load_config(recipe, overrides), overrides


def write_torch_spec(config, directory: Path, *, channels_last: bool = False) -> tuple[Path, dict]:
    """The PyTorch job's SPEC.json and the pixels it reads (``data.npz``) for ``config``, in ``directory``:
    ``(its path, the spec)``."""
    opened = sources.open_dataset(config.dataset, config.data_dir)
    recipe = make_recipe(opened, config.data_dir, None)
    if not recipe.fixed_size or recipe.flip:
        raise ValueError(f"the PyTorch job reproduces fixed-size, unflipped data streams only, not {config.dataset}")
    arrays = {}
    for kind, split in (("train", opened.train_split), ("test", config.eval_split or opened.eval_split)):
        n = opened.split_size(split)
        images, labels = ShardReader(recipe, split, 0, n, "array").read(np.arange(n))
        arrays[f"{kind}_images"], arrays[f"{kind}_labels"] = images, labels
    np.savez(directory / "data.npz", **arrays)
    info = data.get_dataset_info(config.dataset, config.data_dir)
    steps_per_epoch = len(arrays["train_labels"]) // config.batch_size
    warmup = int(config.warmup_steps or 0) or int(round(config.warmup_epochs * steps_per_epoch))
    if config.schedule != "cosine" or config.optimizer != "sgd" or config.label_smoothing or config.nesterov:
        raise ValueError("the PyTorch job reproduces the SGD + warm-up/cosine recipes without label smoothing only")
    spec = {"data": str(directory / "data.npz"), "seed": int(config.seed), "pad": int(recipe.pad),
            "mean": list(info.mean), "std": list(info.std), "batch_size": int(config.batch_size),
            "num_epochs": int(config.num_epochs), "learning_rate": float(config.learning_rate),
            "momentum": float(config.momentum), "weight_decay": float(config.weight_decay), "warmup_steps": warmup,
            "num_classes": int(info.num_classes), "in_channels": int(info.image_shape[-1]),
            "model_kwargs": torch_twin.twin_arguments(config.model), "channels_last": channels_last,
            "steps_per_epoch": steps_per_epoch}
    path = directory / "spec.json"
    path.write_text(json.dumps(spec))
    return path, spec


def run_timed(argv: list[str], log_path: Path) -> tuple[float, list[tuple[float, str]], int]:
    """Runs ``argv`` to its exit: ``(wall seconds from spawn to exit, [(seconds, line)], exit status)``.

    stdout and stderr are read together, ``\\r`` (progress-bar redraws) ending lines too.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive when printed: their times are the breakdown
    lines = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    status = proc.wait()
    wall = time.perf_counter() - t0
    log_path.write_text("".join(f"{t:8.2f} {s}\n" for t, s in lines) + f"{wall:8.2f} exit {status}\n")
    if status:
        tail = "\n".join(s for _, s in lines[-15:])
        raise RuntimeError(f"{argv[2] if len(argv) > 2 else argv} exited with {status}:\n{tail}")
    return wall, lines, status


def _first(lines, prefix: str) -> float | None:
    return next((t for t, s in lines if s.startswith(prefix)), None)


def _epoch_times(lines) -> list[float]:
    return [t for t, s in lines if _EPOCH.match(s)]


def _epoch_breakdown(epochs: list[float], start: float | None) -> dict[str, float | None]:
    steady = [b - a for a, b in zip(epochs[1:], epochs[2:])] or [b - a for a, b in zip(epochs, epochs[1:])]
    return {"first_epoch_s": epochs[0] - start if epochs and start is not None else None,
            "steady_epoch_s": statistics.median(steady) if steady else None}


def parse_ours(wall: float, lines) -> dict[str, Any]:
    """Our run's wall time, accuracy and breakdown from its timed output lines."""
    first_step = _first(lines, "compiled train step in")
    epochs = _epoch_times(lines)
    final = next(((t, _FINAL.match(s), s) for t, s in lines if _FINAL.match(s)), None)
    totals = {}
    if final is not None:
        inside = final[2][final[2].rfind("(") + 1:]
        totals = {f"{k}_s": float(v) for k, v in _TOTALS.findall(inside)}
    last = lines[-1][0] if lines else wall
    return {
        "wall_s": wall,
        "final_top1": float(final[1].group(1)) / 100 if final else None,
        "best_top1": float(final[1].group(2)) / 100 if final else None,
        "breakdown": {
            "start_to_model_s": _first(lines, "model: "),
            "start_to_first_step_s": first_step,
            **_epoch_breakdown(epochs, first_step),
            "after_last_epoch_s": final[0] - epochs[-1] if final and epochs else None,
            "exit_s": wall - last,
            "compile_s": totals.get("compile_s"),
            "eval_total_s": totals.get("eval_s"),
            "checkpoint_total_s": totals.get("checkpoints_s"),
        },
    }


def parse_torch(wall: float, lines) -> dict[str, Any]:
    """The PyTorch job's wall time, accuracy and breakdown from its timed output lines."""
    start = _first(lines, "start ")
    result = next((json.loads(s) for _, s in reversed(lines) if s.startswith("{")), {})
    epochs = _epoch_times(lines)
    return {
        "wall_s": wall, "final_top1": result.get("final_top1"), "best_top1": result.get("best_top1"),
        "torch_version": result.get("torch"), "threads": result.get("threads"),
        "breakdown": {"start_to_first_step_s": start, **_epoch_breakdown(epochs, start),
                      "exit_s": wall - (lines[-1][0] if lines else wall)},
    }


def _median_runs(runs: list[dict]) -> dict[str, Any]:
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    keys = runs[0]["breakdown"].keys()
    return {"wall_s": med([r["wall_s"] for r in runs]), "walls_s": [round(r["wall_s"], 2) for r in runs],
            "final_top1": [r["final_top1"] for r in runs], "best_top1": [r["best_top1"] for r in runs],
            "breakdown": {k: med([r["breakdown"][k] for r in runs]) for k in keys}, "runs": runs}


def run_job_race(recipe: str = "digits_resnet20", *, model: str | None = None, batch: int | None = None,
                 epochs: int | None = None, data_dir: str | None = None, repeats: int = 2, warmup: bool = True,
                 channels_last: bool = False, keep_dir: str | None = None, overrides: Sequence[str] = (),
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Times ``flax-resnet train`` (``recipe``, fresh workdirs) against the plain PyTorch job, alternately.

    ``model``, ``batch``, ``epochs``, ``data_dir`` and ``overrides`` (``--config.FIELD=VALUE``, for
    both jobs) change the recipe.
    ``repeats`` timed pairs after ``warmup`` untimed runs of each; ``keep_dir`` keeps the
    workdirs and the timed logs (else a temporary directory). Returns a dict with
    :data:`JOB_KEYS`: medians, every run, and ours / PyTorch wall-time ratios.
    """
    config, overrides = _config(recipe, model, batch, epochs, data_dir, overrides)
    tmp = None if keep_dir else tempfile.TemporaryDirectory(prefix="flax_resnet_job_")
    root = Path(keep_dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    spec_path, spec = write_torch_spec(config, root, channels_last=channels_last)
    ours_argv = [sys.executable, "-m", "flax_resnet.cli", "train", "--config", recipe, *overrides]
    torch_argv = [sys.executable, torch_job.__file__, str(spec_path)]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"ours": [], "torch": []}
    for i in range(int(warmup) + repeats):
        timed = i >= int(warmup)
        tag = f"run{i - int(warmup)}" if timed else "warmup"
        workdir = root / f"ours_{tag}"
        shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resumed one
        wall, lines, _ = run_timed([*ours_argv, "--workdir", str(workdir)], root / f"ours_{tag}.log")
        ours = parse_ours(wall, lines)
        log(f"ours  {tag}: {wall:.1f}s wall, test top-1 {ours['final_top1']}")
        wall, lines, _ = run_timed(torch_argv, root / f"torch_{tag}.log")
        torch_run = parse_torch(wall, lines)
        log(f"torch {tag}: {wall:.1f}s wall, test top-1 {torch_run['final_top1']}")
        if timed:
            runs["ours"].append(ours)
            runs["torch"].append(torch_run)
    if tmp is not None:
        tmp.cleanup()
    ours, torch_res = _median_runs(runs["ours"]), _median_runs(runs["torch"])
    return {
        "recipe": recipe, "model": config.model, "batch": int(config.batch_size), "epochs": int(config.num_epochs),
        "steps": spec["steps_per_epoch"] * int(config.num_epochs), "repeats": repeats, "warmup": warmup,
        "ours": ours, "torch": torch_res, "ratio": ours["wall_s"] / torch_res["wall_s"],
        "paired_ratios": [round(a["wall_s"] / b["wall_s"], 3) for a, b in zip(runs["ours"], runs["torch"])],
        "environment": {"python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_name(),
                        "cpu_count": os.cpu_count(), "load_average_before": load_before,
                        "load_average_after": os.getloadavg(), "channels_last": channels_last,
                        "compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR") or "default"},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_job_summary(r: dict[str, Any]) -> str:
    o, t, b = r["ours"], r["torch"], r["ours"]["breakdown"]

    def s(v):
        return "-" if v is None else f"{v:.1f}s"

    def pct(v):
        return "-" if not v or v[0] is None else f"{100 * statistics.median(v):.2f}%"

    return (f"main job ({r['recipe']}: {r['model']}, batch {r['batch']}, {r['epochs']} epochs), median of "
            f"{r['repeats']}{' after a warm-up' if r['warmup'] else ''}: ours {o['wall_s']:.1f}s wall, PyTorch "
            f"{t['wall_s']:.1f}s -> ours/PyTorch {r['ratio']:.2f}x (pairs {r['paired_ratios']}); ours: model at "
            f"{s(b['start_to_model_s'])}, first step at {s(b['start_to_first_step_s'])}, first epoch "
            f"{s(b['first_epoch_s'])}, steady epochs {s(b['steady_epoch_s'])}, eval {s(b['eval_total_s'])} and "
            f"checkpoints {s(b['checkpoint_total_s'])} in all, end {s(b['after_last_epoch_s'])}, exit {s(b['exit_s'])}; "
            f"PyTorch: first step at {s(t['breakdown']['start_to_first_step_s'])}, steady epochs "
            f"{s(t['breakdown']['steady_epoch_s'])}; test top-1 ours {pct(o['final_top1'])}, PyTorch "
            f"{pct(t['final_top1'])}; load {r['environment']['load_average_before']}")
