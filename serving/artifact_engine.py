"""ArtifactEngine: continuous batching over an exported artifact's programs, without `model/`.

    eng = ArtifactEngine.load("out/")                  # serving.artifact.load + pages + scheduler
    eng.generate(["Hello"], max_new_tokens=16)         # greedy: the Engine's tokens
    create_app(eng)                                     # serving.server serves it like an Engine

The artifact's prefill programs ([rows, length] buckets) and one-step decode programs ([rows])
return logits and the paged KV cache; this engine runs them under serving.scheduler (FIFO
admission, chunked prefill at the largest length bucket, preemption when pages run out) with the
serving.kv_pages allocator over the artifact's num_pages, and samples on device with
serving.sampling (temperature, top-k/top-p/min-p, penalties, seeds, logprobs), jitted once per
batch bucket. Requests, stop handling and outputs behave as in serving.engine.Engine; what differs
is fixed by the export: dtype, page size, cache size, buckets, and one decode step per call.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import numpy as np

from serving.artifact import Artifact, ArtifactError, ArtifactOutput, _bucket, load
from serving.kv_pages import PageAllocator
from serving.sampling import (MAX_LOGPROBS, SamplingTensors,
                              apply_penalties, sample, top_logprobs)
from serving.scheduler import PrefillChunk, Request, RequestError, RequestFrontEnd, Scheduler


@dataclasses.dataclass(frozen=True)
class ArtifactModel:
    """What the server reads from an engine's `config`: the model's name and vocabulary size."""

    name: str
    vocab_size: int


def _sampler(penalties: bool, logprobs: bool):
    def run(logits_bv, sampling, positions_b, prompt_seen, out_counts):
        raw = logits_bv
        if penalties:
            logits_bv = apply_penalties(logits_bv, sampling, prompt_seen, out_counts)
        tokens = sample(logits_bv, sampling, positions_b)
        lp = top_logprobs(raw, tokens, MAX_LOGPROBS) if logprobs else None
        return tokens, lp
    return jax.jit(run)


class ArtifactEngine(RequestFrontEnd):
    """An artifact with a paged KV cache, a scheduler and on-device sampling; the interface the
    HTTP server uses (make_request, add_request, step, abort, scheduler, allocator, tokenizer)."""

    def __init__(self, artifact: Artifact, *, max_num_seqs: int | None = None,
                 max_waiting: int = 1024, max_seq_len: int | None = None,
                 enable_prefix_caching: bool = True):
        manifest = artifact.manifest
        largest = max(artifact.rows)
        max_num_seqs = largest if max_num_seqs is None else max_num_seqs
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) \
                or not 1 <= max_num_seqs <= largest:
            raise ArtifactError(f"max_num_seqs must be an int in [1, {largest}] (the artifact's "
                                f"largest batch bucket), got {max_num_seqs!r}")
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ArtifactError(f"max_waiting must be an int >= 0, got {max_waiting!r}")
        if max_seq_len is not None and not (isinstance(max_seq_len, int)
                                             and 2 <= max_seq_len <= artifact.max_seq_len):
            raise ArtifactError(f"max_seq_len must be an int in [2, {artifact.max_seq_len}] (the "
                                f"artifact's context), got {max_seq_len!r}")
        self.artifact = artifact
        self.config = ArtifactModel(manifest["model"], artifact.vocab_size)
        self.tokenizer = artifact.tokenizer
        self.source = artifact.directory
        self.dtype_name = manifest["dtype"]
        self.page_size = artifact.page_size
        self.max_seq_len = max_seq_len or artifact.max_seq_len
        self.max_num_seqs = max_num_seqs
        self.eos_ids = artifact.tokenizer.eos_ids
        self.allocator = PageAllocator(manifest["num_pages"])
        self.scheduler = Scheduler(self.allocator, self.page_size, max_num_seqs=max_num_seqs,
                                   max_waiting=max_waiting, prefill_chunk=max(artifact.lengths),
                                   max_prefill_seqs=largest, decode_steps=1,
                                   prefix_caching=bool(enable_prefix_caching))
        self._k, self._v = artifact.new_cache()
        self._samplers: dict = {}
        self._sampling_batch, self._sampling_tensors = None, None
        self._lock = threading.RLock()
        self._request_counter = 0
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "decode_calls": 0,
                      "prefill_calls": 0}

    @classmethod
    def load(cls, directory: str, platform: str | None = None, **kwargs) -> "ArtifactEngine":
        """Verify and load the artifact in `directory`; kwargs: max_num_seqs, max_waiting,
        max_seq_len (each at most what the artifact was exported for), enable_prefix_caching."""
        return cls(load(directory, platform), **kwargs)

    def warmup(self) -> int:
        """Compile every program of the artifact and the plain sampler of every batch bucket
        (padding-only calls, which write nothing but the sink page); returns the count."""
        a, n = self.artifact, 0
        with self._lock:
            for r in a.rows:
                table = np.zeros((r, a.pages_per_seq), np.int32)
                zeros = np.zeros(r, np.int32)
                for t in a.lengths:
                    block = np.zeros((r, t), np.int32)
                    _, self._k, self._v = a.program("prefill", r, t)(
                        a.params, self._k, self._v, block, block, table, zeros, zeros)
                    n += 1
                logits, self._k, self._v = a.program("decode", r)(
                    a.params, self._k, self._v, zeros, zeros, table)
                self._sample(logits, [], r, zeros)
                n += 2
        return n

    # ================================================================ requests
    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int | None = None, **kwargs) -> list[ArtifactOutput]:
        """Complete each prompt (a string or a list of token ids) with continuous batching; with
        a seed, prompt i uses seed + i. Other kwargs: those of make_request."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not len(prompts):
            raise RequestError("no prompts given")
        reqs = [self.make_request(p, max_new_tokens=max_new_tokens, temperature=temperature,
                                  seed=None if seed is None else (seed + i) % 2**32, **kwargs)
                for i, p in enumerate(prompts)]
        for r in reqs:
            self.add_request(r)
        while not all(r.finished for r in reqs):
            self.step()
        return [ArtifactOutput(list(r.output_ids), r.text, r.finish_reason, list(r.prompt_ids),
                               list(r.output_logprobs) if r.logprobs is not None else None)
                for r in reqs]

    # ================================================================ the engine step
    def step(self) -> list[Request]:
        """One scheduling step: at most one prefill and one decode batch. Returns the requests
        that received tokens or finished."""
        with self._lock:
            plan = self.scheduler.schedule()
            touched = []
            if plan.prefill:
                touched += self._run_prefill(plan.prefill)
            if plan.decode:
                touched += self._run_decode(plan.decode)
            return touched

    def _page_table(self, reqs: list[Request], rows: int) -> np.ndarray:
        table = np.zeros((rows, self.artifact.pages_per_seq), np.int32)  # 0: the sink page
        for r, req in enumerate(reqs):
            table[r, :len(req.pages)] = req.pages
        return table

    def _sample(self, logits, reqs: list[Request], rows: int, positions: np.ndarray):
        """Next tokens [rows] and (chosen, top ids, top logprobs) or None, sampled on device."""
        penalties = any(r.params.uses_penalties for r in reqs)
        logprobs = any(r.logprobs is not None for r in reqs)
        key = (penalties, logprobs)
        if key not in self._samplers:
            self._samplers[key] = _sampler(penalties, logprobs)
        v = self.config.vocab_size
        if penalties:
            seen = np.zeros((rows, v), bool)
            counts = np.zeros((rows, v), np.int32)
            for r, req in enumerate(reqs):
                seen[r, req.prompt_ids] = True
                np.add.at(counts[r], req.output_ids, 1)
        else:
            seen, counts = np.zeros((rows, 1), bool), np.zeros((rows, 1), np.int32)
        # Consecutive decode steps usually sample for the same requests: reuse their tensors
        # rather than copying eight small arrays to the device every token.
        batch = (rows, tuple(r.request_id for r in reqs))
        if self._sampling_batch != batch:
            params = [dataclasses.replace(r.params, seed=r.seed) for r in reqs]
            self._sampling_batch = batch
            self._sampling_tensors = SamplingTensors.from_params(params, rows, [0] * len(reqs))
        tokens, lp = self._samplers[key](logits, self._sampling_tensors, positions, seen, counts)
        return np.asarray(tokens), jax.tree.map(np.asarray, lp)

    def _run_prefill(self, chunks: list[PrefillChunk]) -> list[Request]:
        a = self.artifact
        reqs = [c.request for c in chunks]
        rows = _bucket(len(chunks), a.rows)
        t = _bucket(max(c.end - c.start for c in chunks), a.lengths)
        tokens = np.zeros((rows, t), np.int32)
        positions = np.zeros((rows, t), np.int32)
        kv_lens = np.zeros(rows, np.int32)
        logits_at = np.zeros(rows, np.int32)
        for r, c in enumerate(chunks):
            tokens[r, :c.end - c.start] = c.request.tokens[c.start:c.end]
            positions[r] = c.start + np.arange(t)
            kv_lens[r] = c.end
            logits_at[r] = c.end - c.start - 1
        logits, self._k, self._v = a.program("prefill", rows, t)(
            a.params, self._k, self._v, tokens, positions, self._page_table(reqs, rows), kv_lens,
            logits_at)
        self.stats["prefill_calls"] += 1
        first = lp = None
        if any(c.sample for c in chunks):
            first, lp = self._sample(logits, reqs, rows, kv_lens)
        touched = []
        for r, c in enumerate(chunks):
            self.scheduler.record_prefill(c)
            self.stats["prompt_tokens"] += c.end - c.start
            if c.sample:
                self._append(c.request, int(first[r]),
                             None if lp is None else (lp[0][r], lp[1][r], lp[2][r]))
                touched.append(c.request)
        return touched

    def _run_decode(self, reqs: list[Request]) -> list[Request]:
        a = self.artifact
        rows = _bucket(len(reqs), a.rows)
        last = np.zeros(rows, np.int32)
        pos = np.zeros(rows, np.int32)  # padding rows write position 0 of the sink page
        for r, req in enumerate(reqs):
            last[r] = req.tokens[-1]
            pos[r] = len(req.tokens) - 1
        logits, self._k, self._v = a.program("decode", rows)(
            a.params, self._k, self._v, last, pos, self._page_table(reqs, rows))
        self.stats["decode_calls"] += 1
        nxt, lp = self._sample(logits, reqs, rows, pos + 1)
        for r, req in enumerate(reqs):
            self.scheduler.record_decode(req, 1)
            self._append(req, int(nxt[r]), None if lp is None else (lp[0][r], lp[1][r], lp[2][r]))
        return list(reqs)

    def _is_stop_token(self, req: Request, token: int) -> bool:
        return token in req.stop_token_ids or (not req.ignore_eos and token in self.eos_ids)

    def _append(self, req: Request, tok: int, lp) -> None:
        """Add one sampled token to a request, detokenize, and finish it if it is done."""
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        req.output_ids.append(tok)
        self.stats["generation_tokens"] += 1
        if req.logprobs is not None:
            n = req.logprobs
            req.output_logprobs.append((float(lp[0]), [(int(i), float(v))
                                                       for i, v in zip(lp[1][:n], lp[2][:n])]))
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        reason = None
        hits = [text.find(s) for s in req.stop if s in text]
        if hits:
            text, reason = text[:min(hits)], "stop"
        elif self._is_stop_token(req, tok):
            reason = "stop"
        elif len(req.output_ids) >= req.max_tokens:
            reason = "length"
        req.text = text
        if reason is not None:
            self.scheduler.finish(req, reason)


__all__ = ["ArtifactEngine", "ArtifactModel"]
