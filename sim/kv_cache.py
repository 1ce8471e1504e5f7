"""Paged KV cache: a pool of fixed-size blocks, counted per request.

Only counts are simulated (which physical block holds what does not change timing);
with prefix caching, `prefix_cache.PrefixCache` also tracks which free blocks still hold
reusable content and in what order they are evicted. Every mutation checks the pool's invariants, so a scheduler
bug shows up as an exception at the step that caused it rather than as a wrong number.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from mypy_extensions import mypyc_attr

from .prefix_cache import PrefixCache
from .request import Request


class AllocStatus(str, Enum):
    """vLLM V0 `BlockSpaceManager.can_allocate` answers."""

    OK = "ok"
    LATER = "later"
    NEVER = "never"


@mypyc_attr(native_class=False)
class KVCacheError(RuntimeError):
    pass


class KVCache:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0, preallocate_tokens: int = 0,
                 prefix_chunk_blocks: int = 0):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("KV cache needs a positive number of blocks and block size")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # vLLM V0 keeps 1 % of the GPU blocks free at admission to avoid thrashing.
        self.watermark_blocks = int(watermark * num_blocks)
        self.num_free = num_blocks
        self.peak_used = 0
        # vLLM V1 up to 0.8.x (`num_preallocate_tokens=64`): whenever a request needs new blocks
        # it takes this many tokens' worth more, if free, to allocate less often
        self.preallocate_blocks = -(-preallocate_tokens // block_size)
        # prefix caching (0: off): cached chunks of this many blocks stay in the free pool until evicted
        self.prefix: Any = PrefixCache(prefix_chunk_blocks, block_size) if prefix_chunk_blocks else None
        if self.prefix:
            self.prefix.give(num_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- vLLM V0 block manager -------------------------------------------------
    def can_allocate(self, num_tokens: int) -> AllocStatus:
        """Whole-prompt admission check with the watermark (V0 `can_allocate`)."""
        required = self.blocks_for(num_tokens)
        if self.num_blocks - required < self.watermark_blocks:
            return AllocStatus.NEVER
        if self.num_free - required >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def can_append_slots(self, req: Request) -> bool:
        """V0 `can_append_slots` for a one-sequence group (no watermark).

        The block table counts the blocks its unseen tokens would touch as
        1 + ceil((unseen - room in the last block) / block_size): a decode's one new token
        counts one block even when the last block still has room, so V0 preempts as soon
        as the pool is exactly full. A prefill chunk's tokens already have blocks (V0
        allocates the whole prompt), so it touches one block, or none when the prompt
        ends on a block boundary.
        """
        if req.num_computed == 0 or req.num_tokens - req.num_computed > 1:
            touched = 0 if req.num_tokens % self.block_size == 0 else 1
        else:
            touched = 1
        return touched <= self.num_free

    # --- shared by every engine ------------------------------------------------
    def lookup(self, req: Request) -> tuple[list, int]:
        """Cached chunks a waiting request can reuse, and how many prompt tokens they cover."""
        if self.prefix is None:
            return [], 0
        parts = self.prefix.lookup(req)
        return parts, self.prefix.hit_chunks(parts) * self.prefix.chunk_tokens

    def allocate(self, req: Request, num_tokens: int, hit: list | None = None) -> bool:
        """Grow `req`'s blocks to hold `num_tokens` tokens; False (no change) if short.

        `hit`: cached chunks from `lookup` to reference first (admission); their tokens count
        as computed, and the blocks they take out of the free pool count against it.
        """
        if hit:
            chunks = self.prefix.hit_chunks(hit)
            hit_blocks = chunks * self.prefix.chunk_blocks
            pinned = self.prefix.blocks_to_pin(hit)
            if self.blocks_for(num_tokens) - hit_blocks + pinned > self.num_free:
                return False
            self.prefix.pin(req, hit)
            self.num_free -= pinned
            req.num_blocks += hit_blocks
            req.num_computed = req.cached_tokens = chunks * self.prefix.chunk_tokens
        need = self.blocks_for(num_tokens) - req.num_blocks
        if need > self.num_free:
            return False
        if hit is not None and self.prefix is not None:
            # an admission, its prompt looked up: vLLM's hit rate is hits / these queries
            self.prefix.query_tokens += req.num_tokens
        if need <= 0:
            return True
        need = min(need + self.preallocate_blocks, self.num_free)
        if self.prefix:
            self.prefix.take(need)
        self.num_free -= need
        req.num_blocks += need
        used = self.num_blocks - self.num_free
        if used > self.peak_used:
            self.peak_used = used
        return True

    # --- runs of decode steps (event compression) --------------------------------------------
    def take_blocks(self, total: int) -> None:
        """Hand out `total` free blocks at once: the same blocks leave the free queue (prefix
        cache) as in several smaller allocations, and the peak is the same."""
        if self.prefix:
            self.prefix.take(total)
        self.num_free -= total
        used = self.num_blocks - self.num_free
        if used > self.peak_used:
            self.peak_used = used

    def free(self, req: Request) -> None:
        # with prefix caching a request's blocks may be shared; only the unshared ones free up
        self.num_free += self.prefix.release(req) if self.prefix else req.num_blocks
        req.num_blocks = 0
        if self.num_free > self.num_blocks:
            raise KVCacheError(
                f"KV pool over-freed: {self.num_free} free of {self.num_blocks} blocks"
            )
