"""Building, caching and loading the CPU backend's shared libraries (XLA FFI custom calls).

Both :mod:`~flax_resnet.cpu.native` (our direct kernels) and :mod:`~flax_resnet.cpu.onednn`
(oneDNN's convolutions) are C++ sources compiled on first use with the host's C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) into ``$XDG_CACHE_HOME/flax_resnet/native``
(``~/.cache/...``; ``FLAX_RESNET_NATIVE_DIR`` overrides), one file per hash of the sources,
compiler (its ``--version``), flags, jaxlib, CPU (``-march=native``) and whatever else a
:class:`Recipe` names (oneDNN's version headers). A library is loaded only from a directory and
file that belong to this user and that nobody else can write
(:func:`flax_resnet.parallel.unsafe_cache`); one that fails to load is rebuilt once.

:class:`enabled` switches every custom call of both libraries off while tracing (the
single-device kernels under a multi-device mesh: :func:`flax_resnet.cpu.jit`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

from flax_resnet import parallel

ENV_DIR = "FLAX_RESNET_NATIVE_DIR"


def cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() + platform.machine()


def compiler() -> str | None:
    """The host's C++ compiler: ``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on the PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return cxx


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to build one library: ``main`` (a file of ``source_dir``) compiled with ``flags`` and linked
    with ``link``; ``sources`` (every file it includes) and ``extra`` go into the cache key."""

    stem: str
    source_dir: Path
    main: str
    sources: tuple[str, ...]
    flags: tuple[str, ...]
    link: tuple[str, ...] = ()
    extra: str = ""

    def path(self, cxx: str) -> Path:
        """Where the library for these sources, compiler, flags, CPU and jaxlib lives."""
        h = hashlib.sha256()
        for name in self.sources:
            h.update((self.source_dir / name).read_bytes())
        key = (compiler_version(cxx), *self.flags, *self.link, self.extra, jaxlib.__version__, cpu_signature())
        h.update(" ".join(key).encode())
        directory = os.environ.get(ENV_DIR) or parallel.user_cache_dir("native")
        return Path(directory) / f"{self.stem}-{h.hexdigest()[:16]}.so"

    def build(self, cxx: str, out: Path) -> None:
        """Compiles into ``out`` (atomically: concurrent builders each write a temp file)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cxx, *self.flags, f"-I{jax.ffi.include_dir()}", str(self.source_dir / self.main), "-o", tmp, *self.link]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self, targets: dict[str, str]) -> tuple[ctypes.CDLL, Path]:
        """Builds (if not cached), loads and registers ``targets`` (name -> FFI handler symbol) with
        XLA:CPU. Raises ``RuntimeError`` without a compiler, for a failed build or an unsafe cache."""
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        path = self.path(cxx)
        problem = parallel.private_cache_dir(path.parent) or parallel.unsafe_cache(path)
        if problem:
            raise RuntimeError(f"refusing the cached library: {problem}")
        if not path.exists():
            self.build(cxx, path)
        try:
            lib = ctypes.cdll.LoadLibrary(str(path))
        except OSError:  # a truncated or stale file (a build killed midway, another toolchain): rebuild once
            path.unlink(missing_ok=True)
            self.build(cxx, path)
            lib = ctypes.cdll.LoadLibrary(str(path))
        for symbol in targets.values():
            jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        return lib, path


_tracing = threading.local()


def custom_calls_on() -> bool:
    """False inside ``with enabled(False):``."""
    return getattr(_tracing, "on", True)


class enabled:
    """``with enabled(False):`` traces convolutions without the custom calls (native or oneDNN).

    They are single-device custom calls: XLA's SPMD partitioner would gather a sharded batch
    onto every device to run them. :func:`flax_resnet.cpu.jit` therefore traces with them only
    on a one-device mesh.
    """

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.prev = custom_calls_on()
        _tracing.on = self.on

    def __exit__(self, *exc):
        _tracing.on = self.prev
