"""Model/hardware specs and the roofline step-time model."""

from __future__ import annotations

import numpy as np
import pytest

from sim.perf_model import (
    RooflineCoefficients,
    RooflineStepTime,
    features,
    kv_capacity_tokens,
    load_hardware_spec,
    load_model_spec,
)
from sim.step_time import BatchShape


def test_model_specs_match_published_sizes():
    q = load_model_spec("qwen2.5-72b-instruct-gptq-int4")
    assert (q.layer_params_total() + q.embedding_params) / 1e9 == pytest.approx(72.7, abs=0.1)
    d = load_model_spec("deepseek-r1-fp8")
    assert (d.layer_params_total() + d.embedding_params) / 1e9 == pytest.approx(671, abs=2)
    assert (d.layer_params_active() + d.embedding_params / 2) / 1e9 == pytest.approx(37, abs=1.5)


def test_kv_bytes_per_token_gqa_is_sharded_mla_is_replicated():
    q = load_model_spec("qwen2.5-72b-instruct-gptq-int4")
    assert q.kv_bytes_per_token(1) == 327_680  # 80 x 8 x 128 x 2 x 2
    assert q.kv_bytes_per_token(8) == 40_960
    d = load_model_spec("deepseek-r1-fp8")
    assert d.kv_bytes_per_token(1) == d.kv_bytes_per_token(8) == 70_272  # 61 x 576 x 2, no x2 for K/V


def test_seed004_kv_capacity_points_to_an_80_gib_gpu():
    """~100k tokens of KV (seed 004) is what an 80 GiB GPU leaves after 41 GB of weights."""
    q = load_model_spec("qwen2.5-72b-instruct-gptq-int4")
    kv80 = kv_capacity_tokens(q, load_hardware_spec("a100-80g"), 1, 0.9, reserve_gib=3)
    kv96 = kv_capacity_tokens(q, load_hardware_spec("h20"), 1, 0.9, reserve_gib=3)
    assert 95_000 < kv80 < 106_000 < kv96


def _shape(prefill=(), decodes=()):
    b = BatchShape()
    for computed, new in prefill:
        b.add_chunk(computed, new)
    for ctx in decodes:
        b.add_chunk(ctx, 1)
    return b


def test_step_time_grows_with_tokens_and_context_and_vectorised_path_agrees():
    st = RooflineStepTime(load_model_spec("qwen2.5-72b-instruct-gptq-int4"), load_hardware_spec("a100-80g"))
    shapes = [_shape(prefill=[(0, 64)]), _shape(prefill=[(0, 512)]), _shape(decodes=[100] * 8),
              _shape(decodes=[4000] * 8), _shape(prefill=[(1000, 256)], decodes=[50] * 32)]
    scalar = np.array([st.step_time(s) for s in shapes])
    assert np.allclose(st.step_times(features(shapes)), scalar, rtol=1e-12)
    assert scalar[1] > scalar[0] and scalar[3] > scalar[2]


def test_small_decode_batches_are_memory_bound_large_prefills_compute_bound():
    st = RooflineStepTime(load_model_spec("qwen2.5-72b-instruct-gptq-int4"), load_hardware_spec("a100-80g"),
                          coeffs=RooflineCoefficients(step_overhead_s=0.0))
    one = st.step_time(_shape(decodes=[100]))
    two = st.step_time(_shape(decodes=[100, 100]))
    assert two == pytest.approx(one, rel=0.01)  # reading the weights dominates
    big = st.step_time(_shape(prefill=[(0, 4096)]))
    bigger = st.step_time(_shape(prefill=[(0, 8192)]))
    assert bigger / big == pytest.approx(2.0, rel=0.1)  # compute dominates


def test_moe_touches_more_experts_with_more_tokens():
    st = RooflineStepTime(load_model_spec("deepseek-r1-fp8"), load_hardware_spec("h20"), tp=8)
    assert st._experts_touched(1) == pytest.approx(9)  # 8 routed + 1 shared
    assert st._experts_touched(10_000) == pytest.approx(257, abs=0.01)


def test_implausible_coefficients_are_reported():
    st = RooflineStepTime(load_model_spec("qwen2.5-72b-instruct-gptq-int4"), load_hardware_spec("a100-80g"),
                          coeffs=RooflineCoefficients(compute_efficiency=3.0))
    assert any("compute_efficiency" in w for w in st.plausibility_warnings())


def test_unknown_spec_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model spec 'llama-9000'.*qwen2.5-72b"):
        load_model_spec("llama-9000")


def test_fp8_weights_on_a_device_without_fp8_compute_in_bf16_and_read_8_bits():
    """vLLM runs FP8 checkpoints on Ampere with weight-only FP8 (Marlin): bf16 matmuls, 8-bit reads."""
    from sim.perf_model import RooflineCoefficients, RooflineStepTime, load_hardware_spec, load_model_spec
    from sim.step_time import BatchShape

    fp8, bf16 = load_model_spec("qwen3-32b-fp8"), load_model_spec("qwen3-32b")
    a100, h100 = load_hardware_spec("a100-80g"), load_hardware_spec("h100-80g")
    assert a100.peak_flops(fp8.compute_dtype) == a100.peak_flops("bf16")
    assert h100.peak_flops(fp8.compute_dtype) == h100.peak_flops("fp8") > h100.peak_flops("bf16")
    decode, prefill = BatchShape(num_seqs=1, decode_seqs=1, decode_ctx_tokens=100), \
        BatchShape(num_seqs=1, prefill_tokens=8192, prefill_attn_pairs=8192 * 8193 / 2)
    none = RooflineCoefficients(step_overhead_s=0.0)  # the GPU's time alone
    t = {name: RooflineStepTime(spec, a100, coeffs=none) for name, spec in (("fp8", fp8), ("bf16", bf16))}
    # a decode step reads the weights: half the bytes (the 16-bit embeddings stay); a long prefill
    # computes: the same FLOP/s
    assert t["fp8"].step_time(decode) < 0.6 * t["bf16"].step_time(decode)
    assert t["fp8"].step_time(prefill) == pytest.approx(t["bf16"].step_time(prefill), rel=0.02)
