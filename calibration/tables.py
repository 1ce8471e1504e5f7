"""Measured benchmark results -> one tidy pandas DataFrame, one row per benchmark run.

Columns follow the tidy CSV format of calibration/data/ (latencies in ms, throughputs per
second, `duration_s` in seconds). Four sources are read:

- the tidy CSV itself (`load_tidy_csv`);
- `vllm bench serve --save-result` / `benchmark_serving.py` JSON files (`load_vllm_json`);
- `python -m sglang.bench_serving` JSONL, one run per line (`load_sglang_jsonl`);
- per-request results: a CSV with arrival time, input and output length and each request's
  measured TTFT and E2E, or a `--save-detailed` vLLM JSON (`load_per_request`), reduced to
  means and tail percentiles.

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


def load_vllm_json(paths: list[str | Path]) -> pd.DataFrame:
    """One row per `--save-result` JSON file; `run_id` is the file name without suffix."""
    rows = []
    for p in map(Path, paths):
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise TableError(f"{p.name}: not JSON ({exc})") from None
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


def load_per_request(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-request results -> (one summary row, the requests).

    CSV columns: `arrival_s, input_len, output_len, ttft_ms, e2e_ms` (one request each), or
    a vLLM `--save-detailed` JSON (`input_lens`, `output_lens`, `ttfts`, `itls`, and
    `start_times` when present). The requests table can be replayed as a trace workload.
    """
    path = Path(path)
    if path.suffix == ".json":
        d = json.loads(path.read_text())
        need = ["input_lens", "output_lens", "ttfts", "itls"]
        miss = [k for k in need if k not in d]
        if miss:
            raise TableError(f"{path.name}: not a --save-detailed result (missing {miss})")
        ttft = np.asarray(d["ttfts"], dtype=float) * 1000
        e2e = ttft + np.array([sum(x) for x in d["itls"]]) * 1000
        starts = d.get("start_times") or [0.0] * len(ttft)
        req = pd.DataFrame({"arrival_s": np.asarray(starts, float) - min(starts), "input_len": d["input_lens"],
                            "output_len": d["output_lens"], "ttft_ms": ttft, "e2e_ms": e2e})
    else:
        req = pd.read_csv(path)
        miss = [c for c in ("arrival_s", "input_len", "output_len", "ttft_ms", "e2e_ms") if c not in req.columns]
        if miss:
            raise TableError(f"{path.name}: missing column(s) {miss}")
    for col in ("ttft_ms", "e2e_ms", "arrival_s"):
        bad = pd.to_numeric(req[col], errors="coerce")
        if bad.isna().any() or (bad < 0).any():
            i = int(np.flatnonzero((bad.isna() | (bad < 0)).to_numpy())[0])
            raise TableError(f"{path.name}: row {i + 1}, column {col}: {req[col].iloc[i]!r} is not a latency")
        req[col] = bad
    ok = req["output_len"] > 0
    r = req[ok]
    tpot = ((r["e2e_ms"] - r["ttft_ms"]) / (r["output_len"] - 1)).where(r["output_len"] > 1).dropna()
    duration = float((r["arrival_s"] + r["e2e_ms"] / 1000).max())
    summary = {
        "run_id": path.stem, "source": path.name, "num_prompts": len(req), "successful_requests": int(ok.sum()),
        "duration_s": duration, "total_input_tokens": int(r["input_len"].sum()),
        "total_output_tokens": int(r["output_len"].sum()),
        "output_throughput": float(r["output_len"].sum()) / duration,
        "mean_ttft_ms": r["ttft_ms"].mean(), "median_ttft_ms": r["ttft_ms"].median(),
        "p99_ttft_ms": float(np.percentile(r["ttft_ms"], 99)),
        "mean_tpot_ms": tpot.mean(), "median_tpot_ms": tpot.median(),
        "p99_tpot_ms": float(np.percentile(tpot, 99)) if len(tpot) else np.nan,
        "mean_e2e_ms": r["e2e_ms"].mean(), "p99_e2e_ms": float(np.percentile(r["e2e_ms"], 99)),
    }
    return check_table(pd.DataFrame([summary]), path.name), req


def load_table(path: str | Path) -> pd.DataFrame:
    """Any of the formats above, by file type; a directory loads every file in it."""
    path = Path(path)
    if path.is_dir():
        frames = [load_table(p) for p in sorted(path.iterdir()) if p.suffix in (".csv", ".json", ".jsonl")]
        if not frames:
            raise TableError(f"{path}: no .csv, .json or .jsonl files")
        return pd.concat(frames, ignore_index=True)
    if not path.exists():
        raise TableError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        return load_sglang_jsonl(path)
    if path.suffix == ".json":
        d = json.loads(path.read_text())
        return load_per_request(path)[0] if "ttfts" in d and "input_lens" in d else load_vllm_json([path])
    head = pd.read_csv(path, nrows=1)
    if {"arrival_s", "ttft_ms", "e2e_ms"} <= set(head.columns):
        return load_per_request(path)[0]
    return load_tidy_csv(path)
