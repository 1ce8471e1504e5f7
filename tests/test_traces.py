"""Per-request files as the benchmark clients write them (tests/data/clients: genuine outputs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration.tables import TableError, load_table
from sim.cli import main
from sim.config import scenario_from_dict
from sim.runner import simulate
from sim.traces import TraceError, read_requests, summarize
from sim.workload import WorkloadError, load_trace

CLIENTS = Path(__file__).resolve().parent / "data" / "clients"
IPERF = CLIENTS / "inference-perf-0.7.0"


def test_inference_perf_records_split_into_the_stages_its_stage_files_count():
    req = read_requests(IPERF / "per_request_lifecycle_metrics.json")
    assert req.groupby("stage").size().tolist() == [12, 16]
    assert req.groupby("stage").success.sum().tolist() == [10, 12]  # 2 timeouts + 1 HTTP 400 in stage 0
    failed = req[~req.success]
    assert (failed.input_len == 0).all() and (failed.output_len > 0).all()  # the body's max_tokens
    assert failed.failed_after_ms.between(0, 1100).all()  # timeouts at 1 s, a 400 at once


@pytest.mark.parametrize("stage", [0, 1])
def test_inference_perf_records_give_the_numbers_of_its_own_stage_files(stage):
    """The per-request records and the tool's stage file are the same requests: TTFT, TPOT and
    ITL statistics agree to rounding; E2E ends at the last token here and at the end of the
    read there (a fraction of a millisecond later); throughput counts the failures' time too."""
    rows = load_table(IPERF).set_index("trace_stage")
    mine = rows.loc[stage]
    theirs = json.loads((IPERF / f"stage_{stage}_lifecycle_metrics.json").read_text())
    lat = theirs["successes"]["latency"]
    assert mine.successful_requests == theirs["successes"]["count"]
    assert mine.num_prompts == theirs["load_summary"]["count"]
    assert mine.mean_ttft_ms == pytest.approx(1000 * lat["time_to_first_token"]["mean"], rel=1e-9)
    assert mine.median_ttft_ms == pytest.approx(1000 * lat["time_to_first_token"]["median"], rel=1e-9)
    assert mine.mean_tpot_ms == pytest.approx(1000 * lat["time_per_output_token"]["mean"], rel=1e-9)
    assert mine.mean_itl_ms == pytest.approx(1000 * lat["inter_token_latency"]["mean"], rel=1e-9)
    assert mine.mean_e2e_ms == pytest.approx(1000 * lat["request_latency"]["mean"], rel=0.01)
    assert mine.output_throughput == pytest.approx(theirs["successes"]["throughput"]["output_tokens_per_sec"], rel=0.01)


def test_inference_perf_summary_and_stage_files_load_in_seconds():
    df = load_table(IPERF / "stage_1_lifecycle_metrics.json")
    assert df.loc[0, "request_rate"] == 8 and df.loc[0, "num_prompts"] == 16
    assert 5 < df.loc[0, "mean_tpot_ms"] < 6  # the mock server streams a token every 5 ms


@pytest.mark.parametrize("run", ["aiperf-0.13.0-poisson", "aiperf-0.2.0-concurrency", "aiperf-0.13.0-mooncake"])
def test_aiperf_records_give_the_numbers_of_its_aggregate(run):
    """AIPerf's per-request `inter_token_latency` is vLLM's TPOT; the aggregate averages the
    same per-request values, over successful profiling requests only."""
    agg = json.loads((CLIENTS / run / "profile_export_aiperf.json").read_text())
    req = read_requests(CLIENTS / run / "profile_export.jsonl")
    m = summarize(req)
    assert m["successful_requests"] == agg["time_to_first_token"].get("count", m["successful_requests"])
    assert m["mean_ttft_ms"] == pytest.approx(agg["time_to_first_token"]["avg"], rel=1e-9)
    assert m["mean_tpot_ms"] == pytest.approx(agg["inter_token_latency"]["avg"], rel=1e-9)
    assert m["mean_e2e_ms"] == pytest.approx(agg["request_latency"]["avg"], rel=1e-9)
    row = load_table(CLIENTS / run / "profile_export_aiperf.json").iloc[0]
    assert row.mean_ttft_ms == pytest.approx(agg["time_to_first_token"]["avg"])


def test_a_directory_of_aiperf_artifact_directories_is_a_table_of_their_runs(tmp_path):
    """What `--artifact-dir` leaves, one directory per run, beside bookkeeping AIPerf writes
    (a hidden ready flag, inputs.json, logs): one row per run, named by its directory, from its
    per-request records."""
    runs = ["aiperf-0.13.0-poisson", "aiperf-0.2.0-concurrency"]
    for run in runs:
        shutil.copytree(CLIENTS / run, tmp_path / run)
        (tmp_path / run / ".aiperf_results_ready.json").write_text("{}")
        (tmp_path / run / "inputs.json").write_text('{"data": []}')
        (tmp_path / run / "logs").mkdir()
    rows = load_table(tmp_path).set_index("run_id")
    assert sorted(rows.index) == runs
    for run in runs:
        agg = json.loads((CLIENTS / run / "profile_export_aiperf.json").read_text())
        assert rows.loc[run, "mean_ttft_ms"] == pytest.approx(agg["time_to_first_token"]["avg"], rel=1e-9)
        assert rows.loc[run, "trace_path"] == str((tmp_path / run / "profile_export.jsonl").resolve())


def test_aiperf_mooncake_run_keeps_the_schedule_and_the_failure():
    req = read_requests(CLIENTS / "aiperf-0.13.0-mooncake" / "profile_export.jsonl")
    assert len(req) == 4 and req.success.tolist().count(False) == 1
    # credit_issued_ns is the schedule: the trace's 0, 50, 120 and 200 ms, give or take a ms
    assert req.arrival_s.to_numpy() == pytest.approx([0, 0.05, 0.12, 0.2], abs=0.003)
    assert req.loc[~req.success, "input_len"].item() == 300  # error_isl


