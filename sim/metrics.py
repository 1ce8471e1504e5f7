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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .request import Request, Status

if TYPE_CHECKING:  # the per-request table is built on demand: a run that prints its report never imports pandas
    import pandas as pd
from .tokens import TokenStats

METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def request_columns(requests: list[Request]) -> dict:
    """The per-request table's columns: what the client saw, in seconds. Built column by column
    (no per-request row objects: a million requests stay cheap)."""
    n = len(requests)

    def col(get, dtype=float):
        return np.fromiter(map(get, requests), dtype, n)

    ok = col(lambda r: r.status is Status.FINISHED, bool)
    start = col(lambda r: r.start_s)
    output = col(lambda r: r.output_len, np.int64)
    ttft = np.where(ok, col(lambda r: r.first_token_s) - start, np.nan)
    e2el = np.where(ok, col(lambda r: r.last_token_s) - start, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(ok & (output > 1), (e2el - ttft) / (output - 1), np.nan)
    return {
        "rid": col(lambda r: r.rid, np.int64), "arrival_s": col(lambda r: r.arrival_s), "start_s": start,
        "prompt_len": col(lambda r: r.prompt_len, np.int64), "max_tokens": col(lambda r: r.max_tokens, np.int64),
        "output_len": np.where(ok, output, 0), "success": ok, "ttft_s": ttft, "tpot_s": tpot, "e2el_s": e2el,
        "num_preemptions": col(lambda r: r.num_preemptions, np.int64), "error": [r.error for r in requests],
        "stage": col(lambda r: r.stage, np.int64),
    }


def traffic_lines(res: BenchmarkResult, w) -> list[str]:
    """What the run sent, for the report header. A Poisson/Gamma run says its rate and
    burstiness as vLLM's client does; a replayed trace or a staged run says what was replayed:
    requests, time span and mean rate, per stage."""
    if w.dataset_name not in ("trace", "mooncake") and w.stages is None:
        kind = "Poisson process" if w.burstiness == 1.0 else "Gamma distribution"
        return [f"Traffic request rate: {'inf' if np.isinf(w.request_rate) else w.request_rate}",
                f"Burstiness factor: {w.burstiness} ({kind})",
                f"Maximum request concurrency: {w.max_concurrency}"]
    if w.stages is not None:
        head = f"Traffic: {len(w.stages)} load stages, {w.stage_arrivals} arrivals (inference-perf), " \
               f"{w.stage_interval_s:g} s pause after each"
    else:
        head = f"Traffic: trace {w.trace_path}" + (f", stage {w.trace_stage}" if w.trace_stage is not None else "") \
               + (f", time scale {w.trace_time_scale:g}" if w.trace_time_scale != 1 else "")
    out = [head]
    for k, g in res.requests.groupby("stage"):
        t = g["arrival_s"].to_numpy()
        span = float(t.max() - t.min())
        rate = f"{(len(t) - 1) / span:.3f} req/s" if span > 0 else "all at once"
        want = f", configured {w.stages[k].rate:g} req/s for {w.stages[k].duration:g} s" if w.stages else ""
        label = f"  stage {k}: " if w.stages else "  replayed: "
        out.append(f"{label}{len(t)} requests sent over {span:.1f} s from t = {t.min():.1f} s ({rate}){want}")
    out.append(f"Maximum request concurrency: {w.max_concurrency}")
    return out


def stage_table(res: BenchmarkResult) -> str:
    """Per-stage results of a staged run (inference-perf writes a stage_N file each)."""
    rows = ["stage  requests  failed  mean TTFT (ms)  mean TPOT (ms)  mean E2E (ms)  output tok/s"]
    for k, g in res.requests.groupby("stage"):
        ok = g[g["success"]]
        span = float((g["start_s"] + g["e2el_s"].fillna(0)).max() - g["start_s"].min())
        thr = ok["output_len"].sum() / span if span > 0 else float("nan")
        rows.append(f"{k:>5}  {len(g):>8}  {len(g) - len(ok):>6}  {1000 * ok['ttft_s'].mean():>14.2f}  "
                    f"{1000 * ok['tpot_s'].mean():>14.2f}  {1000 * ok['e2el_s'].mean():>13.2f}  {thr:>12.2f}")
    return "\n".join(rows)


def _pct_label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def peak_rates(requests: list[Request], stats: TokenStats) -> tuple[float, int]:
    """`vllm bench serve`'s peaks over 1-second buckets from the earliest start.

    Each token adds one to the bucket it arrived in; each request adds one to every bucket
    from its start to its end, inclusive. Successful requests only.
    """
    ok = [r for r in requests if r.status is Status.FINISHED and r.output_len]
    if not ok:
        return 0.0, 0
    start = np.array([r.start_s for r in ok])
    end = np.array([r.last_token_s for r in ok])
    t0 = start.min()
    # only the buckets something happens in: a run may span more seconds than memory has floats
    pos = np.concatenate([(start - t0).astype(np.int64), (end - t0).astype(np.int64) + 1])
    delta = np.concatenate([np.ones(len(ok), dtype=np.int64), -np.ones(len(ok), dtype=np.int64)])
    at, inv = np.unique(pos, return_inverse=True)
    conc = np.cumsum(np.bincount(inv, weights=delta, minlength=len(at)))
    return stats.peak_tokens_per_bucket(t0), int(conc.max())


@dataclass
class BenchmarkResult:
    """The numbers vLLM's benchmark prints and saves, plus the per-request table."""

    metrics: dict
    columns: dict  # `request_columns`
    percentile_metrics: list[str]
    percentiles: list[float]
    goodput: dict[str, float]
    _table: object = field(default=None, repr=False, compare=False)

    @property
    def requests(self) -> pd.DataFrame:
        """One row per request (`request_columns`) as a table, built on first use."""
        if self._table is None:
            import pandas as pd

            self._table = pd.DataFrame(self.columns)
        return self._table


def calculate_metrics(
    requests: list[Request],
    duration_s: float,
    percentile_metrics: list[str],
    percentiles: list[float],
    goodput: dict[str, float] | None = None,
    stats: TokenStats | None = None,
) -> BenchmarkResult:
    """`stats`: the client's token aggregates (sim.tokens); built from the requests' kept
    token times when not given."""
    if stats is None:
        stats = TokenStats.from_requests(requests)
    cols = request_columns(requests)
    ok = cols["success"]
    completed = int(ok.sum())
    total_input = int(cols["prompt_len"][ok].sum())
    total_output = int(cols["output_len"][ok].sum())
    tpot = cols["tpot_s"][ok]
    series_ms = {
        "ttft": cols["ttft_s"][ok] * 1000,
        "tpot": tpot[~np.isnan(tpot)] * 1000,
        "e2el": cols["e2el_s"][ok] * 1000,
    }
    m: dict = {
        "duration": duration_s,
        "completed": completed,
        "failed": len(ok) - completed,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": completed / duration_s if duration_s > 0 else 0.0,
    }
    if goodput:
        good = np.ones(completed, dtype=bool)
        for key, slo_ms in goodput.items():
            vals = cols[f"{key}_s"][ok] * 1000
            good &= ~(vals > slo_ms)  # NaN TPOT (one-token requests) meets any TPOT SLO
        m["request_goodput"] = int(good.sum()) / duration_s if duration_s > 0 else 0.0
    m["output_throughput"] = total_output / duration_s if duration_s > 0 else 0.0
    m["total_token_throughput"] = (total_input + total_output) / duration_s if duration_s > 0 else 0.0
    m["max_output_tokens_per_s"], m["max_concurrent_requests"] = peak_rates(requests, stats)
    # SGLang's extras: input throughput, concurrency = sum of E2E over duration, p95/max ITL
    m["input_throughput"] = total_input / duration_s if duration_s > 0 else 0.0
    m["concurrency"] = float(cols["e2el_s"][ok].sum()) / duration_s if duration_s > 0 else 0.0
    # ITL: pooled over every gap of every successful stream, from the weighted aggregate
    itl = stats.itl_summary_ms(sorted(set(percentiles) | {95.0}))
    has = itl["count"] > 0
    m["p95_itl_ms"] = itl[95.0] if has else 0.0
    m["max_itl_ms"] = itl["max"] if has else 0.0
    for stat in ("mean", "median", "std"):
        m[f"{stat}_itl_ms"] = itl[stat] if has else 0.0
    for p in percentiles:
        m[f"p{_pct_label(p)}_itl_ms"] = itl[p] if has else 0.0
    for name in ("ttft", "tpot", "e2el"):
        x = series_ms[name]
        has = len(x) > 0
        m[f"mean_{name}_ms"] = float(np.mean(x)) if has else 0.0
        m[f"median_{name}_ms"] = float(np.median(x)) if has else 0.0
        m[f"std_{name}_ms"] = float(np.std(x)) if has else 0.0
        for p in percentiles:
            m[f"p{_pct_label(p)}_{name}_ms"] = float(np.percentile(x, p)) if has else 0.0
    return BenchmarkResult(m, cols, percentile_metrics, percentiles, goodput or {})


def format_report(
    res: BenchmarkResult,
    client: str = "vllm",
    max_concurrency: int | None = None,
    request_rate: float = float("inf"),
) -> str:
    """The `Serving Benchmark Result` block, line for line.

    `vllm-legacy` prints what benchmarks/benchmark_serving.py (v0.7-v0.8) prints; `vllm`
    prints what `vllm bench serve` prints (failed count, configured rate, peaks).
    """
    if client == "sglang":
        return format_sglang_report(res, max_concurrency, request_rate)
    m = res.metrics
    new = client != "vllm-legacy"
    row = "{:<40} {:<10}".format
    frow = "{:<40} {:<10.2f}".format
    out = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    out.append(row("Successful requests:", m["completed"]))
    if new:
        out.append(row("Failed requests:", m["failed"]))
        if max_concurrency is not None:
            out.append(row("Maximum request concurrency:", max_concurrency))
        if request_rate != float("inf"):
            out.append(frow("Request rate configured (RPS):", request_rate))
    out.append(frow("Benchmark duration (s):", m["duration"]))
    out.append(row("Total input tokens:", m["total_input_tokens"]))
    out.append(row("Total generated tokens:", m["total_output_tokens"]))
    out.append(frow("Request throughput (req/s):", m["request_throughput"]))
    if "request_goodput" in m:
        out.append(frow("Request goodput (req/s):", m["request_goodput"]))
    out.append(frow("Output token throughput (tok/s):", m["output_throughput"]))
    if new:
        out.append(frow("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"]))
        out.append(frow("Peak concurrent requests:", m["max_concurrent_requests"]))
        out.append(frow("Total token throughput (tok/s):", m["total_token_throughput"]))
    else:
        out.append(frow("Total Token throughput (tok/s):", m["total_token_throughput"]))
    for name in res.percentile_metrics:
        title, short = METRIC_TITLES[name]
        out.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        out.append(frow(f"Mean {short} (ms):", m[f"mean_{name}_ms"]))
        out.append(frow(f"Median {short} (ms):", m[f"median_{name}_ms"]))
        for p in res.percentiles:
            lab = _pct_label(p)
            out.append(frow(f"P{lab} {short} (ms):", m[f"p{lab}_{name}_ms"]))
    out.append("=" * 50)
    return "\n".join(out)


