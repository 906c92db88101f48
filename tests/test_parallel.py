"""Process-wide settings of :mod:`flax_resnet.parallel` (the mesh and multi-host are tests/test_multihost.py's)."""

from __future__ import annotations

import jax

from flax_resnet import parallel


def test_compilation_cache_setting(tmp_path, monkeypatch):
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(parallel.ENV_NO_COMPILATION_CACHE, "1")
        assert parallel.enable_compilation_cache(tmp_path / "c") is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv(parallel.ENV_NO_COMPILATION_CACHE)
        assert parallel.enable_compilation_cache(tmp_path / "c") == str(tmp_path / "c")
        assert (tmp_path / "c").is_dir() and jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        # Already configured (JAX_COMPILATION_CACHE_DIR or jax.config): left as it is.
        assert parallel.enable_compilation_cache(tmp_path / "other") == str(tmp_path / "c")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()
