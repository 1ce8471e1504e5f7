"""Event compression changes nothing: runs of decode steps simulated in one event give the
same token times, the same engine counters and the same report as planning every step."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config import load_scenario, scenario_from_dict
from sim.engine import SimulationStuck
from sim.runner import simulate

from tests.test_properties import scenarios, wall_clock_guard


@st.composite
def compressible_scenarios(draw):
    """The invariant tests' random scenarios (outputs up to half of max_model_len, so runs of
    up to hundreds of steps), sometimes on the roofline step-time model (its vectorised path)."""
    data = draw(scenarios())
    if draw(st.integers(0, 2)) == 0:
        data["step_time"] = {"model": "llama-2-7b", "hardware": "a100-80g", "tp": 1}
    return data


def assert_same_run(sc) -> None:
    with wall_clock_guard(30):
        try:
            ref = simulate(sc, compress=False)
        except SimulationStuck as stuck:  # a deadlock the engine cannot leave: the same one, at the same time
            with pytest.raises(SimulationStuck) as same:
                simulate(sc)
            assert str(same.value) == str(stuck)
            return
        fast = simulate(sc)
    for a, b in zip(ref.requests, fast.requests):
        assert (a.rid, a.status, a.error, a.output_len, a.num_preemptions) == \
               (b.rid, b.status, b.error, b.output_len, b.num_preemptions)
        ta, tb = a.token_times, b.token_times
        assert len(ta) == len(tb)
        assert all(math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-15) for x, y in zip(ta, tb)), a.rid
    for key in ("num_steps", "num_preemptions", "max_batch_tokens", "max_batch_seqs", "peak_kv_blocks",
                "prefix_hit_tokens", "num_recomputes"):
        assert getattr(ref, key) == getattr(fast, key), key
    assert ref.bench.metrics.keys() == fast.bench.metrics.keys()
    for key, x in ref.bench.metrics.items():
        assert math.isclose(x, fast.bench.metrics[key], rel_tol=1e-12, abs_tol=1e-12), key


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compressible_scenarios())
def test_compressed_runs_equal_step_by_step(data):
    assert_same_run(scenario_from_dict(data))


def test_compression_equal_on_seed004_and_cuts_planned_steps():
    """A calibrated scenario, and the compression really happens there (far fewer plans)."""
    sc = load_scenario("scenarios/seed004/disable-2048.toml", ["workload.num_prompts=200"])
    assert_same_run(sc)
    plans, steps = plans_and_steps(sc)
    assert plans < steps / 5


def plans_and_steps(sc) -> tuple[int, int]:
    """How many times the engine planned (compressed run) and how many steps it simulated."""
    res = simulate(sc)
    return res.num_plans, res.num_steps


_V1_LONG_PROMPTS = {  # vLLM 0.8's V1: chunks allocated one by one with 64 tokens preallocated, prefix caching
    "engine": {"scheduler": "vllm-v1", "version": "0.8.5", "max_model_len": 8192, "max_num_batched_tokens": 256,
               "kv_cache_tokens": 9000, "enable_prefix_caching": True},
    "workload": {"dataset_name": "random", "num_prompts": 200, "random_input_len": 2000, "random_output_len": 100,
                 "random_range_ratio": 0.5, "request_rate": 2.0, "seed": 3},
    "step_time": {"model": "llama-2-7b", "hardware": "a100-80g", "tp": 1}}


@pytest.mark.parametrize("engine", ["vllm-v0", "vllm-v1"])
def test_chunked_prefill_runs_equal_step_by_step_and_cut_planned_steps(engine):
    """A small chunked-prefill budget: the decodes plus one prompt's chunk that takes the rest of
    the budget repeat until the prompt's last chunk, and run as one event (V0 holds the prompt's
    blocks from admission; V1 allocates chunk by chunk, and preempts here when short)."""
    if engine == "vllm-v0":
        sc = load_scenario("scenarios/seed004/enable-64.toml", ["workload.num_prompts=300"])
    else:
        sc = scenario_from_dict(_V1_LONG_PROMPTS)
    assert_same_run(sc)
    plans, steps = plans_and_steps(sc)
    # (without these runs: 1,891 plans for V0's 3,304 steps, 1,924 for V1's 5,576)
    assert plans < steps / 3


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 128), st.integers(0, 10**5), st.integers(1, 2048), st.integers(0, 10**5), st.integers(1, 50))
def test_chunked_run_step_times_are_the_step_by_step_floats(seqs, ctx, chunk, computed, steps):
    from sim.perf_model import RooflineStepTime, load_hardware_spec, load_model_spec
    from sim.step_time import BatchShape, chunked_run_ends

    model = RooflineStepTime(load_model_spec("llama-2-7b"), load_hardware_spec("a100-80g"))
    ctx += seqs
    now = 3.21
    first = BatchShape(seqs, 0, 0.0, seqs, ctx, 0)
    first.add_chunk(computed, chunk, decode=False)
    run = chunked_run_ends(model, first, steps, now, chunk, computed)
    one_by_one = []
    for j in range(steps):  # the shape the scheduler builds at each step, timed as the engine does
        b = BatchShape(seqs, 0, 0.0, seqs, ctx + seqs * j, 0)
        b.add_chunk(computed + chunk * j, chunk, decode=False)
        now += model.step_time(b)
        one_by_one.append(now)
    assert run == one_by_one  # bit for bit


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["linear", "llama", "deepseek-tp8", "gpt-oss-tp2"]), st.integers(1, 512), st.integers(0, 10**6),
       st.integers(1, 300))
def test_run_step_times_are_the_step_by_step_floats(kind, seqs, ctx, steps):
    from sim.perf_model import RooflineCoefficients, RooflineStepTime, load_hardware_spec, load_model_spec
    from sim.step_time import BatchShape, StepTimeParams, decode_run_ends

    model = {
        "linear": StepTimeParams(),
        "llama": RooflineStepTime(load_model_spec("llama-2-7b"), load_hardware_spec("a100-80g")),
        "deepseek-tp8": RooflineStepTime(load_model_spec("deepseek-r1-fp8"), load_hardware_spec("h20"), 8,
                                         RooflineCoefficients(launch_overhead_s=0.003, per_seq_s=1e-4)),
        # sliding-window layers: the window caps the context terms inside the run
        "gpt-oss-tp2": RooflineStepTime(load_model_spec("gpt-oss-120b"), load_hardware_spec("a100-80g"), 2),
    }[kind]
    ctx += seqs
    now = 12.345
    run = decode_run_ends(model, BatchShape(seqs, 0, 0.0, seqs, ctx, 0), steps, now)
    one_by_one = []
    for j in range(steps):  # what the step-by-step engine's clock does
        now += model.step_time(BatchShape(seqs, 0, 0.0, seqs, ctx + seqs * j, 0))
        one_by_one.append(now)
    assert run == one_by_one  # bit for bit


# Cases the random search found, kept as regression tests: engines in lockstep whose step ends
# coincide with arrivals (event order at equal times), a PD hand-off whose admission hook would
# act after the first step of a run, an SGLang rejection of a newcomer during a run, and a PD
# decode instance whose waiting head hits, after one step, the shared prompt prefix of a request
# whose KV arrived by transfer (registered in the prefix cache after its first step there).
_LOCKSTEP = {
    "engine": {"scheduler": "vllm-v0", "enable_chunked_prefill": False, "block_size": 1, "max_model_len": 8,
               "max_num_seqs": 2, "max_num_batched_tokens": 8, "num_gpu_blocks_override": 8},
    "deployment": {"instances": 3, "router": "round_robin"},
    "workload": {"dataset_name": "random", "client": "vllm-legacy", "num_prompts": 11, "random_input_len": 1,
                 "random_output_len": 3, "random_range_ratio": 0.0, "request_rate": "inf", "seed": 15,
                 "max_concurrency": 3},
    "step_time": {"model": "llama-2-7b", "hardware": "a100-80g", "tp": 1}}
_PD_HOOK = {
    "kv_transfer": {"latency_s": 0.0, "bandwidth_gbps": 1e-06, "layerwise": False, "bytes_per_token": 1.0},
    "engine": {"scheduler": "vllm-v0", "enable_chunked_prefill": False, "block_size": 1, "max_model_len": 119,
               "max_num_seqs": 3, "max_num_batched_tokens": 119, "num_gpu_blocks_override": 159},
    "deployment": {"instances": 1, "mode": "pd", "prefill_instances": 1, "decode_instances": 1,
                   "pd_design": "sglang", "reserved_decode_tokens": 0},
    "workload": {"dataset_name": "random", "num_prompts": 3, "random_input_len": 79, "random_output_len": 3,
                 "random_range_ratio": 0.0, "request_rate": "inf", "seed": 0},
    "step_time": {"model": "llama-2-7b", "hardware": "a100-80g", "tp": 1}}
_SGLANG_REJECT = {
    "engine": {"scheduler": "sglang", "block_size": 1, "context_length": 8, "chunked_prefill_size": -1,
               "max_prefill_tokens": 1, "max_running_requests": 1, "kv_cache_tokens": 8},
    "workload": {"dataset_name": "random", "num_prompts": 3, "random_input_len": 1, "random_output_len": 1,
                 "random_range_ratio": 0.5, "request_rate": 50.0, "burstiness": 3.0, "seed": 1},
    "step_time": {"model": "llama-2-7b", "hardware": "a100-80g", "tp": 1}}

_PD_SHARED_PREFIX = {
    "kv_transfer": {"latency_s": 0.0, "bandwidth_gbps": 1e-06, "layerwise": False, "bytes_per_token": 1.0},
    "engine": {"scheduler": "vllm-v1", "enable_chunked_prefill": False, "block_size": 1, "max_model_len": 57,
               "max_num_seqs": 3, "max_num_batched_tokens": 57, "num_gpu_blocks_override": 60,
               "enable_prefix_caching": True},
    "deployment": {"instances": 1, "mode": "pd", "prefill_instances": 1, "decode_instances": 1,
                   "pd_design": "sglang", "reserved_decode_tokens": 0},
    "workload": {"dataset_name": "random", "client": "vllm", "num_prompts": 3, "random_input_len": 1,
                 "random_output_len": 3, "random_range_ratio": 0.0, "request_rate": "inf", "seed": 0,
                 "random_prefix_len": 19},
    "step_time": {"model": "llama-2-7b", "hardware": "a100-80g", "tp": 1}}


def test_found_cases_stay_equal():
    for data in (_LOCKSTEP, _PD_HOOK, _SGLANG_REJECT, _PD_SHARED_PREFIX):
        assert_same_run(scenario_from_dict(data))


_POLICIES = '''
from sim.schedulers import VllmV0Scheduler


class OwnPlan(VllmV0Scheduler):
    """Plans its own way (here the same way, which the engine cannot know)."""

    def _schedule(self):
        return super()._schedule()


class SamePlan(VllmV0Scheduler):
    """Keeps the engine's plan."""

    name = "same-plan"
