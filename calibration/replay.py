"""Re-time a recorded simulation with other step durations, without simulating again.

A recorded run fixes the schedule: which requests every step carries. Replaying it with other
step durations keeps that schedule and re-times it, with one rule that makes the timing
feasible: a step cannot start before every request it schedules for the first time has
reached the scheduler (its start, after any concurrency permit or think time, plus the front
end's latency). Starts depend on earlier ends (a freed permit, the previous turn of a
conversation), so the replay walks the steps in order where such a dependency can bind.

When is the replay the same as simulating again? When the schedule cannot depend on timing:
every request is sent at one instant before the first step (rate inf), and the ones released
by a completion (a concurrency permit, a next turn without think time) reach the scheduler
exactly at a step boundary, which needs a zero front-end latency. `Trace.exact` says so; a fit
then needs one simulation per training row. For timed arrivals (Poisson, constant rate,
traces) which step a request joins depends on the step times, so the fit re-simulates at its
current estimate until the estimate stops improving (`calibration.fit`), and every loss it
reports is a full simulation's.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import numpy as np

from sim.perf_model import features
from sim.step_time import EngineFacts
from sim.request import Status
from sim.runner import SimResult


@dataclass
class Trace:
    features: np.ndarray  # (n_steps, 6): see sim.perf_model.features
    recorded_dt: np.ndarray  # step durations of the recorded run
    recorded_start: np.ndarray  # step start times of the recorded run
    # requests: the client's dispatch order (first turns by schedule), then later turns by id
    arrival_s: np.ndarray  # when the client's schedule sends it (later turns: as recorded)
    permit_from: np.ndarray  # index of the request whose end freed this one's permit, or -1
    follows: np.ndarray  # index of the previous turn of its conversation, or -1
    first_step: np.ndarray  # the step that scheduled it first, or -1 (never scheduled)
    finished: np.ndarray  # bool
    end_step: np.ndarray  # scheduler rejections: steps completed at rejection, else -1
    prompt_len: np.ndarray
    output_len: np.ndarray
    tok_step: np.ndarray  # flat: the step that emitted each token of each finished request
    tok_ptr: np.ndarray  # request i's tokens are tok_step[tok_ptr[i]:tok_ptr[i+1]]
    exact: bool  # the schedule cannot depend on step times: replay equals simulation
    facts: EngineFacts = EngineFacts()  # the engine's CUDA graphs and CPU/GPU overlap
    frontend_latency_s: float = 0.0  # of the recorded run (with its burst's front-end round: see delay)
    # requests the client sends at its first instant without waiting for a permit: the API
    # server's first round, which reaches the scheduler after burst x frontend_per_request_s
    burst: int = 1
    think_time_s: float = 0.0  # between a reply and the next turn
    # per request, where a turn says its own: its think time (NaN: think_time_s) and the time it
    # is not sent before (a recorded turn's timestamp, an inference-perf user's slot)
    think_s: np.ndarray | None = None
    not_before_s: np.ndarray | None = None
    timed_out: np.ndarray | None = None  # requests the client gave up on (request timeout), if any
    timeout_s: float = 0.0
    # steps after an idle period that no first-scheduled request explains: their recorded start
    fixed_start: np.ndarray | None = None  # (n_steps,), -inf where none
    # Inter-token gaps as (step before, step after, how many tokens): most gaps are shared by
    # every request decoding in the same two steps, so this is a few thousand rows instead of
    # one per token, and the ITL statistics are computed on it with counts as weights.
    gap_from: np.ndarray | None = None
    gap_to: np.ndarray | None = None
    gap_count: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.gap_from is None:
            ptr, tok = self.tok_ptr, self.tok_step
            inside = np.ones(len(tok), dtype=bool)
            inside[ptr[:-1][ptr[1:] > ptr[:-1]]] = False  # a request's first token opens no gap
            pairs = np.stack([tok[:-1], tok[1:]], axis=1)[inside[1:]] if len(tok) > 1 else np.empty((0, 2), int)
            pairs = pairs[pairs[:, 0] != pairs[:, 1]]  # tokens of one step arrive as one chunk
            uniq, counts = np.unique(pairs, axis=0, return_counts=True)
            self.gap_from, self.gap_to, self.gap_count = uniq[:, 0], uniq[:, 1], counts

    @cached_property
    def index(self) -> SimpleNamespace:
        """What `replay` needs of the requests that no step time changes, worked out once."""
        ptr, fin, out = self.tok_ptr, self.finished, self.output_len[self.finished]
        has_tok = ptr[1:] > ptr[:-1]  # finished requests
        multi = out > 1
        dispatched = self.follows < 0  # sent on the client's schedule (maybe after a permit)
        timed = dispatched & (self.first_step >= 0)
        # Timed arrivals on their own (no permit, no conversation): re-timed request by request
        # (see `_local`). The step under way when each reached the scheduler, and how much of it
        # was left; -1 where the engine was idle and woke for it.
        local = not (np.any(self.permit_from >= 0) or np.any(self.follows >= 0)) and len(self.recorded_dt) > 0 \
            and float(np.ptp(self.arrival_s)) > 0
        k_in = frac = None
        if local:
            a = self.arrival_s + self.frontend_latency_s
            k_in = np.searchsorted(self.recorded_start, a, side="right") - 1
            end_rec = self.recorded_start + self.recorded_dt
            busy = (k_in >= 0) & (a < end_rec[np.maximum(k_in, 0)]) & ((self.first_step > k_in) | (self.first_step < 0))
            frac = np.where(busy, (end_rec[np.maximum(k_in, 0)] - a) / self.recorded_dt[np.maximum(k_in, 0)], 0.0)
            k_in = np.where(busy, k_in, -1)
        return SimpleNamespace(
            local=local, k_in=k_in, frac=frac,
            has_tok=has_tok, all_tok=bool(np.all(has_tok)), all_fin=bool(np.all(fin)),
            first_step=self.tok_step[ptr[:-1][has_tok]], last_step=self.tok_step[ptr[1:][has_tok] - 1],
            permitted=self.permit_from >= 0, any_permit=bool(np.any(self.permit_from >= 0)),
            any_follow=bool(np.any(self.follows >= 0)),
            scheduled_arrival=self.arrival_s[dispatched], timed_first=self.first_step[timed],
            timed_arrival=self.arrival_s[timed],
            multi=multi, out_multi_1=out[multi] - 1,
            completed=int(fin.sum()), total_in=int(self.prompt_len[fin].sum()), total_out=int(out.sum()),
            ones_fin=np.ones(len(out), dtype=np.int64), ones_multi=np.ones(int(multi.sum()), dtype=np.int64))

    def delay(self, frontend_latency_s: float, frontend_per_request_s: float = 0.0) -> float:
        """From a request of the first instant being sent to the scheduler seeing it: the front
        end's latency after its round (sim.engine.Engine.submit). Exact for requests sent at one
        instant (the only replays called exact); for later ones a round is taken as one request."""
        return front_end_delay(frontend_latency_s, frontend_per_request_s, self.burst)

    @property
    def num_steps(self) -> int:
        return len(self.recorded_dt)

    def exact_at(self, frontend_latency_s: float) -> bool:
        """Whether replaying with this front-end latency equals simulating again: every request
        on the client's schedule is sent at one instant, and the ones released by another's end
        reached the scheduler exactly at the step boundary of their release, in the recorded run
        and in the replayed one; and no client deadline could cut a request short."""
        sent = self.index.scheduled_arrival
        one_instant = len(sent) == 0 or float(np.ptp(sent)) == 0.0
        return (one_instant and self.fixed_start is None and not self.dependencies_bind(self.frontend_latency_s)
                and not self.dependencies_bind(frontend_latency_s) and not self.timeout_s)

    def dependencies_bind(self, frontend_latency_s: float | None = None) -> bool:
        """Whether a request released by another's end can reach the scheduler after the next
        step has started (so the replay must walk the steps in order): yes with a front-end
        latency, or a think time before the next turn."""
        lat = self.frontend_latency_s if frontend_latency_s is None else frontend_latency_s
        ix = self.index
        return bool((ix.any_permit or ix.any_follow) and (lat > 0 or (ix.any_follow and self._turns_wait())))

    def _turns_wait(self) -> bool:
        """Whether a later turn can be sent after its predecessor's end (not at that instant)."""
        follow = self.follows >= 0
        think = np.full(len(self.follows), self.think_time_s) if self.think_s is None else \
            np.where(np.isnan(self.think_s), self.think_time_s, self.think_s)
        late = np.zeros(len(self.follows), dtype=bool) if self.not_before_s is None else self.not_before_s > 0
        return bool(np.any(follow & ((think > 0) | late)))

    def turn_wait(self, i: int) -> tuple[float, float]:
        """Request i's think time after its predecessor's end and the time it is not sent before."""
        think = self.think_time_s if self.think_s is None or np.isnan(self.think_s[i]) else float(self.think_s[i])
        return think, (0.0 if self.not_before_s is None else float(self.not_before_s[i]))


