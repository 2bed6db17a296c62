"""Scheduler and page allocator: host logic only, no model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.kv_pages import PageAllocator, pages_needed
from serving.sampling import SamplingParams
from serving.scheduler import QueueFullError, Request, Scheduler

PAGE = 4


def _scheduler(num_pages=24, max_num_seqs=4, max_waiting=64, chunk=8, decode_steps=4,
               prefix_caching=True):
    return Scheduler(PageAllocator(num_pages), PAGE, max_num_seqs=max_num_seqs,
                     max_waiting=max_waiting, prefill_chunk=chunk, max_prefill_seqs=2,
                     decode_steps=decode_steps, prefix_caching=prefix_caching)


def _request(prompt_len, max_tokens, first=3):
    return Request(prompt_ids=list(range(first, first + prompt_len)), params=SamplingParams(),
                   max_tokens=max_tokens)


def _check_invariants(s: Scheduler):
    owned = [p for r in s.running for p in r.pages]
    for r in s.running:
        assert len(r.pages) == len(set(r.pages)), "a request holds a page twice"
    shared = {p for p in owned if owned.count(p) > 1}
    if s.prefix_caching:  # only full, registered prefix pages are shared, read-only
        for r in s.running:
            for i, p in enumerate(r.pages):
                if p in shared:
                    assert i < r.num_registered and (i + 1) * PAGE <= r.num_computed
                    assert s.allocator._key_of[p] == r.page_keys[i]
    else:
        assert not shared, "a page is owned twice"
    assert 0 not in owned, "the sink page was handed out"
    assert len(set(owned)) == s.allocator.num_used
    assert s.allocator.num_used + s.allocator.num_free == s.allocator.capacity
    assert all(not r.pages for r in s.waiting)
    assert len(s.running) <= s.max_num_seqs


def _kv(s: Scheduler) -> dict:
    """A fake KV cache: (page, slot) -> the token id whose keys/values were written there."""
    return s.__dict__.setdefault("fake_kv", {})


def _read_back(s: Scheduler, req: Request, upto: int):
    """The request's pages must hold its own tokens at every position before `upto`."""
    kv = _kv(s)
    got = [kv.get((req.pages[i // PAGE], i % PAGE)) for i in range(upto)]
    assert got == req.tokens[:upto], "a page holds another sequence's keys/values"


def _write(s: Scheduler, req: Request, start: int, tokens: list[int]):
    for i, t in enumerate(tokens, start):
        _kv(s)[(req.pages[i // PAGE], i % PAGE)] = t


def _simulate_step(s: Scheduler):
    """What the engine does with a plan, with a fake model that emits token 7 and a fake cache
    that records which token each (page, slot) holds."""
    plan = s.schedule()
    _check_invariants(s)
    for c in plan.prefill:
        assert c.end - c.start <= s.prefill_chunk
        assert pages_needed(c.end, PAGE) <= len(c.request.pages)
        _read_back(s, c.request, c.start)
        _write(s, c.request, c.start, c.request.tokens[c.start:c.end])
        s.record_prefill(c)
        if c.sample:
            c.request.output_ids.append(7)
    for r in plan.decode:
        assert pages_needed(len(r.tokens) - 1 + 1, PAGE) <= len(r.pages)
        fed = min(plan.decode_steps, r.max_tokens - len(r.output_ids))
        _read_back(s, r, len(r.tokens) - 1)
        _write(s, r, len(r.tokens) - 1, [r.tokens[-1]] + [7] * (fed - 1))
        s.record_decode(r, fed)
        r.output_ids += [7] * fed
    for r in list(s.running):
        if len(r.output_ids) >= r.max_tokens:
            s.finish(r, "length")


def _run_ops(s: Scheduler, ops) -> list[Request]:
    """Apply (op, a, b) operations (add a request of a prompt and b output tokens, run a step,
    abort a live request), checking the invariants after each; then drain. Prompts start at
    token 3 or 4, so many share prefixes (and outputs are all 7s): with prefix caching, pages
    are shared, evicted and found again all the time."""
    live = []
    for op, a, b in ops:
        if op == "add":
            req = _request(a, b, first=3 + a % 2)
            try:
                s.add(req)
                live.append(req)
            except QueueFullError:
                pass
        elif op == "abort" and live:
            s.abort(live[a % len(live)].request_id)
        else:
            _simulate_step(s)
        _check_invariants(s)
    # Drain: everything finishes, every page comes back.
    for _ in range(10_000):
        if not s.has_work:
            break
        _simulate_step(s)
    assert not s.has_work
    assert s.allocator.num_used == 0 and s.allocator.num_free == s.allocator.capacity
    return live


@settings(derandomize=True, max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "step", "abort"]),
                          st.integers(1, 30), st.integers(1, 20)), min_size=1, max_size=120),
       st.booleans())
def test_random_admit_finish_abort_never_leaks_pages(ops, prefix_caching):
    s = _scheduler(prefix_caching=prefix_caching)
    live = _run_ops(s, ops)
    assert all(r.finished for r in live)
    if not prefix_caching:
        assert s.prefix_hit_tokens == 0 and s.allocator.num_cached == 0


def test_preemption_instead_of_failure_and_fifo_order():
    # 9 usable pages of 4 tokens: two requests of 12 + 12 tokens cannot both grow to the end.
    s = _scheduler(num_pages=10, max_num_seqs=4)
    a, b = _request(10, 14), _request(10, 14)
    s.add(a)
    s.add(b)
    for _ in range(200):
        if not s.has_work:
            break
        _simulate_step(s)
    assert a.finished and b.finished
    assert s.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the newest is preempted first


def test_queue_limit_and_oversized_requests():
    s = _scheduler(max_waiting=2)
    s.add(_request(4, 4))
    s.add(_request(4, 4))
    with pytest.raises(QueueFullError, match="full"):
        s.add(_request(4, 4))
    with pytest.raises(ValueError, match="KV pages"):
        _scheduler().add(_request(100, 100))


def test_chunked_prefill_interleaves_with_decode():
    s = _scheduler(num_pages=40, chunk=8)
    short = _request(3, 30)
    s.add(short)
    _simulate_step(s)  # short: prefilled, first token sampled
    long = _request(30, 4)
    s.add(long)
    plan = s.schedule()
    assert [c.request for c in plan.prefill] == [long] and plan.prefill[0].end == 8
    assert plan.decode == [short]  # the running stream keeps decoding during the long prefill
    assert plan.decode_steps < s.decode_steps


def test_allocator_rejects_double_free():
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    alloc.free(pages)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(pages)
    assert alloc.allocate(4) is None and alloc.num_free == 3


def test_allocator_keeps_freed_registered_pages_until_it_needs_them():
    alloc = PageAllocator(5)  # pages 1..4
    a = alloc.allocate(2)
    alloc.register(a[0], b"k0")
    alloc.register(a[1], b"k1")
    alloc.free(a)
    assert alloc.num_used == 0 and alloc.num_free == 4 and alloc.num_cached == 2
    assert alloc.acquire_cached([b"k0", b"k1", b"k2"]) == a  # the longest cached run
    assert alloc.num_cached == 0 and alloc.num_used == 2
    alloc.free(a)
    # Fresh pages go first; then cached ones, the tail of the freed sequence (k1) before k0.
    fresh = alloc.allocate(2)
    assert not set(fresh) & set(a) and alloc.num_cached == 2
    assert alloc.allocate(1) == [a[1]] and alloc.num_evictions == 1
    assert alloc.acquire_cached([b"k1"]) == [] and alloc.acquire_cached([b"k0"]) == [a[0]]
    with pytest.raises(ValueError, match="only held pages"):
        alloc.register(fresh[0] + 100, b"x")
    assert alloc.clear_cache() == 0  # nothing free is cached; held a[0] stays held
    alloc.free([a[0]])
    assert alloc.acquire_cached([b"k0"]) == [] and alloc.num_free == 1


def test_prefix_keys_name_whole_prefixes():
    from serving.kv_pages import prefix_keys
    a = prefix_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 10)
    assert len(a) == 2  # only full pages
    b = prefix_keys([0, 2, 3, 4, 5, 6, 7, 8], 4, 10)
    assert a[0] != b[0] and a[1] != b[1]  # same second page, different prefix: different key
    assert prefix_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, 1) == a[:1]
    assert prefix_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, 2, a[:1]) == a