def test_mooncake_trace_replays_as_a_workload():
    samples, t = load_trace(str(CLIENTS / "aiperf-0.13.0-mooncake" / "input_trace.jsonl"), None, 1.0)
    assert [s.prompt_len for s in samples] == [600, 700, 300, 1100]
    assert [s.output_len for s in samples] == [4, 5, 13, 6]
    assert list(t) == pytest.approx([0, 0.05, 0.12, 0.2])
    req = read_requests(CLIENTS / "aiperf-0.13.0-mooncake" / "input_trace.jsonl")
    assert req.hash_ids.tolist() == [[0, 1], [0, 2], [3], [0, 4, 5]]


def test_vllm_detailed_json_and_servesim_csv_give_the_runs_own_metrics(tmp_path):
    sc = tmp_path / "s.toml"
    sc.write_text('[engine]\nscheduler = "vllm-v1"\nmax_model_len = 2048\nnum_gpu_blocks_override = 400\n'
                  '[workload]\ndataset_name = "random"\nnum_prompts = 60\nrequest_rate = 6.0\nrandom_input_len = 300\n'
                  'random_output_len = 40\nrandom_range_ratio = 0.5\n[step_time]\nmodel = "llama-2-7b"\nhardware = "a100-80g"\n')
    out, csv = tmp_path / "r.json", tmp_path / "r.csv"
    assert main(["run", str(sc), "-q", "--output-json", str(out), "--save-detailed", "--output-requests", str(csv),
                 "--percentile-metrics", "ttft,tpot,itl,e2el"]) == 0
    saved = json.loads(out.read_text())
    for path in (out, csv):
        m = summarize(read_requests(path))
        for key, theirs in (("mean_ttft_ms", "mean_ttft_ms"), ("p99_ttft_ms", "p99_ttft_ms"),
                            ("mean_tpot_ms", "mean_tpot_ms"), ("mean_e2e_ms", "mean_e2el_ms")):
            assert m[key] == pytest.approx(saved[theirs], rel=1e-6), (path.name, key)
    assert summarize(read_requests(out))["median_itl_ms"] == pytest.approx(saved["median_itl_ms"], rel=1e-6)


def test_staged_run_writes_stages_that_calibration_reads_back(tmp_path):
    res = simulate(scenario_from_dict({
        "engine": {"scheduler": "vllm-v1", "max_model_len": 2048, "num_gpu_blocks_override": 600},
        "workload": {"dataset_name": "random", "random_input_len": 200, "random_output_len": 30,
                     "stages": [{"rate": 4, "duration": 5}, {"rate": 8, "duration": 5}]},
        "step_time": {"model": "llama-2-7b", "hardware": "a100-80g"}}))
    p = tmp_path / "run.csv"
    res.bench.requests.to_csv(p, index=False)
    rows = load_table(p)
    assert rows.num_prompts.tolist() == [20, 40] and rows.trace_stage.tolist() == [0, 1]
    req = res.bench.requests
    first_of_1 = req[req.stage == 1].arrival_s.min()
    assert first_of_1 > (req[req.stage == 0].start_s + req[req.stage == 0].e2el_s).max() + 1.0  # stages never overlap
    samples, t = load_trace(str(p), None, 1.0, stage=1)
    assert len(samples) == 40 and t[0] == 0.0


@pytest.mark.parametrize("content,match", [
    (b"", "the file is empty"),
    (b"arrival_s,input_len,output_len,ttft_ms,e2e_ms\n", "no requests in the file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file|not a CSV"),
    (b"arrival_s,input_len,output_len\n0,12,x\n", r"request 1, output_len: 'x' is not a non-negative number"),
])
def test_bad_per_request_files_are_named(tmp_path, content, match):
    p = tmp_path / "run.csv"
    p.write_bytes(content)
    with pytest.raises(TraceError, match=match):
        read_requests(p)
    with pytest.raises(WorkloadError, match="workload.trace_path: .*run.csv"):
        load_trace(str(p), None, 1.0)
    with pytest.raises(TableError, match="run.csv"):
        load_table(p)


def test_a_mooncake_trace_is_not_a_measurement():
    with pytest.raises(TableError, match="a Mooncake trace"):
        load_table(CLIENTS / "aiperf-0.13.0-mooncake" / "input_trace.jsonl")
    rows = load_table(CLIENTS / "aiperf-0.13.0-mooncake")  # beside the results: left out
    assert len(rows) == 1


def test_failed_requests_without_a_length_are_not_replayed_and_say_so(tmp_path, capsys):
    p = tmp_path / "run.csv"
    pd.DataFrame({"arrival_s": [0.0, 0.5, 1.0], "input_len": [100, 0, 120], "output_len": [20, 0, 30],
                  "ttft_ms": [30.0, np.nan, 31.0], "e2e_ms": [300.0, np.nan, 330.0],
                  "success": [True, False, True]}).to_csv(p, index=False)
    samples, _ = load_trace(str(p), None, 1.0)
    assert len(samples) == 2
    sc = tmp_path / "s.toml"
    sc.write_text(f'[engine]\nscheduler = "vllm-v1"\nmax_model_len = 2048\nnum_gpu_blocks_override = 400\n'
                  f'[workload]\ndataset_name = "trace"\ntrace_path = "{p}"\n')
    assert main(["run", str(sc)]) == 0
    out = capsys.readouterr().out
    assert "Traffic: trace" in out and "replayed: 2 requests sent over 1.0 s" in out
    assert "1 requests the trace records as failed, with no length, are not replayed" in out
