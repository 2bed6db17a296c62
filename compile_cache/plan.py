"""Compile plans: every program a configuration runs, with its abstract arguments.

A plan is data: a list of `ProgramSpec(key, fn, args)` where `fn` is a `jax.jit` function and
`args` its arguments as `jax.ShapeDtypeStruct`s (with shardings where they matter). The serving
Engine builds its plan from its configuration (`Engine.compile_plan()`); `compile_cache.aot`
compiles a plan ahead of time; `PlannedProgram` then dispatches live calls to the precompiled
executables, padding arguments into a planned bucket, so serving never compiles.

This module knows nothing about models: buckets are integers, programs are opaque functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Sequence

import jax


class PlanError(ValueError):
    """A plan that cannot cover its configuration, or a call outside every planned program."""


def powers_of_two(lo: int, hi: int, growth: int = 2) -> tuple[int, ...]:
    """lo, lo*growth, ... up to the first power of two >= hi (lo a power of two; growth a power
    of two >= 2), so every n in [1, hi] has a bucket >= n and none is wastefully large."""
    if growth < 2 or growth & (growth - 1):
        raise PlanError(f"bucket growth must be a power of two >= 2, got {growth}")
    top = max(1, lo)
    while top < hi:
        top *= 2
    out = [max(1, lo)]
    while out[-1] < hi:
        out.append(min(out[-1] * growth, top))
    return tuple(out)


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= n, or None when n exceeds them all."""
    fits = [b for b in buckets if b >= n]
    return min(fits) if fits else None


@dataclasses.dataclass(frozen=True)
class ServingBuckets:
    """The padded shapes the serving programs are compiled for.

    prefill_rows: sequences per prefill call; prefill_lengths: tokens per sequence per call;
    decode_rows: sequences per decode call; page_widths: page-table columns (pages per
    sequence visible to one call; attention cost grows with it). stop_width: columns of the
    decode program's stop-token table (a row with more stop ids is still stopped on the host).
    """

    prefill_rows: tuple[int, ...]
    prefill_lengths: tuple[int, ...]
    decode_rows: tuple[int, ...]
    page_widths: tuple[int, ...]
    stop_width: int = 8

    @classmethod
    def covering(cls, *, max_num_seqs: int, max_prefill_seqs: int, prefill_chunk: int,
                 max_seq_len: int, page_size: int, min_prefill: int = 16, growth: int = 2,
                 stop_width: int = 8) -> "ServingBuckets":
        """Geometric buckets (factor `growth`) that cover every call an engine with these limits
        can make. growth=2 matches the engine's own power-of-two rounding (no padding); 4 halves
        the number of programs for at most 4x padding."""
        rows_cap = min(max_prefill_seqs, max_num_seqs)
        return cls(prefill_rows=powers_of_two(1, rows_cap, growth),
                   prefill_lengths=powers_of_two(min_prefill, min(prefill_chunk, max_seq_len),
                                                 growth),
                   decode_rows=powers_of_two(1, max_num_seqs, growth),
                   page_widths=powers_of_two(1, -(-max_seq_len // page_size), growth),
                   stop_width=stop_width)

    def validate_covers(self, *, max_num_seqs: int, max_prefill_seqs: int, prefill_chunk: int,
                        max_seq_len: int, page_size: int) -> "ServingBuckets":
        """PlanError unless every call within these limits fits a bucket."""
        needs = {"prefill_rows": min(max_prefill_seqs, max_num_seqs),
                 "prefill_lengths": min(prefill_chunk, max_seq_len),
                 "decode_rows": max_num_seqs,
                 "page_widths": -(-max_seq_len // page_size)}
        for name, need in needs.items():
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 or v & (v - 1) for v in values):
                raise PlanError(f"{name} must be powers of two, got {values!r}")
            if max(values) < need:
                raise PlanError(f"{name}={values} does not cover the engine limit {need}; "
                                f"add a bucket >= {need}")
        if self.stop_width < 1:
            raise PlanError(f"stop_width must be >= 1, got {self.stop_width}")
        return self

    def prefill_shapes(self, page_size: int) -> list[tuple[int, int, int]]:
        """(rows, length, width) triples a prefill call can land in.

        A chunk that pads to length bucket L is longer than the previous bucket, and its
        sequence ends at or after the chunk, so widths too narrow for that are unreachable."""
        lengths = sorted(self.prefill_lengths)
        out = []
        for i, length in enumerate(lengths):
            shortest = lengths[i - 1] + 1 if i else 1
            for width in sorted(self.page_widths):
                if width * page_size >= shortest:
                    out += [(r, length, width) for r in sorted(self.prefill_rows)]
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ServingBuckets":
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data.items()})


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """One program of a plan: `fn` (a jax.jit function) at abstract `args`.

    key: a short unique name, e.g. "prefill/plain/r2_t64_w8". info: free-form JSON-able facts
    for the manifest (bucket sizes, variant, steps per call)."""

    key: str
    fn: Callable
    args: tuple
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CompilePlan:
    """Programs plus the facts that identify them (model config hash, settings, versions)."""

    programs: list[ProgramSpec]
    fingerprint: dict  # JSON-able: model config hash, engine settings, code hash, ...
    shared_args: dict = dataclasses.field(default_factory=dict)  # e.g. {"params": tree}: listed once

    def digest(self) -> str:
        """A stable hash of the fingerprint, jax/jaxlib versions and backend devices."""
        import jaxlib
        devices = sorted({d.device_kind for d in jax.devices()})
        blob = json.dumps({"plan": self.fingerprint, "jax": jax.__version__,
                           "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
                           "devices": devices}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def keys(self) -> list[str]:
        return [p.key for p in self.programs]


def describe_args(args, skip: Sequence[str] = ()) -> list[dict]:
    """[{path, shape, dtype, sharding}] for the leaves of abstract args (paths in `skip`, e.g.
    "[0]" for a params tree listed elsewhere, are summarized by prefix)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(args)[0]:
        name = jax.tree_util.keystr(path)
        if any(name.startswith(s) for s in skip):
            continue
        sharding = getattr(leaf, "sharding", None)
        out.append({"path": name, "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                    "sharding": None if sharding is None else str(sharding)})
    return out


def abstract(tree: Any, with_sharding: bool = True):
    """ShapeDtypeStructs of the arrays in `tree` (keeping their shardings)."""
    def one(x):
        sharding = getattr(x, "sharding", None) if with_sharding else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(one, tree)


class PlannedProgram:
    """Callable standing in for a jitted program: runs precompiled executables only.

    adapt(*args) -> (key, args): the planned program key for this call and the arguments padded
    to its shapes (or raises PlanError). A call whose key has no executable raises
    `miss_error` (a PlanError by default) rather than compiling.
    """

    def __init__(self, name: str, executables: dict, adapt: Callable,
                 miss_error: type[Exception] = PlanError):
        self.name = name
        self.executables = executables
        self.adapt = adapt
        self.miss_error = miss_error
        self.calls = 0

    def __call__(self, *args):
        key, args = self.adapt(*args)
        exe = self.executables.get(key)
        if exe is None:
            raise self.miss_error(f"{self.name}: no precompiled program {key!r} in the compile "
                                  f"plan; rebuild the plan (Engine.warmup) for this configuration")
        self.calls += 1
        return exe(*args)
