"""The CPU backend: everything that makes ResNets fast on XLA:CPU, in one place.

* :class:`FastConv`, :class:`FastBatchNorm` (:mod:`~flax_resnet.cpu.fast_layers`): drop-in
  substitutes for the model's layer classes, passed through the layer factory
  (:func:`layers`); the same parameters, computed with custom-VJP formulations
  (:mod:`~flax_resnet.cpu.convs`, :mod:`~flax_resnet.cpu.batchnorm`) and native direct
  convolution kernels behind XLA's FFI (:mod:`~flax_resnet.cpu.native`, built on first use).
* :func:`max_pool` (:mod:`~flax_resnet.cpu.pooling`): the model's max-pool with its backward
  pass written out (no index arrays, no scatter), passed through the same factory.
* :func:`jit`: ``jax.jit`` with the XLA:CPU compiler options (:mod:`~flax_resnet.cpu.xla`) and
  the native kernels traced in on one-device meshes only.
* :func:`tune_host_allocator` (:mod:`~flax_resnet.cpu.allocator`): a process-wide setting the
  ``flax-resnet`` command turns on; opt-in from Python.
* :func:`steps_in_flight`, :class:`StepWindow` (:mod:`~flax_resnet.cpu.dispatch`): how many
  steps the train loop, the evaluation loop and the benchmark keep dispatched but unfinished
  on XLA:CPU (one, or two for a step with small temporaries), and the window that keeps to it.
* :func:`bfloat16_warning`: the one line ``train`` prints where bfloat16 would run slower than
  float32 (no oneDNN bfloat16 code for this CPU).

Training on CPU uses the fast layers unless ``config.cpu_fast_path`` is False. From Python::

    model = flax_resnet.cpu.create_model("resnet20")   # == create_model(..., **cpu.layers())
    step = flax_resnet.cpu.jit(train_step)

The fast layers are differentiable once (``jax.grad``); ``jax.jvp``, Hessians, gradients of
gradients and ``jax.export`` need the plain model that :func:`flax_resnet.models.create_model`
returns.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.cpu import native, onednn, pooling, xla
from flax_resnet.cpu import inference  # noqa: F401  (cpu.inference: the fused eval forward)
from flax_resnet.cpu.allocator import ENV_NO_MALLOC_TUNING, host_allocator_tuned, tune_host_allocator
from flax_resnet.cpu.dispatch import QUEUE_TEMP_BYTES, StepWindow, steps_in_flight
from flax_resnet.cpu.fast_layers import FastBatchNorm, FastConv
from flax_resnet.cpu.pooling import max_pool
from flax_resnet.cpu.xla import COMPILER_OPTIONS, compiler_options
from flax_resnet.models import registry


def layers() -> dict[str, Any]:
    """The layer classes and max-pool function of the CPU backend, as keyword arguments of
    ``create_model`` / ``ResNet`` / :class:`~flax_resnet.models.layers.Layers`."""
    return {"conv": FastConv, "norm": FastBatchNorm, "pool": max_pool}


def create_model(name: str, num_classes: int | None = None, **kwargs: Any):
    """:func:`flax_resnet.models.create_model` with the CPU backend's layers."""
    return registry.create_model(name, num_classes, **layers(), **kwargs)


def uses_fast_layers(model: nnx.Module) -> bool:
    """Whether any layer of ``model`` is one of the CPU backend's."""
    return any(isinstance(m, (FastConv, FastBatchNorm)) for _, m in nnx.iter_modules(model))


def with_native_convs(fn: Callable, on: bool) -> Callable:
    """``fn`` traced with the native kernels (``on``) or with XLA's convolutions everywhere.

    The kernels are custom calls that XLA's SPMD partitioner does not split: on a mesh of
    several devices it would gather the whole batch onto each. There the fast layers use
    XLA's convolutions inside the same custom-VJP formulations.
    """

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with native.enabled(on):
            return fn(*args, **kwargs)

    return traced


def bfloat16_warning(dtype) -> str | None:
    """The one line to tell a user computing in ``dtype`` on this machine, or None: without oneDNN's
    bfloat16 code (oneDNN missing, or 2.x on a CPU below AVX-512) bfloat16 convolutions run through
    XLA:CPU, slower than float32 (the native kernels are float32 only)."""
    status = onednn.status() if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu" else None
    if status is None or status["bfloat16"]:
        return None
    why = ("this CPU's oneDNN has no bfloat16 code (it needs AVX-512)" if status["available"]
           else f"oneDNN is off ({status['error']})")
    return (f"half_precision on this CPU: {why}, so bfloat16 convolutions run through XLA, slower than float32; "
            "--config.half_precision=false trains faster here")


def jit(fn: Callable, *, mesh: jax.sharding.Mesh | None = None, compiler_options: dict | None = None,
        **jit_kwargs: Any):
    """``jax.jit(fn)`` for a function of a model with the fast layers: the XLA:CPU compiler options,
    and the native kernels where the computation runs on one device (``mesh``'s, else all devices)."""
    devices = mesh.devices.size if mesh is not None else jax.device_count()
    options = {**xla.compiler_options(), **(compiler_options or {})}
    return jax.jit(with_native_convs(fn, devices == 1), compiler_options=options or None, **jit_kwargs)


__all__ = ["COMPILER_OPTIONS", "ENV_NO_MALLOC_TUNING", "FastBatchNorm", "FastConv", "QUEUE_TEMP_BYTES", "StepWindow",
           "bfloat16_warning", "compiler_options", "create_model", "host_allocator_tuned", "jit", "layers", "max_pool", "native", "onednn",
           "pooling", "steps_in_flight", "tune_host_allocator", "uses_fast_layers", "with_native_convs"]
