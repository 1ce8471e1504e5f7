"""Per-request records of a benchmark run, read from the files benchmark clients write.

`read_requests(path)` gives one row per request, whatever wrote the file:

    arrival_s   when the client sent it, from the run's first request (seconds)
    input_len   prompt tokens
    output_len  tokens received (a finished request); tokens asked for (a failed one), or 0
                when the file does not say
    success     bool
    ttft_ms, e2e_ms, tpot_ms   the client's measurements (NaN where the file has none)
    itl_ms      the request's inter-token gaps (a list), where the file has them, else None
    stage       the load stage the request belongs to (0 in a single-stage run)
    hash_ids    Mooncake traces: the prompt's content as block hashes (a list), else None
    prefix_group, prefix_len   a shared prefix: requests of one group share their first prefix_len
                tokens (-1 / 0 where the file has none)
    session_id, turn   multi-turn conversations: turn k + 1's prompt holds turn k's prompt and
                reply (session_id -1 where the file has none)
    delay_ms    a turn's think time after the previous turn's reply, where the file says (AIPerf's
                `delay`), else NaN
    hash_delta  a later turn of an AIPerf Mooncake session: its input_length and hash_ids are the new
                message that follows the conversation so far, not the whole prompt
    failed_after_ms  a failed request: how long after it was sent it failed, where the file says

Formats, recognised by name and content:
- CSV: servesim's `--output-requests` (`arrival_s, prompt_len, output_len, ttft_s, e2el_s, ...`) or
  the tidy per-request CSV (`arrival_s, input_len, output_len, ttft_ms, e2e_ms[, success, stage]`);
  an Azure LLM trace (`TIMESTAMP, ContextTokens, GeneratedTokens`) or BurstGPT (`Timestamp, Model,
  Request tokens, Response tokens, Total tokens, Log Type`; 0 response tokens marks a failure):
  arrivals and lengths only.
- JSON: `vllm bench serve --save-detailed` (`input_lens, output_lens, ttfts, itls[, start_times,
  errors]`); inference-perf's `per_request_lifecycle_metrics.json` (a list of `start_time,
  end_time, request, response, info, error`), split into stages with the `stage_N_lifecycle_
  metrics.json` files beside it.
- JSONL: AIPerf's `profile_export.jsonl` (`metadata, metrics, error`); a Mooncake trace
  (`timestamp` in ms, `input_length, output_length, hash_ids`).
Each reader states which field it took each column from; `summarize` reduces rows to the
benchmark's metrics the way the clients define them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd


class TraceError(ValueError):
    """A per-request file that cannot be read: the message names the file, the row and the field."""


COLUMNS = ["arrival_s", "input_len", "output_len", "success", "ttft_ms", "e2e_ms", "tpot_ms", "itl_ms", "stage",
           "hash_ids", "failed_after_ms", "prefix_group", "prefix_len", "session_id", "turn", "delay_ms",
           "hash_delta"]


def read_requests(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: the file is empty")
    try:
        if path.suffix == ".jsonl":
            df = _read_jsonl(path)
        elif path.suffix == ".json":
            df = _read_json(path)
        else:
            df = _read_csv(path)
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file") from None
    return _finish(df, path)


# --- CSV ---------------------------------------------------------------------------------------
def _read_csv(path: Path) -> pd.DataFrame:
    try:
        raw = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise TraceError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as exc:
        raise TraceError(f"{path}: not a CSV table ({exc})") from None
    cols = {c.lower(): c for c in raw.columns}
    if {"timestamp", "contexttokens", "generatedtokens"} <= set(cols):  # Azure LLM inference trace
        ts = raw[cols["timestamp"]]
        t = ts.to_numpy(dtype=float) if pd.api.types.is_numeric_dtype(ts) else \
            pd.to_datetime(ts).astype("int64").to_numpy() / 1e9
        return pd.DataFrame({"arrival_s": t, "input_len": raw[cols["contexttokens"]],
                             "output_len": raw[cols["generatedtokens"]]})
    if {"timestamp", "request tokens", "response tokens"} <= set(cols):  # BurstGPT
        # its failed requests are the rows with 0 response tokens (BurstGPT's README)
        out = pd.to_numeric(raw[cols["response tokens"]], errors="coerce")
        return pd.DataFrame({"arrival_s": raw[cols["timestamp"]], "input_len": raw[cols["request tokens"]],
                             "output_len": out, "success": out > 0})
    if "arrival_s" in raw.columns:
        df = pd.DataFrame({"arrival_s": raw["arrival_s"]})
        df["input_len"] = _first(raw, path, "input_len", "prompt_len")
        df["output_len"] = _first(raw, path, "output_len")
        for name in ("ttft", "e2e", "tpot"):
            ms = [c for c in (f"{name}_ms", f"{name}l_ms") if c in raw.columns]
            s = [c for c in (f"{name}_s", f"{name}l_s") if c in raw.columns]
            if ms:
                df[f"{name}_ms"] = pd.to_numeric(raw[ms[0]], errors="coerce")
            elif s:
                df[f"{name}_ms"] = pd.to_numeric(raw[s[0]], errors="coerce") * 1000
        if "success" in raw.columns:
            df["success"] = raw["success"].astype(str).str.lower().isin(["true", "1"])
        for col in ("stage", "prefix_group", "prefix_len", "session_id", "turn", "delay_ms"):
            if col in raw.columns:
                df[col] = raw[col]
        return df
    raise TraceError(f"{path}: a per-request CSV needs columns arrival_s, input_len (or prompt_len), output_len "
                     f"(and ttft_ms, e2e_ms to calibrate on), or an Azure trace's TIMESTAMP, ContextTokens, "
                     f"GeneratedTokens; it has {list(raw.columns)}")


def _first(raw: pd.DataFrame, path: Path, *names: str) -> pd.Series:
    for n in names:
        if n in raw.columns:
            return raw[n]
    raise TraceError(f"{path}: missing column {' or '.join(names)}")


# --- JSON --------------------------------------------------------------------------------------
def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: not JSON ({exc})") from None


def _read_json(path: Path) -> pd.DataFrame:
    d = _load_json(path)
    if isinstance(d, dict) and {"input_lens", "output_lens", "ttfts"} <= set(d):
        return _vllm_detailed(d, path)
    if isinstance(d, list) and (not d or isinstance(d[0], dict) and {"start_time", "end_time", "info"} <= set(d[0])):
        return _inference_perf(d, path)
    raise TraceError(f"{path}: neither a vLLM --save-detailed result (input_lens, output_lens, ttfts, itls) nor "
                     "inference-perf per-request records (a list of start_time, end_time, request, info, error)")


def _vllm_detailed(d: dict, path: Path) -> pd.DataFrame:
    """`vllm bench serve --save-result --save-detailed`: lists in request order. Failed requests
    have an error text, a TTFT of 0 and no tokens. `start_times` (newer versions) are the send
    times; without them every request counts as sent at once (the default rate, inf)."""
    n = len(d["input_lens"])
    errors = d.get("errors") or [""] * n
    ok = np.array([not e for e in errors])
    ttft = np.asarray(d["ttfts"], dtype=float) * 1000
    itls = [list(np.asarray(x, dtype=float) * 1000) for x in d.get("itls") or [[] for _ in range(n)]]
    e2e = ttft + np.array([sum(x) for x in itls])
    if d.get("latencies"):
        e2e = np.asarray(d["latencies"], dtype=float) * 1000
    starts = np.asarray(d.get("start_times") or [0.0] * n, dtype=float)
    return pd.DataFrame({"arrival_s": starts, "input_len": d["input_lens"], "output_len": d["output_lens"],
                         "success": ok, "ttft_ms": np.where(ok, ttft, np.nan), "e2e_ms": np.where(ok, e2e, np.nan),
                         "itl_ms": [x if good else None for x, good in zip(itls, ok)]})


def _inference_perf(records: list, path: Path) -> pd.DataFrame:
    """inference-perf's per-request records (`report.request_lifecycle.per_request: true`).

    Times are `perf_counter` seconds. TTFT is the first output token time minus the start, the
    E2E the last token time minus the start (the tool's own request_latency also counts reading
    and tokenising the end of the stream), the gaps are between output token times. A failure
    has `error` set and no response metrics: its prompt length is not recorded (0), its
    requested length is the body's max_tokens. Stages are not in the records: they come from the
    stage files beside it (each says how many requests it had; stages never overlap)."""
    rows = []
    for k, r in enumerate(records):
        info = r.get("info") or {}
        req_text = r.get("request") or "{}"
        try:
            body = json.loads(req_text) if isinstance(req_text, str) else dict(req_text)
        except json.JSONDecodeError:
            body = {}
        text = (info.get("request_metrics") or {}).get("text") or {}
        inp = text.get("input_tokens", info.get("input_tokens", 0)) or 0
        resp = info.get("response_metrics") or info.get("response_info")
        start = float(r["start_time"])
        if r.get("error") is None and resp is not None:
            usage = resp.get("server_usage") or {}
            out = int(usage.get("completion_tokens") or resp.get("output_tokens") or 0)
            times = resp.get("output_token_times") or info.get("output_token_times") or []
            ttft = (times[0] - start) * 1000 if times else math.nan
            e2e = ((times[-1] if times else float(r["end_time"])) - start) * 1000
            gaps = list(np.diff(times) * 1000) if len(times) > 1 else None
            rows.append((start, int(usage.get("prompt_tokens") or inp), out, True, ttft, e2e, gaps, math.nan))
        else:
            rows.append((start, int(inp), int(body.get("max_tokens") or 0), False, math.nan, math.nan, None,
                         (float(r["end_time"]) - start) * 1000))
    df = pd.DataFrame(rows, columns=["arrival_s", "input_len", "output_len", "success", "ttft_ms", "e2e_ms", "itl_ms",
                                     "failed_after_ms"])
    df = df.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    counts = []
    for n in range(1000):
        f = path.parent / f"stage_{n}_lifecycle_metrics.json"
        if not f.exists():
            break
        counts.append(int(((_load_json(f).get("load_summary") or {}).get("count")) or 0))
    if counts and sum(counts) == len(df):
        df["stage"] = np.repeat(np.arange(len(counts)), counts)
    elif counts:
        raise TraceError(f"{path}: the stage files beside it count {sum(counts)} requests, the records {len(df)}")
    return df


# --- JSONL -------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> pd.DataFrame:
    lines = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}: line {n} is not JSON ({exc})") from None
    if not lines:
        raise TraceError(f"{path}: no records")
    first = lines[0]
    if isinstance(first, dict) and "metadata" in first and "metrics" in first:
        return _aiperf(lines, path)
    if isinstance(first, dict) and {"timestamp", "input_length"} <= set(first):
        return _mooncake(lines, path)
    raise TraceError(f"{path}: neither AIPerf's profile_export.jsonl (metadata, metrics, error) nor a Mooncake "
                     "trace (timestamp, input_length, output_length, hash_ids)")


def _aiperf(lines: list, path: Path) -> pd.DataFrame:
    """AIPerf's `profile_export.jsonl` (0.2.0 and later): one record per request, in completion
    order. The send time is `credit_issued_ns` when present (0.5.0+, the schedule), else
    `request_start_ns`; warm-up records (0.12.0+ keep them, flagged) are left out. Metrics are
    `{value, unit}`; AIPerf's per-request `inter_token_latency` is (latency - TTFT)/(tokens - 1),
    which is the TPOT of vLLM's report; the gaps between chunks are `inter_chunk_latency`."""
    rows = []
    for n, r in enumerate(lines, 1):
        meta = r.get("metadata") or {}
        if meta.get("benchmark_phase", "profiling") != "profiling":
            continue
        m = r.get("metrics") or {}

        def val(key, default=math.nan):
            v = m.get(key)
            return v.get("value", default) if isinstance(v, dict) else default

        t = meta.get("credit_issued_ns") or meta.get("request_start_ns")
        if t is None:
            raise TraceError(f"{path}: line {n} has no request_start_ns")
        if r.get("error"):
            end = meta.get("request_end_ns")
            after = (end - meta["request_start_ns"]) / 1e6 if end and meta.get("request_start_ns") else math.nan
            rows.append((t, int(val("error_isl", 0)), 0, False, math.nan, math.nan, math.nan, None, after))
            continue
        gaps = val("inter_chunk_latency", None)
        rows.append((t, int(val("input_sequence_length", 0)), int(val("output_sequence_length", 0)), True,
                     val("time_to_first_token"), val("request_latency"), val("inter_token_latency"),
                     list(gaps) if isinstance(gaps, list) else None, math.nan))
    df = pd.DataFrame(rows, columns=["arrival_s", "input_len", "output_len", "success", "ttft_ms", "e2e_ms", "tpot_ms",
                                     "itl_ms", "failed_after_ms"])
    df["arrival_s"] = (df["arrival_s"] - df["arrival_s"].min()) / 1e9
    return df.sort_values("arrival_s", kind="stable").reset_index(drop=True)


