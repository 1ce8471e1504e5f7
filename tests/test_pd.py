"""Prefill/decode disaggregation rules (engine-semantics.md §E), one test each."""

from __future__ import annotations

import pytest

from sim.config import scenario_from_dict
from sim.runner import simulate

STEP = {"step_overhead_s": 0.01, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 1e-4}


def _sc(design="sglang", n=1, inp=1000, out=5, kv=100_000, link=None, decode_kv=None, dep=None, **wl):
    sglang = design == "sglang"
    eng = ({"scheduler": "sglang", "context_length": 8192, "max_total_tokens": kv, "chunked_prefill_size": 8192}
           if sglang else {"scheduler": "vllm-v1", "max_model_len": 8192, "kv_cache_tokens": kv})
    data = {
        "engine": eng,
        "deployment": {"mode": "pd", "pd_design": design, **(dep or {})},
        "workload": {"dataset_name": "random", "num_prompts": n, "random_input_len": inp, "random_output_len": out,
                     "random_range_ratio": 1.0 if sglang else 0.0, "client": "sglang" if sglang else "vllm", **wl},
        "step_time": STEP,
        "kv_transfer": link or {"latency_s": 0.005, "bandwidth_gbps": 1.0, "bytes_per_token": 1000.0},
    }
    if decode_kv:
        data["decode"] = {"engine": {"max_total_tokens": decode_kv} if sglang
                          else {"kv_cache_tokens": decode_kv, "max_model_len": 2048}}
    return scenario_from_dict(data)


def test_transfer_takes_latency_plus_bytes_over_bandwidth_and_p_holds_kv_until_it_ends():
    res = simulate(_sc(), record_steps=True)
    (t,) = res.transfers
    assert t.end_s - t.start_s == pytest.approx(0.005 + 1000 * 1000 / 1e9)
    p_steps, d_steps = res.instance_steps
    assert p_steps[0].kv_blocks_used == 1000  # the prompt's KV on P during the prefill...
    assert t.start_s == pytest.approx(p_steps[0].t_start_s + p_steps[0].duration_s)  # ...sent after it


def test_sglang_first_token_is_ps_and_arrives_when_the_transfer_ends():
    res = simulate(_sc("sglang"))
    (t,) = res.transfers
    r = res.requests[0]
    assert r.token_times[0] == pytest.approx(t.end_s)  # no decode step before the first token
    assert len(r.token_times) == 5


def test_vllm_decode_recomputes_the_last_prompt_token_for_the_first_token():
    res = simulate(_sc("vllm"), record_steps=True)
    (t,) = res.transfers
    r = res.requests[0]
    d_first = res.instance_steps[1][0]
    assert d_first.shape.prefill_tokens == 1  # the last prompt token, recomputed on D
    assert r.token_times[0] == pytest.approx(t.end_s + d_first.duration_s)


def test_sglang_decode_preallocation_throttles_prefill():
    # D holds prompt + 512 reserved tokens per request: with room for two, the third request
    # cannot start its prefill until one of the first two finishes decoding
    res = simulate(_sc("sglang", n=3, inp=1000, out=50, decode_kv=3100), record_steps=True)
    starts = sorted(s.t_start_s for s in res.instance_steps[0] if s.shape.prefill_tokens)
    first_done = min(r.token_times[-1] for r in res.requests)
    assert len(starts) >= 2 and starts[-1] >= first_done - 1e-9
    assert res.bench.metrics["completed"] == 3


def test_vllm_decode_admits_whole_prompt_fifo_after_prefill():
    res = simulate(_sc("vllm", n=3, inp=1000, out=50, decode_kv=2300), record_steps=True)
    t = sorted(res.transfers, key=lambda x: x.start_s)
    # only two prompts fit on D at once: the third transfer waits for a completion on D
    first_done = min(r.token_times[-1] for r in res.requests)
    assert t[2].start_s >= first_done - 1e-9
    assert res.bench.metrics["completed"] == 3


