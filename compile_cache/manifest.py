"""Compile manifests: a JSON record of what was compiled, for what, and how long it took.

    {"format": "xlrt-compile-manifest", "version": 1, "created": ..., "jax": ..., "jaxlib": ...,
     "backend": "cpu", "devices": [...], "plan_digest": ..., "fingerprint": {...model config
     hash, engine settings...}, "shared_inputs": {"params": [...]}, "programs": [{"key",
     "inputs", "compile_seconds", "source", "cache_hit", ...}], "totals": {...}}
"""

from __future__ import annotations

import json
import os
import time

import jax

from compile_cache.aot import CompileResult
from compile_cache.plan import CompilePlan, describe_args

MANIFEST_FORMAT = "xlrt-compile-manifest"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_PROGRAM_FIELDS = ("key", "inputs", "compile_seconds", "source", "cache_hit")


def versions() -> dict:
    import jaxlib
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


def build_manifest(plan: CompilePlan, result: CompileResult, *, backend: str | None = None,
                   devices: list | None = None, extra: dict | None = None) -> dict:
    """The manifest of a compiled plan (backend/devices default to the local ones)."""
    devs = devices if devices is not None else jax.devices()
    by_source: dict[str, int] = {}
    for r in result.records:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **versions(),
        "backend": backend or jax.default_backend(),
        "devices": sorted({getattr(d, "device_kind", str(d)) for d in devs}),
        "num_devices": len(devs),
        "plan_digest": plan.digest(),
        "fingerprint": plan.fingerprint,
        "shared_inputs": {name: describe_args(tree) for name, tree in plan.shared_args.items()},
        "programs": result.records,
        "totals": {"programs": len(result.records), "seconds": round(result.seconds, 3),
                   "by_source": by_source},
    }
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(manifest: dict, directory: str, name: str = MANIFEST_NAME) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def read_manifest(path: str) -> dict:
    """Load and check a manifest (ValueError names what is missing)."""
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an xlrt compile manifest")
    for i, program in enumerate(manifest.get("programs", [])):
        missing = [k for k in REQUIRED_PROGRAM_FIELDS if k not in program]
        if missing:
            raise ValueError(f"{path}: program {i} lacks {missing}")
    return manifest
