"""Where a decode step spends its time: a JAX profiler trace plus a per-layer summary.

`profile_decode_step` compiles one decode step of an Engine's model (batch B, context C),
runs it under `jax.profiler.trace` (a trace directory TensorBoard and Perfetto open), then reads
the trace back: every XLA op the runtime executed is matched, by instruction name, to the
`op_name` metadata of the compiled HLO, whose Flax scope (`Decoder/layers_7/attn/...`) says
which layer and which part of it the op belongs to. Times are summed per layer and per part.
"""

from __future__ import annotations

import collections
import functools
import glob
import os
import re
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_OPERAND = re.compile(r"%([\w.\-]+)")
_LAYER = re.compile(r"/layers_(\d+)/(\w+)")


@dataclass
class DecodeProfile:
    """Per-step times in milliseconds (means over the profiled steps)."""

    trace_dir: str
    batch: int
    context: int
    steps: int
    wall_ms_per_step: float
    op_ms_per_step: float  # sum of the XLA ops' own durations (threads can overlap)
    per_layer_ms: dict[int, float] = field(default_factory=dict)
    per_part_ms: dict[str, float] = field(default_factory=dict)  # attn, mlp, norms, lm_head, ...
    top_ops: list[tuple[str, str, float]] = field(default_factory=list)  # (op, scope, ms)

    def table(self) -> str:
        lines = [f"decode step: batch {self.batch}, context {self.context}, "
                 f"{self.wall_ms_per_step:.2f} ms wall, {self.op_ms_per_step:.2f} ms in XLA ops "
                 f"(mean of {self.steps} steps); trace: {self.trace_dir}", "",
                 f"{'part':<14}{'ms/step':>10}{'share':>8}"]
        total = max(self.op_ms_per_step, 1e-9)
        for part, ms in sorted(self.per_part_ms.items(), key=lambda kv: -kv[1]):
            lines.append(f"{part:<14}{ms:>10.3f}{100 * ms / total:>7.1f}%")
        lines += ["", f"{'layer':<14}{'ms/step':>10}{'share':>8}"]
        for layer, ms in sorted(self.per_layer_ms.items()):
            lines.append(f"{'layers_' + str(layer):<14}{ms:>10.3f}{100 * ms / total:>7.1f}%  "
                         + "#" * int(round(40 * ms / max(self.per_layer_ms.values()))))
        lines += ["", "slowest ops:"]
        lines += [f"  {ms:8.3f} ms  {op:<28} {scope}" for op, scope, ms in self.top_ops]
        return "\n".join(lines)


def scope_of(op_name: str) -> tuple[int | None, str]:
    """('jit(f)/Decoder/layers_3/mlp/dot_general') -> (3, 'mlp'); top-level ops get a part
    named after what they are: embedding, final norm, lm_head, or 'other'."""
    m = _LAYER.search(op_name)
    if m:  # a projection feeding the residual add is scoped to the add: call it that
        part = m.group(2)
        return int(m.group(1)), "residual+proj" if part == "add" else part
    if "/Decoder/" in op_name:
        rest = op_name.split("/Decoder/", 1)[1]
        # The only top-level matmul (an XLA dot, or a CPU kernel's ffi_call for a small head).
        if "->BTV" in rest or rest.startswith(("lm_head", "dot_general", "ffi_call")):
            return None, "lm_head"
        if "take" in rest or "gather" in rest:
            return None, "embedding"
        if "norm" in rest:
            return None, "final_norm"
        return None, rest.split("/")[0]
    return None, "other"