def test_layerwise_push_hides_the_transfer_behind_the_prefill():
    def run(layerwise):
        sc = scenario_from_dict({
            "engine": {"scheduler": "vllm-v1", "max_model_len": 8192, "kv_cache_tokens": 100_000},
            "deployment": {"mode": "pd"},
            "workload": {"dataset_name": "random", "num_prompts": 1, "random_input_len": 4000,
                         "random_output_len": 2},
            "step_time": {"model": "deepseek-r1-fp8", "hardware": "h20", "tp": 8},
            "kv_transfer": {"latency_s": 0.0, "bandwidth_gbps": 2.0, "layerwise": layerwise},
        })
        res = simulate(sc)
        return res.transfers[0].end_s - res.transfers[0].start_s
    plain, layered = run(False), run(True)
    assert plain == pytest.approx(4000 * 70_272 / 2e9)
    assert layered < plain / 2  # only what the prefill could not hide remains


def test_mla_kv_bytes_are_per_rank_replicated_gqa_sharded():
    base = {"engine": {"scheduler": "vllm-v1", "max_model_len": 8192, "kv_cache_tokens": 100_000},
            "deployment": {"mode": "pd"},
            "workload": {"dataset_name": "random", "num_prompts": 1, "random_input_len": 1000, "random_output_len": 2}}
    ds = simulate(scenario_from_dict({**base, "step_time": {"model": "deepseek-r1-fp8", "hardware": "h20", "tp": 8}}))
    qw = simulate(scenario_from_dict({**base, "step_time": {"model": "qwen2.5-72b-instruct-gptq-int4",
                                                             "hardware": "h100-80g", "tp": 8}}))
    assert ds.transfers[0].bytes == 1000 * 70_272
    assert qw.transfers[0].bytes == 1000 * 327_680 / 8


def test_pd_roles_take_their_own_engine_settings():
    sc = scenario_from_dict({
        "engine": {"scheduler": "vllm-v1", "max_model_len": 8192, "kv_cache_tokens": 100_000},
        "deployment": {"mode": "pd", "prefill_instances": 2, "decode_instances": 1},
        "prefill": {"engine": {"max_num_batched_tokens": 16384, "max_num_seqs": 8}},
        "decode": {"engine": {"max_num_batched_tokens": 256, "max_num_seqs": 40}},
        "workload": {"dataset_name": "random", "num_prompts": 10, "random_input_len": 500, "random_output_len": 20},
        "step_time": STEP, "kv_transfer": {"bytes_per_token": 100.0},
    })
    res = simulate(sc, record_steps=True)
    p_steps = [s for steps in res.instance_steps[:2] for s in steps]
    assert max(s.shape.num_seqs for s in p_steps) <= 8
    assert max(s.num_tokens for s in res.instance_steps[2]) <= 256
    assert res.bench.metrics["completed"] == 10


def test_vllm_ascend_recompute_scheduler_sends_a_starved_request_back_through_p():
    """With the recompute scheduler a decode request D cannot grow is aborted, prefilled again on
    P with the tokens it already generated, transferred, and finishes; the client's stream has one
    long gap instead of a local recompute. Without it D preempts and recomputes locally."""
    def run(recompute: bool):
        return simulate(_sc(design="vllm", n=6, inp=300, out=300, decode_kv=2400,
                            dep={"recompute_scheduler": recompute}))

    on, off = run(True), run(False)
    assert on.num_recomputes > 0 and off.num_recomputes == 0 and off.num_preemptions > 0
    assert on.bench.metrics["completed"] == off.bench.metrics["completed"] == 6
    moved = [t.rid for t in on.transfers]
    assert len(moved) == 6 + on.num_recomputes  # one extra transfer per re-prefill
    again = [t for t in on.transfers if moved.count(t.rid) > 1]
    assert max(t.bytes for t in again) > 300 * 1000  # prompt plus generated tokens cross the link
    for r in on.requests:
        assert len(r.token_times) == r.max_tokens == 300


def test_recompute_scheduler_needs_the_vllm_design():
    from sim.config import ScenarioError

    with pytest.raises(ScenarioError, match="recompute_scheduler"):
        simulate(_sc(design="sglang", dep={"recompute_scheduler": True}))


