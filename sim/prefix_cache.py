"""Prefix caching: computed KV chunks keyed by their content, reused by later requests.

vLLM V1 hashes every full block, each hash chained from its parent's; SGLang keeps a radix
tree of token ids. Both reduce to one rule: a chunk of KV is reusable by any request whose
tokens up to the chunk's end are the same. Requests carry no token ids here, only
*segments* — `(segment id, length)` runs, where one id always stands for the same tokens
at the same position after the same history (a shared system prompt, one conversation's
user turn, one reply, a trace's hash block). So the content up to position `e` is named by
the segment that holds token `e - 1` together with `e`, and that pair is a chunk's key.

Chunks are `chunk_blocks` KV blocks: one block for vLLM, `radix_chunk_tokens` for
SGLang's page-size-1 radix tree (matching to the token would cost a dict entry per token;
at most that many tokens per request are recomputed that SGLang would reuse).

Memory follows vLLM's free queue, which SGLang's LRU eviction of unlocked leaves also
amounts to: a cached chunk nobody references still counts as free, sits in the queue in
the order it was released, and is evicted (forgotten) only when its blocks are handed
out again. A request referencing a cached chunk takes it out of the queue.

A trace's prompt is hundreds of chunks in a few dozen segments, so the cache keeps chunks
by the run, not one by one. An *extent* is a run of cached chunks of one segment that one
request computed in order, chunks [start, top). A chunk's references are prefix-shaped: a
request that references chunk j references every chunk of the extent below it too (a lookup
walks from the start; the request that computed them holds all it computed). So an extent
keeps only its holders' ends, its chunks [max end, top) are the ones nobody references, and
those sit in the free queue as ranges: each release adds the range just below the ones
already there, so within an extent the older range is the higher one, and eviction (from the
queue's head) always takes an extent's chunks from its top, as vLLM's tail-first release
order does. A lookup enters an extent at its start and goes on at its top, where the next
extent of the segment may begin: two requests that computed the same chunks at once keep
the first's (vLLM keeps the first block with a hash; the second's copies are its own), and
a chunk evicted between them ends every lookup there, as a missing hash does.

Most workloads share nothing (a benchmark's random or dataset prompts): a *private*
request's chunks can only ever be reused by itself, after a preemption. They form one run,
chunks 0..n-1, released together (the last chunk first in the queue) and evicted from the
top, so the cache keeps them as one queue entry and a count: the same hits, the same free
blocks, the same eviction order, at a cost per request. The one case a run cannot express
(its own earlier chunks still cached while it computes them again, e.g. a PD decode instance
taking it back without a lookup) turns the request's chunks into extents, in place
(`_by_chunk`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from .request import Request, Status

_NO_END = 1 << 62  # generated tokens: a segment without an end


def named(req: Request) -> bool:
    return req.segments is not None or req.out_segment >= 0


def private(req: Request) -> bool:
    """Nobody else's prompt contains this one's tokens or reply (see `Request.segments`)."""
    return req.segments is None and req.out_segment >= 0 and not req.kv_by_chunk


def segments(req: Request) -> tuple[tuple[int, int], ...]:
    """A named request's prompt content: its own segments, or (saving memory on millions of
    requests) none stored, meaning one segment of its own, id 2·rid + 1 (sim.workload)."""
    return req.segments if req.segments is not None else ((req.out_segment - 1, req.prompt_len),)


class Extent:
    """Cached chunks [start, top) of segment `seg`; `holds`: how many requests reference the
    chunks below each end; `free`: its ranges in the free queue, lowest (newest) first."""

    __slots__ = ("seg", "start", "top", "holds", "hmax", "free")

    def __init__(self, seg: int, start: int, top: int) -> None:
        self.seg = seg
        self.start = start
        self.top = top
        self.holds: dict[int, int] = {}
        self.hmax = start  # the highest referenced end (start: none)
        self.free: list[Any] = []

    def hold(self, end: int) -> None:
        self.holds[end] = self.holds.get(end, 0) + 1
        if end > self.hmax:
            self.hmax = end

    def unhold(self, end: int) -> None:
        left = self.holds[end] - 1
        if left:
            self.holds[end] = left
            return
        del self.holds[end]
        if end == self.hmax:
            self.hmax = max(self.holds) if self.holds else self.start


class PrefixCache:
    def __init__(self, chunk_blocks: int, block_size: int):
        self.chunk_blocks = chunk_blocks
        self.chunk_tokens = chunk_blocks * block_size
        self.extents: dict[int, list[Extent]] = {}  # segment -> its extents
        # free blocks in eviction order: extent ranges, private runs and anonymous blocks
        self.free_queue: Any = OrderedDict()
        self.ranges: dict[Any, list] = {}  # an extent range's queue key -> [extent, lo, hi]
        self._keys = itertools.count()
        self.hit_tokens = 0
        self.query_tokens = 0  # tokens of the prompts looked up at admission

    # --- content -------------------------------------------------------------------------
    def seg_chunks(self, req: Request) -> Iterator[tuple[int, int, int]]:
        """(segment, first chunk, end chunk) for each segment of `req`: chunk i belongs to the
        segment holding its last token; past the prompt, the generated tokens are one more."""
        size = self.chunk_tokens
        pos = 0
        for seg, length in segments(req):
            a, pos = pos // size, pos + length
            b = pos // size
            if b > a:
                yield seg, a, b
        yield req.out_segment, req.prompt_len // size, _NO_END

    def _containing(self, seg: int, i: int) -> Extent | None:
        for ext in self.extents.get(seg, ()):
            if ext.start <= i < ext.top:
                return ext
        return None

    # --- lookup and reference ----------------------------------------------------------
    def lookup(self, req: Request) -> list[Any]:
        """Longest run of cached chunks from the start of `req`, as (extent, end) parts, or
        a private request's own run. The last token is never taken from the cache: the model
        must compute at least one position to sample."""
        if not named(req) or req.num_blocks:
            return []
        limit = (req.num_tokens - 1) // self.chunk_tokens
        if private(req):
            blocks = self.free_queue.get(("run", req.rid))
            if blocks is None:
                return []
            n = blocks // self.chunk_blocks
            if n <= limit:
                return [("run", n)]
            self._by_chunk(req)  # the last chunk is not taken: it stays cached apart
        parts: list[Any] = []
        i = 0
        for seg, a, b in self.seg_chunks(req):
            b = min(b, limit)
            if i < b and seg not in self.extents:
                return parts
            while i < b:
                ext = self._containing(seg, i)
                if ext is None:
                    return parts
                i = min(ext.top, b)
                parts.append((ext, i))
            if b == limit:
                break
        return parts

    @staticmethod
    def hit_chunks(parts: list[Any]) -> int:
        if parts and parts[0][0] == "run":
            return parts[0][1]
        return sum(end - ext.start for ext, end in parts)

    def blocks_to_pin(self, parts: list[Any]) -> int:
        """Free blocks that referencing `parts` takes out of the free queue."""
        if parts and parts[0][0] == "run":
            return parts[0][1] * self.chunk_blocks  # all of them: only their request uses them
        return sum(max(0, end - ext.hmax) for ext, end in parts) * self.chunk_blocks

    def pin(self, req: Request, parts: list[Any]) -> int:
        n = self.hit_chunks(parts)
        if parts and parts[0][0] == "run":
            del self.free_queue[("run", req.rid)]  # the whole run: a lookup never leaves its top
            req.kv_run = n
        else:
            held = []
            for ext, end in parts:
                if end > ext.hmax:
                    self._unfree(ext, end)
                ext.hold(end)
                held.append([ext, end])
            req.kv_keys = held
        req.kv_chunks = n
        self.hit_tokens += n * self.chunk_tokens
        return n * self.chunk_blocks

    def _unfree(self, ext: Extent, end: int) -> None:
        """Chunks [hmax, end) of `ext` leave the free queue (its lowest ranges)."""
        q, cb = self.free_queue, self.chunk_blocks
        while ext.free:
            key = ext.free[0]
            r = self.ranges[key]
            if r[2] <= end:
                del q[key], self.ranges[key]
                ext.free.pop(0)
                if r[2] == end:
                    return
            else:
                if r[1] < end:
                    r[1] = end
                    q[key] = (r[2] - end) * cb
                return

    def register(self, req: Request, generated: bool = False) -> None:
        """Chunks of `req`'s prompt it has now fully computed become reusable. A chunk someone
        else already cached stays private to `req` (vLLM keeps the first block with a hash).

        The chunks of its generated tokens are registered when it lets go of its blocks
        (`release`, `generated=True`): until then nobody can look them up (only a later turn
        of its conversation, or itself after a preemption, can hold its reply), so the cache
        ends the same, with one registration per request instead of one per decoded chunk. A PD
        prefill job holds its blocks after its request has ended, so its are registered at once.
        So is a request computing its reply again after a preemption while copies of it from
        before are cached: which chunks become its own copies depends on what is cached as it
        computes them, and the old copies may be evicted before it lets go."""
        size = self.chunk_tokens
        # (a PD prefill job keeps its blocks past its request's end, while a later turn may look)
        eager = generated or req.hold_kv or bool(self.extents.get(req.out_segment))
        stop = req.num_computed // size if eager else min(req.num_computed, req.prompt_len) // size
        if stop <= req.kv_chunks or not named(req):
            return  # no new full chunk
        if generated and req.kv_chunks < req.prompt_len // size and not req.hold_kv:
            return  # its prompt is not registered yet (a PD decode instance's before its first step)
        if private(req):
            if ("run", req.rid) not in self.free_queue:
                if stop > req.kv_run:
                    req.kv_run = req.kv_chunks = stop
                return
            self._by_chunk(req)  # its earlier chunks are still cached: these are copies
        if req.kv_keys is None:
            req.kv_keys = []
        held = req.kv_keys
        i = req.kv_chunks
        if i >= stop:
            return
        first_out = req.prompt_len // size
        # a decode's new chunk is past the prompt: only the generated tokens' segment is walked
        runs = self.seg_chunks(req) if i < first_out else ((req.out_segment, first_out, _NO_END),)
        for seg, a, b in runs:
            if b <= i:
                continue
            b = min(b, stop)
            exts = self.extents.get(seg)
            while i < b:
                j = b
                if exts:  # (most new chunks are of a segment nobody has cached yet)
                    ext = self._containing(seg, i)
                    if ext is not None:  # computed again: this request's copies are its own
                        i = min(ext.top, b)
                        continue
                    for other in exts:
                        if i < other.start < j:
                            j = other.start
                last = held[-1] if held else None
                if last is not None and last[0].seg == seg and last[0].top == i and last[1] == i:
                    ext = last[0]  # it holds its extent up to the top: it grows
                    ext.unhold(i)
                    ext.top = j
                    ext.hold(j)
                    last[1] = j
                else:
                    ext = Extent(seg, i, j)
                    ext.hold(j)
                    if exts is None:
                        exts = self.extents[seg] = []
                    exts.append(ext)
                    held.append([ext, j])
                i = j
            if i >= stop:
                break
        req.kv_chunks = stop

    # --- the free queue ------------------------------------------------------------------
    def take(self, n: int) -> None:
        """Hand out `n` free blocks from the head of the queue, evicting cached chunks."""
        q, cb = self.free_queue, self.chunk_blocks
        while n > 0:
            key, blocks = next(iter(q.items()))
            kind = key[0]
            if blocks > n:  # the last entry taken from: what it keeps stays at the head
                if kind == "anon":
                    q[key] = blocks - n
                    return
                evicted = -(-n // cb)  # whole chunks from its top
                if kind == "run":
                    left = blocks - evicted * cb
                    if left > 0:
                        q[key] = left
                    else:
                        del q[key]
                else:
                    r = self.ranges[key]
                    r[2] -= evicted
                    r[0].top = r[2]
                    if r[2] > r[1]:
                        q[key] = (r[2] - r[1]) * cb
                    else:
                        self._drop_range(key, r)
                if evicted * cb > n:  # its last chunk's rest is handed back, at the head
                    q[("anon", next(self._keys))] = evicted * cb - n
                    q.move_to_end(next(reversed(q)), last=False)
                return
            del q[key]
            if kind == "x":
                r = self.ranges[key]
                r[2] = r[1]
                r[0].top = r[1]
                self._drop_range(key, r)
            n -= blocks

    def _drop_range(self, key: Any, r: list) -> None:
        """An extent's top range is gone (evicted): forget it, and the extent if nothing is left."""
        self.free_queue.pop(key, None)
        del self.ranges[key]
        ext = r[0]
        if ext.free.pop() != key:  # pragma: no cover - an invariant
            raise RuntimeError("an extent's evicted range was not its top one")
        if ext.top == ext.start and not ext.holds:
            self.extents[ext.seg].remove(ext)

    def give(self, n: int) -> None:
        if n > 0:
            self.free_queue[("anon", next(self._keys))] = n

    def release(self, req: Request) -> int:
        """`req` lets go of its blocks: its tail goes into the queue first (evicted first),
        then its cached chunks, last chunk first, as they lose their last reference. Returns
        how many blocks became free (a chunk another request still uses does not)."""
        cb = self.chunk_blocks
        if req.has_next_turn or req.status is not Status.FINISHED:
            # (a finished reply no later turn holds is never looked up: its blocks are plain free ones)
            self.register(req, generated=True)
        if private(req):
            run = req.kv_run * cb
            self.give(req.num_blocks - run)
            if run:
                if ("run", req.rid) in self.free_queue:  # pragma: no cover - an invariant
                    raise RuntimeError(f"request {req.rid} released a second run of cached chunks")
                self.free_queue[("run", req.rid)] = run
            req.kv_run = req.kv_chunks = 0
            return req.num_blocks
        held = req.kv_keys or ()
        held_chunks = 0
        for ext, end in held:
            held_chunks += end - ext.start
        self.give(req.num_blocks - held_chunks * cb)
        freed = 0
        for ext, end in held[::-1]:  # (not reversed(): mypyc 2.4 fails to compile it here)
            ext.unhold(end)
            if end > ext.hmax:  # chunks [hmax, end) lost their last reference
                key = ("x", next(self._keys))
                self.free_queue[key] = (end - ext.hmax) * cb
                self.ranges[key] = [ext, ext.hmax, end]
                ext.free.insert(0, key)
                freed += end - ext.hmax
        req.kv_keys = []
        req.kv_chunks = 0
        return req.num_blocks - held_chunks * cb + freed * cb

    def _by_chunk(self, req: Request) -> None:
        """From now on keep `req`'s cached chunks as extents: those it holds, and its run in
        the free queue replaced, in place, by their ranges (the last chunk first)."""
        req.kv_by_chunk = True
        run = ("run", req.rid)
        blocks = self.free_queue.get(run)
        if req.kv_run and blocks is not None:  # pragma: no cover - an invariant
            raise RuntimeError(f"request {req.rid} holds its cached chunks and has them in the free queue")
        held: list = []
        for seg, a, b in self.seg_chunks(req):
            if a >= req.kv_run:
                break
            ext = Extent(seg, a, min(b, req.kv_run))
            ext.hold(ext.top)
            self.extents.setdefault(seg, []).append(ext)
            held.append([ext, ext.top])
        req.kv_keys, req.kv_run = held, 0
        if blocks is None:
            return
        m = blocks // self.chunk_blocks
        parts = []
        for seg, a, b in self.seg_chunks(req):
            if a >= m:
                break
            ext = Extent(seg, a, min(b, m))
            self.extents.setdefault(seg, []).append(ext)
            parts.append(ext)
        queue: Any = OrderedDict()
        for key, b in self.free_queue.items():
            if key == run:
                for ext in parts[::-1]:
                    k = ("x", next(self._keys))
                    queue[k] = (ext.top - ext.start) * self.chunk_blocks
                    self.ranges[k] = [ext, ext.start, ext.top]
                    ext.free.append(k)
            else:
                queue[key] = b
        self.free_queue = queue

    def referenced(self) -> bool:
        """Whether any request still references a cached chunk."""
        return any(e.holds for exts in self.extents.values() for e in exts)

    def free_blocks(self) -> int:
        return sum(self.free_queue.values())
