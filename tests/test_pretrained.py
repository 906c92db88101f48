"""flax_resnet.pretrained: torchvision/timm state dicts <-> our models, checked against PyTorch.

The PyTorch reference below is written here with torchvision's exact module layout and
attribute names (torchvision itself does not import beside this torch), so its
``state_dict()`` keys are torchvision's. Weights, BatchNorm affine parameters and running
statistics are all seeded random values, so a wrong transpose, a swapped name or a
biased/unbiased variance mix-up fails the test.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from flax_resnet import cli, pretrained  # noqa: E402
from flax_resnet.errors import UserError  # noqa: E402
from flax_resnet.models import create_model  # noqa: E402
from flax_resnet.models.layers import BatchNorm  # noqa: E402
from flax_resnet.benchmark.torch_twin import create_torch_model  # noqa: E402
from flax_resnet.training.state import split_model  # noqa: E402

torch.set_num_threads(2)


# --------------------------------------------------------------------------- torchvision's layout
# torchvision's architectures, written once in the library (flax_resnet/benchmark/torch_twin.py,
# also the benchmark's PyTorch side) with torchvision's module names.
ARCHS = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2")


def torch_model(name: str, seed: int = 0, num_classes: int = 1000):
    """torchvision's architecture with seeded random weights *and* BatchNorm statistics."""
    torch.manual_seed(seed)
    model = create_torch_model(name, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.4, 1.0)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.Linear):
                m.weight.mul_(10.0)  # logits of order 5, so an absolute tolerance means something
    return model


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", ARCHS)
def test_converted_model_matches_pytorch(name, tmp_path):
    """Eval logits within 1e-4, BatchNorm running statistics after one train-mode forward
    equal, and export -> import is the identity (bit for bit, every torchvision key)."""
    tm = torch_model(name)
    reference = numpy_state_dict(tm)
    # resnet18 goes through a .pth (torch.load(weights_only=True)), the others through safetensors.
    if name == "resnet18":
        path = tmp_path / "weights.pth"
        torch.save(tm.state_dict(), path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(path))

    model = nnx.eval_shape(lambda: create_model(name))
    _, params, stats = pretrained.split_state(model)
    params, stats, loaded = pretrained.from_torch_state_dict(pretrained.read_state_dict(path), params, stats)
    assert len(loaded) == sum(1 for k in reference if not k.endswith("num_batches_tracked"))
    model = nnx.merge(nnx.graphdef(model), params, stats)
    graph, params, stats = split_model(model)

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    tm.eval()
    with torch.no_grad():
        want_logits = tm(torch.from_numpy(x)).numpy()
    tm.train()
    with torch.no_grad():
        tm(torch.from_numpy(x))
    want_stats = numpy_state_dict(tm)

    @jax.jit
    def forward(params, stats, x):
        logits, _ = graph.apply(params, stats, x, train=False)
        _, new_stats = graph.apply(params, stats, x, train=True)
        return logits, new_stats

    logits, new_stats = forward(params, stats, jnp.asarray(x.transpose(0, 2, 3, 1)))
    diff = float(np.abs(np.asarray(logits) - want_logits).max())
    print(f"{name}: eval logits max |diff| {diff:.2e} (max |logit| {np.abs(want_logits).max():.2f})")
    assert diff <= 1e-4

    got = pretrained.to_torch_state_dict(params, new_stats)
    running = {key: want for key, want in want_stats.items() if "running" in key}
    # Deep layers normalise over 8 values per channel (2 images at 2x2), which amplifies float32
    # rounding: jax 0.10.2 lands within 4e-5 relative, 0.10.0 (the oldest allowed) within 2.6e-4.
    # The biased-variance bug this guards against is ~1e-1 there.
    chex.assert_trees_all_close({key: got[key] for key in running}, running, rtol=1e-3, atol=1e-4)
    worst = max(float(np.abs(got[key] - want).max()) for key, want in running.items())
    print(f"{name}: BatchNorm running statistics after one train step, max |diff| {worst:.2e}")

    # Export -> import: our layout back to torchvision's is exactly the file we read.
    out = tmp_path / "export.safetensors"
    exported = pretrained.export_safetensors((params, stats), out)
    assert set(exported) == set(reference)
    again = pretrained.read_state_dict(out)
    for key, want in reference.items():
        if not key.endswith("num_batches_tracked"):
            assert again[key].dtype == want.dtype and np.array_equal(again[key], want), key
    _, p2, s2 = pretrained.split_state(nnx.eval_shape(lambda: create_model(name)))
    p2, s2, _ = pretrained.from_torch_state_dict(again, p2, s2)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), (p2, s2), (params, stats)))


