"""`servesim compare` and pluggable policies."""

from __future__ import annotations

import pytest

from sim.cli import main
from sim.config import ScenarioError, scenario_from_dict
from sim.runner import simulate
from tests.conftest import apply, req

SPF = "examples/policies/shortest_prompt_first.py:ShortestPromptFirst"


def test_an_identical_candidate_passes(capsys):
    assert main(["compare", "--baseline", "vllm-v1", "--candidate", "vllm-v1", "--seeds", "2", "--no-progress"]) == 0
    assert "no regressions" in capsys.readouterr().out


def test_a_deliberately_worse_candidate_fails_on_ttft(tmp_path, capsys):
    out = tmp_path / "cmp.csv"
    rc = main(["compare", "--baseline", "vllm-v1", "--candidate",
               "engine.max_num_batched_tokens=64; engine.max_num_seqs=64", "--seeds", "2", "--no-progress",
               "--output", str(out)])
    assert rc == 1
    text = out.read_text()
    assert any(line.split(",")[1] == "mean_ttft_ms" and line.endswith("WORSE") for line in text.splitlines())


def test_bad_policies_are_named():
    with pytest.raises(ScenarioError, match="policy 'nonsense'"):
        from sim.compare import policy_overrides

        policy_overrides("nonsense")
    base = {"engine": {"scheduler": "vllm-v1", "max_model_len": 512, "num_gpu_blocks_override": 100},
            "step_time": {"step_overhead_s": 0.01}}
    for spec, msg in [("missing.py:X", "file not found"), ("sim.request:Request", "not a subclass"),
                      ("no_such_module_xyz:X", "cannot import")]:
        with pytest.raises(ScenarioError, match=f"engine.policy.*{msg}"):
            scenario_from_dict({**base, "engine": {**base["engine"], "policy": spec}})


def test_a_user_policy_file_is_loaded_and_changes_the_order():
    from sim.config import EngineConfig, resolve_engine_defaults
    from sim.instance import make_kv_cache
    from sim.schedulers import make_scheduler

    cfg = resolve_engine_defaults(EngineConfig(scheduler="vllm-v1", max_model_len=4096, num_gpu_blocks_override=1000,
                                               max_num_batched_tokens=4096, max_num_seqs=2, policy=SPF))
    s = make_scheduler(cfg, make_kv_cache(cfg))
    assert type(s).__name__ == "ShortestPromptFirst"
    long_, short, mid = req(900), req(100), req(400)
    for r in (long_, short, mid):
        s.add(r)
    b = s.schedule()
    apply(b)
    assert b.reqs == [short, mid]  # shortest first, two seats


def test_shortest_prompt_first_lowers_mean_ttft_under_a_backlog():
    data = {"engine": {"scheduler": "vllm-v1", "max_model_len": 4096, "num_gpu_blocks_override": 2000,
                       "max_num_batched_tokens": 2048},
            "step_time": {"step_overhead_s": 0.01, "per_prefill_token_s": 2e-4, "per_decode_seq_s": 1e-4},
            "workload": {"dataset_name": "random", "num_prompts": 100, "random_input_len": 1500,
                         "random_output_len": 20, "random_range_ratio": 0.9}}
    base = simulate(scenario_from_dict(data)).bench.metrics
    data["engine"]["policy"] = SPF
    spf = simulate(scenario_from_dict(data)).bench.metrics
    assert spf["mean_ttft_ms"] < 0.9 * base["mean_ttft_ms"]
