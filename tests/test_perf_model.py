"""Model/hardware specs and the roofline step-time model."""

from __future__ import annotations

import dataclasses

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


def _decode(n: int, ctx: int) -> BatchShape:
    return BatchShape(num_seqs=n, decode_seqs=n, decode_ctx_tokens=n * ctx)


def test_every_tensor_parallel_all_reduce_pays_the_links_latency():
    """Two all-reduces per layer, each with the hardware's small-message latency on top of its
    bytes: a step on TP 8 pays 2 x layers x latency that no batch size amortises; TP 1 pays none."""
    model, hw = load_model_spec("llama-3.1-70b"), load_hardware_spec("h100-80g")
    assert hw.allreduce_latency_us > 0
    slow = dataclasses.replace(hw, allreduce_latency_us=hw.allreduce_latency_us + 10)
    c = RooflineCoefficients(step_overhead_s=0.0)
    for b in (_decode(1, 100), _decode(64, 2000)):
        extra = RooflineStepTime(model, slow, 8, c).step_time(b) - RooflineStepTime(model, hw, 8, c).step_time(b)
        assert extra == pytest.approx(2 * model.num_layers * 10e-6, rel=1e-9)
        assert RooflineStepTime(model, slow, 1, c).step_time(b) == RooflineStepTime(model, hw, 1, c).step_time(b)


def test_sliding_window_layers_stop_paying_for_context_past_the_window():
    """gpt-oss: half the layers attend to the last 128 tokens only. Past the window, a longer
    context costs only the full-attention layers' share of KV reads; below it, every layer reads
    the whole context, as a model without windows does."""
    m, hw = load_model_spec("gpt-oss-120b"), load_hardware_spec("a100-80g")
    assert (m.sliding_window, m.window_fraction) == (128, 0.5)
    full = dataclasses.replace(m, sliding_window=0, sliding_window_layers=0)
    c = RooflineCoefficients(step_overhead_s=0.0, memory_efficiency=1.0, compute_efficiency=1.0)
    win, nowin = RooflineStepTime(m, hw, 1, c), RooflineStepTime(full, hw, 1, c)
    bw = hw.hbm_bandwidth_gbps * 1e9
    per_token = m.kv_bytes_per_token(1) / bw  # every layer's KV bytes of one token, in seconds
    n = 64  # decode steps this size are memory-bound
    grow_win = win.step_time(_decode(n, 20000)) - win.step_time(_decode(n, 10000))
    grow_full = nowin.step_time(_decode(n, 20000)) - nowin.step_time(_decode(n, 10000))
    assert grow_full == pytest.approx(n * 10000 * per_token, rel=1e-6)
    assert grow_win == pytest.approx(n * 10000 * per_token * 0.5, rel=1e-6)
    assert win.step_time(_decode(n, 100)) == pytest.approx(nowin.step_time(_decode(n, 100)), rel=1e-12)
    # a prefill chunk far into a long prompt: the window layers' pairs stop at 128 per query
    b = BatchShape(num_seqs=1, prefill_tokens=2048, prefill_attn_pairs=2048 * 30000.0)
    pair_s = m.attention_flops_per_pair() / hw.peak_flops(m.compute_dtype)
    saved = nowin.step_time(b) - win.step_time(b)
    assert saved == pytest.approx(0.5 * pair_s * (2048 * 30000.0 - 2048 * 128), rel=1e-6)


def test_a_window_on_more_layers_than_the_model_has_is_refused():
    m = load_model_spec("gpt-oss-20b")
    with pytest.raises(ValueError, match="sliding_window_layers"):
        dataclasses.replace(m, sliding_window_layers=m.num_layers + 1)


