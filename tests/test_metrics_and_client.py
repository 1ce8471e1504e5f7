"""Metric definitions (vLLM's calculate_metrics), the report layout, and client timing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim.config import scenario_from_dict
from sim.metrics import calculate_metrics, format_report
from sim.request import Request, Status
from sim.runner import simulate


def _done(rid, start, times, prompt=10):
    r = Request(rid=rid, prompt_len=prompt, max_tokens=len(times), arrival_s=start, start_s=start)
    r.token_times = list(times)
    r.output_len = len(times)
    r.status = Status.FINISHED
    return r


def test_ttft_tpot_itl_e2el_are_vllms_definitions():
    a = _done(0, 0.0, [1.0, 1.5, 2.5])  # ttft 1, e2e 2.5, tpot (2.5-1)/2
    b = _done(1, 1.0, [1.25])  # one token: no TPOT, no ITL
    f = Request(rid=2, prompt_len=99, max_tokens=5, arrival_s=0, start_s=0, status=Status.FAILED, error="x")
    res = calculate_metrics([a, b, f], duration_s=4.0, percentile_metrics=["ttft", "tpot", "itl", "e2el"],
                            percentiles=[50, 99])
    m = res.metrics
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 20  # failed requests do not count
    assert m["total_output_tokens"] == 4
    assert m["mean_ttft_ms"] == pytest.approx((1000 + 250) / 2)
    assert m["mean_tpot_ms"] == pytest.approx(750.0)  # only requests with > 1 token
    assert m["mean_itl_ms"] == pytest.approx(750.0) and m["median_itl_ms"] == pytest.approx(750.0)
    assert m["p99_itl_ms"] == pytest.approx(np.percentile([500, 1000], 99))
    assert m["mean_e2el_ms"] == pytest.approx((2500 + 250) / 2)
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["output_throughput"] == pytest.approx(1.0)
    assert m["total_token_throughput"] == pytest.approx(6.0)


def test_goodput_counts_requests_meeting_every_slo():
    a = _done(0, 0.0, [1.0, 1.5, 2.5])
    b = _done(1, 0.0, [0.1, 0.2])
    res = calculate_metrics([a, b], 2.0, ["ttft"], [99], goodput={"ttft": 500})
    assert res.metrics["request_goodput"] == pytest.approx(0.5)


def test_report_layout_is_vllms():
    a = _done(0, 0.0, [1.0, 1.5, 2.5])
    text = format_report(calculate_metrics([a], 2.5, ["ttft", "tpot", "itl"], [99]))
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[1] == "Successful requests:                     1         "
    assert "---------------Time to First Token----------------" in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert "---------------Inter-token Latency----------------" in lines
    assert any(line.startswith("P99 ITL (ms):") for line in lines)
    assert lines[-1] == "=" * 50


def _scenario(**workload):
    return scenario_from_dict({
        "engine": {"scheduler": "vllm-v1", "max_model_len": 4096, "num_gpu_blocks_override": 2000,
                   "max_num_batched_tokens": 2048, "max_num_seqs": 64},
        "workload": {"dataset_name": "random", "random_input_len": 500, "random_output_len": 20,
                     "num_prompts": 4, **workload},
        "step_time": {"step_overhead_s": 0.01, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 1e-4},
    })


def test_concurrency_permit_wait_is_not_part_of_ttft():
    free = simulate(_scenario())
    capped = simulate(_scenario(max_concurrency=1))
    reqs = sorted(capped.requests, key=lambda r: r.start_s)
    # one at a time: each starts when the previous finished...
    for prev, nxt in zip(reqs, reqs[1:]):
        assert nxt.start_s == pytest.approx(prev.token_times[-1])
    # ...and each one's TTFT is a lone prefill, so all are equal and shorter than when all compete
    ttfts = capped.bench.requests["ttft_s"]
    assert ttfts.max() == pytest.approx(ttfts.min())
    assert capped.bench.metrics["mean_ttft_ms"] < free.bench.metrics["mean_ttft_ms"]
    assert capped.max_in_flight == 1


def test_front_door_rejects_prompt_plus_max_tokens_over_max_model_len():
    sc = scenario_from_dict({
        "engine": {"scheduler": "vllm-v1", "max_model_len": 520, "num_gpu_blocks_override": 200},
        "workload": {"dataset_name": "random", "random_input_len": 500, "random_output_len": 20,
                     "num_prompts": 3},
    })
    assert simulate(sc).bench.metrics["completed"] == 3  # 500 + 20 == 520 is allowed
    tight = simulate(sc.model_copy(update={"engine": sc.engine.model_copy(update={"max_model_len": 519})}))
    assert tight.bench.metrics["completed"] == 0 and tight.bench.metrics["failed"] == 3
    assert "maximum context length is 519 tokens" in tight.requests[0].error


def test_duration_runs_from_dispatch_start_to_last_completion():
    res = simulate(_scenario(request_rate=2.0))
    last = max(r.token_times[-1] for r in res.requests)
    assert res.bench.metrics["duration"] == pytest.approx(last)
    assert not math.isnan(res.bench.metrics["mean_ttft_ms"])
