"""A benchmark client nobody here wrote, AIPerf (installed from the package index), against
`servesim serve` on localhost: its own report compared with `servesim run` of the same workload,
and a profile calibrated from its result files (experiments/aiperf_roundtrip.py at test size).

CI installs AIPerf into a virtual environment of its own (`.venv-client`, see `.ci/run`): its
dependencies are not the project's. Elsewhere the tests run when `SERVESIM_AIPERF` names an
`aiperf` executable or `.venv-client/bin/aiperf` exists, and are skipped otherwise.

Both sides must count the same prompt tokens: AIPerf counts with a tokenizer, and without the
network it cannot fetch one, so the tests write a word-level tokenizer (every word one token,
unknown words `[UNK]`) and hand the same file to the server (`--tokenizer`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from aiperf_roundtrip import SMALL, aiperf_exe, one, run_aiperf, served, word_level_tokenizer  # noqa: E402

SCENARIO = ROOT / "scenarios" / "seed004" / "enable-512.toml"
ISL, OSL, REQUESTS, CONCURRENCY = 200, 16, 16, 4
TOLERANCE = 0.05  # the bound on client report against simulation
SLOWDOWN = 2.0  # the calibration test's known engine, this many times slower than the experiment's

pytestmark = [pytest.mark.client,
              pytest.mark.skipif(aiperf_exe() is None, reason="AIPerf is not installed: python3 -m venv .venv-client "
                                                              "&& .venv-client/bin/pip install aiperf")]


def _simulated() -> dict:
    from sim.config import load_scenario, scenario_from_dict
    from sim.runner import simulate

    data = load_scenario(SCENARIO).model_dump(exclude_none=True)
    data.pop("name", None)
    data["workload"] = {"client": "vllm", "dataset_name": "random", "random_input_len": ISL, "random_output_len": OSL,
                        "random_range_ratio": 0.0, "num_prompts": REQUESTS, "max_concurrency": CONCURRENCY,
                        "request_rate": "inf", "ignore_eos": True}
    return simulate(scenario_from_dict(data)).bench.metrics


def test_aiperf_against_the_server_reports_what_servesim_run_predicts(tmp_path):
    pytest.importorskip("tokenizers")
    tok = word_level_tokenizer(tmp_path / "tokenizer")
    with served(SCENARIO, tok) as url:
        report = run_aiperf(url, "seed004-qwen72b-gptq", tok, tmp_path / "aiperf", ["--concurrency", str(CONCURRENCY)],
                            requests=REQUESTS, isl=ISL, isl_sd=0, osl=OSL, osl_sd=0, timeout_s=300)
    assert report["request_count"]["avg"] == REQUESTS and report["input_sequence_length"]["avg"] == ISL
    sim = _simulated()
    pairs = {  # AIPerf's name: servesim's (vLLM's benchmark report)
        "time_to_first_token": "mean_ttft_ms", "inter_token_latency": "mean_itl_ms",
        "request_latency": "mean_e2el_ms", "output_token_throughput": "output_throughput"}
    for theirs, ours in pairs.items():
        measured, predicted = report[theirs]["avg"], sim[ours]
        assert abs(measured / predicted - 1) <= TOLERANCE, f"{theirs}: AIPerf {measured:.2f}, servesim run {predicted:.2f}"


def test_a_profile_calibrated_from_aiperfs_files_predicts_a_run_it_never_saw(tmp_path):
    """AIPerf at concurrency 1 and 24 against a known profile; `servesim calibrate` on the two
    artifact directories; `servesim predict` of a concurrency-8 run it never saw, against
    AIPerf's own numbers.

    The server shares two cores with AIPerf's processes, so what it adds depends on the machine.
    The known profile here runs every step and its front end twice as long as the experiment's
    (SLOWDOWN), which halves the share of that in every latency and the server's load per wall
    second; it costs ~25 s. TTFT carries the live HTTP, SSE and tokenising time, which the known
    profile's miss measures in the same recording (the experiment's: 2.3-8.5 ms, up to 14 ms at
    concurrency 24 with a core held busy; a CI run without the slowdown put the fitted c1 5.4 ms,
    14.5 %, above AIPerf). A fitted constant takes its average, so a run's TTFT can miss by as
    much as the overhead varies: the bound is that the fitted profile misses no run's mean TTFT
    by more than the largest overhead the known profile shows in that recording, plus 2 ms.
    The other metrics, fitted: within 0.9 % on this machine, 1.5 % (2.4 % median ITL) with a
    core held busy by another process; bound 3 %. The known profile's mean TPOT and throughput,
    which AIPerf averages over whole requests, within 0.8 % either way; bound 2 %. Its median
    ITL at concurrency 24 is left out: with a core held busy it moved by 3.7-7.2 %, one
    per-token gap at a time, as the server's event loop lagged."""
    pytest.importorskip("tokenizers")
    df = one(0, tmp_path, SMALL, slowdown=SLOWDOWN)["errors"]
    fitted = df[df.profile == "fitted"].set_index(["check", "row_id", "metric"]).error_pct
    assert set(fitted.index.get_level_values("row_id")) == {"c1", "c24", "c8"}
    assert len(fitted) == 3 * 5
    ttft = df[df.metric == "mean_ttft_ms"].assign(miss_ms=lambda t: t.measured - t.predicted)
    overhead_ms = ttft[ttft.profile == "known"].miss_ms.max()
    assert 0 < overhead_ms < 50, ttft.to_string()  # HTTP adds time; 50 ms would be a broken server
    assert ttft[ttft.profile == "fitted"].miss_ms.abs().max() <= overhead_ms + 2.0, ttft.to_string()
    assert fitted.drop("mean_ttft_ms", level="metric").abs().max() <= 3, fitted.to_string()
    # the known profile's decode is what AIPerf measured: the client agrees with the engine's steps
    known = df[(df.profile == "known") & df.metric.isin(["mean_tpot_ms", "output_throughput"])]
    assert known.error_pct.abs().max() <= 2, known.to_string()
