"""Test-wide set-up: 8 simulated CPU devices, set before JAX is imported anywhere; shared runs.

A persistent JAX compilation cache, fresh for each session (unless JAX_COMPILATION_CACHE_DIR
is already set), is shared by this process and the CLI subprocesses the tests start (they
inherit the environment): every training run in the suite compiles the same few programs,
and a cache hit turns a 5-10 s compile into a fraction of a second. Cached executables are
the same binaries, so results are unchanged (the resume tests compare bit for bit).
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# On an accelerator (JAX_PLATFORMS=cuda,... as experiments/gpu_check.py runs us): no pre-grabbing
# of device memory (PyTorch's parity references share the card), float32 matmuls and
# convolutions at full precision (GPUs default to TF32, 1e-3 off the references), and
# deterministic reductions so the resume tests can compare bit for bit. All no-ops on CPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
if "cpu" not in os.environ["JAX_PLATFORMS"].split(",")[0]:
    os.environ["XLA_FLAGS"] += " --xla_gpu_deterministic_ops=true"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="flax_resnet_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A TFDS data directory for the tests (digits prepares itself there offline in ~1 s)."""
    return tmp_path_factory.mktemp("tensorflow_datasets")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, digits_data_dir):
    """One short CLI training run (resnet8, digits, 2 epochs, 8 devices) shared by the end-to-end tests.

    Returns ``(workdir, exit status, stdout)``. Tests must not modify ``workdir``: copy it first.
    """
    from helpers import run_cli, train_argv

    workdir = tmp_path_factory.mktemp("digits_run")
    rc, out, _ = run_cli(train_argv(workdir, digits_data_dir))
    return workdir, rc, out
