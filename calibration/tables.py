"""Measured benchmark results -> one tidy pandas DataFrame, one row per benchmark run.

Columns follow the tidy CSV format of calibration/data/ (latencies in ms, throughputs per
second, `duration_s` in seconds). Sources read:

- the tidy CSV itself (`load_tidy_csv`);
- `vllm bench serve --save-result` / `benchmark_serving.py` JSON files (`load_vllm_json`);
- `python -m sglang.bench_serving` JSONL, one run per line (`load_sglang_jsonl`);
- inference-perf's summary and stage files (`load_inference_perf_summary`) and AIPerf's
  `profile_export_aiperf.json` (`load_aiperf_summary`);
- per-request results, any format `sim.traces` reads (servesim's or a tidy CSV, vLLM
  `--save-detailed`, inference-perf's per-request records, AIPerf's `profile_export.jsonl`):
  one row per load stage, which replays its own requests (`load_per_request`). A directory
  of AIPerf artifact directories (one per run, as `--artifact-dir` writes them) is one table.

`check_table` refuses what cannot be a measurement (a missing column, text where a
number belongs, a negative latency, a tail below its median) naming the row and column.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

LATENCY_COLUMNS = [
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2e_ms", "median_e2e_ms", "p99_e2e_ms",
]
RATE_COLUMNS = ["request_throughput", "input_throughput", "output_throughput", "total_token_throughput"]
COUNT_COLUMNS = ["successful_requests", "num_prompts", "total_input_tokens", "total_output_tokens"]
METRIC_COLUMNS = LATENCY_COLUMNS + RATE_COLUMNS + ["duration_s"]


class TableError(ValueError):
    pass


def check_table(df: pd.DataFrame, source: str, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Validate and coerce a measured table; errors name the row (1-based, as in the file) and column."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise TableError(f"{source}: missing column(s) {missing}")
    if not any(c in df.columns for c in METRIC_COLUMNS):
        raise TableError(f"{source}: no metric column (expected some of {METRIC_COLUMNS[:4]}, ...)")
    df = df.copy()
    for col in [c for c in METRIC_COLUMNS + COUNT_COLUMNS if c in df.columns]:
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() & df[col].notna() & (df[col].astype(str).str.strip() != "")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise TableError(
                f"{source}: row {i + 1}, column {col}: {df[col].iloc[i]!r} is not a number "
                f"({'milliseconds' if col.endswith('_ms') else 'a plain number'} expected, no units in the cell)"
            )
        neg = num < 0
        if neg.any():
            i = int(np.flatnonzero(neg.to_numpy())[0])
            raise TableError(f"{source}: row {i + 1}, column {col}: negative value {num.iloc[i]} is not a measurement")
        df[col] = num
    for metric in ("ttft", "tpot", "itl", "e2e"):
        med, p99 = f"median_{metric}_ms", f"p99_{metric}_ms"
        if med in df.columns and p99 in df.columns:
            below = df[p99] < df[med] * (1 - 1e-6)
            if below.any():
                i = int(np.flatnonzero(below.to_numpy())[0])
                raise TableError(f"{source}: row {i + 1}, column {p99}: p99 {df[p99].iloc[i]} is below the median "
                                 f"{df[med].iloc[i]} (mixed units?)")
    if "mean_tpot_ms" in df.columns and "mean_e2e_ms" in df.columns:
        over = df["mean_tpot_ms"] > df["mean_e2e_ms"]
        if over.any():
            i = int(np.flatnonzero(over.to_numpy())[0])
            raise TableError(f"{source}: row {i + 1}, column mean_tpot_ms: a token takes longer than the whole request "
                             f"({df['mean_tpot_ms'].iloc[i]} > mean_e2e_ms {df['mean_e2e_ms'].iloc[i]}; mixed units?)")
    return df


def load_tidy_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    df = pd.read_csv(path)
    return check_table(df, path.name)


_VLLM_KEYS = {
    "completed": "successful_requests", "duration": "duration_s", "num_prompts": "num_prompts",
    "request_rate": "request_rate", "max_concurrency": "max_concurrency", "burstiness": "burstiness",
    "total_input_tokens": "total_input_tokens", "total_output_tokens": "total_output_tokens",
    "request_throughput": "request_throughput", "output_throughput": "output_throughput",
    "total_token_throughput": "total_token_throughput",
}


def _metric_keys(d: dict, e2e_name: str) -> dict:
    out = {}
    for stat in ("mean", "median", "p99"):
        for m in ("ttft", "tpot", "itl"):
            k = f"{stat}_{m}_ms"
            if k in d:
                out[k] = d[k]
        k = f"{stat}_{e2e_name}_ms"
        if k in d:
            out[f"{stat}_e2e_ms"] = d[k]
    return out


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TableError(f"{path.name}: not JSON ({exc})") from None


def load_vllm_json(paths: list[str | Path]) -> pd.DataFrame:
    """One row per `--save-result` JSON file; `run_id` is the file name without suffix."""
    rows = []
    for p in map(Path, paths):
        d = _json(p)
        if "duration" not in d or "completed" not in d:
            raise TableError(f"{p.name}: not a vLLM benchmark result (no 'duration'/'completed')")
        row = {"run_id": p.stem, "engine": "vllm", "source": p.name}
        row.update({v: d[k] for k, v in _VLLM_KEYS.items() if k in d})
        row.update(_metric_keys(d, "e2el"))
        if row.get("request_rate") == "inf":
            row["request_rate"] = float("inf")
        rows.append(row)
    return check_table(pd.DataFrame(rows), ", ".join(Path(p).name for p in paths))


def load_sglang_jsonl(path: str | Path) -> pd.DataFrame:
    """One row per line of `sglang.bench_serving --output-file` (it appends a line per run)."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TableError(f"{path.name}: line {n} is not JSON ({exc})") from None
        row = {"run_id": f"{path.stem}-{n}", "engine": "sglang", "source": path.name}
        row.update({v: d[k] for k, v in _VLLM_KEYS.items() if k in d})
        for k in ("input_throughput",):
            if k in d:
                row[k] = d[k]
        if "random_input_len" in d and d.get("dataset_name") == "random":
            row["input_len"], row["output_len"] = d["random_input_len"], d.get("random_output_len")
        row.update(_metric_keys(d, "e2e_latency"))
        rows.append(row)
    if not rows:
        raise TableError(f"{path.name}: no runs in the file")
    return check_table(pd.DataFrame(rows), path.name)


