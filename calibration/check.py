"""Every fit checks itself: re-simulate the training rows, compare, and refuse a poor fit.

`check_fit(fitter, train)` simulates every training row with the fitted coefficients (full
simulations, not replays) and reports measured against fitted for each metric. A fit is poor
when a training metric is off by more than `MAX_TRAIN_APE` percent, or when a coefficient sits
on a bound of the fit (a fit that reaches for a bound is missing a term: the message says which
one it points to). Coefficients outside their plausible range only warn. `servesim calibrate`
and `servesim validate` print this, write it into the report, and exit non-zero on a poor fit
unless `--allow-poor-fit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from .fit import _LIN, _LOG, StepTimeFit

MAX_TRAIN_APE = 25.0  # percent

# What a coefficient on a bound says the model lacks.
AT_UPPER = {
    "step_overhead_s": "more than 0.5 s per step: a cost per step the model does not have",
    "per_seq_s": "more than 3 ms per request per step: per-request work the model does not have "
                 "(detokenisation, streaming, or decode steps slower with the batch than the KV reads explain)",
    "launch_overhead_s": "steps never shorter than 0.3 s: a floor the model does not have",
    "prefill_overhead_s": "prompt steps 0.5 s slower than their FLOPs: prefill cost the model lacks",
    "frontend_latency_s": "TTFT needs more than 0.5 s before the scheduler sees a request: a queue in front of "
                          "the engine (tokenising many prompts at once, the API server) or prefill time the "
                          "model does not have",
    "compute_efficiency": "faster than the device's peak FLOP/s: the model counts FLOPs the run did not do "
                          "(wrong active parameters, attention that was cheaper)",
    "memory_efficiency": "faster than reading the weights at the device's peak bandwidth: the run read fewer "
                         "bytes than the model counts (quantised weights, MoE experts not touched, a wrong spec) "
                         "or steps overlapped",
    "comm_efficiency": "faster than the interconnect allows: communication overlapped with compute, or the "
                       "model counts traffic that did not happen",
    "attention_efficiency": "attention kernels at the device's peak FLOP/s: the model counts attention the run did "
                            "not do (a sliding window or sparse attention missing from the spec)",
    "frontend_per_request_s": "more than 50 ms of API-server time per request of a burst: a wait before the "
                              "first tokens of a burst that the front end's CPU does not explain",
    "cpu_overhead_s": "more than 0.1 s of CPU work before each step on an engine that overlaps it with the "
                      "GPU: a CPU cost the model lacks (a saturated API server, per-request output processing)",
}
AT_LOWER = {
    "compute_efficiency": "at 1 % of peak FLOP/s: steps far slower than their arithmetic, a cost the model lacks",
    "memory_efficiency": "at 5 % of peak bandwidth: steps far slower than their memory traffic, a cost the model lacks",
    "comm_efficiency": "at 2 % of the link: a communication cost the model does not have",
    "attention_efficiency": "attention kernels at 1 % of peak FLOP/s: a cost of long prompts the model lacks "
                            "(KV-pool limits, preemption, a slower attention path)",
}


@dataclass
class FitCheck:
    table: pd.DataFrame  # training rows: row_id, metric, measured, fitted, ape_pct
    at_bounds: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def at_bounds(fitter: StepTimeFit, rel: float = 0.01) -> list[str]:
    """Coefficients within `rel` of the width of their range from a bound that means something
    (zero for an additive cost, or the smallest overhead, is the term being absent: not a bound)."""
    out = []
    c = fitter.coeffs_.as_dict()
    for name in fitter._names():
        v = c[name]
        if name in _LOG:
            lo, hi = (math.log(b) for b in _LOG[name])
            x = math.log(v)
        else:
            lo, hi = _LIN[name]
            x = v
        if x >= hi - rel * (hi - lo):
            out.append(f"{name} = {v:.4g} is at its upper bound: {AT_UPPER[name]}")
        elif name in AT_LOWER and x <= lo + rel * (hi - lo):
            out.append(f"{name} = {v:.4g} is at its lower bound: {AT_LOWER[name]}")
    return out


def check_fit(fitter: StepTimeFit, train: list, max_ape: float = MAX_TRAIN_APE,
              pred: pd.DataFrame | None = None) -> FitCheck:
    """`pred`: the fitter's predictions of (at least) these rows, if already simulated."""
    ids = {c.row_id for c in train}
    pred = fitter.predict(train) if pred is None else pred[pred["row_id"].isin(ids)]
    table = pred[pred["metric"].isin(fitter.metrics)].rename(columns={"predicted": "fitted"}).reset_index(drop=True)
    check = FitCheck(table=table, at_bounds=at_bounds(fitter), warnings=fitter.warnings())
    bad = table[table["ape_pct"] > max_ape]
    for _, r in bad.iterrows():
        check.failures.append(f"training row {r.row_id}: {r.metric} fitted {r.fitted:.4g} against {r.measured:.4g} "
                              f"measured ({r.ape_pct:.0f} % off, more than {max_ape:g} %)")
    check.failures += check.at_bounds
    return check


