"""The web playground at `/`, driven in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, through selenium) against a real uvicorn server with the tiny random model.

The browser tests skip only when Chromium or its driver is not installed (.ci/run installs them)."""

import re
import shutil
import time

import httpx
import pytest

from conftest import tiny_checkpoint
from serving import Engine
from serving.playground import STATIC_DIR
from serving.server import create_app
from test_server import AUTH, KEY, ServerThread

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MAX_TOKENS = 12
CANDIDATE_PROMPTS = ("abc", "hello playground", "tell me a story", "Hello!", "xyz", "ok",
                     "What is 2+2?", "hi")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    eng = Engine(tiny_checkpoint(tmp_path_factory.mktemp("tiny")), attention="xla",
                 max_num_seqs=4, decode_steps=4, num_pages=128)
    with ServerThread(create_app(eng, api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install chromium "
                    "chromium-driver; .ci/run does it)")
    from selenium import webdriver  # the [test] extra: a missing one fails, never skips
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _greedy_chat(srv, messages, max_tokens):
    eng = srv.state.engine
    ids = eng.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return srv.on_engine(lambda: eng.generate(ids, max_new_tokens=max_tokens,
                                              ignore_eos=True)[0].text)


def _wait(driver, condition, what, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())
    except Exception as e:  # a TimeoutException says nothing about the page: add what we saw
        seen = driver.execute_script(
            "return {error: document.getElementById('error').textContent,"
            " status: document.getElementById('status').textContent}")
        raise AssertionError(f"timed out waiting for {what}; page shows {seen}") from e


def _text(driver, element_id):
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def _number(text):
    assert re.fullmatch(r"\d+(\.\d+)?", text.strip()), f"not a number: {text!r}"
    return float(text)


def _set(driver, element_id, value):
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(value)


def _send(driver, prompt):
    """Type the prompt, click Send, wait for the reply to finish; its text and figures."""
    replies_before = driver.execute_script(
        "return document.querySelectorAll('.message.assistant').length")
    _set(driver, "prompt", prompt)
    driver.find_element("id", "send").click()
    _wait(driver, lambda: driver.execute_script(
        "const r = document.querySelectorAll('.message.assistant');"
        "return r.length > arguments[0] && r[r.length - 1].classList.contains('done')",
        replies_before), "the reply to finish")
    return driver.execute_script(
        "const r = document.querySelectorAll('.message.assistant'), last = r[r.length - 1];"
        "return {text: last.querySelector('.content').textContent,"
        " line: last.querySelector('.reply-stats').textContent}")


def test_page_is_public_and_fetches_nothing_from_outside(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        if not ref.startswith("data:"):
            r = httpx.get(f"{server.url}/{ref}")
            assert r.status_code == 200, ref
    for f in STATIC_DIR.iterdir():  # no CDN, no outside URL anywhere in the shipped files
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", f.read_text()), f.name
    # the API the page calls stays guarded by the key
    assert httpx.get(server.url + "/v1/stats").status_code == 401
    assert httpx.get(server.url + "/v1/stats", headers=AUTH).status_code == 200


@pytest.fixture(scope="module")
def streamed_prompt(server):
    """A prompt whose greedy reply reaches the client in several content events. The tiny model's
    random bytes are often invalid UTF-8, which the server holds back until the end, so probe."""
    body = {"stream": True, "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    for prompt in CANDIDATE_PROMPTS:
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=120,
                          json=dict(body, messages=[{"role": "user", "content": prompt}])) as r:
            events = [line for line in r.iter_lines() if '"content": "' in line]
        if len(events) >= 3:  # the role event, then at least two pieces of text
            return prompt
    raise AssertionError(f"none of {CANDIDATE_PROMPTS} streams in pieces on the tiny model")


def _fill_controls(driver):
    _set(driver, "api_key", KEY)
    _set(driver, "temperature", "0")
    _set(driver, "max_tokens", str(MAX_TOKENS))
    driver.find_element("id", "ignore_eos").click()


def test_chat_streams_greedy_replies_with_figures(server, browser, streamed_prompt):
    first = streamed_prompt
    browser.get(server.url + "/")
    # without the key the stats poll reports the 401 on the page; with it the message goes
    _wait(browser, lambda: "API key" in _text(browser, "status"), "the missing-key message")
    _fill_controls(browser)
    _wait(browser, lambda: _text(browser, "status") == "", "stats polled with the key")
    browser.get_log("browser")  # drop the console's record of the 401s before the key

    reply = _send(browser, first)
    first_answer = _greedy_chat(server, [{"role": "user", "content": first}], MAX_TOKENS)
    assert first_answer and reply["text"] == first_answer
    assert _number(_text(browser, "ttft")) > 0
    assert _number(_text(browser, "tps")) > 0
    assert _text(browser, "tokens") == str(MAX_TOKENS)
    assert _number(_text(browser, "chunks")) >= 2  # the page read the text in several pieces
    assert "TTFT" in reply["line"] and "finish: length" in reply["line"]

    # the second turn carries the first one and the system prompt
    browser.find_element("css selector", "#system-box summary").click()
    _set(browser, "system", "be brief")
    second = "and again"
    reply = _send(browser, second)
    want = _greedy_chat(server, [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": first},
                                 {"role": "assistant", "content": first_answer},
                                 {"role": "user", "content": second}], MAX_TOKENS)
    assert reply["text"] == want

    # server figures: polled numbers that agree with /v1/stats once the engine is idle
    stats = server.wait_idle()
    _wait(browser, lambda: _text(browser, "generated") == str(stats["generation_tokens_total"]),
          "the polled stats to catch up")
    assert _text(browser, "running") == "0" and _text(browser, "waiting") == "0"
    assert _text(browser, "pages") == "0"
    assert _number(_text(browser, "pages_total")) == stats["kv_pages_total"] > 0
    assert _number(_text(browser, "compilations")) >= 1  # the tiny model compiled on first use
    assert _text(browser, "finished") == str(stats["requests_finished"])
    assert "tiny" in _text(browser, "model")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_live_figures_while_streaming_and_stop(server, browser, streamed_prompt):
    eng = server.state.engine
    prompt = streamed_prompt

    def slow_step():  # a reply that takes seconds, whatever the machine's speed
        time.sleep(0.2)
        return type(eng).step(eng)

    browser.get(server.url + "/")
    _fill_controls(browser)
    # a bad value: the server's 400 message is shown, the reply marked failed
    _set(browser, "max_tokens", "0")
    _set(browser, "prompt", prompt)
    browser.find_element("id", "send").click()
    _wait(browser, lambda: "max_tokens must be at least 1" in _text(browser, "error"),
          "the server's error message")
    assert "failed" in browser.find_element("css selector", ".reply-stats").text
    browser.find_element("id", "clear").click()
    assert _text(browser, "error") == "" and not browser.find_elements("css selector", ".message")

    _set(browser, "max_tokens", "400")
    server.on_engine(lambda: setattr(eng, "step", slow_step))
    try:
        _set(browser, "prompt", prompt)
        browser.find_element("id", "send").click()
        # text on the page and the server's figures move while the reply is still streaming
        _wait(browser, lambda: browser.execute_script(
            "const r = document.querySelector('.message.assistant');"
            "return r.classList.contains('streaming') && r.querySelector('.content').textContent"
            " !== '' && document.getElementById('running').textContent === '1'"
            " && Number(document.getElementById('pages').textContent) > 0"),
            "streamed text and running=1 with KV pages in use mid-reply")
        assert _number(_text(browser, "ttft")) > 0
        assert browser.find_element("id", "send").get_attribute("disabled") is not None
        browser.find_element("id", "stop").click()
        _wait(browser, lambda: browser.execute_script(
            "return document.querySelector('.message.assistant').classList.contains('done')"),
            "the stopped reply")
        assert "stopped" in browser.find_element("css selector", ".reply-stats").text
        # the disconnect aborted the request: the pages come back, and the page shows it
        stats = server.wait_idle()
        assert stats["requests_aborted"] >= 1
        _wait(browser, lambda: _text(browser, "pages") == "0"
              and _text(browser, "running") == "0", "the freed pages on the page")
    finally:
        server.on_engine(lambda: eng.__dict__.pop("step", None))
    assert browser.find_element("id", "send").get_attribute("disabled") is None