def _run_to_end(s, req):
    for _ in range(100):
        if req.finished:
            return
        _simulate_step(s)
    raise AssertionError("the request did not finish")


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_second_request_with_the_same_prefix_prefills_only_the_rest(prefix_caching):
    s = _scheduler(num_pages=40, chunk=8, prefix_caching=prefix_caching)
    first = _request(13, 3)  # 3 full pages of 4 after prefill (12 tokens)
    s.add(first)
    _run_to_end(s, first)
    assert s.allocator.num_cached == (3 if prefix_caching else 0)  # 13 prompt + 2 fed = 15
    same = _request(13, 3)
    longer = _request(22, 3)
    s.add(same)
    s.add(longer)
    plan = s.schedule()
    chunks = {c.request.request_id: (c.start, c.end) for c in plan.prefill}
    if prefix_caching:
        # 12 of 13 cached: one token stays to compute (its logits give the first token).
        assert chunks[same.request_id] == (12, 13) and same.num_cached_tokens == 12
        assert chunks[longer.request_id] == (12, 20) and longer.num_cached_tokens == 12
        assert same.pages[:3] == longer.pages[:3]
        assert s.prefix_hit_tokens == 24 and s.prefix_queried_tokens == 13 + 13 + 22
    else:
        assert chunks[same.request_id] == (0, 8) and chunks[longer.request_id] == (0, 8)
        assert s.prefix_hit_tokens == 0
    _check_invariants(s)
    for r in (same, longer):
        _run_to_end(s, r)
    assert s.allocator.num_used == 0


