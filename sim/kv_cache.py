"""Paged KV cache: a pool of fixed-size blocks, counted per request.

Only counts are simulated (which physical block holds what does not change timing
without prefix caching). Every mutation checks the pool's invariants, so a scheduler
bug shows up as an exception at the step that caused it rather than as a wrong number.
"""

from __future__ import annotations

from enum import Enum

from .request import Request


class AllocStatus(str, Enum):
    """vLLM V0 `BlockSpaceManager.can_allocate` answers."""

    OK = "ok"
    LATER = "later"
    NEVER = "never"


class KVCacheError(RuntimeError):
    pass


class KVCache:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0, preallocate_tokens: int = 0):
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
    def allocate(self, req: Request, num_tokens: int) -> bool:
        """Grow `req`'s blocks to hold `num_tokens` tokens; False (no change) if short."""
        need = self.blocks_for(num_tokens) - req.num_blocks
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        need = min(need + self.preallocate_blocks, self.num_free)
        self.num_free -= need
        req.num_blocks += need
        used = self.num_blocks - self.num_free
        if used > self.peak_used:
            self.peak_used = used
        return True

    def free(self, req: Request) -> None:
        self.num_free += req.num_blocks
        req.num_blocks = 0
        if self.num_free > self.num_blocks:
            raise KVCacheError(
                f"KV pool over-freed: {self.num_free} free of {self.num_blocks} blocks"
            )
