"""Host allocator tuning for XLA:CPU: keep freed memory in the process (glibc ``mallopt``)."""

from __future__ import annotations

import ctypes
import os
import platform

ENV_NO_MALLOC_TUNING = "FLAX_RESNET_NO_MALLOC_TUNING"
# glibc's mallopt() parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_host_allocator_tuned = False


def tune_host_allocator() -> bool:
    """Keeps freed host memory in the process, so a CPU train step stops page-faulting its buffers in.

    XLA:CPU allocates each step's temporaries, and Eigen's convolutions their packing buffers,
    anew with ``malloc``. With glibc's defaults, blocks over 32 MB (over 64 MB on a worker
    thread's arena) are fresh ``mmap``s unmapped on free, and a freed heap top is trimmed, so
    the kernel faults and zeroes those pages again on every step (``experiments/cpu_probes.py
    faults`` counts them; docs/performance.md). Here, through ``mallopt``: one arena for every
    thread, no ``mmap``, no trimming. The price: the process keeps its peak host memory until
    it exits.

    Call it before JAX starts its CPU threads (before the first device use): a thread that
    already has its own arena keeps it. The ``flax-resnet`` command calls it first; from
    Python it is opt-in. Returns whether it applied: glibc only, and
    ``FLAX_RESNET_NO_MALLOC_TUNING=1`` leaves the allocator alone. Idempotent.
    """
    global _host_allocator_tuned
    if _host_allocator_tuned:
        return True
    # parallel.env_flag's rule, spelled out: this module imports nothing of flax_resnet (keep_freed_memory)
    if os.environ.get(ENV_NO_MALLOC_TUNING, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    _host_allocator_tuned = keep_freed_memory()
    return _host_allocator_tuned


def keep_freed_memory() -> bool:
    """The ``mallopt`` calls of :func:`tune_host_allocator`, unconditionally (glibc on Linux only).

    This module imports nothing of ``flax_resnet`` (nor JAX): the benchmark's PyTorch worker loads
    it by path and runs PyTorch under the same setting as our step
    (:mod:`flax_resnet.benchmark.torch_worker`)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # M_TRIM_THRESHOLD takes a size_t inside an int: -1 is SIZE_MAX, never trim.
    applied = [mallopt(param, value) == 1 for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                                               (_M_TRIM_THRESHOLD, -1))]
    return all(applied)


def host_allocator_tuned() -> bool:
    """Whether :func:`tune_host_allocator` has applied in this process."""
    return _host_allocator_tuned
