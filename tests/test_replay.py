"""Replaying a recorded schedule with other step times equals simulating again (when exact)."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.replay import durations, replay, trace_from
from sim.config import scenario_from_dict
from sim.runner import simulate

KEYS = ["duration", "completed", "total_output_tokens", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
        "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
        "mean_e2el_ms"]


def _sc(workload, step_time, **engine):
    eng = {"scheduler": "vllm-v0", "enable_chunked_prefill": True, "max_model_len": 700,
           "max_num_batched_tokens": 256, "max_num_seqs": 32, "num_gpu_blocks_override": 120, **engine}
    wl = {"dataset_name": "random", "num_prompts": 120, "random_input_len": 300, "random_output_len": 120,
          "random_range_ratio": 0.9, **workload}
    return scenario_from_dict({"engine": eng, "workload": wl, "step_time": step_time})


A = {"step_overhead_s": 0.01, "per_prefill_token_s": 2e-4, "per_decode_seq_s": 2e-4, "per_decode_ctx_token_s": 1e-7}
B = {"step_overhead_s": 0.03, "per_prefill_token_s": 5e-4, "per_decode_seq_s": 1e-4, "per_decode_ctx_token_s": 4e-7}


def _check(sc_a, sc_b):
    rec = simulate(sc_a, record_steps=True)
    tr = trace_from(rec)
    assert tr.exact
    same = replay(tr, tr.recorded_dt)
    for k in KEYS:
        assert same[k] == pytest.approx(rec.bench.metrics[k], rel=1e-9, abs=1e-9), k
    truth = simulate(sc_b).bench.metrics
    dt_b = durations(tr, sc_b.step_time.build())
    other = replay(tr, dt_b)
    for k in KEYS:
        assert other[k] == pytest.approx(truth[k], rel=1e-9, abs=1e-9), k


@pytest.mark.parametrize("scheduler,chunking", [("vllm-v0", True), ("vllm-v0", False), ("vllm-v1", True)])
def test_replay_is_exact_for_all_at_once_arrivals_with_preemption(scheduler, chunking):
    eng = {"scheduler": scheduler, "enable_chunked_prefill": chunking}
    if not chunking:
        eng["max_num_batched_tokens"] = 700
    wl = {"request_rate": "inf"}
    _check(_sc(wl, A, **eng), _sc(wl, B, **eng))


def test_replay_is_exact_for_closed_loop_concurrency_with_rejections():
    wl = {"request_rate": "inf", "max_concurrency": 8, "random_input_len": 500}  # some exceed max_model_len
    sc = _sc(wl, A)
    assert simulate(sc).bench.metrics["failed"] > 0
    _check(sc, _sc(wl, B))


def test_replay_is_exact_for_closed_loop_concurrency_when_every_request_finishes():
    wl = {"request_rate": "inf", "max_concurrency": 8, "random_input_len": 200}
    sc = _sc(wl, A)
    assert simulate(sc).bench.metrics["failed"] == 0
    _check(sc, _sc(wl, B))


def test_replay_of_some_metrics_gives_the_same_values_as_of_all():
    tr = trace_from(simulate(_sc({"request_rate": "inf", "max_concurrency": 8}, A), record_steps=True))
    full = replay(tr, tr.recorded_dt * 1.3)
    for only in ({"mean_ttft_ms"}, {"mean_tpot_ms", "output_throughput"}, {"median_itl_ms", "p99_e2el_ms"}):
        part = replay(tr, tr.recorded_dt * 1.3, only=only)
        assert {k for k in part if k.endswith("_ms")} == only - {"output_throughput"}
        for k in part:
            assert part[k] == full[k], k


def test_replay_flags_timed_arrivals_as_approximate():
    rec = simulate(_sc({"request_rate": 2.0, "num_prompts": 30}, A), record_steps=True)
    tr = trace_from(rec)
    assert not tr.exact
    # still exact for the step times it was recorded with
    m = replay(tr, tr.recorded_dt)
    for k in KEYS:
        assert m[k] == pytest.approx(rec.bench.metrics[k], rel=1e-9, abs=1e-9), k


def test_replay_is_exact_when_the_front_end_latency_changes():
    roof = {"model": "qwen2.5-72b-instruct-gptq-int4", "hardware": "a100-80g"}
    wl = {"request_rate": "inf"}
    sc_a = _sc(wl, {**roof, "frontend_latency_s": 0.05})
    sc_b = _sc(wl, {**roof, "frontend_latency_s": 0.2, "compute_efficiency": 0.3})
    rec = simulate(sc_a, record_steps=True)
    tr = trace_from(rec)
    assert tr.exact
    assert not trace_from(simulate(_sc({**wl, "max_concurrency": 16}, {**roof, "frontend_latency_s": 0.05}),
                                   record_steps=True)).exact
    st_b = sc_b.step_time.build()
    other = replay(tr, durations(tr, st_b), frontend_latency_s=0.2)
    truth = simulate(sc_b).bench.metrics
    for k in KEYS:
        assert other[k] == pytest.approx(truth[k], rel=1e-9, abs=1e-9), k


def test_weighted_percentile_equals_numpy_on_the_expanded_data():
    from calibration.replay import weighted_percentile

    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.normal(size=rng.integers(1, 30))
        c = rng.integers(1, 6, size=len(x))
        full = np.repeat(x, c)
        for p in (0, 1, 50, 90, 99, 99.9, 100):
            assert weighted_percentile(x, c, p) == pytest.approx(np.percentile(full, p), abs=1e-12)


# --- on random scenarios ------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_properties import scenarios, wall_clock_guard  # noqa: E402

ROOF = {"model": "llama-2-7b", "hardware": "a100-80g"}


@st.composite
def roofline_coeffs(draw):
    return {**ROOF, "step_overhead_s": draw(st.sampled_from([1e-4, 3e-3, 2e-2])),
            "per_seq_s": draw(st.sampled_from([0.0, 1e-4])),
            "compute_efficiency": draw(st.sampled_from([0.1, 0.5])),
            "memory_efficiency": draw(st.sampled_from([0.3, 0.8])),
            "prefill_overhead_s": draw(st.sampled_from([0.0, 5e-3])),
            "frontend_latency_s": draw(st.sampled_from([0.0, 0.0, 2e-3, 0.05]))}


@st.composite
def one_engine(draw):
    data = draw(scenarios())
    data.pop("kv_transfer", None)
    data["deployment"] = {}
    if data["workload"].get("turns", 1) > 1:
        data["workload"]["think_time_s"] = draw(st.sampled_from([0.0, 0.0, 0.01]))
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(one_engine(), roofline_coeffs(), roofline_coeffs())
def test_replay_equals_simulation_whenever_it_says_it_is_exact(data, a, b):
    """Timed arrivals, concurrency permits, conversations with think times, rejections, every
    scheduler: re-timing a run with its own step times gives the run, and whenever the trace
    says a replay with other step times (and front-end latency) is exact, it is the simulation."""
    sc_a = scenario_from_dict({**data, "step_time": a})
    sc_b = scenario_from_dict({**data, "step_time": b})
    with wall_clock_guard(30):
        rec = simulate(sc_a, record_steps=True)
        tr = trace_from(rec)
        same = replay(tr, tr.recorded_dt)
        for k in KEYS:
            assert same[k] == pytest.approx(rec.bench.metrics[k], rel=1e-9, abs=1e-6), k
        if tr.exact_at(b["frontend_latency_s"]):
            truth = simulate(sc_b).bench.metrics
            other = replay(tr, durations(tr, sc_b.step_time.build()), frontend_latency_s=b["frontend_latency_s"])
            for k in KEYS:
                assert other[k] == pytest.approx(truth[k], rel=1e-9, abs=1e-6), k


def test_a_burst_reaches_the_scheduler_after_the_front_end_has_processed_all_of_it():
    """The API server's event loop runs each stage for every queued request before the next stage
    of the first: requests sent at one instant reach the scheduler together, N x the time per
    request later. The replay of such a run with other coefficients equals simulating again."""
    roof = {"model": "qwen2.5-72b-instruct-gptq-int4", "hardware": "a100-80g"}
    wl = {"request_rate": "inf"}
    base = simulate(_sc(wl, {**roof, "frontend_latency_s": 0.05}), record_steps=True)
    sc_a = _sc(wl, {**roof, "frontend_latency_s": 0.05, "frontend_per_request_s": 0.01})
    rec = simulate(sc_a, record_steps=True)
    # the whole schedule moves by 120 requests x 10 ms: no step starts before all have arrived
    assert rec.steps[0].t_start_s == pytest.approx(base.steps[0].t_start_s + 1.2, rel=1e-12)
    assert rec.bench.metrics["mean_ttft_ms"] == pytest.approx(base.bench.metrics["mean_ttft_ms"] + 1200, rel=1e-9)
    assert rec.bench.metrics["mean_tpot_ms"] == pytest.approx(base.bench.metrics["mean_tpot_ms"], rel=1e-9)
    tr = trace_from(rec)
    assert tr.exact and tr.burst == 120
    sc_b = _sc(wl, {**roof, "frontend_latency_s": 0.02, "frontend_per_request_s": 0.003, "compute_efficiency": 0.3})
    other = replay(tr, durations(tr, sc_b.step_time.build()), frontend_latency_s=tr.delay(0.02, 0.003))
    truth = simulate(sc_b).bench.metrics
    for k in KEYS:
        assert other[k] == pytest.approx(truth[k], rel=1e-9, abs=1e-9), k


def test_requests_sent_while_the_front_end_is_busy_wait_for_its_next_round(tmp_path):
    """Timed arrivals: a request sent to an idle front end waits its own processing time; one
    sent during a round waits for that round to end and for the round it joins."""
    import pandas as pd

    trace = tmp_path / "run.csv"
    pd.DataFrame({"arrival_s": [0.0, 0.2, 0.3, 2.3], "input_len": [10] * 4, "output_len": [1] * 4}).to_csv(trace, index=False)

    def ttfts(per_request: float) -> list[float]:
        sc = scenario_from_dict({
            "engine": {"scheduler": "vllm-v1", "max_model_len": 2048, "num_gpu_blocks_override": 400},
            "workload": {"dataset_name": "trace", "trace_path": str(trace)},
            "step_time": {"model": "qwen3-8b", "hardware": "a100-80g", "frontend_per_request_s": per_request}})
        return [r.first_token_s - r.start_s for r in sorted(simulate(sc).requests, key=lambda r: r.arrival_s)]

    waits = np.array(ttfts(0.5)) - np.array(ttfts(0.0))
    # 0 alone (0.0 -> 0.5); 1 and 2 arrive during it and go together (0.5 -> 1.5); 3 alone (2.3 -> 2.8)
    assert waits == pytest.approx([0.5, 1.3, 1.2, 0.5], abs=0.01)
