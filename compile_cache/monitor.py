"""Count XLA compilations in this process, from JAX's monitoring events.

Serving must never compile after warm-up; the server exposes these counts as metrics and the tests
assert they stay flat across mixed traffic. `backend_compiles` counts compile requests reaching
the backend (a persistent-cache hit is one too); `cache_hits` counts those the persistent
compilation cache answered; `xla_compiles` is the difference, the real XLA compilations.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from jax import monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclass
class CompileCounts:
    backend_compiles: int = 0
    backend_compile_seconds: float = 0.0
    cache_hits: int = 0

    @property
    def xla_compiles(self) -> int:
        """Compile requests XLA actually compiled (backend_compiles counts every request,
        including those the persistent cache answered)."""
        return self.backend_compiles - self.cache_hits


_counts = CompileCounts()
_lock = threading.Lock()
_installed = False
_local = threading.local()  # the counts of the calling thread (JAX reports in the compiling one)


def _thread_counts() -> CompileCounts:
    if not hasattr(_local, "counts"):
        _local.counts = CompileCounts()
    return _local.counts


def _on_duration(event: str, duration_secs: float, **_kwargs) -> None:
    if event == _BACKEND_COMPILE:
        mine = _thread_counts()
        mine.backend_compiles += 1
        mine.backend_compile_seconds += duration_secs
        with _lock:
            _counts.backend_compiles += 1
            _counts.backend_compile_seconds += duration_secs


def _on_event(event: str, **_kwargs) -> None:
    if event == _CACHE_HIT:
        _thread_counts().cache_hits += 1
        with _lock:
            _counts.cache_hits += 1


def install() -> None:
    """Register the listeners once per process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        monitoring.register_event_duration_secs_listener(_on_duration)
        monitoring.register_event_listener(_on_event)
        _installed = True


def counts() -> CompileCounts:
    """A snapshot of the counts since `install()` (installs on first call)."""
    install()
    with _lock:
        return CompileCounts(**vars(_counts))


def thread_counts() -> CompileCounts:
    """A snapshot of the counts of compilations made by the calling thread: what one
    compile() did when other threads compile at the same time."""
    install()
    return CompileCounts(**vars(_thread_counts()))


install()
