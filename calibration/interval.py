"""Prediction intervals: what a fit leaves open, as a range around each predicted metric.

Three sources, each from the fit itself:
- the coefficients: the fit's covariance in its own coordinates (log of an efficiency or of the
  per-step overhead, a time as a fraction of its range), Gauss-Newton at the optimum:
  s² (JᵀJ + P)⁻¹ with J the training residuals' Jacobian, P the weak pulls the fit adds
  (`calibration.fit._PRIOR`, `_EXTRAS`) and s² the training rows' mean squared log error (per
  degree of freedom). Directions the rows do not pin get a wide spread: there the data say nothing;
- the workload: every draw simulates with another workload seed;
- the model's own misfit: the training rows' RMS log error, a lognormal spread on every metric.

A draw is one coefficient vector (clipped to the fit's bounds) and one seed, simulated in full.
The interval at coverage c is exp(m ± z·sqrt(v + s²)), m and v the mean and variance of the
draws' log metric and z the normal quantile of (1 + c) / 2. `servesim validate --interval`
reports how often the measured value of a row the fit never saw falls inside.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from sim.perf_model import RooflineCoefficients

from .fit import (_EXTRA_WEIGHT, _EXTRAS, _PRIOR, _PRIOR_WEIGHT, SIM_KEY, StepTimeFit, _pmap, _simulate_metrics,
                  _with, coeffs_at, coordinate_bounds)

# the metrics an interval is printed for (vLLM's report keys)
METRICS = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
           "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "output_throughput", "request_throughput")
_RIDGE = 1e-8  # keeps (JᵀJ + P) invertible where neither the rows nor a pull touch a coordinate
_AT_BOUND = 1e-3  # of a coordinate's range: a fitted value this close to a bound is on it


@dataclass
class Uncertainty:
    """A fit's coefficient covariance and residual errors, as a profile stores them (`[fit]`)."""

    names: list[str]  # the fitted coefficients, in the optimiser's order
    x: np.ndarray  # their fitted values in the optimiser's coordinates
    covariance: np.ndarray
    residual_rms_log: float  # the training rows' RMS log error (per degree of freedom)
    residual_by_metric: dict[str, float] = field(default_factory=dict)  # the same, metric by metric

    @classmethod
    def of_fit(cls, fit: StepTimeFit, scale_draws: int = 6, rounds: int = 2) -> Uncertainty:
        """The Gauss-Newton covariance at the fit, then checked against the training rows: draws
        from it are simulated on them, and it is scaled until a draw's training loss exceeds the
        fit's by what a draw from the true posterior would (p·s²/n on average). Where the loss is
        not the quadratic the Jacobian sees (a flat direction that bends, a max() that switches),
        the raw covariance's draws missed the rows by 4 to 35 times the fit's loss (seed 002 vLLM)."""
        if fit.jacobian_ is None or fit.x_ is None:
            raise RuntimeError("fit first")
        cached = getattr(fit, "uncertainty_", None)
        if cached is not None:
            return cached
        names = fit._names()
        x = np.asarray(fit.x_, dtype=float)
        j = np.asarray(fit.jacobian_, dtype=float)
        n, p = j.shape
        # A coefficient the fit left on a bound is where the rows pushed it, not a point they fit
        # around: it stays there in every draw (the covariance of the others is conditional on it).
        lo, hi = fit._bounds()
        free = (x - lo > _AT_BOUND * (hi - lo)) & (hi - x > _AT_BOUND * (hi - lo))
        dof = max(1, n - int(free.sum()))
        s2 = float(fit.loss_) * n / dof
        pull = np.array([_PRIOR_WEIGHT ** 2 if k in _PRIOR else _EXTRA_WEIGHT ** 2 if k in _EXTRAS else 0.0
                         for k in names])
        info = j.T @ j + np.diag(pull) + _RIDGE * np.eye(p)
        cov = np.zeros((p, p))
        if free.any():
            cov[np.ix_(free, free)] = s2 * np.linalg.inv(info[np.ix_(free, free)])
        out = cls(names, x, (cov + cov.T) / 2, math.sqrt(s2))
        cases = getattr(fit, "train_cases_", None)
        if not cases:
            return out
        fit.uncertainty_ = out  # (filled in below; a profile and the validation's intervals share it)
        procs = fit.processes or os.cpu_count() or 1

        def train_preds(c):
            return fit._predict_metrics(cases, fit.hardware_, c, fit.kv_cache_tokens_, procs)

        base = train_preds(fit.coeffs_)
        out.residual_by_metric = _residuals_by_metric(fit, cases, base, n / dof)
        if not free.any():
            return out
        loss0 = fit._loss(cases, base)
        want = int(free.sum()) * s2 / n
        for r in range(rounds):
            sets = out.draws(fit.coeffs_, scale_draws + 1, seed=fit.random_state + 1 + r)[1:]
            excess = float(np.mean([fit._loss(cases, train_preds(c)) for c in sets])) - loss0
            if excess <= 0:
                break
            k = float(np.clip(want / excess, 0.01, 4.0))  # the excess grows with the square of the scale
            out.covariance = out.covariance * k
            if 0.8 < k < 1.25:
                break
        return out

    def residual(self, metric: str) -> float:
        """The residual error for a metric of vLLM's report: its own if it was fitted, else the
        largest among fitted metrics of the same quantity (TTFT, TPOT, ...), else the pooled one."""
        if metric in self.residual_by_metric:
            return self.residual_by_metric[metric]
        quantity = _quantity(metric)
        same = [v for k, v in self.residual_by_metric.items() if _quantity(k) == quantity]
        return max(same) if same else self.residual_rms_log

    def to_fit_info(self) -> dict:
        return {"interval_coordinates": list(self.names), "interval_x": [float(v) for v in self.x],
                "interval_covariance": [[float(v) for v in row] for row in self.covariance],
                "residual_rms_log": float(self.residual_rms_log),
                "residual_rms_log_by_metric": {k: float(v) for k, v in self.residual_by_metric.items()}}

    @classmethod
    def from_fit_info(cls, info: dict) -> Uncertainty | None:
        if "interval_covariance" not in info:
            return None
        return cls(list(info["interval_coordinates"]), np.array(info["interval_x"], dtype=float),
                   np.array(info["interval_covariance"], dtype=float), float(info["residual_rms_log"]),
                   dict(info.get("residual_rms_log_by_metric", {})))

    def draws(self, base: RooflineCoefficients, k: int, seed: int = 0) -> list[RooflineCoefficients]:
        """`k` coefficient sets: the fitted one first, then draws from the covariance, each clipped
        to the fit's bounds; coefficients the fit held fixed keep `base`'s values."""
        rng = np.random.default_rng(seed)
        lo, hi = coordinate_bounds(self.names)
        # a covariance from a flat valley may be barely positive: factor it through its eigenvalues
        w, v = np.linalg.eigh(self.covariance)
        root = v * np.sqrt(np.clip(w, 0.0, None))
        out = []
        for i in range(k):
            x = self.x if i == 0 else np.clip(self.x + root @ rng.standard_normal(len(self.x)), lo, hi)
            out.append(coeffs_at(self.names, x, base.as_dict()))
        return out