'''


def test_a_policy_with_its_own_plan_is_simulated_step_by_step(tmp_path):
    """The compression rules were written for each engine's own `_schedule`: a policy that
    overrides it is planned every step; one that keeps it is compressed like the engine."""
    path = tmp_path / "policies.py"
    path.write_text(_POLICIES)
    data = {"engine": {"scheduler": "vllm-v0", "max_model_len": 4096, "num_gpu_blocks_override": 3000,
                       "max_num_batched_tokens": 4096, "enable_chunked_prefill": False},
            "step_time": {"step_overhead_s": 0.01, "per_prefill_token_s": 2e-4, "per_decode_seq_s": 1e-4},
            "workload": {"dataset_name": "random", "num_prompts": 20, "random_input_len": 500,
                         "random_output_len": 400, "random_range_ratio": 0.5, "request_rate": "inf"}}
    plans, steps = plans_and_steps(scenario_from_dict(data))
    assert plans < steps / 5
    for policy, compressed in (("OwnPlan", False), ("SamePlan", True)):
        data["engine"]["policy"] = f"{path}:{policy}"
        sc = scenario_from_dict(data)
        p, s = plans_and_steps(sc)
        assert s == steps  # the same steps either way
        every_step = simulate(sc, compress=False).num_plans  # a plan per step (and per idle wake)
        assert (p < steps / 5) if compressed else (p == every_step), policy
        assert_same_run(sc)
