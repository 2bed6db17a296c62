// The xlrt playground: a chat over POST /v1/chat/completions (streamed, SSE read with fetch and
// a ReadableStream), figures per reply measured in the browser, and the server's /v1/stats polled
// once a second. Plain browser JavaScript, same origin only, no libraries.
"use strict";

const STATS_PERIOD_MS = 1000;

const $ = (id) => document.getElementById(id);
const turns = [];            // [{role, content}] of the finished turns
let chatEpoch = 0;           // bumped by "Clear chat": a reply still running then is dropped
let inFlight = null;         // AbortController of the running reply

// ------------------------------------------------------------------ request building
function headers() {
  const h = {"content-type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h["authorization"] = "Bearer " + key;
  return h;
}

// A number from an <input>; empty -> undefined when optional. Throws naming the field.
function numberField(id, {integer = false, optional = false} = {}) {
  const raw = $(id).value.trim();
  if (raw === "") {
    if (optional) return undefined;
    throw new Error(`${id} is empty; give a number`);
  }
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${id} must be ${integer ? "a whole number" : "a number"}, got "${raw}"`);
  }
  return value;
}

function requestBody(messages) {
  const body = {
    messages,
    stream: true,
    stream_options: {include_usage: true},
    temperature: numberField("temperature"),
    top_p: numberField("top_p"),
    top_k: numberField("top_k", {integer: true}),
    max_tokens: numberField("max_tokens", {integer: true}),
  };
  const seed = numberField("seed", {integer: true, optional: true});
  if (seed !== undefined) body.seed = seed;
  if ($("ignore_eos").checked) body.ignore_eos = true;
  return body;
}

// ------------------------------------------------------------------ SSE
// Yields the parsed JSON of each `data:` event until [DONE]; events end with a blank line.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status} ${response.statusText}`;
}

// ------------------------------------------------------------------ rendering
function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "message " + role;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;   // never innerHTML: model output is text
  box.append(who, content);
  $("messages").append(box);
  box.scrollIntoView({block: "end"});
  return box;
}

function fmt(x, digits) {
  return x === null || x === undefined || !Number.isFinite(x) ? "-" : x.toFixed(digits);
}

function showReplyFigures(box, fig) {
  $("ttft").textContent = fmt(fig.ttftMs, 0);
  $("tps").textContent = fmt(fig.tokensPerSecond, 1);
  $("tokens").textContent = fig.tokens === null ? "-" : String(fig.tokens);
  $("chunks").textContent = String(fig.chunks);
  let line = box.querySelector(".reply-stats");
  if (!line) {
    line = document.createElement("div");
    line.className = "reply-stats";
    box.append(line);
  }
  line.textContent = `TTFT ${fmt(fig.ttftMs, 0)} ms · ${fmt(fig.tokensPerSecond, 1)} tokens/s · `
    + `${fig.tokens === null ? "?" : fig.tokens} tokens` + (fig.note ? ` · ${fig.note}` : "");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

function showError(text) {
  $("error").textContent = text || "";
}

// ------------------------------------------------------------------ one reply
async function send() {
  const text = $("prompt").value;
  if (inFlight || !text.trim()) return;
  showError("");
  const system = $("system").value.trim();
  const turn = {role: "user", content: text};
  const messages = (system ? [{role: "system", content: system}] : []).concat(turns, [turn]);
  let body;
  try {
    body = requestBody(messages);
  } catch (e) {
    showError(e.message);
    return;
  }
  $("prompt").value = "";
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.classList.add("streaming");
  const content = box.querySelector(".content");

  // TTFT: send -> first content chunk; tokens/s: tokens after the first over the time after it
  // (the decode rate, as TPOT's inverse); token count from the usage chunk (include_usage).
  const fig = {ttftMs: null, tokensPerSecond: null, tokens: null, chunks: 0, note: ""};
  const sent = performance.now(), epoch = chatEpoch;
  let firstAt = null, lastAt = null, answer = "", finish = null;
  inFlight = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: inFlight.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message || "generation failed");
      if (event.usage) fig.tokens = event.usage.completion_tokens;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const piece = (choice.delta && choice.delta.content) || "";
      if (piece) {
        lastAt = performance.now();
        if (firstAt === null) {
          firstAt = lastAt;
          fig.ttftMs = firstAt - sent;
        }
        answer += piece;
        fig.chunks += 1;
        content.textContent = answer;
        showReplyFigures(box, fig);
        box.scrollIntoView({block: "end"});
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    fig.note = finish ? `finish: ${finish}` : "";
  } catch (e) {
    if (e.name === "AbortError") {
      fig.note = "stopped";
    } else {
      fig.note = "failed";
      showError(e.message);
    }
  } finally {
    inFlight = null;
    setBusy(false);
  }
  if (fig.tokens !== null && fig.tokens >= 2 && lastAt - firstAt >= 1) {
    fig.tokensPerSecond = (fig.tokens - 1) / ((lastAt - firstAt) / 1000);
  } else if (fig.tokens && lastAt !== null) {
    // all text arrived in one burst: no decode interval to measure, so the whole reply's rate
    fig.tokensPerSecond = fig.tokens / ((lastAt - sent) / 1000);
  }
  box.classList.remove("streaming");
  box.classList.add("done");
  showReplyFigures(box, fig);
  if (epoch === chatEpoch && (answer || fig.note !== "failed")) {
    turns.push(turn, {role: "assistant", content: answer});
  }
}

function stop() {
  if (inFlight) inFlight.abort();   // the server sees the disconnect and frees the KV pages
}

function clearChat() {
  stop();
  chatEpoch += 1;
  turns.length = 0;
  $("messages").replaceChildren();
  showError("");
}

// ------------------------------------------------------------------ server figures
async function pollStats() {
  try {
    const response = await fetch("v1/stats", {headers: headers(), cache: "no-store"});
    if (!response.ok) throw new Error(await errorMessage(response));
    const s = await response.json();
    $("running").textContent = s.running;
    $("waiting").textContent = s.waiting;
    $("pages").textContent = s.kv_pages_in_use;
    $("pages_total").textContent = s.kv_pages_total;
    $("compilations").textContent = s.compilations_since_start;
    $("generated").textContent = s.generation_tokens_total;
    $("finished").textContent = s.requests_finished;
    $("model").textContent = "model: " + s.model;
    $("stats-age").textContent = "updated " + new Date().toLocaleTimeString();
    $("status").textContent = "";
  } catch (e) {
    $("stats-age").textContent = "stats unavailable";
    $("status").textContent = e.message;
  } finally {
    setTimeout(pollStats, STATS_PERIOD_MS);
  }
}

// ------------------------------------------------------------------ wiring
document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearChat);
  pollStats();
});