def format_sglang_report(res: BenchmarkResult, max_concurrency: int | None, request_rate: float) -> str:
    """`python -m sglang.bench_serving`'s block (≈v0.4.5), its fixed metrics and its spelling."""
    m = res.metrics
    row = "{:<40} {:<10}".format
    frow = "{:<40} {:<10.2f}".format
    out = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
           row("Backend:", "sglang"),
           row("Traffic request rate:", "inf" if request_rate == float("inf") else request_rate),
           row("Max reqeuest concurrency:", max_concurrency if max_concurrency else "not set"),
           row("Successful requests:", m["completed"]),
           frow("Benchmark duration (s):", m["duration"]),
           row("Total input tokens:", m["total_input_tokens"]),
           row("Total generated tokens:", m["total_output_tokens"]),
           row("Total generated tokens (retokenized):", m["total_output_tokens"]),
           frow("Request throughput (req/s):", m["request_throughput"]),
           frow("Input token throughput (tok/s):", m["input_throughput"]),
           frow("Output token throughput (tok/s):", m["output_throughput"]),
           frow("Total token throughput (tok/s):", m["total_token_throughput"]),
           frow("Concurrency:", m["concurrency"]),
           "{s:{c}^{n}}".format(s="End-to-End Latency", n=50, c="-"),
           frow("Mean E2E Latency (ms):", m["mean_e2el_ms"]),
           frow("Median E2E Latency (ms):", m["median_e2el_ms"]),
           "{s:{c}^{n}}".format(s="Time to First Token", n=50, c="-"),
           frow("Mean TTFT (ms):", m["mean_ttft_ms"]),
           frow("Median TTFT (ms):", m["median_ttft_ms"]),
           frow("P99 TTFT (ms):", m["p99_ttft_ms"]),
           "{s:{c}^{n}}".format(s="Inter-Token Latency", n=50, c="-"),
           frow("Mean ITL (ms):", m["mean_itl_ms"]),
           frow("Median ITL (ms):", m["median_itl_ms"]),
           frow("P95 ITL (ms):", m["p95_itl_ms"]),
           frow("P99 ITL (ms):", m["p99_itl_ms"]),
           frow("Max ITL (ms):", m["max_itl_ms"]),
           "=" * 50]
    return "\n".join(out)


