"""CPU kernels compiled on first use and called from XLA programs through the FFI.

Matmuls with int8 weights (csrc/int8_matmul.cc; decode, and with AVX-512 VNNI w8a8 prefill):
- `int8_matmul(xq, w)` (w8a8): int8 x int8 -> int32, bit-identical to XLA's dot (integer sums
  are exact), reading each weight byte once for all rows with AVX-512 VNNI where the CPU has it.
  XLA:CPU's generic int8 GEMM streams weights at a third of the memory bandwidth for one or two
  rows.
- `w8a8_matmul(x, w)` (w8a8 from float rows): the same int8 product with the per-row
  quantization of x (model.layers.int8_rows) before it and the rescale after it done in the
  kernel, with the same float operations, so the bits are those of the three steps as XLA ops.
- `weight_only_matmul(x, w)` (weight-only int8): float32 x int8 -> float32, the weight widened
  in registers. XLA converts the whole weight to float in memory first.

Float32 matmuls for decode (csrc/f32_nk.cc, csrc/f32_gemv.cc, csrc/f32_gemm.cc):
- `f32_matmul_nk(x, w)`: decode batches of up to 32 rows against a weight stored `[N, K]`
  (float32 engines with `f32_weight_layout="nk"`, the default with the AVX2 or AVX-512 kernels,
  and the tied LM head): register blocks of dot products of contiguous rows, every work item
  one sequential read at batch 1; each output summed in one fixed order (the same bits in any
  batch and on AVX2 and AVX-512).
- `f32_gemv(x, w)` (`[K, N]` weights): one row into at most 1024 outputs, or 2-4 rows into at
  most 4096, split over K so that each thread streams whole weight rows; XLA splits narrow
  GEMVs over columns and reads them at ~17 GB/s.
- `f32_gemm(x, w)` (`[K, N]` weights): decode batches of 9-32 rows, 8 x 48 output blocks in
  AVX-512 registers over packed weight chunks, each row summed in one fixed order.

And decode attention over the paged KV cache (csrc/paged_attention.cc):
- `paged_decode_attention(q, k_cache, v_cache, ...)`: float32 queries against a float32 or int8
  cache, read page by page through the page table with an online softmax, instead of XLA's
  gather into a dense copy that its matmuls then read again.

And a whole decoder layer with float32 rows in one call (csrc/decode_layer.cc):
- `decode_layer(x, ...)`: the five calls of a float32 or weight-only int8 `[N, K]` layer (the
  fused matmuls and attention with RoPE and the cache write) as the steps of one team of
  threads, which fork once and meet at a barrier between steps; the bits of the five calls.
docs/PERFORMANCE.md has the numbers.

The sources are compiled with the system C++ compiler (`$CXX`, else `c++`) for this CPU
(`-march=native`) into a cache directory (`$XLRT_KERNEL_CACHE`, else ~/.cache/xlrt/kernels),
keyed by the source, the compiler, the flags, jaxlib and the CPU's feature flags; later
processes load the cached library. Without a compiler, or if the build fails, the model keeps
XLA's dot and one warning says why. `XLRT_CPU_KERNELS=0` turns the kernels off.

Whether a matmul or attention uses a kernel is decided when its program is traced
(`use_int8_matmul`, `use_weight_only_matmul`, `use_f32_matmul_nk`, `use_f32_gemv`,
`use_f32_gemm`, `use_paged_attention`, `use_decode_layer`): only on the CPU backend, without a
mesh (a custom call is not partitioned: sharded weights keep XLA's dot), outside `disabled()`
(jax.export uses it, so exported programs carry no custom call), and for the row counts where
they were measured
faster than XLA: decode batches (INT8_MAX_ROWS, WEIGHT_ONLY_MAX_ROWS, F32_NK_MAX_ROWS...), and with
AVX-512 VNNI the w8a8 matmuls of prefill too (INT8_MAX_ROWS_VNNI). Other long matmuls are
compute-bound GEMMs that XLA already runs well.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "int8_matmul.cc", CSRC / "paged_attention.cc", CSRC / "f32_gemv.cc",
           CSRC / "f32_nk.cc", CSRC / "f32_gemm.cc", CSRC / "decode_layer.cc")
HEADERS = (CSRC / "parallel.h", CSRC / "gemm_avx2.h", CSRC / "layer_parts.h")
TARGET = "xlrt_int8_matmul"  # int8 x int8 -> int32 (w8a8)
W8A8_TARGET = "xlrt_w8a8_matmul"  # float32 rows quantized in the kernel x int8 -> float32 (w8a8)
WEIGHT_ONLY_TARGET = "xlrt_f32_int8_matmul"  # float32 x int8 -> float32 (weight-only int8)
F32_GEMV_TARGET = "xlrt_f32_gemv"  # float32 x float32, split over K (narrow decode GEMVs)
F32_GEMM_TARGET = "xlrt_f32_gemm"  # float32 x float32, register-blocked (batched decode)
F32_MATMUL_NK_TARGET = "xlrt_f32_matmul_nk"  # float32 x float32 [N, K], register-blocked dots
# f32_matmul_nk and the weight-only matmul with work fused before and after (fused_matmul).
F32_MATMUL_NK_FUSED_TARGET = "xlrt_f32_matmul_nk_fused"
WEIGHT_ONLY_FUSED_TARGET = "xlrt_f32_int8_matmul_fused"
ATTENTION_TARGET = "xlrt_paged_decode_attention"  # + "_f32" or "_int8" (the cache's dtype)
# The same with RoPE and the write of the new keys and values folded in (+ "_f32" or "_int8").
ATTENTION_ROPE_TARGET = "xlrt_paged_decode_attention_rope"
# A whole float32 decoder layer of a decode step, its steps run by one team of threads
# (csrc/decode_layer.cc; + "_f32" or "_int8", the cache's dtype).
DECODE_LAYER_TARGET = "xlrt_decode_layer"
# Float32 matmuls with at most F32_GEMV_MAX_ROWS rows run the split-K GEMV: one row into at
# most F32_GEMV_MAX_N outputs (SmolLM2's attention output, MLP down and fused q|k|v: N = 576,
# 960), 2-4 rows into at most F32_GEMV_WIDE_MAX_N (gate|up too, N = 3072). Same-run A/B of the
# decode step (docs/PERFORMANCE.md): faster in each of these cases; slower for one row into
# 3072 outputs and for 8 rows, which keep XLA's dot. On AVX2 (no AVX-512) one row keeps XLA's
# dot too: its GEMVs there were as fast (19-23 GB/s) and the batch-1 step 7% faster (21.38 against
# 19.86 ms/token, same process), while 2 and 4 rows stayed faster with the kernel.
F32_GEMV_MAX_ROWS = 4
F32_GEMV_MAX_N = 1024
F32_GEMV_WIDE_MAX_N = 4096
# Float32 matmuls with [K, N] weights and F32_GEMM_MIN_ROWS to F32_GEMM_MAX_ROWS rows (decode
# batches of 16 and 32 sequences; longer prefill chunks keep XLA's dot) run the register-blocked
# GEMM. Same-run A/B of the decode step (docs/PERFORMANCE.md): a few percent faster at 16 and 32
# rows, slower at 2-8 (those keep the GEMV or XLA's dot); more rows were not measured.
F32_GEMM_MIN_ROWS = 9
F32_GEMM_MAX_ROWS = 32
# Float32 matmuls with [N, K] weights and up to this many rows (decode batches; prefill chunks
# keep XLA's dot, as fast with either layout) run f32_matmul_nk.
F32_NK_MAX_ROWS = 32
# Query tokens per sequence up to which attention over the paged cache runs the kernel (decode).
ATTENTION_MAX_QUERY_LEN = 8
# Rows (batch x query tokens) up to which the kernel replaces XLA's dot: decode batches. Past
# this, XLA's GEMM re-uses each weight load across enough rows (measured crossover in
# docs/PERFORMANCE.md).
INT8_MAX_ROWS = 2
# With [N, K] weights on AVX2 (no AVX-512) the w8a8 kernel beat XLA's int8 dot at every row count
# measured, 2 to 32 (1.3-2.1x in a 30-layer chain of the default model's matmuls,
# docs/PERFORMANCE.md), so it runs for decode batches up to this many rows there.
INT8_NK_MAX_ROWS_AVX2 = 32
# With AVX-512 VNNI, past INT8_MAX_ROWS rows the kernel packs each 64-column tile of the weight
# once per panel of rows (a [N, K] one transposed) and runs 6 rows at a time over it in registers.
# In a 30-layer chain of the default model's matmuls at 32 rows it ran 2.0x XLA's int8 dot with
# [K, N] weights, 1.3x with [N, K] ones and 1.4x on the tied LM head; at 128 to 2048 rows
# (prefill) 1.6-2.3x, and at 4096 rows 1.1-1.5x (docs/PERFORMANCE.md, sessions 15 and 16). So it
# runs for every call up to this many rows, the largest measured.
INT8_MAX_ROWS_VNNI = 4096
# Weight-only int8 (float32 rows times int8 weights): up to this many rows per matmul.
WEIGHT_ONLY_MAX_ROWS = 32
# int32 accumulation of (x + 128) * w stays exact up to K = 2**31 / (255 * 128).
INT8_MAX_K = 65536

_lock = threading.Lock()
# "simd": the library's vector path, "avx512", "avx2" or "portable" (one for every source: they
# are built with the same flags), None until loaded.
_state: dict = {"tried": False, "lib": None, "error": None, "vnni": False, "simd": None}
_disabled = contextvars.ContextVar("xlrt_cpu_kernels_disabled", default=False)
# None: XLRT_DECODE_LAYER decides whether decode layers are one call (decode_layer); else the
# choice of the innermost layer_calls() block.
_layer_kernel = contextvars.ContextVar("xlrt_decode_layer_kernel", default=None)


def cache_dir() -> Path:
    env = os.environ.get("XLRT_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "xlrt" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Some VMs list AMX without allowing it; the kernel never needs it.
        flags += ["-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    else:
        flags += ["-mcpu=native"]
    return flags


def build(defines: tuple[str, ...] = ()) -> Path:
    """Compile (or find in the cache) the kernel library; returns its path. `defines` are
    preprocessor macros (the tests build the portable path with XLRT_FORCE_GENERIC)."""
    compiler = _compiler()
    flags = _flags() + [f"-D{d}" for d in defines]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C++ compiler ({compiler!r}: {e})") from None
    key = hashlib.sha256("\0".join([
        *(f.read_text() for f in SOURCES + HEADERS), compiler, version, " ".join(flags),
        jax.__version__,
        platform.machine(), _cpu_flags()]).encode()).hexdigest()[:20]
    out_dir = cache_dir()
    out = out_dir / f"xlrt_cpu_{key}.so"
    if out.exists():
        return out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"{out_dir} is not writable")
    except OSError:  # a read-only home: a per-user directory under the system temp dir
        out_dir = Path(tempfile.gettempdir()) / f"xlrt-kernels-{os.getuid()}"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / out.name
        if out.exists():
            return out
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o",
               str(tmp_out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {', '.join(f.name for f in SOURCES)} failed "
                               f"({' '.join(cmd)}):\n"
                               f"{proc.stderr[-2000:]}")
        os.replace(tmp_out, out)  # atomic: concurrent builders each install a whole file
    return out


def load() -> bool:
    """Build, load and register the kernels once per process; False (with one warning) if they
    cannot be built here."""
    with _lock:
        if _state["tried"]:
            return _state["lib"] is not None
        _state["tried"] = True
        if os.environ.get("XLRT_CPU_KERNELS", "1") == "0":
            _state["error"] = "XLRT_CPU_KERNELS=0"
            return False
        try:
            lib = register()
            _state["vnni"] = bool(lib.xlrt_int8_matmul_vnni())
            _state["simd"] = ("portable", "avx2", "avx512")[lib.xlrt_f32_gemm_path()]
            _state["lib"] = lib
        except Exception as e:  # any failure leaves XLA's dot in place
            _state["error"] = str(e)
            log.warning("xlrt CPU kernels unavailable, using XLA's int8 dot: %s", e)
            return False
        return True


def register(suffix: str = "", defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build the library with `defines` and register its kernels as the FFI targets TARGET,
    W8A8_TARGET, WEIGHT_ONLY_TARGET, F32_GEMV_TARGET, F32_GEMM_TARGET, F32_MATMUL_NK_TARGET,
    F32_MATMUL_NK_FUSED_TARGET, WEIGHT_ONLY_FUSED_TARGET, ATTENTION_TARGET,
    ATTENTION_ROPE_TARGET and DECODE_LAYER_TARGET, each followed by `suffix` (the attention and
    layer targets then by "_f32" and "_int8", one per cache dtype)."""
    lib = ctypes.cdll.LoadLibrary(str(build(defines)))
    for name, symbol in ((TARGET + suffix, lib.XlrtInt8Matmul),
                         (W8A8_TARGET + suffix, lib.XlrtW8a8Matmul),
                         (WEIGHT_ONLY_TARGET + suffix, lib.XlrtF32Int8Matmul),
                         (F32_GEMV_TARGET + suffix, lib.XlrtF32Gemv),
                         (F32_GEMM_TARGET + suffix, lib.XlrtF32Gemm),
                         (F32_MATMUL_NK_TARGET + suffix, lib.XlrtF32MatmulNk),
                         (F32_MATMUL_NK_FUSED_TARGET + suffix, lib.XlrtF32MatmulNkFused),
                         (WEIGHT_ONLY_FUSED_TARGET + suffix, lib.XlrtF32Int8MatmulFused),
                         (ATTENTION_TARGET + suffix + "_f32", lib.XlrtPagedDecodeF32),
                         (ATTENTION_TARGET + suffix + "_int8", lib.XlrtPagedDecodeInt8),
                         (ATTENTION_ROPE_TARGET + suffix + "_f32", lib.XlrtPagedDecodeRopeF32),
                         (ATTENTION_ROPE_TARGET + suffix + "_int8", lib.XlrtPagedDecodeRopeInt8),
                         (DECODE_LAYER_TARGET + suffix + "_f32", lib.XlrtDecodeLayerF32),
                         (DECODE_LAYER_TARGET + suffix + "_int8", lib.XlrtDecodeLayerInt8)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return lib


def status() -> dict:
    """Whether the kernels loaded in this process, with VNNI, with the float32 GEMM in use
    (AVX-512), the weight-only int8, w8a8 and float32 weight layouts engines pick here, or why
    not (tests, bug reports)."""
    return {"loaded": _state["lib"] is not None, "vnni": _state["vnni"],
            "gemm_simd": _state["simd"] == "avx512", "int8_weight_layout": int8_weight_layout(),
            "w8a8_weight_layout": int8_weight_layout("w8a8"),
            "f32_weight_layout": f32_weight_layout(), "error": _state["error"]}


@contextlib.contextmanager
def disabled():
    """Trace programs without the CPU kernels (jax.export: artifacts carry no custom call)."""
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


@contextlib.contextmanager
def layer_calls(one: bool):
    """Trace float32 decode layers as one decode_layer call each (one=True) or as their five
    separate calls (one=False: profiling splits their time into attention and MLP), whatever
    XLRT_DECODE_LAYER says."""
    token = _layer_kernel.set(bool(one))
    try:
        yield
    finally:
        _layer_kernel.reset(token)


def _mesh_active() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty


def use_int8_matmul(rows: int, k: int, transpose_w: bool = False) -> bool:
    """Whether a traced w8a8 matmul of `rows` x `k` (weights [N, K] with transpose_w) runs the
    kernel (see the module docstring): up to INT8_MAX_ROWS rows, INT8_NK_MAX_ROWS_AVX2 for
    [N, K] weights on an AVX2 build, INT8_MAX_ROWS_VNNI with VNNI."""
    if _disabled.get() or k > INT8_MAX_K or not _usable():
        return False
    if transpose_w and _state["simd"] == "avx2":
        return rows <= INT8_NK_MAX_ROWS_AVX2
    if _state["vnni"]:
        return rows <= INT8_MAX_ROWS_VNNI
    return rows <= INT8_MAX_ROWS


def use_weight_only_matmul(rows: int, dtype) -> bool:
    """Whether a traced weight-only int8 matmul with `rows` float rows of `dtype` runs the
    kernel: float32 activations, up to WEIGHT_ONLY_MAX_ROWS rows."""
    if _disabled.get() or rows > WEIGHT_ONLY_MAX_ROWS or jnp.dtype(dtype) != jnp.float32:
        return False
    return _usable()


def use_f32_gemv(rows: int, n: int, dtype) -> bool:
    """Whether a traced float32 matmul of `rows` rows into `n` outputs ([K, N] weights) runs the
    split-K kernel (see F32_GEMV_MAX_ROWS; elsewhere XLA's dot was as fast or faster)."""
    limit = F32_GEMV_MAX_N if rows <= 1 else F32_GEMV_WIDE_MAX_N
    if (_disabled.get() or rows > F32_GEMV_MAX_ROWS or n > limit
            or jnp.dtype(dtype) != jnp.float32 or not _usable()):
        return False
    return rows > 1 or _state["simd"] != "avx2"


def int8_weight_layout(quantization: str = "int8") -> str:
    """The layout the int8 decode kernels of `quantization` ("int8": weight-only, or "w8a8")
    stream fastest on this CPU: "nk" (each output channel's weights contiguous,
    model.decoder.Decoder(nk_weights=True)) for weight-only int8 wherever the kernels run (one
    weight row at a time at batch 1 and one decode_layer call per layer: 0.85x the [K, N] step at
    one row, 0.98-1.0x at 8 and 32; docs/PERFORMANCE.md, session 21) and for w8a8 without
    AVX-512 (on AVX2 the [K, N] column ranges read 1.4-1.8x slower at 1-16 rows); "kn" for w8a8
    with AVX-512 (1.05-1.07x faster than "nk" at 8 and 32 rows) or without the kernels (XLA's
    dot)."""
    if _state["lib"] is None:
        return "kn"
    if quantization == "w8a8" and _state["simd"] == "avx512":
        return "kn"
    return "nk"


def _vector_build() -> bool:
    """Whether the loaded library runs its AVX2 or AVX-512 paths (not the portable loops)."""
    return _state["lib"] is not None and _state["simd"] in ("avx2", "avx512")


def f32_weight_layout() -> str:
    """The layout float32 engines store their layer weights in on this CPU: "nk" (output
    channel first, model.decoder.Decoder(nk_weights=True)) with the AVX2 or AVX-512 kernels,
    which f32_matmul_nk streams faster at batch 1 than any [K, N] path and runs as fast at 8
    rows (docs/PERFORMANCE.md, sessions 13 and 17); "kn" without them (XLA's dot, or the
    portable loops)."""
    return "nk" if _vector_build() else "kn"


def use_f32_matmul_nk(rows: int, dtype) -> bool:
    """Whether a traced float32 matmul of `rows` rows against a [N, K] weight runs
    f32_matmul_nk: up to F32_NK_MAX_ROWS rows (decode batches), with the AVX2 or AVX-512
    kernels (the portable loops are slower than XLA's dot)."""
    if _disabled.get() or rows > F32_NK_MAX_ROWS or jnp.dtype(dtype) != jnp.float32:
        return False
    return _usable() and _vector_build()


def f32_matmul_nk(x, w, target: str = F32_MATMUL_NK_TARGET):
    """x float32 [M, K] @ w float32 [N, K]^T -> float32 [M, N], register-blocked dot products
    (csrc/f32_nk.cc), through the registered FFI `target`. Each output is summed in one fixed
    order, so a row gets the same bits in any batch."""
    if (x.dtype != jnp.float32 or w.dtype != jnp.float32 or x.ndim != 2 or w.ndim != 2
            or x.shape[1] != w.shape[1]):
        raise ValueError(f"f32_matmul_nk takes float32 x [M, K] and w [N, K], "
                         f"got {x.dtype}{list(x.shape)} and {w.dtype}{list(w.shape)}")
    return _f32_matmul(target, True, x, w)


# fused_matmul's prologues (csrc/parallel.h Prologue).
PROLOGUES = {None: 0, "rms_norm": 1, "silu_mul": 2}


def use_fused_matmul(rows: int, x_dtype, w_dtype, transpose_w: bool) -> bool:
    """Whether a traced decode matmul of `rows` rows of x_dtype against a w_dtype weight runs
    fused_matmul: float32 rows against a float32 [N, K] weight where f32_matmul_nk runs, or
    against an int8 one (weight-only) where weight_only_matmul runs."""
    if jnp.dtype(x_dtype) != jnp.float32:
        return False
    if jnp.dtype(w_dtype) == jnp.int8:
        return use_weight_only_matmul(rows, x_dtype)
    return transpose_w and use_f32_matmul_nk(rows, w_dtype)


def fused_matmul(x, w, transpose_w: bool, *, prologue=None, prologue_weight=None, eps=0.0,
                 col_scale=None, residual=None, suffix: str = ""):
    """[residual +] (prologue(x) @ w) [* col_scale] in one FFI call (call use_fused_matmul
    first): w float32 [N, K] (f32_matmul_nk, transpose_w=True) or int8 [K, N] / [N, K]
    (weight-only, float(w)). prologue: None; "rms_norm", x * rsqrt(mean(x^2) + eps) *
    prologue_weight [K]; or "silu_mul", x [M, 2K] = gate | up (each times its half of
    prologue_weight [2K] if given) -> silu(gate) * up. The products and sums of the epilogue
    round as the separate ops; the prologue's sums run in another order than XLA's (equal to
    rounding). `suffix`: that of the registered build to call (register)."""
    if prologue not in PROLOGUES:
        raise ValueError(f"fused_matmul: prologue {prologue!r} is not one of "
                         f"{', '.join(map(repr, PROLOGUES))}")
    int8 = w.dtype == jnp.int8
    if x.dtype != jnp.float32 or x.ndim != 2 or w.ndim != 2 or not (
            int8 or (w.dtype == jnp.float32 and transpose_w)):
        raise ValueError(f"fused_matmul takes float32 x [M, K] and a float32 w [N, K] "
                         f"(transpose_w) or an int8 w, got {x.dtype}{list(x.shape)} and "
                         f"{w.dtype}{list(w.shape)}")
    m = x.shape[0]
    k, n = (w.shape[1], w.shape[0]) if transpose_w else w.shape
    if x.shape[1] != (2 * k if prologue == "silu_mul" else k):
        raise ValueError(f"fused_matmul: x has {x.shape[1]} columns, w contracts {k}"
                         + (" (silu_mul takes gate | up, 2K columns)"
                            if prologue == "silu_mul" else ""))
    empty = jnp.zeros((0,), jnp.float32)

    def operand(a, shape, what):
        if a is None:
            return empty
        if a.shape != shape:
            raise ValueError(f"fused_matmul: {what} must be {list(shape)}, got {list(a.shape)}")
        return a.astype(jnp.float32)

    pw_shape = {"rms_norm": (k,), "silu_mul": (2 * k,), None: (0,)}[prologue]
    if prologue == "rms_norm" and prologue_weight is None:
        raise ValueError("fused_matmul: rms_norm needs prologue_weight (the norm's scale)")
    operands = (x, w, operand(prologue_weight, pw_shape, "prologue_weight"),
                operand(col_scale, (n,), "col_scale"), operand(residual, (m, n), "residual"))
    attrs = dict(prologue=np.int64(PROLOGUES[prologue]), eps=np.float32(eps))
    if int8:
        target, attrs["transpose_w"] = WEIGHT_ONLY_FUSED_TARGET, np.int64(bool(transpose_w))
    else:
        target = F32_MATMUL_NK_FUSED_TARGET
    call = jax.ffi.ffi_call(target + suffix, jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="sequential")
    return call(*operands, **attrs)


def use_f32_gemm(rows: int, dtype) -> bool:
    """Whether a traced float32 matmul of `rows` rows with [K, N] weights runs the
    register-blocked GEMM: F32_GEMM_MIN_ROWS to F32_GEMM_MAX_ROWS rows (batched decode)."""
    if (_disabled.get() or not F32_GEMM_MIN_ROWS <= rows <= F32_GEMM_MAX_ROWS
            or jnp.dtype(dtype) != jnp.float32):
        return False
    # Only with AVX-512: its portable loops ran 2-5x slower than XLA's dot, and its AVX2 path
    # 9% slower at 16 rows and even at 32 in a same-machine engine A/B (docs/PERFORMANCE.md).
    return _usable() and _state["simd"] == "avx512"


def f32_gemv(x, w, target: str = F32_GEMV_TARGET):
    """x float32 [M, K] @ w float32 [K, N] -> float32 [M, N] (M <= F32_GEMV_MAX_ROWS), summed
    over fixed blocks of K (csrc/f32_gemv.cc), through the registered FFI `target`."""
    if (x.dtype != jnp.float32 or w.dtype != jnp.float32 or x.ndim != 2 or w.ndim != 2
            or x.shape[1] != w.shape[0] or x.shape[0] > F32_GEMV_MAX_ROWS):
        raise ValueError(f"f32_gemv takes float32 x [M <= {F32_GEMV_MAX_ROWS}, K] and w [K, N], "
                         f"got {x.dtype}{list(x.shape)} and {w.dtype}{list(w.shape)}")
    return _f32_matmul(target, False, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _f32_matmul(target, transpose_w, x, w):
    """The float32 FFI matmul `target` (GEMV or GEMM), x [M, K] @ w [K, N] (or w [N, K]
    transposed)."""
    n = w.shape[0] if transpose_w else w.shape[1]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x, w)


def _f32_matmul_fwd(target, transpose_w, x, w):
    return _f32_matmul(target, transpose_w, x, w), (x, w)


def _f32_matmul_bwd(target, transpose_w, res, g):  # gradients through XLA's dots
    x, w = res
    return (g @ w, g.T @ x) if transpose_w else (g @ w.T, x.T @ g)


_f32_matmul.defvjp(_f32_matmul_fwd, _f32_matmul_bwd)


def f32_gemm(x, w, target: str = F32_GEMM_TARGET):
    """x float32 [M, K] @ w float32 [K, N] -> float32 [M, N], register-blocked
    (csrc/f32_gemm.cc), through the registered FFI `target`."""
    if (x.dtype != jnp.float32 or w.dtype != jnp.float32 or x.ndim != 2 or w.ndim != 2
            or x.shape[1] != w.shape[0]):
        raise ValueError(f"f32_gemm takes float32 x [M, K] and w [K, N], "
                         f"got {x.dtype}{list(x.shape)} and {w.dtype}{list(w.shape)}")
    return _f32_matmul(target, False, x, w)


def use_paged_attention(q, k_cache) -> bool:
    """Whether traced attention of queries q [B, T, N, H] against the paged cache k_cache runs
    the kernel: float32 queries, a float32 or int8 cache, at most ATTENTION_MAX_QUERY_LEN query
    tokens per sequence (longer prefill chunks are GEMMs that XLA runs well)."""
    if (_disabled.get() or q.ndim != 4 or q.shape[1] > ATTENTION_MAX_QUERY_LEN
            or jnp.dtype(q.dtype) != jnp.float32
            or jnp.dtype(k_cache.dtype) not in (jnp.float32, jnp.int8)):
        return False
    return _usable()


def paged_decode_attention_rope(qkv, cos, sin, k_cache, v_cache, layer, page_table, q_pos,
                                kv_lens, *, scale, sliding_window=None, logit_softcap=None,
                                k_scale=None, v_scale=None, target: str = ATTENTION_ROPE_TARGET):
    """Decode attention with the rotary embedding and the cache write folded in, in one FFI
    call (`target` + "_f32" or "_int8"). qkv [B, T, N + 2 KVH, H] holds each token's query
    heads, then its new key heads and value heads, unrotated (a fused q|k|v projection's
    output, reshaped); cos and sin [B, T, H / 2] (model.layers.rope_cos_sin) rotate the queries
    and keys; the rotated keys and the values are stored at positions q_pos of each sequence
    (those below kv_lens; an int8 cache quantizes them as model.kernels.quantize_int8 with its
    k_scale, v_scale), and the rotated queries attend as in paged_decode_attention, to the new
    tokens too. Returns (out [B, T, N, H], k_cache, v_cache, k_scale, v_scale): the caches
    updated in place (their operands are aliased to these results; donate them, as the decode
    step does)."""
    int8 = _int8_cache("paged_decode_attention_rope", k_cache, k_scale, v_scale)
    if (qkv.dtype != jnp.float32 or k_cache.dtype != v_cache.dtype
            or k_cache.dtype not in (jnp.float32, jnp.int8)):
        raise ValueError(f"paged_decode_attention_rope takes float32 qkv and k, v caches of one "
                         f"dtype, float32 or int8; got {qkv.dtype}, {k_cache.dtype} and "
                         f"{v_cache.dtype}")
    kv_heads = k_cache.shape[1]
    if qkv.ndim != 4 or qkv.shape[2] <= 2 * kv_heads:
        raise ValueError(f"paged_decode_attention_rope: qkv must be [B, T, N + 2 KVH, H] with "
                         f"N > 0 query heads and the cache's KVH = {kv_heads}, got "
                         f"{list(qkv.shape)}")
    b, t, heads, h = qkv.shape
    if int8 and (k_scale.dtype != jnp.float32 or v_scale.dtype != jnp.float32):
        raise ValueError(f"paged_decode_attention_rope: the int8 cache's scales must be float32 "
                         f"(they are updated in place), got {k_scale.dtype} and {v_scale.dtype}")
    return _cache_updating_call(
        target, jax.ShapeDtypeStruct((b, t, heads - 2 * kv_heads, h), jnp.float32),
        (qkv, cos.astype(jnp.float32), sin.astype(jnp.float32)),
        (k_cache, v_cache, k_scale, v_scale), (layer, page_table, q_pos, kv_lens),
        _attention_attrs(scale, sliding_window, logit_softcap))


def _cache_updating_call(target, out, head, caches, paging, attrs):
    """The FFI call `target` + "_int8" or "_f32" (the cache's dtype) on (*head, the cache
    buffers, the paging operands) with `attrs`, the cache buffers (k, v and an int8 cache's
    scales) aliased to the results after `out`, updated in place. caches: (k_cache, v_cache,
    k_scale, v_scale), the scales None for a float32 cache. Returns (out, k_cache, v_cache,
    k_scale, v_scale)."""
    k_cache, v_cache, k_scale, v_scale = caches
    int8 = k_scale is not None
    buffers = (k_cache, v_cache) + ((k_scale, v_scale) if int8 else ())
    call = jax.ffi.ffi_call(
        target + ("_int8" if int8 else "_f32"),
        (out, *(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in buffers)),
        vmap_method="sequential",
        input_output_aliases={len(head) + i: 1 + i for i in range(len(buffers))})
    result, *buffers = call(*head, *buffers, *_paging_operands(*paging), **attrs)
    return (result, *buffers) if int8 else (result, *buffers, None, None)


def use_decode_layer(rows: int, weight_dtype=jnp.float32) -> bool:
    """Whether a decode step of `rows` float32 rows (batch x query tokens) runs each decoder
    layer as one decode_layer call: with float32 [N, K] weights where the fused float32 matmuls
    run (use_f32_matmul_nk), with int8 [N, K] ones where the weight-only kernels run
    (use_weight_only_matmul); unless XLRT_DECODE_LAYER=0 or layer_calls(False) (read when a
    program is traced: the five-call path, for comparison)."""
    one = _layer_kernel.get()
    if not (os.environ.get("XLRT_DECODE_LAYER", "1") != "0" if one is None else one):
        return False
    if jnp.dtype(weight_dtype) == jnp.int8:
        return use_weight_only_matmul(rows, jnp.float32)
    return use_f32_matmul_nk(rows, jnp.float32)


def decode_layer(x, attn_norm, w_qkv, w_o, mlp_norm, w_gate_up, w_down, cos, sin, k_cache,
                 v_cache, layer, page_table, q_pos, kv_lens, *, eps, scale, sliding_window=None,
                 logit_softcap=None, k_scale=None, v_scale=None, w_scales=None,
                 target: str = DECODE_LAYER_TARGET):
    """One decoder layer (model.layers.Block with fused projections and [N, K] weights) for x
    [B * T, D], T query tokens of each of page_table's B sequences, in one FFI call (`target` +
    "_f32" or "_int8", the cache's dtype; csrc/decode_layer.cc):

        x1 = x + attention(rope(rms_norm(x, attn_norm) @ w_qkv^T)) @ w_o^T
        out = x1 + (silu(gate) * up) @ w_down^T,  gate | up = rms_norm(x1, mlp_norm) @ w_gate_up^T

    w_qkv [(N + 2 KVH) H, D] (query heads, then key heads, then value heads), w_o [D, N H],
    w_gate_up [2 F, D], w_down [D, F], all float32 or all int8 (weight-only); int8 weights take
    w_scales = (s_qkv, s_o, s_gate_up, s_down), their per-output-channel scales, applied as
    model.layers.Attention and MLP apply them (q|k|v and the output projection scaled after the
    matmul, gate|up within silu(gate) * up, down after). cos, sin [B, T, H / 2]
    (model.layers.rope_cos_sin). The new keys and values are written at q_pos as
    paged_decode_attention_rope writes them, and the attention is that kernel's. Returns (out
    [B * T, D], k_cache, v_cache, k_scale, v_scale), the caches updated in place (aliased;
    donate them). The bits are those of the five fused calls the layer otherwise makes."""
    int8 = _int8_cache("decode_layer", k_cache, k_scale, v_scale)
    projections = dict(w_qkv=w_qkv, w_o=w_o, w_gate_up=w_gate_up, w_down=w_down)
    rows = dict(x=x, attn_norm=attn_norm, mlp_norm=mlp_norm, cos=cos, sin=sin)
    int8_weights = w_qkv.dtype == jnp.int8
    want = jnp.int8 if int8_weights else jnp.float32
    bad = {n: a for n, a in rows.items() if a.dtype != jnp.float32}
    bad.update({n: a for n, a in projections.items() if a.dtype != want})
    if bad:
        raise ValueError("decode_layer takes float32 activations and weights all float32 or all "
                         "int8, got " + ", ".join(f"{n} {a.dtype}" for n, a in bad.items()))
    if int8_weights:
        if w_scales is None or len(w_scales) != 4:
            raise ValueError("decode_layer: int8 weights need w_scales = (s_qkv, s_o, s_gate_up, "
                             "s_down)")
        shapes = ((w_qkv.shape[0],), (w_o.shape[0],), (w_gate_up.shape[0],), (w_down.shape[0],))
        got = [tuple(s.shape) for s in w_scales]
        if got != list(shapes) or any(s.dtype != jnp.float32 for s in w_scales):
            raise ValueError(f"decode_layer: w_scales must be float32 of shapes {list(shapes)} "
                             f"(one per output channel), got "
                             f"{[f'{s.dtype}{list(s.shape)}' for s in w_scales]}")
        scales = tuple(w_scales)
    elif w_scales is not None:
        raise ValueError("decode_layer: w_scales go with int8 weights; these are float32")
    else:
        scales = (jnp.zeros((0,), jnp.float32),) * 4  # float32 weights: no scales
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (jnp.float32, jnp.int8):
        raise ValueError(f"decode_layer takes k, v caches of one dtype, float32 or int8; got "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    if int8 and (k_scale.dtype != jnp.float32 or v_scale.dtype != jnp.float32):
        raise ValueError(f"decode_layer: the int8 cache's scales must be float32 (they are "
                         f"updated in place), got {k_scale.dtype} and {v_scale.dtype}")
    if x.ndim != 2 or k_cache.ndim != 5:
        raise ValueError(f"decode_layer takes x [B * T, D] and caches [L, KVH, P, PS, H], got "
                         f"x {list(x.shape)} and k_cache {list(k_cache.shape)}")
    head = (x, attn_norm, w_qkv, w_o, mlp_norm, w_gate_up, w_down, *scales, cos, sin)
    return _cache_updating_call(
        target, jax.ShapeDtypeStruct(x.shape, jnp.float32), head,
        (k_cache, v_cache, k_scale, v_scale), (layer, page_table, q_pos, kv_lens),
        dict(eps=np.float32(eps), **_attention_attrs(scale, sliding_window, logit_softcap)))


def _usable() -> bool:
    if jax.default_backend() != "cpu" or _mesh_active():
        return False
    return load()


def _ffi_matmul(target, x, w, transpose_w, x_dtype, out_dtype, what, extra=()):
    """Checks x [M, K] and w [K, N] (or [N, K]) and calls the FFI matmul `target` on x, w and
    `extra` operands."""
    if x.dtype != x_dtype or w.dtype != jnp.int8 or x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"{what} takes 2-D {jnp.dtype(x_dtype).name} x and int8 w, got "
                         f"{x.dtype}{list(x.shape)} and {w.dtype}{list(w.shape)}")
    m, k = x.shape
    kw, n = (w.shape[1], w.shape[0]) if transpose_w else w.shape
    if kw != k:
        raise ValueError(f"{what}: x has {k} columns but w contracts {kw}")
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), out_dtype),
                            vmap_method="sequential")
    return call(x, w, *extra, transpose_w=np.int64(bool(transpose_w)))


