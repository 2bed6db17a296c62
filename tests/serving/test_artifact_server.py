"""Serving an exported artifact: ArtifactEngine (continuous batching over the artifact's programs)
behind the real HTTP server, checked against Engine.generate on the model it was exported from."""

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")

from conftest import tiny_checkpoint  # noqa: E402
from test_server import ServerThread  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "tiny-art"
LONG = list(range(3, 40))  # 37 tokens: three prefill chunks of the 16-token bucket
PROMPTS = [[5, 17, 99, 3, 200], [7] * 20, [42, 43], list(range(60, 71))]
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(artifact dir, the Engine it was exported from, greedy references: prompt -> the
    Engine.generate token ids of 12 new tokens, all from one batched call)."""
    from serving import Engine
    from serving.artifact import ExportShapes, export
    tmp = tmp_path_factory.mktemp("art")
    eng = Engine(tiny_checkpoint(tmp), attention="xla", max_seq_len=64, num_pages=40)
    out = str(tmp / "artifact")
    export(eng, out, shapes=ExportShapes(max_batch=4, max_seq_len=64, prefill_lengths=(16,)))
    chat_ids = eng.tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    prompts = [LONG, "hi there", chat_ids, *PROMPTS]
    outs = eng.generate(prompts, max_new_tokens=12, ignore_eos=True)
    refs = {json.dumps(p): o.token_ids for p, o in zip(prompts, outs)}
    return out, eng, refs


@pytest.fixture(scope="module")
def server(exported):
    from serving.artifact_engine import ArtifactEngine
    from serving.server import create_app
    engine = ArtifactEngine.load(exported[0])
    with ServerThread(create_app(engine, model_name=NAME)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def _ref(exported, prompt, n=10) -> str:
    """The Engine's greedy text of n <= 12 new tokens (a prefix of the 12-token reference)."""
    return exported[1].tokenizer.decode(exported[2][json.dumps(prompt)][:n],
                                        skip_special_tokens=True)


def test_greedy_completions_and_chat_equal_engine_generate(exported, client):
    tok = exported[1].tokenizer
    for prompt in (LONG, PROMPTS[0], "hi there"):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == _ref(exported, prompt)
        assert r.choices[0].finish_reason == "length"
        n_prompt = len(tok.encode(prompt)) if isinstance(prompt, str) else len(prompt)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 10)
    ids = tok.apply_chat_template(MESSAGES, tokenize=True)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == _ref(exported, ids, 8)
    assert r.usage.prompt_tokens == len(ids)


def test_streaming_equals_non_streaming(client):
    kw = dict(model=NAME, prompt=LONG, max_tokens=9, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 9
    ckw = dict(model=NAME, messages=MESSAGES, max_tokens=7, temperature=0,
               extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(**ckw)
    parts = list(client.chat.completions.create(stream=True, **ckw))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == \
        chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


def test_four_concurrent_streams_each_equal_their_output_alone(exported, server):
    alone = [_ref(exported, p, 12) for p in PROMPTS]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

    async def one(p):
        stream = await aclient.completions.create(model=NAME, prompt=p, max_tokens=12,
                                                  temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream])

    async def run_all():
        try:
            return await asyncio.gather(*(one(p) for p in PROMPTS))
        finally:
            await aclient.close()
    assert asyncio.run(run_all()) == alone
    server.wait_idle()
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(rf'^xlrt:kv_pages_in_use\{{model_name="{NAME}"\}} 0\.0$', metrics, re.M)
    assert re.search(rf'^xlrt:kv_pages_total\{{model_name="{NAME}"\}} 16\.0$', metrics, re.M)


def test_sampling_on_device_matches_the_engine(exported, server):
    """Seeded top-k sampling with a repetition penalty and logprobs: the Engine's tokens and
    logprobs (same sampling functions on the same logits)."""
    eng, art = exported[1], server.state.engine
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=30, top_p=0.95, seed=11,
              repetition_penalty=1.3, logprobs=3, ignore_eos=True)
    ref = eng.generate(PROMPTS[:1], **kw)
    got = server.on_engine(lambda: art.generate(PROMPTS[:1], **kw))
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    for g, r in zip(got, ref):
        assert [t for t, _ in g.logprobs[0][1]] == [t for t, _ in r.logprobs[0][1]]
        assert g.logprobs[0][0] == pytest.approx(r.logprobs[0][0], abs=1e-4)


