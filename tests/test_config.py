"""vLLM's startup checks and per-version defaults; scenario files and overrides."""

from __future__ import annotations

import math

import pytest
from conftest import engine_cfg

from sim.config import ScenarioError, apply_overrides, load_scenario, parse_override, scenario_from_dict


def test_max_num_batched_tokens_must_be_at_least_max_num_seqs():
    with pytest.raises(ScenarioError, match=r"max_num_batched_tokens \(64\) must be greater than or equal to max_num_seqs \(256\)"):
        engine_cfg(scheduler="vllm-v0", enable_chunked_prefill=True, max_num_batched_tokens=64)


def test_chunking_off_budget_must_cover_max_model_len():
    with pytest.raises(ScenarioError, match=r"is smaller than max_model_len \(4096\)"):
        engine_cfg(scheduler="vllm-v0", enable_chunked_prefill=False, max_model_len=4096,
                   max_num_batched_tokens=2048)


def test_max_model_len_must_fit_in_kv_cache():
    with pytest.raises(ScenarioError, match=r"max seq len \(102400\) is larger than the maximum number of tokens that can be stored in KV cache \(100928\)"):
        engine_cfg(scheduler="vllm-v0", max_model_len=102400, kv_cache_tokens=100928,
                   num_gpu_blocks_override=None, max_num_batched_tokens=4096)


def test_kv_capacity_must_be_given_once():
    with pytest.raises(ValueError, match="exactly one of num_gpu_blocks_override"):
        engine_cfg(kv_cache_tokens=1600)  # num_gpu_blocks_override also set by the helper


def test_v0_chunked_prefill_switches_on_above_32k_when_unset():
    assert engine_cfg(scheduler="vllm-v0", max_model_len=40000, num_gpu_blocks_override=4000).enable_chunked_prefill
    assert not engine_cfg(scheduler="vllm-v0", max_model_len=32768, num_gpu_blocks_override=4000).enable_chunked_prefill
    assert not engine_cfg(scheduler="vllm-v0", version="0.5.5", max_model_len=40000,
                          num_gpu_blocks_override=4000, max_num_batched_tokens=40000).enable_chunked_prefill


def test_v0_default_budget_per_version_and_mode():
    off = engine_cfg(scheduler="vllm-v0", enable_chunked_prefill=False, max_model_len=1024)
    assert off.max_num_batched_tokens == 2048  # max(max_model_len, 2048)
    off_long = engine_cfg(scheduler="vllm-v0", enable_chunked_prefill=False, max_model_len=8192,
                          num_gpu_blocks_override=1000)
    assert off_long.max_num_batched_tokens == 8192
    assert engine_cfg(scheduler="vllm-v0", version="0.6.3", enable_chunked_prefill=True).max_num_batched_tokens == 512
    assert engine_cfg(scheduler="vllm-v0", version="0.7.3", enable_chunked_prefill=True).max_num_batched_tokens == 2048
    assert off.max_num_seqs == 256


def test_v1_defaults_depend_on_version_and_gpu():
    h100_08 = engine_cfg(scheduler="vllm-v1", version="0.8.5", gpu="NVIDIA H100 80GB HBM3")
    assert (h100_08.max_num_batched_tokens, h100_08.max_num_seqs) == (8192, 256)
    a100_08 = engine_cfg(scheduler="vllm-v1", version="0.8.5", gpu="A100-SXM4-80GB")
    assert (a100_08.max_num_batched_tokens, a100_08.max_num_seqs) == (2048, 256)
    h100_09 = engine_cfg(scheduler="vllm-v1", version="0.9.2", gpu="H100")
    assert (h100_09.max_num_batched_tokens, h100_09.max_num_seqs) == (8192, 1024)
    h20_10 = engine_cfg(scheduler="vllm-v1", version="0.10.2", gpu="H20", gpu_memory_gib=96)
    assert (h20_10.max_num_batched_tokens, h20_10.max_num_seqs) == (8192, 1024)
    a100_10 = engine_cfg(scheduler="vllm-v1", version="0.10.2", gpu="A100", gpu_memory_gib=80)
    assert (a100_10.max_num_batched_tokens, a100_10.max_num_seqs) == (2048, 256)
    off = engine_cfg(scheduler="vllm-v1", version="0.10.2", enable_chunked_prefill=False,
                     max_model_len=512, gpu_memory_gib=24)
    assert off.max_num_batched_tokens == 512 and off.max_num_seqs == 256


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[engine]\nmax_model_len = 100\nkv_cache_tokens = 1600\nmax_num_batched_token = 5\n")
    with pytest.raises(ScenarioError, match=r"engine\.max_num_batched_token: Extra inputs are not permitted"):
        load_scenario(p)


