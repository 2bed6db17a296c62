"""The engine with the Pallas kernels (interpret mode on CPU) gives the XLA path's greedy tokens.

Interpret mode runs every kernel grid step as XLA ops, which makes the 30-layer default model
slow on 2 cores: the default run checks a tiny model batched over ragged prompts (chunked
prefill and decode through both kernels); the slow run checks the golden prompts of the
default model against the reference continuations."""

import pytest


def _greedy(engine, prompts, n):
    return [o.token_ids for o in engine.generate(prompts, max_new_tokens=n)]


def test_pallas_interpret_engine_equals_xla_engine_tiny(make_tiny_engine):
    kwargs = dict(num_pages=64, page_size=4, prefill_chunk=16, decode_steps=3, max_num_seqs=2)
    prompts = [[5, 9, 2, 7], [5, 9, 3, 7] * 10]  # 4 and 40 tokens: the long one is chunked
    want = _greedy(make_tiny_engine(attention="xla", **kwargs), prompts, 5)
    got = _greedy(make_tiny_engine(attention="pallas_interpret", **kwargs), prompts, 5)
    assert got == want


@pytest.mark.slow
def test_pallas_interpret_greedy_equals_reference_golden(golden_cases):
    """All six golden prompts (5 to 245 tokens) in one batch through both kernels: the 245-token
    prompt is prefilled in chunks (ragged paged attention with many query tokens), then decode
    (one query token per sequence), 32 tokens each. Interpret mode runs the kernel's grid as an
    XLA loop that carries the whole KV cache, so its cost grows with the cache: 48 pages hold
    the six sequences (36 pages) and keep the run to minutes; layers under nn.scan keep the
    compile time independent of depth."""
    from serving import Engine
    engine = Engine.from_pretrained("smollm2-135m-instruct", dtype="float32",
                                    attention="pallas_interpret", num_pages=48,
                                    decode_steps=4, max_num_seqs=8, prefill_chunk=128,
                                    scan_layers=True)
    outs = _greedy(engine, [c["input_ids"] for c in golden_cases], 32)
    for case, out in zip(golden_cases, outs):
        assert out == case["greedy_32"], case["id"]