def _quantity(metric: str) -> str:
    for q in ("ttft", "tpot", "itl", "e2e", "throughput"):
        if q in metric:
            return q
    return metric


def _residuals_by_metric(fit: StepTimeFit, cases, preds: list[dict], dof_factor: float) -> dict[str, float]:
    """RMS log error of each fitted metric over the training rows, keyed by the report's metric
    name (`mean_e2el_ms`, not the table's `mean_e2e_ms`), per degree of freedom."""
    errs: dict[str, list[float]] = {}
    for c, pr in zip(cases, preds):
        for m in fit.metrics:
            meas = c.measured.get(m)
            if meas is not None and np.isfinite(meas) and meas > 0:
                errs.setdefault(SIM_KEY[m], []).append(math.log(max(pr[SIM_KEY[m]], 1e-12) / meas))
    return {k: math.sqrt(float(np.mean(np.square(v))) * dof_factor) for k, v in errs.items()}


def z_of(coverage: float) -> float:
    if not 0 < coverage < 1:
        raise ValueError(f"interval coverage must be between 0 and 100 %, got {coverage * 100:g} %")
    return NormalDist().inv_cdf((1 + coverage) / 2)


def bounds(samples: list[float], residual_rms_log: float, coverage: float) -> tuple[float, float]:
    """The interval around the draws' values of one metric (see the module docstring)."""
    x = np.log(np.maximum(np.asarray(samples, dtype=float), 1e-12))
    m = float(np.mean(x))
    var = float(np.var(x, ddof=1)) if len(x) > 1 else 0.0
    sd = math.sqrt(var + residual_rms_log ** 2)
    z = z_of(coverage)
    return math.exp(m - z * sd), math.exp(m + z * sd)