def test_batchnorm_running_var_is_unbiased_as_pytorch():
    """One train-mode call: PyTorch folds the unbiased batch variance into running_var; so do we."""
    x = np.random.default_rng(1).normal(3.0, 2.0, (2, 4, 5, 3)).astype(np.float32)  # NCHW: n = 2*5*3 = 30
    tbn = nn.BatchNorm2d(4)
    with torch.no_grad():
        tbn.running_mean.uniform_(-1, 1)
        tbn.running_var.uniform_(0.5, 2)
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.uniform_(-1, 1)
    ours = BatchNorm(4, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    ours.mean[...] = jnp.array(tbn.running_mean.numpy(), copy=True)
    ours.var[...] = jnp.array(tbn.running_var.numpy(), copy=True)
    ours.scale[...] = jnp.asarray(tbn.weight.detach().numpy())
    ours.bias[...] = jnp.asarray(tbn.bias.detach().numpy())
    stock = nnx.BatchNorm(4, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    stock.var[...] = ours.var[...]
    stock.mean[...] = ours.mean[...]
    tbn.train()
    with torch.no_grad():
        y = tbn(torch.from_numpy(x)).numpy()
    out = ours(jnp.asarray(x.transpose(0, 2, 3, 1)), use_running_average=False)
    stock(jnp.asarray(x.transpose(0, 2, 3, 1)), use_running_average=False)
    chex.assert_trees_all_close(np.asarray(ours.var[...]), tbn.running_var.numpy(), rtol=1e-6)
    chex.assert_trees_all_close(np.asarray(ours.mean[...]), tbn.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(np.asarray(out), y.transpose(0, 2, 3, 1), atol=2e-6)
    # stock NNX folds the biased variance: visibly different (n = 30)
    assert np.abs(np.asarray(stock.var[...]) - tbn.running_var.numpy()).max() > 1e-3


# --------------------------------------------------------------------------- files, keys, errors
def zeros_model(name: str, num_classes: int = 1000):
    """A real model without running its initialisers (whose eager compiles are slow): all zeros."""
    abstract = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes))
    graphdef, params, stats = pretrained.split_state(abstract)
    return nnx.merge(graphdef, *jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (params, stats)))


@pytest.fixture(scope="module")
def resnet18_sd():
    return numpy_state_dict(torch_model("resnet18", seed=3))


def test_head_dropped_or_loaded(resnet18_sd):
    m = zeros_model("resnet18", num_classes=7)
    loaded = pretrained.load_state_dict(m, resnet18_sd, load_head=False)
    assert "fc.weight" not in loaded and not np.asarray(m.fc.kernel[...]).any()  # kept: still zeros
    chex.assert_trees_all_equal(np.asarray(m.conv1.kernel[...]), resnet18_sd["conv1.weight"].transpose(2, 3, 1, 0))
    chex.assert_trees_all_equal(np.asarray(m.layer2[0].downsample[1].var[...]),
                                  resnet18_sd["layer2.0.downsample.1.running_var"])
    m2 = zeros_model("resnet18")
    pretrained.load_state_dict(m2, resnet18_sd)
    chex.assert_trees_all_equal(np.asarray(m2.fc.kernel[...]), resnet18_sd["fc.weight"].T)


