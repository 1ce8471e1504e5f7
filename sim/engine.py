"""One engine instance as a SimPy process: schedule, run the step, stream tokens.

    loop:
        batch = scheduler.schedule()
        if nothing to run: sleep until a request arrives
        wait step_time(batch)
        every request whose tokens are now all computed emits one token

The front door (the OpenAI server's length check) runs when a request arrives, before
the scheduler ever sees it, exactly like vLLM's HTTP 400.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import random
from bisect import bisect_left
from heapq import heappush

import simpy
from mypy_extensions import mypyc_attr
from simpy.events import NORMAL

from .request import Request, Status
from .schedulers.base import Scheduler
from .step_time import BatchShape, StepTimeModel, chunked_run_ends, decode_run_ends
from .tokens import StepClock, emit_chunk


def front_door_error(req: Request, max_model_len: int, engine: str = "vllm") -> str:
    """The server's request validation; a non-empty string means HTTP 400.

    vLLM rejects prompt + max_tokens > max_model_len; SGLang rejects input + max_new_tokens
    >= context_length (note: >=).
    """
    if req.prompt_len < 1:
        return "The decoder prompt cannot be empty"
    if req.max_tokens < 1:
        return f"max_tokens must be at least 1, got {req.max_tokens}."
    total = req.prompt_len + req.max_tokens
    if engine == "sglang":
        if total >= max_model_len:
            return (
                f"Requested token count exceeds the model's maximum context length of {max_model_len} tokens. "
                f"You requested a total of {total} tokens: {req.prompt_len} tokens from the input messages "
                f"and {req.max_tokens} tokens for the completion."
            )
        return ""
    if total > max_model_len:  # strictly greater
        return (
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, you requested {total} tokens ({req.prompt_len} in the messages, "
            f"{req.max_tokens} in the completion). Please reduce the length of the "
            "messages or completion."
        )
    return ""


@mypyc_attr(native_class=False)
class SimulationStuck(RuntimeError):
    """The scheduler has work but can schedule nothing and nothing will free memory."""


@dataclass(slots=True)
class StepRecord:
    """One forward pass, as recorded with `record_steps=True` (tests, timelines, calibration)."""

    t_start_s: float
    duration_s: float
    shape: BatchShape
    after_idle: bool  # the engine slept before this step: it started at an arrival
    num_preempted: int
    kv_blocks_used: int
    num_waiting: int
    # who ran: (rid, tokens computed, is a decode); and who was preempted (rids)
    work: tuple = ()
    preempted_rids: tuple = ()
    prefix_hit_tokens: int = 0  # cumulative prompt tokens served from the prefix cache so far
    running: int = 0  # requests running after the step was planned

    @property
    def num_tokens(self) -> int:
        return self.shape.prefill_tokens + self.shape.decode_seqs


class Engine:
    def __init__(
        self,
        env: simpy.Environment,
        scheduler: Scheduler,
        step_model: StepTimeModel,
        max_model_len: int,
        on_done: Callable[[Request], None],
        record_steps: bool = False,
        spec_seed: int = 0,
        compress: bool = True,
    ):
        self.env = env
        self.scheduler = scheduler
        self._aborts: list[Request] = []  # requests the client gave up on, aborted before the next plan
        self.step_model = step_model
        self.max_model_len = max_model_len
        self.on_done = on_done
        self.steps: list[StepRecord] | None = [] if record_steps else None
        self.num_steps = 0
        self.num_plans = 0  # scheduler calls: fewer than steps where runs of steps are one event
        self.max_batch_tokens = 0
        self.max_batch_seqs = 0
        self._wakeup: simpy.Event | None = None
        self._after_idle = True
        self.after_step: list[Callable[[], None]] = []  # e.g. PD: retry decode-side admission
        # True when the after-step hooks have nothing to do for as long as the engine only takes
        # memory (a decode run): then they run once after the run instead of after every step
        self.hooks_idle: Callable[[], bool] = lambda: False
        # several engines share the clock: keep a marker event per step of a run (_marked_run)
        self.step_markers = False
        self._run_under_way = [0]
        cfg = scheduler.cfg
        self.spec_acceptance = list(cfg.spec_acceptance or []) if cfg.num_speculative_tokens else []
        self._spec_rng = random.Random(spec_seed)
        # Token times (sim.tokens): a decode clock ticks at every step in which requests decode,
        # a prefill clock at every step in which a prompt completes, so a request decoding
        # through many steps (around prefill-only steps, too) is one piece on the decode clock.
        # Recording uses one clock ticked by every step, whose index is then the step's.
        self.dclock = StepClock()
        self.pclock = self.dclock if record_steps else StepClock()
        # event compression (see _decode_run); recording keeps every step's plan, so it plans each
        self.compress = compress and not record_steps
        self._run_ends: Any = None  # step end times of the decode run in progress
        self._run_cut = 0  # the steps it was cut to (_cut_run), 0 if not cut
        scheduler.compress = self.compress
        scheduler.decode_clock = self.dclock
        # fixed for the run: the server's front end (its length check and latency)
        self._server = "sglang" if scheduler.name == "sglang" else "vllm"
        self._frontend_delay = getattr(step_model, "frontend_latency_s", 0.0)
        self._ingest_s = getattr(step_model, "frontend_per_request_s", 0.0)
        self._ingest_queue: list[Request] = []  # sent while the front end works on a round
        self._ingest_busy = False
        self.process = env.process(self._run())

    # --- arrivals -----------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """The client sends a request; the scheduler sees it after the front end's latency."""
        if self._ingest_s > 0:
            self._ingest_queue.append(req)
            if not self._ingest_busy:  # a round starts once every request sent at this instant is in
                self._ingest_busy = True
                self.env.timeout(0).callbacks.append(lambda _event: self._ingest_round())
            return
        self._deliver(req)

    def _ingest_round(self) -> None:
        """The front end takes the requests waiting for it as one round, which reaches the
        scheduler together once all of it is processed; requests sent meanwhile wait for the
        next round. A single event loop that runs each stage (parsing, tokenising, input
        processing) for every queued request before the next stage of the first behaves so.
        Why it is modelled: in GPUStack's 1,000-prompt bursts on vLLM 0.11 no first token
        arrives for the first 7-14 s (Qwen3, GLM; under 1.5 s for gpt-oss), then they spread
        evenly to the end, with TPOT equal to the full-budget step time. vLLM's server code shows
        no cost of that size, and none that differs by model, so `frontend_per_request_s` is a
        fitted number for the wait, not a measured CPU cost."""
        batch, self._ingest_queue = self._ingest_queue, []

        def release(_event) -> None:
            for r in batch:
                self._deliver(r)
            if self._ingest_queue:
                self._ingest_round()
            else:
                self._ingest_busy = False
        self.env.timeout(len(batch) * self._ingest_s).callbacks.append(release)

    def _deliver(self, req: Request) -> None:
        delay = self._frontend_delay
        if delay > 0:
            self.env.timeout(delay).callbacks.append(lambda _event: self._arrive(req))
        else:
            self._arrive(req)

    def abort(self, req: Request) -> None:
        """The client closed the connection: the request is aborted before the next plan (a step
        under way finishes first; a request still on its way to the scheduler is dropped there)."""
        if req.done or req.status is Status.PENDING:
            return
        self._aborts.append(req)
        self.wake()

    def _arrive(self, req: Request) -> None:
        """The OpenAI front end answers HTTP 400 at once, or hands the request to the scheduler."""
        if req.aborted:  # the client gave up while it was on its way
            req.status = Status.FAILED
            self.on_done(req)
            return
        error = front_door_error(req, self.max_model_len, self._server)
        if error:
            req.status = Status.FAILED
            req.error = error
            self.on_done(req)
            return
        sched = self.scheduler
        sched.add(req)
        if self._run_ends is None or sched.rejected or sched.arrival_may_change_plan():
            self.wake()

    def wake(self) -> None:
        """New work arrived (a request, or KV transferred in): end an idle wait, or cut a decode
        run short at the end of the step under way (the next plan may admit it)."""
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()
        elif self._run_ends is not None:
            ends, self._run_ends = self._run_ends, None
            if self.step_markers:
                self.process.interrupt()
            else:
                self._cut_run(ends)

    def _cut_run(self, ends: list[float]) -> None:
        """End the decode run in progress with the step under way (something arrived during it,
        or exactly at its end). The process waits on the run's last step end; it is moved to the
        end of the step under way instead, the way SimPy's own interrupt moves it off its target,
        without an interrupt event and exception per arrival."""
        done = bisect_left(ends, self.env.now) + 1
        self._run_cut = done
        if done < len(ends):
            proc = self.process
            proc._target.callbacks.remove(proc._resume)
            proc._target = _timeout_at(self.env, ends[done - 1])
            proc._target.callbacks.append(proc._resume)

    def settle(self) -> None:
        """Someone outside the engine is about to read or change its KV pool (the PD hand-off):
        the steps of a decode run planned by now take their blocks now, as they would have step
        by step, and the run ends with the step under way."""
        if self._run_ends is not None:
            if self.step_markers:
                under_way = self._run_under_way[0]  # its marker is queued: same-time events in SimPy's order
            else:
                under_way = bisect_left(self._run_ends, self.env.now)
            self.scheduler.settle_decode_run(under_way + 1)
            self.wake()

    def _accepted_drafts(self, k: int) -> int:
        a = 0
        while a < k and self._spec_rng.random() < self.spec_acceptance[a]:
            a += 1
        return a

    # --- the step loop --------------------------------------------------------------
    def _run(self):
        env, sched = self.env, self.scheduler
        while True:
            if self._aborts:
                for req in self._aborts:
                    if not req.done:
                        sched.abort(req)
                        self.on_done(req)
                self._aborts.clear()
            batch = sched.schedule()
            self.num_plans += 1
            rejected = bool(sched.rejected)
            for req in sched.rejected:
                # the client hears of it now, after this many steps (a rejection on arrival
                # during a step is heard when the step ends)
                req.end_step = self.num_steps
                self.on_done(req)
            sched.rejected.clear()
            if not batch.reqs and not batch.shape.num_seqs:  # (a step may carry only lingering requests)
                if batch.preempted or rejected:
                    continue  # the queues changed; the next plan may admit someone
                if sched.has_work() and not sched.running:
                    held_by_waiting = sum(r.num_blocks for r in sched.waiting)
                    if sched.kv.num_used == held_by_waiting:
                        # No KV is held by anything that will ever free it (a PD prefill job
                        # waiting for its transfer would), so the waiting head can never run.
                        head = sched.waiting[0]
                        if not held_by_waiting:
                            raise SimulationStuck(
                                f"t={env.now:.3f}s: request {head.rid} ({head.num_tokens} tokens) can never "
                                f"be scheduled: {sched.kv.num_free} of {sched.kv.num_blocks} KV blocks free, "
                                "nothing running"
                            )
                        # PD decode side: requests whose KV arrived hold the pool while a preempted
                        # request at the head waits for room. vLLM would wait forever; we fail it.
                        sched.waiting.popleft()
                        sched.reject(head, "KV deadlock on the decode instance: the head of the waiting "
                                           f"queue needs more blocks than are free ({sched.kv.num_free}) and "
                                           "the rest are held by requests queued behind it")
                        continue
                self._wakeup = env.event()
                yield self._wakeup  # idle until the next arrival
                self._wakeup = None
                self._after_idle = True
                continue

            if batch.group and batch.group == len(batch.reqs):
                # the decode group alone: one event for as many steps as cannot change
                steps = sched.steady_steps(batch)
                if self.after_step and not self.hooks_idle():
                    steps = 1  # a hook may act after this step, as it would step by step
                yield from self._decode_run(batch, steps)
                continue
            if batch.group and batch.group + 1 == len(batch.reqs) and not self.after_step and not self.step_markers:
                # the group and one prompt's chunk: a run while the chunk stays the same
                steps = sched.steady_steps(batch)
                if steps > 1:
                    yield from self._decode_run(batch, steps)
                    continue
            shape = batch.shape
            dt = self.step_model.step_time(shape)
            t0 = env.now
            yield env.timeout(dt)
            now = env.now
            self._ran(shape, 1)
            if sched.lingering:
                sched.release_lingering()
            if self.steps is not None:
                self.steps.append(StepRecord(
                    t0, dt, shape, self._after_idle, len(batch.preempted) + len(batch.aborted),
                    sched.kv.num_used, len(sched.waiting),
                    tuple(zip((r.rid for r in batch.reqs), batch.num_new, batch.decode)),
                    tuple(r.rid for r in batch.preempted + batch.aborted),
                    sched.kv.prefix.hit_tokens if sched.kv.prefix else 0, len(sched.running)))
            self._after_idle = False

            dk = pk = -1  # this step's entry on the decode / prefill clock, once someone emits
            if self.steps is not None:
                dk = pk = self.dclock.tick(now)  # one clock: its index is the step's
            finished = []
            g = batch.group
            if g:  # the decode group's tokens: one clock entry for all of them (sim.decode_group)
                dk = self.dclock.tick(now)
                finished = self._group_finished(sched.advance_decode_run(batch, 1), 1)
            cache = sched.kv.prefix
            for req, n, decode in zip(batch.reqs[g:], batch.num_new[g:], batch.decode[g:]):
                if decode and n > 1:
                    # speculative decode: drafts are accepted in order until the first rejection;
                    # the accepted ones plus one new token arrive together, as one stream chunk
                    emitted = min(1 + self._accepted_drafts(n - 1), req.max_tokens - req.output_len)
                    req.num_computed += emitted
                    if cache is not None:
                        cache.register(req)
                else:
                    req.num_computed += n
                    if cache is not None:
                        cache.register(req)  # full chunks of computed KV become reusable
                    if req.num_computed != req.num_tokens:
                        continue  # a prefill chunk: no token yet
                    emitted = 1  # all KV present: the model samples one token, streamed now
                req.output_len += emitted
                if decode:
                    if dk < 0:
                        dk = self.dclock.tick(now)
                    emit_chunk(req, self.dclock, dk, emitted)
                else:
                    if pk < 0:
                        pk = self.pclock.tick(now)
                    emit_chunk(req, self.pclock, pk, emitted)
                if req.output_len >= req.max_tokens:
                    req.status = Status.FINISHED
                    finished.append(req)
            if finished:
                sched.release_finished(finished)
                for req in finished:
                    self.on_done(req)
            for hook in self.after_step:
                hook()

    def _decode_run(self, batch, steps: int):
        """`steps` steps of a steady decode batch as one event (event compression).

        Between two changes of the batch (an arrival admitted, a prefill chunk, a completion,
        a preemption) every step decodes the same requests and differs from the one before
        only by one more context token per request, so the step times are one vectorised
        call and the end times one running sum (the same additions, in the same order, as
        step by step). The scheduler said how many steps cannot change (`steady_steps`); an
        arrival during the run ends it with the step under way, exactly where the step-by-step
        engine would first see it. `simulate(compress=False)` is the reference this is tested
        against.

        The batch may also carry one prompt chunk that takes the token budget the decodes leave
        (vLLM's chunked prefill with a small budget): it repeats too, moving on by the same
        number of tokens a step, until the prompt's last chunk (see the schedulers' `steady_steps`).
        """
        env, sched = self.env, self.scheduler
        chunked = batch.reqs[-1] if len(batch.reqs) > batch.group else None  # a prompt's chunk rides along
        if chunked is None:
            ends = decode_run_ends(self.step_model, batch.shape, steps, env.now)
        else:
            ends = chunked_run_ends(self.step_model, batch.shape, steps, env.now, batch.num_new[-1],
                                    chunked.num_computed)
        self._run_ends = ends
        if self.step_markers:
            done = yield from self._marked_run(ends)
        else:
            self._run_cut = 0
            yield _timeout_at(env, ends[-1])  # or earlier: see _cut_run
            done = self._run_cut or steps
        self._run_ends = None

        self._ran(batch.shape, done)
        self._after_idle = False
        if sched.lingering:
            sched.release_lingering()
        fewest = sched.advance_decode_run(batch, done)  # the KV the later steps allocated
        if chunked is not None:
            sched.advance_chunk(chunked, batch.num_new[-1], done)
        self.dclock.ticks(ends[:done])  # every member got one token per step (sim.decode_group)
        finished = self._group_finished(fewest, done)
        if finished:
            sched.release_finished(finished)
            for req in finished:
                self.on_done(req)
        for hook in self.after_step:  # once for the run: its steps only took memory (PD admission)
            hook()

    def _ran(self, shape: BatchShape, steps: int) -> None:
        """`steps` steps of a batch of this shape ran: the step count and the largest batch."""
        self.num_steps += steps
        ntok = shape.prefill_tokens + shape.decode_seqs
        if ntok > self.max_batch_tokens:
            self.max_batch_tokens = ntok
        if shape.num_seqs > self.max_batch_seqs:
            self.max_batch_seqs = shape.num_seqs

    def _marked_run(self, ends):
        """The run with marker events at step ends, each queued when the step-by-step engine
        would queue its step's event (at the end of the step before). With several engines an
        arrival can come at exactly the end of one of this engine's steps, from another
        engine's step ending then; SimPy serves same-time events in the order they were queued,
        and the markers keep that order: if this engine's step end came first, it planned the
        next step without the arrival. The process itself wakes once, at the last marker.

        Only steps that start after the earliest event queued elsewhere need their own marker:
        nothing else happens before that event, so the marker of the last step starting before
        it is queued now, in the same order as at its step's start, and those of the steps in
        between are never needed. Returns the number of steps run."""
        env = self.env
        n = len(ends)
        last = env.event()  # the last step's marker, which the process waits on
        under_way = self._run_under_way = [0]  # the step whose marker is queued

        def queue(k):
            queue_ = env._queue
            if queue_:  # the first step ending at or after the next event elsewhere
                k = max(k, min(n - 1, bisect_left(ends, queue_[0][0])))
            else:
                k = n - 1
            under_way[0] = k
            ev = _timeout_at(env, ends[k], last if k == n - 1 else None)
            ev.callbacks.append(on_marker)
            return ev

        def on_marker(_ev):
            if under_way[0] + 1 < n and self._run_ends is ends:
                pending[0] = queue(under_way[0] + 1)  # the next step is planned now

        pending = [None]
        try:
            pending[0] = queue(0)
            yield last
            return n
        except simpy.Interrupt:
            k = under_way[0]
            yield pending[0]  # the step under way (its marker is queued) is the run's last
            return k + 1

    def _group_finished(self, fewest: int, steps: int) -> list[Request]:
        """Decode-group members whose last token came in the steps just run: they leave the group."""
        if steps < fewest:
            return []
        finished = self.scheduler.group.pop_finished()
        for req in finished:
            req.status = Status.FINISHED
        return finished


def _timeout_at(env: simpy.Environment, t: float, ev: simpy.Event | None = None) -> simpy.Event:
    """An event (`ev`, or a new one) at exactly time `t`. A timeout lands at now + delay, and no
    delay may make that sum equal `t` (the step-by-step engine reached it by adding one step at
    a time), so the event is queued the way SimPy's `Event.succeed` queues it, with its time
    given."""
    ev = ev if ev is not None else env.event()
    ev._ok, ev._value = True, None
    heappush(env._queue, (t, NORMAL, next(env._eid), ev))
    return ev
