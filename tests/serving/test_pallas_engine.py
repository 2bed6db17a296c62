"""The engine with the Pallas kernels (interpret mode on CPU) gives the XLA path's greedy tokens.

Interpret mode runs every kernel grid step as XLA ops, which makes the 30-layer default model
slow on 2 cores: the default run checks a tiny model batched over ragged prompts (chunked
prefill and decode through both kernels); the slow run checks the golden prompts of the
default model against the reference continuations."""

import pytest


def _greedy(engine, prompts, n):
    return [o.token_ids for o in engine.generate(prompts, max_new_tokens=n)]


# The kernels themselves are checked against references in interpret mode by default
# (tests/model/test_kernels.py); the whole engine on them runs with -m slow.
@pytest.mark.slow
def test_pallas_interpret_engine_equals_xla_engine_tiny(make_tiny_engine):
    kwargs = dict(num_pages=64, page_size=4, prefill_chunk=16, decode_steps=3, max_num_seqs=2)
    prompts = [[5, 9, 2, 7], [5, 9, 3, 7] * 10]  # 4 and 40 tokens: the long one is chunked
    want = _greedy(make_tiny_engine(attention="xla", **kwargs), prompts, 5)
    got = _greedy(make_tiny_engine(attention="pallas_interpret", **kwargs), prompts, 5)
    assert got == want


@pytest.mark.slow
def test_pallas_interpret_greedy_equals_reference_golden(golden_cases):
    """The six golden prompts through both kernels (chunked prefill, then decode), against the
    reference continuations. Interpret mode runs each kernel's grid as an XLA loop that carries
    the whole KV cache, and a batch pays for its longest page table, so on 2 cores the run is
    split: the four short prompts (5-18 tokens) batched for 32 tokens, the 37-token prompt for
    32 tokens, and the 245-token prompt (two prefill chunks) for 8 tokens (~8 s per decode step
    alone). 9.6 min in all on 2 cores; 32 tokens for all six in one batch took over 30 min.
    Layers under nn.scan keep the compile time independent of depth."""
    from serving import Engine
    engine = Engine.from_pretrained("smollm2-135m-instruct", dtype="float32",
                                    attention="pallas_interpret", num_pages=48,
                                    decode_steps=4, max_num_seqs=8, prefill_chunk=128,
                                    scan_layers=True)
    by_len = sorted(golden_cases, key=lambda c: len(c["input_ids"]))
    assert [len(c["input_ids"]) for c in by_len] == [5, 7, 13, 18, 37, 245]
    for group, n in ((by_len[:4], 32), (by_len[4:5], 32), (by_len[5:], 8)):
        outs = _greedy(engine, [c["input_ids"] for c in group], n)
        for case, out in zip(group, outs):
            assert out == case["greedy_32"][:n], (case["id"], out)
