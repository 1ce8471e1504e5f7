"""Fit the roofline step-time model (and unknown capacities) to measured benchmark rows.

    fitter = StepTimeFit(model="qwen2.5-72b-instruct-gptq-int4", hardware=["a100-80g", "h100-80g"])
    fitter.fit(train_cases)          # replays where they equal simulating again, else simulations
    table = fitter.predict(cases)    # full simulations with the fitted coefficients

The loss is the mean squared log ratio of predicted to measured metric, over the metrics
each row has; the coefficients are efficiencies with physical bounds (sim.perf_model).
The loss has several basins whose held-out predictions differ by up to 2x (seed002-sglang's
TPOT at c >= 256), so the optimiser starts from the default coefficients and 16 Sobol points,
takes each a few steps, and polishes the three best: the same basin on any machine, where four
random starts found a different one when the last bits of a measured number changed.
`compare_coefficients` says how far another coefficient set is in the directions the training
rows pin down (the fit's Jacobian), the only directions in which two fits can be compared.
Hardware named as a list is a discrete unknown: every candidate is fitted and the lowest
training loss wins. An unknown KV capacity is searched over a log-spaced grid within its
bounds. Workload seeds are averaged, never chosen.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from threadpoolctl import threadpool_limits

from sim.config import EngineConfig, ScenarioError, WorkloadConfig, resolve_engine_defaults, scenario_from_dict
from sim.perf_model import PLAUSIBLE, RooflineCoefficients, RooflineStepTime, load_hardware_spec, load_model_spec
from sim.profile import Profile
from sim.runner import simulate
from sim.workload import build_requests

from .replay import Trace, replay, trace_from

DEFAULT_METRICS = ("mean_ttft_ms", "mean_tpot_ms", "median_itl_ms", "output_throughput")
# what `servesim calibrate` fits when not told (--metrics): those of these its rows have
CALIBRATE_METRICS = ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "median_itl_ms", "mean_e2e_ms",
                     "p99_e2e_ms", "output_throughput")
# measured column -> simulated metric key
SIM_KEY = {
    "mean_ttft_ms": "mean_ttft_ms", "median_ttft_ms": "median_ttft_ms", "p99_ttft_ms": "p99_ttft_ms",
    "mean_tpot_ms": "mean_tpot_ms", "median_tpot_ms": "median_tpot_ms", "p99_tpot_ms": "p99_tpot_ms",
    "mean_itl_ms": "mean_itl_ms", "median_itl_ms": "median_itl_ms", "p99_itl_ms": "p99_itl_ms",
    "mean_e2e_ms": "mean_e2el_ms", "median_e2e_ms": "median_e2el_ms", "p99_e2e_ms": "p99_e2el_ms",
    "output_throughput": "output_throughput", "request_throughput": "request_throughput",
    "duration_s": "duration", "successful_requests": "completed",
}


@dataclass
class RowCase:
    """One measured run: its id, the measured metrics, and the scenario that reproduces it."""

    row_id: str
    measured: dict[str, float]
    scenario: dict  # raw scenario data; its step_time table is replaced while fitting
    # A row of another model or TP than the fit's (its step time keys): predicted across a
    # transfer, or one of the rows of a fit across the models run on one GPU (`StepTimeFit` with
    # rows of several models: one efficiency set for the GPU). Another GPU is never fitted.
    step: dict = field(default_factory=dict)
    # its own engine's KV pool rather than the one the fit searches for (never a training row)
    kv_tokens: int | None = None


def _with(case: RowCase, step_time: dict, kv_tokens: int | None, seed: int) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in case.scenario.items()}
    data["step_time"] = {**step_time, **case.step}
    data.setdefault("workload", {})["seed"] = seed
    kv = case.kv_tokens if case.kv_tokens is not None else kv_tokens
    if kv is not None:
        data["engine"].pop("num_gpu_blocks_override", None)
        data["engine"]["kv_cache_tokens"] = int(kv)
    return data


def _simulate_run(data: dict) -> tuple[Trace, dict]:
    """A recorded simulation: its trace (to re-time) and its metrics (its true loss)."""
    res = simulate(scenario_from_dict(data), record_steps=True)
    return trace_from(res), res.bench.metrics


def _eager(data: dict) -> bool:
    """Whether a row's engine (or a PD role's) runs without CUDA graphs."""
    engines = [data.get("engine", {})] + [data.get(r, {}).get("engine", {}) for r in ("prefill", "decode")]
    return any(e.get("enforce_eager") or e.get("disable_cuda_graph") for e in engines)


def _overlaps(data: dict) -> bool:
    """Whether a row's engine (or a PD role's) plans a step while the GPU runs the one before."""
    base = data.get("engine", {})
    engines = [base] + [{**base, **data[r].get("engine", {})} for r in ("prefill", "decode") if r in data]
    out = False
    for e in engines:
        if "num_gpu_blocks_override" not in e and "kv_cache_tokens" not in e and "max_total_tokens" not in e:
            e = {**e, "kv_cache_tokens": 1 << 20}  # a capacity being fitted: it does not decide the overlap
        try:
            out |= resolve_engine_defaults(EngineConfig.model_validate(e)).step_facts().overlap
        except (ValueError, ScenarioError):
            pass  # an engine table the simulation will refuse, naming the field, when the row is run
    return out


# A row whose prefills spend at least this share of their FLOPs in attention (QK^T and PV over
# the prompt so far) lets a fit tell the attention kernels' speed from the linear layers'.
ATTENTION_SHARE = 0.2


def _attention_share(data: dict, model: str) -> float:
    """Attention FLOPs over linear-layer FLOPs of the row's average prompt token, computed
    from its prompts (a query at position p sees p keys, so p/2 on average over a prompt)."""
    m = load_model_spec(model)
    try:
        reqs = build_requests(WorkloadConfig.model_validate(data.get("workload", {})))
    except (ValueError, ScenarioError):
        return 0.0  # a workload the simulation will refuse, naming the field, when the row is run
    if not reqs:
        return 0.0
    mean_ctx = float(np.mean([r.prompt_len for r in reqs])) / 2
    window = min(mean_ctx, m.sliding_window) if m.sliding_window else mean_ctx
    pairs = (1 - m.window_fraction) * mean_ctx + m.window_fraction * window
    return m.attention_flops_per_pair() * pairs / (2.0 * m.layer_params_active())


# A row whose client sends at least this many requests at once shows the API server's time per
# request: its first tokens wait for the whole burst to be processed (sim.engine.Engine.submit).
BURST = 64


def _burst(data: dict) -> int:
    """How many requests the row's client sends at its first instant: every prompt of a
    request-rate-inf run, capped by --max-concurrency."""
    w = data.get("workload", {})
    try:
        rate = float(w.get("request_rate", math.inf))
    except (TypeError, ValueError):
        return 1  # a rate the simulation will refuse, naming the field, when the row is run
    if not math.isinf(rate) or w.get("stages") or w.get("dataset_name") in ("trace", "mooncake"):
        return 1
    n = w.get("num_prompts") or 0
    return int(min(n, w.get("max_concurrency") or n))


def _several_instances(data: dict) -> bool:
    d = data.get("deployment", {})
    return d.get("mode") == "pd" or d.get("instances", 1) > 1


def _simulate_metrics(data: dict) -> dict:
    return simulate(scenario_from_dict(data)).bench.metrics


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _pmap(fn, items: list, processes: int, progress: str | None):
    """`fn` over `items` on `processes` worker processes, in order. The workers are started once
    and kept: a fit by simulation maps a few simulations hundreds of times, and starting a pool
    each time cost more than the simulations (workers also keep their cached datasets)."""
    if processes <= 1 or len(items) <= 1:
        it = map(fn, items)
        return list(_bar(it, len(items), progress))
    pool = _POOLS.get(processes)
    if pool is None:
        pool = _POOLS[processes] = ProcessPoolExecutor(max_workers=processes)
    return list(_bar(pool.map(fn, items), len(items), progress))


def _bar(it, total, desc):
    if not desc:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


# --- parameters <-> vector -------------------------------------------------------------------
# Efficiencies cannot beat the hardware's peak: a fit that needs more is missing a term, and
# lands on the bound, where calibration.check says so.
_LOG = {"step_overhead_s": (1e-4, 0.5), "compute_efficiency": (0.01, 1.0), "memory_efficiency": (0.05, 1.0),
        "comm_efficiency": (0.02, 1.0), "attention_efficiency": (0.01, 1.0)}
_LIN = {"per_seq_s": (0.0, 0.003), "launch_overhead_s": (0.0, 0.3), "prefill_overhead_s": (0.0, 0.5),
        "frontend_latency_s": (0.0, 0.5), "cpu_overhead_s": (0.0, 0.1), "frontend_per_request_s": (0.0, 0.05)}
# Weak pulls toward typical values, so a coefficient the training rows cannot see stays plausible
# instead of drifting: memory efficiency when every step is compute-bound, or, in every decode
# step, the split between the per-step overhead and the weight reads (both cost the same each
# step; only the KV reads, a few % of the bytes, tell them apart from each other and from a
# per-request cost). Weight 0.1 on a log ratio: a factor-2 departure costs as much as a 7 % error
# on one metric, far more than the schedule's own noise (~0.5 %), less than a real misfit. (At
# 0.05, the round trip's dense fit let memory efficiency drift to 0.59 against the true 0.8 and
# over-predicted TPOT at 3x longer contexts by 6 %; at 0.1, memory 0.65 and +2.6 %.)


def coordinate_bounds(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The bounds of the named coefficients in the optimiser's coordinates."""
    lo, hi = [], []
    for n in names:
        a, b = _LOG.get(n) or _LIN[n]
        lo.append(math.log(a) if n in _LOG else a / _LIN[n][1])
        hi.append(math.log(b) if n in _LOG else 1.0)
    return np.array(lo), np.array(hi)


