"""KV cache pages: a free-list allocator and memory budgeting.

The cache (model.decoder.KVCache) is one array of `num_pages` pages of `page_size` tokens per
layer. Page 0 is reserved as the sink for padding tokens and is never handed out.
"""

from __future__ import annotations

import collections
import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # a type only: serving artifacts use the allocator without importing model/
    from model.config import ModelConfig


class PageAllocator:
    """Hands out page ids 1..num_pages-1; all-or-nothing allocation; reference-counted pages.

    Prefix caching (vLLM's automatic prefix caching): a page full of computed tokens can be
    registered under a key naming its whole token prefix (`prefix_keys`). When its last user frees
    it, a registered page keeps its contents and stays findable by `acquire_cached` until
    `allocate` needs it: fresh pages are taken first, then cached ones, least recently freed first.
    A page found by key is shared: every holder only reads it (writes go to positions past it)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a KV cache needs at least 2 pages (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free = collections.deque(range(1, num_pages))  # never registered, or evicted
        self._refs: dict[int, int] = {}                        # page -> holders (> 0)
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # unheld, LRU
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: fresh ones and unheld cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        """Pages held by at least one request."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Unheld pages whose contents are kept for prefix reuse (counted in num_free)."""
        return len(self._cached)

    @property
    def capacity(self) -> int:
        """Pages that can ever be allocated (all but the reserved page 0)."""
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing allocated) when fewer than n are free."""
        if n > self.num_free:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                p = self._free.popleft()
            else:  # evict the least recently freed cached page
                p, _ = self._cached.popitem(last=False)
                del self._page_of[self._key_of.pop(p)]
                self.num_evictions += 1
            self._refs[p] = 1
            pages.append(p)
        return pages

    def free(self, pages) -> None:
        """Drop one hold on each page; a page nobody holds returns to the free pool (a registered
        one keeps its contents for reuse until evicted). Pass a sequence's pages in order: the
        tail is released first, so a prefix outlives its continuations in the cache."""
        for p in reversed(list(pages)):
            n = self._refs.get(p)
            if n is None:
                raise ValueError(f"page {p} is not allocated (double free or foreign page)")
            if n > 1:
                self._refs[p] = n - 1
                continue
            del self._refs[p]
            if p in self._key_of:
                self._cached[p] = None
            else:
                self._free.append(p)

    def register(self, page: int, key: bytes) -> None:
        """Record that held `page` holds the keys/values of the prefix named `key`. A key already
        owned by another page, or a page already registered, is left as it is."""
        if page not in self._refs:
            raise ValueError(f"page {page} is not allocated; only held pages can be registered")
        if key in self._page_of or page in self._key_of:
            return
        self._page_of[key] = page
        self._key_of[page] = key

    def acquire_cached(self, keys) -> list[int]:
        """Hold the pages of the longest run of `keys` (a sequence's prefix keys, in order) that
        are cached; returns them (maybe none)."""
        pages = []
        for key in keys:
            p = self._page_of.get(key)
            if p is None:
                break
            if p in self._refs:
                self._refs[p] += 1
            else:
                del self._cached[p]
                self._refs[p] = 1
            pages.append(p)
        return pages

    def clear_cache(self) -> int:
        """Forget every registration (e.g. after the weights change); returns the pages dropped
        from the cache. Held pages stay held; only their reuse by key ends."""
        n = len(self._cached)
        self._free.extend(self._cached)
        self._cached.clear()
        self._page_of.clear()
        self._key_of.clear()
        return n


def prefix_keys(tokens, page_size: int, num_pages: int, keys: list[bytes] | None = None) -> list[bytes]:
    """Keys of the first num_pages full pages of `tokens`: page i's key is a SHA-256 chained over
    the keys before it and its own page_size token ids, so equal keys mean equal whole prefixes
    (not only equal pages). `keys`, the start of the list from an earlier call, is extended."""
    keys = [] if keys is None else keys
    for i in range(len(keys), num_pages):
        chunk = tokens[i * page_size:(i + 1) * page_size]
        if len(chunk) < page_size:
            break
        h = hashlib.sha256(keys[-1] if keys else b"xlrt-kv")
        h.update(np.asarray(chunk, np.int64).tobytes())
        keys.append(h.digest())
    return keys


def page_bytes(config: ModelConfig, page_size: int, dtype_bytes: int, scale_bytes: int = 0) -> int:
    """Bytes of one page across all layers, keys and values; scale_bytes per token and kv head
    (4 for an int8 cache's float32 scales, 0 for a float cache)."""
    per_token_head = config.head_dim * dtype_bytes + scale_bytes
    return 2 * config.num_layers * config.num_kv_heads * page_size * per_token_head


def pages_for_budget(config: ModelConfig, page_size: int, dtype_bytes: int, gigabytes: float,
                     scale_bytes: int = 0) -> int:
    """How many pages (including the reserved one) fit in `gigabytes` of KV cache."""
    return max(2, int(gigabytes * 2**30) // page_bytes(config, page_size, dtype_bytes, scale_bytes))


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)
