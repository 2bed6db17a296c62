"""Decode a prompt with a model, streaming tokens to the terminal; ends with TTFT and ms/token.

    python scripts/decode.py --prompt "The capital of France is"
    python scripts/decode.py --chat --prompt "What is 2+2?" --json
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving import cli  # noqa: E402


def main(args) -> int:
    from compile_cache import configure_cache
    from serving import Engine
    from sharding import make_mesh

    configure_cache(args.compile_cache)
    mesh = make_mesh(args.mesh) if args.mesh else None
    t0 = time.perf_counter()
    eng = Engine.from_pretrained(args.model, mesh=mesh, progress=not args.json,
                                 **cli.engine_kwargs(args))
    load_s = time.perf_counter() - t0
    prompt = args.prompt
    if args.chat:
        prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                  stop=args.stop or None)
    warmup_s = 0.0
    if not args.no_warmup:  # compile this request's programs first: the figures are steady state
        t0 = time.perf_counter()
        eng.generate(prompt, **kwargs)
        warmup_s = time.perf_counter() - t0
    start = time.perf_counter()
    first_at, tokens, text, finish = None, [], "", None
    for chunk in eng.stream(prompt, **kwargs):
        if chunk.token_ids and first_at is None:
            first_at = time.perf_counter()
        tokens += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason or finish
        if not args.json:
            print(chunk.text, end="", flush=True)
    end = time.perf_counter()
    ttft = (first_at or end) - start
    per_token_ms = 1000 * (end - (first_at or end)) / max(1, len(tokens) - 1)
    result = {"model": args.model, "text": text, "token_ids": tokens, "finish_reason": finish,
              "num_tokens": len(tokens), "ttft_s": round(ttft, 4),
              "ms_per_token": round(per_token_ms, 2), "load_s": round(load_s, 2),
              "warmup_s": round(warmup_s, 2)}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        compiled = ("includes compilation" if args.no_warmup
                    else f"after a {warmup_s:.1f} s warm-up run that compiled the programs")
        print(f"\n\n[{len(tokens)} tokens, finish: {finish}; TTFT {ttft * 1000:.0f} ms, "
              f"{per_token_ms:.1f} ms/token ({compiled})]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("--prompt", required=True, help="text to complete (or the user message with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up run (TTFT and ms/token then include compilation)")
    cli.add_model_flags(p)
    cli.add_engine_flags(p)
    cli.run(main, p.parse_args())
