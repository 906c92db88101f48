"""Export (``flax_resnet.export``): ONNX logits equal ours in onnxruntime with BatchNorm folded, StableHLO
reloads without our package, the input contract travels with the file, and bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from flax import nnx
from helpers import random_weights, run_cli

from flax_resnet import export, pretrained
from flax_resnet.models import create_model

TOL = 1e-4  # max |theirs - ours| relative to the largest logit


def _random_model(name: str, num_classes: int = 10, in_channels: int = 3):
    """``name`` from the plain layers with seeded random weights and random BatchNorm statistics and
    affine parameters (far from the identity), so that folding them is really tested."""
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, in_channels=in_channels))
    _, params, stats = pretrained.split_state(abstract)
    params, stats = random_weights(params, stats, bias_std=0.2)
    return export.plain_model(name, params, stats, num_classes=num_classes, in_channels=in_channels)


def _rel(theirs, ours) -> float:
    return float(np.max(np.abs(np.asarray(theirs) - np.asarray(ours))) / np.max(np.abs(ours)))


def _nchw(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


# name, image size, BatchNorms folded into a conv, kept as an affine (after an addition or a pool)
CASES = [("resnet18", 64, 20, 0), ("resnet50", 64, 53, 0), ("resnet20", 32, 19, 0), ("article_resnet", 32, 0, 17),
         ("preact_resnet18", 32, 8, 9)]


@pytest.mark.parametrize("name,size,folded,kept", CASES, ids=[c[0] for c in CASES])
def test_onnx_logits_equal_ours_in_onnxruntime_at_batch_1_and_7(name, size, folded, kept):
    model = _random_model(name)
    graph = export.trace(model)
    assert (graph.folded, graph.unfolded) == (folded, kept)
    proto = export.to_onnx(graph, size, {"model": name})
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and ops <= {"Conv", "Relu", "Add", "Mul", "MaxPool", "Slice", "Pad",
                                                      "GlobalAveragePool", "Flatten", "Gemm"}
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == graph.count("conv")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(7, size, size, 3)).astype(np.float32)
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    assert np.std(ours) > 0.1  # logits that differ between classes and images
    for n in (1, 7):
        theirs = session.run(None, {"images": _nchw(x[:n])})[0]
        assert theirs.shape == (n, 10)
        assert _rel(theirs, ours[:n]) < TOL, (n, _rel(theirs, ours[:n]))


@pytest.fixture(scope="module")
def resnet8_file(tmp_path_factory):
    """A random resnet8 (ImageNet-style 3-channel input, 5 classes) saved as PyTorch-layout .safetensors."""
    model = _random_model("resnet8", num_classes=5)
    path = tmp_path_factory.mktemp("weights") / "resnet8.safetensors"
    pretrained.export_safetensors(model, path)
    return path, model


def test_onnx_raw_pixels_puts_the_normalisation_in_the_graph_and_states_the_contract(resnet8_file, tmp_path):
    path, model = resnet8_file
    out = tmp_path / "m.onnx"
    result = export.export(out, pretrained=path, model="resnet8", format="onnx", raw_pixels=True, image_size=24)
    assert result.max_rel_diff is not None and result.max_rel_diff < TOL  # its own check ran
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    contract = json.loads(meta["input_contract"])
    assert contract["layout"] == meta["layout"] == "NCHW" and contract["input_range"] == "0-255"
    assert contract["input_shape"] == ["batch", 3, 24, 24] and contract["num_classes"] == 5
    mean, std = np.asarray(contract["mean"]), np.asarray(contract["std"])
    np.testing.assert_allclose(std, [0.2470, 0.2435, 0.2616])  # CIFAR-10's, the 32x32 networks' default
    pixels = np.random.default_rng(2).integers(0, 256, (3, 24, 24, 3)).astype(np.float32)
    ours = np.asarray(model(jnp.asarray((pixels / 255 - mean) / std, jnp.float32)))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert _rel(session.run(None, {"images": _nchw(pixels)})[0], ours) < TOL


_RELOAD = textwrap.dedent("""
    import sys
    sys.modules["flax_resnet"] = None  # importing our package would fail
    import jax, numpy as np
    exp = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], np.concatenate([np.asarray(exp.call(x[:3])), np.asarray(exp.call(x[3:]))]))
    print(sorted(exp.platforms), exp.in_avals)
