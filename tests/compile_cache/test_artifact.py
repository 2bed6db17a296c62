"""Exported artifacts: round trip without model/, integrity checks, cuda and tpu exports."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")

from conftest import tiny_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [[5, 6, 7], list(range(3, 30))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from serving import Engine
    from serving.artifact import ExportShapes, export
    tmp = tmp_path_factory.mktemp("art")
    eng = Engine(tiny_checkpoint(tmp), attention="xla", max_seq_len=64, num_pages=32)
    out = tmp / "artifact"
    manifest = export(eng, str(out), platforms=("cpu", "cuda", "tpu"),
                      shapes=ExportShapes(max_batch=2, max_seq_len=64, prefill_lengths=(32,)))
    expected = [o.token_ids for o in eng.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]
    return out, manifest, expected


def test_round_trip_in_a_fresh_process_without_model(exported):
    out, _, expected = exported
    code = (f"import sys, json; sys.path.insert(0, {ROOT!r})\n"
            "from serving import artifact\n"
            f"art = artifact.load({str(out)!r})\n"
            f"res = art.generate({PROMPTS!r}, max_new_tokens=6, ignore_eos=True)\n"
            "text = art.tokenizer.decode(art.tokenizer.encode('hi'))\n"
            "bad = sorted(m for m in sys.modules if m == 'model' or m.startswith('model.'))\n"
            "print('RESULT ' + json.dumps({'tokens': [r.token_ids for r in res], "
            "'model_modules': bad, 'text': text}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    assert result["model_modules"] == []
    assert result["tokens"] == expected  # the Engine's greedy tokens
    assert result["text"] == "hi"


def test_manifest_has_shapes_buckets_versions_and_checksums(exported):
    out, manifest, _ = exported
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["buckets"] == {"rows": [1, 2], "prefill_lengths": [32]}
    assert on_disk["jax"] and on_disk["jaxlib"] and on_disk["artifact_version"] == 1
    files = set(on_disk["sha256"])
    assert {"weights.safetensors", "tokenizer.json"} <= files
    assert {p["file"] for p in on_disk["programs"]} <= files
    assert all(len(d) == 64 for d in on_disk["sha256"].values())


def test_cuda_and_tpu_programs_use_their_kernels(exported):
    import jax
    out, manifest, _ = exported
    by_platform = {p["platform"]: p for p in manifest["programs"] if p["kind"] == "decode"}
    assert set(by_platform) == {"cpu", "cuda", "tpu"}
    tpu = jax.export.deserialize(bytearray((out / by_platform["tpu"]["file"]).read_bytes()))
    assert tpu.platforms == ("tpu",) and "tpu_custom_call" in tpu.mlir_module()
    cuda = jax.export.deserialize(bytearray((out / by_platform["cuda"]["file"]).read_bytes()))
    assert cuda.platforms == ("cuda",)
    # weights are inputs, not constants: the program takes every parameter as an argument
    assert len(tpu.in_avals) == len(manifest["params"]) + 2 + 3


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_damaged_missing_and_incompatible_artifacts_are_rejected(exported, tmp_path):
    from serving.artifact import ArtifactError, load
    out = exported[0]
    bad = _copy(out, tmp_path / "damaged")
    weights = bad / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for weights.safetensors"):
        load(str(bad))
    missing = _copy(out, tmp_path / "missing")
    (missing / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json is missing"):
        load(str(missing))
    old = _copy(out, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["artifact_version"] = 99
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="version 99 is not supported"):
        load(str(old))
    with pytest.raises(ArtifactError, match="not for 'rocm'"):
        load(str(out), platform="rocm")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load(str(tmp_path))


def test_engines_the_format_cannot_carry_are_refused(tmp_path):
    from serving import Engine
    from serving.artifact import ArtifactError, export
    eng = Engine(tiny_checkpoint(tmp_path), attention="xla", max_seq_len=64, num_pages=32,
                 kv_cache_dtype="int8")
    with pytest.raises(ArtifactError, match="kv_cache_dtype='int8'"):
        export(eng, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()
