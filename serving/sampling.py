"""Token sampling on device, vectorized over a batch with per-row parameters.

Every row has its own temperature, top-k, top-p, min-p and seed. A row's random key depends only
on its seed and the position of the token being sampled, so the same seed gives the same output
whatever else is in the batch. Temperature 0 is greedy (argmax).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs per token


class SamplingError(ValueError):
    """Sampling parameters out of range; the message names the parameter and its limits."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (host side)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    min_p: float = 0.0        # 0 = off
    seed: int | None = None   # None: derived from the request id
    repetition_penalty: float = 1.0  # HF-style, over prompt and output tokens; 1 = off
    presence_penalty: float = 0.0    # OpenAI-style, over output tokens; 0 = off
    frequency_penalty: float = 0.0   # OpenAI-style, per occurrence in the output; 0 = off

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def validate(self) -> "SamplingParams":
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise SamplingError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise SamplingError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty <= 10):
            raise SamplingError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise SamplingError(f"{name} must be in [-2, 2], got {value!r}")
        return self


@flax.struct.dataclass
class SamplingTensors:
    """Device-side per-row parameters, each [batch]."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    seed: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array

    @classmethod
    def from_params(cls, params: list[SamplingParams], batch: int, default_seeds) -> "SamplingTensors":
        """Stack per-request params, padding to `batch` rows with greedy ones."""
        rows = list(params) + [SamplingParams()] * (batch - len(params))
        seeds = [p.seed if p.seed is not None else int(s) % 2**32
                 for p, s in zip(rows, list(default_seeds) + [0] * (batch - len(params)))]
        return cls(
            temperature=jax.device_put(np.array([p.temperature for p in rows], np.float32)),
            top_k=jax.device_put(np.array([p.top_k for p in rows], np.int32)),
            top_p=jax.device_put(np.array([p.top_p for p in rows], np.float32)),
            min_p=jax.device_put(np.array([p.min_p for p in rows], np.float32)),
            seed=jax.device_put(np.array(seeds, np.uint32)),
            repetition_penalty=jax.device_put(np.array([p.repetition_penalty for p in rows], np.float32)),
            presence_penalty=jax.device_put(np.array([p.presence_penalty for p in rows], np.float32)),
            frequency_penalty=jax.device_put(np.array([p.frequency_penalty for p in rows], np.float32)),
        )


def _filtered_sample(logits_bv, st: SamplingTensors, positions_b):
    """Sample from the temperature-scaled distribution restricted by top-k, top-p and min-p."""
    b, v = logits_bv.shape
    temperature = jnp.maximum(st.temperature, 1e-6)[:, None]
    scaled = logits_bv.astype(jnp.float32) / temperature
    idx = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (b, v))
    neg_sorted, sorted_idx = jax.lax.sort_key_val(-scaled, idx, dimension=-1)
    sorted_logits = -neg_sorted  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(v, dtype=jnp.int32)[None, :]
    keep = (st.top_k[:, None] == 0) | (rank < st.top_k[:, None])
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < st.top_p[:, None]
    keep &= probs >= st.min_p[:, None] * probs[:, :1]
    keep |= rank == 0  # the most likely token is always allowed
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(st.seed, positions_b)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    return jnp.take_along_axis(sorted_idx, choice[:, None], axis=1)[:, 0]


def argmax(logits_bv):
    """The index of the first maximum over the last axis (int32), as jnp.argmax, in two plain
    reductions: the row's max, then the smallest index holding it or a NaN (a row with NaNs
    gives the first NaN where the max propagates NaN, and always a valid index, where a
    vectorized max may drop them). XLA:CPU runs jnp.argmax's (value,
    index) reduction one element at a time: 236 us for one row of SmolLM2's 49152 logits
    against 50 us, 3.4 ms against 0.65 ms for 32 rows (docs/PERFORMANCE.md, session 18)."""
    v = logits_bv.shape[-1]
    hit = (logits_bv == jnp.max(logits_bv, axis=-1, keepdims=True)) | jnp.isnan(logits_bv)
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def sample(logits_bv, st: SamplingTensors, positions_b):
    """Next token ids [batch] (int32). positions_b: position of the token being sampled."""
    greedy = argmax(logits_bv)
    sampled = jax.lax.cond(jnp.any(st.temperature > 0),
                           lambda: _filtered_sample(logits_bv, st, positions_b),
                           lambda: greedy)
    return jnp.where(st.temperature > 0, sampled, greedy)


def token_counts(ids_bl, vocab_size):
    """[B, L] token ids (-1 = padding) -> [B, vocab] int32 occurrence counts."""
    b = ids_bl.shape[0]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids_bl.shape)
    valid = ids_bl >= 0
    return jnp.zeros((b, vocab_size), jnp.int32).at[rows, jnp.where(valid, ids_bl, 0)].add(
        valid.astype(jnp.int32))


def apply_penalties(logits_bv, st: SamplingTensors, prompt_seen_bv, output_counts_bv):
    """Repetition penalty (HF: divide positive, multiply negative logits of seen tokens) and
    presence/frequency penalties (OpenAI: subtract per output token). Returns float32 logits."""
    logits = logits_bv.astype(jnp.float32)
    seen = prompt_seen_bv | (output_counts_bv > 0)
    rep = st.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    counts = output_counts_bv.astype(jnp.float32)
    return (logits - st.frequency_penalty[:, None] * counts
            - st.presence_penalty[:, None] * (counts > 0))


def top_logprobs(logits_bv, tokens_b, n: int):
    """Log-probability of tokens_b [B] and the top-n (ids [B, n], logprobs [B, n]) under the
    model's distribution (before sampling filters), as OpenAI-style APIs report them."""
    logp = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens_b[:, None], axis=1)[:, 0]
    top_vals, top_ids = jax.lax.top_k(logp, n)
    return chosen, top_ids.astype(jnp.int32), top_vals