def coeffs_at(names: list[str], x: np.ndarray, base: dict) -> RooflineCoefficients:
    """The coefficients at point `x` of the optimiser's coordinates; the others from `base`."""
    vals = dict(base)
    for name, v in zip(names, x):
        vals[name] = float(np.exp(v)) if name in _LOG else float(v) * _LIN[name][1]
    return RooflineCoefficients(**vals)


_PRIOR = {"compute_efficiency": 0.4, "memory_efficiency": 0.7, "comm_efficiency": 0.5, "attention_efficiency": 0.4}
_PRIOR_WEIGHT = 0.1
# Costs a step may or may not have, pulled toward none: the rows often cannot tell a per-prefill-
# step overhead from the front end's latency (both lengthen every TTFT at low concurrency), and an
# optimiser stops anywhere in such a valley, where another machine's last bits moved it (seed002
# vLLM: prefill overhead 2 or 14 ms, and a held-out row at c = 1024 by 4 points). In units of
# the coefficient's range, weight 0.03: a 0.17 s prefill overhead costs as much as a 1 % error on
# one metric. Weak on purpose, and not on the per-request cost: what no row pins is decided by
# these pulls, and the round trip's dense prediction at 3x the context moves with them (TPOT
# +3.6 % over seeds, +5.7 % at the worst, in experiments/results/roundtrip.md).
_EXTRAS = ("launch_overhead_s", "prefill_overhead_s", "cpu_overhead_s", "frontend_per_request_s")
_EXTRA_WEIGHT = 0.03
# Candidates within this relative objective of each other are ties; the first one wins. KV
# capacities are tried from small to large, so a tie keeps the smallest capacity that explains
# the training rows: capacity beyond what they ever fill cannot be seen in them.
_TIE = 0.005


