"""Engine.warmup: the plan's manifest, and serving without any compilation afterwards."""

import jax
import pytest

from compile_cache import ServingBuckets, compile_counts
from compile_cache.manifest import REQUIRED_PROGRAM_FIELDS
from conftest import tiny_checkpoint

ENGINE = dict(attention="xla", max_seq_len=64, prefill_chunk=32, max_num_seqs=4,
              max_prefill_seqs=2, num_pages=64, decode_steps=4)
# One bucket per dimension: every call is padded into it (the most padding a plan can ask for).
BUCKETS = ServingBuckets(prefill_rows=(2,), prefill_lengths=(32,), decode_rows=(4,),
                         page_widths=(4,), stop_width=8)


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    from serving import Engine
    eng = Engine(tiny_checkpoint(tmp_path_factory.mktemp("tiny")), **ENGINE)
    plan = eng.compile_plan(BUCKETS, variants=("plain", "full"))
    manifest = eng.warmup(plan)
    return eng, plan, manifest


def test_manifest_lists_every_program_with_its_facts(warmed):
    eng, plan, manifest = warmed
    assert [p["key"] for p in manifest["programs"]] == plan.keys() == [
        "prefill/plain/r2_t32_w4", "decode/plain/r4_w4", "prefill/full/r2_t32_w4",
        "decode/full/r4_w4"]
    for p in manifest["programs"]:
        assert all(k in p for k in REQUIRED_PROGRAM_FIELDS)
        assert p["compile_seconds"] > 0 and p["source"] in ("compiled", "persistent-cache",
                                                             "aot-store")
        shapes = {i["path"]: i["shape"] for i in p["inputs"]}
        assert all(i["dtype"] for i in p["inputs"])
        if p["program"] == "prefill":
            assert shapes["[2]"] == [2, 32] and shapes["[4]"] == [2, 4]
        else:
            assert shapes["[7]"] == [4, 8] and p["max_steps"] == 4  # stop ids, steps per call
    assert manifest["jax"] == jax.__version__ and manifest["jaxlib"] and manifest["backend"]
    fp = manifest["fingerprint"]
    assert fp["model_config_hash"] == eng.config.fingerprint()
    assert fp["buckets"]["decode_rows"] == [4] or fp["buckets"]["decode_rows"] == (4,)
    assert len(manifest["shared_inputs"]["params"]) == len(jax.tree.leaves(eng.params))
    assert manifest["totals"]["programs"] == 4


def test_mixed_traffic_after_warmup_compiles_nothing(warmed):
    eng = warmed[0]
    before = compile_counts()
    outs = eng.generate([[5, 6, 7], list(range(3, 40)), [9] * 20], max_new_tokens=8)
    assert [len(o.token_ids) for o in outs] == [8, 8, 8]
    eng.generate([[4] * 50], max_new_tokens=10, ignore_eos=True)  # chunked prefill, 2 chunks
    eng.generate([[1, 2], [3], [4, 5, 6], [7, 8]], max_new_tokens=6, temperature=0.9, top_k=20,
                 seed=1)
    lp = eng.generate([[1, 2, 3, 4]], max_new_tokens=5, logprobs=3, repetition_penalty=1.3,
                      frequency_penalty=0.5, stop_token_ids=[300, 301, 302])
    assert len(lp[0].logprobs) == len(lp[0].token_ids)
    chunks = list(eng.stream([7, 7, 7], max_new_tokens=4))
    assert chunks[-1].finish_reason is not None
    after = compile_counts()
    assert after.backend_compiles == before.backend_compiles
    stats = eng.compile_stats()
    assert stats["warmed_up"] and stats["planned_programs"] == 4
    assert stats["compiles_since_warmup"] == 0


def test_calls_outside_the_plan_get_a_clear_error(warmed):
    from serving import RequestError
    eng = warmed[0]
    before = compile_counts().backend_compiles
    with pytest.raises(RequestError, match="score.*compile plan"):
        eng.score([1, 2, 3])
    assert compile_counts().backend_compiles == before


def test_plans_must_include_the_full_variant(warmed):
    from compile_cache import PlanError
    with pytest.raises(PlanError, match="full"):
        warmed[0].compile_plan(BUCKETS, variants=("plain",))
