"""Calibration: loaders, bad tables, and a fit that recovers parameters it generated itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration.fit import RowCase, StepTimeFit
from calibration.rows import row_to_scenario
from calibration.tables import TableError, load_per_request, load_sglang_jsonl, load_table, load_vllm_json
from sim.config import scenario_from_dict
from sim.runner import simulate

DATA = Path(__file__).resolve().parents[1] / "calibration" / "data"
SEED004 = DATA / "seed004_qwen72b_sharegpt_chunked_prefill_sweep.csv"
SEED002 = DATA / "seed002_deepseek_r1_h20_vllm_sglang.csv"


# --- loaders, with fixtures written from the seed tables -------------------------------------
def test_tidy_csv_loads_every_seed_table():
    for p in DATA.glob("*.csv"):
        df = load_table(p)
        assert len(df) > 0 and "mean_ttft_ms" in df.columns


def test_vllm_result_json_round_trips_a_seed004_row(tmp_path):
    row = pd.read_csv(SEED004).iloc[3]  # enable-512
    d = {"date": "20250101-000000", "backend": "vllm", "model_id": "Qwen2.5-72B-Instruct-GPTQ-Int4",
         "num_prompts": 1000, "request_rate": "inf", "burstiness": 1.0, "max_concurrency": None,
         "duration": row.duration_s, "completed": int(row.successful_requests),
         "total_input_tokens": int(row.total_input_tokens), "total_output_tokens": int(row.total_output_tokens),
         "request_throughput": row.request_throughput, "output_throughput": row.output_throughput,
         "total_token_throughput": row.total_token_throughput}
    for m in ("ttft", "tpot", "itl"):
        for s in ("mean", "median", "p99"):
            d[f"{s}_{m}_ms"] = row[f"{s}_{m}_ms"]
    p = tmp_path / "enable-512.json"
    p.write_text(json.dumps(d))
    df = load_vllm_json([p])
    assert df.loc[0, "run_id"] == "enable-512"
    assert df.loc[0, "mean_ttft_ms"] == row.mean_ttft_ms and df.loc[0, "successful_requests"] == 1000
    assert df.loc[0, "request_rate"] == float("inf")
    assert load_table(p).loc[0, "duration_s"] == row.duration_s


def test_sglang_jsonl_reads_one_run_per_line(tmp_path):
    rows = pd.read_csv(SEED002)
    rows = rows[rows.engine == "sglang"].head(3)
    lines = []
    for _, r in rows.iterrows():
        lines.append(json.dumps({"backend": "sglang", "dataset_name": "random", "request_rate": "inf",
                                 "max_concurrency": int(r.max_concurrency), "random_input_len": int(r.input_len),
                                 "random_output_len": int(r.output_len), "completed": int(r.num_prompts),
                                 "mean_ttft_ms": r.mean_ttft_ms, "mean_tpot_ms": r.mean_tpot_ms,
                                 "output_throughput": r.output_throughput, "mean_e2e_latency_ms": 1234.5}))
    p = tmp_path / "sglang.jsonl"
    p.write_text("\n".join(lines) + "\n")
    df = load_sglang_jsonl(p)
    assert len(df) == 3 and list(df.mean_tpot_ms) == list(rows.mean_tpot_ms)
    assert (df.mean_e2e_ms == 1234.5).all() and (df.input_len == rows.input_len.to_numpy()).all()


def test_per_request_results_reduce_to_means_and_tails(tmp_path):
    res = simulate(scenario_from_dict({
        "engine": {"scheduler": "vllm-v1", "max_model_len": 2048, "num_gpu_blocks_override": 500,
                   "max_num_batched_tokens": 512, "max_num_seqs": 16},
        "workload": {"dataset_name": "random", "num_prompts": 50, "request_rate": 4.0,
                     "random_input_len": 200, "random_output_len": 40, "random_range_ratio": 0.5},
    }))
    df = res.bench.requests
    trace = pd.DataFrame({"arrival_s": df.start_s, "input_len": df.prompt_len, "output_len": df.output_len,
                          "ttft_ms": df.ttft_s * 1000, "e2e_ms": df.e2el_s * 1000})
    p = tmp_path / "per_request.csv"
    trace.to_csv(p, index=False)
    summary, reqs = load_per_request(p)
    m = res.bench.metrics
    assert summary.loc[0, "mean_ttft_ms"] == pytest.approx(m["mean_ttft_ms"])
    assert summary.loc[0, "p99_ttft_ms"] == pytest.approx(m["p99_ttft_ms"])
    assert summary.loc[0, "mean_tpot_ms"] == pytest.approx(m["mean_tpot_ms"])
    assert len(reqs) == 50


# --- bad tables --------------------------------------------------------------------------------
def _bad(tmp_path, mutate):
    df = pd.read_csv(SEED004)
    mutate(df)
    p = tmp_path / "bad.csv"
    df.to_csv(p, index=False)
    return p


def test_missing_metric_columns_is_an_error(tmp_path):
    def mutate(df):
        for c in [c for c in df.columns if c.endswith(("_ms", "_throughput", "_s"))]:
            del df[c]
    p = _bad(tmp_path, mutate)
    with pytest.raises(TableError, match="no metric column"):
        load_table(p)


def test_units_in_a_cell_name_the_row_and_column(tmp_path):
    def mutate(df):
        df["mean_ttft_ms"] = df["mean_ttft_ms"].astype(object)
        df.loc[4, "mean_ttft_ms"] = "145.6 s"
    with pytest.raises(TableError, match=r"row 5, column mean_ttft_ms: '145.6 s' is not a number"):
        load_table(_bad(tmp_path, mutate))


def test_negative_latency_names_the_row_and_column(tmp_path):
    def mutate(df):
        df.loc[2, "mean_tpot_ms"] = -3.0
    with pytest.raises(TableError, match=r"row 3, column mean_tpot_ms: negative value"):
        load_table(_bad(tmp_path, mutate))


def test_tail_below_median_looks_like_mixed_units(tmp_path):
    def mutate(df):
        df.loc[0, "p99_itl_ms"] = df.loc[0, "median_itl_ms"] / 1000
    with pytest.raises(TableError, match=r"row 1, column p99_itl_ms: p99 .* is below the median"):
        load_table(_bad(tmp_path, mutate))


def test_unknown_split_and_spec_are_named():
    from calibration.splits import load_split

    with pytest.raises(ValueError, match="no split 'nope'; known: .*seed004"):
        load_split("nope")


# --- the fit recovers what generated the data ---------------------------------------------------
TRUE = {"step_overhead_s": 0.012, "per_seq_s": 3e-4, "launch_overhead_s": 0.0, "compute_efficiency": 0.45,
        "memory_efficiency": 0.6}


def _synthetic_cases(noise: float, rng):
    base = {"engine": {"scheduler": "vllm-v0", "version": "0.7.2", "max_model_len": 4096,
                       "kv_cache_tokens": 60000, "block_size": 16},
            "workload": {"client": "vllm-legacy", "dataset_name": "random", "random_range_ratio": 0.5,
                         "request_rate": "inf"}}
    cases = []
    for budget, seqs, n, inp, out in [(256, 64, 120, 400, 60), (1024, 128, 200, 300, 100), (4096, 32, 32, 1500, 40),
                                      (512, 16, 16, 100, 200), (2048, 256, 300, 200, 80)]:
        row = pd.Series({"chunked_prefill": "true", "max_num_batched_tokens": budget, "max_num_seqs": seqs,
                         "num_prompts": n, "input_len": inp, "output_len": out, "workload": "random"})
        data = row_to_scenario(row, base)
        truth = dict(data, step_time={"model": "qwen2.5-72b-instruct-gptq-int4", "hardware": "a100-80g", **TRUE})
        m = simulate(scenario_from_dict(truth)).bench.metrics
        measured = {k: m[s] * (1 + noise * rng.standard_normal()) for k, s in
                    [("mean_ttft_ms", "mean_ttft_ms"), ("mean_tpot_ms", "mean_tpot_ms"),
                     ("median_itl_ms", "median_itl_ms"), ("output_throughput", "output_throughput")]}
        cases.append(RowCase(f"b{budget}", measured, data))
    return cases


def test_fit_recovers_known_parameters_from_simulated_tables_with_noise():
    rng = np.random.default_rng(7)
    cases = _synthetic_cases(noise=0.02, rng=rng)
    f = StepTimeFit(model="qwen2.5-72b-instruct-gptq-int4", hardware="a100-80g", processes=1, n_starts=3)
    f.fit(cases[:4])
    c = f.coeffs_
    assert c.compute_efficiency == pytest.approx(TRUE["compute_efficiency"], rel=0.1)
    assert c.step_overhead_s == pytest.approx(TRUE["step_overhead_s"], rel=0.35, abs=0.004)
    # and it predicts the row it never saw
    pred = f.predict(cases[4:])
    assert pred["ape_pct"].median() < 8


def test_coefficients_are_compared_only_where_the_rows_pin_them():
    """A coefficient set that moves a pinned direction is far; one that moves only what the rows
    cannot see (a kernel-launch time below every step's GPU time, ~30 ms here) is not."""
    from dataclasses import replace

    rng = np.random.default_rng(7)
    cases = _synthetic_cases(noise=0.0, rng=rng)
    f = StepTimeFit(model="qwen2.5-72b-instruct-gptq-int4", hardware="a100-80g", processes=1, n_starts=3)
    f.fit(cases[:4])
    pinned = f.pinned_directions()
    assert 1 <= len(pinned) < len(f._names())  # something is pinned, not everything
    assert max(p["rms_change"] for p in f.compare_coefficients(f.coeffs_)) == 0.0
    moved = replace(f.coeffs_, compute_efficiency=f.coeffs_.compute_efficiency * 1.3)
    assert max(p["rms_change"] for p in f.compare_coefficients(moved)) > 0.02
    hidden = replace(f.coeffs_, launch_overhead_s=0.02)
    assert max(p["rms_change"] for p in f.compare_coefficients(hidden)) < 1e-9


def test_multistart_fit_is_deterministic():
    rng = np.random.default_rng(3)
    cases = _synthetic_cases(noise=0.01, rng=rng)[:3]
    a = StepTimeFit(model="qwen2.5-72b-instruct-gptq-int4", hardware="a100-80g", processes=1, n_starts=5).fit(cases)
    b = StepTimeFit(model="qwen2.5-72b-instruct-gptq-int4", hardware="a100-80g", processes=1, n_starts=5).fit(cases)
    assert a.coeffs_ == b.coeffs_ and a.loss_ == b.loss_
    assert len(a._starts()) == 5 and len({tuple(x) for x in a._starts()}) == 5


def test_fit_picks_the_hardware_that_generated_the_data():
    rng = np.random.default_rng(3)
    cases = _synthetic_cases(noise=0.0, rng=rng)
    f = StepTimeFit(model="qwen2.5-72b-instruct-gptq-int4", hardware=["h20", "a100-80g"], processes=1, n_starts=2)
    f.fit(cases)
    assert f.hardware_ == "a100-80g"
    assert len(f.indistinguishable()) == 1  # H20's FLOP/s-to-bandwidth ratio cannot fake A100's
    assert f.coeffs_.compute_efficiency == pytest.approx(TRUE["compute_efficiency"], rel=0.01)


def test_unidentified_kv_pool_takes_the_memory_formula_estimate_among_ties():
    """Capacities the training rows cannot tell apart are settled by the engine's memory formula;
    a capacity that fits worse is never chosen just because it is near the estimate."""
    f = StepTimeFit(model="deepseek-r1-fp8", hardware="h20", kv_bounds=(8000, 160000), kv_prior=100000)
    tried = [{"kv_cache_tokens": kv, "objective": obj} for kv, obj in
             [(8000, 0.30), (34000, 0.0134), (60000, 0.0134), (97000, 0.01345), (160000, 0.0134)]]
    assert f._nearest_prior(tried, tried[1])["kv_cache_tokens"] == 97000
    worse = [dict(t, objective=0.05) if t["kv_cache_tokens"] >= 60000 else t for t in tried]
    assert f._nearest_prior(worse, worse[1])["kv_cache_tokens"] == 34000
    with pytest.raises(ValueError, match="kv_prior 200000 must lie inside kv_bounds"):
        StepTimeFit(model="deepseek-r1-fp8", hardware="h20", kv_bounds=(8000, 160000), kv_prior=200000).fit(
            [RowCase("x", {}, {})])


def test_sglang_split_prior_is_the_memory_formula():
    from calibration.splits import load_split

    # 0.90 x 96 GiB - 78.3 GiB of FP8 weights per rank - 1.5 GiB, over 70,272 bytes per token
    assert load_split("seed002-sglang").kv_prior_tokens() == pytest.approx(100_192, abs=16)
    assert load_split("seed002-vllm").kv_prior_tokens() is None  # vLLM's profiled reserve is unknown
