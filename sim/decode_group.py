"""Running requests that decode in lockstep, their state kept in arrays (event compression).

In a steady stretch every running request decodes one token per step, so what changes per
step is the same for all of them: one more computed token, one more generated token, one
more entry on the engine's decode clock. The group keeps, per member, the values at the
moment it joined plus the clock length then; its current values are those plus the clock
entries since. Advancing the whole group by a run of steps is therefore free, and only the
KV blocks (which grow at different steps for different requests) are updated, in an array.

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
        self.computed0 = np.empty(0, np.int64)  # num_computed when the member joined
        self.left0 = np.empty(0, np.int64)  # tokens still to generate when it joined
        self.kjoin = np.empty(0, np.int64)  # decode-clock length when it joined
        self.blocks = np.empty(0, np.int64)  # KV blocks held (always current)

    def __len__(self) -> int:
        return len(self.reqs)

    def join(self, reqs: list[Request]) -> None:
        """Decoding requests (fields up to date) become members, in this order, after the others."""
        n = len(reqs)
        self.reqs.extend(reqs)
        self.computed0 = np.concatenate((self.computed0, np.fromiter(map(_COMPUTED, reqs), np.int64, n)))
        self.left0 = np.concatenate((self.left0, np.fromiter((r.max_tokens - r.output_len for r in reqs), np.int64, n)))
        self.kjoin = np.concatenate((self.kjoin, np.full(n, len(self.clock), np.int64)))
        self.blocks = np.concatenate((self.blocks, np.fromiter(map(_BLOCKS, reqs), np.int64, n)))

    def computed(self) -> np.ndarray:
        return self.computed0 + (len(self.clock) - self.kjoin)

    def left(self) -> np.ndarray:
        return self.left0 - (len(self.clock) - self.kjoin)

    def write_back(self, i: int) -> Request:
        """Bring member `i`'s Request up to date (it keeps its place in the arrays)."""
        req = self.reqs[i]
        clock = self.clock
        k0, k1 = int(self.kjoin[i]), len(clock)
        steps = k1 - k0
        req.num_blocks = int(self.blocks[i])
        if steps:
            req.num_computed = int(self.computed0[i]) + steps
            req.output_len = req.max_tokens - int(self.left0[i]) + steps
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
        self.computed0, self.left0 = self.computed0[keep], self.left0[keep]
        self.kjoin, self.blocks = self.kjoin[keep], self.blocks[keep]
        return out

    def dissolve(self) -> None:
        """Every member written back; the group is empty."""
        for i in range(len(self.reqs)):
            self.write_back(i)
        self.__init__(self.clock, self.cache)
