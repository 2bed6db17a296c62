"""Continuous batching: requests, FIFO admission, chunked prefill, decode batches, preemption.

Pure host logic (no JAX): the Engine asks `schedule()` what to run next, runs the compiled
programs, and reports results back with `record_prefill` / `record_tokens`. Requests join
between steps and leave as soon as they finish; when KV pages run out, the most recently admitted
request is preempted (its pages are freed and it is recomputed later), never failed.

With prefix caching on, every page filled with computed tokens is registered under a key naming
its whole token prefix; a request admitted later whose tokens start with the same full pages
shares those pages and prefills only the rest (a preempted request reuses its own pages the same
way when they were not evicted meanwhile).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import time

from serving.kv_pages import PageAllocator, pages_needed, prefix_keys
from serving.sampling import MAX_LOGPROBS, SamplingError, SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; retry later."""


class RequestError(ValueError):
    """A request the engine cannot serve; the message names the problem and the limit."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its progress. tokens = prompt_ids + output_ids."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per output token (0 = only the chosen token's)
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    seed: int = 0                # effective seed (params.seed or derived from the id)
    arrival: float = dataclasses.field(default_factory=time.perf_counter)

    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list = dataclasses.field(default_factory=list)  # (logprob, top ids, top logprobs)
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0        # tokens whose keys/values are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0   # prompt tokens found in the prefix cache at (first) admission
    page_keys: list = dataclasses.field(default_factory=list, repr=False)  # prefix keys, full pages
    num_registered: int = 0      # leading pages registered in the prefix cache
    first_token_time: float | None = None
    finish_time: float | None = None
    text: str = ""               # detokenized output (stop string removed when finished by it)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def prefill_target(self) -> int:
        """Tokens that must be in the cache before decoding: all but the last sampled one."""
        return len(self.tokens) - (1 if self.output_ids else 0)

    @property
    def needs_prefill(self) -> bool:
        return self.num_computed < self.prefill_target


@dataclasses.dataclass
class PrefillChunk:
    request: Request
    start: int        # first position of the chunk
    end: int          # one past the last position
    sample: bool      # the chunk ends the prompt of a fresh request: sample its first token


@dataclasses.dataclass
class Plan:
    prefill: list[PrefillChunk]
    decode: list[Request]
    decode_steps: int


class Scheduler:
    """FIFO admission under a page budget and a sequence limit; one prefill and one decode batch
    per step, so long prompts (chunked) interleave with running streams."""

    def __init__(self, allocator: PageAllocator, page_size: int, *, max_num_seqs: int,
                 max_waiting: int, prefill_chunk: int, max_prefill_seqs: int, decode_steps: int,
                 prefix_caching: bool = True):
        self.allocator = allocator
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.max_prefill_seqs = max_prefill_seqs
        self.decode_steps = decode_steps
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prefix_caching = prefix_caching
        self.prefix_queried_tokens = 0  # prompt tokens looked up at first admissions
        self.prefix_hit_tokens = 0      # of those, found in the cache

    # ------------------------------------------------------------------ queue
    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        needed = pages_needed(len(request.prompt_ids) + request.max_tokens, self.page_size)
        if needed > self.allocator.capacity:
            raise ValueError(f"request needs {needed} KV pages but the cache has only "
                             f"{self.allocator.capacity}; shorten it or enlarge the cache")
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return None
        self.finish(req, "abort")
        return req

    def finish(self, req: Request, reason: str) -> None:
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        elif req.status is Status.RUNNING:
            self.running.remove(req)
        self._release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        self.requests.pop(req.request_id, None)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ pages
    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make req's pages cover num_tokens positions; False if the pages are not there."""
        missing = pages_needed(num_tokens, self.page_size) - len(req.pages)
        if missing <= 0:
            return True
        pages = self.allocator.allocate(missing)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def _preempt(self, req: Request) -> None:
        """Free req's pages; it goes back to the front of the queue and is recomputed later."""
        self.running.remove(req)
        self._release(req)  # its recompute can find these pages again if not evicted meanwhile
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ planning
    def _reuse_cached(self, req: Request) -> None:
        """Start req with the cached pages of its longest cached prefix of full pages. At least
        one token stays to compute when the request has no output yet: its logits give the
        first token."""
        computable = req.prefill_target - (0 if req.output_ids else 1)
        n = computable // self.page_size
        req.page_keys = prefix_keys(req.tokens, self.page_size, n, req.page_keys)
        req.pages = self.allocator.acquire_cached(req.page_keys[:n])
        req.num_registered = len(req.pages)
        req.num_computed = len(req.pages) * self.page_size

    def _release(self, req: Request) -> None:
        """Register req's newly full pages, then drop its hold on all of them: it keeps no
        pages and nothing computed."""
        self._register(req)
        self.allocator.free(req.pages)
        req.pages, req.num_computed, req.num_registered = [], 0, 0

    def _register(self, req: Request) -> None:
        """Register req's pages that are now full of computed tokens (of known ids: a decode
        step's tokens count once they are appended; finish and preemption catch up)."""
        if not self.prefix_caching:
            return
        full = min(req.num_computed, len(req.tokens)) // self.page_size
        full = min(full, len(req.pages))
        if full <= req.num_registered:
            return
        req.page_keys = prefix_keys(req.tokens, self.page_size, full, req.page_keys)
        for i in range(req.num_registered, full):
            self.allocator.register(req.pages[i], req.page_keys[i])
        req.num_registered = full

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            first = req.num_preemptions == 0
            if self.prefix_caching:
                self._reuse_cached(req)
            # Reserve the whole prompt (+1 for the first decode) so chunked prefill never stalls.
            if not self._grow(req, len(req.tokens) + 1):
                self._release(req)  # give back the cached pages it took; try again next step
                break
            if first:
                self.prefix_queried_tokens += len(req.prompt_ids)
                self.prefix_hit_tokens += req.num_computed
                req.num_cached_tokens = req.num_computed
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)

    def schedule(self) -> Plan:
        self._admit()
        prefill = []
        for req in self.running:
            if req.needs_prefill and len(prefill) < self.max_prefill_seqs:
                end = min(req.prefill_target, req.num_computed + self.prefill_chunk)
                prefill.append(PrefillChunk(req, req.num_computed, end,
                                            sample=not req.output_ids and end == len(req.tokens)))
        busy = bool(prefill) or bool(self.waiting)
        steps = max(1, self.decode_steps // 4) if busy else self.decode_steps
        decode = [r for r in self.running if not r.needs_prefill]
        # Every decode row needs pages for the positions it may write in `steps` steps.
        while decode:
            short = [r for r in decode
                     if not self._grow(r, min(len(r.tokens) - 1 + steps,
                                              len(r.prompt_ids) + r.max_tokens))]
            if not short:
                break
            if steps > 1:
                steps = 1
                continue
            victim = self.running[-1]
            self._preempt(victim)
            decode = [r for r in decode if r is not victim]
            prefill = [c for c in prefill if c.request is not victim]
        return Plan(prefill=prefill, decode=decode, decode_steps=steps)

    # ------------------------------------------------------------------ results
    def record_prefill(self, chunk: PrefillChunk) -> None:
        chunk.request.num_computed = chunk.end
        self._register(chunk.request)

    def record_decode(self, req: Request, num_fed: int) -> None:
        """num_fed tokens were fed (their keys/values written)."""
        req.num_computed += num_fed
        self._register(req)


def prompt_ids(prompt, tokenizer, vocab_size: int) -> list[int]:
    """A prompt (a string, encoded with `tokenizer`, or token ids) as a validated id list."""
    import numpy as np
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        ids = []
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise RequestError(f"token ids must be ints, got {type(t).__name__}")
            if not 0 <= int(t) < vocab_size:
                raise RequestError(f"token id {int(t)} is outside the vocabulary [0, {vocab_size})")
            ids.append(int(t))
    else:
        raise RequestError(f"a prompt must be a string or a list of token ids, "
                           f"got {type(prompt).__name__}")
    if not ids:
        raise RequestError("the prompt is empty (0 tokens); give at least one token")
    return ids


def build_request(ids: list[int], number: int, *, max_seq_len: int, vocab_size: int,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None,
                  stop=None, stop_token_ids=(), ignore_eos: bool = False,
                  repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0, logprobs: int | None = None,
                  request_id: str | None = None) -> Request:
    """Validate a request's settings (RequestError names the problem and the limit) and make the
    Request; `number` (the engine's request count) derives the seed when none is given."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens <= 0:
        raise RequestError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if len(ids) + max_new_tokens > max_seq_len:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{len(ids) + max_new_tokens} tokens, over the context limit {max_seq_len}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in stops):
        raise RequestError("stop strings must be non-empty strings")
    stop_ids = frozenset(int(t) for t in stop_token_ids)
    if any(not 0 <= t < vocab_size for t in stop_ids):
        raise RequestError(f"stop_token_ids must be in [0, {vocab_size})")
    if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= MAX_LOGPROBS):
        raise RequestError(f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {logprobs!r}")
    try:
        params = SamplingParams(temperature, top_k, top_p, min_p, seed, repetition_penalty,
                                presence_penalty, frequency_penalty).validate()
    except SamplingError as e:
        raise RequestError(str(e)) from None
    kwargs = {} if request_id is None else {"request_id": request_id}
    req = Request(prompt_ids=ids, params=params, max_tokens=max_new_tokens, stop=stops,
                  stop_token_ids=stop_ids, ignore_eos=ignore_eos, logprobs=logprobs, **kwargs)
    req.seed = seed if seed is not None else (number * 0x9E3779B1) % 2**32
    return req


class RequestFrontEnd:
    """Making, queueing and aborting requests, shared by Engine and ArtifactEngine. The class
    using it provides tokenizer, config.vocab_size, max_seq_len, scheduler, _lock and
    _request_counter."""

    def _to_ids(self, prompt) -> list[int]:
        return prompt_ids(prompt, self.tokenizer, self.config.vocab_size)

    def make_request(self, prompt, **kwargs) -> Request:
        """Validate one request (RequestError names the problem) without queueing it.

        kwargs: max_new_tokens (64), temperature (0.0), top_k (0), top_p (1.0), min_p (0.0),
        seed, stop (a string or strings), stop_token_ids, ignore_eos, repetition_penalty,
        presence_penalty, frequency_penalty, logprobs (top-n, <= MAX_LOGPROBS), request_id."""
        ids = self._to_ids(prompt)
        self._request_counter += 1
        return build_request(ids, self._request_counter, max_seq_len=self.max_seq_len,
                             vocab_size=self.config.vocab_size, **kwargs)

    def add_request(self, request: Request) -> Request:
        """Queue a request made by make_request (QueueFullError when the queue is full)."""
        with self._lock:
            try:
                self.scheduler.add(request)
            except ValueError as e:
                raise RequestError(str(e)) from None
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV pages at once; False if it is unknown or finished."""
        with self._lock:
            return self.scheduler.abort(request_id) is not None
