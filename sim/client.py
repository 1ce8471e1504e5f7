"""The benchmark client as a SimPy process (vLLM's `benchmark_serving.py` semantics).

Requests are sent on their schedule. With `max_concurrency`, each waits for a permit
first and its clock (`start_s`) starts only once the permit is held, so TTFT and E2E
exclude client-side queueing, as in the real client. The permit is returned when the
request completes or fails. Like `asyncio.Semaphore`, a free permit is taken at once and
waiters are served first come, first served: requests due at the same instant are all sent
before the engine plans its next step, with or without a front-end latency.
"""

from __future__ import annotations

import math
from collections import deque
from functools import partial
from collections.abc import Callable
from typing import Any

import simpy

from .request import Request, Status
from .tokens import TokenStats


class BenchmarkClient:
    def __init__(
        self,
        env: simpy.Environment,
        requests: list[Request],
        max_concurrency: int | None,
        think_time_s: float = 0.0,
        keep_token_times: bool = True,
        stage_interval_s: float | None = None,
        request_timeout_s: float | None = None,
    ):
        self.env = env
        # token aggregates of every finished stream; per-token times are dropped unless kept
        self.stats = TokenStats()
        self.keep_token_times = keep_token_times
        # later turns of a conversation are sent when the turn before them completes
        self.requests = sorted((r for r in requests if r.follows < 0), key=lambda r: (r.stage, r.arrival_s))
        # load stages: the next starts after every request of the one before has ended
        self.stage_interval_s = stage_interval_s
        self._stage_left: dict[int, int] = {}
        self._stage_done: dict[int, simpy.Event] = {}
        self._stage_t0: dict[int, float] = {0: 0.0}  # when each stage's timer started
        if stage_interval_s is not None:
            for r in requests:  # later turns too: a stage ends when its conversations have
                self._stage_left[r.stage] = self._stage_left.get(r.stage, 0) + 1
            self._stage_done = {k: env.event() for k in self._stage_left}
        self.next_turn = {r.follows: r for r in requests if r.follows >= 0}
        self.think_time_s = think_time_s
        self.max_concurrency = max_concurrency or 0
        self._free_permits = self.max_concurrency
        self._permit_waiters: deque[simpy.Event] = deque()
        self.all_done = env.event()
        self._left = len(requests)
        # a client-side deadline: the client gives up (a failure) and the server aborts the request
        self.request_timeout_s = request_timeout_s
        self.abort: Any = None  # the deployment's abort, set by start()
        self._unreleased = 0  # requests given up on that the engine has not let go of yet
        self.end_s = 0.0  # when the client saw its last request end (the benchmark's duration)
        self.in_flight = 0
        self.max_in_flight = 0
        self.submit: Any = None
        # Permits are fungible and granted first-come-first-served, so the k-th grant after the
        # first max_concurrency uses the (k - max_concurrency)-th release. Recording which
        # request that was lets calibration replay the run with other step times.
        self._releases: deque[int] = deque()

    def start(self, submit: Callable[[Request], None], abort: Callable[[Request], None] | None = None) -> None:
        self.submit = submit
        self.abort = abort
        if not self.requests:
            self.all_done.succeed()
            return
        self.env.process(self._dispatch())

    def _dispatch(self):
        env = self.env
        stage, t0, set_up = 0, 0.0, -1.0
        for k, req in enumerate(self.requests):
            if req.stage != stage:
                t0, set_up = yield from self._next_stage(stage, set_up)
                stage = req.stage
                self._stage_t0[stage] = t0
            req.arrival_s += t0
            if req.arrival_s > env.now:
                yield env.timeout(req.arrival_s - env.now)
            if self.max_concurrency:
                wait = self._take_permit()
                if wait is not None:
                    yield wait
                if k >= self.max_concurrency:
                    req.permit_from = self._releases.popleft()
            self._send(req)

    def _next_stage(self, stage: int, set_up: float):
        """inference-perf between stages: its main loop checks once a second (from the stage's
        set-up) whether every request has ended, then sleeps `load.interval`; the next stage is
        set up then and its timer starts a second later. Returns that start and set-up time."""
        done = self._stage_done[stage]
        if not done.triggered:
            yield done
        polls = max(1, math.ceil(self.env.now - set_up - 1e-9))
        set_up = set_up + polls + (self.stage_interval_s or 0.0)
        if set_up + 1.0 > self.env.now:
            yield self.env.timeout(set_up + 1.0 - self.env.now)
        return set_up + 1.0, set_up

    def _take_permit(self) -> simpy.Event | None:
        """None when a permit is free (taken now), else the event that hands one over."""
        if self._free_permits:
            self._free_permits -= 1
            return None
        ev = self.env.event()
        self._permit_waiters.append(ev)
        return ev

    def _follow_up(self, prev: Request, req: Request):
        """The next turn: the conversation so far (prompt and reply) plus a new message, sent a
        think time after the reply, and a recorded turn not before its timestamp."""
        think = self.think_time_s if req.think_s != req.think_s else req.think_s
        req.not_before_s += self._stage_t0.get(req.stage, 0.0)  # from the stage's start, like arrival_s
        yield self.env.timeout(max(think, req.not_before_s - self.env.now))
        if req.new_message_len:  # otherwise its prompt was known in advance (a recorded turn)
            if prev.aborted or prev.status is Status.FAILED:
                # a failed turn adds nothing to the conversation: inference-perf restores the
                # context it had before that turn (its message goes too)
                later = prev.follows >= 0 and prev.new_message_len > 0
                history = prev.prompt_len - prev.new_message_len if later else 0
                segs = (prev.segments or ())[:-1] if later else ()
            else:
                history = prev.prompt_len + prev.output_len
                segs = (*(prev.segments or ()), (prev.out_segment, prev.output_len))
            req.prompt_len = history + req.new_message_len
            req.segments = (*segs, (2 * req.rid + 1, req.new_message_len))
        req.arrival_s = self.env.now
        if self.max_concurrency:
            wait = self._take_permit()
            if wait is not None:
                yield wait
            req.permit_from = self._releases.popleft()
        self._send(req)

    def _send(self, req: Request) -> None:
        req.start_s = self.env.now
        if self.request_timeout_s is not None:
            self.env.timeout(self.request_timeout_s).callbacks.append(partial(self._time_out, req))
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        self.submit(req)

    def _time_out(self, req: Request, _event: object = None) -> None:
        """No complete response within the timeout: the client counts a failure now (inference-
        perf: a TimeoutError, out of every latency statistic) and closes the connection, which
        the server answers by aborting the request and freeing its KV (sim.engine.Engine.abort)."""
        if req.done or req.aborted:
            return
        req.aborted = True
        req.error = f"timeout: no complete response within {self.request_timeout_s:g} s (the server aborts it)"
        self._unreleased += 1
        self._ended(req)
        self.abort(req)

    def on_done(self, req: Request) -> None:
        """The response stream ended (completed or failed), or, for a request the client gave up
        on, the server let it go."""
        if req.aborted:  # a failure whatever the server did after the client left (see runner)
            self._unreleased -= 1
            self._check_all_done()
            return
        self._ended(req)

    def _ended(self, req: Request) -> None:
        self.end_s = self.env.now
        self.stats.add(req)
        if not self.keep_token_times:
            req.pieces = None
        self.in_flight -= 1
        if self.max_concurrency:
            self._releases.append(req.rid)
            if self._permit_waiters:
                self._permit_waiters.popleft().succeed()
            else:
                self._free_permits += 1
        self._left -= 1
        if self._stage_left:
            self._stage_left[req.stage] -= 1
            if not self._stage_left[req.stage]:
                self._stage_done[req.stage].succeed()
        nxt = self.next_turn.pop(req.rid, None)
        if nxt is not None:
            self.env.process(self._follow_up(req, nxt))
        self._check_all_done()

    def _check_all_done(self) -> None:
        if self._left == 0 and not self._unreleased and not self.all_done.triggered:
            self.all_done.succeed()