def _mooncake(lines: list, path: Path) -> pd.DataFrame:
    """A Mooncake trace: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (one id per
    block of the prompt; a shared leading run of ids is a shared prefix). AIPerf's extension:
    `session_id` makes rows turns of one conversation, in file order, and a later turn may give
    a `delay` (ms after the previous turn's reply) instead of a `timestamp`."""
    sessions: dict = {}
    rows = []
    for n, r in enumerate(lines, 1):
        if not isinstance(r, dict) or "input_length" not in r:
            raise TraceError(f"{path}: line {n} lacks input_length")
        sid = r.get("session_id")
        turn = sessions[sid] = sessions.get(sid, -1) + 1 if sid is not None else 0
        t = r.get("timestamp")
        if t is None and (sid is None or turn == 0):
            raise TraceError(f"{path}: line {n} lacks timestamp (only a later turn of a session may leave it out)")
        if "output_length" not in r:
            raise TraceError(f"{path}: line {n} lacks output_length (the simulator needs each request's output)")
        h = r.get("hash_ids") or []
        if not isinstance(h, list):
            raise TraceError(f"{path}: line {n}, hash_ids: {h!r} is not a list of block ids")
        rows.append((t, r["input_length"], r["output_length"], h,
                     sid, turn, r.get("delay")))
    df = pd.DataFrame(rows, columns=["timestamp", "input_len", "output_len", "hash_ids", "session_id", "turn",
                                     "delay_ms"])
    t = pd.to_numeric(df["timestamp"], errors="coerce")
    if df["session_id"].notna().any():  # a later turn without a timestamp: sent after the one before
        t = t.fillna(t.groupby(df["session_id"]).ffill())
    df["arrival_s"] = t / 1000
    df["hash_delta"] = df["session_id"].notna() & (df["turn"] > 0)
    return df.drop(columns="timestamp").sort_values("arrival_s", kind="stable").reset_index(drop=True)


