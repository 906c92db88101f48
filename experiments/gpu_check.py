"""The prepared GPU check: five time-boxed stages, each writing ``$OUT/<stage>.json`` as it ends.

On a device machine (one H100/H200; Python 3.12 with CUDA JAX, flax, optax, orbax, chex and
torch preinstalled; no network), with the wheels of ``experiments/gpu_wheels.txt`` carried:

    bash experiments/gpu_check.sh          # the exact device `run` call is at the top of that file

On CPU, tiny sizes, 2-3 minutes: ``python experiments/gpu_check.py --dry-run --out /tmp/gpu_check``.

Stages (each a child process killed at its time limit, :data:`TIMEOUT_S`; the whole check stays
inside ``--budget``, 350 s by default):

1. ``environment``: nvidia-smi, versions, devices, a bf16 matmul rate.
2. ``tests``: reference parity, train step, bit-exact resume (multi-device tests skip on one
   device), at ``highest`` matmul precision with ``--xla_gpu_deterministic_ops=true``.
3. ``resnet50``: batch 256 bf16 train images/s and compile time, ours alone, then interleaved
   with PyTorch (torch.compile, channels_last, AMP); fraction of bf16 peak; issue 17's goals.
4. ``cifar_loop``: the real loop (``cifar10_resnet20`` on synthetic CIFAR-10) vs the bare step.
5. ``jpeg_pipeline``: Grain JPEG decode + random-resized crop on generated ImageNet-sized JPEGs,
   workers from the host's cores, against stage 3's step rate.

``--out`` gets one JSON per stage, ``summary.json`` and ``gpu_check.log``; scratch goes to ``--work``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `common` sits beside the scripts, however a script is loaded
    sys.path.insert(0, _HERE)
from common import jpegs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("environment", "tests", "resnet50", "cifar_loop", "jpeg_pipeline")
# Each stage's own limit; time an earlier stage leaves unused goes to the next ones.
TIMEOUT_S = {"environment": 30, "tests": 95, "resnet50": 145, "cifar_loop": 40, "jpeg_pipeline": 40}
GOAL_IMAGES_PER_SEC = 5000.0  # issue 17: ResNet-50 bf16 train step on one H100/H200, and >= torch.compile + AMP

# The GPU-relevant tests, by what they check. The multi-device ones must skip on one device.
TESTS = {
    "parity": ["tests/test_pretrained.py::test_converted_model_matches_pytorch[resnet18]",
               "tests/test_pretrained.py::test_converted_model_matches_pytorch[resnet50]",
               "tests/test_models.py::test_bottleneck_block_matches_reference",
               "tests/test_models.py::test_batchnorm_matches_pytorch_conventions"],
    "train_step": ["tests/test_training.py::test_one_step_of_each_optimizer_matches_its_formula[sgd-0.0]",
                   "tests/test_training.py::test_one_step_of_each_optimizer_matches_its_formula[adamw-1.5]",
                   "tests/test_training.py::test_bfloat16_compute_keeps_float32_state"],
    "resume": ["tests/test_checkpointing.py::test_sigterm_then_sigkill_then_resume_is_bit_identical"],
    "multi_device": ["tests/test_training.py::test_eight_devices_match_one_device",
                     "tests/test_checkpointing.py::test_resume_on_one_device_and_back_on_eight"],
}
DRY_TESTS = {"parity": ["tests/test_models.py::test_basic_block_matches_reference"]}

SIZES = {
    "gpu": {"bench": dict(model="resnet50", batch=256, image_size=None, steps=20, repeats=5, warmup=5,
                          torch_compile=True),
            "loop": dict(model="resnet20", batch=512, steps=24, log_every=6, images=12_800),
            "jpeg": dict(classes=16, per_class=64, batch=256, waves=3, batches=12), "matmul": 8192},
    "dry": {"bench": dict(model="resnet8", batch=16, image_size=32, steps=2, repeats=2, warmup=1,
                          torch_compile=False),
            "loop": dict(model="resnet8", batch=32, steps=6, log_every=2, images=256),
            "jpeg": dict(classes=4, per_class=8, batch=8, waves=2, batches=3), "matmul": 256},
}


# --------------------------------------------------------------------------- shared helpers
def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def versions(*names: str) -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


# --------------------------------------------------------------------------- stage 1: environment
def stage_environment(args, sizes, res: dict, out_path: Path) -> None:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        res["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        res["nvidia_smi"] = f"unavailable: {e}"
    res.update(python=sys.version.split()[0], cores=host_cores(), pythonpath=os.environ.get("PYTHONPATH", ""),
               versions=versions("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "chex",
                                 "numpy", "protobuf", "etils", "torch", "torchvision", "grain", "array_record",
                                 "tensorflow-datasets", "ml_collections", "tensorboardX"))
    import jax
    import jax.numpy as jnp

    res["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    res["default_backend"] = jax.default_backend()
    n = sizes["matmul"]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)  # zeros or ones would run faster
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        out = f(a)
    out.block_until_ready()
    res["bf16_matmul_tflops"] = round(10 * 2 * n**3 / (time.perf_counter() - t) / 1e12, 2)
    res["bf16_matmul_size"] = n
    try:
        import torch

        res["torch_cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        res["torch_cuda"] = "torch not importable"
    # What the other stages import: a wheel missing from experiments/gpu_wheels.txt shows here.
    import flax_resnet.cli  # noqa: F401
    import flax_resnet.data  # noqa: F401
    import flax_resnet.training  # noqa: F401
    import tensorboardX  # noqa: F401

    import google.protobuf

    res["imports_ok"], res["protobuf_from"] = True, google.protobuf.__file__


# --------------------------------------------------------------------------- stage 2: tests
TEST_LINE = re.compile(r"^(tests/\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
SUMMARY_LINE = re.compile(r"^(FAILED|ERROR|SKIPPED) (?:\[\d+\] )?(\S+?)(?: - (.*))?$")


def _category(test_id: str, groups: dict[str, list[str]]) -> str:
    return next((g for g, ids in groups.items() for i in ids if test_id.startswith(i)), "other")


def stage_tests(args, sizes, res: dict, out_path: Path) -> None:
    groups = DRY_TESTS if args.dry_run else TESTS
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONUNBUFFERED="1")
    flag = "--xla_gpu_deterministic_ops=true"
    with_flag = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                           env={**env, "XLA_FLAGS": with_flag}, capture_output=True, text=True, timeout=90)
    res["deterministic_ops_flag"] = probe.returncode == 0 or probe.stderr[-500:]
    if probe.returncode == 0:
        env["XLA_FLAGS"] = with_flag
    res["env"] = {k: env.get(k) for k in ("JAX_PLATFORMS", "JAX_DEFAULT_MATMUL_PRECISION", "XLA_FLAGS",
                                          "XLA_PYTHON_CLIENT_PREALLOCATE")}
    ids = [i for g in groups.values() for i in g]
    cmd = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-rfEs", "-p", "no:cacheprovider", *ids]
    res["command"] = " ".join(cmd[1:])
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
        line = line.rstrip()
        if m := TEST_LINE.match(line):
            outcomes[m[1]] = m[2] if outcomes.get(m[1]) != "PASSED" else "ERROR"  # an error at teardown
        elif (m := SUMMARY_LINE.match(line)) and m[3]:
            messages[m[2]] = m[3][:600]
        else:
            continue
        _tests_summary(res, outcomes, messages, groups)
        write_json(out_path, res)  # results so far survive a kill at the time limit
    res["pytest_returncode"] = proc.wait()
    _tests_summary(res, outcomes, messages, groups)


def _tests_summary(res: dict, outcomes: dict, messages: dict, groups: dict) -> None:
    by_cat: dict[str, dict[str, str]] = {}
    for tid, outcome in outcomes.items():
        by_cat.setdefault(_category(tid, groups), {})[tid] = outcome
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    res["counts"] = counts
    res["by_category"] = by_cat
    res["messages"] = {k: v for k, v in messages.items() if any(k in t or t in k for t in outcomes)}
    must_pass = [o for c, d in by_cat.items() if c != "multi_device" for o in d.values()]
    res["gpu_tests_pass"] = bool(must_pass) and all(o == "PASSED" for o in must_pass)
    multi = by_cat.get("multi_device", {})
    res["multi_device_skipped"] = all(o == "SKIPPED" for o in multi.values()) if multi else None


# --------------------------------------------------------------------------- stage 3: ResNet-50
def _slim(r: dict) -> dict:
    keep = ("model", "batch", "image_size", "dtype", "device", "num_devices", "compile_s", "train", "memory", "flops")
    return {k: r.get(k) for k in keep}


def stage_resnet50(args, sizes, res: dict, out_path: Path) -> None:
    from flax_resnet.benchmark.run import format_summary, run_benchmark
    from flax_resnet.benchmark.runners import BenchmarkConfig

    b = sizes["bench"]
    cfg = BenchmarkConfig(model=b["model"], batch=b["batch"], image_size=b["image_size"], dtype="bfloat16",
                          steps=b["steps"], repeats=b["repeats"], warmup=b["warmup"], eval=False,
                          peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None)
    log = lambda s: print(s, flush=True)  # noqa: E731
    # Ours alone first (cold compile, then cached), so a slow torch.compile cannot cost us our number.
    alone = run_benchmark(dataclasses.replace(cfg, repeats=min(3, cfg.repeats)), log=log)
    print(format_summary(alone), flush=True)
    res["ours_alone"] = _slim(alone)
    res["compile_s_cold"] = alone["compile_s"]
    solo = alone["train"]["images_per_sec"]
    res["headline"] = {"device": alone["device"], "ours_images_per_sec": round(solo, 1),
                       "fraction_of_bf16_peak": alone["flops"]["train_fraction_of_peak"]}
    res["goals"] = {"ours_at_least_5000_images_per_sec": solo >= GOAL_IMAGES_PER_SEC}
    write_json(out_path, res)  # ours alone, should PyTorch's half run out of time
    both = run_benchmark(dataclasses.replace(cfg, compare_torch=True, torch_compile=b["torch_compile"]), log=log)
    print(format_summary(both), flush=True)
    res["interleaved"] = both
    res["compile_s_from_cache"] = both["compile_s"]
    reference = (both["variants"].get("torch_compile") or {}).get("result") or both["torch"]  # compiled if run
    ours, theirs = both["train"]["images_per_sec"], reference["train"]["images_per_sec"]
    res["headline"] = {
        "device": both["device"], "ours_images_per_sec": round(ours, 1), "torch_images_per_sec": round(theirs, 1),
        "ours_over_torch": round(ours / theirs, 3), "ours_compile_s": round(alone["compile_s"], 1),
        "torch_compile_s": round(reference["compile_s"], 1), "torch_compiled": reference["compiled"],
        "train_tflops": round(both["flops"]["train_flops_per_sec"] / 1e12, 2),
        "fraction_of_bf16_peak": both["flops"]["train_fraction_of_peak"],
        "peak_tflops": both["flops"]["peak_flops"] and both["flops"]["peak_flops"] / 1e12,
    }
    res["goals"] = {"ours_at_least_5000_images_per_sec": ours >= GOAL_IMAGES_PER_SEC,
                    "ours_at_least_torch": ours >= theirs,
                    "applies": not args.dry_run and b["model"] == "resnet50" and b["batch"] == 256}


# --------------------------------------------------------------------------- stage 4: CIFAR loop
def stage_cifar_loop(args, sizes, res: dict, out_path: Path) -> None:
    from flax_resnet.benchmark.loop import format_loop_summary, loop_overhead

    lp = sizes["loop"]
    r = loop_overhead(lp["model"], lp["batch"], lp["steps"], log_every=lp["log_every"],
                      synthetic_train_images=lp["images"], log=lambda s: print(s, flush=True))
    print(format_loop_summary(r), flush=True)
    res.update(r)


# --------------------------------------------------------------------------- stage 5: JPEG pipeline
def stage_jpeg_pipeline(args, sizes, res: dict, out_path: Path) -> None:
    jp = sizes["jpeg"]
    cores = host_cores()
    root = Path(args.work) / "jpeg_folder"
    if not (root / "train").is_dir():
        res["generated"] = jpegs.make_jpeg_folder(root, jp["classes"], jp["per_class"], max(1, cores))
    from flax_resnet.data import enable_worker_processes, prepare

    data_dir = str(Path(args.work) / "tfds")
    t = time.perf_counter()
    prepare(f"folder:{root}", data_dir, verbose=False)
    res["prepare_s"] = round(time.perf_counter() - t, 2)
    enable_worker_processes()
    # Workers from the host's cores: all but one (the process that feeds the accelerator).
    workers = max(1, cores - 1) if not args.dry_run else min(2, max(1, cores - 1))
    res.update(cores=cores, batch=jp["batch"], image_size=224, rows=[])
    for w in (workers, 0):
        row = jpegs.pipeline_rate(f"folder:{root}", data_dir, batch=jp["batch"], waves=jp["waves"] if w else jp["batches"],
                             workers=w)
        print(f"JPEG pipeline, {w} workers: {row['images_per_sec']:.0f} images/s "
              f"(first batch after {row['first_batch_s']} s)", flush=True)
        res["rows"].append(row)
        write_json(out_path, res)
    best = max(r["images_per_sec"] for r in res["rows"])
    res["images_per_sec"] = best
    res["images_per_sec_per_core"] = round(res["rows"][0]["images_per_sec"] / workers, 1)
    bench = read_json(Path(args.out) / "resnet50.json") or {}
    step = (bench.get("headline") or {}).get("ours_images_per_sec") or \
        ((bench.get("ours_alone") or {}).get("train") or {}).get("images_per_sec")
    res["step_images_per_sec"] = step
    res["keeps_up"] = None if not step else best >= step
    res["pipeline_over_step"] = round(best / step, 3) if step else None


# --------------------------------------------------------------------------- the driver
def run_stage(args) -> int:
    """In a child process: one stage, its JSON written as it ends (and partial results before)."""
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    out_path = Path(args.out) / f"{args.stage}.json"
    res: dict = {"stage": args.stage, "dry_run": args.dry_run, "status": "running"}
    t = time.perf_counter()
    try:
        globals()[f"stage_{args.stage}"](args, sizes, res, out_path)
        res["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - the JSON says what broke; the driver goes on
        import traceback

        traceback.print_exc()
        res["status"], res["error"] = "failed", f"{type(e).__name__}: {e}"[:2000]
    res["seconds"] = round(time.perf_counter() - t, 1)
    write_json(out_path, res)
    return 0 if res["status"] == "ok" else 1


def child_env(args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_COMPILATION_CACHE_DIR=str(Path(args.work) / "jax_cache"))
    # tests/conftest.py defaults JAX_PLATFORMS to cpu: name the GPU, so tests and stages run there.
    env["JAX_PLATFORMS"] = "cpu" if args.dry_run else os.environ.get("JAX_PLATFORMS") or "cuda,cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)
    return env


def drive(args) -> int:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s] if args.stages else list(STAGES)
    deadline = time.monotonic() + args.budget
    summary: dict = {"dry_run": args.dry_run, "budget_s": args.budget, "stages": {}}
    t_start = time.monotonic()
    with open(out / "gpu_check.log", "a") as logf:
        scale = 3 if args.dry_run else 1
        for i, stage in enumerate(stages):
            left = deadline - time.monotonic()
            reserve = scale * sum(TIMEOUT_S[s] for s in stages[i + 1:])
            limit = min(left, max(scale * TIMEOUT_S[stage], left - reserve))
            path = out / f"{stage}.json"
            path.unlink(missing_ok=True)
            if limit < 5:
                write_json(path, {"stage": stage, "status": "not run: budget spent"})
            else:
                logf.write(f"\n===== {stage} (limit {limit:.0f} s)\n")
                logf.flush()
                cmd = [sys.executable, __file__, "--stage", stage, "--out", str(out), "--work", str(work)]
                cmd += ["--dry-run"] if args.dry_run else []
                cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
                t = time.monotonic()
                env = child_env(args)
                if stage == "jpeg_pipeline":  # host work only: no CUDA context in it or its workers
                    env["JAX_PLATFORMS"] = "cpu"
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                try:
                    rc = proc.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the stage and everything it started
                    proc.wait()
                    rc = "timeout"
                res = read_json(path) or {"stage": stage}
                if rc == "timeout" or res.get("status") == "running":
                    res["status"] = f"timeout after {limit:.0f} s" if rc == "timeout" else f"died (exit {rc})"
                    res["seconds"] = round(time.monotonic() - t, 1)
                    write_json(path, res)
            res = read_json(path) or {}
            summary["stages"][stage] = _headline(stage, res)
            print(f"[{stage}] {json.dumps(summary['stages'][stage], default=str)}", flush=True)
            if res.get("status") not in ("ok", None) and not str(res.get("status")).startswith("not run"):
                print(_tail(out / "gpu_check.log", 25), flush=True)
    summary["total_s"] = round(time.monotonic() - t_start, 1)
    summary["all_ok"] = all(s.get("status") == "ok" for s in summary["stages"].values())
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=1, default=str), flush=True)
    return 0 if summary["all_ok"] else 1


def _headline(stage: str, r: dict) -> dict:
    keys = {"environment": ("nvidia_smi", "devices", "versions", "bf16_matmul_tflops"),
            "tests": ("counts", "gpu_tests_pass", "multi_device_skipped", "deterministic_ops_flag"),
            "resnet50": ("headline", "goals", "compile_s_cold", "compile_s_from_cache"),
            "cifar_loop": ("model", "batch", "loop_images_per_sec", "bare_images_per_sec", "loop_over_bare"),
            "jpeg_pipeline": ("cores", "images_per_sec", "images_per_sec_per_core", "step_images_per_sec",
                              "keeps_up")}[stage]
    return {"status": r.get("status"), "seconds": r.get("seconds"), "error": r.get("error"),
            **{k: r.get(k) for k in keys}}


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="JSON results ($OUT)")
    p.add_argument("--work", default="/tmp/gpu_check_work", help="scratch: datasets, caches, test files")
    p.add_argument("--dry-run", action="store_true", help="the same stages on CPU at tiny sizes")
    p.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all stages together (default 350; 600 with --dry-run)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not known")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage here
    args = p.parse_args(argv)
    args.out, args.work = os.path.abspath(args.out), os.path.abspath(args.work)
    args.budget = args.budget or (600.0 if args.dry_run else 350.0)
    if unknown := set(filter(None, args.stages.split(","))) - set(STAGES):
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    return run_stage(args) if args.stage else drive(args)


if __name__ == "__main__":
    sys.exit(main())
