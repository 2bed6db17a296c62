"""The OpenAI-compatible server over a real uvicorn on 127.0.0.1, driven by the official `openai`
client (and raw httpx for what the client hides: status codes, headers, malformed bodies).

Most tests use the tiny random model (fast); one runs the real default model (slow)."""

import asyncio
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import tiny_checkpoint
from serving import Engine
from serving.server import create_app, visible_text


class ServerThread:
    """uvicorn serving `app` on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def state(self):
        return self.app.state.server

    def on_engine(self, fn):
        """Run fn on the engine thread (the engine is not thread-safe)."""
        return self.state.loop.call(fn).result(timeout=120)

    def stats(self):
        return httpx.get(self.url + "/v1/stats", headers=AUTH).json()

    def wait_idle(self, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.stats()
            if s["running"] == 0 and s["waiting"] == 0 and s["kv_pages_in_use"] == 0:
                return s
            time.sleep(0.05)
        raise AssertionError(f"the engine did not become idle: {self.stats()}")


MODEL = "tiny"
KEY = "sekrit"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    eng = Engine(tiny_checkpoint(tmp_path_factory.mktemp("tiny")), attention="xla",
                 max_num_seqs=16, decode_steps=4)
    with ServerThread(create_app(eng, api_key=KEY, max_body_bytes=64 * 1024)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)


def _prompts(n, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, rng.integers(2, 30)).tolist() for _ in range(n)]


def _generate(srv, prompt, **kw):
    eng = srv.state.engine
    return srv.on_engine(lambda: eng.generate(prompt, **kw)[0])


def test_completion_greedy_equals_engine_generate_with_usage(tiny_server, client):
    prompt = [5, 17, 99, 3, 200]
    ref = _generate(tiny_server, prompt, max_new_tokens=12, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 12)
    assert r.usage.total_tokens == 17
    assert r.object == "text_completion" and r.model == MODEL


def test_repeated_prompt_is_served_from_the_prefix_cache(tiny_server, client):
    prompt = list(range(20, 60))  # 40 tokens: 2 full pages of 16 can be reused
    kw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    cold = client.completions.create(**kw)
    warm = client.completions.create(**kw)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens == 32
    assert warm.choices[0].text == cold.choices[0].text
    text = httpx.get(tiny_server.url + "/metrics").text
    hits = float(re.search(r'^xlrt:prefix_cache_hits_total\{[^}]*\} (\S+)$', text, re.M)[1])
    queries = float(re.search(r'^xlrt:prefix_cache_queries_total\{[^}]*\} (\S+)$', text, re.M)[1])
    assert hits >= 32 and queries >= 80
    assert re.search(r'^xlrt:kv_pages_cached\{[^}]*\} [1-9]', text, re.M)


def test_completion_text_prompt_stream_with_usage_equals_non_stream(tiny_server, client):
    kw = dict(model=MODEL, prompt="hello there", max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens == len("hello there")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert len([c for c in chunks if c.choices]) >= 2  # tokens arrive incrementally


def test_finish_reason_stop_at_eos_and_at_stop_string(tiny_server, client):
    # EOS: the tiny model's EOS is <|end|> (id 257); a stop token id behaves the same way.
    prompt = [40, 41, 42]
    ref = _generate(tiny_server, prompt, max_new_tokens=20, ignore_eos=True)
    stop_id = ref.token_ids[5]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    first = ref.token_ids.index(stop_id)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == first + 1
    # A two-character stop string taken from the greedy text: the text ends right before it,
    # streamed or not (streaming holds back a possible start of a stop string).
    prompt = [65, 66, 67, 68, 69, 70]
    text = _generate(tiny_server, prompt, max_new_tokens=20, ignore_eos=True).text
    cut = next(i for i in range(2, len(text) - 2)
               if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    stop = text[cut:cut + 2]
    expected = text[:text.find(stop)]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_stream_and_not_equal_engine_on_the_chat_template(tiny_server, client):
    eng = tiny_server.state.engine
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}]
    ids = eng.tokenizer.apply_chat_template(messages, tokenize=True)
    ref = _generate(tiny_server, ids, max_new_tokens=8, ignore_eos=True)
    kw = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    # max_completion_tokens (the newer name) and content given as text parts
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": [{"type": "text", "text": "be "},
                                                               {"type": "text", "text": "brief"}]},
                               {"role": "user", "content": "hi!"}],
        max_completion_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == ref.text


def test_logprobs_match_the_engine(tiny_server, client):
    prompt = [7, 8, 9, 10]
    ref = _generate(tiny_server, prompt, max_new_tokens=5, ignore_eos=True, logprobs=3)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x[0] for x in ref.logprobs], abs=1e-5)
    assert all(len(t) == 3 for t in lp.top_logprobs) and len(lp.tokens) == 5
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.logprob <= 0 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)


def test_seed_and_n(tiny_server, client):
    kw = dict(model=MODEL, prompt=[11, 12, 13], max_tokens=10, temperature=1.0,
              extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01,
                          "repetition_penalty": 1.1})
    a = client.completions.create(n=3, seed=123, **kw)
    b = client.completions.create(n=3, seed=123, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # choice i samples with seed + i
    assert a.usage.completion_tokens == 30 and a.usage.prompt_tokens == 3
    streamed = list(client.completions.create(n=3, seed=123, stream=True, **kw))
    for i in range(3):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) \
            == a.choices[i].text


def test_sixteen_concurrent_streams_each_equal_their_output_alone(tiny_server):
    prompts = _prompts(16, seed=1)
    alone = [_generate(tiny_server, p, max_new_tokens=16, ignore_eos=True).text for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)

    async def one(p):
        stream = await aclient.completions.create(model=MODEL, prompt=p, max_tokens=16,
                                                  temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream])

    async def run_all():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()
    assert asyncio.run(run_all()) == alone
    tiny_server.wait_idle()


def test_disconnect_mid_stream_aborts_and_frees_pages(tiny_server):
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30, headers=AUTH) as http:
        with http.stream("POST", tiny_server.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [line for line, _ in zip(lines, range(4)) if line.startswith("data:")]
            assert got and tiny_server.stats()["kv_pages_in_use"] > 0
        # leaving the block closes the connection mid-stream
    stats = tiny_server.wait_idle()
    assert stats["requests_aborted"] >= 1
    metrics = httpx.get(tiny_server.url + "/metrics").text
    assert re.search(r'^xlrt:kv_pages_in_use\{model_name="tiny"\} 0\.0$', metrics, re.M)
    assert re.search(r'^xlrt:request_success_total\{finished_reason="abort",model_name="tiny"\} '
                     r'[1-9]', metrics, re.M)


def test_metrics_and_stats_and_models(tiny_server, client):
    client.completions.create(model=MODEL, prompt=[3, 4], max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    text = httpx.get(tiny_server.url + "/metrics").text
    for name in ["xlrt:time_to_first_token_seconds_count", "xlrt:time_per_output_token_seconds_count",
                 "xlrt:e2e_request_latency_seconds_count", "xlrt:inter_token_latency_seconds_count",
                 "xlrt:num_requests_running", "xlrt:num_requests_waiting", "xlrt:kv_pages_in_use",
                 "xlrt:prompt_tokens_total", "xlrt:generation_tokens_total",
                 "xlrt:compilations_total", "process_resident_memory_bytes"]:
        m = re.search(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M)
        assert m, name
    gen = float(re.search(r"^xlrt:generation_tokens_total\{[^}]*\} (\S+)$", text, re.M)[1])
    stats = tiny_server.stats()
    assert gen == stats["generation_tokens_total"] >= 4
    assert stats["compilations_since_start"] >= 0 and stats["kv_pages_total"] > 0
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}


BAD_INPUTS = [
    # (endpoint, raw body or json, words the error message must contain)
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", ', "malformed JSON"),
    ("/v1/completions", b'[1, 2]', "JSON object"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": "tiny"}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 100000}, "limit"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 600}, "context length"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 500, "max_tokens": 100}, "at most 12"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, "empty"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, "empty"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, "vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": -1}, "seed"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, "does not exist"),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * 70000}, "limit of 65536 bytes"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "hi"}]}, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 3}]},
     "content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
     "does not exist"),
]


@pytest.mark.parametrize("path,body,words", BAD_INPUTS,
                         ids=[f"{i}-{p.split('/')[-1]}" for i, (p, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_400_and_the_server_keeps_working(tiny_server, client, path, body, words):
    url = tiny_server.url + path
    if isinstance(body, bytes):
        resp = httpx.post(url, content=body, headers={"content-type": "application/json", **AUTH})
    else:
        resp = httpx.post(url, json=body, headers=AUTH)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert words.lower() in err["message"].lower(), err["message"]
    r = client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)


def test_full_queue_gives_429_with_retry_after(tiny_server):
    eng, sched = tiny_server.state.engine, tiny_server.state.engine.scheduler
    limits = (sched.max_num_seqs, sched.max_waiting)

    def slow_step():  # keep the running request busy for seconds, whatever the machine's speed
        time.sleep(0.05)
        return type(eng).step(eng)

    def squeeze():
        sched.max_num_seqs, sched.max_waiting = 1, 1
        eng.step = slow_step

    def restore():
        sched.max_num_seqs, sched.max_waiting = limits
        del eng.step
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 300, "temperature": 0,
            "stream": True, "ignore_eos": True}
    url = tiny_server.url + "/v1/completions"
    tiny_server.on_engine(squeeze)
    try:
        with httpx.Client(timeout=30, headers=AUTH) as http:
            with http.stream("POST", url, json=body) as running:
                lines = running.iter_lines()  # kept: closing this iterator closes the stream
                assert next(lines).startswith("data:")
                with http.stream("POST", url, json=body) as waiting:
                    assert waiting.status_code == 200
                    assert tiny_server.stats()["waiting"] == 1
                    t0 = time.perf_counter()
                    full = http.post(url, json=body)
                    assert time.perf_counter() - t0 < 5
                    assert full.status_code == 429
                    assert full.headers["retry-after"] == "1"
                    assert full.json()["error"]["code"] == "queue_full"
            tiny_server.wait_idle()
    finally:
        tiny_server.on_engine(restore)
    ok = httpx.post(url, json=dict(body, stream=False, max_tokens=3), headers=AUTH)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_engine_failure_gives_500_and_the_server_keeps_serving(tiny_server, client):
    eng = tiny_server.state.engine

    def failing_step():
        del eng.step  # fail once
        raise RuntimeError("device lost")
    tiny_server.on_engine(lambda: setattr(eng, "step", failing_step))
    resp = httpx.post(tiny_server.url + "/v1/completions", headers=AUTH,
                      json={"model": MODEL, "prompt": [1, 2], "max_tokens": 4})
    assert resp.status_code == 500 and "device lost" in resp.json()["error"]["message"]
    assert tiny_server.wait_idle()["engine_errors"] == 1
    r = client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_api_key_required_on_v1(tiny_server):
    wrong = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    resp = httpx.post(tiny_server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(tiny_server.url + "/health").status_code == 200  # not behind the key
    assert httpx.get(tiny_server.url + "/metrics").status_code == 200


def test_visible_text_holds_back_stop_prefixes_and_partial_characters():
    assert visible_text("abc\ufffd", False, ()) == "abc"
    assert visible_text("abc\ufffd", True, ()) == "abc\ufffd"
    assert visible_text("hello wo", False, ("world",)) == "hello "
    assert visible_text("hello w!", False, ("world",)) == "hello w!"
    assert visible_text("x\n", False, ("\n\n", "END")) == "x"
    assert visible_text("xEN", False, ("\n\n", "END")) == "x"


@pytest.mark.slow
def test_smollm2_chat_greedy_equals_engine(smollm2_engine):
    eng = smollm2_engine
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = eng.tokenizer.apply_chat_template(messages, tokenize=True)
    ref = eng.generate(ids, max_new_tokens=24)[0]
    with ServerThread(create_app(eng, model_name="smollm2")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
                                           temperature=0)
        assert r.choices[0].message.content == ref.text
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == ref.finish_reason
        chunks = client.chat.completions.create(model="smollm2", messages=messages,
                                                max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
        srv.wait_idle()
