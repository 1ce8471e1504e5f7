"""Benchmark metrics with vLLM's definitions (`calculate_metrics` in the benchmark client).

- TTFT: first token's arrival at the client minus the request's start (after the permit).
- ITL: every gap between consecutive tokens of a request, pooled over requests.
- TPOT: (E2E - TTFT) / (output tokens - 1), only for requests with more than one token.
- E2E latency: last token minus start.
- Totals and throughputs count completed requests only; failed ones add 0 output tokens.
- Duration: from the start of dispatch to the last request's end.
- Percentiles: numpy's default (linear interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .request import Request, Status

METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def request_table(requests: list[Request]) -> pd.DataFrame:
    """One row per request: what the client saw, in seconds."""
    rows = []
    for r in requests:
        ok = r.status is Status.FINISHED
        first = r.token_times[0] if r.token_times else np.nan
        last = r.token_times[-1] if r.token_times else np.nan
        ttft = first - r.start_s if ok else np.nan
        e2el = last - r.start_s if ok else np.nan
        tpot = (e2el - ttft) / (r.output_len - 1) if ok and r.output_len > 1 else np.nan
        rows.append(
            (r.rid, r.arrival_s, r.start_s, r.prompt_len, r.max_tokens, r.output_len if ok else 0, ok,
             ttft, tpot, e2el, r.num_preemptions, r.error)
        )
    return pd.DataFrame(
        rows,
        columns=["rid", "arrival_s", "start_s", "prompt_len", "max_tokens", "output_len", "success",
                 "ttft_s", "tpot_s", "e2el_s", "num_preemptions", "error"],
    )


def pooled_itls_s(requests: list[Request]) -> np.ndarray:
    gaps = [np.diff(r.token_times) for r in requests if r.status is Status.FINISHED and len(r.token_times) > 1]
    return np.concatenate(gaps) if gaps else np.empty(0)


def _pct_label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


@dataclass
class BenchmarkResult:
    """The numbers vLLM's benchmark prints and saves, plus the per-request table."""

    metrics: dict
    requests: pd.DataFrame
    percentile_metrics: list[str]
    percentiles: list[float]
    goodput: dict[str, float]


def calculate_metrics(
    requests: list[Request],
    duration_s: float,
    percentile_metrics: list[str],
    percentiles: list[float],
    goodput: dict[str, float] | None = None,
) -> BenchmarkResult:
    df = request_table(requests)
    ok = df[df["success"]]
    completed = len(ok)
    total_input = int(ok["prompt_len"].sum())
    total_output = int(ok["output_len"].sum())
    series_ms = {
        "ttft": ok["ttft_s"].to_numpy() * 1000,
        "tpot": ok["tpot_s"].dropna().to_numpy() * 1000,
        "itl": pooled_itls_s(requests) * 1000,
        "e2el": ok["e2el_s"].to_numpy() * 1000,
    }
    m: dict = {
        "duration": duration_s,
        "completed": completed,
        "failed": len(df) - completed,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": completed / duration_s if duration_s > 0 else 0.0,
    }
    if goodput:
        good = np.ones(completed, dtype=bool)
        for key, slo_ms in goodput.items():
            vals = ok[f"{key}_s"].to_numpy() * 1000
            good &= ~(vals > slo_ms)  # NaN TPOT (one-token requests) meets any TPOT SLO
        m["request_goodput"] = int(good.sum()) / duration_s if duration_s > 0 else 0.0
    m["output_throughput"] = total_output / duration_s if duration_s > 0 else 0.0
    m["total_token_throughput"] = (total_input + total_output) / duration_s if duration_s > 0 else 0.0
    for name in ("ttft", "tpot", "itl", "e2el"):
        x = series_ms[name]
        has = len(x) > 0
        m[f"mean_{name}_ms"] = float(np.mean(x)) if has else 0.0
        m[f"median_{name}_ms"] = float(np.median(x)) if has else 0.0
        m[f"std_{name}_ms"] = float(np.std(x)) if has else 0.0
        for p in percentiles:
            m[f"p{_pct_label(p)}_{name}_ms"] = float(np.percentile(x, p)) if has else 0.0
    return BenchmarkResult(m, df, percentile_metrics, percentiles, goodput or {})


def format_report(res: BenchmarkResult, max_concurrency: int | None = None) -> str:
    """vLLM's `Serving Benchmark Result` block, line for line."""
    m = res.metrics
    out = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    out.append("{:<40} {:<10}".format("Successful requests:", m["completed"]))
    out.append("{:<40} {:<10}".format("Failed requests:", m["failed"]))
    if max_concurrency is not None:
        out.append("{:<40} {:<10}".format("Maximum request concurrency:", max_concurrency))
    out.append("{:<40} {:<10.2f}".format("Benchmark duration (s):", m["duration"]))
    out.append("{:<40} {:<10}".format("Total input tokens:", m["total_input_tokens"]))
    out.append("{:<40} {:<10}".format("Total generated tokens:", m["total_output_tokens"]))
    out.append("{:<40} {:<10.2f}".format("Request throughput (req/s):", m["request_throughput"]))
    if "request_goodput" in m:
        out.append("{:<40} {:<10.2f}".format("Request goodput (req/s):", m["request_goodput"]))
    out.append("{:<40} {:<10.2f}".format("Output token throughput (tok/s):", m["output_throughput"]))
    out.append("{:<40} {:<10.2f}".format("Total Token throughput (tok/s):", m["total_token_throughput"]))
    for name in res.percentile_metrics:
        title, short = METRIC_TITLES[name]
        out.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        out.append("{:<40} {:<10.2f}".format(f"Mean {short} (ms):", m[f"mean_{name}_ms"]))
        out.append("{:<40} {:<10.2f}".format(f"Median {short} (ms):", m[f"median_{name}_ms"]))
        for p in res.percentiles:
            lab = _pct_label(p)
            out.append("{:<40} {:<10.2f}".format(f"P{lab} {short} (ms):", m[f"p{lab}_{name}_ms"]))
    out.append("=" * 50)
    return "\n".join(out)
