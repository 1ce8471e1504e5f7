"""The prefix cache as it was kept before runs of chunks (extents): one entry per chunk in the
free queue and in the index, keyed by (segment, end token). `sim.prefix_cache` must give exactly
what this gives (tests/test_shared_traces.py); the rules are those of `sim.prefix_cache`'s docstring,
with a private request's chunks kept as one run here too."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sim.request import Request


def named(req: Request) -> bool:
    return req.segments is not None or req.out_segment >= 0


def private(req: Request) -> bool:
    """Nobody else's prompt contains this one's tokens or reply (see `Request.segments`)."""
    return req.segments is None and req.out_segment >= 0 and not req.kv_by_chunk


_RUN = object()  # a lookup hit on a private request's own run, one per chunk


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
        self.entries: dict[Any, _Entry] = {}
        # free blocks in eviction order: cached chunk keys (chunk_blocks each) and anonymous runs
        self.free_queue: Any = OrderedDict()
        self._anon = itertools.count()
        self.hit_tokens = 0
        self.query_tokens = 0  # tokens of the prompts looked up at admission

    # --- keys -------------------------------------------------------------------------
    def chunk_key(self, req: Request, i: int) -> tuple:
        """Key of `req`'s chunk `i` (tokens [i*chunk, (i+1)*chunk)): the segment holding its last token."""
        return next(self.chunk_keys(req, i, i + 1))

    def chunk_keys(self, req: Request, start: int, stop: int):
        """Keys of chunks `start`..`stop - 1`, walking the segments once (a trace's prompt can hold
        hundreds of chunks in dozens of segments). Past the prompt, the generated tokens are one
        more segment."""
        size = self.chunk_tokens
        segs = segments(req)
        k, n = 0, len(segs)
        seg, pos = segs[0][0], segs[0][1]
        for i in range(start, stop):
            end = (i + 1) * size
            while end > pos and k < n:
                k += 1
                if k < n:
                    seg, pos = segs[k][0], pos + segs[k][1]
            yield (seg, end) if end <= pos else (req.out_segment, end)

    # --- lookup and reference ----------------------------------------------------------
    def lookup(self, req: Request) -> list[Any]:
        """Longest run of cached chunks from the start of `req`. The last token is never
        taken from the cache: the model must compute at least one position to sample."""
        if not named(req) or req.num_blocks:
            return []
        if private(req):
            blocks = self.free_queue.get(("run", req.rid))
            if blocks is None:
                return []
            n = blocks // self.chunk_blocks
            if n <= (req.num_tokens - 1) // self.chunk_tokens:
                return [_RUN] * n
            self._by_chunk(req)  # the last chunk is not taken: it stays cached apart
        keys: list[Any] = []
        entries = self.entries
        for key in self.chunk_keys(req, 0, (req.num_tokens - 1) // self.chunk_tokens):
            if key not in entries:
                break
            keys.append(key)
        return keys

    @staticmethod
    def hit_chunks(keys: list[Any]) -> int:
        return len(keys)

    def blocks_to_pin(self, keys: list[Any]) -> int:
        """Free blocks that referencing `keys` takes out of the free queue."""
        if keys and keys[0] is _RUN:
            return len(keys) * self.chunk_blocks  # all of them: only their request uses them
        return sum(self.chunk_blocks for k in keys if self.entries[k].ref == 0)

    def pin(self, req: Request, keys: list[Any]) -> int:
        n = len(keys)
        if keys and keys[0] is _RUN:
            del self.free_queue[("run", req.rid)]  # the whole run: a lookup never leaves its top
            req.kv_run = n
        else:
            for key in keys:
                e = self.entries[key]
                if e.ref == 0:
                    del self.free_queue[key]
                e.ref += 1
            req.kv_keys = list(keys)
        req.kv_chunks = n
        self.hit_tokens += n * self.chunk_tokens
        return n * self.chunk_blocks

    def register(self, req: Request) -> None:
        """Chunks `req` has now fully computed become reusable. A chunk someone else already
        cached stays private to `req` (vLLM keeps the first block with a hash)."""
        if not named(req):
            return
        if private(req):
            if ("run", req.rid) not in self.free_queue:
                n = req.num_computed // self.chunk_tokens
                if n > req.kv_run:
                    req.kv_run = req.kv_chunks = n
                return
            self._by_chunk(req)  # its earlier chunks are still cached: these are copies
        if req.kv_keys is None:
            req.kv_keys = []
        keys = req.kv_keys
        entries, size = self.entries, self.chunk_tokens
        for key in self.chunk_keys(req, len(keys), req.num_computed // size):
            if key in entries:
                keys.append(None)
            else:
                entries[key] = _Entry(1)
                keys.append(key)
        req.kv_chunks = len(keys)

    # --- the free queue ------------------------------------------------------------------
    def take(self, n: int) -> None:
        """Hand out `n` free blocks from the head of the queue, evicting cached chunks."""
        q = self.free_queue
        while n > 0:
            key, blocks = next(iter(q.items()))
            kind = key[0]
            if blocks > n:  # the last entry taken from: what it keeps stays at the head
                if kind == "anon":
                    q[key] = blocks - n
                    return
                if kind == "run":  # a private run loses whole chunks from its top
                    evicted = -(-n // self.chunk_blocks) * self.chunk_blocks
                    if blocks > evicted:
                        q[key] = blocks - evicted
                    else:
                        del q[key]
                    blocks = evicted  # its last chunk's rest is handed back below
                else:
                    del q[key]
                    del self.entries[key]  # a cached chunk handed out again is forgotten
                if blocks > n:
                    q[("anon", next(self._anon))] = blocks - n
                    q.move_to_end(next(reversed(q)), last=False)
                return
            del q[key]
            if kind != "anon" and kind != "run":
                del self.entries[key]
            n -= blocks

    def give(self, n: int) -> None:
        if n > 0:
            self.free_queue[("anon", next(self._anon))] = n

    def release(self, req: Request) -> int:
        """`req` lets go of its blocks: its tail goes into the queue first (evicted first),
        then its cached chunks, last chunk first, as they lose their last reference. Returns
        how many blocks became free (a chunk another request still uses does not)."""
        if private(req):
            run = req.kv_run * self.chunk_blocks
            self.give(req.num_blocks - run)
            if run:
                if ("run", req.rid) in self.free_queue:  # pragma: no cover - an invariant
                    raise RuntimeError(f"request {req.rid} released a second run of cached chunks")
                self.free_queue[("run", req.rid)] = run
            req.kv_run = req.kv_chunks = 0
            return req.num_blocks
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
        for key in released[::-1]:  # (not reversed(): mypyc 2.4 fails to compile it here)
            self.free_queue[key] = self.chunk_blocks
        req.kv_keys = []
        req.kv_chunks = 0
        return req.num_blocks - held + len(released) * self.chunk_blocks

    def _by_chunk(self, req: Request) -> None:
        """From now on keep `req`'s cached chunks as ordinary entries: those it holds, and its
        run in the free queue replaced, in place, by its chunks (the last one first)."""
        req.kv_by_chunk = True
        held = list(self.chunk_keys(req, 0, req.kv_run))
        for key in held:
            self.entries[key] = _Entry(1)
        req.kv_keys, req.kv_run = held, 0
        req.kv_chunks = len(held)
        run = ("run", req.rid)
        blocks = self.free_queue.get(run)
        if blocks is None:
            return
        chunks = list(self.chunk_keys(req, 0, blocks // self.chunk_blocks))[::-1]
        queue: Any = OrderedDict()
        for key, b in self.free_queue.items():
            if key == run:
                for c in chunks:
                    self.entries[c] = _Entry(0)
                    queue[c] = self.chunk_blocks
            else:
                queue[key] = b
        self.free_queue = queue

    def referenced(self) -> bool:
        return any(e.ref for e in self.entries.values())

    def free_blocks(self) -> int:
        return sum(self.free_queue.values())