def test_key_and_shape_mismatches_name_the_key(resnet18_sd):
    _, p34, s34 = pretrained.split_state(nnx.eval_shape(lambda: create_model("resnet34")))
    with pytest.raises(UserError, match=r"missing key .*'layer1\.2\.conv1\.weight'.* \(and \d+ more\)"):
        pretrained.from_torch_state_dict(resnet18_sd, p34, s34)
    _, p18, s18 = pretrained.split_state(nnx.eval_shape(lambda: create_model("resnet18")))
    extra = dict(resnet18_sd, **{"layer1.0.se.fc.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(UserError, match=r"unexpected key 'layer1\.0\.se\.fc\.weight'"):
        pretrained.from_torch_state_dict(extra, p18, s18)
    bad = dict(resnet18_sd)
    bad["layer3.1.bn2.running_mean"] = np.zeros(7, np.float32)
    with pytest.raises(UserError, match=r"'layer3\.1\.bn2\.running_mean' has shape \(7,\) but the model needs \(256,\)"):
        pretrained.from_torch_state_dict(bad, p18, s18)
    _, p10, s10 = pretrained.split_state(nnx.eval_shape(lambda: create_model("resnet18", num_classes=10)))
    with pytest.raises(UserError, match=r"'fc\.weight' has shape \(1000, 512\) but the model needs \(10, 512\)"):
        pretrained.from_torch_state_dict(resnet18_sd, p10, s10)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.getpid, ())


def test_pickle_needing_code_is_refused(tmp_path, resnet18_sd):
    path = tmp_path / "full_checkpoint.pth"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in resnet18_sd.items()}, "extra": _RunsCode()}, path)
    with pytest.raises(UserError, match=r"refusing to load .*run Python code \(\w+\.getpid\).*weights_only=True.*state_dict\(\)"):
        pretrained.read_state_dict(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read .*junk.pth as a PyTorch checkpoint"):
        pretrained.read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(UserError, match="not found"):
        pretrained.read_state_dict(tmp_path / "missing.safetensors")


def test_wrapped_timm_style_and_bf16_files(tmp_path, resnet18_sd):
    """timm/training-script checkpoints: ``{"state_dict": {"module.conv1.weight": ...}}``, bf16 safetensors."""
    wrapped = {"epoch": 3, "state_dict": {"module." + k: torch.from_numpy(v) for k, v in resnet18_sd.items()}}
    torch.save(wrapped, tmp_path / "timm.pth.tar.pt")
    sd = pretrained.read_state_dict(tmp_path / "timm.pth.tar.pt")
    assert set(sd) == set(resnet18_sd) and np.array_equal(sd["layer4.1.conv2.weight"], resnet18_sd["layer4.1.conv2.weight"])

    from safetensors.torch import save_file

    save_file({k: (torch.from_numpy(v).bfloat16() if v.dtype == np.float32 else torch.from_numpy(v))
               for k, v in resnet18_sd.items()}, str(tmp_path / "bf16.safetensors"))
    sd16 = pretrained.read_state_dict(tmp_path / "bf16.safetensors")
    assert sd16["conv1.weight"].dtype == np.float32
    chex.assert_trees_all_close(sd16["conv1.weight"], resnet18_sd["conv1.weight"], rtol=1e-2, atol=1e-3)
    pretrained.load_state_dict(zeros_model("resnet18"), sd16)


def test_cli_convert(tmp_path, resnet18_sd, capsys):
    src = tmp_path / "resnet18-random.pth"
    torch.save({k: torch.from_numpy(v) for k, v in resnet18_sd.items()}, src)
    out = tmp_path / "resnet18.safetensors"
    assert cli.main(["convert", str(src), str(out), "--model", "resnet18"]) == 0
    assert "wrote" in capsys.readouterr().out
    sd = pretrained.read_state_dict(out)
    assert set(sd) == set(resnet18_sd)
    assert all(np.array_equal(sd[k], v) for k, v in resnet18_sd.items() if not k.endswith("num_batches_tracked"))
    # the torchvision-layout file loads into the PyTorch model strictly
    tm = torch_model("resnet18", seed=9)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)

    assert cli.main(["convert", str(src), str(tmp_path / "x.safetensors"), "--model", "resnet50"]) == 2
    assert "missing key 'layer1.0.conv3.weight'" in capsys.readouterr().err
    assert cli.main(["convert", str(src), str(tmp_path / "x.npz"), "--model", "resnet18"]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