def test_sglang_decode_retracts_a_stalled_chunked_prompt_when_transferred_requests_hold_the_pool():
    """An SGLang decode instance (vLLM-style hand-off) whose pool is held by transferred requests
    waiting behind a retracted request that is being prefilled again in chunks: the chunk gets
    no page and nothing runs that could free one. The chunked request is retracted again so the
    waiting requests run; before, the run ended in SimulationStuck (found by the random search)."""
    data = {
        "kv_transfer": {"latency_s": 0.0, "bandwidth_gbps": 1e-6, "layerwise": False, "bytes_per_token": 1.0},
        "engine": {"scheduler": "sglang", "block_size": 1, "context_length": 99, "chunked_prefill_size": 1,
                   "max_prefill_tokens": 1, "max_running_requests": 4, "kv_cache_tokens": 208,
                   "enable_mixed_chunk": False, "disable_radix_cache": False, "radix_chunk_tokens": 1,
                   "num_speculative_tokens": 2, "spec_acceptance_rate": 0.0},
        "deployment": {"mode": "pd", "prefill_instances": 1, "decode_instances": 1, "pd_design": "vllm",
                       "reserved_decode_tokens": 0, "router": "round_robin"},
        "workload": {"dataset_name": "random", "client": "vllm", "num_prompts": 23, "random_input_len": 36,
                     "random_output_len": 44, "random_range_ratio": 0.5, "request_rate": "inf",
                     "burstiness": 0.5, "seed": 164, "max_concurrency": 5},
        "step_time": {"step_overhead_s": 0.001, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 1e-4,
                      "per_decode_ctx_token_s": 1e-7},
    }
    res = simulate(scenario_from_dict(data))
    m = res.bench.metrics
    assert m["completed"] + m["failed"] == 23 and m["completed"] > 0
    assert res.num_preemptions > 0
    for r in res.requests:
        if not r.error:
            assert len(r.token_times) == r.max_tokens


def test_decode_engine_wakes_when_a_one_token_request_frees_its_preallocated_kv():
    """SGLang design: D pre-allocates a request's KV; one with max_tokens = 1 finishes when its
    KV lands (P's token is its only one) and frees that memory. A request waiting on D for
    exactly that memory (preempted, needing its whole context back) must be planned again then;
    before, the idle D engine was not woken and the run ended in SimulationStuck (found by the
    random invariant test, kept as a regression test; since a failed turn's message leaves the
    conversation, workload seed 134 is one that ends stuck without that wake-up)."""
    data = {
        "kv_transfer": {"latency_s": 0.0, "bandwidth_gbps": 1e-6, "layerwise": False, "bytes_per_token": 1.0},
        "engine": {"scheduler": "vllm-v1", "enable_chunked_prefill": False, "block_size": 1, "max_model_len": 315,
                   "max_num_seqs": 2, "max_num_batched_tokens": 315, "num_gpu_blocks_override": 410,
                   "enable_prefix_caching": False},
        "deployment": {"mode": "pd", "prefill_instances": 1, "decode_instances": 1, "pd_design": "sglang",
                       "reserved_decode_tokens": 0, "router": "round_robin"},
        "workload": {"dataset_name": "random", "client": "vllm-legacy", "num_prompts": 10, "random_input_len": 210,
                     "random_output_len": 32, "random_range_ratio": 0.0, "request_rate": "inf", "burstiness": 0.5,
                     "seed": 134, "random_prefix_len": 0, "turns": 2},
        "step_time": {"step_overhead_s": 0.001, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 1e-4,
                      "per_decode_ctx_token_s": 1e-7},
    }
    res = simulate(scenario_from_dict(data))
    m = res.bench.metrics
    assert m["completed"] + m["failed"] == len(res.requests) and m["completed"] > 0
    assert res.num_preemptions > 0
    assert any(r.max_tokens == 1 and not r.error for r in res.requests)  # the request that frees the memory
