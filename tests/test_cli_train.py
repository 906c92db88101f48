"""End to end through the CLI: `train` on digits with a tiny model, then `evaluate` and `predict`.

One short run (resnet8, 2 epochs, 8 simulated devices; ``digits_run`` in conftest.py) is shared
by every test here and by tests/test_checkpointing.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from flax_resnet.cli import main

EPOCHS = 2


@pytest.fixture(scope="module")
def run(digits_run):
    """The session's shared run (tests/conftest.py: resnet8, EPOCHS epochs, batch 64, saves every 8 steps)."""
    return digits_run


def test_train_prints_the_run(run):
    _, rc, out = run
    assert rc == 0, out
    assert "config:" in out and "model: 'resnet8'" in out
    assert "devices: 8 x CPU" in out and "mesh {'data': 8}" in out
    assert "compiled train step in" in out
    for e in range(1, EPOCHS + 1):
        assert f"epoch {e}/{EPOCHS}  step" in out and "test top-1" in out
    assert "final test top-1" in out and "best" in out


def test_train_writes_every_output(run):
    workdir, _, _ = run
    assert (workdir / "metrics.jsonl").stat().st_size > 0
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == max(steps)
    assert any(p.name.isdigit() for p in (workdir / "checkpoints_best").iterdir())


def test_loss_falls_and_eval_counts_the_whole_split(run):
    workdir, _, _ = run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == EPOCHS
    assert np.mean([r["loss"] for r in train[-2:]]) < train[0]["loss"] - 0.1
    from flax_resnet.data import get_dataset_info

    info = get_dataset_info("digits")
    assert info.eval_size % 64 != 0  # the final eval batch is padded ...
    assert all(r["test_count"] == info.eval_size for r in evals)  # ... and each example counted once
    assert {"lr", "grad_norm", "top1", "top5", "images_per_sec"} <= set(train[0])


def test_evaluate_restores_best_checkpoint(run, capsys):
    workdir, _, _ = run
    best = max(json.loads(line)["test_top1"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
               if '"eval"' in line)
    assert main(["evaluate", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {100 * best:.2f}%" in out, out
    assert main(["evaluate", "--workdir", str(workdir), "--checkpoint", "latest"]) == 0


def test_predict_prints_top5(run, tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    workdir, _, _ = run
    digit = load_digits().images[0]  # a zero
    path = tmp_path / "zero.png"
    Image.fromarray((digit * 255 / 16).astype(np.uint8)).resize((32, 32)).save(path)
    assert main(["predict", "--workdir", str(workdir), str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(path)
    probs = [float(line.split("%")[0]) for line in lines[1:]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 100.01


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["train", "--config", "no_such_recipe"]) == 2
    assert main(["train", "--config.no_such_field=1"]) == 2
    assert main(["evaluate", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config" in err and "flax-resnet train" in err


def test_train_again_resumes_from_the_newest_checkpoint(run, tmp_path, capsys):
    workdir, _, _ = run
    copy = tmp_path / "resumed"
    shutil.copytree(workdir, copy)
    assert main(["train", "--workdir", str(copy), "--config.model=resnet8", f"--config.num_epochs={EPOCHS + 1}",
                 "--config.batch_size=64", "--config.log_every_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and f"epoch {EPOCHS + 1}/{EPOCHS + 1}" in out and "epoch 1/" not in out
    evals = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [r["epoch"] for r in evals] == list(range(1, EPOCHS + 2))


# Config files that fail to load, each with a word its one-line error must hold.
BAD_CONFIG_FILES = {
    "missing.py": (None, "not found"),
    "syntax.py": ("def get_config(:\n", "syntax error"),
    "bad_import.py": ("import no_such_module_for_flax_resnet\n", "ModuleNotFoundError"),
    "no_get_config.py": ("x = 1\n", "no get_config()"),
    "raises.py": ("def get_config():\n    raise RuntimeError('boom')\n", "RuntimeError: boom"),
}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", sorted(BAD_CONFIG_FILES))
def test_a_config_file_that_fails_to_load_is_one_line_exit_2(name, tmp_path, capsys):
    text, words = BAD_CONFIG_FILES[name]
    if text is not None:
        (tmp_path / name).write_text(text)
    workdir = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / name), "--workdir", str(workdir)]) == 2
    line = _one_line_error(capsys)
    assert name in line and words in line
    assert not workdir.exists()


def test_a_file_named_like_a_recipe_does_not_shadow_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_resnet20").write_text("garbage that would crash if run as Python (\n")
    # The recipe loads (and here fails validation on purpose, before any training starts).
    assert main(["train", "--config", "digits_resnet20", "--config.num_epochs=-1"]) == 2
    assert "--config.num_epochs=-1: must be at least 1 (or set --config.num_train_steps)" in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override,field", [
    ("--config.num_epochs=-1", "num_epochs"), ("--config.num_train_steps=-3", "num_train_steps"),
    ("--config.learning_rate=0", "learning_rate"), ("--config.batch_size=0", "batch_size"),
    ("--config.image_size=3", "image_size"), ("--config.momentum=1.5", "momentum"),
    ("--config.schedule=linear", "schedule"), ("--config.model=resnet21", "resnet21"),
    ("--config.label_smoothing=-0.1", "label_smoothing"), ("--config.max_to_keep=0", "max_to_keep"),
])
def test_an_invalid_field_is_one_line_exit_2_and_writes_nothing(override, field, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["train", override, "--workdir", str(workdir)]) == 2
    assert field in _one_line_error(capsys)
    assert not workdir.exists()
