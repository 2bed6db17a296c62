"""Engine: the public API to load a model, tokenize, score, generate and stream.

    eng = Engine.from_pretrained("smollm2-135m-instruct")
    eng.generate(["a prompt", [1, 2, 3]], max_new_tokens=32, temperature=0.0)
    for chunk in eng.stream("a prompt", max_new_tokens=32): print(chunk.text, end="")

Generation runs on a paged KV cache with continuous batching (serving.scheduler). A small fixed
set of compiled programs covers all traffic: prefill at power-of-two (batch, length, pages)
buckets, and one decode program per (batch, pages) bucket that runs up to `decode_steps` steps on
device per call (sampling on device, early exit when every row is done).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.checkpoint import Checkpoint
from model.config import ConfigError, ModelConfig
from model.decoder import (Decoder, KVCache, abstract_params, forward,
                           logical_axes)
from model.decoder import decode_step as model_decode_step
from model.decoder import prefill as model_prefill
from model.kernels import cpu_ffi, split_impl
from model.layers import fuse_projection_loaders
from model.quantize import int8_loaders, nk_loaders
from model.registry import load_checkpoint
from serving.host_memory import HugePageArena, keep_freed_memory
from serving.kv_pages import PageAllocator, pages_for_budget
from serving.sampling import (MAX_LOGPROBS, SamplingTensors,
                              apply_penalties, sample, top_logprobs)
from serving.scheduler import (Plan, QueueFullError, Request, RequestError, RequestFrontEnd,
                               Scheduler)
from sharding import (activation_sharding, fit_rules, get_rules, kv_cache_sharding, logical_dims,
                      place_params)
from sharding.placement import kv_scale_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
KV_CACHE_DTYPES = ("auto", "int8")  # auto: the compute dtype
MIN_PREFILL_BUCKET = 16


@dataclasses.dataclass
class GenerationOutput:
    token_ids: list[int]         # generated ids (an EOS that ended generation is included)
    text: str                    # generated text (special tokens and the stop string removed)
    finish_reason: str           # "stop" (EOS, stop token or stop string), "length" or "abort"
    prompt_token_ids: list[int]
    logprobs: list | None = None  # per token: (logprob, [(id, logprob) x top-n])
    request_id: str = ""
    ttft_s: float = 0.0          # arrival to first token, seconds
    e2e_s: float = 0.0           # arrival to finish, seconds
    num_preemptions: int = 0
    num_cached_tokens: int = 0   # prompt tokens served from the prefix cache (not prefilled)


@dataclasses.dataclass
class StreamChunk:
    token_ids: list[int]         # tokens produced since the previous chunk
    text: str                    # text produced since the previous chunk
    finish_reason: str | None    # set on the last chunk
    logprobs: list | None = None


# None: float weights; "int8": weight-only int8 (per-channel scales); "w8a8": int8 weights, and
# activations quantized per row to int8 for int8 x int8 matmuls (model.layers.matmul_2d).
QUANTIZATIONS = (None, "int8", "w8a8")


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Engine(RequestFrontEnd):
    """A loaded model with its tokenizer, paged KV cache, scheduler and compiled programs."""

    def __init__(self, checkpoint: Checkpoint, *, dtype: str = "float32", attention: str = "auto",
                 mesh=None, rules=None, max_seq_len: int | None = None, page_size: int = 16,
                 kv_cache_gb: float = 1.0, num_pages: int | None = None, max_num_seqs: int = 32,
                 max_waiting: int = 1024, prefill_chunk: int = 512, max_prefill_seqs: int = 8,
                 decode_steps: int = 8, quantization: str | None = None, scan_layers: bool = False,
                 kv_cache_dtype: str = "auto", fuse_projections: bool | None = None,
                 int8_weight_layout: str | None = None, f32_weight_layout: str | None = None,
                 enable_prefix_caching: bool = True, progress: bool = False):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        keep_freed_memory()  # XLA's per-call temporaries reused, not faulted in again (glibc)
        if prefill_chunk & (prefill_chunk - 1) or prefill_chunk < MIN_PREFILL_BUCKET:
            raise ConfigError(f"prefill_chunk must be a power of two >= {MIN_PREFILL_BUCKET}, "
                              f"got {prefill_chunk}")
        for name, value, low in (("page_size", page_size, 1), ("max_num_seqs", max_num_seqs, 1),
                                 ("max_waiting", max_waiting, 0), ("decode_steps", decode_steps, 1),
                                 ("max_prefill_seqs", max_prefill_seqs, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if num_pages is not None and (not isinstance(num_pages, int) or num_pages < 2):
            raise ConfigError(f"num_pages must be an integer >= 2 (page 0 is reserved), "
                              f"got {num_pages!r}")
        if num_pages is None and not kv_cache_gb > 0:
            raise ConfigError(f"kv_cache_gb must be > 0, got {kv_cache_gb!r}")
        try:
            split_impl(attention)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.source = checkpoint.source
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.mesh = mesh
        self.rules = get_rules(rules)
        self.page_size = page_size
        self.decode_steps = decode_steps
        self.prefill_chunk = prefill_chunk
        self.max_num_seqs = max_num_seqs
        self.max_seq_len = min(max_seq_len or self.config.max_seq_len, self.config.max_seq_len)
        if quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization={quantization!r} is not supported; choose one of "
                              f"{QUANTIZATIONS}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; choose one of "
                              f"{', '.join(KV_CACHE_DTYPES)}")
        self.quantization = quantization
        self.kv_cache_dtype = kv_cache_dtype
        if fuse_projections is None:  # on where it is possible: one device
            fuse_projections = mesh is None
        elif fuse_projections and mesh is not None:
            raise ConfigError("fuse_projections needs one device (no mesh): a fused q|k|v weight "
                              "mixes axes that tensor parallelism shards separately")
        self.fuse_projections = bool(fuse_projections)
        # Decode on one CPU device runs the compiled kernels (docs/KERNELS.md): the int8 matmuls
        # of quantized models and the paged attention of float32 ones. Built and registered
        # now, so executables loaded from an AOT store find them too.
        self.cpu_kernels = ((quantization is not None or jnp.dtype(self.dtype) == jnp.float32)
                            and mesh is None and jax.default_backend() == "cpu"
                            and cpu_ffi.load())
        for flag, layout in (("int8_weight_layout", int8_weight_layout),
                             ("f32_weight_layout", f32_weight_layout)):
            if layout not in (None, "kn", "nk"):
                raise ConfigError(f"{flag} must be None (auto), 'kn' or 'nk', got {layout!r}")
        # None: what this CPU's kernels stream fastest. The int8 layout applies to quantized
        # models, the float32 one to float32 models; every other model reads [K, N].
        if int8_weight_layout is None:
            int8_weight_layout = (cpu_ffi.int8_weight_layout(quantization or "int8")
                                  if self.cpu_kernels else "kn")
        if f32_weight_layout is None:
            f32_weight_layout = cpu_ffi.f32_weight_layout() if self.cpu_kernels else "kn"
        float32 = quantization is None and jnp.dtype(self.dtype) == jnp.float32
        self.int8_weight_layout = int8_weight_layout if quantization is not None else "kn"
        self.f32_weight_layout = f32_weight_layout if float32 else "kn"
        self.model = Decoder(self.config, dtype=self.dtype, param_dtype=self.dtype,
                             attention_impl=attention, weight_quant=quantization or "none",
                             scan_layers=scan_layers, fuse_projections=self.fuse_projections,
                             nk_weights="nk" in (self.int8_weight_layout, self.f32_weight_layout))
        self.param_axes = logical_axes(self.model)
        if mesh is not None:  # dims the mesh cannot split are replicated in params and activations
            self.rules = fit_rules(self.rules, mesh, logical_dims(abstract_params(self.model)))
        loaders = checkpoint.tree(scan_layers=scan_layers)
        if self.fuse_projections:
            loaders = fuse_projection_loaders(loaders)
        # [N, K] weights: transposed from the [K, N] float model's order as they load
        float_axes = (logical_axes(self.model.clone(weight_quant="none", nk_weights=False))
                      if self.model.nk_weights else None)
        if quantization is not None:
            loaders = int8_loaders(loaders, self.param_axes, float_axes)
        elif float_axes is not None:
            loaders = nk_loaders(loaders, self.param_axes, float_axes)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(jax.tree.leaves(loaders)), desc="loading weights", unit="tensor")
        # On one CPU, the weights in 2 MiB pages: decode streams every one of them per token
        # (serving.host_memory).
        self.weight_arena = None
        if mesh is None and jax.default_backend() == "cpu":
            self.weight_arena = HugePageArena.create(sum(
                HugePageArena.footprint(p.shape, p.dtype)
                for p in jax.tree.leaves(abstract_params(self.model))))
        self.params = place_params(loaders, self.param_axes, mesh, self.rules, self.dtype,
                                   progress=bar.update if bar else None, arena=self.weight_arena)
        if bar:
            bar.close()
        eos = set(getattr(self.tokenizer, "eos_ids", ()) or ())
        if self.config.eos_id is not None:
            eos.add(self.config.eos_id)
        self.eos_ids = frozenset(eos)

        # int8 KV: one byte per element plus a float32 scale per (token, kv head), for k and v.
        cache_dtype = jnp.int8 if kv_cache_dtype == "int8" else self.dtype
        scale_bytes = 4 if kv_cache_dtype == "int8" else 0
        if num_pages is None:
            num_pages = pages_for_budget(self.config, page_size, jnp.dtype(cache_dtype).itemsize,
                                         kv_cache_gb, scale_bytes=scale_bytes)
        self.allocator = PageAllocator(num_pages)
        self.cache = KVCache.zeros(self.config, num_pages, page_size, cache_dtype,
                                  *self._kv_sharding(num_pages))
        self.scheduler = Scheduler(self.allocator, page_size, max_num_seqs=max_num_seqs,
                                   max_waiting=max_waiting, prefill_chunk=prefill_chunk,
                                   max_prefill_seqs=max_prefill_seqs, decode_steps=decode_steps,
                                   prefix_caching=bool(enable_prefix_caching))
        self._programs: dict = {}
        self._lock = threading.RLock()
        self._request_counter = 0
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "decode_calls": 0,
                      "prefill_calls": 0}

    @classmethod
    def from_pretrained(cls, model: str = "smollm2-135m-instruct", **kwargs) -> "Engine":
        """Load a known model name, a .gguf file, or a Hugging Face directory.

        kwargs: dtype ("float32" | "bfloat16"), attention ("auto" | "xla" | "pallas" |
        "pallas_interpret"), mesh (from sharding.make_mesh), rules (preset name or table),
        max_seq_len, page_size, kv_cache_gb or num_pages, max_num_seqs, max_waiting,
        prefill_chunk, max_prefill_seqs, decode_steps, quantization (None; "int8":
        weight-only int8 with per-channel scales; "w8a8": int8 weights and per-row int8
        activations, int8 x int8 matmuls, see docs/SERVING.md; both decode through compiled CPU
        kernels on CPU, docs/KERNELS.md), kv_cache_dtype ("auto": the compute dtype,
        or "int8": int8 keys/values with a float32 scale per token and kv head, ~3.5-4x the
        pages of a float32 cache for the same kv_cache_gb), scan_layers (False, the default,
        unrolls the layers: faster decode on CPU; True keeps them under nn.scan: faster
        compilation), fuse_projections (None: on without a mesh; one q|k|v and one gate|up
        weight per layer: float32 batch-1 decode 32.2 -> 27.1 ms/token on CPU; quantized
        weights keep per-column scales, so fused and separate give the same logits),
        int8_weight_layout (None: what this CPU's kernels read fastest, "nk" without AVX-512,
        else "kn"; "kn" stores quantized weights [K, N] like the float ones, "nk" output
        channel first, [N, K]: same math, int8 batch-1 decode ~1.3x faster on AVX2 CPUs,
        docs/PERFORMANCE.md), f32_weight_layout (the same choice for float32 models: None picks
        "nk" with the AVX2 or AVX-512 kernels, whose [N, K] matmul runs every decode batch
        faster, else "kn"),
        progress (tqdm bar while loading).
        """
        return cls(load_checkpoint(model), **kwargs)

    # ================================================================ programs
    def _kv_sharding(self, num_pages: int):
        """(cache sharding, scale sharding) for KVCache.zeros; (None, None) without a mesh."""
        if self.mesh is None:
            return None, None
        return (kv_cache_sharding(self.config, num_pages, self.page_size, self.mesh, self.rules),
                kv_scale_sharding(self.config, num_pages, self.page_size, self.mesh, self.rules))

    def _program(self, key, build):
        if key not in self._programs:
            self._programs[key] = build()
        return self._programs[key]

    def _forward_program(self):
        model = self.model
        return self._program("forward", lambda: jax.jit(
            lambda p, t, pos: forward(model, p, t, pos)))

    def _prefill_program(self, penalties: bool, logprobs: bool):
        model = self.model

        def run(params, cache, tokens, positions, page_table, kv_lens, logits_at, sampling,
                prompt_seen, out_counts):
            logits, cache = model_prefill(model, params, tokens, positions, cache, page_table,
                                          kv_lens, logits_at)
            raw = logits
            if penalties:
                logits = apply_penalties(logits, sampling, prompt_seen, out_counts)
            first = sample(logits, sampling, kv_lens)
            lp = top_logprobs(raw, first, MAX_LOGPROBS) if logprobs else None
            return first, lp, cache
        return self._program(("prefill", penalties, logprobs),
                             lambda: jax.jit(run, donate_argnums=(1,)))

    def _decode_program(self, penalties: bool, logprobs: bool):
        model, max_steps = self.model, self.decode_steps

        def run(params, cache, last_tok, pos, page_table, done, limit, stop_ids, steps, sampling,
                prompt_seen, out_counts):
            """Feed last_tok at pos and sample the next token, up to `steps` times.

            A row stops (done) at a stop token id or when its next position reaches `limit`.
            Returns the tokens [B, max_steps], their logprobs, the number of steps run, and the
            cache. Row r's k-th new token is at position pos[r] + 1 + k.
            """
            b = last_tok.shape[0]
            out = jnp.zeros((b, max_steps), jnp.int32)
            lp = (jnp.zeros((b, max_steps)), jnp.zeros((b, max_steps, MAX_LOGPROBS), jnp.int32),
                  jnp.zeros((b, max_steps, MAX_LOGPROBS))) if logprobs else None

            def cond(state):
                i, done = state[0], state[4]
                return (i < steps) & ~jnp.all(done)

            def body(state):
                i, cache, tok, pos, done, out, lp, counts = state
                logits, cache = model_decode_step(model, params, tok, pos, cache, page_table)
                raw = logits
                if penalties:
                    logits = apply_penalties(logits, sampling, prompt_seen, counts)
                nxt = jnp.where(done, 0, sample(logits, sampling, pos + 1))
                out = out.at[:, i].set(nxt)
                if logprobs:
                    chosen, top_ids, top_vals = top_logprobs(raw, nxt, MAX_LOGPROBS)
                    lp = (lp[0].at[:, i].set(chosen), lp[1].at[:, i].set(top_ids),
                          lp[2].at[:, i].set(top_vals))
                if penalties:
                    counts = counts.at[jnp.arange(b), nxt].add((~done).astype(jnp.int32))
                new_pos = jnp.where(done, pos, pos + 1)
                hit_stop = jnp.any(nxt[:, None] == stop_ids, axis=-1)
                done = done | hit_stop | (new_pos + 1 >= limit)
                return i + 1, cache, nxt, new_pos, done, out, lp, counts

            state = (jnp.int32(0), cache, last_tok, pos, done, out, lp, out_counts)
            i, cache, _, _, _, out, lp, _ = jax.lax.while_loop(cond, body, state)
            return out, lp, i, cache
        return self._program(("decode", penalties, logprobs),
                             lambda: jax.jit(run, donate_argnums=(1,)))

    # ================================================================ public API
    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits, numpy float32 [len(ids), vocab]."""
        ids = self._to_ids(list(ids))
        if len(ids) > self.max_seq_len:
            raise RequestError(f"{len(ids)} tokens exceed the context limit {self.max_seq_len}")
        t = min(next_power_of_two(len(ids), MIN_PREFILL_BUCKET), self.max_seq_len)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :len(ids)] = ids
        with activation_sharding(self.mesh, self.rules):
            positions = np.arange(t, dtype=np.int32)[None, :]
            logits = self._forward_program()(self.params, jax.device_put(tokens),
                                             jax.device_put(positions))
        return np.asarray(logits, dtype=np.float32)[0, :len(ids)]

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, **kwargs) -> list[GenerationOutput]:
        """Complete each prompt (a string or a list of token ids); one output per prompt.

        Greedy at temperature 0. With a seed, prompt i uses seed + i, so results are reproducible
        whatever else runs in the batch. Ends at an EOS/stop token, a stop string (removed from
        the text), or max_new_tokens (finish_reason "length"). Other kwargs: those of
        make_request (stop_token_ids, ignore_eos, penalties, logprobs).
        """
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not len(prompts):
            raise RequestError("no prompts given")
        reqs = [self.make_request(p, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, min_p=min_p,
                                  seed=None if seed is None else (seed + i) % 2**32, stop=stop,
                                  **kwargs)
                for i, p in enumerate(prompts)]
        for r in reqs:
            self.add_request(r)
        while not all(r.finished for r in reqs):
            self.step()
        return [self.output(r) for r in reqs]

    def stream(self, prompt, **kwargs) -> Iterator[StreamChunk]:
        """Yield StreamChunks for one prompt as tokens arrive (drives the engine itself)."""
        req = self.add_request(self.make_request(prompt, **kwargs))
        sent_tokens, sent_text = 0, 0
        try:
            while True:
                if not req.finished:
                    self.step()
                text = self._stable_text(req)
                if len(req.output_ids) > sent_tokens or len(text) > sent_text or req.finished:
                    lps = req.output_logprobs[sent_tokens:] if req.logprobs is not None else None
                    chunk = StreamChunk(req.output_ids[sent_tokens:], text[sent_text:],
                                        req.finish_reason if req.finished else None, lps)
                    sent_tokens, sent_text = len(req.output_ids), len(text)
                    yield chunk
                if req.finished:
                    return
        finally:
            if not req.finished:
                self.abort(req.request_id)

    def output(self, req: Request) -> GenerationOutput:
        return GenerationOutput(
            token_ids=list(req.output_ids), text=req.text, finish_reason=req.finish_reason,
            prompt_token_ids=list(req.prompt_ids),
            logprobs=list(req.output_logprobs) if req.logprobs is not None else None,
            request_id=req.request_id,
            ttft_s=(req.first_token_time or req.arrival) - req.arrival,
            e2e_s=(req.finish_time or time.perf_counter()) - req.arrival,
            num_preemptions=req.num_preemptions, num_cached_tokens=req.num_cached_tokens)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (call it after changing self.params: cached pages hold
        keys/values of the old weights); returns how many free pages it dropped."""
        with self._lock:
            return self.allocator.clear_cache()

    @staticmethod
    def _stable_text(req: Request) -> str:
        """Text safe to show while streaming: no trailing partial UTF-8 character."""
        return req.text if req.finished else req.text.rstrip("\ufffd")

    # ================================================================ the engine step
    def step(self) -> list[Request]:
        """Run one scheduling step: at most one prefill and one decode batch. Returns the
        requests that received tokens or finished."""
        with self._lock, activation_sharding(self.mesh, self.rules):
            plan = self.scheduler.schedule()
            touched = []
            if plan.prefill:
                touched += self._run_prefill(plan)
            if plan.decode:
                touched += self._run_decode(plan)
            return touched

    def _sampling(self, reqs: list[Request], rows: int) -> SamplingTensors:
        params = [dataclasses.replace(r.params, seed=r.seed) for r in reqs]
        return SamplingTensors.from_params(params, rows, [0] * len(reqs))

    def _penalty_inputs(self, reqs: list[Request], rows: int, penalties: bool):
        v = self.config.vocab_size
        if not penalties:
            return jax.device_put(np.zeros((rows, 1), bool)), jax.device_put(np.zeros((rows, 1), np.int32))
        seen = np.zeros((rows, v), bool)
        counts = np.zeros((rows, v), np.int32)
        for r, req in enumerate(reqs):
            seen[r, req.prompt_ids] = True
            np.add.at(counts[r], req.output_ids, 1)
        return jax.device_put(seen), jax.device_put(counts)

    def _page_table(self, reqs: list[Request], rows: int, num_tokens: int) -> np.ndarray:
        """[rows, width] page ids covering the first num_tokens positions of each request.

        width is a power of two (a compile bucket) just large enough: attention cost grows with
        it, so a request's spare pages beyond this call's positions are left out."""
        width = next_power_of_two(-(-num_tokens // self.page_size))
        table = np.zeros((rows, width), np.int32)  # unused entries point at the sink page 0
        for r, req in enumerate(reqs):
            pages = req.pages[:width]
            table[r, :len(pages)] = pages
        return table

    def _run_prefill(self, plan: Plan) -> list[Request]:
        chunks = plan.prefill
        reqs = [c.request for c in chunks]
        rows = next_power_of_two(len(chunks))
        t = next_power_of_two(max(c.end - c.start for c in chunks), MIN_PREFILL_BUCKET)
        tokens = np.zeros((rows, t), np.int32)
        positions = np.zeros((rows, t), np.int32)
        kv_lens = np.zeros(rows, np.int32)
        logits_at = np.zeros(rows, np.int32)
        for r, c in enumerate(chunks):
            seq = c.request.tokens
            tokens[r, :c.end - c.start] = seq[c.start:c.end]
            positions[r] = c.start + np.arange(t)
            kv_lens[r] = c.end
            logits_at[r] = c.end - c.start - 1
        page_table = self._page_table(reqs, rows, max(c.end for c in chunks))
        penalties = any(r.params.uses_penalties for r in reqs)
        logprobs = any(r.logprobs is not None for r in reqs)
        seen, counts = self._penalty_inputs(reqs, rows, penalties)
        program = self._prefill_program(penalties, logprobs)
        first, lp, self.cache = program(
            self.params, self.cache, jax.device_put(tokens), jax.device_put(positions),
            jax.device_put(page_table), jax.device_put(kv_lens), jax.device_put(logits_at),
            self._sampling(reqs, rows), seen, counts)
        first = np.asarray(first)
        lp = jax.tree.map(np.asarray, lp)
        self.stats["prefill_calls"] += 1
        touched = []
        for r, c in enumerate(chunks):
            self.scheduler.record_prefill(c)
            self.stats["prompt_tokens"] += c.end - c.start
            if c.sample:
                self._append(c.request, [int(first[r])],
                             None if lp is None else (lp[0][r:r + 1], lp[1][r:r + 1], lp[2][r:r + 1]))
                touched.append(c.request)
        return touched

    def _run_decode(self, plan: Plan) -> list[Request]:
        reqs = plan.decode
        rows = next_power_of_two(len(reqs))
        last = np.zeros(rows, np.int32)
        pos = np.zeros(rows, np.int32)
        done = np.ones(rows, bool)
        limit = np.zeros(rows, np.int32)
        row_stop_ids = [sorted(req.stop_token_ids | (frozenset() if req.ignore_eos else self.eos_ids))
                        for req in reqs]
        stop_ids = np.full((rows, 1 + max(len(ids) for ids in row_stop_ids)), -1, np.int32)
        for r, req in enumerate(reqs):
            last[r] = req.tokens[-1]
            pos[r] = len(req.tokens) - 1
            done[r] = False
            limit[r] = len(req.prompt_ids) + req.max_tokens
            stop_ids[r, :len(row_stop_ids[r])] = row_stop_ids[r]
        page_table = self._page_table(
            reqs, rows, max(min(len(r.tokens) - 1 + plan.decode_steps, len(r.prompt_ids) + r.max_tokens)
                            for r in reqs))
        penalties = any(r.params.uses_penalties for r in reqs)
        logprobs = any(r.logprobs is not None for r in reqs)
        seen, counts = self._penalty_inputs(reqs, rows, penalties)
        program = self._decode_program(penalties, logprobs)
        out, lp, steps, self.cache = program(
            self.params, self.cache, jax.device_put(last), jax.device_put(pos),
            jax.device_put(page_table), jax.device_put(done), jax.device_put(limit),
            jax.device_put(stop_ids),
            np.int32(plan.decode_steps), self._sampling(reqs, rows), seen, counts)
        out, steps = np.asarray(out), int(steps)
        lp = jax.tree.map(np.asarray, lp)
        self.stats["decode_calls"] += 1
        for r, req in enumerate(reqs):
            before = len(req.output_ids)
            new = []
            for k in range(steps):
                new.append(int(out[r, k]))
                if self._is_stop_token(req, new[-1]) or before + len(new) >= req.max_tokens:
                    break
            self.scheduler.record_decode(req, len(new))
            self._append(req, new, None if lp is None else
                         (lp[0][r, :len(new)], lp[1][r, :len(new)], lp[2][r, :len(new)]))
        return list(reqs)

    def _is_stop_token(self, req: Request, token: int) -> bool:
        return token in req.stop_token_ids or (not req.ignore_eos and token in self.eos_ids)

    def _append(self, req: Request, tokens: list[int], lp) -> None:
        """Add sampled tokens to a request, detokenize, and finish it if it is done."""
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        reason, stop_text = None, None
        for k, tok in enumerate(tokens):
            req.output_ids.append(tok)
            self.stats["generation_tokens"] += 1
            if req.logprobs is not None:
                n = req.logprobs
                req.output_logprobs.append((float(lp[0][k]), [
                    (int(i), float(v)) for i, v in zip(lp[1][k][:n], lp[2][k][:n])]))
            if req.stop:  # stop strings can end generation in the middle of a device chunk
                text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
                hits = [text.find(s) for s in req.stop if s in text]
                if hits:
                    stop_text, reason = text[:min(hits)], "stop"
                    break
            if self._is_stop_token(req, tok):
                reason = "stop"
            elif len(req.output_ids) >= req.max_tokens:
                reason = "length"
        req.text = (stop_text if stop_text is not None
                    else self.tokenizer.decode(req.output_ids, skip_special_tokens=True))
        if reason is not None:
            self.scheduler.finish(req, reason)


    # ================================================================ compile plan (AOT)
    # Every program serving needs, listed from the configuration (compile_cache.plan), compiled
    # ahead of time (compile_cache.aot), and dispatched to those executables so that serving
    # after warmup() never compiles: a call is padded into a planned bucket or refused.
    def compile_plan(self, buckets=None, *, growth: int = 2,
                     variants: Sequence[str] = ("plain", "penalties", "logprobs", "full")):
        """The compile plan (compile_cache.plan.CompilePlan) of this engine's configuration.

        buckets: a compile_cache.ServingBuckets (default: geometric buckets with factor `growth`
        covering max_num_seqs, max_prefill_seqs, prefill_chunk and max_seq_len; growth=2 is
        exactly the engine's own rounding). variants: sampling variants of prefill and decode
        ("plain", "penalties", "logprobs", "full"); "full" is required, as it serves any request.
        Decode programs run up to decode_steps steps per call (the step count is an input).
        """
        from compile_cache.aot import module_paths, source_digest
        from compile_cache.plan import CompilePlan, PlanError, ProgramSpec, ServingBuckets, abstract
        from compile_cache import serving_plan as sp
        limits = dict(max_num_seqs=self.max_num_seqs, max_prefill_seqs=self.scheduler.max_prefill_seqs,
                      prefill_chunk=self.prefill_chunk, max_seq_len=self.max_seq_len,
                      page_size=self.page_size)
        if buckets is None:
            buckets = ServingBuckets.covering(growth=growth, min_prefill=MIN_PREFILL_BUCKET,
                                              **limits)
        buckets.validate_covers(**limits)
        unknown = [v for v in variants if v not in sp.VARIANTS]
        if unknown or "full" not in variants:
            raise PlanError(f"variants must include 'full' and be among {list(sp.VARIANTS)}, "
                            f"got {list(variants)}")
        params, cache, vocab = abstract(self.params), abstract(self.cache), self.config.vocab_size
        row = self._sampling([], 1)
        programs = []
        for name in dict.fromkeys(variants):
            pen, lp = sp.VARIANTS[name]
            fn = self._jit_program("prefill", pen, lp)
            for r, t, w in buckets.prefill_shapes(self.page_size):
                programs.append(ProgramSpec(
                    sp.prefill_key(name, r, t, w), fn,
                    sp.prefill_args(params, cache, row, r, t, w, pen, vocab),
                    {"program": "prefill", "variant": name, "rows": r, "length": t, "width": w}))
            fn = self._jit_program("decode", pen, lp)
            for r in buckets.decode_rows:
                for w in buckets.page_widths:
                    programs.append(ProgramSpec(
                        sp.decode_key(name, r, w), fn,
                        sp.decode_args(params, cache, row, r, w, buckets.stop_width, pen, vocab),
                        {"program": "decode", "variant": name, "rows": r, "width": w,
                         "max_steps": self.decode_steps}))
        fingerprint = {
            "model": self.config.name, "model_config_hash": self.config.fingerprint(),
            "dtype": self.dtype_name, "attention": self.model.attention_impl,
            "quantization": self.quantization, "kv_cache_dtype": self.kv_cache_dtype,
            "scan_layers": self.model.scan_layers, "fuse_projections": self.fuse_projections,
            "int8_weight_layout": self.int8_weight_layout,
            "f32_weight_layout": self.f32_weight_layout, "cpu_kernels": self.cpu_kernels,
            "page_size": self.page_size, "num_pages": self.cache.num_pages,
            "decode_steps": self.decode_steps, "max_logprobs": MAX_LOGPROBS,
            "mesh": None if self.mesh is None else dict(self.mesh.shape),
            "rules": None if self.mesh is None else repr(self.rules),
            "limits": limits, "buckets": buckets.to_dict(), "variants": list(dict.fromkeys(variants)),
            "code_hash": source_digest(module_paths("model", "sharding", "serving.engine",
                                                    "serving.sampling")),
        }
        return CompilePlan(programs, fingerprint, shared_args={"params": params})

    def warmup(self, plan=None, *, store_dir: str | None = None, progress: bool = False,
               workers: int | None = None) -> dict:
        """Compile (or load) every program of `plan` (default: compile_plan()) and serve from
        those executables from now on. Returns the manifest (compile_cache.manifest).

        store_dir: where serialized executables live (default: the persistent compilation
        cache directory set by compile_cache.configure_cache, if any). workers: XLA compilation
        threads (default: one per core, see compile_cache.aot.default_workers)."""
        from compile_cache import serving_plan as sp
        from compile_cache.aot import compile_plan
        from compile_cache.manifest import build_manifest
        from compile_cache.monitor import counts
        from compile_cache.plan import PlannedProgram, ServingBuckets
        plan = plan or self.compile_plan()
        if store_dir is None:
            store_dir = jax.config.jax_compilation_cache_dir or None
        result = compile_plan(plan, store_dir=store_dir, progress=progress, workers=workers)
        buckets = ServingBuckets.from_dict(plan.fingerprint["buckets"])
        planned = plan.fingerprint["variants"]
        row = self._sampling([], 1)
        with self._lock:
            for kind, adapt in (("prefill", sp.adapt_prefill), ("decode", sp.adapt_decode)):
                for pen, lp in sp.VARIANTS.values():
                    self._jit_program(kind, pen, lp)  # keep the jit for later plans
                    self._programs[(kind, pen, lp)] = PlannedProgram(
                        f"{kind} program", result.executables,
                        lambda *a, _adapt=adapt, _p=pen, _l=lp: _adapt(
                            a, buckets=buckets, planned=planned, penalties=_p, logprobs=_l,
                            vocab=self.config.vocab_size, sampling_row=row),
                        miss_error=RequestError)
            self._programs["forward"] = PlannedProgram("score()", {}, self._score_outside_plan)
            self._plan_size = len(plan.programs)
            self._compile_baseline = counts()
        return build_manifest(plan, result)

    @staticmethod
    def _score_outside_plan(*_args):
        raise RequestError("score() is not part of the serving compile plan and this engine "
                           "was warmed up to never compile; score with an engine that was not "
                           "warmed up")

    def _jit_program(self, kind: str, penalties: bool, logprobs: bool):
        """The jax.jit function of a prefill/decode variant, even after warmup() replaced the
        engine's entry with a PlannedProgram."""
        jits = self.__dict__.setdefault("_jit_programs", {})
        key = (kind, penalties, logprobs)
        if key not in jits:
            current = self._programs.pop(key, None)
            build = self._prefill_program if kind == "prefill" else self._decode_program
            jits[key] = build(penalties, logprobs)
            if current is not None and not hasattr(current, "lower"):
                self._programs[key] = current  # a planned dispatcher stays in place
        return jits[key]

    def compile_stats(self) -> dict:
        """Compilation counters for metrics: planned programs and compilations since warmup
        (process-wide XLA compile requests, from compile_cache.monitor; 0 when serving only
        runs planned programs)."""
        from compile_cache.monitor import counts
        now = counts()
        base = getattr(self, "_compile_baseline", None)
        return {"warmed_up": base is not None, "planned_programs": getattr(self, "_plan_size", 0),
                "backend_compiles": now.backend_compiles, "cache_hits": now.cache_hits,
                "compiles_since_warmup": (None if base is None
                                          else now.backend_compiles - base.backend_compiles)}

__all__ = ["Engine", "GenerationOutput", "StreamChunk", "RequestError", "QueueFullError"]
