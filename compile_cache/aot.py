"""Ahead-of-time compilation of a plan, with a store of serialized executables.

Each program is `fn.lower(*args).compile()`d once, with a progress bar. Tracing and lowering
run on the calling thread (they hold the GIL); XLA compilations run on a pool of threads (XLA
releases the GIL), so a plan compiles up to `workers` times faster on a machine with the cores.
Two caches make a warm start cheap:
- JAX's persistent compilation cache (configure_cache) skips XLA's compilation, but every
  program is still traced and lowered (about half a second each for a 30-layer model).
- The executable store (`<cache dir>/aot/<plan digest>/`) keeps the serialized executables
  themselves, keyed by the plan digest (model config hash, engine settings, a hash of the source
  code that defines the programs, jax/jaxlib versions, backend and device kind), so a warm start
  skips tracing too. Entries are pickles written by this library: trust a cache directory as
  you trust the code in it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pickle
import sys
import time
import warnings

from compile_cache.monitor import thread_counts
from compile_cache.plan import CompilePlan, describe_args


def source_digest(paths) -> str:
    """sha256 (16 hex) of the given files and of every .py, .cc and .h file under the given
    packages (.cc, .h: the CPU kernels that programs call through the FFI), in sorted order: a
    program's identity beyond its shapes."""
    h = hashlib.sha256()
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                files += [os.path.join(root, n) for n in names if n.endswith((".py", ".cc", ".h"))]
        elif os.path.exists(p):
            files.append(p)
    for f in sorted(files):
        h.update(os.path.relpath(f, os.path.dirname(os.path.dirname(os.path.abspath(f)))).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def module_paths(*modules: str) -> list[str]:
    """Filesystem paths of imported modules or packages (a package gives its directory)."""
    out = []
    for name in modules:
        mod = sys.modules[name]
        path = mod.__file__
        out.append(os.path.dirname(path) if path.endswith("__init__.py") else path)
    return out


class ExecutableStore:
    """Serialized executables of one plan digest under `<root>/aot/<digest>/`."""

    def __init__(self, root: str, digest: str):
        self.directory = os.path.join(root, "aot", digest)

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key.replace("/", "__") + ".exe")

    def load(self, key: str):
        path = self._path(key)
        if not os.path.exists(path):
            return None
        from jax.experimental.serialize_executable import deserialize_and_load
        try:
            with open(path, "rb") as f:
                blob, in_tree, out_tree = pickle.load(f)
            return deserialize_and_load(blob, in_tree, out_tree)
        except Exception as e:  # a stale or damaged entry is recompiled, never fatal
            warnings.warn(f"ignoring unreadable executable {path}: {type(e).__name__}: {e}")
            return None

    def save(self, key: str, compiled) -> bool:
        from jax.experimental.serialize_executable import serialize
        try:
            payload = pickle.dumps(serialize(compiled))
        except Exception as e:  # some backends cannot serialize; the persistent cache still works
            warnings.warn(f"cannot serialize {key}: {type(e).__name__}: {e}")
            return False
        os.makedirs(self.directory, exist_ok=True)
        tmp = self._path(key) + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, self._path(key))  # atomic: concurrent writers never leave half a file
        return True


def memory_stats(compiled) -> dict | None:
    """XLA's per-device memory estimate of an executable, in bytes (None if unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f, 0) or 0) for f in fields}
    # Donated (aliased) outputs reuse their inputs' buffers.
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                          + out["temp_bytes"] + out["generated_code_bytes"])
    return out


@dataclasses.dataclass
class CompileResult:
    executables: dict          # key -> jax.stages.Compiled
    records: list[dict]        # per program: key, info, inputs, source, seconds, memory
    seconds: float


def default_workers(num_programs: int) -> int:
    """Compilation threads: one per core (at most 8: each XLA compilation of a large program
    holds a few hundred MB), never more than there are programs."""
    return max(1, min(num_programs, os.cpu_count() or 1, 8))


def _compile(lowered):
    """(executable, source) of one lowered program, on the thread that compiles it."""
    hits_before = thread_counts().cache_hits
    compiled = lowered.compile()
    return compiled, ("persistent-cache" if thread_counts().cache_hits > hits_before
                      else "compiled")


def compile_plan(plan: CompilePlan, *, store_dir: str | None = None, progress: bool = False,
                 memory: bool = False, skip_args: tuple[str, ...] = ("[0]",),
                 workers: int | None = None) -> CompileResult:
    """Compile every program of `plan`; returns the executables and a manifest record each.

    store_dir: root of the executable store (usually the compile cache directory); None
    disables it. source per record: "aot-store" (deserialized, no tracing), "persistent-cache"
    (traced and lowered, XLA compilation skipped) or "compiled". memory: add XLA's memory
    estimate. skip_args: argument paths listed once in plan.shared_args, not per program.
    workers: XLA compilation threads (default: default_workers); compile_seconds of a record
    is its wall time from lowering to executable, so with workers > 1 they overlap.
    """
    store = ExecutableStore(store_dir, plan.digest()) if store_dir else None
    workers = workers or default_workers(len(plan.programs))
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan.programs), desc=f"compiling ({workers} threads)",
                   unit="program")
    done: dict[str, tuple] = {}  # key -> (compiled, source, seconds)
    started: dict[str, float] = {}

    def finish(key, compiled, source):
        done[key] = (compiled, source, time.perf_counter() - started[key])
        if source != "aot-store" and store:
            store.save(key, compiled)
        if bar:
            bar.set_postfix_str(f"{key} ({source})", refresh=False)
            bar.update(1)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xla-compile") as pool:
        pending = {}
        for spec in plan.programs:
            started[spec.key] = time.perf_counter()
            compiled = store.load(spec.key) if store else None
            if compiled is not None:
                finish(spec.key, compiled, "aot-store")
                continue
            lowered = spec.fn.lower(*spec.args)  # tracing holds the GIL: this thread
            pending[pool.submit(_compile, lowered)] = spec.key
            # keep at most `workers` lowered programs waiting, so memory stays bounded
            while len(pending) >= workers:
                ready, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in ready:
                    finish(pending.pop(fut), *fut.result())
        for fut in concurrent.futures.as_completed(list(pending)):
            finish(pending.pop(fut), *fut.result())
    if bar:
        bar.close()
    executables, records = {}, []
    for spec in plan.programs:
        compiled, source, seconds = done[spec.key]
        executables[spec.key] = compiled
        record = {"key": spec.key, **spec.info, "source": source,
                  "cache_hit": source != "compiled", "compile_seconds": round(seconds, 4),
                  "inputs": describe_args(spec.args, skip=skip_args)}
        if memory:
            record["memory"] = memory_stats(compiled)
        records.append(record)
    return CompileResult(executables, records, time.perf_counter() - start)
