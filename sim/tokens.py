"""Where token times live: one step clock per engine, a few pieces per request.

A token is streamed at the end of an engine step, so its time is the end time of that
step. Each engine keeps a `StepClock` (the end time of every step it ran, 8 bytes a step);
a request keeps `pieces`: runs of consecutive steps of one clock in which it emitted the
same number of tokens per step. A request decoding through a thousand steps holds one
piece, not a thousand floats, and a compressed run of steps (see `sim.engine`) extends
every piece in it at once (sim.engine).

When a request ends, the client folds its pieces into `TokenStats`, which keeps the
client's aggregates exactly, in memory that grows with steps, not tokens:
- inter-token gaps as weights on the clock (the gap between steps k-1 and k, counted once
  per finished request that emitted in both) plus the gaps between a request's pieces;
- tokens per step, for the peak output rate;
and then drops the pieces unless per-token times were asked for (timelines, detailed
results, tests).
"""

from __future__ import annotations

from array import array

import numpy as np


class StepClock:
    """End times of an engine's steps, in order; step k ended at `ends[k]`."""

    __slots__ = ("ends",)

    def __init__(self) -> None:
        self.ends = array("d")

    def __len__(self) -> int:
        return len(self.ends)

    def tick(self, t: float) -> int:
        """A step ended at `t`; returns its index."""
        self.ends.append(t)
        return len(self.ends) - 1

    def ticks(self, times: list[float]) -> int:
        """Several steps ended at `times`; returns the index of the first."""
        k = len(self.ends)
        self.ends.extend(times)
        return k


def emit_chunk(req, clock: StepClock, k: int, n: int = 1) -> None:
    """`req` received `n` tokens at the end of step `k` of `clock` (one stream chunk)."""
    t = clock.ends[k]
    if req.first_token_s != req.first_token_s:  # NaN: these are its first tokens
        req.first_token_s = t
    req.last_token_s = t
    pieces = req.pieces
    if pieces:
        p = pieces[-1]
        if p[0] is clock and p[2] == k and p[3] == n:
            p[2] = k + 1
            return
        pieces.append([clock, k, k + 1, n])
    else:
        req.pieces = [[clock, k, k + 1, n]]


def token_times(req) -> list[float]:
    """Every token's arrival time (a token of a multi-token chunk repeats its chunk's time)."""
    out: list[float] = []
    for clock, a, b, n in req.pieces or ():
        ends = clock.ends[a:b]
        out.extend(ends if n == 1 else [t for t in ends for _ in range(n)])
    return out


def token_steps(req) -> list[int]:
    """The clock step that emitted each token (single-engine runs: the engine step index)."""
    out: list[int] = []
    for _clock, a, b, n in req.pieces or ():
        out.extend(range(a, b) if n == 1 else [k for k in range(a, b) for _ in range(n)])
    return out


def _lerp_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """np.percentile(np.repeat(values, weights), q) (linear method) without repeating:
    `values` sorted ascending, `weights` positive integers."""
    cum = np.cumsum(weights)
    h = (cum[-1] - 1) * (q / 100.0)
    lo = int(np.floor(h))
    frac = h - lo
    a = values[np.searchsorted(cum, lo, side="right")]
    b = values[np.searchsorted(cum, min(lo + 1, cum[-1] - 1), side="right")]
    # numpy's _lerp, including its form for frac >= 0.5
    d = b - a
    return float(b - d * (1 - frac)) if frac >= 0.5 else float(a + d * frac)


