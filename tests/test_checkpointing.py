"""Fault tolerance: exact resume after SIGTERM and SIGKILL, NaN, damaged checkpoints, device counts,
config mismatch, and bad input (exit 2, one line, nothing already saved touched).

Everything compares against the session's shared digits run (``digits_run`` in conftest.py:
resnet8, 2 epochs = 44 steps, 8 simulated devices): a test copies its workdir, damages or
resumes the copy, and checks the final state bit for bit (CPU) with chex.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import chex
import jax
import numpy as np
import pytest

from flax_resnet import parallel
from flax_resnet.checkpoint import Checkpointer, structural_problem
from flax_resnet.training.preemption import PreemptionGuard
from flax_resnet.training.restore import restore_model
from flax_resnet.errors import UserError
from helpers import (DIGITS_TOTAL_STEPS as TOTAL, CliProcess, restore_state, run_cli, saved_steps, snapshot,
                     train_argv)


@pytest.fixture
def straight(digits_run):
    workdir, rc, out = digits_run
    assert rc == 0, out
    return workdir


@pytest.fixture(scope="module")
def straight_final(digits_run):
    """The uninterrupted run's state at its last step (host arrays)."""
    return restore_state(digits_run[0], TOTAL)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def eval_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"], rows


def error_line(err: str) -> str:
    """The CLI's error output must be exactly one line, without a traceback (progress bars aside)."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not re.match(r"epoch \d+/\d+:", line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- exact resume
def test_sigterm_then_sigkill_then_resume_is_bit_identical(straight, straight_final, digits_data_dir, tmp_path):
    """SIGTERM saves and exits 3; a resumed process is SIGKILLed mid-epoch; a third run finishes.

    The final params, BatchNorm statistics, optimiser state, step and RNG equal the
    uninterrupted run's bit for bit, and metrics.jsonl keeps every earlier record.
    """
    work = tmp_path / "run"
    argv = train_argv(work, digits_data_dir)

    # 1. Preemption: SIGTERM once the first periodic checkpoint (step 8) is on disk.
    p1 = CliProcess(argv, tmp_path, "preempted")
    p1.wait_until(lambda: 8 in saved_steps(work))
    p1.proc.send_signal(signal.SIGTERM)
    assert p1.wait() == 3, (p1.out, p1.err[-3000:])
    assert "Traceback" not in p1.err
    m = re.search(r"stopped by SIGTERM at step (\d+): checkpoint saved in \S+/checkpoints/(\d+)", p1.out)
    assert m and m[1] == m[2], p1.out
    stop = int(m[1])
    assert 8 <= stop < TOTAL and stop in saved_steps(work), (stop, saved_steps(work))

    # 2. Resume, then SIGKILL as soon as a later checkpoint exists (mid-epoch: epochs are 22 steps).
    p2 = CliProcess(argv, tmp_path, "killed")
    p2.wait_until(lambda: max(saved_steps(work)) > stop)
    p2.kill()
    assert p2.proc.returncode == -signal.SIGKILL
    assert f"resumed from {work / 'checkpoints' / str(stop)} at step {stop}" in p2.out, p2.out

    # 3. Resume again (in this process) and finish.
    rc, out, err = run_cli(argv)
    assert rc == 0, err
    assert "resumed from" in out and "final test top-1" in out

    chex.assert_trees_all_equal(restore_state(work, TOTAL), straight_final)

    evals, rows = eval_rows(work)
    straight_evals, _ = eval_rows(straight)
    assert [r["kind"] for r in rows].count("resume") == 2
    assert any(r["kind"] == "train" and r["step"] == 4 for r in rows)  # the first process's records survive
    assert evals[-1]["epoch"] == 2 and evals[-1]["test_top1"] == straight_evals[-1]["test_top1"]
    assert evals[-1]["test_loss"] == straight_evals[-1]["test_loss"]


def test_ema_is_checkpointed_evaluated_and_resumes_bit_identically(digits_data_dir, tmp_path):
    """A 12-step run with an EMA of the weights: every eval record carries ``ema_test_top1``,
    the best checkpoint is picked by it (best_metric), and a run resumed from step 8 ends with
    the uninterrupted run's state, EMA included, bit for bit. The same run (to share its
    cost) writes a profiler trace of steps 2..4 for TensorBoard (``profile_steps``)."""
    extra = ("--config.num_train_steps=12", "--config.checkpoint_every_steps=4", "--config.ema_decay=0.9",
             "--config.best_metric=ema_test_top1", "--config.async_checkpointing=false")
    straight = tmp_path / "straight"
    rc, out, err = run_cli(train_argv(straight, digits_data_dir, *extra, "--config.profile_steps=2,4"))
    assert rc == 0, err[-2000:]
    traces = list((straight / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, list((straight / "profile").rglob("*"))
    assert "EMA top-1" in out and "best EMA" in out
    evals, _ = eval_rows(straight)
    assert evals[-1]["ema_test_top1"] != evals[-1]["test_top1"] or evals[-1]["ema_test_loss"] != evals[-1]["test_loss"]
    with Checkpointer(straight, read_only=True) as ck:
        assert ck.best_metric() == evals[-1]["ema_test_top1"]
    final = restore_state(straight, 12)
    assert final.ema is not None
    assert not np.array_equal(final.ema["params"]["fc"]["kernel"], final.params["fc"]["kernel"])
    # the EMA picked the best checkpoint, so inference (evaluate, predict, convert) restores the EMA
    best = restore_model(straight, "best", mesh=parallel.create_mesh(jax.devices()[:1]))
    assert best.ema and best.step == 12
    chex.assert_trees_all_equal(jax.device_get((best.state.params, best.state.batch_stats)),
                                (final.ema["params"], final.ema["batch_stats"]))
    raw = restore_model(straight, "best", mesh=parallel.create_mesh(jax.devices()[:1]), ema=False)
    chex.assert_trees_all_equal(jax.device_get(raw.state.params), final.params)

    resumed = copy_run(straight, tmp_path / "resumed")
    for kind in ("checkpoints", "checkpoints_best"):
        shutil.rmtree(resumed / kind / "12")
    rc, out, err = run_cli(train_argv(resumed, digits_data_dir, *extra))
    assert rc == 0 and "at step 8" in out, err[-2000:]
    chex.assert_trees_all_equal(restore_state(resumed, 12), final)
    assert eval_rows(resumed)[0][-1]["ema_test_top1"] == evals[-1]["ema_test_top1"]


def _truncate_largest(dirpath):
    files = sorted((p for p in dirpath.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])
    return files[-1]


def test_resume_skips_damaged_checkpoints_and_never_deletes(straight, straight_final, digits_data_dir, tmp_path):
    """A truncated array file, a step without commit marker and an interrupted save: resume from step 40."""
    work = copy_run(straight, tmp_path / "run")
    ckpts, best = work / "checkpoints", work / "checkpoints_best"
    assert saved_steps(work) == [32, 40, 44] and saved_steps(work, "checkpoints_best") == [44]
    _truncate_largest(ckpts / "44" / "state")  # finalised, but an array file is cut short
    (best / "44" / "commit_success.txt").unlink()  # half-written: no commit marker, an item missing
    shutil.rmtree(best / "44" / "state")
    shutil.copytree(ckpts / "40", ckpts / "48.orbax-checkpoint-tmp-1234")  # a save killed mid-write
    good = {s: snapshot(ckpts / str(s)) for s in (32, 40)}

    rc, out, err = run_cli(train_argv(work, digits_data_dir))
    assert rc == 0, err
    assert f"resumed from {ckpts / '40'} at step 40" in out
    for name, why in (("checkpoints/44", "cannot restore"), ("checkpoints_best/44", "commit_success"),
                      ("checkpoints/48.orbax-checkpoint-tmp-1234", "incomplete save")):
        assert re.search(rf"warning: bad checkpoint \S*{re.escape(name)}: .*{why}", err), (name, err)
    assert (ckpts / "44.corrupt").is_dir() and (best / "44.corrupt").is_dir()
    assert (ckpts / "48.orbax-checkpoint-tmp-1234.corrupt").is_dir()
    assert {s: snapshot(ckpts / str(s)) for s in (32, 40)} == good  # good checkpoints untouched
    # Steps 40..44 were retrained from the good checkpoint: the same state as the straight run.
    chex.assert_trees_all_equal(restore_state(work, TOTAL), straight_final)


def test_checkpointer_resume_rules(tmp_path):
    """Unit rules: only incomplete saves -> fresh start; nothing readable -> UserError and nothing renamed."""
    import jax.numpy as jnp

    state = {"w": jnp.arange(4.0)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    warnings = []
    (tmp_path / "a" / "checkpoints" / "3.orbax-checkpoint-tmp-9").mkdir(parents=True)
    with Checkpointer(tmp_path / "a", warn=warnings.append) as ck:
        assert ck.resume(abstract) is None
    assert (tmp_path / "a" / "checkpoints" / "3.orbax-checkpoint-tmp-9.corrupt").is_dir()
    assert "incomplete save" in warnings[0] and "starting afresh" in warnings[0]

    with Checkpointer(tmp_path / "b", async_save=False) as ck:
        ck.save(2, state, {}, {"model": "x"}, force=True)
    assert structural_problem(tmp_path / "b" / "checkpoints" / "2") is None
    (tmp_path / "b" / "checkpoints" / "2" / "config" / "metadata").write_text('{"mod')  # truncated JSON
    assert "unreadable" in structural_problem(tmp_path / "b" / "checkpoints" / "2")
    before = snapshot(tmp_path / "b")
    with Checkpointer(tmp_path / "b", warn=warnings.append) as ck:
        with pytest.raises(UserError, match=r"no readable checkpoint .*checkpoints/2: config/metadata is unreadable"):
            ck.resume(abstract)
    assert snapshot(tmp_path / "b") == before


# --------------------------------------------------------------------------- preemption (unit)
def test_preemption_guard_turns_signals_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop(1) and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: stop now
            os.kill(os.getpid(), signal.SIGINT)
    assert parallel.any_process(True) and not parallel.any_process(False)  # the multi-host hook, one process


# --------------------------------------------------------------------------- non-finite loss
def test_nan_loss_stops_naming_the_step_and_writes_nothing(straight, digits_data_dir, tmp_path):
    work = copy_run(straight, tmp_path / "run")
    before = {d: snapshot(work / d) for d in ("checkpoints", "checkpoints_best")}
    rc, out, err = run_cli(train_argv(work, digits_data_dir, "--config.num_epochs=3", "--config.learning_rate=1e6"))
    assert rc == 2
    line = error_line(err)
    # Either a metric goes non-finite first, or (BatchNorm keeping the loss finite) the weights do,
    # caught by the state check before the epoch-end save.
    m = re.search(r"training diverged at step (\d+): ((loss|grad_norm) is (nan|inf)|the model state has NaN/inf)", line)
    assert m and TOTAL < int(m[1]) <= TOTAL + 4, line  # detected at the first metrics fetch (every 4 steps)
    assert f"last good checkpoint, step {TOTAL}" in line and "learning_rate" in line
    assert {d: snapshot(work / d) for d in ("checkpoints", "checkpoints_best")} == before


# --------------------------------------------------------------------------- device counts
def test_resume_on_one_device_and_back_on_eight(straight, digits_data_dir, tmp_path):
    """Saved on 8 devices -> resumed and trained on 1 -> resumed and trained on 8."""
    if jax.device_count() < 8:  # an accelerator's real devices (the GPU check)
        pytest.skip(f"needs 8 devices, has {jax.device_count()} (tests/conftest.py simulates 8 on CPU)")
    from flax_resnet.configs import load_config
    from flax_resnet.training import restore_model, train_and_evaluate

    work = copy_run(straight, tmp_path / "run")
    one = parallel.create_mesh(jax.devices()[:1])

    def train(steps, mesh=None):
        argv = train_argv(work, digits_data_dir, f"--config.num_train_steps={steps}")
        lines = []
        summary = train_and_evaluate(load_config(argv[4], argv[5:]), work, mesh=mesh, print_fn=lines.append)
        return summary, "\n".join(map(str, lines))

    summary, out = train(TOTAL + 4, mesh=one)
    assert f"resumed from {work / 'checkpoints' / str(TOTAL)}" in out and "devices: 1 x CPU" in out
    assert summary.steps == TOTAL + 4 and np.isfinite(summary.final_loss)
    on_one = restore_state(work, TOTAL + 4, mesh=one)

    summary, out = train(TOTAL + 8)
    assert f"resumed from {work / 'checkpoints' / str(TOTAL + 4)}" in out and "devices: 8 x CPU" in out
    assert summary.steps == TOTAL + 8
    m = restore_model(work, "latest")
    assert m.step == TOTAL + 8 and len(jax.tree.leaves(m.state.params)[0].sharding.device_set) == 8
    # The step-48 checkpoint written from one device reads back identically on eight.
    chex.assert_trees_all_equal(restore_state(work, TOTAL + 4), on_one)


# --------------------------------------------------------------------------- config mismatch / new head
def test_resume_with_another_model_names_the_keys(straight, digits_data_dir, tmp_path):
    work = copy_run(straight, tmp_path / "run")
    before = snapshot(work)
    rc, _, err = run_cli(train_argv(work, digits_data_dir, "--config.model=resnet20", "--config.seed=1"))
    assert rc == 2
    line = error_line(err)
    assert "model='resnet8' (now 'resnet20')" in line and "seed=0 (now 1)" in line and "fresh --workdir" in line
    assert snapshot(work) == before


def test_class_count_mismatch_and_new_head(straight, tmp_path):
    import dataclasses

    import ml_collections
    import optax

    from flax_resnet.data import get_dataset_info
    from flax_resnet.training import loop
    from flax_resnet.training.optimizer import create_optimizer
    from flax_resnet.training.state import create_train_state, transfer_weights

    saved = json.loads((straight / "checkpoints" / str(TOTAL) / "config" / "metadata").read_text())
    meta = json.loads((straight / "checkpoints" / str(TOTAL) / "meta" / "metadata").read_text())
    config = ml_collections.ConfigDict(saved)
    info = dataclasses.replace(get_dataset_info("digits", saved["data_dir"]), num_classes=5)
    with pytest.raises(UserError, match=r"num_classes=10 \(now 5\)"):
        loop._check_resumable(saved, meta, config, info, "W")

    # The fine-tuning hook: a fresh 5-class run takes everything but the head from the 10-class run.
    mesh = parallel.create_mesh()
    tx = create_optimizer(config, optax.constant_schedule(0.1))
    fresh, _ = create_train_state(config, 5, 1, tx, mesh)
    with pytest.raises(UserError, match=r"fc/kernel \(64, 10\) \(needs \(64, 5\)\).*new_head=True"):
        loop._init_weights_from(straight, fresh, mesh, new_head=False)
    state = loop._init_weights_from(straight, fresh, mesh, new_head=True)
    src = restore_state(straight, TOTAL, which="best")
    got = jax.device_get(state)
    chex.assert_trees_all_equal({k: v for k, v in got.params.items() if k != "fc"},
                                {k: v for k, v in src.params.items() if k != "fc"})
    chex.assert_trees_all_equal(got.params["fc"], jax.device_get(fresh.params["fc"]))
    chex.assert_trees_all_equal(got.batch_stats, src.batch_stats)
    with pytest.raises(UserError, match="layer1.*missing"):
        transfer_weights({"layer1": {"w": np.zeros(2)}}, {"conv1": {"w": np.zeros(2)}}, what="x")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--config", "no_such_recipe"], "unknown config 'no_such_recipe'.*use one of"),
    (["--config.model=resnet9000"], "unknown model 'resnet9000'.*flax-resnet models"),
    (["--config.dataset=no_such_dataset"], "unknown dataset 'no_such_dataset': use a TFDS name"),
    (["--config.batch_size=0"], r"--config.batch_size=0: must be a positive integer"),
    (["--config.batch_size=-64"], r"--config.batch_size=-64: must be a positive integer"),
    (["--config.batch_size=12"], "batch_size=12 does not split over 8 devices.*multiple of 8"),
])
def test_bad_train_input_is_one_line_exit_2_and_touches_nothing(extra, message, straight, digits_data_dir, tmp_path):
    work = copy_run(straight, tmp_path / "run")
    before = snapshot(work)
    rc, out, err = run_cli(train_argv(work, digits_data_dir) + extra)
    assert rc == 2, (out, err)
    assert re.search(message, error_line(err)), err
    assert snapshot(work) == before


def test_unwritable_workdir(digits_data_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    rc, _, err = run_cli(train_argv(tmp_path / "file" / "run", digits_data_dir))
    assert rc == 2
    assert re.search(r"cannot write to workdir \S+file/run \(.*\); pass a writable --workdir", error_line(err))


def test_predict_and_evaluate_bad_input(straight, tmp_path):
    work = copy_run(straight, tmp_path / "run")
    before = snapshot(work)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    rc, _, err = run_cli(["predict", "--workdir", str(work), str(tmp_path / "missing.png")])
    assert rc == 2 and re.search(r"image file\(s\) not found: \S+missing.png; check the paths", error_line(err))
    rc, _, err = run_cli(["predict", "--workdir", str(work), str(not_image)])
    assert rc == 2 and re.search(r"cannot read image \S+notes.png: .*; pass a PNG/JPEG", error_line(err))

    # A checkpoint whose weights do not fit the model it names (another model's checkpoint).
    cfg = work / "checkpoints_best" / str(TOTAL) / "config" / "metadata"
    cfg.write_text(cfg.read_text().replace('"resnet8"', '"resnet20"'))
    before = snapshot(work)
    rc, _, err = run_cli(["evaluate", "--workdir", str(work)])
    assert rc == 2
    assert re.search(r"cannot restore checkpoint \S+checkpoints_best/44: .*incompatible model .*retrain",
                     error_line(err)), err
    assert snapshot(work) == before
    rc, _, err = run_cli(["--debug", "evaluate", "--workdir", str(work)])
    assert rc == 2 and "Traceback" in err  # --debug shows it


def test_exit_status_and_no_traceback_in_a_real_process(tmp_path, digits_data_dir):
    p = CliProcess(train_argv(tmp_path / "run", digits_data_dir, "--config.batch_size=0"), tmp_path)
    assert p.wait() == 2
    assert "must be a positive integer" in error_line(p.err)
    assert not (tmp_path / "run").exists()  # failed before creating anything
