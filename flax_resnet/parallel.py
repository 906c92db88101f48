"""Device mesh, shardings and host-to-global batch assembly.

One :class:`jax.sharding.Mesh` with a single ``'data'`` axis spans every device of
every process. Parameters and optimiser state are replicated over it, batches are
sharded along their leading dimension, and XLA's GSPMD partitioner inserts the
collectives (gradient all-reduce, BatchNorm statistics over the *global* batch), so
no ``pmean`` is written by hand.

Multi-process runs (several hosts, or several processes on one host) start with
:func:`initialize_distributed`, before any other JAX call; each process then feeds only its
rows of every global batch (:func:`shard_batch`), and :func:`any_process` lets them agree
on decisions one of them may see first.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_resnet.errors import UserError

DATA_AXIS = "data"


# Multi-process settings: explicit values (CLI flags) win over these environment variables.
ENV_COORDINATOR_ADDRESS = "FLAX_RESNET_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FLAX_RESNET_NUM_PROCESSES"
ENV_PROCESS_ID = "FLAX_RESNET_PROCESS_ID"
ENV_DISTRIBUTED = "FLAX_RESNET_DISTRIBUTED"  # auto (default) | on | off
ENV_HEARTBEAT_TIMEOUT = "FLAX_RESNET_HEARTBEAT_TIMEOUT_S"
ENV_INIT_TIMEOUT = "FLAX_RESNET_INIT_TIMEOUT_S"
# A process that stops sending heartbeats for this long is declared dead and every other
# process aborts (JAX's coordination service); JAX's own default is 100 s.
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_INIT_TIMEOUT_S = 300  # how long processes wait for each other at start-up
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer; set it to a whole number or unset it") from None


def _detected_cluster() -> str | None:
    """The launcher that started several processes, as JAX can auto-detect it, or ``None``.

    Only cheap environment checks (no network): SLURM (``srun`` with more than one task),
    Open MPI (``mpirun -n N``, N > 1), ``JAX_COORDINATOR_ADDRESS``, GKE TPU slices. A
    Cloud TPU VM pod slice is detected by JAX through its metadata server: opt in with
    ``FLAX_RESNET_DISTRIBUTED=on`` (experiments/launch/tpu_pod.sh does).
    """
    env = os.environ
    if "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU (GKE)"
    return None


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"coordinator address {address!r} is not HOST:PORT; pass e.g. "
                        f"--coordinator_address 10.0.0.1:12355 (process 0's host, a free port)")
    return host


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Joins this process to a multi-process run (``jax.distributed.initialize``), if it is one.

    Must run before any other JAX operation (it raises a :class:`UserError` otherwise);
    calling it again is a no-op. Where the settings come from, first match wins:

    1. the arguments (``flax-resnet train --coordinator_address HOST:PORT --num_processes N
       --process_id I``), then ``FLAX_RESNET_COORDINATOR_ADDRESS`` / ``FLAX_RESNET_NUM_PROCESSES``
       / ``FLAX_RESNET_PROCESS_ID`` (the address may also come from ``JAX_COORDINATOR_ADDRESS``):
       all three are needed, JAX's cluster detection is switched off and every local device
       is used. ``num_processes=1`` means a plain single-process run.
    2. ``FLAX_RESNET_DISTRIBUTED=on``, or a launcher JAX can read (SLURM ``srun`` with
       several tasks, Open MPI, ``JAX_COORDINATOR_ADDRESS``, GKE TPU slices): then
       ``jax.distributed.initialize()`` is called without addresses and JAX auto-detects
       them (on SLURM/Open MPI each process then gets one local GPU: one task per GPU).
    3. otherwise (or ``FLAX_RESNET_DISTRIBUTED=off``): a single process, nothing is done.

    Failure handling is bounded: a process that stops sending heartbeats for
    ``FLAX_RESNET_HEARTBEAT_TIMEOUT_S`` seconds (default 30) makes every other process abort
    with JAX's "Terminating process because the JAX distributed service detected fatal
    errors ... another task died"; processes wait ``FLAX_RESNET_INIT_TIMEOUT_S`` (default
    300) for each other at start-up. CPU collectives across processes use gloo (TCP).

    Returns:
      Whether this process is part of a multi-process run.
    """
    if jax.distributed.is_initialized():
        return True
    mode = os.environ.get(ENV_DISTRIBUTED, "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off", "1", "0", "true", "false"):
        raise UserError(f"{ENV_DISTRIBUTED}={mode!r}: use auto, on or off")
    if mode in ("off", "0", "false"):
        return False
    coordinator_address = (coordinator_address or os.environ.get(ENV_COORDINATOR_ADDRESS)
                           or os.environ.get("JAX_COORDINATOR_ADDRESS") or None)
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    kwargs: dict[str, Any] = {}
    if num_processes is not None or process_id is not None:
        if num_processes is not None and num_processes < 1:
            raise UserError(f"--num_processes {num_processes} must be at least 1")
        if num_processes == 1 and process_id in (None, 0):
            return False  # explicitly a single process
        given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                 "--process_id": process_id}
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError(f"multi-process training needs --coordinator_address, --num_processes and --process_id "
                            f"together (or {ENV_COORDINATOR_ADDRESS}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); "
                            f"missing {', '.join(missing)}")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id {process_id} must be in [0, {num_processes}): number the processes "
                            f"0..{num_processes - 1}, 0 on the coordinator's host")
        host = _check_address(coordinator_address)
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                      cluster_detection_method="deactivate")
        if host in _LOOPBACK_HOSTS:  # a one-machine run: listen on loopback only, not on every interface
            kwargs["coordinator_bind_address"] = coordinator_address
    elif mode in ("on", "1", "true") or _detected_cluster():
        if coordinator_address:
            _check_address(coordinator_address)
    else:
        return False
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    hb = _env_int(ENV_HEARTBEAT_TIMEOUT) or DEFAULT_HEARTBEAT_TIMEOUT_S
    init = _env_int(ENV_INIT_TIMEOUT) or DEFAULT_INIT_TIMEOUT_S
    try:
        jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=hb, initialization_timeout=init)
    except RuntimeError as e:
        if "before any JAX" not in str(e):
            raise
        raise UserError("JAX was used before flax_resnet.parallel.initialize_distributed(): call it first thing, "
                        "before any JAX computation, jax.devices() or array creation") from None
    except ValueError as e:  # auto-detection found no coordinator / process count
        raise UserError(f"cannot start multi-process training: {e}; pass --coordinator_address, --num_processes "
                        f"and --process_id (or set {ENV_DISTRIBUTED}=off for a single process)") from None
    return True


