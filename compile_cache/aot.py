"""Ahead-of-time compilation of a plan, with a store of serialized executables.

Each program is `fn.lower(*args).compile()`d once, with a progress bar. Two caches make a warm
start cheap:
- JAX's persistent compilation cache (configure_cache) skips XLA's compilation, but every
  program is still traced and lowered (about half a second each for a 30-layer model).
- The executable store (`<cache dir>/aot/<plan digest>/`) keeps the serialized executables
  themselves, keyed by the plan digest (model config hash, engine settings, a hash of the source
  code that defines the programs, jax/jaxlib versions, backend and device kind), so a warm start
  skips tracing too. Entries are pickles written by this library: trust a cache directory as
  you trust the code in it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import sys
import time
import warnings

from compile_cache.monitor import counts as compile_counts
from compile_cache.plan import CompilePlan, describe_args


def source_digest(paths) -> str:
    """sha256 (16 hex) of the given .py files and of every .py file under the given packages,
    in sorted order: a program's identity beyond its shapes."""
    h = hashlib.sha256()
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                files += [os.path.join(root, n) for n in names if n.endswith(".py")]
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


def compile_plan(plan: CompilePlan, *, store_dir: str | None = None, progress: bool = False,
                 memory: bool = False, skip_args: tuple[str, ...] = ("[0]",)) -> CompileResult:
    """Compile every program of `plan`; returns the executables and a manifest record each.

    store_dir: root of the executable store (usually the compile cache directory); None
    disables it. source per record: "aot-store" (deserialized, no tracing), "persistent-cache"
    (traced and lowered, XLA compilation skipped) or "compiled". memory: add XLA's memory
    estimate. skip_args: argument paths listed once in plan.shared_args, not per program.
    """
    store = ExecutableStore(store_dir, plan.digest()) if store_dir else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan.programs), desc="compiling", unit="program")
    executables, records = {}, []
    start = time.perf_counter()
    for spec in plan.programs:
        t0 = time.perf_counter()
        compiled = store.load(spec.key) if store else None
        source = "aot-store"
        if compiled is None:
            hits_before = compile_counts().cache_hits
            compiled = spec.fn.lower(*spec.args).compile()
            source = "persistent-cache" if compile_counts().cache_hits > hits_before else "compiled"
            if store:
                store.save(spec.key, compiled)
        seconds = time.perf_counter() - t0
        executables[spec.key] = compiled
        record = {"key": spec.key, **spec.info, "source": source,
                  "cache_hit": source != "compiled", "compile_seconds": round(seconds, 4),
                  "inputs": describe_args(spec.args, skip=skip_args)}
        if memory:
            record["memory"] = memory_stats(compiled)
        records.append(record)
        if bar:
            bar.set_postfix_str(f"{spec.key} ({source})", refresh=False)
            bar.update(1)
    if bar:
        bar.close()
    return CompileResult(executables, records, time.perf_counter() - start)

