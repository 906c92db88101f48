"""The benchmark (functional only, never a timing assertion) and its PyTorch twin against our model."""

from __future__ import annotations

import json
import os
import platform
import sys

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from flax_resnet import benchmark, cli, cpu
from flax_resnet.benchmark import torch_twin
from flax_resnet.models import create_model, forward_flops
from flax_resnet.training import split_model


# --------------------------------------------------------------------------- harness
def _torch_compile_in_workers(monkeypatch, stub: str) -> None:
    """Starts the PyTorch runners' processes with ``torch.compile`` replaced by ``def compile(model)``'s
    body ``stub`` (inductor takes minutes on 2 cores)."""
    from flax_resnet.benchmark import runners, torch_worker

    body = "\n".join("    " + line for line in stub.splitlines())
    code = (f"import runpy, torch\ndef compile(model):\n{body}\ntorch.compile = compile\n"
            f"runpy.run_path({torch_worker.__file__!r}, run_name='__main__')")
    monkeypatch.setattr(runners, "TORCH_WORKER_ARGV", [sys.executable, "-P", "-c", code])


def test_benchmark_cli_writes_json_with_the_documented_keys(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    compiled = tmp_path / "compiled"  # a stand-in for torch.compile that records its calls
    _torch_compile_in_workers(monkeypatch, f"open({str(compiled)!r}, 'a').write('model\\n')\nreturn model")
    out = tmp_path / "bench.json"
    rc = cli.main(["benchmark", "--model", "resnet8", "--batch", "8", "--steps", "2", "--repeats", "1",
                   "--warmup", "1", "--compare-torch", "--torch-compile", "--output", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed == result
    assert set(benchmark.RESULT_KEYS) <= set(result)
    assert result["model"] == "resnet8" and result["batch"] == 8 and result["image_size"] == 32
    assert result["cpu_fast_path"] is True and result["dtype"] == "float32"
    for kind in ("train", "eval"):
        assert result[kind]["images_per_sec"] > 0 and result[kind]["cpu_s_per_step"] > 0
        assert len(result[kind]["repeats_images_per_sec"]) == 1
        assert result["torch"][kind]["images_per_sec"] > 0
        assert result["ratio"][kind] > 0 and result["ratio"][f"{kind}_paired_median"] > 0
    assert result["compile_s"] > 0 and result["eval_compile_s"] > 0 and result["compile_cache"] in ("hit", "miss")
    assert result["flops"]["forward_per_image"] == forward_flops("resnet8", 32)  # from the layers' shapes
    assert result["flops"]["train_per_image"] == pytest.approx(3 * result["flops"]["forward_per_image"])
    assert result["flops"]["train_flops_per_sec"] > 0
    assert result["memory"]["xla_peak_estimate_bytes"] > 0 and result["memory"]["host_max_rss_bytes"] > 0
    assert result["torch"]["memory_format"] == "channels_last"
    assert len(result["environment"]["load_average"]) == 3
    assert result["environment"]["native_conv"]["available"] == cpu.native.available()
    # torch.compile is a third runner beside eager PyTorch, with its own result and ratios.
    assert compiled.read_text() == "model\n" and result["torch"]["compiled"] is False
    tc = result["variants"]["torch_compile"]
    assert tc["result"]["compiled"] is True and tc["result"]["eval_compile_s"] > 0
    for kind in ("train", "eval"):
        assert tc["result"][kind]["images_per_sec"] > 0
        assert tc["ratio"][kind] == pytest.approx(result[kind]["images_per_sec"] / tc["result"][kind]["images_per_sec"])


def test_compile_cache_outcome_tells_a_load_from_a_compile():
    import jax

    from flax_resnet.benchmark.runners import CompilationCacheEvents

    assert jax.config.jax_compilation_cache_dir  # the suite's own cache (conftest)
    salt = float(np.random.default_rng().integers(1 << 30))  # a program no earlier run has cached
    outcomes = []
    for _ in range(2):
        with CompilationCacheEvents() as cache:
            jax.jit(lambda x: x * salt + 1.0).lower(jnp.ones(3)).compile()
        outcomes.append(cache.outcome)
    assert outcomes == ["miss", "hit"]


def test_benchmark_times_eager_torch_when_torch_compile_fails(monkeypatch):
    pytest.importorskip("torch")
    _torch_compile_in_workers(monkeypatch, 'raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\\n'
                                           'more detail")')
    r = benchmark.run_benchmark(benchmark.BenchmarkConfig(model="resnet8", batch=8, steps=1, repeats=1, warmup=0,
                                                          eval=False, torch_compile=True))
    assert r["variants"]["torch_compile"] == {"error": "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"}
    assert r["torch"]["train"]["images_per_sec"] > 0 and r["ratio"]["train"] > 0


def test_torch_runner_runs_in_its_own_process_without_jax(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(cpu, "host_allocator_tuned", lambda: True)  # as under `flax-resnet benchmark`
    runner = benchmark.build_torch(benchmark.BenchmarkConfig(model="resnet8", batch=4, eval=False), 32, 10)
    try:
        assert runner.name == "torch" and runner.eval is None
        assert runner.info["pid"] != os.getpid() and runner.info["imports_jax"] is False
        assert runner.info["host_allocator_tuned"] is (platform.libc_ver()[0] == "glibc")  # the same malloc setting
        assert runner.train(2) > 0 and runner.cpu_seconds() > 0  # wall, and the child's own CPU seconds
    finally:
        runner.close()
    with pytest.raises(ProcessLookupError):  # quit, and waited for
        os.kill(runner.info["pid"], 0)


def test_loop_overhead_runs_the_real_loop(digits_data_dir):
    r = benchmark.loop_overhead("resnet8", batch=16, steps=4, log_every=2, data_dir=str(digits_data_dir))
    assert set(benchmark.LOOP_KEYS) <= set(r)
    assert r["dataset"] == "digits" and r["steps"] == 4
    assert r["loop_images_per_sec"] > 0 and r["bare_images_per_sec"] > 0
    assert r["loop_over_bare"] == pytest.approx(r["loop_images_per_sec"] / r["bare_images_per_sec"])
    assert len(r["loop_interval_images_per_sec"]) == 2  # one train record per logged interval


def test_job_race_times_both_jobs_and_both_learn(digits_data_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("XLA_FLAGS", "")  # the jobs on one device, as a user runs them
    out = tmp_path / "job.json"
    rc = cli.main(["benchmark", "--job", "--model", "resnet8", "--job-epochs", "1", "--repeats", "1", "--no-job-warmup",
                   "--data-dir", str(digits_data_dir), "--job-dir", str(tmp_path / "race"), "--output", str(out),
                   "--config.warmup_epochs=0"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(benchmark.JOB_KEYS) <= set(r) and "ours/PyTorch" in capsys.readouterr().err
    assert r["model"] == "resnet8" and r["epochs"] == 1 and r["steps"] == 22 and r["repeats"] == 1
    for side in ("ours", "torch"):
        assert len(r[side]["runs"]) == 1 and r[side]["wall_s"] > 0
        assert r[side]["final_top1"][0] > 0.15  # both trained: above chance (0.1) after 22 steps
        assert r[side]["breakdown"]["start_to_first_step_s"] > 0 and r[side]["breakdown"]["first_epoch_s"] > 0
    b = r["ours"]["breakdown"]
    assert 0 < b["start_to_model_s"] < b["start_to_first_step_s"] < r["ours"]["wall_s"]
    # checkpoints: the loop's waits, 0.0 s once saves run on their worker thread
    assert b["eval_total_s"] > 0 and b["checkpoint_total_s"] >= 0 and b["exit_s"] >= 0
    assert r["ratio"] == pytest.approx(r["ours"]["wall_s"] / r["torch"]["wall_s"])
    assert (tmp_path / "race" / "ours_run0" / "checkpoints").is_dir()  # our job kept its outputs


def test_torch_job_trains_our_stream_on_the_twin(digits_data_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from flax_resnet import data
    from flax_resnet.benchmark import job, torch_job
    from flax_resnet.configs import load_config

    config = load_config("digits_resnet20", ["--config.model=resnet8", f"--config.data_dir={digits_data_dir}"])
    _, spec = job.write_torch_spec(config, tmp_path)
    arrays = np.load(spec["data"])
    it = data.train_iterator("digits", batch_size=64, seed=0, data_dir=str(digits_data_dir), uint8=True)
    for step in (0, 1, spec["steps_per_epoch"] + 3):  # a later epoch's permutation too
        while it.step < step:
            next(it)
        want = next(it)
        x, y = torch_job.train_batch(arrays["train_images"], arrays["train_labels"], step, seed=0, batch=64,
                                     pad=spec["pad"])
        np.testing.assert_array_equal(x, want["image"])
        np.testing.assert_array_equal(y, want["label"])
    it.close()
    twin = torch_twin.create_torch_model("resnet8", num_classes=10, in_channels=1)
    model = torch_job.build_model(spec)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    assert torch_job.lr_factor(0, 22, 220) == 0 and torch_job.lr_factor(22, 22, 220) == 1
    assert torch_job.lr_factor(220, 22, 220) == pytest.approx(0) and isinstance(model, torch.nn.Module)


def test_benchmark_rejects_bad_arguments(capsys):
    assert cli.main(["benchmark", "--model", "resnet5"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli.main(["benchmark", "--model", "resnet8", "--steps", "0"]) == 2


# --------------------------------------------------------------------------- the PyTorch twin
def test_torch_twin_is_our_network():
    torch = pytest.importorskip("torch")
    model = create_model("resnet8")
    _, params, stats = split_model(model)
    ref = torch_twin.create_torch_model("resnet8")
    torch_twin.load_flax_weights(ref, params, stats)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    for train in (False, True):
        model.train() if train else model.eval()
        ref.train(train)
        with torch.no_grad():
            want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        chex.assert_trees_all_close(np.asarray(model(jnp.asarray(x))), want, atol=1e-4, rtol=1e-4)
