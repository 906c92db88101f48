"""Multi-process training on one machine: 2 processes x 2 simulated CPU devices over 127.0.0.1.

The processes talk through JAX's coordination service and gloo (TCP) collectives on the
loopback interface: the same code path as several hosts, minus the network. One set of
runs (module fixture ``runs``, about 2-3 minutes on 2 busy cores) serves every test:

* ``single``: 1 process x 4 devices, 6 steps, checkpoints at steps 3 and 6;
* ``killed``: 2 processes x 2 devices with the same recipe and global batch (started at the
  same time as ``single``); process 1 is SIGKILLed after step 4, after the synchronous
  checkpoint at step 3, and process 0 must exit on its own, with a clear error, within 60 s;
* ``resumed``: the same 2-process command again (6 steps): it resumes from step 3 and
  finishes, with asynchronous checkpoints.

The learning rate is constant, so the killed run (which would have trained 1000 steps)
takes exactly the same first steps as a 6-step run. The data pipeline's global batch does
not depend on the number of processes, so the 2-process checkpoints (step 3 uninterrupted,
step 6 after the resume) must equal the 1-process ones up to float rounding (the
all-reduce sums in another order): max |diff| below 1e-6 over params, BatchNorm statistics
and momentum (see RECIPE for why no later step is compared).

The unit tests at the end check flag/environment handling without starting anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from helpers import CliProcess, restore_state, saved_steps

from flax_resnet import parallel
from flax_resnet.errors import UserError

# cpu_fast_path=false: bit-identical per-example arithmetic however the batch is split (see
# tests/test_training.py::tiny_config). The all-reduce over 2 processes x 2 devices still adds in
# another order than over 1 x 4, and training from this ill-conditioned initialisation amplifies
# that rounding ~10x per step once it shows (at lr 0.05 on an AVX-512 host: 1.4e-5 by step 6 once
# batches were normalised in the step; 1e-3 by step 10). At lr 0.02 the same host stays at
# 1.9e-7 (step 3) and 3.6e-7 (step 6); the run stays within 6 steps: checkpoint at 3, killed after
# 4, resumed to 6.
CHECKPOINT_EVERY = 3
RECIPE = ("--config", "digits_resnet20", "--config.model=resnet8", "--config.cpu_fast_path=false", "--config.batch_size=32",
          "--config.schedule=constant", "--config.learning_rate=0.02", "--config.log_every_steps=1",
          f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}")
STEPS = 6
KILL_AFTER_STEP = 4
DEAD_PEER_LIMIT_S = 60  # the bound for the survivor to exit
RUN_TIMEOUT_S = 420  # any single run; generous for a loaded 2-core machine, but bounded
# Float rounding only (the all-reduce adds in another order).
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
CLEAR_ERRORS = ("lost contact with another process",  # ours: a collective or barrier failed
                "another task died")  # JAX's abort when the coordination service notices first


class _Process(CliProcess):
    """A CLI subprocess with its own environment (device count, no inherited distributed settings)."""

    def __init__(self, argv, logdir: Path, name: str, devices: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLAX_RESNET_")}
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env.update(XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
                   JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
        self.out_path, self.err_path = Path(logdir) / f"{name}.out", Path(logdir) / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "flax_resnet.cli", *map(str, argv)],
                                         stdout=out, stderr=err, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, data_dir, logdir, name, *, processes, devices, extra=()) -> list[_Process]:
    argv = ["train", "--workdir", str(workdir), *RECIPE, f"--config.data_dir={data_dir}", *extra]
    if processes == 1:
        return [_Process(argv, logdir, name, devices)]
    address = f"127.0.0.1:{_free_port()}"
    return [_Process([*argv, "--coordinator_address", address, "--num_processes", processes, "--process_id", i],
                     logdir, f"{name}.p{i}", devices) for i in range(processes)]


def _wait_all(procs, timeout=RUN_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.proc.wait(max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        for p in procs:
            p.kill()


def _describe(procs) -> str:
    return "\n".join(f"--- {p.out_path.stem}: exit {p.proc.poll()}\n{p.out[-1500:]}\n{p.err[-2500:]}" for p in procs)


def _train_records(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass
class Runs:
    single: list
    single_dir: Path
    killed: list
    killed_dir: Path
    survivor_rc: int | None
    survivor_exit_s: float
    resumed: list


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_data_dir):
    from flax_resnet import data

    data.get_dataset_info("digits", str(digits_data_dir))  # prepared once here, not raced by the processes
    root = tmp_path_factory.mktemp("multihost")
    single_dir, two_dir = root / "single", root / "two"
    single = _launch(single_dir, digits_data_dir, root, "single", processes=1, devices=4,
                     extra=[f"--config.num_train_steps={STEPS}"])
    # Synchronous saves: once step 4 is logged, the step-3 checkpoint is on disk.
    killed = _launch(two_dir, digits_data_dir, root, "killed", processes=2, devices=2,
                     extra=["--config.num_train_steps=1000", "--config.async_checkpointing=False"])
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not any(r.get("kind") == "train" and r["step"] >= KILL_AFTER_STEP for r in _train_records(two_dir)):
            if any(p.proc.poll() is not None for p in killed) or time.monotonic() > deadline:
                raise AssertionError(f"the 2-process run did not reach step {KILL_AFTER_STEP}:\n{_describe(killed)}")
            time.sleep(0.02)
        killed[1].proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        try:
            survivor_rc = killed[0].proc.wait(DEAD_PEER_LIMIT_S + 30)
        except Exception:  # still running: a hang, reported by the test
            survivor_rc = None
        survivor_exit_s = time.monotonic() - t0
    finally:
        for p in killed:
            p.kill()
    assert _wait_all(single) == [0], _describe(single)
    resumed = _launch(two_dir, digits_data_dir, root, "resumed", processes=2, devices=2,
                      extra=[f"--config.num_train_steps={STEPS}"])
    _wait_all(resumed)
    return Runs(single, single_dir, killed, two_dir, survivor_rc, survivor_exit_s, resumed)


def _assert_same_state(a, b):
    trees = [{"params": s.params, "batch_stats": s.batch_stats, "opt_state": s.opt_state} for s in (a, b)]
    diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])))
    print(f"max |2-process - 1-process| = {diff:.3g}")
    chex.assert_trees_all_close(trees[0], trees[1], **TOLERANCE)
    assert int(a.step) == int(b.step)


def test_killing_one_process_makes_the_other_exit_with_a_clear_error(runs):
    survivor, victim = runs.killed
    assert victim.proc.returncode == -signal.SIGKILL
    assert runs.survivor_rc is not None, f"process 0 still running {runs.survivor_exit_s:.0f} s after its peer died"
    assert runs.survivor_rc != 0, survivor.err[-3000:]
    assert runs.survivor_exit_s < DEAD_PEER_LIMIT_S, runs.survivor_exit_s
    assert any(e in survivor.err for e in CLEAR_ERRORS), survivor.err[-3000:]
    print(f"survivor exited {runs.survivor_rc} after {runs.survivor_exit_s:.1f} s")


def test_two_processes_train_like_one_process_with_the_same_global_batch(runs):
    out = runs.single[0].out
    assert "devices: 4 x CPU" in out and "over 1 process(es)" in out
    first = runs.killed[0].out
    assert "devices: 4 x CPU" in first and "over 2 process(es)" in first, _describe(runs.killed)
    assert CHECKPOINT_EVERY in saved_steps(runs.single_dir) and STEPS in saved_steps(runs.single_dir)
    # both uninterrupted
    _assert_same_state(restore_state(runs.killed_dir, CHECKPOINT_EVERY), restore_state(runs.single_dir, CHECKPOINT_EVERY))
    # the 2-process run after its crash and resume
    assert [p.proc.returncode for p in runs.resumed] == [0, 0], _describe(runs.resumed)
    _assert_same_state(restore_state(runs.killed_dir, STEPS), restore_state(runs.single_dir, STEPS))


def test_the_two_process_run_resumes_from_its_checkpoint(runs):
    main, other = runs.resumed
    assert [p.proc.returncode for p in runs.resumed] == [0, 0], _describe(runs.resumed)
    assert f"checkpoints/{CHECKPOINT_EVERY} at step {CHECKPOINT_EVERY}" in main.out and "final test top-1" in main.out
    assert saved_steps(runs.killed_dir) == [CHECKPOINT_EVERY, STEPS]
    assert saved_steps(runs.killed_dir, "checkpoints_best") == [STEPS]  # both managers saved the last step together
    rows = _train_records(runs.killed_dir)
    resume = next(i for i, r in enumerate(rows) if r["kind"] == "resume")
    assert rows[resume]["step"] == CHECKPOINT_EVERY
    after = [r["step"] for r in rows[resume:] if r["kind"] == "train"]
    assert after == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))  # one record per step: process 1 writes none


def test_only_process_0_prints(runs):
    main, other = runs.resumed
    assert "config:" in main.out and "epoch 1/1" in main.out and "outputs in" in main.out
    for text in (other.out, other.err):
        for marker in ("config:", "epoch", "final test", "outputs in", "step/s", "resumed from"):
            assert marker not in text, (marker, text[-2000:])


# --------------------------------------------------------------------------- settings (nothing started)
@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("FLAX_RESNET_", "SLURM_", "OMPI_", "TPU_")) or key == "JAX_COORDINATOR_ADDRESS":
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2), "missing --coordinator_address, --process_id"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), "must be in [0, 2)"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "is not HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "at least 1"),
])
def test_bad_distributed_settings_are_user_errors(clean_env, kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parallel.initialize_distributed(**kwargs)
    assert not jax.distributed.is_initialized()


def test_single_process_settings_start_nothing(clean_env):
    assert parallel.initialize_distributed() is False  # nothing in the environment
    assert parallel.initialize_distributed("127.0.0.1:1234", 1, 0) is False  # explicitly one process
    clean_env.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_STEP_NODELIST", "node1")
    assert parallel.initialize_distributed() is False
    clean_env.setenv("FLAX_RESNET_NUM_PROCESSES", "4")
    clean_env.setenv("FLAX_RESNET_DISTRIBUTED", "off")
    assert parallel.initialize_distributed() is False
    assert not jax.distributed.is_initialized()


def test_environment_variables_and_cluster_detection(clean_env):
    clean_env.setenv("FLAX_RESNET_NUM_PROCESSES", "2")
    with pytest.raises(UserError, match="missing --coordinator_address, --process_id"):
        parallel.initialize_distributed()
    clean_env.setenv("FLAX_RESNET_PROCESS_ID", "x")
    with pytest.raises(UserError, match="FLAX_RESNET_PROCESS_ID='x' is not an integer"):
        parallel.initialize_distributed()
    assert parallel._detected_cluster() is None
    for key, value in {"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[01-02]"}.items():
        clean_env.setenv(key, value)
    assert parallel._detected_cluster() == "SLURM"


def test_cli_train_flags_reach_the_initialisation(clean_env, capsys):
    from flax_resnet.cli import main

    assert main(["train", "--num_processes", "2", "--process_id", "0", "--config.num_train_steps=1"]) == 2
    assert "missing --coordinator_address" in capsys.readouterr().err
    assert not jax.distributed.is_initialized()


def test_auto_detection_failure_is_a_user_error(clean_env):
    # JAX_COORDINATOR_ADDRESS alone: JAX is asked to detect the rest, finds no cluster (or this
    # test process already used JAX): either way one clear line, nothing started.
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    with pytest.raises(UserError, match="cannot start multi-process training|JAX was used before"):
        parallel.initialize_distributed()
    assert not jax.distributed.is_initialized()