def int8_matmul(xq, w, transpose_w: bool = False, target: str = TARGET):
    """xq int8 [M, K] @ w int8 [K, N] (or [N, K] with transpose_w) -> int32 [M, N], through
    the registered FFI `target` (call use_int8_matmul or load first)."""
    return _ffi_matmul(target, xq, w, transpose_w, jnp.int8, jnp.int32, "int8_matmul")


def w8a8_matmul(x, w, transpose_w: bool = False, target: str = W8A8_TARGET, *,
                col_scale=None):
    """x float32 [M, K], each row quantized to int8 as model.layers.int8_rows does, @ w int8
    [K, N] (or [N, K] with transpose_w), times the row's scale -> float32 [M, N]: the bits of
    int8_rows, int8_matmul and the rescale as XLA ops, in one FFI call (`target`). The weight's
    scale is the caller's, or with col_scale (float32 [N]) applied here, after the row's, with
    the bits of a separate `y * col_scale`."""
    n = w.shape[0] if transpose_w else w.shape[-1]
    if col_scale is None:
        col_scale = jnp.ones((n,), jnp.float32)  # y * 1.0 is y, bit for bit
    elif col_scale.shape != (n,) or col_scale.dtype != jnp.float32:
        raise ValueError(f"w8a8_matmul: col_scale must be float32 [{n}] (one per output column), "
                         f"got {col_scale.dtype}{list(col_scale.shape)}")
    return _ffi_matmul(target, x, w, transpose_w, jnp.float32, jnp.float32, "w8a8_matmul",
                       (col_scale,))


