"""Re-time a recorded simulation with other step durations, without simulating again.

Which requests share a step depends on the engine's state (queues, KV blocks), not on how
long steps take, as long as no request's arrival falls between steps differently: that is
the case when every request is sent at t=0 (rate inf) and when requests are released by
the completion of others (max_concurrency). For those runs `replay` is exact, which makes
a fit thousands of times cheaper: the simulator runs once per training row and the
optimiser re-times the recorded steps. For timed arrivals (Poisson, traces) the engine
may batch differently under other step times, so the fit re-simulates with its current
estimate until the estimate stops moving (`calibration.fit`); every reported number comes
from a full simulation.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import numpy as np

from sim.perf_model import features
from sim.request import Status
from sim.runner import SimResult


@dataclass
class Trace:
    features: np.ndarray  # (n_steps, 6): see sim.perf_model.features
    wake_s: np.ndarray  # (n_steps,): arrival time that started the step after idling, else -inf
    recorded_dt: np.ndarray  # step durations of the recorded run
    # requests, in dispatch order
    arrival_s: np.ndarray
    permit_from: np.ndarray  # index (dispatch order) of the request whose end freed the permit, or -1
    finished: np.ndarray  # bool
    end_step: np.ndarray  # scheduler rejections: steps completed at rejection, else -1
    prompt_len: np.ndarray
    output_len: np.ndarray
    tok_step: np.ndarray  # flat: the step that emitted each token of each finished request
    tok_ptr: np.ndarray  # request i's tokens are tok_step[tok_ptr[i]:tok_ptr[i+1]]
    exact: bool  # no timed arrival after the first step: replay equals simulation
    frontend_latency_s: float = 0.0  # of the recorded run: every wake-up is an arrival this late
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
        return SimpleNamespace(
            has_tok=has_tok, all_tok=bool(np.all(has_tok)), all_fin=bool(np.all(fin)),
            first_step=self.tok_step[ptr[:-1][has_tok]], last_step=self.tok_step[ptr[1:][has_tok] - 1],
            permitted=self.permit_from >= 0, any_permit=bool(np.any(self.permit_from >= 0)),
            multi=multi, out_multi_1=out[multi] - 1,
            completed=int(fin.sum()), total_in=int(self.prompt_len[fin].sum()), total_out=int(out.sum()),
            ones_fin=np.ones(len(out), dtype=np.int64), ones_multi=np.ones(int(multi.sum()), dtype=np.int64))

    @property
    def num_steps(self) -> int:
        return len(self.recorded_dt)


def trace_from(res: SimResult) -> Trace:
    if res.steps is None:
        if res.instance_steps is not None:
            raise ValueError("replay re-times one engine's steps; this run has several instances")
        raise ValueError("simulate(..., record_steps=True) is needed to build a trace")
    steps = res.steps
    reqs = sorted(res.requests, key=lambda r: (r.arrival_s, r.rid))
    pos = {r.rid: i for i, r in enumerate(reqs)}
    lens = np.array([len(r.token_steps) if r.status is Status.FINISHED else 0 for r in reqs])
    ptr = np.concatenate([[0], np.cumsum(lens)])
    tok = np.fromiter((k for r in reqs if r.status is Status.FINISHED for k in r.token_steps), dtype=np.int64,
                      count=int(ptr[-1]))
    wake = np.array([s.t_start_s if s.after_idle else -np.inf for s in steps])
    delay = getattr(res.scenario.step_time.build(), "frontend_latency_s", 0.0)
    permit_waits = any(r.permit_from >= 0 for r in reqs)
    return Trace(
        features=features([s.shape for s in steps]),
        wake_s=wake,
        recorded_dt=np.array([s.duration_s for s in steps]),
        arrival_s=np.array([r.arrival_s for r in reqs]),
        permit_from=np.array([pos[r.permit_from] if r.permit_from >= 0 else -1 for r in reqs], dtype=np.int64),
        finished=np.array([r.status is Status.FINISHED for r in reqs]),
        end_step=np.array([r.end_step for r in reqs], dtype=np.int64),
        prompt_len=np.array([r.prompt_len for r in reqs]),
        output_len=np.array([r.output_len if r.status is Status.FINISHED else 0 for r in reqs]),
        tok_step=tok,
        tok_ptr=ptr,
        # a request released by a completion reaches the scheduler exactly at a step boundary only
        # when the front end adds no latency; otherwise which step it joins depends on timing
        exact=bool(np.all(np.isneginf(wake[1:]))) and not (delay > 0 and permit_waits),
        frontend_latency_s=delay,
    )


def step_end_times(trace: Trace, dt: np.ndarray, frontend_latency_s: float | None = None) -> np.ndarray:
    """end[k] = max(end[k-1], wake[k]) + dt[k], vectorised via a running maximum.

    Every wake-up is a request reaching the scheduler, so another front-end latency shifts
    every wake time by the difference.
    """
    shift = 0.0 if frontend_latency_s is None else frontend_latency_s - trace.frontend_latency_s
    c = np.cumsum(dt)
    before = np.concatenate([[0.0], c[:-1]])
    return c + np.maximum.accumulate(trace.wake_s + shift - before)


def replay(trace: Trace, dt: np.ndarray, percentiles=(99,), frontend_latency_s: float | None = None,
           only: Collection[str] | None = None) -> dict:
    """vLLM's benchmark metrics for the recorded schedule with step durations `dt`.

    `only`: the metric keys wanted (a fit asks for the few it compares, thousands of times);
    the others are left out, the wanted ones are the same numbers."""
    end = step_end_times(trace, dt, frontend_latency_s)
    ix = trace.index
    n = len(trace.arrival_s)
    fin = trace.finished
    if ix.all_tok:
        first, last = end[ix.first_step], end[ix.last_step]
    else:
        first = np.full(n, np.nan)
        last = np.full(n, np.nan)
        first[ix.has_tok] = end[ix.first_step]
        last[ix.has_tok] = end[ix.last_step]

    # request start: its arrival, unless it waited for a concurrency permit
    if ix.any_permit and ix.all_fin:
        # every request ends with its last token, so a start is the running maximum of the
        # arrivals and the ends that freed the permits
        finish = last
        start = np.maximum.accumulate(np.maximum(trace.arrival_s, np.where(ix.permitted, last[trace.permit_from], -np.inf)))
    elif ix.any_permit:
        start = np.empty(n)
        finish = np.empty(n)
        prev = -np.inf
        for i in range(n):
            s = max(trace.arrival_s[i], prev)
            j = trace.permit_from[i]
            if j >= 0:
                s = max(s, finish[j])
            start[i] = prev = s
            finish[i] = _request_end(trace, i, s, last[i], end)
    else:
        start = trace.arrival_s.astype(float)
        finish = np.array([_request_end(trace, i, start[i], last[i], end) for i in range(n)]) \
            if not ix.all_fin else last

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


def weighted_percentile(x: np.ndarray, counts: np.ndarray, p: float) -> float:
    """numpy's default (linear) percentile of `x` with each value repeated `counts` times."""
    order = np.argsort(x, kind="stable")
    xs, cum = x[order], np.cumsum(counts[order])
    pos = (cum[-1] - 1) * p / 100.0
    lo = int(np.floor(pos))
    i_lo = int(np.searchsorted(cum, lo + 1))
    i_hi = int(np.searchsorted(cum, min(lo + 2, cum[-1])))
    return float(xs[i_lo] + (pos - lo) * (xs[i_hi] - xs[i_lo]))


def _request_end(trace: Trace, i: int, start: float, last_token: float, end: np.ndarray) -> float:
    if trace.finished[i]:
        return last_token
    k = trace.end_step[i]
    return max(start, end[k - 1]) if k > 0 else start