class TokenStats:
    """The client's token aggregates over finished requests (see the module docstring)."""

    def __init__(self) -> None:
        # per clock: (clock, tokens per step, gaps ending at each step), as difference arrays:
        # +w where a request's run of steps starts, -w one past its end
        self.tallies: dict[int, tuple[StepClock, array, array]] = {}
        self.piece_gaps = array("d")  # gaps between consecutive pieces of one request

    @classmethod
    def from_requests(cls, requests) -> TokenStats:
        stats = cls()
        for r in requests:
            stats.add(r)
        return stats

    def add(self, req) -> None:
        """Fold a finished request's pieces in (other requests are not counted, as in vLLM's client)."""
        if req.status != "finished" or not req.pieces:  # a str enum: compares as its value
            return
        prev_t = None
        tallies = self.tallies
        for clock, a, b, n in req.pieces:
            t = tallies.get(id(clock))
            if t is None:
                t = tallies[id(clock)] = (clock, array("q"), array("q"))
            emit_diff, gap_diff = t[1], t[2]
            if len(emit_diff) <= b:  # grown to the clock's length and an eighth more, not per request
                size = max(b + 1, len(clock.ends) + 1)
                grow = bytes(8 * (size + (size >> 3) - len(emit_diff)))
                emit_diff.frombytes(grow)
                gap_diff.frombytes(grow)
            emit_diff[a] += n
            emit_diff[b] -= n
            if b - a > 1:
                gap_diff[a + 1] += 1
                gap_diff[b] -= 1
            if prev_t is not None:
                self.piece_gaps.append(clock.ends[a] - prev_t)
            prev_t = clock.ends[b - 1]

    @staticmethod
    def _per_step(diff: array, n: int) -> np.ndarray:
        d = np.zeros(n, dtype=np.int64)
        m = min(n, len(diff))
        d[:m] = np.frombuffer(diff, dtype=np.int64)[:m]
        return np.cumsum(d)

    # --- what the report needs ----------------------------------------------------------
    def itl_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct inter-token gaps (s, ascending) and how often each occurred: the client's
        pooled ITL list, one gap per stream chunk (chunks in one step make no gap)."""
        vals, wts = [np.frombuffer(self.piece_gaps, dtype=np.float64)], [np.ones(len(self.piece_gaps), np.int64)]
        for clock, _emit, gap_diff in self.tallies.values():
            n = len(clock.ends)
            if n < 2:
                continue
            w = self._per_step(gap_diff, n)[1:]
            ends = np.frombuffer(clock.ends, dtype=np.float64)
            keep = w > 0
            vals.append(np.diff(ends)[keep])
            wts.append(w[keep])
        v, w = np.concatenate(vals), np.concatenate(wts)
        pos = v > 0
        v, w = v[pos], w[pos]
        order = np.argsort(v, kind="stable")
        return v[order], w[order]

    def itl_summary_ms(self, percentiles) -> dict:
        """count, mean, median, std, max and the asked percentiles of the pooled ITLs, in ms."""
        v, w = self.itl_values()
        if len(v) == 0:
            return {"count": 0}
        v = v * 1000
        n = int(w.sum())
        mean = float(np.dot(v, w) / n)
        out = {"count": n, "mean": mean, "std": float(np.sqrt(np.dot((v - mean) ** 2, w) / n)),
               "median": _lerp_percentile(v, w, 50), "max": float(v[-1])}
        for p in percentiles:
            out[p] = _lerp_percentile(v, w, p)
        return out

    def peak_tokens_per_bucket(self, t0: float, width: float = 1.0) -> float:
        """The most tokens of finished requests in one `width`-second bucket from `t0`, counting only
        the buckets tokens arrived in (however long the run)."""
        idx: list[np.ndarray] = []
        wts: list[np.ndarray] = []
        for clock, emit_diff, _gap in self.tallies.values():
            k = len(clock.ends)
            if not k:
                continue
            per_step = self._per_step(emit_diff, k)
            ends = np.frombuffer(clock.ends, dtype=np.float64)
            sel = per_step > 0
            idx.append(((ends[sel] - t0) / width).astype(np.int64))
            wts.append(per_step[sel])
        if not idx:
            return 0.0
        _, inv = np.unique(np.concatenate(idx), return_inverse=True)
        return float(np.bincount(inv, weights=np.concatenate(wts)).max())
