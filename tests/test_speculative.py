"""Speculative decoding / MTP: k drafts verified per decode step, accepted in order."""

from __future__ import annotations

import numpy as np
import pytest

from sim.config import ScenarioError, scenario_from_dict
from sim.runner import simulate

STEP = {"step_overhead_s": 0.02, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 1e-4}


def _sc(scheduler="vllm-v1", k=0, rate=None, n=8, out=200):
    eng = ({"scheduler": "sglang", "context_length": 4096, "max_total_tokens": 50_000} if scheduler == "sglang"
           else {"scheduler": scheduler, "max_model_len": 4096, "kv_cache_tokens": 50_000})
    if k:
        eng.update(num_speculative_tokens=k, spec_acceptance_rate=rate)
    return scenario_from_dict({"engine": eng, "step_time": STEP,
                               "workload": {"dataset_name": "random", "num_prompts": n, "random_input_len": 100,
                                            "random_output_len": out, "random_range_ratio": 0.0,
                                            "ignore_eos": True}})


@pytest.mark.parametrize("scheduler", ["vllm-v1", "sglang"])
def test_accepted_drafts_cut_tpot_by_the_expected_tokens_per_step(scheduler):
    base = simulate(_sc(scheduler)).bench.metrics
    mtp = simulate(_sc(scheduler, k=1, rate=0.8), record_steps=True)
    m = mtp.bench.metrics
    # one draft accepted with p=0.8: 1.8 tokens per step on average, at almost the same step cost
    assert base["mean_tpot_ms"] / m["mean_tpot_ms"] == pytest.approx(1.8, rel=0.12)
    assert m["total_output_tokens"] == base["total_output_tokens"]  # exactly the requested lengths
    assert all(r.output_len == r.max_tokens for r in mtp.requests)


def test_tokens_of_one_step_arrive_as_one_chunk():
    res = simulate(_sc(k=3, rate=1.0, n=1, out=9))
    r = res.requests[0]
    assert len(r.token_times) == 9 and len(set(r.token_times)) == 3  # first token, then 4 + 4
    m = res.bench.metrics
    assert m["mean_itl_ms"] == pytest.approx(np.mean(np.diff(sorted(set(r.token_times)))) * 1000)


def test_zero_acceptance_emits_one_token_per_step_and_costs_the_verification():
    base = simulate(_sc()).bench.metrics
    none = simulate(_sc(k=2, rate=0.0)).bench.metrics
    assert none["mean_tpot_ms"] > base["mean_tpot_ms"]  # verifying 2 rejected drafts is not free


def test_speculation_needs_an_acceptance_model_and_a_supported_engine():
    with pytest.raises(ScenarioError, match="spec_acceptance_rate or spec_acceptance"):
        scenario_from_dict({"engine": {"scheduler": "vllm-v1", "max_model_len": 100, "kv_cache_tokens": 1600,
                                       "num_speculative_tokens": 2}})
    with pytest.raises(ScenarioError, match="modelled for vllm-v1 and sglang"):
        scenario_from_dict({"engine": {"scheduler": "vllm-v0", "max_model_len": 100, "kv_cache_tokens": 1600,
                                       "num_speculative_tokens": 1, "spec_acceptance_rate": 0.5}})