def test_models_bad_requests_and_stop_strings(exported, server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["root"] == exported[0]
    for body, words in [({"prompt": [5] * 70}, "context length"),
                        ({"prompt": [1, 99999]}, "vocabulary"),
                        ({"prompt": "hi", "max_tokens": 63}, "at most 62"),
                        ({"prompt": "hi", "logprobs": 50}, "logprobs")]:
        resp = httpx.post(server.url + "/v1/completions", json={"model": NAME, **body})
        assert resp.status_code == 400 and words in resp.json()["error"]["message"], resp.text
    resp = httpx.post(server.url + "/v1/chat/completions",
                      json={"model": NAME, "messages": [{"role": "user", "content": 3}]})
    assert resp.status_code == 400 and "content" in resp.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=0)
    # a stop string ends the text where it first appears, as the tokens arrive
    ids = exported[2][json.dumps(PROMPTS[0])]
    stop = _ref(exported, PROMPTS[0], 12)[3:5]
    texts = [_ref(exported, PROMPTS[0], k) for k in range(1, 13)]
    expected = next(t[:t.find(stop)] for t in texts if stop in t)
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == expected
    assert r.usage.completion_tokens <= len(ids)
    server.wait_idle()


def test_engine_limits_come_from_the_export(exported, server):
    from serving.artifact import ArtifactError
    from serving.artifact_engine import ArtifactEngine
    art = server.state.engine.artifact
    with pytest.raises(ArtifactError, match=r"max_num_seqs must be an int in \[1, 4\]"):
        ArtifactEngine(art, max_num_seqs=8)
    with pytest.raises(ArtifactError, match=r"max_seq_len must be an int in \[2, 64\]"):
        ArtifactEngine(art, max_seq_len=65)
    small = ArtifactEngine(art, max_num_seqs=2, max_seq_len=32)
    assert (small.max_num_seqs, small.max_seq_len, small.allocator.capacity) == (2, 32, 16)


def test_serving_an_artifact_in_a_fresh_process_never_imports_model(exported):
    code = (f"import sys, json; sys.path.insert(0, {ROOT!r})\n"
            "from fastapi.testclient import TestClient\n"
            "from serving.artifact_engine import ArtifactEngine\n"
            "from serving.server import create_app\n"
            f"app = create_app(ArtifactEngine.load({exported[0]!r}), model_name='a')\n"
            "with TestClient(app) as c:\n"
            "    r = c.post('/v1/chat/completions', json={'model': 'a', 'max_tokens': 4,\n"
            "               'messages': [{'role': 'user', 'content': 'hi'}]}).json()\n"
            "bad = sorted(m for m in sys.modules if m == 'model' or m.startswith('model.'))\n"
            "print('RESULT ' + json.dumps({'usage': r['usage'], 'model_modules': bad}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    assert result["model_modules"] == []
    assert result["usage"]["completion_tokens"] >= 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_script_serves_an_artifact_and_rejects_model_only_flags(exported):
    script = os.path.join(ROOT, "scripts", "serve.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    bad = subprocess.run([sys.executable, script, "--model", exported[0], "--dtype", "bfloat16",
                          "--kv-cache-gb", "2"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2
    assert "--dtype, --kv-cache-gb cannot apply to an artifact" in bad.stderr
    port = _free_port()
    proc = subprocess.Popen([sys.executable, script, "--model", exported[0], "--port", str(port),
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stderr.readline()
        assert f"on http://127.0.0.1:{port}/v1 (artifact {exported[0]}: tiny" in line, line
        deadline = time.time() + 60
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, "serve.py did not start"
                time.sleep(0.2)
        assert models["data"][0]["id"] == "artifact"
        assert models["data"][0]["root"] == exported[0]
    finally:
        proc.terminate()
        proc.wait(30)
