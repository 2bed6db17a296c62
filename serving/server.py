"""OpenAI-compatible HTTP server over an Engine: completions, chat, streaming, metrics.

    app = create_app(Engine.from_pretrained("smollm2-135m-instruct"), api_key="secret")
    serve(app, host="127.0.0.1", port=8000)
    app = create_app(ArtifactEngine.load("out/"))   # an exported artifact, no model/ import

The Engine is not thread-safe, so one thread (EngineLoop) owns it: it admits submitted requests,
runs `engine.step()` while there is work, and hands each request's new tokens and text to the
HTTP handler waiting on an asyncio queue (`loop.call_soon_threadsafe`). Handlers never touch the
engine; aborts (a client that went away) are sent to the engine thread the same way.

Errors follow OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for bad
input (the message names the field and the limit), 401 without the API key, 429 with
Retry-After when the waiting queue is full, 500 if the engine fails (the server keeps serving).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from compile_cache import compile_counts
from serving.api_models import ChatCompletionRequest, CompletionRequest, SamplingFields
from serving.metrics import ServerMetrics
from serving.playground import install_playground
from serving.sampling import MAX_LOGPROBS
from serving.scheduler import QueueFullError, RequestError

if TYPE_CHECKING:  # the server also serves an ArtifactEngine, which must not import model/
    from serving.engine import Engine

log = logging.getLogger("xlrt.server")

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error",
                             429: "rate_limit_error"}.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ==================================================================== the engine thread
@dataclasses.dataclass
class Delta:
    """What one engine request produced since its previous Delta."""

    token_ids: list[int]
    text: str
    logprobs: list | None          # per token: (logprob, [(id, logprob) x top-n])
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int         # all tokens so far
    cached_tokens: int = 0         # prompt tokens served from the prefix cache


@dataclasses.dataclass
class GenerationSpec:
    """One engine request to start: prompt ids and Engine.make_request keyword arguments."""

    prompt_ids: list[int]
    kwargs: dict


@dataclasses.dataclass
class _Tracked:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    index: int
    arrival: float
    prompt_tokens: int
    stops: tuple[str, ...]
    sent_tokens: int = 0
    sent_text: int = 0
    last_token_at: float | None = None


def visible_text(text: str, finished: bool, stops: tuple[str, ...]) -> str:
    """The part of a request's text that is safe to stream: while it runs, an incomplete UTF-8
    character (U+FFFD at the end) and any tail that could begin a stop string are held back,
    because the finished text will not contain them."""
    if finished:
        return text
    text = text.rstrip("\ufffd")
    if stops:
        longest = min(len(text), max(len(s) for s in stops) - 1)
        for k in range(longest, 0, -1):
            if any(s.startswith(text[-k:]) for s in stops):
                return text[:-k]
    return text


class EngineLoop:
    """The one thread that owns the Engine. Other threads call submit() and abort()."""

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None,
                 idle_wait_s: float = 0.5):
        self.engine = engine
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._tracked: dict[str, _Tracked] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._compile_baseline = compile_counts().backend_compiles
        self._started_at = time.time()
        self._totals = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0,
                        "requests_aborted": 0, "engine_errors": 0}
        self.snapshot: dict = self._take_snapshot()

    # ------------------------------------------------------------------ other threads
    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="xlrt-engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the engine thread between steps; its result or exception in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.append((fn, future))
        self._wake.set()
        return future

    def submit(self, specs: list[GenerationSpec], queue: asyncio.Queue,
               loop: asyncio.AbstractEventLoop, arrival: float) -> concurrent.futures.Future:
        """Queue the requests of one HTTP call (all or none: QueueFullError / RequestError).
        Their Deltas arrive on `queue` as (index in specs, Delta | Exception)."""
        return self.call(lambda: self._admit(specs, queue, loop, arrival))

    def abort(self, request_ids: list[str]) -> None:
        self.call(lambda: self._abort(request_ids))

    # ------------------------------------------------------------------ engine thread
    def _admit(self, specs, queue, loop, arrival) -> list[str]:
        added = []
        try:
            for i, spec in enumerate(specs):
                req = self.engine.make_request(spec.prompt_ids, **spec.kwargs)
                self.engine.add_request(req)
                added.append(req.request_id)
                self._tracked[req.request_id] = _Tracked(queue, loop, i, arrival,
                                                         len(req.prompt_ids), req.stop)
        except BaseException:
            self._abort(added, count=False)
            raise
        return added

    def _abort(self, request_ids: list[str], count: bool = True) -> None:
        for rid in request_ids:
            if self._tracked.pop(rid, None) is not None and self.engine.abort(rid) and count:
                self._totals["requests_aborted"] += 1
                if self.metrics:
                    self.metrics.finished("abort")

    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()
            while self._inbox:
                fn, future = self._inbox.popleft()
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn()
                    except BaseException as e:  # handed to the caller
                        self.snapshot = self._take_snapshot()
                        future.set_exception(e)
                    else:  # stats read after the call returns see its effect
                        self.snapshot = self._take_snapshot()
                        future.set_result(result)
            if self.engine.scheduler.has_work:
                try:
                    touched = self.engine.step()
                except Exception as e:  # fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._totals["engine_errors"] += 1
                    self._fail_all(e)
                    touched = []
                for req in touched:
                    self._publish(req)
                self.snapshot = self._take_snapshot()
            else:
                self.snapshot = self._take_snapshot()
                self._wake.wait(self.idle_wait_s)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _fail_all(self, error: Exception) -> None:
        for rid, t in list(self._tracked.items()):
            self.engine.abort(rid)
            self._deliver(t, error)
        self._tracked.clear()

    @staticmethod
    def _deliver(t: _Tracked, item) -> None:
        try:
            t.loop.call_soon_threadsafe(t.queue.put_nowait, (t.index, item))
        except RuntimeError:  # the client's event loop is closed: nobody is listening
            pass

    def _publish(self, req) -> None:
        t = self._tracked.get(req.request_id)
        if t is None:
            return
        now = time.perf_counter()
        new_ids = req.output_ids[t.sent_tokens:]
        text = visible_text(req.text, req.finished, t.stops)
        delta_text = text[t.sent_text:]
        if not new_ids and not delta_text and not req.finished:
            return
        m = self.metrics
        if new_ids:
            if t.last_token_at is None:
                self._totals["prompt_tokens"] += t.prompt_tokens
                if m:
                    m.ttft.observe(now - t.arrival)
                    m.prompt_tokens.inc(t.prompt_tokens)
            elif m:
                gap = (now - t.last_token_at) / len(new_ids)
                for _ in new_ids:
                    m.itl.observe(gap)
            t.last_token_at = now
            self._totals["generation_tokens"] += len(new_ids)
            if m:
                m.generation_tokens.inc(len(new_ids))
        lps = req.output_logprobs[t.sent_tokens:] if req.logprobs is not None else None
        t.sent_tokens = len(req.output_ids)
        t.sent_text = max(t.sent_text, len(text))
        if req.finished:
            del self._tracked[req.request_id]
            self._totals["requests_finished"] += 1
            if m:
                m.finished(req.finish_reason)
                e2e = now - t.arrival
                m.e2e.observe(e2e)
                n = len(req.output_ids)
                if n > 1 and req.first_token_time is not None:
                    m.tpot.observe((req.finish_time - req.first_token_time) / (n - 1))
        self._deliver(t, Delta(list(new_ids), delta_text, lps,
                               req.finish_reason if req.finished else None, t.prompt_tokens,
                               len(req.output_ids), req.num_cached_tokens))

    def _take_snapshot(self) -> dict:
        sched, alloc = self.engine.scheduler, self.engine.allocator
        used, total = alloc.num_used, alloc.capacity
        return {
            "running": len(sched.running), "waiting": len(sched.waiting),
            "kv_pages_in_use": used, "kv_pages_total": total,
            "kv_cache_usage": used / total if total else 0.0,
            "compilations_since_start": compile_counts().backend_compiles - self._compile_baseline,
            "num_preemptions": sched.num_preemptions,
            "kv_pages_cached": alloc.num_cached,
            "prefix_cache_queries": sched.prefix_queried_tokens,
            "prefix_cache_hits": sched.prefix_hit_tokens,
            "prompt_tokens_total": self._totals["prompt_tokens"],
            "generation_tokens_total": self._totals["generation_tokens"],
            "requests_finished": self._totals["requests_finished"],
            "requests_aborted": self._totals["requests_aborted"],
            "engine_errors": self._totals["engine_errors"],
            "uptime_s": round(time.time() - self._started_at, 3),
        }


# ==================================================================== request translation
def _parse(model: type[pydantic.BaseModel], body: Any):
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        problems = []
        for err in e.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "body"
            got = json.dumps(err.get("input"), default=str)[:60] if "input" in err else ""
            problems.append(f"{where}: {err['msg']}" + (f" (got {got})" if got else ""))
        first = ".".join(str(p) for p in e.errors()[0]["loc"]) or None
        raise APIError(400, "invalid request: " + "; ".join(problems), param=first,
                       code="invalid_type" if any("type" in x["type"] for x in e.errors())
                       else "invalid_value") from None


class OpenAIServer:
    """The HTTP side: validates requests, submits them to the EngineLoop, formats responses."""

    def __init__(self, engine: Engine, model_name: str, *, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.max_model_len = engine.max_seq_len
        self.created = int(time.time())
        self.metrics = ServerMetrics(model_name, lambda: self.loop.snapshot)
        self.loop = EngineLoop(engine, self.metrics)
        self._token_text: dict[int, str] = {}

    # ------------------------------------------------------------------ input
    async def read_json(self, request: Request) -> Any:
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(400, f"the request body has {int(length)} bytes, over the limit of "
                                f"{limit} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(400, f"the request body is over the limit of {limit} bytes",
                               code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON in the request body: {e}",
                           code="invalid_json") from None

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(400, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    def max_tokens_for(self, prompt_ids: list[int], max_tokens: int | None, name: str) -> int:
        limit = self.max_model_len
        if len(prompt_ids) >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the "
                                f"prompt has {len(prompt_ids)} tokens (at least one token must "
                                f"be left to generate)", param="prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            return limit - len(prompt_ids)
        if max_tokens <= 0:
            raise APIError(400, f"{name} must be at least 1, got {max_tokens}", param=name)
        if max_tokens > limit:
            raise APIError(400, f"{name}={max_tokens} is over the limit: this model's maximum "
                                f"context length is {limit} tokens", param=name)
        if len(prompt_ids) + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the "
                                f"prompt has {len(prompt_ids)} tokens and {name}={max_tokens}; "
                                f"lower {name} to at most {limit - len(prompt_ids)}",
                           param=name, code="context_length_exceeded")
        return max_tokens

    def sampling_kwargs(self, req: SamplingFields, logprobs: int | None) -> dict:
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise APIError(400, f"at most {MAX_LOGPROBS} top logprobs per token can be returned, "
                                f"got {logprobs}", param="logprobs")
        for s in ([req.stop] if isinstance(req.stop, str) else req.stop or []):
            if not s:
                raise APIError(400, "stop strings must be non-empty", param="stop")
        return dict(temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
                    min_p=req.min_p, stop=req.stop, stop_token_ids=tuple(req.stop_token_ids or ()),
                    ignore_eos=req.ignore_eos, repetition_penalty=req.repetition_penalty,
                    presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, logprobs=logprobs)

    def specs(self, prompts: list[list[int]], req, max_tokens: int | None, name: str,
              kwargs: dict) -> list[GenerationSpec]:
        """n engine requests per prompt; with a seed, choice i samples with seed + i."""
        specs = []
        for ids in prompts:
            budget = self.max_tokens_for(ids, max_tokens, name)
            for _ in range(req.n):
                i = len(specs)
                seed = None if req.seed is None else (req.seed + i) % 2**32
                specs.append(GenerationSpec(ids, dict(kwargs, max_new_tokens=budget, seed=seed)))
        return specs

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise APIError(400, "the prompt is empty; give a string, a list of strings, token "
                                "ids or a list of token-id lists", param="prompt")
        if isinstance(p[0], int):
            p = [p]
        if len(p) * req.n > 64:
            raise APIError(400, f"{len(p)} prompts x n={req.n} is over the limit of 64 "
                                "completions per request", param="prompt")
        prompts = []
        for i, item in enumerate(p):
            ids = self.engine.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not ids:
                raise APIError(400, f"prompt {i} is empty (0 tokens)", param="prompt")
            bad = [t for t in ids if not 0 <= t < self.engine.config.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} in prompt {i} is outside the vocabulary "
                                    f"[0, {self.engine.config.vocab_size})", param="prompt")
            prompts.append(ids)
        return prompts

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise APIError(400, "messages is empty; give at least one message", param="messages")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, f"message {i}: only text content parts are supported",
                                   param=f"messages.{i}.content")
                content = "".join(part.text for part in content)
            extra = {k: v for k, v in (m.model_extra or {}).items()}
            messages.append({**extra, "role": m.role, "content": content or ""})
        try:
            ids = self.engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tokenize=True)
        except ValueError as e:  # TokenizerError (Engine) or ArtifactError (ArtifactEngine)
            raise APIError(400, f"messages: {e}", param="messages") from None
        if not ids:
            raise APIError(400, "the rendered chat prompt is empty", param="messages")
        return ids

    # ------------------------------------------------------------------ output
    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.engine.tokenizer.decode([token_id])
        return text

    def completion_logprobs(self, delta: Delta, offset: int) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for tok, (lp, top) in zip(delta.token_ids, delta.logprobs):
            s = self.token_text(tok)
            tokens.append(s)
            values.append(lp)
            tops.append({self.token_text(i): v for i, v in top})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}

    def chat_logprobs(self, delta: Delta) -> dict:
        def entry(tok, lp):
            s = self.token_text(tok)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [dict(entry(tok, lp), top_logprobs=[entry(i, v) for i, v in top])
                            for tok, (lp, top) in zip(delta.token_ids, delta.logprobs)]}

    # ------------------------------------------------------------------ running requests
    async def submit(self, specs: list[GenerationSpec]) -> tuple[list[str], asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue()
        future = self.loop.submit(specs, queue, asyncio.get_running_loop(), time.perf_counter())
        try:
            ids = await asyncio.wrap_future(future)
        except QueueFullError as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except RequestError as e:
            raise APIError(400, str(e)) from None
        return ids, queue

    async def collect(self, request: Request, ids: list[str], queue: asyncio.Queue,
                      on_delta: Callable[[int, Delta], None]) -> None:
        """Wait for every request to finish (non-streaming); abort all if the client leaves."""
        done: set[int] = set()
        try:
            while len(done) < len(ids):
                try:
                    index, delta = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(delta, Exception):
                    raise APIError(500, f"generation failed: {delta}")
                on_delta(index, delta)
                if delta.finish_reason is not None:
                    done.add(index)
        finally:
            if len(done) < len(ids):
                self.loop.abort([rid for i, rid in enumerate(ids) if i not in done])

    async def stream(self, ids: list[str], queue: asyncio.Queue, first: list[str],
                     chunk: Callable[[int, Delta], str | None], usage: Callable[[], str | None]):
        """SSE events: `first`, one chunk per Delta, the usage chunk, [DONE]. A client that
        disconnects cancels this generator, and the finally clause aborts its requests."""
        done: set[int] = set()
        try:
            for event in first:
                yield event
            while len(done) < len(ids):
                index, delta = await queue.get()
                if isinstance(delta, Exception):
                    err = APIError(500, f"generation failed: {delta}")
                    yield _sse(err.body())
                    return
                if delta.finish_reason is not None:
                    done.add(index)
                event = chunk(index, delta)
                if event:
                    yield event
            tail = usage()
            if tail:
                yield tail
            yield "data: [DONE]\n\n"
        finally:
            if len(done) < len(ids):
                self.loop.abort([rid for i, rid in enumerate(ids) if i not in done])

    def stream_response(self, tally: "_Tally", ids: list[str], queue: asyncio.Queue, obj: str,
                        include_usage: bool, choice: Callable[[int, Delta], dict | None],
                        first_choices: tuple[dict, ...] = ()) -> StreamingResponse:
        """The SSE response of a streaming completion or chat: one `obj` chunk per choice in
        first_choices, one per Delta for which choice() gives a choice dict (None: nothing to
        send), and the usage chunk when the client asked for it."""
        extra = {"usage": None} if include_usage else {}

        def chunk(i: int, delta: Delta) -> str | None:
            tally.add(i, delta)
            c = choice(i, delta)
            return None if c is None else _sse(dict(tally.base(obj), choices=[c], **extra))

        def usage() -> str | None:
            return (_sse(dict(tally.base(obj), choices=[], usage=tally.usage()))
                    if include_usage else None)
        first = [_sse(dict(tally.base(obj), choices=[c], **extra)) for c in first_choices]
        return StreamingResponse(self.stream(ids, queue, first, chunk, usage),
                                 media_type="text/event-stream")

    # ------------------------------------------------------------------ endpoints
    async def completions(self, request: Request) -> Response:
        req = _parse(CompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        if req.logprobs is not None and req.logprobs > MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be at most {MAX_LOGPROBS}, got {req.logprobs}",
                           param="logprobs")
        prompts = self.completion_prompts(req)
        kwargs = self.sampling_kwargs(req, req.logprobs)
        specs = self.specs(prompts, req, req.max_tokens, "max_tokens", kwargs)
        ids, queue = await self.submit(specs)
        echo = [self.engine.tokenizer.decode(p) if req.echo else "" for p in prompts
                for _ in range(req.n)]
        tally = _Tally(f"cmpl-{uuid.uuid4().hex}", self.model_name,
                       sum(len(p) for p in prompts), list(echo))

        def logprobs_of(i: int, delta: Delta):
            if delta.logprobs is None:
                return None
            return self.completion_logprobs(delta, len(tally.texts[i]) - len(delta.text))

        if req.stream:
            started = [False] * len(ids)

            def choice(i: int, delta: Delta):
                text = delta.text
                if not started[i]:
                    text, started[i] = echo[i] + text, True
                if not text and delta.finish_reason is None and not delta.logprobs:
                    return None
                return {"index": i, "text": text, "logprobs": logprobs_of(i, delta),
                        "finish_reason": delta.finish_reason}
            return self.stream_response(tally, ids, queue, "text_completion",
                                        _include_usage(req), choice)

        lps: list[dict | None] = [None] * len(ids)

        def on_delta(i: int, delta: Delta):
            tally.add(i, delta)
            if delta.logprobs is not None:
                part = logprobs_of(i, delta)
                if lps[i] is None:
                    lps[i] = part
                else:
                    for k in part:
                        lps[i][k] += part[k]
        await self.collect(request, ids, queue, on_delta)
        choices = [{"index": i, "text": tally.texts[i], "logprobs": lps[i],
                    "finish_reason": tally.reasons[i]} for i in range(len(ids))]
        return JSONResponse(dict(tally.base("text_completion"), choices=choices,
                                 usage=tally.usage()))

    async def chat_completions(self, request: Request) -> Response:
        req = _parse(ChatCompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prompt = self.chat_prompt(req)
        kwargs = self.sampling_kwargs(req, logprobs)
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        specs = self.specs([prompt], req, max_tokens, name, kwargs)
        ids, queue = await self.submit(specs)
        tally = _Tally(f"chatcmpl-{uuid.uuid4().hex}", self.model_name, len(prompt),
                       [""] * len(ids))

        if req.stream:
            def choice(i: int, delta: Delta):
                if not delta.text and delta.finish_reason is None and not delta.logprobs:
                    return None
                return {"index": i, "delta": {"content": delta.text} if delta.text else {},
                        "logprobs": (self.chat_logprobs(delta)
                                     if delta.logprobs is not None else None),
                        "finish_reason": delta.finish_reason}
            first = tuple({"index": i, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None} for i in range(len(ids)))
            return self.stream_response(tally, ids, queue, "chat.completion.chunk",
                                        _include_usage(req), choice, first)

        lps: list[list] = [[] for _ in ids]

        def on_delta(i: int, delta: Delta):
            tally.add(i, delta)
            if delta.logprobs is not None:
                lps[i] += self.chat_logprobs(delta)["content"]
        await self.collect(request, ids, queue, on_delta)
        choices = [{"index": i, "message": {"role": "assistant", "content": tally.texts[i]},
                    "logprobs": {"content": lps[i]} if logprobs is not None else None,
                    "finish_reason": tally.reasons[i]} for i in range(len(ids))]
        return JSONResponse(dict(tally.base("chat.completion"), choices=choices,
                                 usage=tally.usage()))

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "xlrt", "root": self.engine.source, "max_model_len": self.max_model_len}]}

    def stats(self) -> dict:
        return dict(self.loop.snapshot, model=self.model_name, max_model_len=self.max_model_len,
                    max_num_seqs=self.engine.max_num_seqs,
                    max_waiting=self.engine.scheduler.max_waiting)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


class _Tally:
    """One response's choices as their Deltas arrive: completion tokens, text and finish reason
    per choice, and the id, creation time and usage every chunk or body repeats."""

    def __init__(self, response_id: str, model: str, prompt_tokens: int, texts: list[str]):
        self.response_id, self.model, self.prompt_tokens = response_id, model, prompt_tokens
        self.created = int(time.time())
        self.texts = texts  # per choice: the text so far (completions: after the echo)
        self.tokens = [0] * len(texts)
        self.reasons: list[str | None] = [None] * len(texts)
        self.cached = 0  # prompt tokens found in the prefix cache (the most any choice found)

    def add(self, i: int, delta: Delta) -> None:
        self.tokens[i] = delta.completion_tokens
        self.cached = max(self.cached, delta.cached_tokens)
        self.texts[i] += delta.text
        self.reasons[i] = delta.finish_reason or self.reasons[i]

    def base(self, obj: str) -> dict:
        return {"id": self.response_id, "object": obj, "created": self.created,
                "model": self.model}

    def usage(self) -> dict:
        c = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": c,
                "total_tokens": self.prompt_tokens + c,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


# ==================================================================== the app
class _APIKeyMiddleware:
    """401 for /v1/* without `Authorization: Bearer <key>` (plain ASGI, so streaming responses
    and their disconnect handling pass through untouched)."""

    def __init__(self, app, server: OpenAIServer):
        self.app = app
        self.server = server
        self.expected = f"Bearer {server.api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.server.metrics.error(401)
                err = APIError(401, "a valid API key is required: send "
                                    "'Authorization: Bearer <key>'", code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, *, model_name: str | None = None, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app serving `engine`. Starting the app (uvicorn's lifespan) starts the engine
    thread; shutting it down stops it. model_name: the id clients pass as `model` (default:
    the model config's name). api_key: when set, /v1/* needs `Authorization: Bearer <key>`."""
    server = OpenAIServer(engine, model_name or engine.config.name, api_key=api_key,
                          max_body_bytes=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="xlrt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    if api_key is not None:
        app.add_middleware(_APIKeyMiddleware, server=server)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError):
        server.metrics.error(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, e: Exception):
        log.exception("unexpected error")
        server.metrics.error(500)
        err = APIError(500, f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(err.body(), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat_completions(request)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/stats")
    async def stats():
        return server.stats()

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    install_playground(app)  # GET / (the web playground; public, its API calls carry the key)
    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["create_app", "serve", "EngineLoop", "OpenAIServer", "APIError", "visible_text"]
