"""The benchmark client as a SimPy process (vLLM's `benchmark_serving.py` semantics).

Requests are sent on their schedule. With `max_concurrency`, each waits for a permit
first and its clock (`start_s`) starts only once the permit is held, so TTFT and E2E
exclude client-side queueing, as in the real client. The permit is returned when the
request completes or fails.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import simpy

from .request import Request
from .tokens import TokenStats


class BenchmarkClient:
    def __init__(
        self,
        env: simpy.Environment,
        requests: list[Request],
        max_concurrency: int | None,
        think_time_s: float = 0.0,
        keep_token_times: bool = True,
    ):
        self.env = env
        # token aggregates of every finished stream; per-token times are dropped unless kept
        self.stats = TokenStats()
        self.keep_token_times = keep_token_times
        # later turns of a conversation are sent when the turn before them completes
        self.requests = sorted((r for r in requests if r.follows < 0), key=lambda r: r.arrival_s)
        self.next_turn = {r.follows: r for r in requests if r.follows >= 0}
        self.think_time_s = think_time_s
        self.permits = simpy.Container(env, capacity=max_concurrency, init=max_concurrency) if max_concurrency else None
        self.all_done = env.event()
        self._left = len(requests)
        self.in_flight = 0
        self.max_in_flight = 0
        self.submit: Any = None
        # Permits are fungible and granted first-come-first-served, so the k-th grant after the
        # first max_concurrency uses the (k - max_concurrency)-th release. Recording which
        # request that was lets calibration replay the run with other step times.
        self._releases: deque[int] = deque()

    def start(self, submit: Callable[[Request], None]) -> None:
        self.submit = submit
        if not self.requests:
            self.all_done.succeed()
            return
        self.env.process(self._dispatch())

    def _dispatch(self):
        env = self.env
        for k, req in enumerate(self.requests):
            if req.arrival_s > env.now:
                yield env.timeout(req.arrival_s - env.now)
            if self.permits is not None:
                # asyncio.Semaphore wakes waiters in FIFO order, as this single loop does
                yield self.permits.get(1)
                if k >= self.permits.capacity:
                    req.permit_from = self._releases.popleft()
            self._send(req)

    def _follow_up(self, prev: Request, req: Request):
        """The next turn: the conversation so far (prompt and reply) plus a new message."""
        yield self.env.timeout(self.think_time_s)
        req.prompt_len = prev.prompt_len + prev.output_len + req.new_message_len
        req.segments = (*(prev.segments or ()), (prev.out_segment, prev.output_len), (2 * req.rid + 1, req.new_message_len))
        req.arrival_s = self.env.now
        if self.permits is not None:
            yield self.permits.get(1)
            req.permit_from = self._releases.popleft()
        self._send(req)

    def _send(self, req: Request) -> None:
        req.start_s = self.env.now
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        self.submit(req)

    def on_done(self, req: Request) -> None:
        """The response stream ended (completed or failed)."""
        self.stats.add(req)
        if not self.keep_token_times:
            req.pieces = None
        self.in_flight -= 1
        if self.permits is not None:
            self._releases.append(req.rid)
            self.permits.put(1)
        self._left -= 1
        nxt = self.next_turn.pop(req.rid, None)
        if nxt is not None:
            self.env.process(self._follow_up(req, nxt))
        if self._left == 0:
            self.all_done.succeed()