def front_end_delay(frontend_latency_s: float, frontend_per_request_s: float, burst: int) -> float:
    """From a request of a burst being sent to the scheduler seeing it (sim.engine.Engine.submit)."""
    return frontend_latency_s + frontend_per_request_s * burst


def trace_from(res: SimResult) -> Trace:
    if res.steps is None:
        if res.instance_steps is not None:
            raise ValueError("replay re-times one engine's steps; this run has several instances")
        raise ValueError("simulate(..., record_steps=True) is needed to build a trace")
    steps = res.steps
    first_turns = sorted((r for r in res.requests if r.follows < 0), key=lambda r: (r.arrival_s, r.rid))
    reqs = first_turns + sorted((r for r in res.requests if r.follows >= 0), key=lambda r: r.rid)
    pos = {r.rid: i for i, r in enumerate(reqs)}
    first: dict[int, int] = {}
    for k, s in enumerate(steps):
        for rid, _n, _decode in s.work:
            first.setdefault(rid, k)
    lens = np.array([len(r.token_steps) if r.status is Status.FINISHED else 0 for r in reqs])
    ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tok = np.fromiter((k for r in reqs if r.status is Status.FINISHED for k in r.token_steps), dtype=np.int64,
                      count=int(ptr[-1]))
    sc = res.scenario
    model = sc.step_time.build()
    sent = [r.arrival_s for r in first_turns if r.permit_from < 0]
    burst = sum(1 for a in sent if a == sent[0]) if sent else 1
    delay = front_end_delay(getattr(model, "frontend_latency_s", 0.0),
                            getattr(model, "frontend_per_request_s", 0.0), burst)
    first_step = np.array([first.get(r.rid, -1) for r in reqs], dtype=np.int64)
    # an idle engine wakes for an arrival, which its next step schedules; a wake-up nothing
    # scheduled for the first time explains keeps its recorded start
    starts_new = np.zeros(len(steps), dtype=bool)
    starts_new[first_step[first_step >= 0]] = True
    fixed = np.array([s.t_start_s if s.after_idle and not starts_new[k] else -np.inf for k, s in enumerate(steps)])
    tr = Trace(
        features=features([s.shape for s in steps]),
        recorded_dt=np.array([s.duration_s for s in steps]),
        recorded_start=np.array([s.t_start_s for s in steps]),
        arrival_s=np.array([r.arrival_s for r in reqs]),
        permit_from=np.array([pos[r.permit_from] if r.permit_from >= 0 else -1 for r in reqs], dtype=np.int64),
        follows=np.array([pos[r.follows] if r.follows >= 0 else -1 for r in reqs], dtype=np.int64),
        first_step=first_step,
        finished=np.array([r.status is Status.FINISHED for r in reqs]),
        end_step=np.array([r.end_step for r in reqs], dtype=np.int64),
        prompt_len=np.array([r.prompt_len for r in reqs]),
        output_len=np.array([r.output_len if r.status is Status.FINISHED else 0 for r in reqs]),
        tok_step=tok,
        tok_ptr=ptr,
        exact=False,
        facts=sc.engine.step_facts(),
        frontend_latency_s=delay,
        burst=burst,
        think_time_s=sc.workload.think_time_s,
        think_s=np.array([r.think_s for r in reqs]) if any(r.think_s == r.think_s for r in reqs) else None,
        not_before_s=np.array([r.not_before_s for r in reqs]) if any(r.not_before_s for r in reqs) else None,
        fixed_start=fixed if np.isfinite(fixed).any() else None,
        timed_out=np.array([r.aborted for r in reqs]) if any(r.aborted for r in reqs) else None,
        timeout_s=sc.workload.request_timeout_s or 0.0,
    )
    tr.exact = tr.exact_at(delay)
    return tr


