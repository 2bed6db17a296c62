"""Engine: the public API to load a model, tokenize, score and generate.

    eng = Engine.from_pretrained("smollm2-135m-instruct")
    eng.generate(["a prompt", [1, 2, 3]], max_new_tokens=32, temperature=0.0)

Generation runs a small fixed set of compiled programs: prefill at power-of-two length buckets,
and a decode program that runs up to `decode_steps` steps on device per host call (sampling on
device, early exit when every row is done). Batches are padded to power-of-two sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.checkpoint import Checkpoint
from model.config import ModelConfig
from model.decoder import Decoder, KVCache, default_positions, forward, logical_axes
from model.decoder import decode_step as model_decode_step
from model.decoder import prefill as model_prefill
from model.registry import load_checkpoint
from serving.sampling import SamplingParams, SamplingTensors, sample
from sharding import activation_sharding, get_rules, place_params, tree_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIN_PREFILL_BUCKET = 16


class RequestError(ValueError):
    """A request the engine cannot serve; the message names the problem and the limit."""


@dataclasses.dataclass
class GenerationOutput:
    token_ids: list[int]         # generated ids (an EOS that ended generation is included)
    text: str                    # generated text (special tokens and the stop string removed)
    finish_reason: str           # "stop" (EOS or stop string) or "length"
    prompt_token_ids: list[int]
    ttft_s: float = 0.0          # time to first token (prefill), seconds
    decode_s: float = 0.0        # time spent after the first token, seconds


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Engine:
    """A loaded model with its tokenizer and compiled programs."""

    def __init__(self, checkpoint: Checkpoint, *, dtype: str = "float32", attention: str = "auto",
                 mesh=None, rules=None, max_seq_len: int | None = None, page_size: int = 16,
                 decode_steps: int = 16, progress: bool = False):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.source = checkpoint.source
        self.dtype = DTYPES[dtype]
        self.mesh = mesh
        self.rules = get_rules(rules)
        self.page_size = page_size
        self.decode_steps = decode_steps
        self.max_seq_len = min(max_seq_len or self.config.max_seq_len, self.config.max_seq_len)
        self.model = Decoder(self.config, dtype=self.dtype, param_dtype=self.dtype,
                             attention_impl=attention)
        self.param_axes = logical_axes(self.model)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(checkpoint.tensors), desc="loading weights", unit="tensor")
        self.params = place_params(checkpoint.tree(), self.param_axes, mesh, self.rules, self.dtype,
                                   progress=bar.update if bar else None)
        if bar:
            bar.close()
        eos = set(getattr(self.tokenizer, "eos_ids", ()) or ())
        if self.config.eos_id is not None:
            eos.add(self.config.eos_id)
        self.eos_ids = sorted(eos)
        self._programs: dict = {}
        self._request_counter = 0

    @classmethod
    def from_pretrained(cls, model: str = "smollm2-135m-instruct", **kwargs) -> "Engine":
        """Load a known model name, a .gguf file, or a Hugging Face directory.

        kwargs: dtype ("float32" | "bfloat16"), attention ("auto" | "xla" | "pallas" |
        "pallas_interpret"), mesh (jax Mesh from sharding.make_mesh), rules (preset name or
        table), max_seq_len, page_size, decode_steps, progress (tqdm bar while loading).
        """
        return cls(load_checkpoint(model), **kwargs)

    # ---------------------------------------------------------------- programs
    def _jit(self, key, fn, **jit_kwargs):
        if key not in self._programs:
            self._programs[key] = jax.jit(fn, **jit_kwargs)
        return self._programs[key]

    def _kv_sharding(self):
        if self.mesh is None:
            return None
        shapes = {"k": KVCache.shape(self.config, 2, self.page_size)}
        return tree_shardings({"k": KVCache.AXES}, shapes, self.mesh, self.rules)["k"]

    def _forward_program(self):
        model = self.model
        return self._jit("forward", lambda p, t, pos: forward(model, p, t, pos))

    def _prefill_program(self):
        model = self.model

        def run(params, cache, tokens, positions, page_table, kv_lens, logits_at, sampling):
            logits, cache = model_prefill(model, params, tokens, positions, cache, page_table,
                                          kv_lens, logits_at)
            first = sample(logits, sampling, kv_lens)
            return first, cache
        return self._jit("prefill", run, donate_argnums=(1,))

    def _decode_program(self):
        model, steps = self.model, self.decode_steps
        eos = jnp.asarray(self.eos_ids or [-1], jnp.int32)

        def run(params, cache, last_tok, pos, page_table, done, limit, sampling):
            """Feed last_tok at pos, sample the next token; repeat up to `steps` times."""
            b = last_tok.shape[0]
            out = jnp.zeros((b, steps), jnp.int32)

            def cond(state):
                i, _, _, _, done, _ = state
                return (i < steps) & ~jnp.all(done)

            def body(state):
                i, cache, tok, pos, done, out = state
                logits, cache = model_decode_step(model, params, tok, pos, cache, page_table)
                nxt = sample(logits, sampling, pos + 1)
                nxt = jnp.where(done, 0, nxt)
                out = out.at[:, i].set(nxt)
                new_pos = jnp.where(done, pos, pos + 1)
                done = done | jnp.isin(nxt, eos) | (new_pos + 1 >= limit)
                return i + 1, cache, nxt, new_pos, done, out

            i, cache, tok, pos, done, out = jax.lax.while_loop(
                cond, body, (jnp.int32(0), cache, last_tok, pos, done, out))
            return out, i, tok, pos, done, cache
        return self._jit("decode", run, donate_argnums=(1,))

    # ---------------------------------------------------------------- validation
    def _to_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary "
                                   f"[0, {self.config.vocab_size})")
        else:
            raise RequestError(f"a prompt must be a string or a list of token ids, "
                               f"got {type(prompt).__name__}")
        if not ids:
            raise RequestError("the prompt is empty (0 tokens); give at least one token")
        return ids

    # ---------------------------------------------------------------- public API
    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits, numpy float32 [len(ids), vocab]."""
        ids = self._to_ids(list(ids))
        if len(ids) > self.max_seq_len:
            raise RequestError(f"{len(ids)} tokens exceed the context limit {self.max_seq_len}")
        t = min(next_power_of_two(len(ids), MIN_PREFILL_BUCKET), self.max_seq_len)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :len(ids)] = ids
        with activation_sharding(self.mesh, self.rules):
            tokens = jnp.asarray(tokens)
            logits = self._forward_program()(self.params, tokens, default_positions(tokens))
        return np.asarray(logits[0, :len(ids)], dtype=np.float32)

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None) -> list[GenerationOutput]:
        """Complete each prompt (a string or a list of token ids); one output per prompt.

        Greedy at temperature 0. With a seed, row i uses seed + i, so results are reproducible.
        Generation ends at an EOS token, a stop string (removed from the text), or
        max_new_tokens (finish_reason "length").
        """
        if isinstance(prompts, (str,)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts given")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise RequestError("stop strings must be non-empty strings")
        ids = [self._to_ids(p) for p in prompts]
        for i, p in enumerate(ids):
            if len(p) + max_new_tokens > self.max_seq_len:
                raise RequestError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(p) + max_new_tokens}, over the context limit {self.max_seq_len}")
        params = []
        for i in range(len(ids)):
            row_seed = None if seed is None else (seed + i) % 2**32
            params.append(SamplingParams(temperature, top_k, top_p, min_p, row_seed).validate())
        with activation_sharding(self.mesh, self.rules):
            return self._generate_batch(ids, params, max_new_tokens, stops)

    def _generate_batch(self, ids, sampling_params, max_new_tokens, stops):
        n = len(ids)
        b = next_power_of_two(n)
        total = max(len(p) for p in ids) + max_new_tokens
        pages_per_seq = next_power_of_two(math.ceil(total / self.page_size))
        t_prefill = min(next_power_of_two(max(len(p) for p in ids), MIN_PREFILL_BUCKET),
                        pages_per_seq * self.page_size)
        # Page 0 is the padding sink; row r owns pages 1 + r * pages_per_seq ... (contiguous).
        page_table = (1 + np.arange(b * pages_per_seq, dtype=np.int32)).reshape(b, pages_per_seq)
        cache = KVCache.zeros(self.config, 1 + b * pages_per_seq, self.page_size, self.dtype,
                              self._kv_sharding())

        tokens = np.zeros((b, t_prefill), np.int32)
        lens = np.ones(b, np.int32)  # padding rows hold one dummy token
        for r, p in enumerate(ids):
            tokens[r, :len(p)] = p
            lens[r] = len(p)
        seeds = [self._next_request_seed() for _ in range(n)]
        sampling = SamplingTensors.from_params(sampling_params, b, seeds)
        page_table_d = jnp.asarray(page_table)

        start = time.perf_counter()
        tokens_d = jnp.asarray(tokens)
        first, cache = self._prefill_program()(
            self.params, cache, tokens_d, default_positions(tokens_d), page_table_d,
            jnp.asarray(lens), jnp.asarray(lens - 1), sampling)
        first = np.asarray(first)
        ttft = time.perf_counter() - start

        generated = [[int(first[r])] for r in range(n)]
        limit = lens + max_new_tokens  # a row is done once its next position reaches this
        done = np.ones(b, bool)
        finish = ["length"] * n
        for r in range(n):
            done[r] = self._row_finished(generated[r], stops, max_new_tokens, finish, r)
        last = first.astype(np.int32)
        pos = lens.copy()  # position of `last`
        decode = self._decode_program()
        while not done.all():
            out, steps, last_d, pos_d, _, cache = decode(
                self.params, cache, jnp.asarray(last), jnp.asarray(pos), page_table_d,
                jnp.asarray(done), jnp.asarray(limit), sampling)
            out, steps = np.asarray(out), int(steps)
            last, pos = np.array(last_d), np.array(pos_d)
            for r in range(n):
                if done[r]:
                    continue
                for tok in out[r, :steps]:
                    generated[r].append(int(tok))
                    if self._row_finished(generated[r], stops, max_new_tokens, finish, r):
                        break
                done[r] = finish[r] != "length" or len(generated[r]) >= max_new_tokens
        elapsed = time.perf_counter() - start
        return [self._output(ids[r], generated[r], finish[r], stops, ttft, elapsed - ttft)
                for r in range(n)]

    def _row_finished(self, tokens, stops, max_new_tokens, finish, r) -> bool:
        if tokens[-1] in self.eos_ids:
            finish[r] = "stop"
            return True
        if stops:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if any(s in text for s in stops):
                finish[r] = "stop"
                return True
        return len(tokens) >= max_new_tokens

    def _output(self, prompt_ids, tokens, finish, stops, ttft, decode_s) -> GenerationOutput:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if stops:
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        return GenerationOutput(token_ids=list(tokens), text=text, finish_reason=finish,
                                prompt_token_ids=list(prompt_ids), ttft_s=ttft, decode_s=decode_s)

    def _next_request_seed(self) -> int:
        self._request_counter += 1
        return (self._request_counter * 0x9E3779B1) % 2**32
