"""Native CPU convolutions: direct float32 kernels behind XLA's FFI, built on first use.

XLA:CPU's convolutions (Eigen's, or YNNPACK's) run the narrow 3x3 convolutions of residual
networks at well under half of the CPU's FMA peak (docs/performance.md). The
kernels in ``conv_kernels.h`` are register-blocked direct convolutions for NHWC/HWIO float32
(forward and kernel gradient; the input gradient is a forward convolution of the output
gradient), vectorised with GCC vector extensions for whatever the host has (AVX2, AVX-512) and
threaded on XLA's own intra-op pool. :mod:`flax_resnet.cpu.convs` calls them through
:func:`conv_forward` and :func:`conv_wgrad` where :func:`supports` says so, and XLA's
convolutions everywhere else.

The shared library is compiled once per source, compiler flags and CPU (``-march=native``)
with the host's C++ compiler and cached (:mod:`flax_resnet.cpu.library`: where, and the safety
checks before loading). Without a compiler, when the build fails, or when the cache
is not private (one ``RuntimeWarning`` says why), or with ``FLAX_RESNET_NO_NATIVE_CONV=1``,
:func:`available` is False and every convolution is XLA's. The kernels have no JAX differentiation rules of
their own: they sit inside ``custom_vjp`` rules (``cpu.convs.conv_kxk``), so first derivatives
work and higher ones (a gradient of a gradient, ``jax.jvp``) need the plain layers.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from flax_resnet import parallel
from flax_resnet.cpu import library, onednn
from flax_resnet.cpu.library import ENV_DIR, enabled

ENV_DISABLE = "FLAX_RESNET_NO_NATIVE_CONV"
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
_TARGETS = {"forward": "flax_resnet_conv_forward", "wgrad": "flax_resnet_conv_wgrad"}
RECIPE = library.Recipe("conv_cpu", Path(__file__).parent, "conv_cpu.cc", ("conv_cpu.cc", "conv_kernels.h", "pool.h"),
                        _FLAGS)

_lock = threading.Lock()
_state: dict = {}  # "lanes": int once loaded; "error": str once it failed


def library_path(compiler: str) -> Path:
    """Where the library for this source, compiler (its ``--version``), flags, CPU and jaxlib lives."""
    return RECIPE.path(compiler)


def build(compiler: str, out: Path) -> None:
    """Compiles the kernels into ``out`` (atomically: concurrent builders each write a temp file)."""
    RECIPE.build(compiler, out)


def _load() -> None:
    if parallel.env_flag(ENV_DISABLE):
        _state["error"] = f"{ENV_DISABLE} is set"
        return
    lib, path = RECIPE.load(_TARGETS)
    lib.flax_resnet_conv_lanes.restype = ctypes.c_int
    _state["lanes"] = int(lib.flax_resnet_conv_lanes())
    _state["path"] = str(path)


def available() -> bool:
    """True once the kernels are built, loaded and registered with XLA (built on the first call)."""
    with _lock:
        if "lanes" not in _state and "error" not in _state:
            try:
                _load()
            except Exception as e:  # no compiler, a failed build, an unloadable library
                _state["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(f"flax_resnet: native CPU convolutions unavailable, using XLA's ({_state['error']})",
                              RuntimeWarning, stacklevel=3)
        return "lanes" in _state


def lanes() -> int:
    """The vector width the kernels were compiled for (8: AVX2, 16: AVX-512); 0 if unavailable."""
    return _state.get("lanes", 0) if available() else 0


def status() -> dict:
    """For benchmarks and logs: whether the kernels are in use, their library, or why not; and
    oneDNN's (:func:`flax_resnet.cpu.onednn.status`), the other custom-call library."""
    ok = available()
    return {"available": ok, "lanes": _state.get("lanes", 0), "library": _state.get("path"),
            "error": _state.get("error"), "onednn": onednn.status()}


# Shapes the kernels serve: at most this many channels (in or out) per operation, at least 8 in.
# The crossovers against XLA:CPU's own convolutions come from `cpu_probes.py native`
# (docs/performance.md); with fewer than 8 input channels (an RGB stem) the inner loop is too short.
MAX_CHANNELS = {"forward": 256, "wgrad": 64}
MIN_IN_CHANNELS = 8

def supports(x_shape, kernel_shape, *dtypes, op: str = "forward") -> bool:
    """Whether ``op`` ("forward" or "wgrad") of a convolution of NHWC ``x_shape`` with HWIO
    ``kernel_shape`` and operands of ``dtypes`` runs natively (CPU backend, every operand
    float32, channel counts the kernels serve)."""
    if not library.custom_calls_on() or any(jnp.dtype(d) != jnp.float32 for d in dtypes):
        return False
    if jax.default_backend() != "cpu" or len(x_shape) != 4 or len(kernel_shape) != 4:
        return False
    cin, cout = kernel_shape[2], kernel_shape[3]
    if cin < MIN_IN_CHANNELS or max(cin, cout) > MAX_CHANNELS[op]:
        return False
    return available() and cout % _state["lanes"] == 0


def _require() -> None:
    if not available():
        raise RuntimeError(f"flax_resnet native convolutions unavailable: {_state['error']}")


def conv_forward(x: jax.Array, kernel: jax.Array, stride: int, pads) -> jax.Array:
    """``y = conv(x, kernel)``: NHWC x HWIO, ``pads = ((top, bottom), (left, right))`` of zeros."""
    _require()
    (pt, pb), (pl, pr) = pads
    n, h, w, _ = x.shape
    kh, kw, _, co = kernel.shape
    if h + pt + pb < kh or w + pl + pr < kw:
        raise ValueError(f"conv_forward: a {kh}x{kw} window does not fit the padded {h}x{w} input (pads {pads})")
    oh, ow = (h + pt + pb - kh) // stride + 1, (w + pl + pr - kw) // stride + 1
    out = jax.ShapeDtypeStruct((n, oh, ow, co), jnp.float32)
    return jax.ffi.ffi_call(_TARGETS["forward"], out, vmap_method="sequential")(
        x, kernel, stride=stride, pt=pt, pb=pb, pl=pl, pr=pr)


def conv_wgrad(x: jax.Array, g: jax.Array, kernel_hw, stride: int, pads) -> jax.Array:
    """The kernel gradient of :func:`conv_forward` for the output cotangent ``g``: HWIO."""
    _require()
    (pt, pb), (pl, pr) = pads
    kh, kw = kernel_hw
    out = jax.ShapeDtypeStruct((kh, kw, x.shape[3], g.shape[3]), jnp.float32)
    return jax.ffi.ffi_call(_TARGETS["wgrad"], out, vmap_method="sequential")(
        x, g, kh=kh, kw=kw, stride=stride, pt=pt, pb=pb, pl=pl, pr=pr)


__all__ = ["available", "build", "conv_forward", "conv_wgrad", "enabled", "lanes", "library_path", "status",
           "supports", "MAX_CHANNELS", "MIN_IN_CHANNELS"]