def format_check(check: FitCheck) -> str:
    """Measured against fitted for every training row and metric, then the verdict."""
    t = check.table
    lines = ["Training rows, re-simulated with the fitted coefficients:",
             f"{'row':<32} {'metric':<20} {'measured':>12} {'fitted':>12} {'error %':>8}"]
    for _, r in t.iterrows():
        lines.append(f"{str(r.row_id)[:32]:<32} {r.metric:<20} {r.measured:>12.4g} {r.fitted:>12.4g} "
                     f"{(r.fitted - r.measured) / r.measured * 100:>+8.1f}")
    per_metric = t.groupby("metric")["ape_pct"].agg(["median", "max"])
    lines.append("per metric (absolute error %): " + "; ".join(
        f"{m} median {v['median']:.1f}, max {v['max']:.1f}" for m, v in per_metric.iterrows()))
    for w in check.warnings:
        lines.append(f"WARNING: {w}")
    for f in check.failures:
        lines.append(f"POOR FIT: {f}")
    return "\n".join(lines)


def identifiability_markdown(fitter: StepTimeFit) -> list[str]:
    """Which combinations of coefficients the training rows pin down (the fit's Jacobian), and
    how many they leave to the priors: the directions no prediction of these rows depends on."""
    if fitter.jacobian_ is None:
        return []
    names = fitter._names()
    pinned = fitter.pinned_directions()
    lines = ["## What the training rows pin down", "",
             f"{len(pinned)} of {len(names)} directions in coefficient space change the training residuals' RMS by "
             "0.5 % or more for a 10 % move (log for efficiencies and the step overhead, a fraction of the range for "
             "other times); the other "
             f"{len(names) - len(pinned)} are decided by the priors toward typical efficiencies, not by the data.", "",
             "| direction | RMS change per unit move | made of |", "| --- | --- | --- |"]
    for i, p in enumerate(pinned, 1):
        v = p["vector"]
        parts = sorted(zip(names, v), key=lambda nv: -abs(nv[1]))
        made = ", ".join(f"{'+' if x > 0 else '-'}{abs(x):.2f} {n}" for n, x in parts if abs(x) >= 0.2)
        lines.append(f"| {i} | {p['effect']:.3f} | {made} |")
    return lines + [""]


def check_markdown(check: FitCheck) -> list[str]:
    lines = ["## The fit, checked on its own training rows", "",
             "Every training row re-simulated with the fitted coefficients (full simulations).", "",
             "| row | metric | measured | fitted | error % |", "| --- | --- | --- | --- | --- |"]
    for _, r in check.table.iterrows():
        lines.append(f"| {r.row_id} | {r.metric} | {r.measured:.4g} | {r.fitted:.4g} | "
                     f"{(r.fitted - r.measured) / r.measured * 100:+.1f} |")
    lines.append("")
    if check.ok:
        lines.append(f"Every training metric is within {MAX_TRAIN_APE:g} % and no coefficient is on a bound.")
    else:
        lines += ["**Poor fit:**", ""] + [f"- {f}" for f in check.failures]
    if check.warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in check.warnings]
    return lines
