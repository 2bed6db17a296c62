"""JAX's persistent compilation cache, configured the same way for every script."""

from __future__ import annotations

import os

import jax


def configure_cache(directory: str | None, min_compile_seconds: float = 0.0) -> str | None:
    """Cache compiled programs in `directory` (None: leave the cache off). Returns the path.

    Every program is cached (min_compile_seconds=0 by default: serving programs are few and a
    warm start should compile nothing). On multi-host runs JAX lets only process 0 write.
    """
    if not directory:
        return None
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