ENV_NO_COMPILATION_CACHE = "FLAX_RESNET_NO_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 2 * 1024**3  # a ResNet-50 train step is tens of MB


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def user_cache_dir(*parts: str) -> str:
    """``$XDG_CACHE_HOME/flax_resnet/<parts>`` (``~/.cache/flax_resnet/...``): where our caches live."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_resnet", *parts)


def unsafe_cache(path: str | os.PathLike) -> str | None:
    """Why a cache directory or file must not be trusted, or None when it may be.

    Our caches hold code this process runs (a compiled shared library, compiled XLA
    programs), so, as ssh treats its keys, they count only when they belong to this user and
    nobody else can write them: a cache that another user owns, or that group or others may
    write, could carry someone else's code into every process that reads it. A path that
    does not exist yet is fine (it will be created private).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} belongs to user id {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {oct(st.st_mode & 0o777)}; chmod go-w it)"
    return None


def private_cache_dir(path: str | os.PathLike) -> str | None:
    """Creates ``path`` (mode 700) if missing; returns why it cannot be used, or None."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        return f"cannot create {path}: {e.strerror or e}"
    return unsafe_cache(path)


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None, *,
                             max_size_bytes: int = COMPILATION_CACHE_MAX_BYTES) -> str | None:
    """Turns on JAX's persistent compilation cache, unless it is already configured or disabled.

    A compiled train step is written to disk and reused by the next process with the same
    program, JAX/XLA version and devices (a resumed run, the evaluation after training, a
    rerun): on a GPU or TPU that saves the tens of seconds to minutes a ResNet-50 step takes
    to compile. Where it goes, in order: ``JAX_COMPILATION_CACHE_DIR`` (JAX's own variable,
    or anything already set through ``jax.config``) wins; else ``cache_dir``; else
    ``$XDG_CACHE_HOME/flax_resnet/jax`` (``~/.cache/flax_resnet/jax``). Setting
    ``FLAX_RESNET_NO_COMPILATION_CACHE=1`` leaves it off. Only programs that took at least
    JAX's ``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile are stored.
    The directory must be this user's and not writable by group or others (see
    :func:`unsafe_cache`); otherwise one warning says why and the cache stays off. The cache
    is capped at ``max_size_bytes`` (JAX evicts the least recently used programs beyond it).
    Returns the directory in use, or None.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if env_flag(ENV_NO_COMPILATION_CACHE):
        return None
    if cache_dir is None:
        cache_dir = user_cache_dir("jax")
    cache_dir = os.fspath(cache_dir)
    problem = private_cache_dir(cache_dir)
    if problem:  # an unusable cache never stops training; it only costs compile time
        warnings.warn(f"flax_resnet: compilation cache off: {problem}", RuntimeWarning, stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    if jax.config.jax_compilation_cache_max_size < 0:
        jax.config.update("jax_compilation_cache_max_size", int(max_size_bytes))
    # JAX decides once, at the first compile, whether a cache is in use: if something was
    # compiled before this call (the Python API), make it look again.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    return cache_dir


def any_process(flag: bool) -> bool:
    """``flag`` OR-ed over all processes, so every process takes the same decision.

    The hook for decisions one process may see first (a preemption signal): a no-op on a
    single process; with several it is a small all-gather (a host sync), so callers make it
    at agreed steps only, and every process must call it at the same steps.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with a ``'data'`` axis over ``devices`` (default: all devices of all processes).

    Axis type is ``Auto`` (GSPMD propagation): ``jax.make_mesh`` defaults to ``Explicit``
    axes, which reject some convolution shardings.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (params, optimiser state, scalars)."""
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) dimension over the ``'data'`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def num_data_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises a :class:`UserError` unless ``global_batch`` is positive and splits evenly over the mesh and processes."""
    n = num_data_shards(mesh)
    if not isinstance(global_batch, int) or global_batch < 1:
        raise UserError(f"{what}={global_batch} must be a positive integer; set --config.{what} to a multiple of {n}")
    if global_batch % n or global_batch % jax.process_count():
        raise UserError(
            f"{what}={global_batch} does not split over {n} devices / {jax.process_count()} "
            f"processes; set --config.{what} to a multiple of {n}"
        )


def per_process_batch_size(global_batch: int) -> int:
    return global_batch // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` replicated on the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's slice of a batch into global arrays sharded on ``'data'``.

    Each process passes only its own rows (``global_batch / process_count``); the global
    shape is inferred. On one process this is a sharded ``device_put``.
    """
    sharding = data_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def describe(mesh: Mesh) -> str:
    """One line naming devices, processes and the mesh, for the start of a run."""
    d = mesh.devices.flat[0]
    return (
        f"devices: {mesh.devices.size} x {d.platform.upper()} ({getattr(d, 'device_kind', '?')}) "
        f"over {jax.process_count()} process(es); mesh {dict(mesh.shape)} "
        f"(params replicated, batch sharded on '{DATA_AXIS}')"
    )
