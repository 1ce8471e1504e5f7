"""Invariants on random scenarios: whatever the configuration, the simulation stays honest."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config import scenario_from_dict
from sim.request import Status
from sim.runner import simulate


@contextmanager
def wall_clock_guard(seconds: int):
    """Fail a run that takes too long instead of hanging the suite."""

    def _timeout(signum, frame):
        raise TimeoutError(f"simulation ran longer than {seconds} s of wall time")

    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@st.composite
def scenarios(draw):
    scheduler = draw(st.sampled_from(["vllm-v0", "vllm-v1", "sglang"]))
    chunking = draw(st.booleans())
    block_size = draw(st.sampled_from([1, 4, 16]))
    max_model_len = draw(st.integers(8, 600))
    max_num_seqs = draw(st.integers(1, 32))
    budget_floor = max(max_num_seqs, 1 if chunking else max_model_len)
    budget = draw(st.integers(budget_floor, budget_floor + 600))
    # KV from "just the longest request" to roomy, so preemption happens often
    kv_tokens = draw(st.integers(max_model_len, 4 * max_model_len))
    num_blocks = -(-kv_tokens // block_size)
    rate = draw(st.sampled_from(["inf", 5.0, 50.0]))
    workload = {
        "dataset_name": "random",
        "client": draw(st.sampled_from(["vllm", "vllm-legacy"])),
        "num_prompts": draw(st.integers(1, 40)),
        # mostly requests that pass the front door, some that do not
        "random_input_len": draw(st.integers(1, max(1, max_model_len * 2 // 3))),
        "random_output_len": draw(st.integers(1, max(1, max_model_len // 2))),
        "random_range_ratio": draw(st.sampled_from([0.0, 0.5, 0.9])),
        "request_rate": rate,
        "burstiness": draw(st.sampled_from([0.5, 1.0, 3.0])),
        "seed": draw(st.integers(0, 1000)),
    }
    if draw(st.booleans()):
        workload["max_concurrency"] = draw(st.integers(1, 8))
    if draw(st.integers(0, 2)) == 0:  # shared prefixes and conversations exercise the prefix cache
        workload["random_prefix_len"] = draw(st.integers(0, max(0, max_model_len // 3)))
        workload["turns"] = draw(st.integers(1, 3))
    if scheduler == "sglang":
        engine = {
            "scheduler": "sglang",
            "block_size": block_size,
            "context_length": max_model_len,
            "chunked_prefill_size": draw(st.sampled_from([-1, 1, 4, 16, 64])) * block_size,
            "max_prefill_tokens": draw(st.integers(1, 800)),
            "max_running_requests": max_num_seqs,
            "enable_mixed_chunk": draw(st.booleans()),
            "kv_cache_tokens": num_blocks * block_size,
            "disable_radix_cache": draw(st.booleans()),
            "radix_chunk_tokens": draw(st.sampled_from([1, 16])),
        }
        workload["client"] = "vllm"
    else:
        engine = {
            "scheduler": scheduler,
            "enable_chunked_prefill": chunking,
            "block_size": block_size,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": budget,
            "num_gpu_blocks_override": num_blocks,
        }
        if scheduler == "vllm-v1":
            engine["enable_prefix_caching"] = draw(st.booleans())
    if scheduler != "vllm-v0" and draw(st.booleans()):
        engine.update(num_speculative_tokens=draw(st.integers(1, 3)),
                      spec_acceptance_rate=draw(st.sampled_from([0.0, 0.6, 1.0])))
    deployment = {"instances": draw(st.integers(1, 3)),
                  "router": draw(st.sampled_from(["round_robin", "least_outstanding", "random"]))}
    extra = {}
    if draw(st.integers(0, 3)) == 0:  # prefill/decode disaggregation
        deployment.update(mode="pd", instances=1, prefill_instances=draw(st.integers(1, 2)),
                          decode_instances=draw(st.integers(1, 2)),
                          pd_design=draw(st.sampled_from(["sglang", "vllm"])),
                          reserved_decode_tokens=draw(st.sampled_from([0, 8, 512])))
        if deployment["pd_design"] == "vllm" and scheduler == "vllm-v1":
            deployment["recompute_scheduler"] = draw(st.booleans())
        bandwidth = draw(st.sampled_from([1e-6, 1e-3, 10.0]))
        # 1e-6 Gbps moves 1 KB/s: a crawling link whose KV backs up on P, at 1 ms per token. At
        # 1 s per token a P engine that keeps re-prefilling behind KV held for transfers (as vLLM
        # V1 does when a chunk gets no block) runs millions of steps before the link frees it.
        extra["kv_transfer"] = {"latency_s": draw(st.sampled_from([0.0, 0.001, 0.05])),
                                "bandwidth_gbps": bandwidth,
                                "layerwise": draw(st.booleans()),
                                "bytes_per_token": 1.0 if bandwidth < 1e-3 else draw(st.sampled_from([1.0, 1000.0]))}
    if deployment.get("mode") != "pd" and draw(st.integers(0, 3)) == 0:  # the client gives up on slow requests
        workload["request_timeout_s"] = draw(st.sampled_from([0.02, 0.3, 3.0]))
    return {
        **extra,
        "engine": engine,
        "deployment": deployment,
        "workload": workload,
        "step_time": {
            "step_overhead_s": draw(st.sampled_from([1e-3, 1e-2])),
            "per_prefill_token_s": 1e-4,
            "per_decode_seq_s": 1e-4,
            "per_decode_ctx_token_s": 1e-7,
        },
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_invariants_hold_on_random_scenarios(data):
    check_invariants(data)


@pytest.mark.parametrize("scheduler,chunking", [("vllm-v0", False), ("vllm-v0", True), ("vllm-v1", True),
                                                ("sglang", None)])
def test_invariants_hold_under_heavy_preemption(scheduler, chunking):
    engine = {"scheduler": scheduler, "enable_chunked_prefill": chunking, "max_model_len": 512,
              "max_num_batched_tokens": 512, "max_num_seqs": 64, "num_gpu_blocks_override": 40}
    if scheduler == "sglang":
        engine = {"scheduler": "sglang", "context_length": 512, "chunked_prefill_size": 256,
                  "max_running_requests": 64, "kv_cache_tokens": 640}
    data = {
        "engine": engine,
        "workload": {"dataset_name": "random", "num_prompts": 200, "random_input_len": 100,
                     "random_output_len": 200, "random_range_ratio": 0.5, "request_rate": 20.0},
    }
    res = check_invariants(data)
    assert res.num_preemptions > (10 if scheduler == "sglang" else 50)  # SGLang admits by reservation


def check_invariants(data):
    sc = scenario_from_dict(data)
    e = sc.engine
    with wall_clock_guard(20):
        res = simulate(sc, record_steps=True)

    # every request ends completed or failed-with-reason; completed ones got exactly their tokens
    for r in res.requests:
        assert r.status in (Status.FINISHED, Status.FAILED)
        if r.status is Status.FINISHED:
            assert r.output_len == r.max_tokens == len(r.token_times)
            assert all(a <= b for a, b in zip(r.token_times, r.token_times[1:]))
            assert r.token_times[0] >= r.start_s >= r.arrival_s - 1e-9  # float sum of gaps
        else:
            assert r.error
    assert res.bench.metrics["completed"] + res.bench.metrics["failed"] == len(res.requests)

    # no step exceeds the token budget or the running-request cap; KV never exceeds its capacity
    all_steps = [s for steps in res.instance_steps for s in steps]
    if e.scheduler == "sglang":
        cap, chunk = e.max_running_requests, e.chunked_prefill_size
        for s in all_steps:
            assert s.shape.num_seqs <= cap
            if chunk > 0:
                assert s.shape.prefill_tokens <= chunk
            if s.shape.prefill_tokens and not e.enable_mixed_chunk:
                assert s.shape.decode_seqs == 0  # prefill and decode are separate passes
    else:
        assert res.max_batch_tokens <= e.max_num_batched_tokens
        assert res.max_batch_seqs <= e.max_num_seqs
        for s in all_steps:
            assert s.num_tokens <= e.max_num_batched_tokens
            assert s.shape.num_seqs <= e.max_num_seqs
    assert res.peak_kv_blocks <= e.num_gpu_blocks
    for s in all_steps:
        assert s.kv_blocks_used <= e.num_gpu_blocks
    # simulated time never decreases, on every instance
    for steps in res.instance_steps:
        starts = [s.t_start_s for s in steps]
        assert all(a <= b for a, b in zip(starts, starts[1:]))
    assert all(s.duration_s > 0 for s in all_steps)
    # every request went to exactly one instance (none lost by the router)
    d = sc.deployment
    n_inst = d.decode_instances if d.mode == "pd" else d.instances
    assert all(0 <= r.instance < n_inst for r in res.requests if r.status is Status.FINISHED)
    if d.mode == "pd":
        # one transfer per request that reached D; a link carries one transfer at a time
        finished = {r.rid for r in res.requests if r.status is Status.FINISHED}
        moved = [t.rid for t in res.transfers]
        assert finished <= set(moved)
        # one transfer per request, plus one per re-prefill under the recompute scheduler
        assert len(moved) - len(set(moved)) <= res.num_recomputes
        if not d.recompute_scheduler:
            assert res.num_recomputes == 0
        for link in range(d.prefill_instances):
            spans = sorted((t.start_s, t.end_s) for t in res.transfers if t.link == link)
            assert all(a_end <= b_start + 1e-12 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    # (the runner itself raises if any KV block is still in use at the end)

    # the same seed gives the same report, also without recording (which compresses decode runs
    # and keeps token times on two clocks: sums of ITLs may add in another order)
    again = simulate(sc)
    assert again.bench.metrics == pytest.approx(res.bench.metrics, rel=1e-12, abs=1e-12)
    return res
