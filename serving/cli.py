"""Shared command-line plumbing for scripts/: common flags, clear errors, exit codes.

Exit codes: 0 success, 1 unexpected internal error, 2 bad input (flags, files, requests),
130 interrupted. Without --debug a known error prints one line, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """A bad argument or input detected by a script; printed as one line, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help text does not already say it and there is a
    default worth showing (not None or a False flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="known model name, path to a .gguf file, or a Hugging Face directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight and compute dtype")
    p.add_argument("--attention", default="auto",
                   choices=["auto", "xla", "pallas", "pallas_interpret"],
                   help="attention backend (auto: Pallas on GPU/TPU, XLA on CPU)")
    p.add_argument("--mesh", default=None,
                   help='device mesh, e.g. "data=2,tensor=4" (default: one device)')
    p.add_argument("--rules", default=None,
                   help="sharding rule preset: dp, fsdp, tp, fsdp_tp (default: fsdp_tp)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache directory")
    from sharding.distributed import add_flags
    add_flags(p)  # --coordinator-address, --num-processes, --process-id, --distributed


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Serving-engine capacity flags shared by decode, serve and the benchmarks."""
    p.add_argument("--kv-cache-gb", type=float, default=1.0,
                   help="KV cache memory budget in GiB (sets the page count)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV cache pages (overrides --kv-cache-gb)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--max-num-seqs", type=int, default=32,
                   help="sequences decoded together at most (largest decode batch)")
    p.add_argument("--quantization", default=None, choices=["int8", "w8a8"],
                   help="int8: weight-only int8 (per-channel scales); w8a8: int8 weights and int8 "
                        "activations (per-row scales), int8 x int8 matmuls (default: none)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="KV cache storage: auto (the compute dtype) or int8 (a float32 scale "
                        "per token and kv head; ~3.5-4x the pages of float32 per GiB)")
    add_prefix_caching_flag(p)
    add_weight_layout_flags(p)


def add_prefix_caching_flag(p: argparse.ArgumentParser) -> None:
    """--enable-prefix-caching / --no-enable-prefix-caching (Engine enable_prefix_caching)."""
    p.add_argument("--enable-prefix-caching", default=True, action=argparse.BooleanOptionalAction,
                   help="reuse the KV cache pages of prompt prefixes computed before (requests "
                        "sharing a system prompt, multi-turn chats, retries) instead of "
                        "prefilling them again")


def add_weight_layout_flags(p: argparse.ArgumentParser) -> None:
    """--int8-weight-layout and --f32-weight-layout (Engine int8_weight_layout and
    f32_weight_layout; read back by int8_weight_layout() and f32_weight_layout())."""
    p.add_argument("--int8-weight-layout", default="auto", choices=["auto", "kn", "nk"],
                   help="with --quantization: int8 weights stored [K, N] (kn) or output channel "
                        "first, [N, K] (nk); auto: what this CPU's kernels read fastest (nk "
                        "for weight-only int8; for w8a8, nk without AVX-512)")
    p.add_argument("--f32-weight-layout", default="auto", choices=["auto", "kn", "nk"],
                   help="float32 models (no --quantization): weights stored [K, N] (kn) or output "
                        "channel first, [N, K] (nk); auto: what this CPU's kernels read fastest "
                        "(nk with the AVX2 or AVX-512 kernels)")


def int8_weight_layout(args: argparse.Namespace) -> str | None:
    """Engine's int8_weight_layout from --int8-weight-layout (None for auto)."""
    return None if args.int8_weight_layout == "auto" else args.int8_weight_layout


def f32_weight_layout(args: argparse.Namespace) -> str | None:
    """Engine's f32_weight_layout from --f32-weight-layout (None for auto)."""
    return None if args.f32_weight_layout == "auto" else args.f32_weight_layout


def engine_kwargs(args: argparse.Namespace) -> dict:
    """Engine.from_pretrained keyword arguments from add_model_flags/add_engine_flags flags."""
    kwargs = dict(dtype=args.dtype, attention=args.attention, rules=args.rules)
    for name in ("kv_cache_gb", "num_pages", "page_size", "max_num_seqs", "quantization",
                 "kv_cache_dtype", "enable_prefix_caching"):
        if hasattr(args, name):
            kwargs[name] = getattr(args, name)
    if hasattr(args, "int8_weight_layout"):
        kwargs["int8_weight_layout"] = int8_weight_layout(args)
    if hasattr(args, "f32_weight_layout"):
        kwargs["f32_weight_layout"] = f32_weight_layout(args)
    if getattr(args, "kv_cache_gb", 1.0) is not None and args.kv_cache_gb <= 0:
        raise CLIError(f"--kv-cache-gb must be > 0, got {args.kv_cache_gb}")
    return kwargs


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug."""
    from model.checkpoint import WeightsError
    from model.config import ConfigError
    from serving.engine import RequestError
    from serving.sampling import SamplingError
    from sharding.distributed import DistributedError
    from sharding.mesh import MeshError
    from sharding.rules import ShardingError
    errors = [CLIError, WeightsError, ConfigError, RequestError, SamplingError, MeshError,
              ShardingError, DistributedError, FileNotFoundError]
    try:
        from model.tokenizer import TokenizerError
        errors.append(TokenizerError)
    except ImportError:
        pass
    return tuple(errors)


def run(main: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> None:
    """Call main(args) and exit with a code scripts can rely on."""
    try:
        if hasattr(args, "distributed"):  # scripts with add_model_flags join a multi-process job
            from sharding.distributed import initialize_from_args
            initialize_from_args(args)
        code = main(args) or EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as e:  # boundary: turn known errors into one line
        if getattr(args, "debug", False):
            raise
        if isinstance(e, user_errors()):
            print(f"error: {e}", file=sys.stderr)
            code = EXIT_USAGE
        else:
            print(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
                  file=sys.stderr)
            code = EXIT_INTERNAL
    sys.exit(code)
