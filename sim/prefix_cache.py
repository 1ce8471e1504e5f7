"""Prefix caching: computed KV chunks keyed by their content, reused by later requests.

vLLM V1 hashes every full block, each hash chained from its parent's; SGLang keeps a radix
tree of token ids. Both reduce to one rule: a chunk of KV is reusable by any request whose
tokens up to the chunk's end are the same. Requests carry no token ids here, only
*segments* — `(segment id, length)` runs, where one id always stands for the same tokens
at the same position after the same history (a shared system prompt, one conversation's
user turn, one reply). So the content up to position `e` is named by the segment that
holds token `e - 1` together with `e`, and that pair is a chunk's key.

Chunks are `chunk_blocks` KV blocks: one block for vLLM, `radix_chunk_tokens` for
SGLang's page-size-1 radix tree (matching to the token would cost a dict entry per token;
at most that many tokens per request are recomputed that SGLang would reuse).

Memory follows vLLM's free queue, which SGLang's LRU eviction of unlocked leaves also
amounts to: a cached chunk nobody references still counts as free, sits in the queue in
the order it was released, and is evicted (forgotten) only when its blocks are handed
out again. A request referencing a cached chunk takes it out of the queue.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from .request import Request


def named(req: Request) -> bool:
    return req.segments is not None or req.out_segment >= 0


def segments(req: Request) -> tuple[tuple[int, int], ...]:
    """A named request's prompt content: its own segments, or (saving memory on millions of
    requests) none stored, meaning one segment of its own, id 2·rid + 1 (sim.workload)."""
    return req.segments if req.segments is not None else ((req.out_segment - 1, req.prompt_len),)


@dataclass(slots=True)
class _Entry:
    ref: int


class PrefixCache:
    def __init__(self, chunk_blocks: int, block_size: int):
        self.chunk_blocks = chunk_blocks
        self.chunk_tokens = chunk_blocks * block_size
        self.entries: dict[tuple, _Entry] = {}
        # free blocks in eviction order: cached chunk keys (chunk_blocks each) and anonymous runs
        self.free_queue: OrderedDict[object, int] = OrderedDict()
        self._anon = itertools.count()
        self.hit_tokens = 0

    # --- keys -------------------------------------------------------------------------
    def chunk_key(self, req: Request, i: int) -> tuple:
        """Key of `req`'s chunk `i` (tokens [i*chunk, (i+1)*chunk)): the segment holding its last token."""
        end = (i + 1) * self.chunk_tokens
        pos = 0
        for seg, length in segments(req):
            pos += length
            if end <= pos:
                return (seg, end)
        return (req.out_segment, end)  # generated tokens are one more segment

    # --- lookup and reference ----------------------------------------------------------
    def lookup(self, req: Request) -> list[tuple]:
        """Longest run of cached chunks from the start of `req`. The last token is never
        taken from the cache: the model must compute at least one position to sample."""
        if not named(req) or req.num_blocks:
            return []
        keys = []
        for i in range((req.num_tokens - 1) // self.chunk_tokens):
            key = self.chunk_key(req, i)
            if key not in self.entries:
                break
            keys.append(key)
        return keys

    def blocks_to_pin(self, keys: list[tuple]) -> int:
        """Free blocks that referencing `keys` takes out of the free queue."""
        return sum(self.chunk_blocks for k in keys if self.entries[k].ref == 0)

    def pin(self, req: Request, keys: list[tuple]) -> int:
        for key in keys:
            e = self.entries[key]
            if e.ref == 0:
                del self.free_queue[key]
            e.ref += 1
        req.kv_keys = list(keys)
        hit = len(keys) * self.chunk_tokens
        self.hit_tokens += hit
        return len(keys) * self.chunk_blocks

    def register(self, req: Request) -> None:
        """Chunks `req` has now fully computed become reusable. A chunk someone else already
        cached stays private to `req` (vLLM keeps the first block with a hash)."""
        if not named(req):
            return
        if req.kv_keys is None:
            req.kv_keys = []
        keys = req.kv_keys
        entries, size = self.entries, self.chunk_tokens
        first_generated = req.prompt_len // size  # chunks from here on end in generated tokens
        for i in range(len(keys), req.num_computed // size):
            key = self.chunk_key(req, i) if i < first_generated else (req.out_segment, (i + 1) * size)
            if key in entries:
                keys.append(None)
            else:
                entries[key] = _Entry(1)
                keys.append(key)

    # --- the free queue ------------------------------------------------------------------
    def take(self, n: int) -> None:
        """Hand out `n` free blocks from the head of the queue, evicting cached chunks."""
        q = self.free_queue
        while n > 0:
            key, blocks = next(iter(q.items()))
            del q[key]
            self.entries.pop(key, None)  # a cached chunk handed out again is forgotten
            if blocks > n:
                q[("anon", next(self._anon))] = blocks - n
                q.move_to_end(next(reversed(q)), last=False)
            n -= blocks

    def give(self, n: int) -> None:
        if n > 0:
            self.free_queue[("anon", next(self._anon))] = n

    def release(self, req: Request) -> int:
        """`req` lets go of its blocks: its tail goes into the queue first (evicted first),
        then its cached chunks, last chunk first, as they lose their last reference. Returns
        how many blocks became free (a chunk another request still uses does not)."""
        held = 0
        released = []
        for key in req.kv_keys or ():
            if key is None:
                continue
            held += self.chunk_blocks
            e = self.entries[key]  # referenced chunks are never evicted
            e.ref -= 1
            if e.ref == 0:
                released.append(key)
        self.give(req.num_blocks - held)
        for key in reversed(released):
            self.free_queue[key] = self.chunk_blocks
        req.kv_keys = []
        return req.num_blocks - held + len(released) * self.chunk_blocks

    def free_blocks(self) -> int:
        return sum(self.free_queue.values())
