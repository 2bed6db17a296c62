"""CPU kernels compiled on first use and called from XLA programs through the FFI.

Two decode matmuls with int8 weights (csrc/int8_matmul.cc):
- `int8_matmul(xq, w)` (w8a8): int8 x int8 -> int32, bit-identical to XLA's dot (integer sums
  are exact), reading each weight byte once for all rows with AVX-512 VNNI where the CPU has it.
  XLA:CPU's generic int8 GEMM streams weights at a third of the memory bandwidth for one or two
  rows.
- `weight_only_matmul(x, w)` (weight-only int8): float32 x int8 -> float32, the weight widened
  in registers. XLA converts the whole weight to float in memory first.
docs/PERFORMANCE.md has the numbers.

The source is compiled with the system C++ compiler (`$CXX`, else `c++`) for this CPU
(`-march=native`) into a cache directory (`$XLRT_KERNEL_CACHE`, else ~/.cache/xlrt/kernels),
keyed by the source, the compiler, the flags, jaxlib and the CPU's feature flags; later
processes load the cached library. Without a compiler, or if the build fails, the model keeps
XLA's dot and one warning says why. `XLRT_CPU_KERNELS=0` turns the kernels off.

Whether a matmul uses a kernel is decided when its program is traced (`use_int8_matmul`,
`use_weight_only_matmul`): only on the CPU backend, without a mesh (a custom call is not
partitioned: sharded weights keep XLA's dot), outside `disabled()` (jax.export uses it, so
exported programs carry no custom call), and for at most INT8_MAX_ROWS / WEIGHT_ONLY_MAX_ROWS
rows; longer matmuls (prefill) are compute-bound GEMMs that XLA already runs well.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
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

SOURCE = Path(__file__).with_name("csrc") / "int8_matmul.cc"
TARGET = "xlrt_int8_matmul"  # int8 x int8 -> int32 (w8a8)
WEIGHT_ONLY_TARGET = "xlrt_f32_int8_matmul"  # float32 x int8 -> float32 (weight-only int8)
# Rows (batch x query tokens) up to which the kernel replaces XLA's dot: decode batches. Past
# this, XLA's GEMM re-uses each weight load across enough rows (measured crossover in
# docs/PERFORMANCE.md).
INT8_MAX_ROWS = 2
# Weight-only int8 (float32 rows times int8 weights): up to this many rows per matmul.
WEIGHT_ONLY_MAX_ROWS = 32
# int32 accumulation of (x + 128) * w stays exact up to K = 2**31 / (255 * 128).
INT8_MAX_K = 65536

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "error": None, "vnni": False}
_disabled = contextvars.ContextVar("xlrt_cpu_kernels_disabled", default=False)


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
        SOURCE.read_text(), compiler, version, " ".join(flags), jax.__version__,
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
        cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp_out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n"
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
            _state["lib"] = lib
        except Exception as e:  # any failure leaves XLA's dot in place
            _state["error"] = str(e)
            log.warning("xlrt CPU kernels unavailable, using XLA's int8 dot: %s", e)
            return False
        return True


def register(suffix: str = "", defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build the library with `defines` and register its matmuls as the FFI targets TARGET and
    WEIGHT_ONLY_TARGET, each followed by `suffix`."""
    lib = ctypes.cdll.LoadLibrary(str(build(defines)))
    jax.ffi.register_ffi_target(TARGET + suffix, jax.ffi.pycapsule(lib.XlrtInt8Matmul),
                                platform="cpu")
    jax.ffi.register_ffi_target(WEIGHT_ONLY_TARGET + suffix,
                                jax.ffi.pycapsule(lib.XlrtF32Int8Matmul), platform="cpu")
    return lib


def status() -> dict:
    """Whether the kernels loaded in this process, with VNNI, or why not (tests, bug reports)."""
    return {"loaded": _state["lib"] is not None, "vnni": _state["vnni"], "error": _state["error"]}


@contextlib.contextmanager
def disabled():
    """Trace programs without the CPU kernels (jax.export: artifacts carry no custom call)."""
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


def _mesh_active() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty


def use_int8_matmul(rows: int, k: int) -> bool:
    """Whether a traced w8a8 matmul of `rows` x `k` runs the kernel (see the module docstring)."""
    if _disabled.get() or rows > INT8_MAX_ROWS or k > INT8_MAX_K:
        return False
    return _usable()


def use_weight_only_matmul(rows: int, dtype) -> bool:
    """Whether a traced weight-only int8 matmul with `rows` float rows of `dtype` runs the
    kernel: float32 activations, up to WEIGHT_ONLY_MAX_ROWS rows."""
    if _disabled.get() or rows > WEIGHT_ONLY_MAX_ROWS or jnp.dtype(dtype) != jnp.float32:
        return False
    return _usable()


def _usable() -> bool:
    if jax.default_backend() != "cpu" or _mesh_active():
        return False
    return load()


def _ffi_matmul(target, x, w, transpose_w, x_dtype, out_dtype, what):
    """Checks x [M, K] and w [K, N] (or [N, K]) and calls the FFI matmul `target`."""
    if x.dtype != x_dtype or w.dtype != jnp.int8 or x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"{what} takes 2-D {jnp.dtype(x_dtype).name} x and int8 w, got "
                         f"{x.dtype}{list(x.shape)} and {w.dtype}{list(w.shape)}")
    m, k = x.shape
    kw, n = (w.shape[1], w.shape[0]) if transpose_w else w.shape
    if kw != k:
        raise ValueError(f"{what}: x has {k} columns but w contracts {kw}")
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), out_dtype),
                            vmap_method="sequential")
    return call(x, w, transpose_w=np.int64(bool(transpose_w)))


def int8_matmul(xq, w, transpose_w: bool = False, target: str = TARGET):
    """xq int8 [M, K] @ w int8 [K, N] (or [N, K] with transpose_w) -> int32 [M, N], through
    the registered FFI `target` (call use_int8_matmul or load first)."""
    return _ffi_matmul(target, xq, w, transpose_w, jnp.int8, jnp.int32, "int8_matmul")


def weight_only_matmul(x, w, transpose_w: bool = False, target: str = WEIGHT_ONLY_TARGET):
    """x float32 [M, K] @ float(w), w int8 [K, N] (or [N, K] with transpose_w) -> float32 [M, N]
    (the weight's scale is the caller's), through the registered FFI `target`."""
    return _ffi_matmul(target, x, w, transpose_w, jnp.float32, jnp.float32,
                       "weight_only_matmul")
