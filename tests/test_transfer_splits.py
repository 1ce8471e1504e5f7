"""Transfer splits: fitted on one configuration, predicting another model of the family, or another
engine on the same hardware, each predicted row with its own model spec and KV pool."""

from __future__ import annotations

import pytest

from calibration.fit import StepTimeFit, _with
from calibration.splits import cases, load_split
from calibration.validate import validate
from sim.config import scenario_from_dict


def test_a_family_split_predicts_the_other_model_with_its_own_spec_and_pool(tmp_path):
    split = load_split("gpustack-qwen3-14b-to-32b")
    rows, _ = cases(split)
    train = [c for c in rows if c.row_id in split.train]
    other = [c for c in rows if c.row_id not in split.train]
    assert other and all(c.row_id.startswith("Qwen/Qwen3-32B") for c in other)  # the transfer alone
    assert all(c.step == {"model": "qwen3-32b"} for c in other) and all(not c.step for c in train)
    data = _with(other[0], {"model": "qwen3-14b", "hardware": "a100-80g", "tp": 1}, None, 0)
    sc = scenario_from_dict(data)
    assert sc.step_time.model == "qwen3-32b"
    assert sc.engine.kv_cache_tokens == other[0].scenario["engine"]["kv_cache_tokens"]  # 32B's own pool
    assert sc.engine.kv_cache_tokens < train[0].scenario["engine"]["kv_cache_tokens"]  # more weights, less KV
    res = validate("gpustack-qwen3-14b-to-32b", progress=False, write_profile=True, out_dir=tmp_path)
    held = res.predictions[~res.predictions.train]
    assert set(held.row_id) == {c.row_id for c in other}
    assert split.profile == "" and (tmp_path / "report.md").exists()  # no profile of its own


def test_a_cross_engine_split_keeps_each_engine_and_the_other_engines_pool():
    split = load_split("seed002-vllm-to-sglang")
    rows, _ = cases(split)
    sglang = [c for c in rows if c.row_id.startswith("sglang")]
    assert len(sglang) == 22 and all(c.kv_tokens == 100_192 for c in sglang)  # SGLang's memory formula
    assert all(c.kv_tokens is None for c in rows if c.row_id.startswith("vllm"))  # the fitted pool
    assert {c.row_id for c in rows} - {c.row_id for c in sglang} == set(split.train)
    data = _with(sglang[0], {"model": "deepseek-r1-fp8", "hardware": "h20", "tp": 8}, 28_752, 0)
    sc = scenario_from_dict(data)
    assert sc.engine.scheduler == "sglang" and sc.engine.kv_cache_tokens == 100_192


def test_a_row_of_another_engines_pool_is_never_fitted():
    """Rows of other models on the same GPU may be fitted together (one efficiency set per GPU,
    experiments/gpu_shared.py); a row of another engine's KV pool or another GPU only predicted."""
    split = load_split("seed002-vllm-to-sglang")
    rows, _ = cases(split)
    fit = StepTimeFit(model="deepseek-r1-fp8", hardware="h20", tp=8)
    with pytest.raises(ValueError, match="can only be predicted"):
        fit.fit([c for c in rows if c.kv_tokens is not None][:1])
    moved = rows[0].__class__(rows[0].row_id, rows[0].measured, rows[0].scenario, step={"hardware": "h100-80g"})
    with pytest.raises(ValueError, match="another GPU"):
        fit.fit([moved])


