"""Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics).

    python scripts/serve.py --model smollm2-135m-instruct --port 8000
    python scripts/serve.py --model /path/to/model.gguf --api-key sekrit --max-num-seqs 32
    python scripts/serve.py --model /tmp/smollm2-art     # an artifact from scripts/export.py

An artifact directory (one with manifest.json) is served by serving.artifact_engine without
importing model/: its dtype, attention, cache size and buckets were fixed at export, so the flags
that set them must stay at their defaults.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving import cli  # noqa: E402


# Flags an artifact cannot honour (fixed at export) and their defaults.
MODEL_ONLY_FLAGS = {"dtype": "float32", "attention": "auto", "mesh": None, "rules": None,
                    "quantization": None, "kv_cache_gb": 1.0, "kv_cache_dtype": "auto",
                    "decode_steps": 8}


def load_artifact_engine(args):
    """An ArtifactEngine for --model ARTIFACT_DIR; CLIError for flags fixed at export."""
    from serving.artifact import ArtifactError
    from serving.artifact_engine import ArtifactEngine
    set_flags = [f"--{k.replace('_', '-')}" for k, default in MODEL_ONLY_FLAGS.items()
                 if getattr(args, k, default) != default]
    if set_flags:
        raise cli.CLIError(f"{', '.join(set_flags)} cannot apply to an artifact ({args.model}): "
                           "dtype, attention, cache size and decode steps were fixed by "
                           "scripts/export.py; drop the flags or re-export")
    try:
        engine = ArtifactEngine.load(args.model, max_num_seqs=args.max_num_seqs,
                                     max_waiting=args.max_waiting, max_seq_len=args.max_model_len,
                                     enable_prefix_caching=args.enable_prefix_caching)
        if args.warmup:
            n = engine.warmup()
            logging.getLogger("xlrt.serve").info("warm-up done: %s programs", n)
    except ArtifactError as e:
        raise cli.CLIError(str(e)) from None
    return engine


def main(args) -> int:
    from compile_cache import configure_cache
    from serving.server import create_app, serve

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.port < 0 or args.port > 65535:
        raise cli.CLIError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_num_seqs", "max_waiting", "kv_cache_gb", "max_body_bytes"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise cli.CLIError(f"--{flag.replace('_', '-')} must be positive, "
                               f"got {getattr(args, flag)}")
    configure_cache(args.compile_cache)
    name = args.served_model_name or os.path.splitext(os.path.basename(args.model.rstrip("/")))[0]
    if os.path.isfile(os.path.join(args.model, "manifest.json")):
        engine = load_artifact_engine(args)
        a = engine.artifact
        print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (artifact {args.model}: "
              f"{a.manifest['model']} {engine.dtype_name} on {a.platform}, max_model_len "
              f"{engine.max_seq_len}, max_num_seqs {engine.max_num_seqs}, "
              f"{engine.allocator.capacity} KV pages)", file=sys.stderr, flush=True)
        print(f"playground: http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
        serve(create_app(engine, model_name=name, api_key=args.api_key,
                         max_body_bytes=args.max_body_bytes),
              host=args.host, port=args.port, log_level=args.log_level)
        return 0
    from serving import Engine
    from sharding import make_mesh
    mesh = make_mesh(args.mesh) if args.mesh else None
    engine = Engine.from_pretrained(
        args.model, dtype=args.dtype, attention=args.attention, mesh=mesh, rules=args.rules,
        max_seq_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
        max_num_seqs=args.max_num_seqs or 32, max_waiting=args.max_waiting,
        decode_steps=args.decode_steps, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=args.enable_prefix_caching,
        progress=True)
    if args.warmup:
        manifest = engine.warmup(progress=True)
        logging.getLogger("xlrt.serve").info("warm-up done: %s programs",
                                             len(manifest["programs"]))
    app = create_app(engine, model_name=name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"(max_model_len {engine.max_seq_len}, {engine.allocator.capacity} KV pages)",
          file=sys.stderr, flush=True)
    print(f"playground: http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    p = cli.parser(__doc__.strip().splitlines()[0])
    cli.add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=os.environ.get("XLRT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $XLRT_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the --model name without path)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="running sequences at most (default: 32; for an artifact, its largest "
                        "batch bucket)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="queued requests at most; beyond it requests get 429 + Retry-After")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit in tokens (default: the model's)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache budget in GB")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per device call")
    p.add_argument("--quantization", default=None, choices=["int8", "w8a8"],
                   help="int8: weight-only int8; w8a8: int8 weights and int8 activations "
                        "(int8 x int8 matmuls)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="KV cache storage: auto (the compute dtype) or int8 (per-token scales)")
    cli.add_prefix_caching_flag(p)
    p.add_argument("--warmup", action="store_true",
                   help="compile every serving program before accepting traffic")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="largest request body accepted (larger ones get a 400)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    cli.run(main, p.parse_args())
