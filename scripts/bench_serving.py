"""Serving benchmark against any OpenAI-compatible server (vLLM's metric definitions); JSON out.

    python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 --max-concurrency 32 \\
        --num-requests 200 --input-len 128 --output-len 128
    python scripts/bench_serving.py --base-url ... --request-rate 8      # Poisson arrivals
    python scripts/bench_serving.py --base-url ... --soak                # 500 requests at 32

Every request streams (`stream_options.include_usage`) with temperature 0, a fixed output length
(`max_tokens` + `ignore_eos`) and a prompt of --input-len tokens (uniform within
+-random-range-ratio), made of random vocabulary tokens of --tokenizer. Client-side metrics:
TTFT = first content chunk - send; ITL = gaps between content chunks; E2EL = last content chunk -
send; TPOT = (E2EL - TTFT) / (output tokens - 1). Arrivals: all at once (request rate inf) or
gamma-distributed gaps (shape = burstiness, scale = 1 / (rate * burstiness); burstiness 1 =
Poisson), optionally capped at --max-concurrency in flight.

--soak: the given load (defaults 500 requests at concurrency 32), then checks: 0 errors, the
server's `xlrt:kv_pages_in_use` back to 0, and its resident memory (`process_resident_memory_bytes`)
stable from the first fifth of the run to the end (within --rss-tolerance-mb). Exit code 1 when
a check fails.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving import cli  # noqa: E402


# ==================================================================== prompts
def make_prompts(tokenizer, n: int, input_len: int, ratio: float, seed: int,
                 as_ids: bool, prefix_len: int = 0, prefix_seed: int = 0) -> list:
    """n prompts of about input_len tokens (uniform in [len*(1-ratio), len*(1+ratio)]): random
    ordinary vocabulary tokens; as text (decoded) or as token ids. With prefix_len, every prompt
    starts with the same prefix_len random tokens (drawn from prefix_seed), like a shared system
    prompt, followed by its own input_len tokens."""
    import numpy as np
    rng = np.random.default_rng(seed)
    lo, hi = max(1, int(input_len * (1 - ratio))), max(1, int(input_len * (1 + ratio)))
    special = set(tokenizer.backend.get_added_tokens_decoder()) | set(tokenizer.eos_ids)
    vocab = [i for i in range(tokenizer.vocab_size) if i not in special]
    prefix = np.random.default_rng([prefix_seed, 7]).choice(vocab, prefix_len).tolist()
    prompts = []
    for _ in range(n):
        ids = prefix + rng.choice(vocab, int(rng.integers(lo, hi + 1))).tolist()
        if as_ids:
            prompts.append(ids)
        else:  # re-encoding decoded text can change the count a little; usage reports the real one
            text = tokenizer.decode(ids)
            prompts.append(tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:len(ids)]))
    return prompts


# ==================================================================== one request
async def one_request(http, url: str, headers: dict, body: dict) -> dict:
    """Stream one completion; returns timings (seconds) or an error."""
    start = time.perf_counter()
    chunk_times, usage, text = [], None, []
    try:
        async with http.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                return {"ok": False, "error": f"HTTP {resp.status_code}: {detail}"}
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"ok": False, "error": json.dumps(event["error"])[:300]}
                if event.get("usage"):
                    usage = event["usage"]
                choices = event.get("choices") or []
                if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                    chunk_times.append(time.perf_counter())
                    text.append(choices[0].get("text") or choices[0]["delta"]["content"])
    except Exception as e:  # network errors count as failed requests
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if not chunk_times:
        return {"ok": False, "error": "no content received"}
    out_tokens = (usage or {}).get("completion_tokens") or len(chunk_times)
    ttft = chunk_times[0] - start
    e2e = chunk_times[-1] - start
    return {"ok": True, "ttft": ttft, "e2e": e2e,
            "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
            "tpot": (e2e - ttft) / (out_tokens - 1) if out_tokens > 1 else None,
            "output_tokens": out_tokens, "prompt_tokens": (usage or {}).get("prompt_tokens"),
            "cached_tokens": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")}


# ==================================================================== the run
def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), n).tolist()


async def run_load(args, prompts: list, warmup_prompts: list,
                   on_done=None) -> tuple[list[dict], float]:
    import httpx
    url = args.base_url.rstrip("/") + ("/chat/completions" if args.endpoint == "chat"
                                       else "/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or len(prompts)
    sem = asyncio.Semaphore(limit)
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(
            max_connections=limit + 8, max_keepalive_connections=limit + 8)) as http:
        async def go(prompt):
            body = {"model": args.model, "max_tokens": args.output_len, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            if args.endpoint == "chat":
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body["prompt"] = prompt
            async with sem:
                result = await one_request(http, url, headers, body)
            if on_done:
                on_done(result)
            return result

        # Warm-up at the same concurrency, so the server compiles its batch shapes first. Its
        # prompts differ from the measured ones (unless --warmup-reuse-prompts), so a server's
        # prompt cache cannot skip the measured prefills.
        await asyncio.gather(*(go(warmup_prompts[i % len(warmup_prompts)])
                               for i in range(args.warmup_requests)))
        tasks = []
        start = time.perf_counter()
        for prompt, gap in zip(prompts, arrival_gaps(len(prompts), args.request_rate,
                                                     args.burstiness, args.seed)):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(go(prompt)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[dict], duration: float) -> dict:
    import numpy as np
    ok = [r for r in results if r["ok"]]

    def stats(values, scale=1000.0):
        if not values:
            return None
        v = np.asarray(values) * scale
        return {"mean": round(float(v.mean()), 3), "median": round(float(np.median(v)), 3),
                "std": round(float(v.std()), 3),
                **{f"p{p}": round(float(np.percentile(v, p)), 3) for p in (50, 90, 99)}}
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] or 0 for r in ok)
    cached = [r["cached_tokens"] for r in ok if r.get("cached_tokens") is not None]
    errors = [r["error"] for r in results if not r["ok"]]
    return {
        "completed": len(ok), "failed": len(errors), "errors_sample": errors[:5],
        "duration_s": round(duration, 3),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        # prompt tokens the server reported as served from its prefix cache (None: not reported)
        "total_cached_tokens": sum(cached) if cached else None,
        "request_throughput": round(len(ok) / duration, 3),
        "output_throughput": round(out_tokens / duration, 2),
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2),
        "ttft_ms": stats([r["ttft"] for r in ok]),
        "tpot_ms": stats([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_ms": stats([g for r in ok for g in r["itl"]]),
        "e2el_ms": stats([r["e2e"] for r in ok]),
    }


# ==================================================================== server metrics (soak)
def scrape(base_url: str, api_key: str | None) -> dict | None:
    """The server's /metrics as {name: value} (first sample of each name); None if absent."""
    import httpx
    root = re.sub(r"/v1/?$", "", base_url.rstrip("/"))
    try:
        resp = httpx.get(root + "/metrics", timeout=10,
                         headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    values = {}
    for line in resp.text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if m and m[1] not in values:
            values[m[1]] = float(m[3])
    return values


async def soak(args, prompts: list) -> dict:
    rss_samples = []
    done = {"n": 0}
    fifth = max(1, len(prompts) // 5)

    def on_done(result):
        done["n"] += 1
        if done["n"] == fifth:  # after the first fifth: compilations and pools have settled
            rss_samples.append(("after_first_fifth", current_rss()))

    def current_rss():
        m = scrape(args.base_url, args.api_key)
        return None if m is None else m.get("process_resident_memory_bytes")
    rss_start = await asyncio.to_thread(current_rss)
    results, duration = await run_load(args, prompts, args.warmup_prompts, on_done)
    pages, deadline = None, time.time() + 30
    while time.time() < deadline:
        m = await asyncio.to_thread(scrape, args.base_url, args.api_key)
        pages = None if m is None else m.get("xlrt:kv_pages_in_use")
        if pages in (None, 0.0):
            break
        await asyncio.sleep(0.5)
    rss_end = await asyncio.to_thread(current_rss)
    rss_mid = rss_samples[0][1] if rss_samples else None
    summary = summarize(results, duration)
    growth_mb = None if rss_mid is None or rss_end is None else (rss_end - rss_mid) / 2**20
    checks = {
        "zero_errors": summary["failed"] == 0,
        "pages_back_to_zero": None if pages is None else pages == 0.0,
        "rss_stable": None if growth_mb is None else growth_mb <= args.rss_tolerance_mb,
    }
    return {"summary": summary, "kv_pages_in_use_after": pages,
            "rss_mb": {"start": None if rss_start is None else round(rss_start / 2**20, 1),
                       "after_first_fifth": None if rss_mid is None else round(rss_mid / 2**20, 1),
                       "end": None if rss_end is None else round(rss_end / 2**20, 1),
                       "growth_after_first_fifth": None if growth_mb is None else round(growth_mb, 1)},
            "checks": checks,
            "passed": all(v is not False for v in checks.values())}


# ==================================================================== main
def main(args) -> int:
    from model.registry import load_checkpoint
    import httpx
    if args.soak:
        args.num_requests = args.num_requests or 500
        args.max_concurrency = args.max_concurrency or 32
    args.num_requests = args.num_requests or 200
    if args.num_requests <= 0 or args.input_len <= 0 or args.output_len <= 0:
        raise cli.CLIError("--num-requests, --input-len and --output-len must be positive")
    if args.shared_prefix_len < 0:
        raise cli.CLIError(f"--shared-prefix-len must be >= 0, got {args.shared_prefix_len}")
    if not 0 <= args.random_range_ratio < 1:
        raise cli.CLIError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise cli.CLIError("--request-rate and --burstiness must be positive")
    if args.model is None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        try:
            listing = httpx.get(args.base_url.rstrip("/") + "/models", headers=headers,
                                timeout=30).json()
            args.model = listing["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise cli.CLIError(f"could not read the model id from {args.base_url}/models "
                               f"({e}); pass --model") from None
    tokenizer = load_checkpoint(args.tokenizer).tokenizer
    prompts = make_prompts(tokenizer, args.num_requests, args.input_len, args.random_range_ratio,
                           args.seed, as_ids=args.prompt_ids, prefix_len=args.shared_prefix_len,
                           prefix_seed=args.seed)
    if args.warmup_reuse_prompts:
        args.warmup_prompts = prompts
    else:
        args.warmup_prompts = make_prompts(
            tokenizer, max(1, args.warmup_requests), args.input_len, args.random_range_ratio,
            args.seed + 1_000_003, as_ids=args.prompt_ids, prefix_len=args.shared_prefix_len,
            prefix_seed=args.seed)
    config = {k: getattr(args, k) for k in ("base_url", "model", "endpoint", "num_requests",
                                            "max_concurrency", "request_rate", "burstiness",
                                            "input_len", "random_range_ratio", "output_len",
                                            "prompt_ids", "warmup_requests", "warmup_reuse_prompts",
                                            "shared_prefix_len")}
    config["request_rate"] = str(config["request_rate"])
    if args.soak:
        report = asyncio.run(soak(args, prompts))
        code = 0 if report["passed"] else 1
    else:
        results, duration = asyncio.run(run_load(args, prompts, args.warmup_prompts))
        report = summarize(results, duration)
        code = 0 if report["completed"] else 1
    report = {"config": config, **report}
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return code


if __name__ == "__main__":
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="the server's OpenAI API root (ends in /v1)")
    p.add_argument("--model", default=None, help="model id to send (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("XLRT_API_KEY"))
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests to send (default 200; 500 with --soak)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most (default: unlimited; 32 with --soak)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="prompt lengths uniform in input_len * [1 - r, 1 + r]")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (ignore_eos)")
    p.add_argument("--prompt-ids", action="store_true",
                   help="send prompts as token ids (exact lengths) instead of text")
    p.add_argument("--tokenizer", default="smollm2-135m-instruct",
                   help="model name or path whose tokenizer makes the prompts")
    p.add_argument("--warmup-requests", type=int, default=2, help="sent first (at the same concurrency), not measured")
    p.add_argument("--warmup-reuse-prompts", action="store_true",
                   help="warm up with the measured prompts themselves (by default the warm-up "
                        "prompts are different ones, so no prompt cache can skip measured prefills)")
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="every prompt (warm-up ones too) starts with the same this many random "
                        "tokens, like a shared system prompt (exercises prefix caching)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--soak", action="store_true", help="soak run with checks (see above)")
    p.add_argument("--rss-tolerance-mb", type=float, default=64.0,
                   help="--soak: allowed RSS growth after the first fifth of the run")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    cli.run(main, p.parse_args())
