"""Roofline co-design report: TTFT/TPOT lower bounds of a model on a chip, measured vs predicted.

    python scripts/roofline.py --preset mixtral-8x7b --hardware h100
    python scripts/roofline.py --preset qwen3-30b-a3b --hardware tpu-v5p --layout expert=8 --json
    python scripts/roofline.py --model smollm2-135m-instruct --hardware cpu --measure
    python scripts/roofline.py --hardware h100 --compare llama3-8b mistral-7b mixtral-8x7b \
        qwen3-30b-a3b deepseek-moe-16b --out decode_cost.png

The formulas are in model/roofline.py (see docs/MOE.md for what they count).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.cli import CLIError, add_model_flags, parser, run  # noqa: E402

BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"--{what} must be comma-separated positive ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise CLIError(f"--{what} must be comma-separated positive ints, got {text!r}")
    return values


def _config(name: str):
    """A preset name or a model (known name, .gguf, HF directory) -> ModelConfig."""
    from model.config import PRESETS
    if name in PRESETS:
        return PRESETS[name]
    from model.registry import load_checkpoint
    return load_checkpoint(name).config


def _hardware(args):
    from model import roofline
    try:
        return roofline.get_hardware(args.hardware)
    except ValueError as e:
        raise CLIError(str(e)) from None


def measure(args, config, hardware, bytes_per_param) -> dict:
    """Run the engine here: TTFT of one prompt and TPOT at batch 1, vs the predicted bounds."""
    import numpy as np

    from model import roofline
    from serving import Engine
    eng = Engine.from_pretrained(args.model, dtype=args.dtype, attention=args.attention,
                                 max_num_seqs=1, kv_cache_gb=0.25)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, min(eng.config.vocab_size, 30000), args.prompt_len).tolist()
    new = args.measure_tokens

    def timed(n):
        t0 = time.perf_counter()
        eng.generate(prompt, max_new_tokens=n, ignore_eos=True)
        return time.perf_counter() - t0

    timed(1), timed(new + 1)  # compile every program the measurement uses
    ttft = min(timed(1) for _ in range(args.repeats))
    tpot = (min(timed(new + 1) for _ in range(args.repeats)) - ttft) / new
    pre = roofline.predict(roofline.prefill_cost(config, 1, args.prompt_len, bytes_per_param),
                           hardware)
    dec = roofline.predict(roofline.decode_cost(config, 1, args.prompt_len + new // 2,
                                                bytes_per_param), hardware)
    return {"model": args.model, "hardware": hardware.name,
            "peak_flops": hardware.flops, "bandwidth": hardware.bandwidth,
            "prompt_len": args.prompt_len,
            "ttft_measured_s": ttft, "ttft_predicted_s": pre.seconds, "ttft_bound": pre.bound,
            "ttft_efficiency": pre.seconds / ttft,
            "tpot_measured_s": tpot, "tpot_predicted_s": dec.seconds, "tpot_bound": dec.bound,
            "tpot_efficiency": dec.seconds / tpot}


def compare(args, hardware, bytes_per_param) -> list[dict]:
    from model import roofline
    rows = [roofline.decode_cost_summary(_config(n), hardware, args.compare_batch,
                                         args.compare_context, bytes_per_param)
            for n in args.compare]
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for r in rows:
            color = "tab:orange" if r["moe"] else "tab:blue"
            ax.scatter(r["total_params"] / 1e9, r["tpot_s"] * 1e3, color=color, s=60)
            ax.scatter(r["active_params"] / 1e9, r["tpot_s"] * 1e3, color=color, s=60,
                       facecolors="none")
            ax.plot([r["active_params"] / 1e9, r["total_params"] / 1e9], [r["tpot_s"] * 1e3] * 2,
                    color=color, lw=0.8, ls=":")
            ax.annotate(f"{r['model']} (GQA {r['gqa_ratio']})",
                        (r["total_params"] / 1e9, r["tpot_s"] * 1e3), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters, billions (filled: total, hollow: active per token)")
        ax.set_ylabel(f"decode TPOT lower bound, ms (batch {args.compare_batch}, "
                      f"context {args.compare_context})")
        ax.set_title(f"Decode cost vs parameters on {hardware.name}: "
                     f"blue dense, orange MoE")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
    return rows


def main(args) -> int:
    from model import roofline
    from model.config import ConfigError
    bytes_per_param = BYTES[args.weights]
    hardware = _hardware(args)
    try:
        layout = roofline.Layout.parse(args.layout)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.compare:
        rows = compare(args, hardware, bytes_per_param)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"decode at batch {args.compare_batch}, context {args.compare_context} on "
                  f"{hardware.name}")
            for r in rows:
                print(f"{r['model']:>20} total {r['total_params'] / 1e9:7.2f} B  active "
                      f"{r['active_params'] / 1e9:6.2f} B  TPOT {r['tpot_s'] * 1e3:8.3f} ms "
                      f"({r['bound']})  KV {r['kv_bytes_per_token'] / 1024:6.1f} KiB/token")
            if args.out:
                print(f"chart: {args.out}")
        return 0
    config = _config(args.preset or args.model)
    try:
        rep = roofline.report(config, hardware, _ints(args.batches, "batches"),
                              _ints(args.contexts, "contexts"), args.prompt_len, bytes_per_param,
                              layout)
    except (ValueError, ConfigError) as e:
        raise CLIError(str(e)) from None
    if args.measure:
        if args.preset:
            raise CLIError("--measure runs the engine on weights: give --model, not --preset")
        rep["measured"] = measure(args, config, hardware, BYTES[args.dtype])
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(roofline.format_report(rep))
    if args.measure:
        m = rep["measured"]
        print(f"\nmeasured on this machine ({m['hardware']}: {m['peak_flops'] / 1e9:.0f} GFLOP/s, "
              f"{m['bandwidth'] / 1e9:.1f} GB/s), batch 1, prompt {m['prompt_len']}:")
        for what in ("ttft", "tpot"):
            print(f"  {what.upper()}: measured {m[what + '_measured_s'] * 1e3:8.2f} ms, predicted "
                  f">= {m[what + '_predicted_s'] * 1e3:8.2f} ms ({m[what + '_bound']}-bound), "
                  f"efficiency {m[what + '_efficiency'] * 100:5.1f}%")
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    add_model_flags(p)
    p.add_argument("--preset", default=None, help="a ModelConfig preset (e.g. mixtral-8x7b) "
                   "instead of --model's config")
    p.add_argument("--hardware", default="h100",
                   help="h100, h200, tpu-v5e, tpu-v5p, or cpu (calibrated here, a few seconds)")
    p.add_argument("--layout", default="", help='mesh layout, e.g. "tensor=8" or "data=2,expert=4"')
    p.add_argument("--weights", default="bfloat16", choices=sorted(BYTES),
                   help="bytes per weight and KV value in the predictions")
    p.add_argument("--batches", default="1,8,32,128", help="decode batch sizes")
    p.add_argument("--contexts", default="512,4096,32768", help="decode context lengths")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for TTFT")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--measure", action="store_true",
                   help="also run the engine on --model here and print measured vs predicted")
    p.add_argument("--measure-tokens", type=int, default=32, help="decode tokens to time")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    p.add_argument("--compare", nargs="+", default=None, metavar="CFG",
                   help="presets or models to compare by decode cost vs parameters")
    p.add_argument("--compare-batch", type=int, default=1)
    p.add_argument("--compare-context", type=int, default=4096)
    p.add_argument("--out", default=None, help="PNG chart for --compare")
    run(main, p.parse_args())
