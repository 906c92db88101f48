"""Process-wide settings of :mod:`flax_resnet.parallel` (the mesh and multi-host are tests/test_multihost.py's)."""

from __future__ import annotations

import jax
import pytest

from flax_resnet import parallel


def test_compilation_cache_setting(tmp_path, monkeypatch):
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    max_before = jax.config.jax_compilation_cache_max_size
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(parallel.ENV_NO_COMPILATION_CACHE, "1")
        assert parallel.enable_compilation_cache(tmp_path / "c") is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv(parallel.ENV_NO_COMPILATION_CACHE)
        assert parallel.enable_compilation_cache(tmp_path / "c") == str(tmp_path / "c")
        assert (tmp_path / "c").is_dir() and jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700
        assert jax.config.jax_compilation_cache_max_size == parallel.COMPILATION_CACHE_MAX_BYTES
        # Already configured (JAX_COMPILATION_CACHE_DIR or jax.config): left as it is.
        assert parallel.enable_compilation_cache(tmp_path / "other") == str(tmp_path / "c")
        # A cache directory others can write is code anyone could plant: refused, with one warning.
        jax.config.update("jax_compilation_cache_dir", None)
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared").chmod(0o777)
        with pytest.warns(RuntimeWarning, match="compilation cache off: .*writable by group or others"):
            assert parallel.enable_compilation_cache(tmp_path / "shared") is None
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_compilation_cache_max_size", max_before)
        compilation_cache.reset_cache()
