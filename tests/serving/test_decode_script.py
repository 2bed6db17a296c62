"""scripts/decode.py, the Quickstart's first command, end to end on the default model."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[2]


def _run(*args):
    return subprocess.run([sys.executable, "scripts/decode.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_decode_json_gives_the_reference_greedy_tokens(golden_cases):
    case = golden_cases[0]
    out = _run("--prompt", case["text"], "--max-new-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["token_ids"] == case["greedy_32"][:8]
    assert result["finish_reason"] == "length" and result["num_tokens"] == 8
    assert result["ttft_s"] > 0 and result["ms_per_token"] > 0 and result["warmup_s"] > 0


def test_decode_bad_arguments_exit_2_with_one_line():
    out = _run("--prompt", "hi", "--kv-cache-gb", "0")
    assert out.returncode == 2 and "kv-cache-gb" in out.stderr and "Traceback" not in out.stderr
    out = _run("--prompt", "hi", "--model", "no-such-model")
    assert out.returncode == 2 and "no-such-model" in out.stderr and "Traceback" not in out.stderr