@dataclass
class StepTimeFit:
    model: str
    hardware: str | list[str]
    tp: int = 1
    metrics: tuple[str, ...] = DEFAULT_METRICS
    seeds: tuple[int, ...] = (0,)
    kv_bounds: tuple[int, int] | None = None  # fit KV capacity (tokens) within these bounds
    kv_grid: int = 7
    # The engine's own memory-formula estimate of the pool, when its formula has no unknowns
    # (SGLang: mem_fraction_static x memory - weights). Among capacities the training rows cannot
    # tell apart, the one nearest this is kept; without it, the smallest one is.
    kv_prior: int | None = None
    n_starts: int = 17  # the default coefficients and n_starts - 1 Sobol points
    random_state: int = 0
    processes: int | None = None
    progress: bool = False
    fixed: dict = field(default_factory=dict)  # coefficients held at these values, not fitted
    # minimise over full simulations even when replay is possible (runs whose schedule depends
    # on timing, e.g. Poisson arrivals, where replay is only approximate)
    by_simulation: bool = False
    # fitted
    coeffs_: RooflineCoefficients | None = None
    hardware_: str | None = None
    kv_cache_tokens_: int | None = None
    loss_: float = math.nan
    candidates_: list[dict] = field(default_factory=list)
    x_: np.ndarray | None = None  # the fitted point in the optimiser's coordinates (see _vec)
    train_cases_: list | None = None
    uncertainty_: object | None = None  # calibration.interval.Uncertainty, once asked for
    jacobian_: np.ndarray | None = None  # d(data residuals)/dx at x_, one row per fitted number
    eager_: bool = True  # some training row runs without CUDA graphs: the launch floor is fitted
    overlap_: bool = False  # some training row's engine overlaps CPU and GPU: the CPU's part is fitted
    multi_tp_: bool = False  # some training row (of another model) runs at TP > 1: the link is fitted
    attention_: bool = False  # some training row's prompts are long enough to time the attention kernels
    burst_: bool = False  # some training row sends a burst: the front end's time per request is fitted

    def _names(self) -> list[str]:
        """The coefficients the fit moves: TP communication only with TP > 1, the launch floor only
        when some row runs without CUDA graphs (a graph launches a step's kernels at once; fitted
        anyway, a floor above every step's GPU time imitates a slower device and hides how steps
        grow with the batch), none it holds fixed."""
        names = ["step_overhead_s", "per_seq_s"] + (["launch_overhead_s"] if self.eager_ else []) \
            + ["prefill_overhead_s", "frontend_latency_s", "compute_efficiency", "memory_efficiency"] \
            + (["comm_efficiency"] if self.tp > 1 or self.multi_tp_ else []) \
            + (["cpu_overhead_s"] if self.overlap_ else []) \
            + (["attention_efficiency"] if self.attention_ else []) \
            + (["frontend_per_request_s"] if self.burst_ else [])
        return [n for n in names if n not in self.fixed]

    def _base(self) -> RooflineCoefficients:
        return RooflineCoefficients(**self.fixed)

    # The optimiser's coordinates are all of order one: a ratio coefficient as its log, a time
    # as the fraction of its upper bound. Finite differences then move every coefficient by a
    # like amount (in seconds, a relative step of 1e-2 would move per_seq_s by 3x its range).
    def _to_coeffs(self, x: np.ndarray) -> RooflineCoefficients:
        return coeffs_at(self._names(), x, dict(self.fixed))

    def _bounds(self):
        return coordinate_bounds(self._names())

    def _starts(self) -> list[np.ndarray]:
        """The default coefficients, then scrambled Sobol points inside the bounds (away from
        the walls): fixed by `random_state`, so a fit is the same on every machine."""
        from scipy.stats import qmc  # only a fit needs it (scipy.stats is slow to import)

        lo, hi = self._bounds()
        pts = [np.clip(self._vec(self._base()), lo, hi)]
        n = self.n_starts - 1
        if n > 0:
            u = qmc.Sobol(len(lo), scramble=True, seed=self.random_state).random_base2(max(0, math.ceil(math.log2(n))))
            pts += [lo + (hi - lo) * (0.05 + 0.9 * v) for v in u[:n]]
        return pts

    def _simulation_starts(self) -> list[np.ndarray]:
        """A fit by full simulation affords two starts: the default coefficients and one
        uniform draw (fixed by `random_state`)."""
        lo, hi = self._bounds()
        u = np.random.default_rng(self.random_state).uniform(0.15, 0.85, size=len(lo))
        return [np.clip(self._vec(self._base()), lo, hi), lo + (hi - lo) * u]

    def _vec(self, c: RooflineCoefficients) -> np.ndarray:
        # an unset attention rate starts where it means: the linear layers'
        vals = {**c.as_dict(), "attention_efficiency": c.attention_rate}
        return np.array([math.log(vals[n]) if n in _LOG else vals[n] / _LIN[n][1] for n in self._names()])

    def _step_dict(self, hardware: str, c: RooflineCoefficients) -> dict:
        return {"model": self.model, "hardware": hardware, "tp": self.tp, **c.as_dict()}

    # --- fit ---------------------------------------------------------------------------------
    def fit(self, cases: list[RowCase]) -> StepTimeFit:
        if not cases:
            raise ValueError("nothing to fit: no training rows")
        # One BLAS thread: the optimiser's matrices are tiny, and a threaded BLAS may sum in
        # another order with another thread count, which moves a flat optimum.
        with threadpool_limits(limits=1):
            return self._fit(cases)

    def _fit(self, cases: list[RowCase]) -> StepTimeFit:
        moved = [c.row_id for c in cases if "hardware" in c.step or c.kv_tokens is not None]
        if moved:
            raise ValueError(f"training rows {moved} are of another GPU or KV pool than the fit's: "
                             "a transfer row can only be predicted")
        self.multi_tp_ = any(c.step.get("tp", self.tp) > 1 for c in cases)
        self._solved = {}  # optimisations already run, by the traces they ran on
        self.eager_ = any(_eager(c.scenario) for c in cases)
        self.overlap_ = any(_overlaps(c.scenario) for c in cases)
        self.burst_ = any(_burst(c.scenario) >= BURST for c in cases)
        # the attention's own rate, when some row's prompts can time it and the rows have a number
        # to spare for it (seed 001's two rows fit two coefficients: its 8k prompts' attention
        # stays at the linear layers' rate)
        self.attention_ = False
        if any(_attention_share(c.scenario, c.step.get("model", self.model)) >= ATTENTION_SHARE for c in cases):
            self.attention_ = self._n_data(cases) > len(self._names())
        hws = [self.hardware] if isinstance(self.hardware, str) else list(self.hardware)
        kvs = [None] if self.kv_bounds is None else [
            int(round(v / 16) * 16) for v in np.geomspace(self.kv_bounds[0], self.kv_bounds[1], self.kv_grid)]
        if self.kv_prior is not None:
            if self.kv_bounds is None or not self.kv_bounds[0] <= self.kv_prior <= self.kv_bounds[1]:
                raise ValueError(f"kv_prior {self.kv_prior} must lie inside kv_bounds {self.kv_bounds}")
            kvs = sorted(set(kvs) | {int(self.kv_prior)})
        unknown = sorted(set(self.metrics) - set(SIM_KEY)) + sorted(set(self.fixed) - set(_LOG) - set(_LIN))
        if unknown:
            raise ValueError(f"unknown metric or coefficient {unknown}; metrics: {', '.join(SIM_KEY)}; "
                             f"coefficients: {', '.join([*_LOG, *_LIN])}")
        n_data, n_free = self._n_data(cases), len(self._names())
        if n_data < n_free:
            have = sorted({m for c in cases for m in self.metrics if m in c.measured})
            raise ValueError(f"{n_data} measured numbers ({len(cases)} rows x the metrics they have of "
                             f"{', '.join(self.metrics)}: {', '.join(have) or 'none'}) cannot determine {n_free} "
                             f"coefficients ({', '.join(self._names())}): fit more rows or metrics, or hold "
                             "coefficients fixed")
        procs = self.processes or os.cpu_count() or 1
        best = None
        self.candidates_ = []
        for hw in hws:
            st = RooflineStepTime(load_model_spec(self.model), load_hardware_spec(hw), self.tp)
            tried = []
            for kv in kvs:
                cand = self._candidate(cases, hw, st, kv, procs)
                tried.append(cand)
                if best is None or cand["objective"] < best["objective"] * (1 - _TIE):
                    best = cand
            if self.kv_bounds is not None and best["hardware"] == hw:
                if self.kv_prior is None:
                    best = self._refine_kv(cases, hw, st, procs, tried, best)
                else:
                    best = self._nearest_prior(tried, best)
        self.coeffs_, self.hardware_, self.kv_cache_tokens_, self.loss_ = (
            best["coeffs"], best["hardware"], best["kv_cache_tokens"], best["loss"])
        self.x_, self.jacobian_ = self._vec(best["coeffs"]), best["jacobian"]
        self.train_cases_ = list(cases)  # what an interval is checked against (calibration.interval)
        self.uncertainty_ = None
        return self

    def _candidate(self, cases, hw, st, kv, procs) -> dict:
        coeffs, loss, jac = self._fit_one(cases, hw, st, kv, procs)
        # candidates the data cannot tell apart are ranked by the plausibility prior
        prior = float(np.sum(self._prior_residuals(coeffs) ** 2)) / max(1, self._n_data(cases))
        cand = {"hardware": hw, "kv_cache_tokens": kv, "loss": loss, "objective": loss + prior,
                **coeffs.as_dict(), "coeffs": coeffs, "jacobian": jac}
        self.candidates_.append({k: v for k, v in cand.items() if k not in ("coeffs", "jacobian")})
        return cand

    def _nearest_prior(self, tried, best) -> dict:
        """Of the capacities that fit as well as the best (within the tie tolerance), the one
        closest (in ratio) to the memory-formula estimate."""
        tied = [c for c in tried if c["objective"] <= best["objective"] * (1 + _TIE)]
        return min(tied, key=lambda c: abs(math.log(c["kv_cache_tokens"] / self.kv_prior)))

    def _refine_kv(self, cases, hw, st, procs, tried, best, steps: int = 4) -> dict:
        """Bisect between the largest grid capacity that fits worse and the chosen one, so the
        result is the smallest capacity (within ~5 %) that explains the training rows."""
        below = [c for c in tried if c["kv_cache_tokens"] < best["kv_cache_tokens"]]
        if not below:
            return best
        lo, hi = below[-1]["kv_cache_tokens"], best["kv_cache_tokens"]
        for _ in range(steps):
            mid = int(round(math.sqrt(lo * hi) / 16) * 16)
            if mid in (lo, hi):
                break
            cand = self._candidate(cases, hw, st, mid, procs)
            if cand["objective"] <= best["objective"] * (1 + _TIE):
                best, hi = cand, mid
            else:
                lo = mid
        return best

    def _fit_one(self, cases, hw, st: RooflineStepTime, kv, procs):
        """Simulate the rows once and fit on replays of those runs: where the replays are exact at
        the fitted coefficients (calibration.replay, Trace.exact_at), that is the answer, and its
        loss the simulations'. Otherwise (timed arrivals; a front-end latency behind concurrency
        permits) the loss is minimised over full simulations, from starting points the replays
        propose, and the loss reported is the simulations'."""
        if self.by_simulation or any(_several_instances(c.scenario) for c in cases):
            return self._fit_by_simulation(cases, hw, kv, procs)
        runs = self._record(cases, hw, self._base(), kv, procs)
        traces = [t for t, _ in runs]
        # KV capacities the rows never fill give the same traces: optimise those once
        key = (hw, _digest(traces))
        if key not in self._solved:
            self._solved[key] = self._optimise(cases, st, traces)
        coeffs, replay_loss, jac = self._solved[key]
        if all(t.exact_at(t.delay(coeffs.frontend_latency_s, coeffs.frontend_per_request_s)) for t in traces):
            return coeffs, replay_loss, jac  # the replays are the simulations
        # Timed arrivals: the replays re-time each request through the steps it was recorded in
        # (calibration.replay._local). That is right at the coefficients the runs were simulated
        # with, but elsewhere it misses how the batches change: at 70 % load, a decode step 1 %
        # slower lets the batch grow and slows it again, which the replays do not see (their
        # predicted loss was off by 20x a step away). So the replays only propose starts, and the
        # loss is minimised over full simulations: each start is simulated once, the two lowest
        # are searched with finite differences wide enough (0.1 in the optimiser's coordinates)
        # to see through the schedule's noise (a metric moves ~0.5 % when the schedule changes
        # at all), and the lower is polished at 0.05. Starts: the replays' estimate and the
        # usual starts.
        starts = [self._vec(coeffs)] + self._starts()
        best = self._fit_by_simulation(cases, hw, kv, procs, starts=starts, screen=2, diff_step=0.1, max_nfev=40,
                                       polish_nfev=40, polish_step=0.05)
        # The replays of runs simulated at the estimate batch as those runs did, so near it they
        # are right: search them again from every start (another basin the first runs, simulated
        # at the defaults, could not show), and search by simulation from their answer while
        # that lowers the simulated loss. The search runs even when their answer simulates worse
        # than the best so far: a replay optimum is only near the simulated one (the round trip's
        # seed 0 was left in a basin with 3x the loss when a worse-simulating answer ended the
        # rounds); its result is kept only if it is lower.
        for _ in range(3):
            traces = [t for t, _ in self._record(cases, hw, best[0], kv, procs)]
            again, _, _ = self._optimise(cases, st, traces, self._vec(best[0]))
            cand = self._fit_by_simulation(cases, hw, kv, procs, starts=[self._vec(again)], diff_step=0.1, max_nfev=40,
                                           polish_nfev=40, polish_step=0.05)
            if cand[1] >= best[1]:
                break
            best = cand
        return best

    def _record(self, cases, hw, coeffs, kv, procs) -> list[tuple[Trace, dict]]:
        """Every row (and seed) simulated at `coeffs`, recorded: its trace and its metrics."""
        jobs = [_with(c, self._step_dict(hw, coeffs), kv, s) for c in cases for s in self.seeds]
        return _pmap(_simulate_run, jobs, procs, f"simulate {hw}" + (f" kv={kv}" if kv else "") if self.progress else None)

    def _fit_by_simulation(self, cases, hw, kv, procs, starts=None, screen: int = 0, diff_step: float = 0.05,
                           max_nfev: int = 30, polish_nfev: int = 0, polish_step: float | None = None):
        """Every residual a full simulation: several engines (PD, data parallel) cannot be
        replayed from one step list, and timed arrivals cannot be re-timed from one. Finite
        differences wide enough to see through the schedule's discreteness. With `screen`, each
        start is first simulated once and only that many of the lowest are searched; the lowest
        search is polished with `polish_nfev` more simulations at `polish_step`."""
        lo, hi = self._bounds()

        def residuals(x):
            coeffs = self._to_coeffs(x)
            res = self._data_residuals(cases, self._predict_metrics(cases, hw, coeffs, kv, procs))
            return np.concatenate([res, self._prior_residuals(coeffs)])

        def solve(x0, nfev, step):
            return least_squares(residuals, x0, bounds=(lo, hi), diff_step=step, max_nfev=nfev)

        starts = [np.clip(x, lo, hi) for x in (starts if starts is not None else self._simulation_starts())]
        if screen:
            cost = [float(np.sum(residuals(x) ** 2)) for x in starts]
            starts = [starts[i] for i in sorted(range(len(starts)), key=lambda i: (cost[i], i))[:screen]]
        best = None
        for x0 in starts:
            r = solve(x0, max_nfev, diff_step)
            if best is None or r.cost < best.cost:
                best = r
        if polish_nfev:
            best = solve(best.x, polish_nfev, polish_step or diff_step)
        coeffs = self._to_coeffs(best.x)
        jac = best.jac[:len(best.fun) - len(self._prior_residuals(coeffs))]
        return coeffs, self._sim_loss(cases, hw, coeffs, kv, procs), jac

    def _residuals(self, cases, st, traces, terms, coeffs, with_prior: bool = True) -> np.ndarray:
        res = []
        ns = len(self.seeds)
        wanted = {SIM_KEY[m] for m in self.metrics}
        for i, case in enumerate(cases):
            preds = [replay(t, st.step_times(t.features, coeffs, terms=tt),
                            frontend_latency_s=t.delay(coeffs.frontend_latency_s, coeffs.frontend_per_request_s),
                            only=wanted) for t, tt in zip(traces[i * ns:(i + 1) * ns], terms[i * ns:(i + 1) * ns])]
            for m in self.metrics:
                if m in case.measured and np.isfinite(case.measured[m]) and case.measured[m] > 0:
                    p = float(np.mean([pr[SIM_KEY[m]] for pr in preds]))
                    res.append(math.log(max(p, 1e-12) / case.measured[m]))
        if with_prior:
            res.extend(self._prior_residuals(coeffs))
        return np.array(res)

    def _prior_residuals(self, coeffs) -> np.ndarray:
        eff = [_PRIOR_WEIGHT * math.log(getattr(coeffs, n) / typical) for n, typical in _PRIOR.items() if n in self._names()]
        extra = [_EXTRA_WEIGHT * getattr(coeffs, n) / _LIN[n][1] for n in _EXTRAS if n in self._names()]
        return np.array(eff + extra)

    def _n_data(self, cases) -> int:
        return sum(1 for c in cases for m in self.metrics
                   if m in c.measured and np.isfinite(c.measured[m]) and c.measured[m] > 0)

    def indistinguishable(self, rel: float = 0.02) -> list[dict]:
        """Candidates whose training loss is within `rel` of the best: the data cannot choose."""
        return [c for c in self.candidates_ if c["loss"] <= self.loss_ * (1 + rel) + 1e-12]

    def pinned_directions(self, min_effect: float = 0.05) -> list[dict]:
        """The directions in coefficient space the training rows pin down: the right singular
        vectors of the Jacobian whose unit move (a factor e, or a linear coefficient's whole
        range) changes the residuals' RMS by at least `min_effect` (0.05: a 10 % move, 0.5 %).
        Each has `vector` (in scaled coordinates) and `effect` (RMS change per unit move)."""
        if self.jacobian_ is None:
            raise RuntimeError("fit first")
        j = self.jacobian_
        _, s, vt = np.linalg.svd(j, full_matrices=False)
        eff = s / math.sqrt(len(j))
        return [{"vector": v, "effect": float(e)} for e, v in zip(eff, vt) if e >= min_effect]

    def compare_coefficients(self, other: RooflineCoefficients, min_effect: float = 0.05) -> list[dict]:
        """How far `other` is from the fit along each pinned direction: `shift` in scaled units
        and `rms_change`, the change in the training residuals' RMS that shift makes (linearised
        at the fit). Unpinned directions are not compared: the rows say nothing about them."""
        d = self._vec(other) - self.x_
        return [{"effect": p["effect"], "shift": float(p["vector"] @ d),
                 "rms_change": abs(float(p["vector"] @ d)) * p["effect"]} for p in self.pinned_directions(min_effect)]

    def _optimise(self, cases, st, traces, x0=None, scout_nfev: int = 30, polish: int = 3):
        """Every start takes `scout_nfev` evaluations; the `polish` lowest go on to converge.
        On the splits here this finds the lowest basin that running every start to the end
        finds, in half the time. Ties keep the earlier start: nothing depends on the machine.
        `x0` (a later round, on runs simulated at x0) is one more start."""
        lo, hi = self._bounds()
        ns = len(self.seeds)
        terms = [self._row_model(st, cases[i // ns]).with_facts(t.facts).step_terms(t.features)
                 for i, t in enumerate(traces)]

        def fun(x):
            return self._residuals(cases, st, traces, terms, self._to_coeffs(x))

        def solve(x0, nfev, tol=1e-8):
            return least_squares(fun, x0, bounds=(lo, hi), diff_step=1e-3, max_nfev=nfev, ftol=tol, xtol=tol, gtol=tol)

        starts = self._starts() + ([] if x0 is None else [x0])
        scouts = sorted(enumerate(solve(x, scout_nfev) for x in starts), key=lambda ir: (ir[1].cost, ir[0]))
        # polished to convergence: where the rows leave a valley nearly flat, stopping at the
        # default tolerances left the point wherever the path entered it, which another machine's
        # last bits moved (and with it a held-out row near saturation by 4 points)
        best = min((solve(r.x, 1000, 1e-13) for _, r in scouts[:polish]), key=lambda r: r.cost)
        coeffs = self._to_coeffs(best.x)
        data = self._residuals(cases, st, traces, terms, coeffs, with_prior=False)
        return coeffs, float(np.mean(data**2)), best.jac[:len(data)]

    def _row_model(self, st: RooflineStepTime, case: RowCase) -> RooflineStepTime:
        """The step model a row's steps are timed with: the fit's, or its own model and TP on the
        fit's GPU (a fit across the models run on one GPU)."""
        if not case.step:
            return st
        return RooflineStepTime(load_model_spec(case.step.get("model", self.model)), st.hardware,
                                int(case.step.get("tp", self.tp)))

    def _sim_loss(self, cases, hw, coeffs, kv, procs) -> float:
        return self._loss(cases, self._predict_metrics(cases, hw, coeffs, kv, procs))

    def _data_residuals(self, cases, preds: list[dict]) -> list[float]:
        """Log ratio of predicted to measured, for every fitted metric each row has."""
        return [math.log(max(p[SIM_KEY[m]], 1e-12) / c.measured[m]) for c, p in zip(cases, preds)
                for m in self.metrics if m in c.measured and np.isfinite(c.measured[m]) and c.measured[m] > 0]

    def _loss(self, cases, preds: list[dict]) -> float:
        return float(np.mean(np.square(self._data_residuals(cases, preds))))

    def _mean_metrics(self, cases, out: list[dict]) -> list[dict]:
        """Each row's metrics averaged over its workload seeds (`out`: rows times seeds, in order)."""
        ns = len(self.seeds)
        return [{k: float(np.mean([o[k] for o in out[i * ns:(i + 1) * ns]])) for k in out[i * ns]}
                for i in range(len(cases))]

    # --- predict -------------------------------------------------------------------------------
    def _predict_metrics(self, cases, hw, coeffs, kv, procs) -> list[dict]:
        jobs = [_with(c, self._step_dict(hw, coeffs), kv, s) for c in cases for s in self.seeds]
        return self._mean_metrics(cases, _pmap(_simulate_metrics, jobs, procs, "predict" if self.progress else None))

    def predict(self, cases: list[RowCase]) -> pd.DataFrame:
        """Full simulations (not replays) with the fitted parameters; one row per case and metric."""
        if self.coeffs_ is None:
            raise RuntimeError("fit first")
        procs = self.processes or os.cpu_count() or 1
        preds = self._predict_metrics(cases, self.hardware_, self.coeffs_, self.kv_cache_tokens_, procs)
        rows = []
        for case, p in zip(cases, preds):
            for m, sim_key in SIM_KEY.items():
                if m in case.measured and np.isfinite(case.measured[m]):
                    meas = case.measured[m]
                    rows.append({"row_id": case.row_id, "metric": m, "measured": meas, "predicted": p[sim_key],
                                 "ape_pct": abs(p[sim_key] - meas) / meas * 100 if meas else math.nan})
        return pd.DataFrame(rows)

    def step_model(self) -> RooflineStepTime:
        return RooflineStepTime(load_model_spec(self.model), load_hardware_spec(self.hardware_), self.tp,
                                self.coeffs_, calibrated=True)

    def warnings(self) -> list[str]:
        out = self.step_model().plausibility_warnings()
        if self.kv_bounds and self.kv_cache_tokens_ in (self._grid_edges()):
            out.append(f"kv_cache_tokens = {self.kv_cache_tokens_} sits on the edge of its bounds {self.kv_bounds}")
        return out

    def _grid_edges(self):
        return (int(round(self.kv_bounds[0] / 16) * 16), int(round(self.kv_bounds[1] / 16) * 16))

    def to_profile(self, name: str, fit_info: dict) -> Profile:
        from .interval import Uncertainty  # (it builds on this module)

        info = {"loss_mean_sq_log_ratio": float(f"{self.loss_:.6g}"), "hardware_candidates": self.candidates_hw(),
                **fit_info, "units": {k: v for k, v in PLAUSIBLE_UNITS.items()},
                **Uncertainty.of_fit(self).to_fit_info()}
        return Profile(name=name, model=self.model, hardware=self.hardware_, tp=self.tp, coeffs=self.coeffs_,
                       kv_cache_tokens=self.kv_cache_tokens_, fit=info)

    def candidates_hw(self) -> list[str]:
        return [f"{c['hardware']}" + (f"@kv{c['kv_cache_tokens']}" if c["kv_cache_tokens"] else "")
                + f" loss {c['loss']:.5f}" for c in self.candidates_]


def _digest(traces: list[Trace]) -> str:
    """What the optimiser sees of a list of traces (the step shapes, arrivals, permits, and
    which step emitted each token), as a hash."""
    h = hashlib.sha256()
    for t in traces:
        fixed = t.fixed_start if t.fixed_start is not None else np.empty(0)
        turns = [x if x is not None else np.empty(0) for x in (t.think_s, t.not_before_s)]
        for a in (t.features, fixed, *turns, t.arrival_s, t.permit_from, t.follows, t.first_step, t.finished, t.end_step,
                  t.prompt_len, t.output_len, t.tok_step, t.tok_ptr,
                  np.array([t.frontend_latency_s, t.think_time_s, t.exact], dtype=float)):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


PLAUSIBLE_UNITS = {k: f"plausible range {lo}..{hi}" for k, (lo, hi) in PLAUSIBLE.items()}