def test_the_attention_runs_at_its_own_rate_and_at_the_linear_layers_rate_when_unset():
    """The attention kernels' FLOP rate is the kernel's on the device (FlashAttention, or the Triton
    kernels gpt-oss's sinks need on an A100), not the model's GEMM rate: `attention_efficiency`
    changes the attention's time and nothing else; unset, the attention runs at compute_efficiency."""
    prefill = BatchShape(num_seqs=1, prefill_tokens=2048, prefill_attn_pairs=2048 * 16000.0)
    decode = BatchShape(num_seqs=64, decode_seqs=64, decode_ctx_tokens=64 * 100)
    unset = RooflineCoefficients()
    assert unset.attention_efficiency is None and unset.attention_rate == unset.compute_efficiency
    assert "attention_efficiency" not in unset.as_dict()  # a profile leaves it out
    slow = RooflineCoefficients(attention_efficiency=unset.compute_efficiency / 4)
    for model, share in (("gpt-oss-20b", 0.5), ("qwen3-14b", 1.0)):  # half of gpt-oss's layers see a window
        m, a100 = load_model_spec(model), load_hardware_spec("a100-80g")
        st = RooflineStepTime(m, a100, 1, unset)
        window = 0.5 * 2048 * 128 if share < 1 else 0.0
        attn = (m.attention_flops_per_pair() / a100.peak_flops("bf16")
                * (share * 2048 * 16000.0 + window) / unset.compute_efficiency)
        assert st.with_coeffs(slow).step_time(prefill) - st.step_time(prefill) == pytest.approx(3 * attn, rel=1e-6)
        # a decode step's attention is bound by its KV reads, which the rate does not touch
        assert st.with_coeffs(slow).step_time(decode) == st.step_time(decode)
        same = RooflineCoefficients(attention_efficiency=unset.compute_efficiency)
        assert st.with_coeffs(same).step_time(prefill) == st.step_time(prefill)


