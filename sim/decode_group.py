"""Running requests that decode in lockstep, their state kept in arrays (event compression).

In a steady stretch every running request decodes one token per step, so what changes per
step is the same for all of them: one more computed token, one more generated token, one
more entry on the engine's decode clock. The group keeps each member's computed tokens,
tokens still to generate and KV blocks in arrays, and the decode-clock length when it
joined (its tokens since are the clock's entries since); a run of steps is a few array
operations, whatever the number of members or steps.

While a request is a member, its `Request` fields `num_computed`, `output_len`,
`num_blocks`, `last_token_s` and its last token piece are stale; `write_back` brings them up
to date when it leaves (it finishes, or the scheduler needs every request as an object
again: anything other than a plain decode of everyone, see `Scheduler._sync_group`).
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from .request import Request
from .tokens import StepClock

_COMPUTED = attrgetter("num_computed")
_BLOCKS = attrgetter("num_blocks")


class DecodeGroup:
    def __init__(self, clock: StepClock, cache=None):
        self.clock = clock
        self.cache = cache  # prefix cache: members' finished chunks are registered on write-back
        self.reqs: list[Request] = []
        self.computed = np.empty(0, np.int64)  # tokens whose KV is computed
        self.left = np.empty(0, np.int64)  # tokens still to generate
        self.blocks = np.empty(0, np.int64)  # KV blocks held
        self.kjoin = np.empty(0, np.int64)  # decode-clock length when it joined

    def __len__(self) -> int:
        return len(self.reqs)

    def join(self, reqs: list[Request]) -> None:
        """Decoding requests (fields up to date) become members, in this order, after the others."""
        n = len(reqs)
        self.reqs.extend(reqs)
        self.computed = np.concatenate((self.computed, np.fromiter(map(_COMPUTED, reqs), np.int64, n)))
        self.left = np.concatenate((self.left, np.fromiter((r.max_tokens - r.output_len for r in reqs), np.int64, n)))
        self.kjoin = np.concatenate((self.kjoin, np.full(n, len(self.clock), np.int64)))
        self.blocks = np.concatenate((self.blocks, np.fromiter(map(_BLOCKS, reqs), np.int64, n)))

    def advance(self, steps: int) -> None:
        """Every member computed and received `steps` more tokens (new arrays: callers may hold
        the old ones)."""
        self.computed = self.computed + steps
        self.left = self.left - steps

    def write_back(self, i: int) -> Request:
        """Bring member `i`'s Request up to date (it keeps its place in the arrays)."""
        req = self.reqs[i]
        clock = self.clock
        k0, k1 = int(self.kjoin[i]), len(clock)
        steps = k1 - k0
        req.num_blocks = int(self.blocks[i])
        req.num_computed = int(self.computed[i])
        req.output_len = req.max_tokens - int(self.left[i])
        if steps:
            req.last_token_s = clock.ends[k1 - 1]
            p = req.pieces[-1]  # one token per clock entry since joining (sim.tokens)
            if p[0] is clock and p[2] == k0 and p[3] == 1:
                p[2] = k1
            else:
                req.pieces.append([clock, k0, k1, 1])
            if self.cache is not None:
                self.cache.register(req)
        return req

    def leave(self, idx: np.ndarray) -> list[Request]:
        """Members at positions `idx` (ascending) leave, written back."""
        out = [self.write_back(i) for i in idx.tolist()]
        keep = np.ones(len(self.reqs), dtype=bool)
        keep[idx] = False
        for i in reversed(idx.tolist()):
            del self.reqs[i]
        self.computed, self.left = self.computed[keep], self.left[keep]
        self.kjoin, self.blocks = self.kjoin[keep], self.blocks[keep]
        return out

    def dissolve(self) -> None:
        """Every member written back; the group is empty."""
        for i in range(len(self.reqs)):
            self.write_back(i)
        self.__init__(self.clock, self.cache)