""")


def test_stablehlo_reloads_without_our_package_with_any_batch_size(resnet8_file, tmp_path):
    path, model = resnet8_file
    out = tmp_path / "m.stablehlo"
    result = export.export(out, pretrained=path, model="resnet8", format="stablehlo")
    contract = json.loads((tmp_path / "m.json").read_text())
    assert result.contract_path == tmp_path / "m.json" and contract == result.contract
    assert contract["layout"] == "NHWC" and contract["input_shape"] == ["batch", 32, 32, 3]
    assert set(contract["platforms"]) == {"cpu", "cuda", "tpu"}
    x = np.random.default_rng(3).normal(size=(8, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", _RELOAD, str(out), "x.npy", "y.npy"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "['cpu', 'cuda', 'tpu']" in proc.stdout
    assert _rel(np.load(tmp_path / "y.npy"), model(jnp.asarray(x))) < TOL


def test_export_cli_writes_onnx_from_a_run_with_its_classes(digits_run, tmp_path):
    workdir, rc, _ = digits_run
    assert rc == 0
    out = tmp_path / "digits.onnx"
    rc, stdout, err = run_cli(["export", "--workdir", str(workdir), "--format", "onnx", "--out", str(out)])
    assert rc == 0, err
    assert "logits match ours" in stdout
    contract = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["input_contract"])
    assert len(contract["class_names"]) == contract["num_classes"] == 10
    assert contract["input_shape"][1:] == [1, 32, 32] and contract["channels"] == "grayscale"
    assert contract["checkpoint"] == "best" and contract["model"] == "resnet8" and contract["std"]


@pytest.mark.parametrize("argv,words", [
    (["--format", "tflite", "--out", "{tmp}/m.onnx", "--workdir", "{run}"], "unknown export format 'tflite'"),
    (["--format", "onnx", "--out", "{tmp}/m.onnx", "--workdir", "{tmp}/empty"], "no checkpoint"),
    (["--format", "onnx", "--out", "{tmp}/missing/m.onnx", "--workdir", "{run}"], "does not exist"),
    (["--format", "onnx", "--out", "{tmp}/readonly/m.onnx", "--workdir", "{run}"], "permission denied"),
    (["--format", "onnx", "--out", "{tmp}", "--workdir", "{run}"], "is a directory"),
    (["--format", "onnx", "--out", "{tmp}/m.onnx"], "either --workdir"),
    (["--format", "onnx", "--out", "{tmp}/m.onnx", "--pretrained", "{tmp}/w.safetensors"], "pass --model"),
], ids=["format", "no-checkpoint", "missing-dir", "read-only-dir", "out-is-dir", "no-source", "no-model"])
def test_export_cli_bad_input_is_one_line_and_exit_2(argv, words, digits_run, tmp_path):
    if words == "permission denied" and os.geteuid() == 0:
        pytest.skip("running as root: a read-only directory is writable")
    (tmp_path / "empty").mkdir()
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o500)
    argv = [a.format(tmp=tmp_path, run=digits_run[0]) for a in argv]
    rc, _, err = run_cli(["export", *argv])
    os.chmod(tmp_path / "readonly", 0o700)
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_inference_benchmark_cli_reports_latency_and_throughput_of_three_engines(tmp_path, capsys):
    from flax_resnet import benchmark, cli

    rc = cli.main(["benchmark", "--inference", "--model", "resnet8", "--image-size", "16", "--batch", "4",
                   "--steps", "1", "--repeats", "2", "--latency-calls", "4", "--output", str(tmp_path / "r.json")])
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(benchmark.INFERENCE_KEYS) <= set(result)
    engines = {"flax_resnet", "onnxruntime", "torch"}
    assert set(result["latency_ms"]) == set(result["throughput"]) == engines
    assert all(v["calls"] == 4 and 0 < v["median"] <= v["p99"] for v in result["latency_ms"].values())
    assert all(v["images_per_sec"] > 0 for v in result["throughput"].values())
    assert set(result["ratios"]) == {"flax_resnet_latency_vs_torch", "onnxruntime_latency_vs_torch",
                                     "flax_resnet_throughput_vs_torch", "onnxruntime_throughput_vs_torch"}