def test_whole_prompt_of_full_pages_still_computes_its_last_token():
    s = _scheduler(num_pages=40)
    a = _request(8, 2)
    s.add(a)
    _run_to_end(s, a)
    b = _request(8, 2)
    s.add(b)
    plan = s.schedule()
    assert [(c.start, c.end, c.sample) for c in plan.prefill] == [(4, 8, True)]


def test_preempted_request_finds_its_own_pages_again():
    s = _scheduler(num_pages=40, chunk=8)
    r = _request(16, 20)
    s.add(r)
    for _ in range(3):
        _simulate_step(s)
    computed = r.num_computed
    s._preempt(r)
    assert r.num_computed == 0 and not r.pages
    plan = s.schedule()
    assert r.num_computed == computed // PAGE * PAGE  # full pages found, the rest recomputed
    assert not plan.prefill or plan.prefill[0].start == r.num_computed
    assert r.num_cached_tokens == 0  # only first admissions count as cache queries
    _run_to_end(s, r)
    assert s.allocator.num_used == 0


def test_prefix_cache_under_page_pressure_every_read_is_the_readers_own_tokens():
    """Seeded random walks with many shared prefixes and few pages (tens of evictions each):
    every prefill and decode reads back exactly its own tokens from the fake cache, and every
    page comes back. (Hypothesis' small examples rarely reach eviction; these walks always do.)"""
    import random
    evictions = hits = 0
    for seed in range(40):
        rnd = random.Random(seed)
        ops = [(rnd.choice(["add", "step", "step", "abort"]), rnd.randint(1, 30), rnd.randint(1, 20))
               for _ in range(120)]
        s = _scheduler(prefix_caching=True)
        _run_ops(s, ops)
        evictions += s.allocator.num_evictions
        hits += s.prefix_hit_tokens
    assert evictions > 400 and hits > 0
