"""What the engine adds to a step beyond the batch: CUDA-graph padding and CPU/GPU overlap
(vLLM V1 async scheduling, SGLang's overlap scheduler), from the engines' flags and defaults."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.launch import engine_from_launch
from sim.config import EngineConfig, ScenarioError, resolve_engine_defaults
from sim.perf_model import RooflineCoefficients, RooflineStepTime, features, load_hardware_spec, load_model_spec
from sim.step_time import BatchShape, EngineFacts, decode_run_ends


def _engine(**kw) -> EngineConfig:
    kw.setdefault("max_model_len", 4096)
    kw.setdefault("kv_cache_tokens", 100_000)
    return resolve_engine_defaults(EngineConfig(**kw))


def test_vllm_v1_captures_up_to_twice_max_num_seqs_in_steps_of_8_then_16_from_0_11_1():
    old = _engine(version="0.11.0", gpu="A100-SXM-80GB", gpu_memory_gib=80).step_facts()
    assert old.graph_sizes[:5] == (1, 2, 4, 8, 16) and old.graph_sizes[-3:] == (496, 504, 512)
    assert old.graph_mixed and not old.overlap
    new = _engine(version="0.11.1", gpu="A100-SXM-80GB", gpu_memory_gib=80).step_facts()
    assert new.graph_sizes[new.graph_sizes.index(248):][:4] == (248, 256, 272, 288)
    assert new.graph_sizes[-1] == 512
    small = _engine(version="0.11.0", max_num_seqs=16).step_facts()
    assert small.graph_sizes[-1] == 32  # min(2 x max_num_seqs, 512)
    assert _engine(version="0.11.0", enforce_eager=True).step_facts().graph_sizes == ()


def test_vllm_async_scheduling_is_on_by_default_from_0_14_and_only_for_v1():
    assert not _engine(version="0.11.0").step_facts().overlap
    assert _engine(version="0.11.0", async_scheduling=True).step_facts().overlap
    assert _engine(version="0.14.0").step_facts().overlap
    assert not _engine(version="0.14.0", async_scheduling=False).step_facts().overlap
    with pytest.raises(ScenarioError, match="async_scheduling"):
        _engine(scheduler="vllm-v0", version="0.6.3", async_scheduling=True)


def test_sglang_pads_decode_batches_to_160_and_overlaps_unless_told_or_speculating():
    f = _engine(scheduler="sglang", version="0.4.6").step_facts()
    assert f.overlap and not f.graph_mixed
    assert f.graph_sizes == (1, 2, 4) + tuple(range(8, 161, 8))
    assert not _engine(scheduler="sglang", disable_overlap_schedule=True).step_facts().overlap
    spec = _engine(scheduler="sglang", num_speculative_tokens=2, spec_acceptance_rate=0.7).step_facts()
    assert not spec.overlap
    few = _engine(scheduler="sglang", max_running_requests=50).step_facts()
    assert few.graph_sizes[-3:] == (48, 49, 50)
    assert _engine(scheduler="sglang", disable_cuda_graph=True).step_facts().graph_sizes == ()
    assert _engine(scheduler="sglang", cuda_graph_max_bs=64).step_facts().graph_sizes[-1] == 64


def test_pad_table_rounds_up_to_the_next_graph():
    pad = EngineFacts(graph_sizes=(1, 2, 4, 8, 16)).pad_table()
    assert pad[1:] == [1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16]
    assert EngineFacts().pad_table() == []


def _model(facts: EngineFacts, **coeffs) -> RooflineStepTime:
    # memory efficiency so high that linear-layer compute decides the step
    c = RooflineCoefficients(**{"step_overhead_s": 0.0, "memory_efficiency": 1e6, **coeffs})
    return RooflineStepTime(load_model_spec("qwen2.5-72b-instruct-gptq-int4"), load_hardware_spec("a100-80g"),
                            coeffs=c, facts=facts)


def test_a_batch_in_a_cuda_graph_computes_its_padding():
    graphs = EngineFacts(graph_sizes=(8, 16, 32), graph_mixed=True)
    padded, eager = _model(graphs), _model(EngineFacts())
    nine = BatchShape(num_seqs=9, decode_seqs=9, decode_ctx_tokens=900)
    # nine decodes in the 16-token graph cost what sixteen tokens' linear layers cost
    sixteen = BatchShape(num_seqs=9, decode_seqs=9, decode_ctx_tokens=900, spec_tokens=7)
    assert padded.step_time(nine) == pytest.approx(eager.step_time(sixteen), rel=1e-12)
    assert padded.step_time(nine) > eager.step_time(nine)
    # a batch larger than the largest graph runs eagerly: no padding
    big = BatchShape(num_seqs=40, decode_seqs=40, decode_ctx_tokens=4000)
    assert padded.step_time(big) == eager.step_time(big)
    # vLLM V1 pads a batch with prompt tokens too; V0 and SGLang only decode-only batches
    mixed = BatchShape(num_seqs=2, prefill_tokens=9, prefill_attn_pairs=45.0, decode_seqs=1, decode_ctx_tokens=50)
    assert padded.step_time(mixed) > eager.step_time(mixed)
    decode_only = _model(EngineFacts(graph_sizes=(8, 16, 32)))
    assert decode_only.step_time(mixed) == eager.step_time(mixed)
    assert decode_only.step_time(nine) == padded.step_time(nine)


def test_overlap_hides_the_cpus_part_behind_the_gpus_step_instead_of_adding_it():
    b = BatchShape(num_seqs=4, decode_seqs=4, decode_ctx_tokens=400)
    rest = _model(EngineFacts(), step_overhead_s=0.002, per_seq_s=0.001).step_time(b)  # no CPU part
    serial = _model(EngineFacts(), step_overhead_s=0.002, per_seq_s=0.001, cpu_overhead_s=0.003)
    overlapped = _model(EngineFacts(overlap=True), step_overhead_s=0.002, per_seq_s=0.001, cpu_overhead_s=0.003)
    assert serial.step_time(b) == pytest.approx(0.003 + rest, rel=1e-12)
    assert overlapped.step_time(b) == pytest.approx(max(0.003, rest), rel=1e-12) == rest
    cpu_bound = _model(EngineFacts(overlap=True), cpu_overhead_s=0.09)
    assert cpu_bound.step_time(b) == pytest.approx(0.09, rel=1e-12)  # the GPU waits for the CPU
    # without a CPU part (every profile fitted on a synchronous engine) overlap changes nothing
    assert _model(EngineFacts(overlap=True), step_overhead_s=0.002).step_time(b) == \
        _model(EngineFacts(), step_overhead_s=0.002).step_time(b)


@pytest.mark.parametrize("facts", [EngineFacts(overlap=True, graph_sizes=(1, 2, 4, 8, 16, 32), graph_mixed=True),
                                   EngineFacts(graph_sizes=(1, 2, 4, 8, 16, 32), graph_mixed=True, unified_attention=True),
                                   EngineFacts(overlap=False, graph_sizes=(1, 2, 4, 8, 16, 32)),
                                   EngineFacts(overlap=True)])
@pytest.mark.parametrize("model,tp", [("qwen2.5-72b-instruct-gptq-int4", 1), ("gpt-oss-120b", 2)])
def test_scalar_vectorised_and_decode_run_paths_give_the_same_floats(facts, model, tp):
    st = RooflineStepTime(load_model_spec(model), load_hardware_spec("a100-80g"), tp,
                          coeffs=RooflineCoefficients(step_overhead_s=0.004, per_seq_s=2e-4, prefill_overhead_s=0.01,
                                                      cpu_overhead_s=0.02),
                          facts=facts)
    shapes = []
    for n in (1, 3, 9, 31, 33, 200):
        shapes.append(BatchShape(num_seqs=n, decode_seqs=n, decode_ctx_tokens=300 * n))
    shapes.append(BatchShape(num_seqs=3, prefill_tokens=12, prefill_attn_pairs=78.0, decode_seqs=2, decode_ctx_tokens=90))
    scalar = np.array([st.step_time(s) for s in shapes])
    assert np.array_equal(st.step_times(features(shapes)), scalar)
    for s in shapes[:6]:
        ends = decode_run_ends(st, s, 80, 0.0)  # vectorised (>= 64 steps)
        loop = st.decode_run_ends(s, 80, 0.0)
        t, step_by_step = 0.0, []
        for j in range(80):
            t += st.step_time(BatchShape(s.num_seqs, 0, 0.0, s.decode_seqs, s.decode_ctx_tokens + s.num_seqs * j))
            step_by_step.append(t)
        assert ends == step_by_step and loop == step_by_step
    mixed = shapes[-1]  # a run that carries a prompt chunk each step (its decodes' tile cost included)
    t, step_by_step = 0.0, []
    for j in range(80):
        t += st.step_time(BatchShape(mixed.num_seqs, mixed.prefill_tokens, mixed.prefill_attn_pairs, mixed.decode_seqs,
                                     mixed.decode_ctx_tokens + mixed.num_seqs * j))
        step_by_step.append(t)
    assert decode_run_ends(st, mixed, 80, 0.0) == step_by_step and st.decode_run_ends(mixed, 80, 0.0) == step_by_step


def test_launch_commands_set_async_scheduling_and_sglang_overlap_flags():
    v = engine_from_launch("vllm serve openai/gpt-oss-20b --async-scheduling")
    assert v.settings["async_scheduling"] is True and "--async-scheduling" not in v.unmodelled
    s = engine_from_launch("python3 -m sglang.launch_server --model-path M --disable-overlap-schedule "
                           "--cuda-graph-max-bs 256")
    assert s.settings["disable_overlap_schedule"] is True and s.settings["cuda_graph_max_bs"] == 256
    assert s.unmodelled == []


def test_flash_attention_2_charges_a_decode_in_a_mixed_step_a_64_row_query_tile():
    """vLLM V1 sends a mixed batch through one FlashAttention varlen call; on an A100 (FA2, paged
    KV: the split-KV kernel, 64-row query tiles) each decode's one query costs a whole tile over its
    context. Its KV bytes do not change, nor do decode-only steps (GQA-packed), V0 and SGLang
    (separate kernels), models on Triton attention (sinks) or Hopper (FA3, not established)."""
    v1 = EngineConfig(scheduler="vllm-v1", max_model_len=4096, num_gpu_blocks_override=100).step_facts()
    v0 = EngineConfig(scheduler="vllm-v0", max_model_len=4096, num_gpu_blocks_override=100).step_facts()
    assert v1.unified_attention and not v0.unified_attention
    sg = EngineConfig(scheduler="sglang", context_length=4096, kv_cache_tokens=1000).step_facts()
    assert not sg.unified_attention
    q = load_model_spec("qwen3-14b")
    mixed = BatchShape(num_seqs=11, prefill_tokens=1000, prefill_attn_pairs=500_000.0, decode_seqs=10,
                       decode_ctx_tokens=40_000)
    decode_only = BatchShape(num_seqs=10, decode_seqs=10, decode_ctx_tokens=40_000)

    def terms(st, b):
        _, _, attention, kv, *_ = st.step_terms(features([b]))
        return attention[0], kv[0]

    a100 = RooflineStepTime(q, load_hardware_spec("a100-80g"), facts=v1)
    assert terms(a100, mixed)[0] == pytest.approx(a100._s_per_pair * (500_000 + 64 * 40_000))
    assert terms(RooflineStepTime(q, load_hardware_spec("a100-80g"), facts=v0), mixed)[0] == \
        pytest.approx(a100._s_per_pair * (500_000 + 40_000))
    for model, hw in (("qwen3-14b", "h100-80g"), ("gpt-oss-20b", "a100-80g")):  # FA3; Triton (sinks)
        m, h = load_model_spec(model), load_hardware_spec(hw)
        assert terms(RooflineStepTime(m, h, facts=v1), mixed) == terms(RooflineStepTime(m, h, facts=v0), mixed), model
    assert terms(a100, mixed)[1] == terms(RooflineStepTime(q, load_hardware_spec("a100-80g"), facts=v0), mixed)[1]
    assert a100.step_time(decode_only) == RooflineStepTime(q, load_hardware_spec("a100-80g"), facts=v0).step_time(decode_only)
