"""Prefix caching: vLLM V1's block-hash cache with its LRU free queue, SGLang's radix cache,
and the workloads that share prefixes (a shared prefix, multi-turn conversations)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from sim.config import ScenarioError, scenario_from_dict
from sim.request import Request
from sim.runner import simulate
from tests.conftest import apply, engine_cfg, make_sched
from tests.test_properties import scenarios


def shared(rid: int, prefix: int, own: int, out: int = 4) -> Request:
    r = Request(rid=rid, prompt_len=prefix + own, max_tokens=out, arrival_s=0.0)
    r.segments = ((0, prefix), (1000 + rid, own))
    r.out_segment = 2000 + rid
    return r


def run_until_done(s, reqs) -> None:
    for _ in range(200):
        if all(r.output_len >= r.max_tokens for r in reqs):
            break
        b = s.schedule()
        apply(b)
        for r in b.reqs:
            if s.kv.prefix:
                s.kv.prefix.register(r)
        done = [r for r in b.reqs if r.output_len >= r.max_tokens]
        for r in done:
            r.status = r.status.FINISHED
        s.release_lingering()  # as the engine does after every step (SGLang's overlap: one step late)
        s.release_finished(done)
    s.release_lingering()  # the step after the last completion


def test_defaults_v1_caches_prefixes_v0_does_not_sglang_radix_on():
    assert engine_cfg(scheduler="vllm-v1").enable_prefix_caching is True
    assert engine_cfg(scheduler="vllm-v0").enable_prefix_caching is False
    assert engine_cfg(scheduler="sglang", num_gpu_blocks_override=None, kv_cache_tokens=4000).disable_radix_cache is False
    with pytest.raises(ScenarioError, match="enable_prefix_caching: prefix caching is modelled for vllm-v1"):
        engine_cfg(scheduler="vllm-v0", enable_prefix_caching=True)


def test_v1_hit_covers_full_blocks_and_only_the_rest_is_computed():
    s = make_sched(scheduler="vllm-v1", block_size=16, max_num_batched_tokens=4096)
    a = shared(1, prefix=100, own=20)
    s.add(a)
    run_until_done(s, [a])
    b = shared(2, prefix=100, own=30)
    s.add(b)
    batch = s.schedule()
    assert b.cached_tokens == 96  # 6 full blocks of the 100-token prefix; a partial block is never shared
    assert batch.num_new == [130 - 96]


def test_v1_identical_prompt_still_computes_its_last_token():
    s = make_sched(scheduler="vllm-v1", block_size=16, max_num_batched_tokens=4096)
    a = shared(1, prefix=64, own=0)
    a.segments = ((0, 64),)
    s.add(a)
    run_until_done(s, [a])
    b = shared(2, prefix=64, own=0)
    b.segments = ((0, 64),)
    s.add(b)
    batch = s.schedule()
    assert b.cached_tokens == 48 and batch.num_new == [16]  # the block holding the last token is recomputed


def test_without_caching_nothing_is_reused():
    s = make_sched(scheduler="vllm-v1", block_size=16, max_num_batched_tokens=4096, enable_prefix_caching=False)
    a, b = shared(1, 100, 20), shared(2, 100, 30)
    s.add(a)
    run_until_done(s, [a])
    s.add(b)
    assert s.schedule().num_new == [130] and b.cached_tokens == 0


def test_cached_blocks_count_as_free_and_are_evicted_least_recently_released_first():
    s = make_sched(scheduler="vllm-v1", block_size=16, max_num_batched_tokens=4096, num_gpu_blocks_override=20,
                   max_model_len=320)
    a = shared(1, prefix=0, own=64)
    a.segments = ((101, 64),)
    c = shared(3, prefix=0, own=64)
    c.segments = ((103, 64),)
    for r in (a, c):
        s.add(r)
        run_until_done(s, [r])
    assert s.kv.num_free == 20  # cached but unreferenced blocks are free
    # a was released first, so its blocks go first when the pool runs short (its tail first:
    # the free queue is [10 never used, a's partial block, a's 4 chunks last-first, c's ...])
    big = shared(4, prefix=0, own=16 * 16)
    big.segments = ((104, 16 * 16),)
    s.add(big)
    s.schedule()
    a2, c2 = shared(5, 0, 64), shared(6, 0, 64)
    a2.segments, c2.segments = ((101, 64),), ((103, 64),)
    assert s.kv.lookup(a2)[1] == 0
    assert s.kv.lookup(c2)[1] == 48


def test_a_preempted_v1_request_resumes_from_its_own_cached_blocks():
    s = make_sched(scheduler="vllm-v1", block_size=16, max_num_batched_tokens=4096, num_gpu_blocks_override=1000)
    a = shared(1, prefix=0, own=160, out=50)
    a.segments = ((7, 160),)
    s.add(a)
    apply(s.schedule())
    s.kv.prefix.register(a)
    s.preempt(s.running.pop(), s.schedule())  # drop its KV as a preemption would
    s.waiting.appendleft(a)
    s.running.clear()
    batch = s.schedule()
    assert a.cached_tokens == 160 and batch.num_new == [1]  # prompt and first output all cached but the last


def test_sglang_radix_match_shrinks_the_extend_and_locks_the_prefix():
    s = make_sched(scheduler="sglang", num_gpu_blocks_override=None, kv_cache_tokens=4000, radix_chunk_tokens=1,
                   chunked_prefill_size=8192)
    a = shared(1, prefix=300, own=10)
    s.add(a)
    run_until_done(s, [a])
    free_before = s.kv.num_free
    b = shared(2, prefix=300, own=25)
    s.add(b)
    batch = s.schedule()
    assert b.cached_tokens == 300 and batch.num_new == [25]  # token-level match: the whole shared prefix
    assert free_before - s.kv.num_free == 300 + 25  # the matched prefix is locked, no longer evictable


def _chat(scheduler: str, caching: bool, **wl) -> dict:
    eng = {"scheduler": scheduler, "max_model_len": 8192, "kv_cache_tokens": 100_000}
    if scheduler == "sglang":
        eng["disable_radix_cache"] = not caching
    else:
        eng["enable_prefix_caching"] = caching
    data = {"engine": eng,
            "step_time": {"step_overhead_s": 0.005, "per_prefill_token_s": 2e-4, "per_decode_seq_s": 1e-4},
            "workload": {"dataset_name": "random", "num_prompts": 40, "random_input_len": 400,
                         "random_output_len": 50, "max_concurrency": 4, **wl}}
    res = simulate(scenario_from_dict(data))
    return {"ttft": res.bench.metrics["mean_ttft_ms"], "hits": res.prefix_hit_tokens, "res": res}


@pytest.mark.parametrize("scheduler", ["vllm-v1", "sglang"])
def test_shared_prefix_lowers_ttft_only_with_caching(scheduler):
    on = _chat(scheduler, True, random_prefix_len=2000)
    off = _chat(scheduler, False, random_prefix_len=2000)
    assert off["hits"] == 0 and on["hits"] >= 30 * 1984
    assert on["ttft"] < 0.5 * off["ttft"]


def test_multi_turn_conversations_send_each_turn_after_the_last_with_the_history():
    out = _chat("vllm-v1", True, turns=4, think_time_s=0.5)
    reqs = sorted(out["res"].requests, key=lambda r: r.rid)
    for prev, nxt in zip(reqs, reqs[1:]):
        if nxt.follows == prev.rid:
            assert nxt.prompt_len == prev.prompt_len + prev.output_len + nxt.new_message_len
            assert nxt.start_s >= prev.token_times[-1] + 0.5 - 1e-9
            assert nxt.cached_tokens >= prev.prompt_len + prev.output_len - 16  # the whole history hits
    assert out["ttft"] < _chat("vllm-v1", False, turns=4, think_time_s=0.5)["ttft"]


def test_a_request_resumed_from_the_cache_samples_before_it_verifies_drafts():
    """Found by hypothesis: a preempted request whose whole history is cached comes back with one
    uncomputed token; it must sample it as a plain decode (it has no drafts yet), not run a
    4-token "prefill" past its own length and wait forever."""
    data = {"engine": {"scheduler": "vllm-v1", "enable_chunked_prefill": False, "block_size": 1, "max_model_len": 98,
                       "max_num_seqs": 2, "max_num_batched_tokens": 98, "num_gpu_blocks_override": 98,
                       "num_speculative_tokens": 3, "spec_acceptance_rate": 0.0},
            "workload": {"dataset_name": "random", "client": "vllm-legacy", "num_prompts": 2, "random_input_len": 1,
                         "random_output_len": 49, "random_range_ratio": 0.9, "seed": 0, "random_prefix_len": 3},
            "step_time": {"step_overhead_s": 0.001, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 1e-4}}
    res = simulate(scenario_from_dict(data))
    assert res.num_preemptions >= 1 and res.prefix_hit_tokens > 0
    assert res.bench.metrics["completed"] == 2


def _unshared_v1(**workload):
    return scenario_from_dict({
        "engine": {"scheduler": "vllm-v1", "max_model_len": 600, "max_num_batched_tokens": 128,
                   "num_gpu_blocks_override": 60, "block_size": 16},
        "workload": {"dataset_name": "random", "num_prompts": 40, "random_input_len": 300, "random_output_len": 120,
                     "random_range_ratio": 0.5, "request_rate": "inf", **workload},
        "step_time": {"step_overhead_s": 0.01, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 1e-4}})


def test_private_requests_keep_their_chunks_as_one_run_with_the_same_outcome(monkeypatch):
    """Unshared prompts (no prefix, one turn) are private: their chunks are one queue entry per
    request instead of one per chunk. The run gives the same hits, frees and evictions as the
    entries (here with heavy preemption: 60 blocks for 40 requests of up to 570 tokens)."""
    import sim.prefix_cache as pc

    sc = _unshared_v1()
    runs = simulate(sc)
    assert runs.prefix_hit_tokens > 0 and runs.num_preemptions > 0  # requests resumed from their own chunks
    monkeypatch.setattr(pc, "private", lambda req: False)
    chunks = simulate(sc)
    assert [r.token_times for r in runs.requests] == [r.token_times for r in chunks.requests]
    for key in ("num_steps", "num_preemptions", "peak_kv_blocks", "prefix_hit_tokens"):
        assert getattr(runs, key) == getattr(chunks, key), key


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_private_runs_equal_chunk_entries_on_random_scenarios(data):
    """The same on the invariant tests' random scenarios: every engine, PD, several instances,
    shared prefixes and conversations (not private) mixed in."""
    import sim.prefix_cache as pc

    sc = scenario_from_dict(data)
    runs = simulate(sc)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pc, "private", lambda req: False)
        chunks = simulate(sc)
    assert [(r.status, r.error, r.token_times) for r in runs.requests] == \
           [(r.status, r.error, r.token_times) for r in chunks.requests]
    for key in ("num_steps", "num_preemptions", "peak_kv_blocks", "prefix_hit_tokens", "num_recomputes"):
        assert getattr(runs, key) == getattr(chunks, key), key