# --- common ------------------------------------------------------------------------------------
def _finish(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    if df.empty:
        raise TraceError(f"{path}: no requests in the file")
    for col, kind in (("arrival_s", float), ("input_len", "int64"), ("output_len", "int64")):
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() | (num < 0)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise TraceError(f"{path}: request {i + 1}, {col}: {df[col].iloc[i]!r} is not a non-negative number")
        df[col] = num.astype(kind)
    df["arrival_s"] = df["arrival_s"] - df["arrival_s"].min()
    if "success" not in df.columns:
        df["success"] = True
    df["success"] = df["success"].astype(bool)
    for col in ("ttft_ms", "e2e_ms", "tpot_ms", "failed_after_ms"):
        if col not in df.columns:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    derive = df["tpot_ms"].isna() & df["success"] & (df["output_len"] > 1)
    df.loc[derive, "tpot_ms"] = (df.loc[derive, "e2e_ms"] - df.loc[derive, "ttft_ms"]) / (df.loc[derive, "output_len"] - 1)
    for col in ("itl_ms", "hash_ids"):
        if col not in df.columns:
            df[col] = None
    for col, default in (("stage", 0), ("prefix_group", -1), ("prefix_len", 0), ("session_id", -1), ("turn", 0)):
        if col not in df.columns:
            df[col] = default
        num = pd.to_numeric(df[col], errors="coerce")
        if col != "stage" and (num.isna() & df[col].notna()).any():  # ids may be names: number them
            num = pd.Series(pd.factorize(df[col])[0], index=df.index).where(df[col].notna(), np.nan)
        df[col] = num.fillna(default).astype("int64")
    if ((df["prefix_group"] >= 0) & (df["prefix_len"] < 1)).any() or (df["prefix_len"] > df["input_len"]).any():
        i = int(np.flatnonzero((((df["prefix_group"] >= 0) & (df["prefix_len"] < 1))
                                | (df["prefix_len"] > df["input_len"])).to_numpy())[0])
        raise TraceError(f"{path}: request {i + 1}, prefix_len: {df['prefix_len'].iloc[i]} must be at least 1 for a "
                         f"request in a prefix group and at most its input_len ({df['input_len'].iloc[i]})")
    if "hash_delta" not in df.columns:
        df["hash_delta"] = False
    if "delay_ms" not in df.columns:
        df["delay_ms"] = np.nan
    df["delay_ms"] = pd.to_numeric(df["delay_ms"], errors="coerce").astype(float)
    for col in ("ttft_ms", "e2e_ms"):
        neg = df[col] < 0
        if neg.any():
            i = int(np.flatnonzero(neg.to_numpy())[0])
            raise TraceError(f"{path}: request {i + 1}, {col}: {df[col].iloc[i]} is negative")
    return df[COLUMNS]


def summarize(df: pd.DataFrame, percentiles=(50, 99)) -> dict:
    """The benchmark's metrics over these requests, as vLLM's client defines them: latencies over
    successful requests (TPOT over those with more than one token), ITL over every gap pooled,
    throughput over the time from the first send to the last end (a failure's end too, where
    the file says when it failed). Keys follow the tidy table
    (`mean_ttft_ms`, `p99_e2e_ms`, `output_throughput`, `duration_s`, ...)."""
    ok = df[df["success"]]
    end = df["arrival_s"] + df["e2e_ms"].fillna(df["failed_after_ms"]).fillna(0) / 1000
    duration = float(end.max() - df["arrival_s"].min()) if len(df) else 0.0
    out = {"num_prompts": len(df), "successful_requests": int(len(ok)), "duration_s": duration,
           "total_input_tokens": int(ok["input_len"].sum()), "total_output_tokens": int(ok["output_len"].sum())}
    if duration > 0:
        out["request_throughput"] = len(ok) / duration
        out["output_throughput"] = float(ok["output_len"].sum()) / duration
    gaps = [g for x in ok["itl_ms"] if x is not None for g in x]
    series = {"ttft": ok["ttft_ms"].dropna().to_numpy(), "tpot": ok["tpot_ms"].dropna().to_numpy(),
              "e2e": ok["e2e_ms"].dropna().to_numpy(), "itl": np.asarray(gaps, dtype=float)}
    for name, x in series.items():
        if len(x) == 0:
            continue
        out[f"mean_{name}_ms"] = float(x.mean())
        for p in percentiles:
            out[f"{'median' if p == 50 else f'p{p:g}'}_{name}_ms"] = float(np.percentile(x, p))
    return out