def test_the_kv_pool_of_a_sliding_window_model_counts_only_its_full_attention_layers():
    """vLLM's hybrid KV cache manager keeps only the window for sliding layers, so a token of
    context costs the pool the full layers' bytes; and the pool is what the engine's reported
    weights leave (gpt-oss-120b: 65.97 GiB loaded through Marlin, not the shapes' 59.4)."""
    m, hw = load_model_spec("gpt-oss-120b"), load_hardware_spec("a100-80g")
    free = 80 * 0.9 - 65.97 - 2.0  # GiB: utilization x memory - loaded weights - reserve
    expected = free * 1024**3 // (m.kv_bytes_per_token(1) * 0.5)
    assert kv_capacity_tokens(m, hw, 1, 0.9, 2.0) == pytest.approx(expected, abs=1)
    dense = load_model_spec("qwen3-14b")
    assert kv_capacity_tokens(dense, hw, 1, 0.9, 2.0) == pytest.approx(
        (80 * 0.9 * 1024**3 - dense.weight_bytes_total() - 2.0 * 1024**3) // dense.kv_bytes_per_token(1), abs=1)


# --- DP attention with expert parallelism (step_time.dp) ---------------------------------------------
def _terms(st: RooflineStepTime, shape: BatchShape) -> dict:
    names = ("linear", "weights", "attention", "kv", "comm", "seqs", "prefill", "overlap", "latency")
    return {k: (float(v[0]) if isinstance(v, np.ndarray) else v) for k, v in zip(names, st.step_terms(features([shape])))}


def test_dp_attention_divides_flops_and_kv_by_rank_but_reads_the_dense_weights_whole():
    """DeepSeek-R1 on 8 devices as DP8 x TP1 (experts over all 8) against TP8: the same FLOPs per
    device, the same KV reads (MLA's latent is not split by TP, a DP rank holds only its own
    sequences), but each rank reads all of the non-expert weights (attention, dense layers,
    shared experts, embeddings), 8 x what a TP8 device reads of them."""
    m, hw = load_model_spec("deepseek-r1-fp8"), load_hardware_spec("h20")
    tp8, dp8 = RooflineStepTime(m, hw, tp=8), RooflineStepTime(m, hw, tp=1, dp=8)
    shape = BatchShape(num_seqs=64, prefill_tokens=0, prefill_attn_pairs=0, decode_seqs=64, decode_ctx_tokens=64 * 2000)
    a, b = _terms(tp8, shape), _terms(dp8, shape)
    assert b["linear"] == pytest.approx(a["linear"]) and b["attention"] == pytest.approx(a["attention"])
    assert b["kv"] == pytest.approx(a["kv"] / 8)  # TP8 replicates the latent: every device reads all 64 contexts
    bw = hw.hbm_bandwidth_gbps * 1e9
    shared = m.num_moe_layers * m.shared_experts * m.expert_params() * m.bytes_per_weight
    non_expert = m.weight_bytes_total() - m.num_moe_layers * m.num_experts * m.expert_params() * m.bytes_per_weight
    routed = tp8._experts_touched(64) - m.shared_experts  # experts 64 tokens touch, 1/8 of each on a device
    expected = (non_expert + shared + routed * m.num_moe_layers * m.expert_params() * m.bytes_per_weight / 8) / bw
    assert b["weights"] == pytest.approx(expected)
    assert b["weights"] > a["weights"]


def test_dp_attention_pays_a_dispatch_and_a_combine_all_to_all_per_moe_layer_and_no_all_reduce():
    """Per token of the instance: 2 all-to-alls per MoE layer of k hidden states (16-bit), (g-1)/g of
    them to other devices, each device sending 1/g of the tokens; a latency per all-to-all.
    TP1 ranks have no all-reduce."""
    m, hw = load_model_spec("deepseek-r1-fp8"), load_hardware_spec("h20")
    st = RooflineStepTime(m, hw, tp=1, dp=8)
    shape = BatchShape(num_seqs=80, prefill_tokens=0, prefill_attn_pairs=0, decode_seqs=80, decode_ctx_tokens=80_000)
    t = _terms(st, shape)
    per_token = m.num_moe_layers * 2 * m.experts_per_token * m.hidden_size * 2 * (7 / 8) / (hw.interconnect_gbps * 1e9) / 8
    assert t["comm"] == pytest.approx(80 * per_token)
    assert t["latency"] == pytest.approx(m.num_moe_layers * 2 * hw.allreduce_latency_us * 1e-6)
    both = _terms(RooflineStepTime(m, hw, tp=2, dp=4), shape)  # TP2 ranks all-reduce over their own 20 tokens
    allreduce = m.num_layers * 2 * m.hidden_size * 2 * 2 * (1 / 2) / (hw.interconnect_gbps * 1e9) * 80 / 4
    assert both["comm"] == pytest.approx(allreduce + 80 * per_token)
    assert both["latency"] == pytest.approx((m.num_layers + m.num_moe_layers) * 2 * hw.allreduce_latency_us * 1e-6)


def test_each_dp_rank_pads_its_share_of_the_batch_to_its_own_cuda_graph():
    from sim.step_time import EngineFacts

    m, hw = load_model_spec("deepseek-r1-fp8"), load_hardware_spec("h20")
    st = RooflineStepTime(m, hw, tp=1, dp=4, facts=EngineFacts(graph_sizes=(1, 2, 4, 8)))
    assert st._run_tokens(5, 0) == 8  # 5 decodes over 4 ranks: 2 on the busiest, every rank runs graph 2
    assert st._run_tokens(13, 0) == 16  # 4 on the busiest: graph 4 on each rank
    assert st._run_tokens(20, 0) == 32  # 5: graph 8
    assert st._run_tokens(33, 0) == 33  # 9 is past the largest graph: eager
    assert st._run_tokens(5, 5) == 5  # a prefill runs eager when only decodes have graphs
    assert RooflineStepTime(m, hw, tp=4, facts=EngineFacts(graph_sizes=(1, 2, 4, 8)))._run_tokens(5, 0) == 8


def test_dp_attention_needs_an_moe_model_and_the_roofline():
    from sim.config import StepTimeConfig

    with pytest.raises(ValueError, match="needs an MoE model"):
        RooflineStepTime(load_model_spec("llama-2-7b"), load_hardware_spec("a100-80g"), tp=1, dp=2)
    with pytest.raises(ValueError, match="dp = 2"):
        StepTimeConfig(dp=2, per_decode_seq_s=0.001)
    st = StepTimeConfig(model="deepseek-r1-fp8", hardware="h20", tp=1, dp=8).build()
    assert st.dp == 8 and st.with_coeffs(st.coeffs).dp == 8
