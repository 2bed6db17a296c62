"""scripts/bench_decode.py --llama-bin: llama.cpp's own llama-bench run side by side (fake tools
stand in for a llama.cpp build: the conversion call and the JSON parsing are what is checked)."""

import importlib.util
import json
import os
import pathlib
import stat
import types

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "scripts/bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool(path: pathlib.Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_llama_bench_converts_once_and_reads_its_json(tmp_path):
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # llama-quantize --allow-requantize IN OUT TYPE: record the call, write OUT.
    _tool(bin_dir / "llama-quantize", f'echo "quantize $*" >> {log}\ncp "$2" "$3"\n')
    rows = [{"build_commit": "abc123", "n_prompt": 512, "n_gen": 0, "avg_ns": 1_500_000_000},
            {"build_commit": "abc123", "n_prompt": 0, "n_gen": 16, "avg_ns": 160_000_000}]
    _tool(bin_dir / "llama-bench", f'echo "bench $*" >> {log}\ncat <<\'JSON\'\n'
          f'{json.dumps(rows)}\nJSON\n')
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    args = types.SimpleNamespace(llama_bin=str(bin_dir), gguf=str(gguf), work_dir=str(work),
                                 new_tokens=16, repeats=2)
    bench = _script().bench_llama_bench
    out = bench(args)
    assert out["F32"] == {"ms_per_token_b1": 10.0, "ttft_512_s": 1.5,
                          "source": "llama-bench abc123"}
    assert out["Q8_0"]["ms_per_token_b1"] == 10.0
    calls = log.read_text().splitlines()
    assert calls[0] == f"quantize --allow-requantize {gguf} {work}/model.gguf.F32.gguf F32"
    assert calls[1].endswith("Q8_0") and calls[1].startswith("quantize")
    assert calls[2].startswith(f"bench -m {work}/model.gguf.F32.gguf -p 512 -n 16 -t "
                               f"{os.cpu_count()} -r 2 -o json")
    assert calls[3].startswith(f"bench -m {work}/model.gguf.Q8_0.gguf")
    bench(args)  # converted files are reused
    assert sum(c.startswith("quantize") for c in log.read_text().splitlines()) == 2
    # The alternating batch-1 reference: one tg run (no prompt, one repetition) per call.
    once = _script().llama_bench_b1(args, "Q8_0")
    assert once() == 10.0
    assert log.read_text().splitlines()[-1].startswith(
        f"bench -m {work}/model.gguf.Q8_0.gguf -p 0 -n 16 -t {os.cpu_count()} -r 1 -o json")


def test_llama_bin_without_the_tools_names_what_is_missing(tmp_path):
    args = types.SimpleNamespace(llama_bin=str(tmp_path), gguf="x.gguf", work_dir=str(tmp_path),
                                 new_tokens=16, repeats=1)
    with pytest.raises(RuntimeError, match="no executable llama-bench"):
        _script().bench_llama_bench(args)


def test_batch_one_alternates_with_the_reference(monkeypatch):
    """bench_xlrt with a reference: each batch-1 run follows one reference run, and the ratio
    reported is the median of the pairs' ratios (a fake engine stands in for the model)."""
    import serving

    calls = []

    class Out:
        def __init__(self, n):
            self.token_ids, self.ttft_s, self.num_cached_tokens = [0] * n, 0.5, 0
            self.e2e_s = 0.5 + 0.016 * (n - 1) * (1 + len(calls) % 3)  # 16, 32 or 48 ms/token

    class FakeEngine:
        int8_weight_layout, f32_weight_layout = "kn", "nk"
        allocator = types.SimpleNamespace(capacity=7)

        def generate(self, prompts, max_new_tokens, ignore_eos):
            calls.append(("xlrt", len(prompts)))
            return [Out(max_new_tokens) for _ in prompts]

        def reset_prefix_cache(self):
            pass

    monkeypatch.setattr(serving.Engine, "from_pretrained", lambda *a, **k: FakeEngine())
    script = _script()
    args = types.SimpleNamespace(model="m", attention="auto", decode_steps=16, concurrency=[2],
                                 kv_cache_gb=1.0, int8_weight_layout="auto",
                                 f32_weight_layout="auto", new_tokens=16, repeats=3, pairs=4)

    theirs = iter([8.0, 64.0, 16.0, 32.0])

    def reference():
        calls.append(("llama", 1))
        return next(theirs)

    out = script.bench_xlrt(args, None, reference=reference)
    b1 = [c[0] for c in calls[1:9]]  # after the compile run: llama, xlrt, llama, xlrt, ...
    assert b1 == ["llama", "xlrt"] * 4
    # xlrt's runs: 16, 48, 32, 16 ms/token, each paired with the reference run just before it
    assert out["b1_pairs_xlrt_llama_ms"] == [[16.0, 8.0], [48.0, 64.0], [32.0, 16.0], [16.0, 32.0]]
    # the median of the ratios 2, 0.75, 2, 0.5 is 1.375; the ratio of the medians would be 1.0
    assert out["b1_ratio_median_of_pairs"] == 1.375
    assert "b1_pairs_xlrt_llama_ms" not in script.bench_xlrt(args, None)  # no reference


def test_bad_pair_and_repeat_counts_are_named():
    from serving import cli
    with pytest.raises(cli.CLIError, match="--pairs must be >= 0 and --repeats >= 1, got -1 and 3"):
        _script().main(types.SimpleNamespace(pairs=-1, repeats=3))
    with pytest.raises(cli.CLIError, match="got 5 and 0"):
        _script().main(types.SimpleNamespace(pairs=5, repeats=0))


def test_every_llama_bench_run_reads_its_gguf_afresh(tmp_path, monkeypatch):
    """llama.cpp memory-maps its model, and its F32 decode speed depends on whether the page
    cache holds the file in large folios: before each llama-bench run the GGUF is dropped from
    the cache (POSIX_FADV_DONTNEED) and read back whole; the page-cache state is reported."""
    module = _script()
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    _tool(bin_dir / "llama-quantize", 'cp "$2" "$3"\n')
    rows = [{"n_prompt": 0, "n_gen": 16, "avg_ns": 160_000_000}]
    _tool(bin_dir / "llama-bench", f"cat <<'JSON'\n{json.dumps(rows)}\nJSON\n")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 80_000)  # read in two 16 MiB chunks
    args = types.SimpleNamespace(llama_bin=str(bin_dir), gguf=str(gguf), work_dir=str(work),
                                 new_tokens=16, repeats=1)
    advised, read = [], []
    real_read = os.read

    def fake_fadvise(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))

    def counting_read(fd, n):
        data = real_read(fd, n)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".gguf"):
            read.append(len(data))
        return data

    monkeypatch.setattr(os, "posix_fadvise", fake_fadvise, raising=False)
    monkeypatch.setattr(module.os, "read", counting_read)
    once = module.llama_bench_b1(args, "F32")
    assert once() == 10.0 and once() == 10.0
    f32 = str(work / "model.gguf.F32.gguf")
    assert advised == [(f32, 0, 0, os.POSIX_FADV_DONTNEED)] * 2
    size = os.path.getsize(f32)
    assert sum(read) == 2 * size and read.count(0) == 2  # each run read the whole file
    kb = module.file_huge_pages_kb()
    assert kb is None or (isinstance(kb, int) and kb >= 0)
