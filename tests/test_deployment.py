"""Several engine instances behind a router (data parallelism)."""

from __future__ import annotations

from collections import Counter

import pytest

from sim.config import scenario_from_dict
from sim.deployment import Router
from sim.runner import simulate


def test_round_robin_cycles_and_random_is_seeded():
    r = Router("round_robin", 3, seed=0)
    assert [r.pick() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    a, b = Router("random", 4, seed=5), Router("random", 4, seed=5)
    assert [a.pick() for _ in range(20)] == [b.pick() for _ in range(20)]


def test_least_outstanding_picks_the_least_loaded_instance():
    r = Router("least_outstanding", 3, seed=0)
    r.outstanding = [4, 1, 3]
    assert r.pick() == 1
    r.outstanding = [2, 2, 2]
    assert r.pick() == 0  # ties go to the lowest index


def _sc(instances, router="round_robin", n=200):
    return scenario_from_dict({
        "engine": {"scheduler": "vllm-v1", "max_model_len": 2048, "num_gpu_blocks_override": 400,
                   "max_num_batched_tokens": 1024, "max_num_seqs": 32},
        "deployment": {"instances": instances, "router": router},
        "workload": {"dataset_name": "random", "num_prompts": n, "random_input_len": 300,
                     "random_output_len": 100, "request_rate": "inf"},
        "step_time": {"step_overhead_s": 0.01, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 5e-4},
    })


def test_two_instances_share_the_load_and_finish_sooner():
    one, two = simulate(_sc(1)), simulate(_sc(2))
    assert Counter(r.instance for r in two.requests) == {0: 100, 1: 100}
    assert two.bench.metrics["duration"] < 0.65 * one.bench.metrics["duration"]
    assert two.bench.metrics["completed"] == 200


@pytest.mark.parametrize("router", ["round_robin", "least_outstanding", "random"])
def test_every_router_serves_every_request(router):
    res = simulate(_sc(3, router, n=60))
    assert res.bench.metrics["completed"] == 60
    assert {r.instance for r in res.requests} == {0, 1, 2}
