"""What-if sweeps: a scenario run over the cross product of a grid, several seeds per point.

Each point is the base scenario with `--set`-style overrides; each (point, seed) is one
simulation, run on local processes or on a Dask distributed cluster. The summary has, per
point and metric, the mean over seeds and the half-width of its 95 % confidence interval
(Student's t over the seeds), so a difference between points can be told from seed noise.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

from .config import ScenarioError, load_scenario
from .runner import simulate

METRICS = ["mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
           "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "request_throughput",
           "output_throughput", "total_token_throughput", "completed", "failed", "duration"]


@dataclass(frozen=True)
class Job:
    scenario: str
    point: int
    overrides: tuple[str, ...]
    seed: int


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    """`key=v1,v2,...` per axis; the key is a scenario path such as engine.max_num_batched_tokens."""
    axes = []
    for g in grid:
        key, sep, values = g.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ScenarioError(f"--grid {g!r}: expected KEY=V1,V2,... (e.g. engine.max_num_batched_tokens=512,2048)")
        if key in (k for k, _ in axes):
            raise ScenarioError(f"--grid: axis {key!r} given twice")
        axes.append((key.strip(), vals))
    return axes


def points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def slo_overrides(slos: list[str]) -> list[str]:
    """`--slo ttft_ms=2000` -> vLLM's goodput SLO (report.goodput.ttft=2000)."""
    out = []
    for s in slos:
        key, sep, ms = s.partition("=")
        name = key.strip().removesuffix("_ms")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ScenarioError(f"--slo {s!r}: expected ttft_ms=MS, tpot_ms=MS or e2el_ms=MS")
        out.append(f"report.goodput.{name}={float(ms)}")
    return out


def run_job(job: Job) -> dict:
    sc = load_scenario(job.scenario, [*job.overrides, f"workload.seed={job.seed}"])
    m = simulate(sc).bench.metrics
    row = {"point": job.point, "seed": job.seed}
    row.update({k: m[k] for k in METRICS if k in m})
    if "request_goodput" in m:
        row["request_goodput"] = m["request_goodput"]
    return row


def _run_local(jobs, processes, progress):
    with ProcessPoolExecutor(processes) as ex:
        return list(tqdm(ex.map(run_job, jobs, chunksize=1), total=len(jobs), desc="sweep", disable=not progress,
                         unit="run"))


def _run_dask(jobs, address, progress):
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - dask is a dependency
        raise ScenarioError("--dask-scheduler needs dask.distributed (pip install 'dask[distributed]')") from exc
    client = address if not isinstance(address, str) else Client(address)
    try:
        futures = client.map(run_job, jobs, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        out = [None] * len(jobs)
        for fut in tqdm(as_completed(futures), total=len(jobs), desc="sweep (dask)", disable=not progress, unit="run"):
            out[index[fut.key]] = fut.result()
        return out
    finally:
        if isinstance(address, str):
            client.close()


def sweep(scenario: str, grid: list[str], seeds: int = 3, slos: list[str] | None = None, base_set: list[str] | None = None,
          processes: int | None = None, dask=None, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the grid; returns (one row per run, one row per point with means and 95 % CI half-widths).
    `dask`: a scheduler address or a distributed.Client (tests pass a LocalCluster's client)."""
    axes = parse_grid(grid)
    pts = points(axes)
    extra = ['report.percentile_metrics="ttft,tpot,itl,e2el"', *(base_set or []), *slo_overrides(slos or [])]
    for p in pts:  # fail on a bad value before spending any time
        load_scenario(scenario, [*extra, *(f"{k}={v}" for k, v in p.items())])
    jobs = [Job(str(scenario), i, tuple([*extra, *(f"{k}={v}" for k, v in p.items())]), s)
            for i, p in enumerate(pts) for s in range(seeds)]
    rows = _run_dask(jobs, dask, progress) if dask is not None else _run_local(jobs, processes, progress)
    runs = pd.DataFrame(rows)
    for key, _ in axes:
        runs.insert(1, key, [pts[i][key] for i in runs.point])
    return runs, summarize(runs, [k for k, _ in axes], seeds)


def summarize(runs: pd.DataFrame, keys: list[str], seeds: int) -> pd.DataFrame:
    metrics = [c for c in runs.columns if c not in ("point", "seed", *keys)]
    t = stats.t.ppf(0.975, seeds - 1) if seeds > 1 else math.nan
    g = runs.groupby("point", sort=True)
    out = g[keys].first()
    for m in metrics:
        out[m] = g[m].mean()
        out[f"{m}_ci95"] = t * g[m].std(ddof=1) / math.sqrt(seeds) if seeds > 1 else np.nan
    out.insert(len(keys), "seeds", g.size())
    return out.reset_index()


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points no other point beats on both x and y (both: lower is better)."""
    d = df.sort_values([x, y])
    keep, best = [], math.inf
    for i, r in d.iterrows():
        if r[y] < best:
            keep.append(i)
            best = r[y]
    return d.loc[keep]


def write_outputs(runs: pd.DataFrame, summary: pd.DataFrame, keys: list[str], out_dir: Path,
                  slos: list[str] | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "runs.csv", out_dir / "summary.csv", out_dir / "summary.parquet"]
    runs.to_csv(files[0], index=False)
    summary.to_csv(files[1], index=False)
    summary.to_parquet(files[2], index=False)
    label = summary[keys].astype(str).agg(", ".join, axis=1)

    fig, ax = plt.subplots(figsize=(7, 5))  # the TTFT-ITL trade-off across the grid
    ax.errorbar(summary.mean_itl_ms, summary.mean_ttft_ms, xerr=summary.get("mean_itl_ms_ci95"),
                yerr=summary.get("mean_ttft_ms_ci95"), fmt="o")
    for x, y, s in zip(summary.mean_itl_ms, summary.mean_ttft_ms, label):
        ax.annotate(s, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(summary, "mean_itl_ms", "mean_ttft_ms")
    ax.plot(front.mean_itl_ms, front.mean_ttft_ms, "r--", lw=1, label="Pareto front")
    ax.set_xlabel("mean ITL (ms)")
    ax.set_ylabel("mean TTFT (ms)")
    ax.set_title(f"TTFT vs ITL over {', '.join(keys)} (95 % CI over seeds)")
    ax.legend()
    fig.tight_layout()
    files.append(out_dir / "ttft_vs_itl.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))  # latency against throughput, one curve per other setting
    load = keys[-1]
    others = keys[:-1]
    groups = summary.groupby(others) if others else [((), summary)]
    for name, d in groups:
        ax.errorbar(d.output_throughput, d.mean_e2el_ms, yerr=d.get("mean_e2el_ms_ci95"), marker="o",
                    label=", ".join(f"{k}={v}" for k, v in zip(others, name if isinstance(name, tuple) else (name,)))
                    or "all")
    ax.set_xlabel("output throughput (tok/s)")
    ax.set_ylabel("mean E2E latency (ms)")
    ax.set_title(f"latency vs throughput along {load}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out_dir / "latency_vs_throughput.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    if slos and "request_goodput" in summary:
        fig, ax = plt.subplots(figsize=(7, 5))
        order = summary.sort_values("request_goodput", ascending=False)
        ax.barh(range(len(order)), order.request_goodput, xerr=order.get("request_goodput_ci95"))
        ax.set_yticks(range(len(order)), label[order.index], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("goodput (requests/s meeting " + ", ".join(slos) + ")")
        fig.tight_layout()
        files.append(out_dir / "goodput.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files
