"""Regression checks: a candidate policy against a baseline on a suite of scenarios.

Every scenario runs under both with the same workload seeds, so each seed gives a paired
difference (candidate - baseline, in % of the baseline). Per scenario and metric the mean
difference gets a 95 % Student-t interval over the seeds. The candidate is *worse* on a metric
when the mean difference is beyond the tolerance in the bad direction and the interval excludes
zero: a change smaller than the seeds' own spread is not called a regression.

A policy is one of: an engine scheduler (`vllm-v1`, `vllm-v0`), a user policy class
(`FILE.py:Class` or `module:Class`), or scenario overrides (`engine.max_num_batched_tokens=64`,
several separated by `;`).
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

from .config import ScenarioError, load_scenario
from .runner import simulate
from .schedulers import SCHEDULERS

# metric -> True if higher is better
METRICS = {"mean_ttft_ms": False, "p99_ttft_ms": False, "mean_tpot_ms": False, "p99_itl_ms": False,
           "output_throughput": True}
ROOT = Path(__file__).resolve().parents[1]


def policy_overrides(policy: str) -> list[str]:
    if policy in SCHEDULERS:
        return [f'engine.scheduler="{policy}"']
    if "=" in policy:
        return [p.strip() for p in policy.split(";") if p.strip()]
    if ":" in policy:
        return [f'engine.policy="{policy}"']
    raise ScenarioError(f"policy {policy!r}: expected a scheduler ({', '.join(SCHEDULERS)}), FILE.py:Class, "
                        "module:Class, or KEY=VALUE overrides")


def suite_files(suite: str) -> list[Path]:
    p = Path(suite)
    if not p.is_dir():
        p = ROOT / "scenarios" / "suites" / suite
    files = sorted(f for f in p.glob("*.toml") if not f.name.startswith("_")) if p.is_dir() else []
    if not files:
        known = sorted(d.name for d in (ROOT / "scenarios" / "suites").iterdir() if d.is_dir())
        raise ScenarioError(f"suite {suite!r}: no scenarios found (a directory of TOML files, or one of {known})")
    return files


def _run(job) -> dict:
    path, overrides, seed, side = job
    m = simulate(load_scenario(path, [*overrides, f"workload.seed={seed}"])).bench.metrics
    return {"scenario": Path(path).stem, "seed": seed, "side": side, **{k: m[k] for k in METRICS}}


def compare(baseline: str, candidate: str, suite: str = "standard", seeds: int = 3, tolerance_pct: float = 5.0,
            processes: int | None = None, progress: bool = True) -> pd.DataFrame:
    if seeds < 2:
        raise ScenarioError("--seeds: at least 2, to tell a difference from seed noise")
    files = suite_files(suite)
    sides = {"baseline": policy_overrides(baseline), "candidate": policy_overrides(candidate)}
    for f in files:  # fail on a bad policy before running anything
        for ov in sides.values():
            load_scenario(f, ov)
    jobs = [(str(f), ov, s, side) for f in files for side, ov in sides.items() for s in range(seeds)]
    with ProcessPoolExecutor(processes) as ex:
        rows = list(tqdm(ex.map(_run, jobs), total=len(jobs), desc="compare", disable=not progress, unit="run"))
    runs = pd.DataFrame(rows)
    t = stats.t.ppf(0.975, seeds - 1)
    out = []
    for scen, d in runs.groupby("scenario", sort=False):
        b = d[d.side == "baseline"].set_index("seed")
        c = d[d.side == "candidate"].set_index("seed")
        for m, higher_better in METRICS.items():
            diff = 100 * (c[m] - b[m]) / b[m].where(b[m] != 0, np.nan)
            mean, half = float(diff.mean()), float(t * diff.std(ddof=1) / math.sqrt(seeds))
            if not math.isfinite(half):
                half = 0.0
            bad = -mean if higher_better else mean
            worse = bad > tolerance_pct and abs(mean) > half
            better = -bad > tolerance_pct and abs(mean) > half
            out.append({"scenario": scen, "metric": m, "baseline": float(b[m].mean()), "candidate": float(c[m].mean()),
                        "diff_pct": mean, "ci95_pct": half,
                        "verdict": "WORSE" if worse else "better" if better else "same"})
    return pd.DataFrame(out)


def format_table(df: pd.DataFrame, baseline: str, candidate: str, tolerance_pct: float, seeds: int) -> str:
    lines = [f"baseline:  {baseline}", f"candidate: {candidate}",
             f"{seeds} seeds per scenario; worse = beyond {tolerance_pct:g} % in the bad direction with the 95 % "
             "interval excluding 0", "",
             f"{'scenario':<18} {'metric':<18} {'baseline':>12} {'candidate':>12} {'diff %':>9} {'± 95 %':>8}  verdict"]
    for _, r in df.iterrows():
        lines.append(f"{r.scenario:<18} {r.metric:<18} {r.baseline:>12.2f} {r.candidate:>12.2f} "
                     f"{r.diff_pct:>+9.1f} {r.ci95_pct:>8.1f}  {r.verdict}")
    n = int((df.verdict == "WORSE").sum())
    lines += ["", f"{n} regression(s)" if n else "no regressions"]
    return "\n".join(lines)
