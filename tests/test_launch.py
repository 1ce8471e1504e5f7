"""Launch commands of public benchmark pages read with the engines' own flag names."""

from __future__ import annotations

import pytest

from calibration.launch import LaunchError, engine_from_launch


def test_vllm_serve_flags_become_engine_settings():
    launch = engine_from_launch("vllm serve openai/gpt-oss-120b -tp 2 --max-model-len 32768 --async-scheduling "
                                "--max-num-batched-tokens 4096 --gpu-memory-utilization 0.85 --enforce-eager")
    assert (launch.engine, launch.model, launch.tp, launch.dp) == ("vllm", "openai/gpt-oss-120b", 2, 1)
    assert launch.settings == {"max_model_len": 32768, "max_num_batched_tokens": 4096, "enforce_eager": True,
                               "async_scheduling": True}
    assert launch.async_scheduling and launch.memory_fraction == 0.85 and launch.unmodelled == []


def test_sglang_flags_and_what_is_not_simulated_is_listed():
    launch = engine_from_launch("python3 -m sglang.launch_server --model-path zai-org/GLM-4.5-Air --tp-size 4 "
                                "--ep-size 4 --attention-backend fa3 --tool-call-parser glm --chunked-prefill-size 4096")
    assert (launch.engine, launch.model, launch.tp, launch.ep) == ("sglang", "zai-org/GLM-4.5-Air", 4, True)
    assert launch.settings == {"chunked_prefill_size": 4096}
    assert launch.unmodelled == ["--attention-backend fa3"]  # the tool-call parser does not touch timing


def test_other_engines_are_refused_by_name():
    with pytest.raises(LaunchError, match="'trtllm-serve' is neither"):
        engine_from_launch("trtllm-serve Qwen/Qwen3-14B --max_num_tokens=16384")


def test_a_public_run_becomes_a_scenario_that_runs():
    """A GPUStack row: the engine from its launch command, the dataset and the early stops from its
    columns, the KV pool from the memory formula; and it simulates."""
    from calibration.gpustack import load, row_run
    from sim.config import scenario_from_dict
    from sim.runner import simulate

    df = load()
    row = df[(df["launch_cmd"] == "vllm serve openai/gpt-oss-20b --async-scheduling --max-num-batched-tokens 4096")].iloc[0]
    run = row_run(row)
    eng, w = run.case.scenario["engine"], run.case.scenario["workload"]
    assert (run.model, run.hardware, run.tp) == ("gpt-oss-20b", "a100-80g", 1)
    assert eng["scheduler"] == "vllm-v1" and eng["max_num_batched_tokens"] == 4096 and eng["kv_cache_tokens"] > 100_000
    assert w["dataset_name"] == "sharegpt" and w["num_prompts"] == 1000 and w["request_rate"] == "inf"
    assert eng["async_scheduling"] is True and run.unmodelled == []  # simulated: the step overlaps
    random = row_run(df[(df["model"] == "openai/gpt-oss-20b") & (df["input_len"] == 4000)].iloc[0])
    assert random.case.scenario["workload"]["output_len_mean"] < 200  # without --ignore-eos, some stopped early
    data = {**run.case.scenario, "workload": {**w, "num_prompts": 20},
            "step_time": {"model": run.model, "hardware": run.hardware, "tp": run.tp}}
    assert simulate(scenario_from_dict(data)).bench.metrics["completed"] == 20
    assert row_run(df[df["engine"] == "TensorRT-LLM"].iloc[0]) is None  # not simulated


def test_vllm_ascend_0_9_1_schedules_whole_prompts_first_with_the_budget_at_max_model_len():
    """vllm-ascend 0.9.1 forces its AscendScheduler on models without MLA: prompts first, no decode
    in a step that prefills, no chunking, max_num_batched_tokens raised to max_model_len, KV blocks
    of 128. The simulated engine is vLLM's V0 policy with those settings; no decode shares a
    prefill step, and the pool and the budget follow."""
    from calibration.gpustack import load, row_run
    from sim.config import scenario_from_dict
    from sim.runner import simulate

    df = load()
    run = row_run(df[(df["engine"] == "vLLM-Ascend") & (df["model"] == "Qwen/Qwen3-8B")
                     & (df["input_len"] == 2000)].iloc[0])
    eng = run.case.scenario["engine"]
    assert (eng["scheduler"], eng["enable_chunked_prefill"], eng["block_size"], eng["max_model_len"]) == \
        ("vllm-v0", False, 128, 40960)
    data = {**run.case.scenario, "workload": {**run.case.scenario["workload"], "num_prompts": 60},
            "step_time": {"model": run.model, "hardware": run.hardware, "tp": run.tp}}
    sc = scenario_from_dict(data)
    assert sc.engine.max_num_batched_tokens == 40960
    res = simulate(sc, record_steps=True)
    assert res.bench.metrics["completed"] == 60
    assert not any(s.shape.prefill_tokens and s.shape.decode_seqs for s in res.steps)  # never mixed
    assert max(s.shape.prefill_tokens for s in res.steps) > 2048  # whole prompts, many per step
