"""Running requests that decode in lockstep, kept as counts (event compression).

In a steady stretch every running request decodes one token per step, so what changes per
step is the same for all of them: one more computed token, one more generated token, one
more entry on the engine's decode clock. The group counts its steps (`adv`) and keeps, per
member, only what it had when it joined; everything a plan needs is kept up to date as a
count, so a step costs the same whatever the number of members:

- the context total: the members' computed tokens at joining, plus members x steps;
- the first completion: members by the step at which they have nothing left to generate;
- the KV blocks a step takes: a member's blocks are full every P = (1 + preallocation) x
  block_size tokens, at the steps congruent to its first full step modulo P, and then takes
  1 + preallocation blocks (as `KVCache.allocate` does one token at a time), so members are
  counted by that residue and a step's take is one lookup.

While a request is a member, its `Request` fields `num_computed`, `output_len`,
`num_blocks`, `last_token_s` and its last token piece are stale; `write_back` brings them up
to date when it leaves (it finishes, or the scheduler needs every request as an object
again: anything other than a plain decode of everyone, see `Scheduler._sync_group`).
"""

from __future__ import annotations

import heapq

from .prefix_cache import private
from .request import Request
from .tokens import StepClock


class DecodeGroup:
    def __init__(self, clock: StepClock, block_size: int, preallocate_blocks: int = 0, cache=None):
        self.clock = clock
        self.block_size = block_size
        self.per_take = 1 + preallocate_blocks  # blocks a member takes when its blocks are full
        self.period = self.per_take * block_size  # tokens between two takes of one member
        self.cache = cache  # prefix cache: members' finished chunks are registered on write-back
        self._empty()

    def _empty(self) -> None:
        """No members, no steps run (a new group, or one just dissolved; calling `__init__` again
        instead would leak the old state in the compiled build)."""
        self.reqs: list[Request] = []
        self.adv = 0  # steps the group has run
        self.taken_to = 0  # the KV of the steps before this one is taken
        # per member, at joining: (computed tokens - adv, the step at which it has nothing left,
        # decode-clock length, the step at which its blocks are first full, blocks held)
        self.info: dict[Request, tuple[int, int, int, int, int]] = {}
        self.sum_computed0 = 0  # members' computed tokens, minus adv each
        self.finishing: dict[int, list[Request]] = {}  # by the step at which they finish, in member order
        self._finish_steps: list[int] = []  # heap of the keys of `finishing` (stale ones popped lazily)
        self.by_residue = [0] * self.period  # members by (first full step mod period)
        # steps at which a member counted by its residue is not full yet (it joined with a
        # period or more of room), with how many such members
        self.phantoms: dict[int, int] = {}
        self.fresh: list[Request] = []  # joined, chunks not yet registered as of their first step

    def __len__(self) -> int:
        return len(self.reqs)

    def sum_computed(self) -> int:
        return self.sum_computed0 + len(self.reqs) * self.adv

    def fewest_left(self) -> int:
        """Tokens left to the member closest to finishing."""
        heap = self._finish_steps
        while heap[0] not in self.finishing:
            heapq.heappop(heap)
        return heap[0] - self.adv

    def join(self, reqs: list[Request]) -> None:
        """Decoding requests (fields up to date) become members, in this order, after the others."""
        adv, k, bs, period = self.adv, len(self.clock), self.block_size, self.period
        for r in reqs:
            room = r.num_blocks * bs - r.num_computed  # tokens its blocks hold beyond the computed ones
            if room < 0:  # pragma: no cover - an invariant
                raise RuntimeError(f"request {r.rid} decodes with fewer KV blocks than its computed tokens need")
            for s in range(adv + room - period, adv - 1, -period):
                self.phantoms[s] = self.phantoms.get(s, 0) + 1
            done_at = adv + r.max_tokens - r.output_len
            self.info[r] = (r.num_computed - adv, done_at, k, adv + room, r.num_blocks)
            self.sum_computed0 += r.num_computed - adv
            self.by_residue[(adv + room) % period] += 1
            if done_at in self.finishing:
                self.finishing[done_at].append(r)
            else:
                self.finishing[done_at] = [r]
                heapq.heappush(self._finish_steps, done_at)
        self.reqs.extend(reqs)
        if self.cache is not None:
            self.fresh.extend(reqs)

    def register_fresh(self) -> None:
        """The prefix cache learns of new members' chunks as of the end of their first step in the
        group, as step by step (a prompt arriving by KV transfer is registered then). Later
        chunks hold generated tokens, which nobody else's prompt contains yet, so they wait for
        `write_back`; these may not: whether a chunk is cached already decides whether it
        becomes an entry, so they are registered before anything else takes blocks."""
        if not self.fresh:
            return
        for req in self.fresh:
            if req in self.info:
                req.num_computed = self.info[req][0] + self.adv + 1
                self.cache.register(req)
        self.fresh = []

    def registers_prompt_chunks(self) -> bool:
        """Will `register_fresh` put prompt chunks in the prefix cache that another request could
        reuse? A prompt that arrived by KV transfer (PD) is registered only after its first step
        here; a prompt computed here was registered when it was computed."""
        if not self.fresh:  # (always so without a prefix cache)
            return False
        size = self.cache.chunk_tokens
        return any(r in self.info and not private(r) and r.kv_chunks < r.prompt_len // size
                   for r in self.fresh)

    def blocks_due(self, steps: int = 1) -> int:
        """Blocks the members take in the next `steps` steps whose KV is not taken yet: at each,
        those whose blocks are full, which the residue of the step says (but for the steps
        before a member's first full step that are one or more periods before it)."""
        n, t, period, counts = len(self.reqs), self.taken_to, self.period, self.by_residue
        cycles, rest = divmod(steps, period)
        due = n * cycles
        for s in range(t, t + rest):
            due += counts[s % period]
        if self.phantoms:
            due -= sum(c for s, c in self.phantoms.items() if t <= s < t + steps)
        return due * self.per_take

    def take(self, steps: int = 1) -> None:
        """The KV of the next `steps` steps is taken (the caller took `blocks_due(steps)` blocks)."""
        self.taken_to += steps
        if self.phantoms:
            self.phantoms = {s: c for s, c in self.phantoms.items() if s >= self.taken_to}

    def advance(self, steps: int) -> None:
        """Every member computed and received `steps` more tokens."""
        self.register_fresh()
        if self.taken_to != self.adv + steps:  # pragma: no cover - an invariant
            raise RuntimeError(f"decode group ran to step {self.adv + steps} with KV taken to {self.taken_to}")
        self.adv += steps

    def _blocks(self, req: Request) -> int:
        _, _, _, full_at, blocks = self.info[req]
        return blocks + self.per_take * max(0, -(-(self.taken_to - full_at) // self.period))

    def write_back(self, req: Request) -> Request:
        """Bring a member's Request up to date (it stays a member)."""
        c0, done_at, k0, _, _ = self.info[req]
        clock = self.clock
        k1 = len(clock)
        req.num_blocks = self._blocks(req)
        req.num_computed = c0 + self.adv
        req.output_len = req.max_tokens - (done_at - self.adv)
        if k1 > k0:
            req.last_token_s = clock.ends[k1 - 1]
            p = req.pieces[-1]  # one token per clock entry since joining (sim.tokens)
            if p[0] is clock and p[2] == k0 and p[3] == 1:
                p[2] = k1
            else:
                req.pieces.append([clock, k0, k1, 1])
            if self.cache is not None:
                self.cache.register(req)
        return req

    def pop_finished(self) -> list[Request]:
        """Members with nothing left to generate leave, written back, in member order."""
        done = self.finishing.pop(self.adv, None)
        if not done:
            return []
        for req in done:
            self.write_back(req)
            c0, _, _, full_at, _ = self.info.pop(req)
            self.sum_computed0 -= c0
            self.by_residue[full_at % self.period] -= 1
            for s in range(full_at - self.period, self.taken_to - 1, -self.period):
                self.phantoms[s] -= 1
        if len(done) == 1:
            self.reqs.remove(done[0])  # compares by identity, in C
        else:
            gone = set(done)  # requests hash by identity
            self.reqs = [r for r in self.reqs if r not in gone]
        return done

    def dissolve(self) -> None:
        """Every member written back; the group is empty."""
        for req in self.reqs:
            self.write_back(req)
        self._empty()
