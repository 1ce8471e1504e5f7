"""Turn a measured row into a scenario: engine and workload keys from the table's columns,
everything the table does not say (scheduler, version, KV capacity, client) from a base file."""

from __future__ import annotations

import math

import pandas as pd

from sim.config import _deep_merge


def _num(row: pd.Series, col: str):
    v = row.get(col)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# what a base file's workload says about a dataset or a schedule: a row that replays its own
# recorded requests keeps none of it
_DATASET_KEYS = {"dataset_name", "num_prompts", "request_rate", "burstiness", "random_input_len", "random_output_len",
                 "random_range_ratio", "random_prefix_len", "turns", "think_time_s", "output_len_mean", "dataset_path",
                 "sharegpt_output_len", "lengths_max_tokens", "trace_path", "trace_time_scale", "trace_stage",
                 "stages", "stage_arrivals", "stage_interval_s", "shared_prefix"}


def row_to_scenario(row: pd.Series, base: dict) -> dict:
    """A per-request row (it has `trace_path`) replays its own requests at their recorded times,
    with the base file's engine and client; an aggregate row takes the table's columns as the
    engine's and the workload's settings, over the base file."""
    trace = row.get("trace_path")
    if isinstance(trace, str) and trace:
        wl = {k: v for k, v in base.get("workload", {}).items() if k not in _DATASET_KEYS}
        wl.update(dataset_name="trace", trace_path=trace)
        if _num(row, "trace_stage") is not None:
            wl["trace_stage"] = int(_num(row, "trace_stage"))
        return {**base, "workload": wl}
    eng, wl = {}, {}
    if _num(row, "chunked_prefill") is not None:
        eng["enable_chunked_prefill"] = str(row["chunked_prefill"]).lower() == "true"
    for col in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
        if _num(row, col) is not None:
            eng[col] = int(_num(row, col))
    workload = str(row.get("workload", "") or "").lower()
    if workload in ("random", "sharegpt"):
        wl["dataset_name"] = workload
    if _num(row, "input_len") is not None:
        wl["random_input_len"] = int(_num(row, "input_len"))
    out_len = _num(row, "mean_output_len") or _num(row, "output_len")
    if out_len is not None:
        wl["random_output_len"] = int(round(out_len))  # what the run generated (EOS may end it early)
    for col in ("num_prompts", "max_concurrency"):
        if _num(row, col) is not None:
            wl[col] = int(_num(row, col))
    rate = row.get("request_rate")
    if rate is not None and not (isinstance(rate, float) and math.isnan(rate)):
        wl["request_rate"] = float(rate) if str(rate) != "inf" else "inf"
    return _deep_merge(base, {"engine": eng, "workload": wl})
