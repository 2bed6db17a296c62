"""KV cache pages: a free-list allocator and memory budgeting.

The cache (model.decoder.KVCache) is one array of `num_pages` pages of `page_size` tokens per
layer. Page 0 is reserved as the sink for padding tokens and is never handed out.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: serving artifacts use the allocator without importing model/
    from model.config import ModelConfig


class PageAllocator:
    """Hands out page ids 1..num_pages-1 from a free list; all-or-nothing allocation."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a KV cache needs at least 2 pages (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._free = collections.deque(range(1, num_pages))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def capacity(self) -> int:
        """Pages that can ever be allocated (all but the reserved page 0)."""
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing allocated) when fewer than n are free."""
        if n > len(self._free):
            return None
        pages = [self._free.popleft() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages) -> None:
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} is not allocated (double free or foreign page)")
            self._used.remove(p)
            self._free.append(p)


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