def op_scopes(hlo_text: str) -> dict[str, str]:
    """{instruction name: op_name metadata} for the instructions of a compiled module.

    XLA:CPU emits some ops (dots it hands to its GEMM library, copies) without metadata; they
    take the scope of their first user that has one (a dot's bias-add or activation fusion)."""
    scopes, users = {}, {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        op = _OP_NAME.search(rest)
        if op:
            scopes[name] = op.group(1)
        for operand in _OPERAND.findall(rest.split("metadata=")[0]):
            users.setdefault(operand, []).append(name)
    for name, used_by in users.items():
        if name not in scopes:
            scopes[name] = next((scopes[u] for u in used_by if u in scopes), "unattributed")
    return scopes


def read_op_events(trace_dir: str) -> list[tuple[str, float]]:
    """(op name, duration ns) of every op the XLA runtime executed in the trace."""
    from jax.profiler import ProfileData
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no .xplane.pb profile under {trace_dir}")
    events = []
    for plane in ProfileData.from_file(paths[-1]).planes:
        # Every thread's line, the caller's ("python") too: XLA:CPU runs a program that needs
        # few threads (a small model's decode step) on the calling thread.
        for line in plane.lines:
            for ev in line.events:
                if ev.duration_ns > 0 and not ev.name.startswith(("ThreadpoolListener", "end: ")):
                    events.append((ev.name, ev.duration_ns))
    return events


def profile_decode_step(engine, *, batch: int = 1, context: int = 128, steps: int = 10,
                        trace_dir: str = "profiles/decode",
                        layer_kernel: bool = False) -> DecodeProfile:
    """Profile `steps` decode steps of `engine`'s model at `batch` rows with `context` cached
    tokens each (positions only; cache contents do not change the cost).

    A float32 or weight-only int8 [N, K] engine serves each layer as one CPU kernel call
    (cpu_ffi.decode_layer), one op to the profiler. Unless `layer_kernel`, the step is traced
    with the layer's five calls instead (cpu_ffi.layer_calls), so that its time splits into
    attention and MLP; they do the same work, the one call ~1.5% (float32) to ~8% (int8)
    faster (docs/PERFORMANCE.md, sessions 20 and 21)."""
    from model.decoder import decode_step
    from model.kernels import cpu_ffi
    page_size = engine.page_size
    pages_per_seq = -(-(context + 1) // page_size)
    if batch * pages_per_seq + 1 > engine.cache.num_pages:
        raise ValueError(f"batch {batch} x context {context} needs {batch * pages_per_seq + 1} KV "
                         f"pages; the engine has {engine.cache.num_pages} (raise kv_cache_gb)")
    page_table = (1 + np.arange(batch * pages_per_seq, dtype=np.int32)).reshape(batch, -1)
    tokens = jnp.ones((batch,), jnp.int32)
    positions = jnp.full((batch,), context, jnp.int32)
    # The cache is donated and carried, as the engine does: no copy of it per step.
    step = jax.jit(functools.partial(decode_step, engine.model), donate_argnums=(3,))
    page_table = jnp.asarray(page_table)
    cache = jax.tree.map(jnp.copy, engine.cache)  # the engine keeps its own
    with cpu_ffi.layer_calls(layer_kernel):
        compiled = step.lower(engine.params, tokens, positions, cache, page_table).compile()
    scopes = op_scopes(compiled.as_text())
    logits, cache = compiled(engine.params, tokens, positions, cache, page_table)
    logits.block_until_ready()
    os.makedirs(trace_dir, exist_ok=True)
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, cache = compiled(engine.params, tokens, positions, cache, page_table)
            logits.block_until_ready()
        wall = (time.perf_counter() - t0) / steps
    per_layer, per_part, per_op = (collections.defaultdict(float) for _ in range(3))
    total = 0.0
    for name, ns in read_op_events(trace_dir):
        if name not in scopes:
            continue
        ms = ns / 1e6 / steps
        layer, part = scope_of(scopes[name])
        total += ms
        per_part[part] += ms
        per_op[name] += ms
        if layer is not None:
            per_layer[layer] += ms
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    return DecodeProfile(trace_dir=trace_dir, batch=batch, context=context, steps=steps,
                         wall_ms_per_step=1000 * wall, op_ms_per_step=total,
                         per_layer_ms=dict(per_layer), per_part_ms=dict(per_part),
                         top_ops=[(op, scopes[op], ms) for op, ms in top])