def test_wrong_type_is_named(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('[engine]\nmax_model_len = "long"\nkv_cache_tokens = 1600\n')
    with pytest.raises(ScenarioError, match=r"engine\.max_model_len"):
        load_scenario(p)


def test_negative_rate_is_named(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[engine]\nmax_model_len = 100\nkv_cache_tokens = 1600\n[workload]\nrequest_rate = -1\n")
    with pytest.raises(ScenarioError, match=r"workload\.request_rate: Input should be greater than 0"):
        load_scenario(p)


def test_not_toml_is_reported(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[engine\n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(p)


def test_include_merges_and_scenario_wins(tmp_path):
    (tmp_path / "_base.toml").write_text("[engine]\nmax_model_len = 100\nkv_cache_tokens = 1600\nblock_size = 32\n")
    p = tmp_path / "s.toml"
    p.write_text('include = "_base.toml"\n[engine]\nblock_size = 8\n')
    sc = load_scenario(p)
    assert sc.engine.max_model_len == 100 and sc.engine.block_size == 8 and sc.name == "s"


def test_include_cycle_is_an_error(tmp_path):
    (tmp_path / "a.toml").write_text('include = "b.toml"\n')
    (tmp_path / "b.toml").write_text('include = "a.toml"\n')
    with pytest.raises(ScenarioError, match="includes itself"):
        load_scenario(tmp_path / "a.toml")


def test_set_overrides_any_key():
    assert parse_override("engine.max_num_batched_tokens=1024") == (["engine", "max_num_batched_tokens"], 1024)
    assert parse_override("workload.request_rate=inf")[1] == float("inf")
    assert parse_override("workload.dataset_name=sharegpt")[1] == "sharegpt"
    assert parse_override("engine.enable_chunked_prefill=false")[1] is False
    data = apply_overrides({"engine": {"max_model_len": 10}}, ["engine.max_model_len=20", "workload.seed=3"])
    assert data == {"engine": {"max_model_len": 20}, "workload": {"seed": 3}}
    with pytest.raises(ScenarioError, match="expected KEY=VALUE"):
        parse_override("engine.max_model_len")


def test_step_time_rejects_negative_coefficient(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[engine]\nmax_model_len = 100\nkv_cache_tokens = 1600\n[step_time]\nper_prefill_token_s = -1\n")
    with pytest.raises(ScenarioError, match="per_prefill_token_s must be a number >= 0"):
        load_scenario(p)


def test_a_roofline_coefficient_on_the_linear_model_is_an_error_not_ignored(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[engine]\nmax_model_len = 100\nkv_cache_tokens = 1600\n[step_time]\nper_prefill_token_s = 1e-4\n"
                 "cpu_overhead_s = 0.01\ncompute_efficiency = 0.5\n")
    with pytest.raises(ScenarioError, match="compute_efficiency, cpu_overhead_s: roofline coefficient"):
        load_scenario(p)


def test_v1_before_0_9_ignores_chunked_prefill_false():
    """vLLM 0.8.x V1 forces chunked prefill on (the flag is silently overridden)."""
    old = engine_cfg(scheduler="vllm-v1", version="0.8.2", enable_chunked_prefill=False,
                     max_num_batched_tokens=1024, max_model_len=4096, num_gpu_blocks_override=1000)
    assert old.enable_chunked_prefill
    new = engine_cfg(scheduler="vllm-v1", version="0.10.2", enable_chunked_prefill=False,
                     max_num_batched_tokens=4096, max_model_len=4096, num_gpu_blocks_override=1000)
    assert not new.enable_chunked_prefill


@pytest.mark.parametrize("key", ["frontend_latency_s", "frontend_per_request_s", "attention_efficiency"])
def test_a_step_time_coefficient_that_is_not_a_finite_number_is_refused_by_name(key):
    data = {"engine": {"max_model_len": 4096, "kv_cache_tokens": 100000},
            "workload": {"dataset_name": "random", "num_prompts": 5},
            "step_time": {"model": "qwen3-8b", "hardware": "a100-80g", key: math.inf}}
    with pytest.raises(ScenarioError, match=f"{key} = inf: a step-time coefficient must be a finite number"):
        scenario_from_dict(data)
