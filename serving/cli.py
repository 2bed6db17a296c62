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


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug."""
    from model.checkpoint import WeightsError
    from model.config import ConfigError
    from serving.engine import RequestError
    from serving.sampling import SamplingError
    from sharding.mesh import MeshError
    errors = [CLIError, WeightsError, ConfigError, RequestError, SamplingError, MeshError,
              FileNotFoundError]
    try:
        from model.tokenizer import TokenizerError
        errors.append(TokenizerError)
    except ImportError:
        pass
    return tuple(errors)


def run(main: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> None:
    """Call main(args) and exit with a code scripts can rely on."""
    try:
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
