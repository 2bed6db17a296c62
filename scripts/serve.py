"""Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics).

    python scripts/serve.py --model smollm2-135m-instruct --port 8000
    python scripts/serve.py --model /path/to/model.gguf --api-key sekrit --max-num-seqs 32
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving import cli  # noqa: E402


def main(args) -> int:
    from compile_cache import configure_cache
    from serving import Engine
    from serving.server import create_app, serve
    from sharding import make_mesh

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.port < 0 or args.port > 65535:
        raise cli.CLIError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_num_seqs", "max_waiting", "kv_cache_gb", "max_body_bytes"):
        if getattr(args, flag) <= 0:
            raise cli.CLIError(f"--{flag.replace('_', '-')} must be positive, "
                               f"got {getattr(args, flag)}")
    configure_cache(args.compile_cache)
    mesh = make_mesh(args.mesh) if args.mesh else None
    engine = Engine.from_pretrained(
        args.model, dtype=args.dtype, attention=args.attention, mesh=mesh, rules=args.rules,
        max_seq_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
        max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
        decode_steps=args.decode_steps, quantization=args.quantization, progress=True)
    if args.warmup:
        manifest = engine.warmup(progress=True)
        logging.getLogger("xlrt.serve").info("warm-up done: %s programs",
                                             len(manifest["programs"]))
    name = args.served_model_name or os.path.splitext(os.path.basename(args.model.rstrip("/")))[0]
    app = create_app(engine, model_name=name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"(max_model_len {engine.max_seq_len}, {engine.allocator.capacity} KV pages)",
          file=sys.stderr, flush=True)
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
    p.add_argument("--max-num-seqs", type=int, default=32, help="running sequences at most")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="queued requests at most; beyond it requests get 429 + Retry-After")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit in tokens (default: the model's)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache budget in GB")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per device call")
    p.add_argument("--quantization", default=None, choices=["int8"],
                   help="weight-only int8 quantization")
    p.add_argument("--warmup", action="store_true",
                   help="compile every serving program before accepting traffic")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="largest request body accepted (larger ones get a 400)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    cli.run(main, p.parse_args())
