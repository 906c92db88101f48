"""Helpers shared by the end-to-end tests: the digits CLI run's arguments, subprocess runs, checkpoint reads."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

# The shared short run: resnet8 on digits, 2 epochs of 22 steps (44), periodic saves every 8 steps.
DIGITS_TRAIN_ARGS = ("--config", "digits_resnet20", "--config.model=resnet8", "--config.num_epochs=2",
                     "--config.batch_size=64", "--config.log_every_steps=4", "--config.checkpoint_every_steps=8")
DIGITS_TOTAL_STEPS = 44


def train_argv(workdir, data_dir, *extra: str) -> list[str]:
    """``flax-resnet train`` arguments for the shared digits run in ``workdir``, plus ``extra`` overrides."""
    return ["train", "--workdir", str(workdir), *DIGITS_TRAIN_ARGS, f"--config.data_dir={data_dir}", *extra]


def run_cli(argv) -> tuple[int, str, str]:
    """``flax_resnet.cli.main(argv)`` in this process: ``(exit status, stdout, stderr)``."""
    from flax_resnet.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


class CliProcess:
    """``python -m flax_resnet.cli ARGV`` in a subprocess (inheriting the 8-device XLA_FLAGS), output in files."""

    def __init__(self, argv, logdir: Path, name: str = "cli"):
        self.out_path, self.err_path = Path(logdir) / f"{name}.out", Path(logdir) / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "flax_resnet.cli", *map(str, argv)],
                                         stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def wait_until(self, predicate, timeout: float = 180, poll: float = 0.05) -> None:
        """Polls ``predicate()`` until true; fails with the process's output if it exits or times out first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"condition not reached (exit {self.proc.poll()}):\n{self.out}\n{self.err[-3000:]}")
            time.sleep(poll)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def saved_steps(workdir, kind: str = "checkpoints") -> list[int]:
    """Finalised checkpoint steps in ``workdir/kind`` (what Orbax would list)."""
    d = Path(workdir) / kind
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def snapshot(root) -> dict[str, str]:
    """``relative path -> sha1`` of every file under ``root``: to prove nothing was touched."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def restore_state(workdir, step: int, which: str = "latest", mesh=None):
    """The full TrainState saved at ``step`` (host numpy arrays), rebuilt from the checkpoint's own config."""
    import jax
    import ml_collections
    import optax

    from flax_resnet import parallel
    from flax_resnet.checkpoint import Checkpointer
    from flax_resnet.training import abstract_train_state, create_optimizer

    with Checkpointer(workdir, read_only=True) as ck:
        _, cfg, meta = ck.restore_config(which, step)
        config = ml_collections.ConfigDict(cfg)
        info = meta["dataset_info"]
        tx = create_optimizer(config, optax.constant_schedule(0.0))
        abstract, _ = abstract_train_state(config, info["num_classes"], info["image_shape"][-1], tx,
                                           mesh or parallel.create_mesh())
        state, _, _, _ = ck.restore(abstract, which, step)
    return jax.device_get(state)


def random_weights(params, stats, *, seed: int = 0, bias_std: float = 0.1):
    """``(params, stats)`` (pure dicts of arrays or shape structs) filled with seeded random values:
    He-normal kernels over the fan-in (activations stay O(1) through depth), BatchNorm scales and
    running variances in [0.5, 1.5], biases and running means N(0, ``bias_std``): far from a fresh
    model's identity BatchNorms, without running its eager initialisers."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, s):
        leaf = path[-1].key
        if leaf == "kernel":
            value = rng.normal(0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, s.shape)
        else:
            value = rng.normal(0, bias_std, s.shape)
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, (params, stats))