def test_one_efficiency_set_fitted_across_models_predicts_a_model_it_never_saw():
    """Runs of two models on one GPU, simulated with one known coefficient set, fitted together
    (each row timed with its own model spec): a third model's run is predicted as the known set
    predicts it. The per-GPU calibration's mechanics, with no measurement noise."""
    from calibration.fit import RowCase

    known = {"step_overhead_s": 0.004, "per_seq_s": 2e-5, "prefill_overhead_s": 0.003, "frontend_latency_s": 0.01,
             "compute_efficiency": 0.5, "memory_efficiency": 0.75}

    def run(model, n, inp, out, coeffs):
        data = {"engine": {"scheduler": "vllm-v1", "max_model_len": 8192, "kv_cache_tokens": 200_000},
                "workload": {"client": "vllm", "dataset_name": "random", "num_prompts": n, "random_input_len": inp,
                             "random_output_len": out, "random_range_ratio": 0.0, "request_rate": "inf"},
                "step_time": {"model": model, "hardware": "h100-80g", **coeffs}}
        from sim.runner import simulate

        return data, simulate(scenario_from_dict(data)).bench.metrics

    rows = []
    for model, n, inp, out in [("llama-3.1-8b", 16, 256, 64), ("llama-3.1-8b", 64, 1024, 32),
                               ("qwen3-14b", 32, 512, 64), ("qwen3-14b", 8, 2048, 128)]:
        data, m = run(model, n, inp, out, known)
        rows.append(RowCase(f"{model}-{n}", {k: m[k.replace("e2e", "e2el")] for k in
                                             ("mean_ttft_ms", "mean_tpot_ms", "output_throughput")},
                            {k: v for k, v in data.items() if k != "step_time"},
                            step={} if model == "llama-3.1-8b" else {"model": model}))
    fit = StepTimeFit(model="llama-3.1-8b", hardware="h100-80g").fit(rows)
    data, truth = run("qwen3-32b", 24, 768, 96, known)
    new = RowCase("qwen3-32b", {"mean_tpot_ms": truth["mean_tpot_ms"], "mean_ttft_ms": truth["mean_ttft_ms"]},
                  {k: v for k, v in data.items() if k != "step_time"}, step={"model": "qwen3-32b"})
    pred = fit.predict([new]).set_index("metric")
    assert pred.loc["mean_tpot_ms", "ape_pct"] < 3 and pred.loc["mean_ttft_ms", "ape_pct"] < 5, pred


def test_the_gpus_attention_efficiency_for_a_model_never_comes_from_its_own_runs():
    """Within a configuration, the attention efficiency its lowest-load runs cannot time is the
    kernel's on that GPU: the median over the *other* networks' configurations on the same kernel
    (experiments/gpustack_transfer.py); a split holds the value so found, which its committed
    profile carries."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from gpustack_transfer import base_model, gpu_attention_efficiency

    from sim.profile import load_profile

    triton, flash = ("a100-80g", "vLLM", "triton"), ("a100-80g", "vLLM", "default")
    effs = {"20b": ("gpt-oss-20b", triton, 0.10), "20b-async": ("gpt-oss-20b", triton, 0.12),
            "120b": ("gpt-oss-120b", triton, 0.11), "14b": ("qwen3-14b", flash, 0.5),
            "235b": ("qwen3-235b-a22b", flash, 0.3), "235b-fp8": ("qwen3-235b-a22b-fp8", flash, 0.7)}
    assert gpu_attention_efficiency(effs, triton, {"gpt-oss-120b"}) == pytest.approx(0.11)
    assert gpu_attention_efficiency(effs, triton, {"gpt-oss-20b"}) == pytest.approx(0.11)
    assert gpu_attention_efficiency(effs, triton, {"gpt-oss-20b", "gpt-oss-120b"}) is None
    # the same network quantised otherwise is not another model
    assert base_model("qwen3-235b-a22b-fp8") == "qwen3-235b-a22b"
    assert gpu_attention_efficiency(effs, flash, {"qwen3-235b-a22b-fp8"}) == pytest.approx(0.5)
    assert gpu_attention_efficiency(effs, ("ascend-910b", "vLLM-Ascend", "default"), set()) is None
    # no other model on SGLang's kernel on the A100: the GPU's kernel of the same kind under vLLM,
    # never the sinks' Triton kernel
    assert gpu_attention_efficiency(effs, ("a100-80g", "SGLang", "default"), {"glm-4.5-air"}) == pytest.approx(0.5)
    assert gpu_attention_efficiency(effs, ("a100-80g", "SGLang", "triton"), {"gpt-oss-20b"}) == pytest.approx(0.11)
    for name in ("gpustack-gpt-oss-120b-vllm", "gpustack-qwen3-14b-vllm", "gpustack-qwen3-235b-fp8-budgets"):
        split = load_split(name)
        held = split.fixed["attention_efficiency"]
        assert 0.05 < held < 0.9
        assert load_profile(split.profile).coeffs.attention_efficiency == held
