"""Fit the roofline step-time model (and unknown capacities) to measured benchmark rows.

    fitter = StepTimeFit(model="qwen2.5-72b-instruct-gptq-int4", hardware=["a100-80g", "h100-80g"])
    fitter.fit(train_cases)          # simulate each row once, then optimise on exact replays
    table = fitter.predict(cases)    # full simulations with the fitted coefficients

The loss is the mean squared log ratio of predicted to measured metric, over the metrics
each row has; the coefficients are efficiencies with physical bounds (sim.perf_model).
Hardware named as a list is a discrete unknown: every candidate is fitted and the lowest
training loss wins. An unknown KV capacity is searched over a log-spaced grid within its
bounds. Workload seeds are averaged, never chosen.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from sim.config import scenario_from_dict
from sim.perf_model import PLAUSIBLE, RooflineCoefficients, RooflineStepTime, load_hardware_spec, load_model_spec
from sim.profile import Profile
from sim.runner import simulate

from .replay import Trace, replay, trace_from

DEFAULT_METRICS = ("mean_ttft_ms", "mean_tpot_ms", "median_itl_ms", "output_throughput")
# measured column -> simulated metric key
SIM_KEY = {
    "mean_ttft_ms": "mean_ttft_ms", "median_ttft_ms": "median_ttft_ms", "p99_ttft_ms": "p99_ttft_ms",
    "mean_tpot_ms": "mean_tpot_ms", "median_tpot_ms": "median_tpot_ms", "p99_tpot_ms": "p99_tpot_ms",
    "mean_itl_ms": "mean_itl_ms", "median_itl_ms": "median_itl_ms", "p99_itl_ms": "p99_itl_ms",
    "mean_e2e_ms": "mean_e2el_ms", "p99_e2e_ms": "p99_e2el_ms",
    "output_throughput": "output_throughput", "request_throughput": "request_throughput",
    "duration_s": "duration", "successful_requests": "completed",
}


@dataclass
class RowCase:
    """One measured run: its id, the measured metrics, and the scenario that reproduces it."""

    row_id: str
    measured: dict[str, float]
    scenario: dict  # raw scenario data; its step_time table is replaced while fitting


def _with(case: RowCase, step_time: dict, kv_tokens: int | None, seed: int) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in case.scenario.items()}
    data["step_time"] = step_time
    data.setdefault("workload", {})["seed"] = seed
    if kv_tokens is not None:
        data["engine"].pop("num_gpu_blocks_override", None)
        data["engine"]["kv_cache_tokens"] = int(kv_tokens)
    return data


def _simulate_trace(data: dict) -> Trace:
    return trace_from(simulate(scenario_from_dict(data), record_steps=True))


def _several_instances(data: dict) -> bool:
    d = data.get("deployment", {})
    return d.get("mode") == "pd" or d.get("instances", 1) > 1


def _simulate_metrics(data: dict) -> dict:
    return simulate(scenario_from_dict(data)).bench.metrics


def _pmap(fn, items: list, processes: int, progress: str | None):
    if processes <= 1 or len(items) <= 1:
        it = map(fn, items)
        return list(_bar(it, len(items), progress))
    with ProcessPoolExecutor(max_workers=processes) as ex:
        return list(_bar(ex.map(fn, items), len(items), progress))


def _bar(it, total, desc):
    if not desc:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


# --- parameters <-> vector -------------------------------------------------------------------
_LOG = {"step_overhead_s": (1e-4, 0.5), "compute_efficiency": (0.01, 1.5), "memory_efficiency": (0.05, 1.5),
        "comm_efficiency": (0.02, 1.5)}
_LIN = {"per_seq_s": (0.0, 0.003), "launch_overhead_s": (0.0, 0.3), "prefill_overhead_s": (0.0, 0.5),
        "frontend_latency_s": (0.0, 0.5)}
# Weak pulls toward typical values, so a coefficient the training rows cannot see (say, memory
# efficiency when every step is compute-bound) stays plausible instead of drifting. Weight 0.02
# on a log ratio: a factor-2 departure costs as much as a 1.4 % error on one metric.
_PRIOR = {"compute_efficiency": 0.4, "memory_efficiency": 0.7, "comm_efficiency": 0.5}
_PRIOR_WEIGHT = 0.02
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
    n_starts: int = 4
    random_state: int = 0
    processes: int | None = None
    max_outer: int = 4
    progress: bool = False
    # minimise over full simulations even when replay is possible (runs whose schedule depends
    # on timing, e.g. Poisson arrivals, where replay is only approximate)
    by_simulation: bool = False
    # fitted
    coeffs_: RooflineCoefficients | None = None
    hardware_: str | None = None
    kv_cache_tokens_: int | None = None
    loss_: float = math.nan
    candidates_: list[dict] = field(default_factory=list)

    def _names(self) -> list[str]:
        names = ["step_overhead_s", "per_seq_s", "launch_overhead_s", "prefill_overhead_s", "frontend_latency_s",
                 "compute_efficiency", "memory_efficiency"]
        return names + (["comm_efficiency"] if self.tp > 1 else [])

    def _to_coeffs(self, x: np.ndarray) -> RooflineCoefficients:
        vals = {}
        for name, v in zip(self._names(), x):
            vals[name] = float(np.exp(v)) if name in _LOG else float(v)
        return RooflineCoefficients(**vals)

    def _bounds(self):
        lo, hi = [], []
        for n in self._names():
            a, b = _LOG.get(n) or _LIN[n]
            lo.append(math.log(a) if n in _LOG else a)
            hi.append(math.log(b) if n in _LOG else b)
        return np.array(lo), np.array(hi)

    def _starts(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.random_state)
        lo, hi = self._bounds()
        first = self._vec(RooflineCoefficients())
        pts = [np.clip(first, lo, hi)]
        for _ in range(self.n_starts - 1):
            pts.append(lo + (hi - lo) * rng.uniform(0.15, 0.85, size=len(lo)))
        return pts

    def _vec(self, c: RooflineCoefficients) -> np.ndarray:
        return np.array([math.log(getattr(c, n)) if n in _LOG else getattr(c, n) for n in self._names()])

    def _step_dict(self, hardware: str, c: RooflineCoefficients) -> dict:
        return {"model": self.model, "hardware": hardware, "tp": self.tp, **c.as_dict()}

    # --- fit ---------------------------------------------------------------------------------
    def fit(self, cases: list[RowCase]) -> StepTimeFit:
        if not cases:
            raise ValueError("nothing to fit: no training rows")
        hws = [self.hardware] if isinstance(self.hardware, str) else list(self.hardware)
        kvs = [None] if self.kv_bounds is None else [
            int(round(v / 16) * 16) for v in np.geomspace(self.kv_bounds[0], self.kv_bounds[1], self.kv_grid)]
        if self.kv_prior is not None:
            if self.kv_bounds is None or not self.kv_bounds[0] <= self.kv_prior <= self.kv_bounds[1]:
                raise ValueError(f"kv_prior {self.kv_prior} must lie inside kv_bounds {self.kv_bounds}")
            kvs = sorted(set(kvs) | {int(self.kv_prior)})
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
        return self

    def _candidate(self, cases, hw, st, kv, procs) -> dict:
        coeffs, loss = self._fit_one(cases, hw, st, kv, procs)
        # candidates the data cannot tell apart are ranked by the plausibility prior
        prior = float(np.sum(self._prior_residuals(coeffs) ** 2)) / max(1, self._n_data(cases))
        cand = {"hardware": hw, "kv_cache_tokens": kv, "loss": loss, "objective": loss + prior,
                **coeffs.as_dict(), "coeffs": coeffs}
        self.candidates_.append({k: v for k, v in cand.items() if k != "coeffs"})
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
        if self.by_simulation or any(_several_instances(c.scenario) for c in cases):
            return self._fit_by_simulation(cases, hw, kv, procs)
        coeffs = RooflineCoefficients()
        prev = None
        for _ in range(self.max_outer):
            jobs = [_with(c, self._step_dict(hw, coeffs), kv, s) for c in cases for s in self.seeds]
            desc = f"simulate {hw}" + (f" kv={kv}" if kv else "") if self.progress else None
            traces = _pmap(_simulate_trace, jobs, procs, desc)
            coeffs, loss = self._optimise(cases, st, traces)
            if all(t.exact for t in traces):
                break  # replay equals simulation: nothing to iterate
            x = self._vec(coeffs)
            if prev is not None and np.max(np.abs(x - prev)) < 1e-3:
                break
            prev = x
        if not all(t.exact for t in traces):
            loss = self._sim_loss(cases, hw, coeffs, kv, procs)
        return coeffs, loss

    def _fit_by_simulation(self, cases, hw, kv, procs):
        """Several engines (PD, data parallel) cannot be replayed from one step list, so every
        residual is a full simulation: fewer starts and evaluations, and finite differences
        wide enough to see through the schedule's discreteness."""
        lo, hi = self._bounds()
        best = None

        def residuals(x):
            coeffs = self._to_coeffs(x)
            pred = self._predict_metrics(cases, hw, coeffs, kv, procs)
            res = [math.log(max(p[SIM_KEY[m]], 1e-12) / c.measured[m]) for c, p in zip(cases, pred)
                   for m in self.metrics if m in c.measured and np.isfinite(c.measured[m]) and c.measured[m] > 0]
            return np.concatenate([res, self._prior_residuals(coeffs)])

        for x0 in self._starts()[:2]:
            r = least_squares(residuals, x0, bounds=(lo, hi), diff_step=0.05, max_nfev=30)
            if best is None or r.cost < best.cost:
                best = r
        coeffs = self._to_coeffs(best.x)
        return coeffs, self._sim_loss(cases, hw, coeffs, kv, procs)

    def _residuals(self, cases, st, traces, terms, coeffs, with_prior: bool = True) -> np.ndarray:
        res = []
        ns = len(self.seeds)
        wanted = {SIM_KEY[m] for m in self.metrics}
        for i, case in enumerate(cases):
            preds = [replay(t, st.step_times(t.features, coeffs, terms=tt), frontend_latency_s=coeffs.frontend_latency_s,
                            only=wanted) for t, tt in zip(traces[i * ns:(i + 1) * ns], terms[i * ns:(i + 1) * ns])]
            for m in self.metrics:
                if m in case.measured and np.isfinite(case.measured[m]) and case.measured[m] > 0:
                    p = float(np.mean([pr[SIM_KEY[m]] for pr in preds]))
                    res.append(math.log(max(p, 1e-12) / case.measured[m]))
        if with_prior:
            res.extend(self._prior_residuals(coeffs))
        return np.array(res)

    def _prior_residuals(self, coeffs) -> np.ndarray:
        return np.array([_PRIOR_WEIGHT * math.log(getattr(coeffs, n) / typical)
                         for n, typical in _PRIOR.items() if n in self._names()])

    def _n_data(self, cases) -> int:
        return sum(1 for c in cases for m in self.metrics
                   if m in c.measured and np.isfinite(c.measured[m]) and c.measured[m] > 0)

    def indistinguishable(self, rel: float = 0.02) -> list[dict]:
        """Candidates whose training loss is within `rel` of the best: the data cannot choose."""
        return [c for c in self.candidates_ if c["loss"] <= self.loss_ * (1 + rel) + 1e-12]

    def _optimise(self, cases, st, traces):
        lo, hi = self._bounds()
        best = None
        terms = [st.step_terms(t.features) for t in traces]
        for x0 in self._starts():
            r = least_squares(lambda x: self._residuals(cases, st, traces, terms, self._to_coeffs(x)), x0,
                              bounds=(lo, hi), diff_step=1e-3, max_nfev=400)
            if best is None or r.cost < best.cost:
                best = r
        coeffs = self._to_coeffs(best.x)
        data = self._residuals(cases, st, traces, terms, coeffs, with_prior=False)
        return coeffs, float(np.mean(data**2))

    def _sim_loss(self, cases, hw, coeffs, kv, procs) -> float:
        pred = self._predict_metrics(cases, hw, coeffs, kv, procs)
        res = []
        for case, p in zip(cases, pred):
            for m in self.metrics:
                if m in case.measured and np.isfinite(case.measured[m]) and case.measured[m] > 0:
                    res.append(math.log(max(p[SIM_KEY[m]], 1e-12) / case.measured[m]))
        return float(np.mean(np.square(res)))

    # --- predict -------------------------------------------------------------------------------
    def _predict_metrics(self, cases, hw, coeffs, kv, procs) -> list[dict]:
        jobs = [_with(c, self._step_dict(hw, coeffs), kv, s) for c in cases for s in self.seeds]
        out = _pmap(_simulate_metrics, jobs, procs, "predict" if self.progress else None)
        ns = len(self.seeds)
        return [{k: float(np.mean([o[k] for o in out[i * ns:(i + 1) * ns]])) for k in out[i * ns]}
                for i in range(len(cases))]

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
        info = {"loss_mean_sq_log_ratio": round(self.loss_, 6), "hardware_candidates": self.candidates_hw(),
                **fit_info, "units": {k: v for k, v in PLAUSIBLE_UNITS.items()}}
        return Profile(name=name, model=self.model, hardware=self.hardware_, tp=self.tp, coeffs=self.coeffs_,
                       kv_cache_tokens=self.kv_cache_tokens_, fit=info)

    def candidates_hw(self) -> list[str]:
        return [f"{c['hardware']}" + (f"@kv{c['kv_cache_tokens']}" if c["kv_cache_tokens"] else "")
                + f" loss {c['loss']:.5f}" for c in self.candidates_]


PLAUSIBLE_UNITS = {k: f"plausible range {lo}..{hi}" for k, (lo, hi) in PLAUSIBLE.items()}
