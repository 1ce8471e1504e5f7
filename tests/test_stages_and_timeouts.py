"""inference-perf's load shapes: sequential load stages, and a client request timeout."""

from __future__ import annotations

import numpy as np
import pytest

from sim.cli import main
from sim.config import ScenarioError, scenario_from_dict
from sim.runner import simulate
from sim.workload import stage_offsets

ROOF = {"model": "llama-2-7b", "hardware": "a100-80g", "frontend_latency_s": 0.01}


def _sc(workload: dict, **engine) -> dict:
    return {"engine": {"scheduler": "vllm-v1", "max_model_len": 4096, "num_gpu_blocks_override": 2000, **engine},
            "workload": {"dataset_name": "random", "random_input_len": 500, "random_output_len": 100, **workload},
            "step_time": ROOF}


def test_constant_stage_rescales_exponential_gaps_to_end_exactly_at_the_duration():
    """inference-perf's ConstantLoadTimer: n normalised exponential gaps, the last request at the
    stage's end; so not evenly spaced (the first arrives after one gap, not at 0)."""
    t = stage_offsets(np.random.default_rng(0), 200, 4.0, 50.0, "constant")
    assert len(t) == 200 and t[-1] == pytest.approx(50.0) and t[0] > 0
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.2)  # exponential, not constant spacing


def test_poisson_stage_draws_per_second_counts_until_it_has_its_requests():
    t = stage_offsets(np.random.default_rng(1), 400, 8.0, 50.0, "poisson")
    assert len(t) == 400 and np.all(np.diff(t) >= 0)
    per_second = np.bincount(np.floor(t - 1e-12).astype(int))
    assert per_second.mean() == pytest.approx(8.0, rel=0.1)


def test_stages_run_one_after_another_with_inference_perfs_pauses():
    res = simulate(scenario_from_dict(_sc({"stages": [{"rate": 3, "duration": 10}, {"rate": 6, "duration": 5}]})))
    req = res.bench.requests
    assert req.groupby("stage").size().tolist() == [30, 30]
    end0 = (req[req.stage == 0].start_s + req[req.stage == 0].e2el_s).max()
    first1 = req[req.stage == 1].arrival_s.min()
    # polled once a second from the stage's set-up (t = -1 for the first), then load.interval (1 s),
    # then the next timer starts 1 s later; its first request comes one gap after that
    set_up = -1 + np.ceil(end0 + 1) + 1.0
    assert set_up + 1.0 < first1 < set_up + 1.0 + 5.0
    assert req[req.stage == 1].arrival_s.max() == pytest.approx(set_up + 1.0 + 5.0)


def test_stage_settings_are_checked():
    with pytest.raises(ScenarioError, match="num_prompts .* contradicts the stages, which send 30"):
        scenario_from_dict(_sc({"stages": [{"rate": 3, "duration": 10}], "num_prompts": 50}))
    with pytest.raises(ScenarioError, match="leave request_rate unset"):
        scenario_from_dict(_sc({"stages": [{"rate": 3, "duration": 10}], "request_rate": 2.0}))
    with pytest.raises(ScenarioError, match="stage 0 has rate x duration < 1"):
        scenario_from_dict(_sc({"stages": [{"rate": 0.1, "duration": 5}]}))


@pytest.mark.parametrize("scheduler", ["vllm-v0", "vllm-v1", "sglang"])
def test_a_timed_out_request_fails_and_the_server_frees_it(scheduler):
    """Overload with a 3 s deadline: requests not done by then fail (no latency of theirs is
    counted), their KV is freed by an abort (the run ends with an empty pool, which simulate
    checks), and the ones that finish in time are measured as usual."""
    eng = {"scheduler": "sglang", "context_length": 4096, "kv_cache_tokens": 32000} if scheduler == "sglang" else \
        {"scheduler": scheduler}
    data = _sc({"num_prompts": 200, "request_rate": 18.0, "request_timeout_s": 3.0, "random_output_len": 50})
    data["engine"] = {**data["engine"], **eng} if scheduler != "sglang" else eng
    res = simulate(scenario_from_dict(data))
    req, m = res.bench.requests, res.bench.metrics
    timed_out = req.error.str.startswith("timeout")
    assert 20 < timed_out.sum() < 190 and m["failed"] == timed_out.sum()
    assert req[req.success].e2el_s.max() < 3.0
    assert req[timed_out].ttft_s.isna().all()
    # the duration is the client's: its last request ended, or it gave up on it
    assert m["duration"] == pytest.approx((req.start_s + req.e2el_s.fillna(3.0)).max(), rel=1e-9)
    without = simulate(scenario_from_dict({**data, "workload": {**data["workload"], "request_timeout_s": None}}))
    assert without.bench.metrics["failed"] == 0
    # aborting frees memory for the rest: the requests that do finish start sooner than without
    assert m["mean_ttft_ms"] < without.bench.metrics["mean_ttft_ms"]


def test_timeouts_release_concurrency_permits():
    data = _sc({"num_prompts": 60, "max_concurrency": 8, "request_timeout_s": 0.5, "random_output_len": 200})
    res = simulate(scenario_from_dict(data))
    assert res.bench.metrics["failed"] == 60  # 200 tokens never fit in 0.5 s at ~20 ms each
    assert res.max_in_flight <= 8


def test_timeout_with_pd_is_refused_with_the_reason():
    data = _sc({"request_timeout_s": 5.0})
    data["deployment"] = {"mode": "pd"}
    with pytest.raises(ScenarioError, match="request_timeout_s: aborting .* not modelled"):
        scenario_from_dict(data)


def test_report_header_says_what_a_staged_run_sent(tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text('[engine]\nscheduler = "vllm-v1"\nmax_model_len = 4096\nnum_gpu_blocks_override = 2000\n'
                 '[workload]\ndataset_name = "random"\nrandom_input_len = 300\nrandom_output_len = 50\n'
                 'stages = [{rate = 2, duration = 5}, {rate = 4, duration = 5}]\n'
                 '[step_time]\nmodel = "llama-2-7b"\nhardware = "a100-80g"\n')
    assert main(["run", str(p)]) == 0
    out = capsys.readouterr().out
    assert "Traffic: 2 load stages, constant arrivals (inference-perf)" in out
    assert "stage 0: 10 requests sent over" in out and "configured 2 req/s for 5 s" in out
    assert "stage 1: 20 requests" in out and "request rate: inf" not in out
    assert "stage  requests  failed  mean TTFT (ms)" in out