def load_inference_perf_summary(paths: list[str | Path]) -> pd.DataFrame:
    """inference-perf's aggregate files (`summary_lifecycle_metrics.json`, `stage_N_lifecycle_
    metrics.json`), one row each. Its latencies are in seconds (its docs say ms; the JSON is s);
    a statistic block has `mean`, `median` and `pNN` keys. TTFT, TPOT and ITL exist only for
    streamed runs. Throughputs divide by `benchmark_time_seconds` (first start to last end)."""
    rows = []
    for p in map(Path, paths):
        d = _json(p)
        succ, load = d.get("successes") or {}, d.get("load_summary") or {}
        lat, thr = succ.get("latency") or {}, succ.get("throughput") or {}
        row = {"run_id": p.stem.removesuffix("_lifecycle_metrics"), "source": p.name,
               "num_prompts": load.get("count"), "successful_requests": succ.get("count"),
               "duration_s": d.get("benchmark_time_seconds"), "output_throughput": thr.get("output_tokens_per_sec"),
               "request_throughput": thr.get("requests_per_sec")}
        if "requested_rate" in load:
            row["request_rate"] = load["requested_rate"]
        for key, name in (("time_to_first_token", "ttft"), ("time_per_output_token", "tpot"),
                          ("inter_token_latency", "itl"), ("request_latency", "e2e")):
            stats = lat.get(key) or {}
            for stat, col in (("mean", "mean"), ("median", "median"), ("p99", "p99")):
                if stats.get(stat) is not None:
                    row[f"{col}_{name}_ms"] = 1000 * float(stats[stat])
        rows.append(row)
    return check_table(pd.DataFrame(rows), ", ".join(Path(p).name for p in paths))


def load_aiperf_summary(path: str | Path) -> pd.DataFrame:
    """AIPerf's `profile_export_aiperf.json`: each metric a top-level block `{unit, avg, p50, p99,
    ...}`. AIPerf's `inter_token_latency` is per request (latency - TTFT)/(tokens - 1), vLLM's TPOT;
    the pooled gaps between chunks are `inter_chunk_latency`, vLLM's ITL."""
    path = Path(path)
    d = _json(path)

    def stat(key, s):
        b = d.get(key)
        return None if not isinstance(b, dict) or b.get(s) is None else float(b[s])

    row = {"run_id": path.stem, "source": path.name, "num_prompts": stat("request_count", "avg"),
           "duration_s": stat("benchmark_duration", "avg"), "output_throughput": stat("output_token_throughput", "avg"),
           "request_throughput": stat("request_throughput", "avg")}
    for key, name in (("time_to_first_token", "ttft"), ("inter_token_latency", "tpot"),
                      ("inter_chunk_latency", "itl"), ("request_latency", "e2e")):
        for s, col in (("avg", "mean"), ("p50", "median"), ("p99", "p99")):
            v = stat(key, s)
            if v is not None:
                row[f"{col}_{name}_ms"] = v
    cfg = d.get("input_config") or {}
    phases = [ph for ph in cfg.get("phases") or [] if ph.get("kind", "profiling") == "profiling"]
    load = cfg.get("loadgen") or {}
    rate = phases[0].get("rate") if phases else load.get("request_rate")
    conc = phases[0].get("concurrency") if phases else load.get("concurrency")
    if rate is not None:
        row["request_rate"] = float(rate)
    if conc is not None:
        row["max_concurrency"] = int(conc)
    return check_table(pd.DataFrame([row]), path.name)


