"""Scheduler and page allocator: host logic only, no model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.kv_pages import PageAllocator, pages_needed
from serving.sampling import SamplingParams
from serving.scheduler import QueueFullError, Request, Scheduler

PAGE = 4


def _scheduler(num_pages=24, max_num_seqs=4, max_waiting=64, chunk=8, decode_steps=4):
    return Scheduler(PageAllocator(num_pages), PAGE, max_num_seqs=max_num_seqs,
                     max_waiting=max_waiting, prefill_chunk=chunk, max_prefill_seqs=2,
                     decode_steps=decode_steps)


def _request(prompt_len, max_tokens):
    return Request(prompt_ids=list(range(3, 3 + prompt_len)), params=SamplingParams(),
                   max_tokens=max_tokens)


def _check_invariants(s: Scheduler):
    owned = [p for r in s.running for p in r.pages]
    assert len(owned) == len(set(owned)), "a page is owned twice"
    assert 0 not in owned, "the sink page was handed out"
    assert len(owned) == s.allocator.num_used
    assert s.allocator.num_used + s.allocator.num_free == s.allocator.capacity
    assert all(not r.pages for r in s.waiting)
    assert len(s.running) <= s.max_num_seqs


def _simulate_step(s: Scheduler):
    """What the engine does with a plan, with a fake model that emits token 7."""
    plan = s.schedule()
    _check_invariants(s)
    for c in plan.prefill:
        assert c.end - c.start <= s.prefill_chunk
        assert pages_needed(c.end, PAGE) <= len(c.request.pages)
        s.record_prefill(c)
        if c.sample:
            c.request.output_ids.append(7)
    for r in plan.decode:
        assert pages_needed(len(r.tokens) - 1 + 1, PAGE) <= len(r.pages)
        fed = min(plan.decode_steps, r.max_tokens - len(r.output_ids))
        s.record_decode(r, fed)
        r.output_ids += [7] * fed
    for r in list(s.running):
        if len(r.output_ids) >= r.max_tokens:
            s.finish(r, "length")


@settings(derandomize=True, max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "step", "abort"]),
                          st.integers(1, 30), st.integers(1, 20)), min_size=1, max_size=120))
def test_random_admit_finish_abort_never_leaks_pages(ops):
    s = _scheduler()
    live = []
    for op, a, b in ops:
        if op == "add":
            req = _request(a, b)
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
    assert all(r.finished for r in live)


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
