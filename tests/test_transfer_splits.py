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


def test_a_transfer_row_is_never_fitted():
    split = load_split("gpustack-qwen3-14b-to-32b")
    rows, _ = cases(split)
    fit = StepTimeFit(model="qwen3-14b", hardware="a100-80g")
    with pytest.raises(ValueError, match="can only be predicted"):
        fit.fit([c for c in rows if c.step][:1])
