"""Hugging Face export: a trained tiny model served by Engine.from_pretrained gives the trainer's
logits; the train script's commands work end to end; the metrics plot."""

import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from model.config import get_preset
from model.decoder import forward
from training.export_hf import ExportError, hf_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_exported_model_serves_with_the_trained_logits(make_trainer, tiny_config, tmp_path):
    from serving import Engine

    t = make_trainer(cfg=tiny_config(steps=3, eval_every=3, save_every=3))
    t.run()
    out = t.export(str(tmp_path / "hf"))
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    engine = Engine.from_pretrained(out, dtype="float32", attention="xla")
    text = "import os\ndef main():\n"
    ids = engine.tokenizer.encode(text)
    assert ids[0] == 256 and engine.tokenizer.decode(ids[1:]) == text
    want = forward(t.model, t.state.params, jnp.asarray([ids]))[0]
    np.testing.assert_allclose(engine.score(ids), np.asarray(want), rtol=1e-4, atol=1e-4)
    # greedy decoding runs on the exported model
    assert engine.generate(text, max_new_tokens=4)[0].token_ids
    with pytest.raises(ExportError, match="not empty"):
        t.export(out)


def test_hf_config_picks_the_architecture():
    tiny = get_preset("tiny")
    assert hf_config(tiny)["architectures"] == ["LlamaForCausalLM"]
    assert hf_config(dataclasses.replace(tiny, qkv_bias=True))["architectures"] == [
        "Qwen2ForCausalLM"]
    assert hf_config(dataclasses.replace(tiny, sliding_window=8))["sliding_window"] == 8
    with pytest.raises(ExportError, match="mixture of experts"):
        hf_config(get_preset("tiny-moe"))


def _script(*args, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # six interpreter starts with compiles (~50 s)
def test_train_script_resume_export_and_plot(tmp_path):
    run = str(tmp_path / "run")
    common = ["--max-bytes", "60000", "--seq-len", "32", "--batch-size", "4", "--eval-batches",
              "1", "--no-progress"]
    out = _script("scripts/train.py", "train", "--run-dir", run, "--steps", "2",
                  "--save-every", "2", "--eval-every", "2", *common).stdout
    assert "step 2: loss" in out and "eval loss" in out
    bad = _script("scripts/train.py", "train", "--run-dir", run, *common, check=False)
    assert bad.returncode == 2 and "already holds a run" in bad.stderr
    bad = _script("scripts/train.py", "train", "--run-dir", str(tmp_path / "x"),
                  "--batch-size", "6", "--micro-batches", "4", check=False)
    assert bad.returncode == 2 and "multiple of micro_batches" in bad.stderr
    out = _script("scripts/train.py", "resume", "--run-dir", run, "--steps", "3",
                  "--no-progress").stdout
    assert "step 3: loss" in out
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    _script("scripts/train.py", "export", "--run-dir", run, "--out", str(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["num_hidden_layers"] == 2
    png = _script("scripts/plot_metrics.py", run).stdout.strip()
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