def weight_only_matmul(x, w, transpose_w: bool = False, target: str = WEIGHT_ONLY_TARGET):
    """x float32 [M, K] @ float(w), w int8 [K, N] (or [N, K] with transpose_w) -> float32 [M, N]
    (the weight's scale is the caller's), through the registered FFI `target`."""
    return _ffi_matmul(target, x, w, transpose_w, jnp.float32, jnp.float32,
                       "weight_only_matmul")


def paged_decode_attention(q, k_cache, v_cache, layer, page_table, q_pos, kv_lens, *, scale,
                           sliding_window=None, logit_softcap=None, k_scale=None, v_scale=None,
                           target: str = ATTENTION_TARGET):
    """softmax(scale q k^T) v of q float32 [B, T, N, H] against one layer of the paged cache
    (layout and masking as model.kernels.paged_attention) -> float32 [B, T, N, H], through the
    registered FFI `target` + "_f32" (float32 cache) or "_int8" (int8 cache with k_scale,
    v_scale [layers, kv_heads, num_pages, 1, page_size])."""
    int8 = _int8_cache("paged_decode_attention", k_cache, k_scale, v_scale)
    if q.dtype != jnp.float32 or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"paged_decode_attention takes float32 q and k, v caches of one dtype, "
                         f"got {q.dtype}, {k_cache.dtype} and {v_cache.dtype}")
    scales = (k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)) if int8 else ()
    call = jax.ffi.ffi_call(target + ("_int8" if int8 else "_f32"),
                            jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q, k_cache, v_cache, *scales,
                *_paging_operands(layer, page_table, q_pos, kv_lens),
                **_attention_attrs(scale, sliding_window, logit_softcap))


def _int8_cache(name: str, k_cache, k_scale, v_scale) -> bool:
    """Whether the cache is int8; it then needs k_scale and v_scale, a float32 one neither."""
    int8 = jnp.dtype(k_cache.dtype) == jnp.int8
    if int8 != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError(f"{name}: an int8 cache needs k_scale and v_scale, a float32 cache "
                         "neither")
    return int8


def _paging_operands(layer, page_table, q_pos, kv_lens):
    """The attention entries' operands after the caches, as int32."""
    return (jnp.asarray(layer, jnp.int32), page_table.astype(jnp.int32), q_pos.astype(jnp.int32),
            kv_lens.astype(jnp.int32))


def _attention_attrs(scale, sliding_window, logit_softcap) -> dict:
    """The attention entries' attributes (0: no softcap, no window)."""
    return dict(scale=np.float32(scale), softcap=np.float32(logit_softcap or 0.0),
                window=np.int64(sliding_window or 0))
