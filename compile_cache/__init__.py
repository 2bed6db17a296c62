"""Compilation caching: one place that configures JAX's persistent compilation cache."""

from compile_cache.cache import configure_cache
