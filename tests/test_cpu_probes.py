"""``experiments/cpu_probes.py``: each probe runs and prints the lines docs/performance.md quotes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from flax_resnet import cpu
from flax_resnet.cpu import convs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_probes():
    spec = importlib.util.spec_from_file_location("experiments_cpu_probes", EXPERIMENTS / "cpu_probes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_native_times_each_operation(capsys, monkeypatch):
    probes = load_probes()
    monkeypatch.setattr(probes.ops, "CONV_SHAPES", ((8, 16, 16, 16),))
    assert probes.main(["native"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("3x3 16->16 @16x16 b8")]
    assert len(lines) == 1
    rates = dict(part.strip().rsplit(" ", 1) for part in lines[0].split(": ", 1)[1].split(";"))
    assert set(rates) == {"fwd XLA", "fwd native", "dW XLA autodiff", "dW channel-major", "dW native"}, lines[0]
    assert all(int(r) > 0 for r in rates.values())


def test_reduction_prints_one_timed_line_per_shape(capsys):
    assert load_probes().main(["reduction"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("E[x]")]
    assert len(lines) == 3
    for line in lines:
        times = [float(t) for t in re.findall(r"([0-9.]+) ms", line)]
        assert len(times) == 4 and all(t > 0 for t in times), line


def test_fusions_times_each_list_and_restores_ours(capsys):
    ours = dict(cpu.COMPILER_OPTIONS)
    argv = ["fusions", "--model", "resnet8", "--batch", "8", "--steps", "1", "--repeats", "1",
            "--lists", "INDIVIDUAL_DOT", "INDIVIDUAL_DOT,REDUCE"]
    assert load_probes().main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "YNNPACK fusions" in line]
    assert [re.search(r"fusions (\S+):", line).group(1) for line in lines] == ["INDIVIDUAL_DOT", "INDIVIDUAL_DOT,REDUCE"]
    for line in lines:
        rates = [float(r) for r in re.findall(r"([0-9.]+) images/s", line)]
        assert len(rates) == 2 and all(r > 0 for r in rates), line
    assert cpu.COMPILER_OPTIONS == ours and cpu.compiler_options() == ours


@pytest.mark.parametrize("size", [6, 7])
def test_winograd_is_the_3x3_convolution(size):
    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.normal(size=(2, size, size, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 8, 5)), jnp.float32)
    got = np.asarray(load_probes().winograd_3x3(x, k))
    want = np.asarray(convs.xla_conv(x, k, 1, 1))
    assert got.shape == want.shape == (2, size, size, 5)
    chex.assert_trees_all_close(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_weightgrads_times_each_formulation(capsys):
    assert load_probes().main(["weightgrads", "--model", "resnet8", "--batch", "8", "--steps", "1",
                               "--repeats", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " gradients " in line]
    assert [re.search(r" gradients (.+): train", line).group(1) for line in lines] == [
        "ours", "kxk: XLA's autodiff", "kxk: barrier + XLA's dW", "1x1: channel-major copy + dot",
        "3x3/2 dx: XLA's transposed conv"]
    assert all(float(re.search(r"train ([0-9.]+) images/s", line).group(1)) > 0 for line in lines)


def test_batchnorm_and_options_time_each_variant(capsys):
    probes = load_probes()
    assert probes.main(["batchnorm", "--model", "resnet8", "--batch", "8", "--steps", "1", "--repeats", "1"]) == 0
    assert probes.main(["fusions", "--model", "resnet8", "--batch", "8", "--steps", "1", "--repeats", "1",
                        "--lists", "--options", "xla_cpu_scheduler_type=1"]) == 0
    out = capsys.readouterr().out
    names = re.findall(r" BatchNorm (.+): train ([0-9.]+) images/s", out)
    assert [n for n, _ in names] == ["ours (hand-written backward)", "NNX's, autodiffed", "affine only (no statistics; bound)"]
    assert re.findall(r"fusions (\S+): train", out) == ["ours+xla_cpu_scheduler_type=1"]
    assert all(float(r) > 0 for _, r in names)


def test_faults_prints_one_line_per_step(capsys):
    assert load_probes().main(["faults", "--model", "resnet8", "--batch", "8", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"host allocator tuned: (True|False)", out)
    steps = re.findall(r"step (\d+): (\d+) ms, (\d+) MB faulted in, sys (\d+) ms, user (\d+) ms, max RSS (\d+) MB", out)
    assert [s[0] for s in steps] == ["0", "1"] and all(int(s[5]) > 0 for s in steps)
