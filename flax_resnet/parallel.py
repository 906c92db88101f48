"""Device mesh, shardings and host-to-global batch assembly.

One :class:`jax.sharding.Mesh` with a single ``'data'`` axis spans every device of
every process. Parameters and optimiser state are replicated over it, batches are
sharded along their leading dimension, and XLA's GSPMD partitioner inserts the
collectives (gradient all-reduce, BatchNorm statistics over the *global* batch), so
no ``pmean`` is written by hand.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_resnet.errors import UserError

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one of several processes.

    Must run before any other JAX operation. A single-process run (no coordinator in the
    environment) is left untouched.
    """
    multi = any(
        os.environ.get(k)
        for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")
    )
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


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
    """Raises a :class:`UserError` unless ``global_batch`` splits evenly over the mesh and processes."""
    n = num_data_shards(mesh)
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
