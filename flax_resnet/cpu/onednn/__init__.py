"""oneDNN's convolutions behind XLA's FFI: an optional CPU path, used where it is installed.

oneDNN (what PyTorch's CPU convolutions are) picks AVX2, AVX-512, VNNI or AVX512-BF16 code at
run time. ``conv_onednn.cc`` wraps its forward, backward-data and backward-weights convolution
primitives (NHWC activations and HWIO kernels as XLA holds them; float32, or bfloat16 with
float32 accumulation) as three XLA FFI custom calls, with one primitive per shape kept for the
process. :mod:`flax_resnet.cpu.convs` calls them where :func:`supports` says they win
(:data:`SERVES`).

Where oneDNN comes from: ``ONEDNN_ROOT`` (or ``DNNL_ROOT``), a prefix with ``include/`` and
``lib/`` (an install of oneDNN 2.x or 3.x from source or a vendor package); else the system's
headers and library (Debian/Ubuntu: ``apt install libdnnl-dev``). The glue library is built on
first use like the native kernels (:mod:`flax_resnet.cpu.library`: same cache, same safety
checks). Without oneDNN, or with ``FLAX_RESNET_NO_ONEDNN=1``, :func:`available` is False and
nothing changes (no warning: :func:`status` says why); a ``RuntimeWarning`` is raised once only
when ``ONEDNN_ROOT``/``DNNL_ROOT`` names an install that does not build or load.

Threads: each call cuts the batch into equal chunks, one single-threaded oneDNN call per chunk on
XLA's own intra-op pool (no OpenMP team beside XLA's threads: that oversubscribed the cores and
lost the gain in whole steps). Kernel gradients sum a batch-determined number of chunks in a
fixed order, so results are the same bits run to run and for any thread count.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from flax_resnet import parallel
from flax_resnet.cpu import library

ENV_DISABLE = "FLAX_RESNET_NO_ONEDNN"
ENV_ROOTS = ("ONEDNN_ROOT", "DNNL_ROOT")
_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")
_TARGETS = {"forward": "flax_resnet_onednn_forward", "bwd_data": "flax_resnet_onednn_bwd_data",
            "bwd_weights": "flax_resnet_onednn_bwd_weights"}
_HEADER = Path("oneapi", "dnnl", "dnnl.h")
_SYSTEM_INCLUDES = ("/usr/include", "/usr/local/include")

_lock = threading.Lock()
_state: dict = {}  # "version": int once loaded; "error": str once it failed


def _root() -> str | None:
    return next((os.environ[name] for name in ENV_ROOTS if os.environ.get(name)), None)


def _recipe() -> library.Recipe:
    """The build of the glue against the oneDNN found; ``FileNotFoundError`` when there is none."""
    root = _root()
    if root:
        include = Path(root, "include")
        libdirs = [d for d in (Path(root, "lib"), Path(root, "lib64")) if list(d.glob("libdnnl.so*"))]
        if not (include / _HEADER).exists() or not libdirs:
            raise FileNotFoundError(f"no oneDNN under {root} (want include/{_HEADER} and lib/libdnnl.so)")
        names = sorted(p.name for p in libdirs[0].glob("libdnnl.so*"))
        name = "dnnl" if "libdnnl.so" in names else ":" + names[0]  # a wheel's lib may lack the bare .so
        link = (f"-L{libdirs[0]}", f"-Wl,-rpath,{libdirs[0]}", f"-l{name}", "-ldl")
        lib_file = libdirs[0] / names[0]
    else:
        dirs = [*_SYSTEM_INCLUDES, *filter(None, os.environ.get("CPATH", "").split(os.pathsep))]
        found = [d for d in dirs if (Path(d) / _HEADER).exists()]
        if not found:
            raise FileNotFoundError("oneDNN not found (apt install libdnnl-dev, or set ONEDNN_ROOT)")
        include, link, lib_file = Path(found[0]), ("-ldnnl", "-ldl"), None
    version = b"".join((include / "oneapi" / "dnnl" / f).read_bytes()
                       for f in ("dnnl_version.h", "dnnl_config.h") if (include / "oneapi" / "dnnl" / f).exists())
    extra = f"{include} {lib_file} {lib_file.stat().st_mtime_ns if lib_file else ''} {hashlib.sha256(version).hexdigest()}"
    sources = ("conv_onednn.cc", "runtime.h", "../native/pool.h")
    return library.Recipe("conv_onednn", Path(__file__).parent, "conv_onednn.cc", sources, (*_FLAGS, f"-I{include}"),
                          link, extra)


def _load() -> None:
    if parallel.env_flag(ENV_DISABLE):
        raise FileNotFoundError(f"{ENV_DISABLE} is set")
    lib, path = _recipe().load(_TARGETS)
    lib.flax_resnet_onednn_version.restype = ctypes.c_int
    lib.flax_resnet_onednn_bfloat16.restype = ctypes.c_int
    _state["version"] = int(lib.flax_resnet_onednn_version())
    _state["bfloat16"] = bool(lib.flax_resnet_onednn_bfloat16())
    _state["path"] = str(path)


def available() -> bool:
    """True once the glue is built against an installed oneDNN, loaded and registered with XLA."""
    with _lock:
        if "version" not in _state and "error" not in _state:
            try:
                _load()
            except FileNotFoundError as e:  # not installed, or opted out: quietly off
                _state["error"] = str(e)
            except Exception as e:  # a failed build, an unloadable library
                _state["error"] = f"{type(e).__name__}: {e}"
                if _root():
                    warnings.warn(f"flax_resnet: oneDNN convolutions unavailable ({_state['error']})",
                                  RuntimeWarning, stacklevel=3)
        return "version" in _state


def status() -> dict:
    """For benchmarks and logs: whether oneDNN is in use, its version and glue library, or why not."""
    ok = available()
    v = _state.get("version", 0)
    return {"available": ok, "version": f"{v // 10000}.{v // 100 % 100}.{v % 100}" if ok else None,
            "bfloat16": ok and _state["bfloat16"], "library": _state.get("path"), "error": _state.get("error")}


# Which convolutions oneDNN takes, per dtype and operation: kind of kernel ("kxk": 3x3 and the 7x7
# stem, "1x1") -> the most channels (in or out) it serves; the rest stay with the native kernels or
# XLA. Float32 kernel gradients of 512 channels lose to XLA's (4 partial sums of a 2.4M-entry
# kernel). From `python experiments/cpu_probes.py onednn` (each operation alone) and
# `onednn-steps` (whole steps, A/B); docs/performance.md.
_ANY = 1 << 30
SERVES = {
    "float32": {"forward": {"kxk": _ANY}, "bwd_data": {"kxk": _ANY}, "bwd_weights": {"kxk": 256},
                "fused": {"kxk": _ANY, "1x1": _ANY}},
    "bfloat16": {op: {"kxk": _ANY, "1x1": _ANY} for op in ("forward", "bwd_data", "bwd_weights", "fused")},
}


def supports(x_shape, kernel_shape, dtypes, op: str, stride: int = 1, pads=((0, 0), (0, 0))) -> bool:
    """Whether ``op`` ("forward", "bwd_data", "bwd_weights"; "fused": the forward with post-ops,
    :func:`flax_resnet.cpu.inference.conv`) of a convolution of NHWC ``x_shape``
    with HWIO ``kernel_shape``, its operands of ``dtypes``, runs on oneDNN: CPU backend, oneDNN
    installed, operands of one dtype, a kind of kernel and width :data:`SERVES` lists for that
    dtype and operation, a window that fits; bfloat16 only where this CPU's oneDNN has it (oneDNN
    2.x: AVX-512 and up; elsewhere those convolutions stay with XLA)."""
    if not library.custom_calls_on() or jax.default_backend() != "cpu":
        return False
    if len({jnp.dtype(d) for d in dtypes}) != 1:
        return False
    kinds = SERVES.get(jnp.dtype(dtypes[0]).name, {}).get(op, {})
    if len(x_shape) != 4 or len(kernel_shape) != 4 or x_shape[0] == 0:
        return False
    kind = "1x1" if tuple(kernel_shape[:2]) == (1, 1) else "kxk"
    if max(kernel_shape[2:]) > kinds.get(kind, 0):
        return False
    if _exact_pads(x_shape[1], x_shape[2], *kernel_shape[:2], stride, pads) is None:
        return False
    return available() and (jnp.dtype(dtypes[0]) != jnp.bfloat16 or _state["bfloat16"])


def _exact_pads(h, w, kh, kw, stride, pads):
    """``pads``, or None where no window fits (oneDNN, like XLA, floors the output size)."""
    (pt, pb), (pl, pr) = pads
    return pads if h + pt + pb >= kh and w + pl + pr >= kw and min(pt, pb, pl, pr) >= 0 else None


def _require() -> None:
    if not available():
        raise RuntimeError(f"flax_resnet oneDNN convolutions unavailable: {_state['error']}")


def _call(op, out, operands, x_shape, kernel_hw, stride, pads, aliases=None, **flags):
    exact = _exact_pads(x_shape[1], x_shape[2], *kernel_hw, stride, pads)
    if exact is None:
        raise ValueError(f"oneDNN convolution: a {kernel_hw} window at stride {stride} does not fit the padded "
                         f"{x_shape[1:3]} input (pads {pads})")
    (pt, pb), (pl, pr) = exact
    call = jax.ffi.ffi_call(_TARGETS[op], out, vmap_method="sequential", input_output_aliases=aliases)
    return call(*operands, stride=stride, pt=pt, pb=pb, pl=pl, pr=pr, **flags)


def conv_forward(x: jax.Array, kernel: jax.Array, stride: int, pads, *, bias: jax.Array | None = None,
                 residual: jax.Array | None = None, relu: bool = False) -> jax.Array:
    """``y = conv(x, kernel)``: NHWC x HWIO (one dtype), zero ``pads = ((top, bottom), (left, right))``;
    with oneDNN's post-ops, ``relu(conv(x, kernel) + bias + residual)``, each part optional.

    ``bias`` [CO] is float32 or ``x``'s dtype (oneDNN adds it in float32); ``residual`` has the
    output's shape and dtype and is added in place (its buffer is the output's: XLA copies it
    first only where it is still needed after the call).
    """
    _require()
    (pt, pb), (pl, pr) = pads
    (n, h, w, _), (kh, kw, _, co) = x.shape, kernel.shape
    oh, ow = (h + pt + pb - kh) // stride + 1, (w + pl + pr - kw) // stride + 1
    out = jax.ShapeDtypeStruct((n, oh, ow, co), x.dtype)
    operands = [x, kernel] + ([bias] if bias is not None else []) + ([residual] if residual is not None else [])
    if residual is not None and (residual.shape != out.shape or residual.dtype != out.dtype):
        raise ValueError(f"oneDNN convolution: a residual of {residual.shape} {residual.dtype} for an output of "
                         f"{out.shape} {out.dtype}")
    aliases = {len(operands) - 1: 0} if residual is not None else None
    return _call("forward", out, operands, x.shape, (kh, kw), stride, pads, aliases, bias=bias is not None,
                 sum=residual is not None, relu=bool(relu))


def conv_bwd_data(g: jax.Array, kernel: jax.Array, x_shape, stride: int, pads) -> jax.Array:
    """The input gradient of :func:`conv_forward` (input of ``x_shape``) for the output cotangent ``g``."""
    _require()
    out = jax.ShapeDtypeStruct(tuple(x_shape), g.dtype)
    return _call("bwd_data", out, (g, kernel), x_shape, kernel.shape[:2], stride, pads)


def conv_bwd_weights(x: jax.Array, g: jax.Array, kernel_hw, stride: int, pads) -> jax.Array:
    """The kernel gradient of :func:`conv_forward` for ``g``: HWIO, float32 (for bfloat16 operands
    too: oneDNN's float32 sums, unrounded)."""
    _require()
    shape = (*kernel_hw, x.shape[3], g.shape[3])
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return _call("bwd_weights", out, (x, g), x.shape, tuple(kernel_hw), stride, pads)


__all__ = ["ENV_DISABLE", "SERVES", "available", "conv_bwd_data", "conv_bwd_weights", "conv_forward", "status",
           "supports"]