LABELS = {"mean_ttft_ms": "Mean TTFT (ms)", "median_ttft_ms": "Median TTFT (ms)", "p99_ttft_ms": "P99 TTFT (ms)",
          "mean_tpot_ms": "Mean TPOT (ms)", "median_tpot_ms": "Median TPOT (ms)", "p99_tpot_ms": "P99 TPOT (ms)",
          "mean_itl_ms": "Mean ITL (ms)", "median_itl_ms": "Median ITL (ms)", "p99_itl_ms": "P99 ITL (ms)",
          "mean_e2el_ms": "Mean E2EL (ms)", "output_throughput": "Output token throughput (tok/s)",
          "request_throughput": "Request throughput (req/s)"}


def scenario_interval(sc, coverage: float, draws: int = 20, progress: bool = False) -> dict[str, tuple]:
    """metric -> (the fitted profile's value, low, high) for a scenario whose step time is a fitted
    profile: `draws` simulations, each with coefficients drawn from the fit's covariance and its own
    workload seed (the first: the fitted coefficients and the scenario's seed)."""
    from sim.profile import load_profile

    name = sc.step_time.profile
    if name is None:
        raise ValueError("--interval needs a fitted profile (step_time.profile): a hand-set step time has no "
                         "fit to take an interval from")
    prof = load_profile(name)
    unc = Uncertainty.from_fit_info(prof.fit)
    if unc is None:
        raise ValueError(f"--interval: profile {prof.name} has no fit covariance (fitted before intervals "
                         "existed, or written by hand); fit it again with `servesim calibrate` or `validate`")
    if draws < 2:
        raise ValueError(f"--interval-draws must be at least 2, got {draws}")
    z_of(coverage)  # a bad coverage is refused before any simulation
    over = {k: getattr(sc.step_time, k) for k in sc.step_time._ROOFLINE if getattr(sc.step_time, k) is not None}
    base = RooflineCoefficients(**{**prof.coeffs.as_dict(), **over})
    seed0 = sc.workload.seed
    runs = []
    for i, c in enumerate(unc.draws(base, draws, seed=seed0)):
        st = sc.step_time.model_copy(update={k: v for k, v in c.as_dict().items() if k not in over})
        wl = sc.workload.model_copy(update={"seed": (seed0 + i) % 2**32})
        runs.append(sc.model_copy(update={"step_time": st, "workload": wl}))
    out = _pmap(_metrics_of, runs, os.cpu_count() or 1, "interval draws" if progress else None)
    samples = {k: [float(m.get(k, float("nan"))) for m in out] for k in METRICS}
    return {k: (v[0], *bounds(v, unc.residual(k), coverage)) for k, v in samples.items() if all(np.isfinite(v))}


def _metrics_of(sc) -> dict:
    from sim.runner import simulate

    return simulate(sc).bench.metrics


def format_interval(iv: dict[str, tuple], coverage: float, draws: int) -> str:
    title = f" {coverage * 100:g} % prediction interval ({draws} draws) "
    lines = [f"{title:=^72}", f"{'':<36}{'predicted':>12}{'low':>12}{'high':>12}"]
    for k, (mid, lo, hi) in iv.items():
        lines.append(f"{LABELS[k] + ':':<36}{mid:>12.2f}{lo:>12.2f}{hi:>12.2f}")
    lines.append("=" * 72)
    return "\n".join(lines)


def case_intervals(fit: StepTimeFit, cases: list, coverage: float, draws: int = 20, processes: int | None = None,
                   progress: bool = False):
    """Each case's `coverage` interval for every metric it measured, as `scenario_interval` gives
    it, from a fit just made: a table of row_id, metric, low, high and whether the measured value
    is inside."""
    import pandas as pd

    unc = Uncertainty.of_fit(fit)
    z_of(coverage)
    sets = unc.draws(fit.coeffs_, draws, seed=fit.random_state)
    seed0 = fit.seeds[0]
    jobs = [_with(c, fit._step_dict(fit.hardware_, coeffs), fit.kv_cache_tokens_, seed0 + i)
            for i, coeffs in enumerate(sets) for c in cases]
    procs = processes or os.cpu_count() or 1
    out = _pmap(_simulate_metrics, jobs, procs, "interval draws" if progress else None)
    rows = []
    for j, case in enumerate(cases):
        runs = out[j::len(cases)]  # draw i of case j is job i * len(cases) + j
        for m, key in SIM_KEY.items():
            meas = case.measured.get(m)
            if meas is None or not np.isfinite(meas) or meas <= 0 or m in ("successful_requests", "duration_s"):
                continue
            lo, hi = bounds([r[key] for r in runs], unc.residual(key), coverage)
            rows.append({"row_id": case.row_id, "metric": m, "low": lo, "high": hi, "inside": bool(lo <= meas <= hi)})
    return pd.DataFrame(rows)