def load_per_request(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's per-request results (any file `sim.traces.read_requests` reads) -> (one summary row
    per load stage, the requests).

    Each summary row carries `trace_path` (and `trace_stage` for a staged run), so its scenario
    replays exactly its own requests at their recorded times; stages never overlap (a stage waits
    for the one before it to end), so each is replayed on its own, its first request at time 0.
    Metrics are the clients' (`sim.traces.summarize`) over the stage's requests."""
    from sim.traces import TraceError, read_requests, summarize

    path = Path(path)
    try:
        req = read_requests(path)
    except TraceError as exc:
        raise TableError(str(exc)) from None
    staged = req["stage"].nunique() > 1
    # AIPerf names every run's records profile_export.jsonl: its artifact directory names the run
    name = path.parent.name if path.name == "profile_export.jsonl" and path.parent.name else path.stem
    rows = []
    for k, g in req.groupby("stage"):
        g = g.assign(arrival_s=g["arrival_s"] - g["arrival_s"].min())
        m = summarize(g)
        rows.append({"run_id": f"{name}-stage{k}" if staged else name, "source": path.name,
                     "trace_path": str(path.resolve()), "trace_stage": int(k) if staged else np.nan, **m})
    return check_table(pd.DataFrame(rows), path.name), req


def _is_mooncake(path: Path) -> bool:
    if path.suffix != ".jsonl":
        return False
    first = next((ln for ln in path.read_text().splitlines() if ln.strip()), "")
    try:
        rec = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(rec, dict) and {"timestamp", "input_length"} <= set(rec)


def _is_per_request_json(d) -> bool:
    return (isinstance(d, dict) and "ttfts" in d and "input_lens" in d) or \
        (isinstance(d, list) and (not d or isinstance(d[0], dict) and "start_time" in d[0]))


def load_table(path: str | Path) -> pd.DataFrame:
    """Any of the formats above, by file type; a directory loads every file in it."""
    path = Path(path)
    if path.is_dir():
        # an AIPerf artifact directory is one run: its per-request records are the run; its
        # aggregates (profile_export_aiperf.*), inputs.json and bookkeeping are the same run again
        if (path / "profile_export.jsonl").exists():
            return load_table(path / "profile_export.jsonl")
        # hidden files are tools' bookkeeping (AIPerf's .aiperf_results_ready.json), not results
        files = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".json", ".jsonl") and not p.name.startswith("."))
        # inference-perf writes the per-request records beside its summary and stage files: the
        # records are the run (one row per stage); the aggregate files are the same run again
        if any(p.name.endswith("per_request_lifecycle_metrics.json") for p in files):
            files = [p for p in files if not p.name.endswith("_lifecycle_metrics.json")
                     or p.name.endswith("per_request_lifecycle_metrics.json")]
        # a workload trace beside the results (AIPerf's --input-file) is not a measurement
        files = [p for p in files if not _is_mooncake(p)]
        # AIPerf writes each run into an artifact directory of its own: a directory of them is
        # one table, a row per run
        files += sorted(p for p in path.iterdir() if p.is_dir() and (p / "profile_export.jsonl").exists())
        frames = [load_table(p) for p in files]
        if not frames:
            raise TableError(f"{path}: no .csv, .json or .jsonl files, and no AIPerf artifact directories")
        return pd.concat(frames, ignore_index=True)
    if not path.exists():
        raise TableError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        first = next((ln for ln in path.read_text().splitlines() if ln.strip()), "{}")
        try:
            rec = json.loads(first)
        except json.JSONDecodeError as exc:
            raise TableError(f"{path.name}: line 1 is not JSON ({exc})") from None
        if isinstance(rec, dict) and "metadata" in rec and "metrics" in rec:  # AIPerf per-request records
            return load_per_request(path)[0]
        if isinstance(rec, dict) and {"timestamp", "input_length"} <= set(rec):
            raise TableError(f"{path.name}: a Mooncake trace (arrivals and lengths, no measurements): replay it as "
                             "a workload (dataset_name = \"trace\", trace_path) rather than fit on it")
        return load_sglang_jsonl(path)
    if path.suffix == ".json":
        d = _json(path)
        if _is_per_request_json(d):
            return load_per_request(path)[0]
        if isinstance(d, dict) and "successes" in d and "load_summary" in d:
            return load_inference_perf_summary([path])
        if isinstance(d, dict) and "input_config" in d and ("time_to_first_token" in d or "request_latency" in d):
            return load_aiperf_summary(path)
        return load_vllm_json([path])
    try:
        head = pd.read_csv(path, nrows=1)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise TableError(f"{path.name}: not a CSV table ({'the file is empty' if path.stat().st_size == 0 else exc})") \
            from None
    if "arrival_s" in head.columns:
        return load_per_request(path)[0]
    return load_tidy_csv(path)