def sglang_result_json(res: BenchmarkResult, header: dict) -> dict:
    """One line of `sglang.bench_serving --output-file` (JSONL): its key names, e2e_latency spelling."""
    m = res.metrics
    out = dict(header)
    out.update(duration=m["duration"], completed=m["completed"], total_input_tokens=m["total_input_tokens"],
               total_output_tokens=m["total_output_tokens"],
               total_output_tokens_retokenized=m["total_output_tokens"],
               request_throughput=m["request_throughput"], input_throughput=m["input_throughput"],
               output_throughput=m["output_throughput"])
    for stat in ("mean", "median", "std", "p99"):
        out[f"{stat}_e2e_latency_ms"] = m[f"{stat}_e2el_ms"]
    for name in ("ttft", "tpot"):
        for stat in ("mean", "median", "std", "p99"):
            out[f"{stat}_{name}_ms"] = m[f"{stat}_{name}_ms"]
    for stat in ("mean", "median", "std", "p95", "p99"):
        out[f"{stat}_itl_ms"] = m[f"{stat}_itl_ms"]
    out["concurrency"] = m["concurrency"]
    out["accept_length"] = None
    return out


def result_json(
    res: BenchmarkResult,
    client: str,
    header: dict,
    requests: list[Request] | None = None,
) -> dict:
    """The `--save-result` JSON with the client's key names and order.

    `header` holds date, backend, model_id, tokenizer_id, num_prompts, request_rate,
    burstiness and max_concurrency. Only the selected percentile metrics are written, as
    in vLLM. With `requests`, the per-request lists of `--save-detailed` are added.
    """
    m = res.metrics
    new = client != "vllm-legacy"
    out = dict(header)
    keys = ["duration", "completed"] + (["failed"] if new else []) + [
        "total_input_tokens", "total_output_tokens", "request_throughput"]
    out.update({k: m[k] for k in keys})
    # benchmark_serving.py v0.7-v0.8 really wrote this key with a trailing colon
    out["request_goodput" if new else "request_goodput:"] = m.get("request_goodput")
    out["output_throughput"] = m["output_throughput"]
    out["total_token_throughput"] = m["total_token_throughput"]
    if new:
        out["max_output_tokens_per_s"] = m["max_output_tokens_per_s"]
        out["max_concurrent_requests"] = m["max_concurrent_requests"]
    if requests is not None:
        cols = res.columns
        ok = cols["success"]
        out["input_lens"] = cols["prompt_len"].tolist()
        out["output_lens"] = cols["output_len"].tolist()
        out["ttfts"] = [float(x) if s else 0.0 for x, s in zip(cols["ttft_s"], ok)]
        out["itls"] = [np.diff(r.token_times).tolist() if r.status is Status.FINISHED else [] for r in requests]
        out["errors"] = list(cols["error"])
        if new:
            out["start_times"] = cols["start_s"].tolist()
    for name in res.percentile_metrics:
        for stat in ["mean", "median", "std"] + [f"p{_pct_label(p)}" for p in res.percentiles]:
            out[f"{stat}_{name}_ms"] = m[f"{stat}_{name}_ms"]
    return out