def durations(trace: Trace, model, coeffs=None) -> np.ndarray:
    """The recorded steps' durations under a step-time model, on the trace's engine (its graphs
    and overlap; a model without engine facts is used as it is)."""
    with_facts = getattr(model, "with_facts", None)
    if with_facts is not None:
        return with_facts(trace.facts).step_times(trace.features, coeffs)
    return model.step_times(trace.features)


def step_end_times(trace: Trace, dt: np.ndarray, frontend_latency_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every step's end and every request's start under step durations `dt`.

    end[k] = max(end[k-1], ready[k]) + dt[k], where ready[k] is the latest arrival at the
    scheduler among the requests step k schedules first. Written as end = cumsum(dt) + M with
    M the running maximum of ready[k] - cumsum(dt)[k-1], it is vectorised whenever the arrivals
    do not depend on ends; otherwise M is built walking the steps that schedule someone new."""
    lat = trace.frontend_latency_s if frontend_latency_s is None else frontend_latency_s
    c = np.cumsum(dt)
    before = np.concatenate([[0.0], c[:-1]])
    ix = trace.index
    if not (trace.dependencies_bind(lat) or ix.any_follow):
        ready = np.full(len(dt), -np.inf)
        # a permit freed at a step's end (no latency) cannot hold back a later step: only the
        # client's schedule can
        np.maximum.at(ready, ix.timed_first, ix.timed_arrival + lat)
        if trace.fixed_start is not None:
            ready = np.maximum(ready, trace.fixed_start)
        end = c + np.maximum.accumulate(ready - before)
        return end, _starts(trace, end, ix, lat)
    return _walk(trace, c, before, lat)


def _starts(trace: Trace, end: np.ndarray, ix, lat: float) -> np.ndarray:
    """Request starts once every step end is known (no start depends on a later step)."""
    n = len(trace.arrival_s)
    if not ix.any_permit:
        return trace.arrival_s.astype(float)
    if ix.all_fin:
        # every request ends with its last token, so a start is the running maximum of the
        # arrivals and the ends that freed the permits
        last = end[ix.last_step]
        return np.maximum.accumulate(np.maximum(trace.arrival_s, np.where(ix.permitted, last[trace.permit_from], -np.inf)))
    start, finish = np.empty(n), np.empty(n)
    last = np.full(n, np.nan)
    last[ix.has_tok] = end[ix.last_step]
    prev = -np.inf
    for i in range(n):  # dispatch order: the request that freed a permit came before
        s = max(trace.arrival_s[i], prev)
        j = trace.permit_from[i]
        if j >= 0:
            s = max(s, finish[j])
        start[i] = prev = s
        finish[i] = _request_end(trace, i, s, last[i], end, lat)
    return start


def _walk(trace: Trace, c: np.ndarray, before: np.ndarray, lat: float) -> tuple[np.ndarray, np.ndarray]:
    """The steps in order, where an arrival depends on an earlier end (a permit freed, a reply
    followed by the next turn). Only the steps that schedule someone new are visited."""
    ix = trace.index
    n = len(trace.arrival_s)
    start = np.full(n, np.nan)
    done = np.zeros(n, dtype=bool)
    ev_step: list[int] = []  # steps whose M was raised, in order, with the M from there on
    ev_m: list[float] = []
    fin_step = np.full(n, -1, dtype=np.int64)
    fin_step[ix.has_tok] = ix.last_step

    def end_of(k: int) -> float:
        return c[k] + ev_m[bisect.bisect_right(ev_step, k) - 1]

    def finish(j: int) -> float:
        if trace.finished[j]:
            return end_of(int(fin_step[j]))
        if trace.timed_out is not None and trace.timed_out[j]:
            return start_of(j) + trace.timeout_s
        k = trace.end_step[j]
        return max(start_of(j) + lat, end_of(k - 1)) if k > 0 else start_of(j) + lat

    disp = iter(np.flatnonzero(trace.follows < 0).tolist())
    prev = [-np.inf]

    def start_of(i: int) -> float:
        if done[i]:
            return start[i]
        if trace.follows[i] >= 0:
            think, not_before = trace.turn_wait(i)
            s = max(finish(int(trace.follows[i])) + think, not_before)
            if trace.permit_from[i] >= 0:
                s = max(s, finish(int(trace.permit_from[i])))
            start[i], done[i] = s, True
            return s
        for d in disp:  # the dispatch loop, in order, up to and including i
            s = max(trace.arrival_s[d], prev[0])
            if trace.permit_from[d] >= 0:
                s = max(s, finish(int(trace.permit_from[d])))
            start[d], done[d], prev[0] = s, True, s
            if d == i:
                break
        return start[i]

    order = np.argsort(trace.first_step, kind="stable")
    order = order[trace.first_step[order] >= 0]
    fixed = trace.fixed_start
    steps_new = trace.first_step[order]
    fixed_steps = [] if fixed is None else np.flatnonzero(np.isfinite(fixed)).tolist()
    m, i = -np.inf, 0
    for k in sorted(set(steps_new.tolist()) | set(fixed_steps)):
        ready = fixed[k] if fixed is not None else -np.inf
        while i < len(order) and steps_new[i] == k:
            ready = max(ready, start_of(int(order[i])) + lat)
            i += 1
        if ready - before[k] > m:
            m = ready - before[k]
            ev_step.append(k)
            ev_m.append(m)
    mm = np.full(len(c), -np.inf)
    mm[ev_step] = ev_m
    end = c + np.maximum.accumulate(mm)
    for j in range(n):  # requests never scheduled, and ones nobody waited for
        start_of(j)
    return end, start


def replay(trace: Trace, dt: np.ndarray, percentiles=(99,), frontend_latency_s: float | None = None,
           only: Collection[str] | None = None) -> dict:
    """vLLM's benchmark metrics for the recorded schedule with step durations `dt`.

    `only`: the metric keys wanted (a fit asks for the few it compares, thousands of times);
    the others are left out, the wanted ones are the same numbers."""
    lat = trace.frontend_latency_s if frontend_latency_s is None else frontend_latency_s
    ix = trace.index
    n = len(trace.arrival_s)
    fin = trace.finished
    if ix.local:
        end, start, first, last, finish = _local(trace, dt, lat)
    else:
        end, start = step_end_times(trace, dt, lat)
    if ix.local:
        pass
    elif ix.all_tok:
        first, last = end[ix.first_step], end[ix.last_step]
    else:
        first = np.full(n, np.nan)
        last = np.full(n, np.nan)
        first[ix.has_tok] = end[ix.first_step]
        last[ix.has_tok] = end[ix.last_step]
    if ix.local:
        pass
    elif ix.all_fin:
        finish = last
    else:
        finish = np.array([_request_end(trace, i, start[i], last[i], end, lat) for i in range(n)])

    ttft, e2el = first - start, last - start
    if not ix.all_fin:
        ttft, e2el = ttft[fin], e2el[fin]
    multi = ix.multi
    tpot = (e2el[multi] - ttft[multi]) / ix.out_multi_1

    duration = float(np.max(finish)) if n else 0.0
    total_out = ix.total_out
    m = {
        "duration": duration,
        "completed": ix.completed,
        "total_input_tokens": ix.total_in,
        "total_output_tokens": total_out,
        "request_throughput": fin.sum() / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
    }
    for name, x, w in (("ttft", ttft, ix.ones_fin), ("tpot", tpot, ix.ones_multi), ("itl", None, trace.gap_count),
                       ("e2el", e2el, ix.ones_fin)):
        keys = {f"mean_{name}_ms": None, f"median_{name}_ms": 50, **{f"p{p}_{name}_ms": p for p in percentiles}}
        if only is not None:
            keys = {k: p for k, p in keys.items() if k in only}
            if not keys:
                continue
        if x is None:
            x = end[trace.gap_to] - end[trace.gap_from]  # inter-token gaps
        x = x * 1000
        has = len(x) > 0
        for k, p in keys.items():
            if not has:
                m[k] = 0.0
            elif p is None:
                m[k] = float(np.dot(x, w) / w.sum())
            else:
                m[k] = weighted_percentile(x, w, p)
    return m


def _local(trace: Trace, dt: np.ndarray, lat: float):
    """Timed arrivals re-timed request by request, without drift.

    Keeping every arrival in the step it joined and running the steps back to back (as
    `step_end_times` does) drifts: with steps 1 % slower, the 500th arrival of a busy period
    joins its step 1 % of the period late, and every TTFT after it grows with the period. A real
    engine re-batches instead. Here each request lives through its own recorded steps: it reaches
    the scheduler, waits out the rest of the step under way (the same fraction of it as
    recorded) and the steps before its first one, then its steps to the first and last token
    take their new durations. At the recorded durations this is the recorded run; elsewhere the
    batches are as recorded, which a fit corrects by simulating again. Step ends (for the gaps
    between tokens) are the cumulative durations: only differences of them are used."""
    ix = trace.index
    n = len(trace.arrival_s)
    cp = np.concatenate([[0.0], np.cumsum(dt)])  # cp[k]: the durations of steps before k
    # Each request's clock starts when it reaches the scheduler: the rest of the step under way
    # (the recorded fraction of it), then whole steps from `base` on; or, if the engine was idle,
    # its first step starts then. rel(k): the end of step k on that clock.
    busy = ix.k_in >= 0
    k = np.maximum(ix.k_in, 0)
    base = np.where(busy, ix.k_in + 1, np.maximum(trace.first_step, 0))
    offset = np.where(busy, ix.frac * dt[k], 0.0)

    def rel(steps, i=slice(None)):
        return offset[i] + cp[steps + 1] - cp[base[i]]

    start = trace.arrival_s.astype(float)
    first = np.full(n, np.nan)
    last = np.full(n, np.nan)
    tok = ix.has_tok
    first[tok] = start[tok] + lat + rel(ix.first_step, tok)
    last[tok] = start[tok] + lat + rel(ix.last_step, tok)
    # a failed request: refused by the front end as it arrived, or by the scheduler, heard at
    # the end of step end_step - 1 (when that is after it arrived)
    e = trace.end_step - 1
    heard_later = ~trace.finished & (e >= base) & (busy | (trace.first_step >= 0))
    finish = np.where(trace.finished, last, start + lat + np.where(heard_later, rel(np.maximum(e, 0)), 0.0))
    if trace.timed_out is not None:
        finish = np.where(trace.timed_out, start + trace.timeout_s, finish)
    return cp[1:], start, first, last, finish


def weighted_percentile(x: np.ndarray, counts: np.ndarray, p: float) -> float:
    """numpy's default (linear) percentile of `x` with each value repeated `counts` times."""
    order = np.argsort(x, kind="stable")
    xs, cum = x[order], np.cumsum(counts[order])
    pos = (cum[-1] - 1) * p / 100.0
    lo = int(np.floor(pos))
    i_lo = int(np.searchsorted(cum, lo + 1))
    i_hi = int(np.searchsorted(cum, min(lo + 2, cum[-1])))
    return float(xs[i_lo] + (pos - lo) * (xs[i_hi] - xs[i_lo]))


def _request_end(trace: Trace, i: int, start: float, last_token: float, end: np.ndarray, lat: float) -> float:
    """A finished request ends with its last token; a failed one when it was refused: by the
    front end as it arrives, or by the scheduler when it planned after `end_step` steps."""
    if trace.finished[i]:
        return last_token
    if trace.timed_out is not None and trace.timed_out[i]:
        return start + trace.timeout_s
    k = trace.end_step[i]
    return max(start + lat, end[k - 1]) if k > 0 else start + lat
