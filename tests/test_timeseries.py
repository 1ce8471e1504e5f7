"""`run --output-timeseries`: dashboard numbers per interval add up to the run's totals."""

from __future__ import annotations

import pandas as pd
import pytest

from sim.cli import main
from sim.config import scenario_from_dict
from sim.runner import simulate
from sim.timeseries import COLUMNS, timeseries


def _run(prefix: int = 0, blocks: int = 1000):
    data = {"engine": {"scheduler": "vllm-v1", "max_model_len": 2048, "num_gpu_blocks_override": blocks,
                       "max_num_batched_tokens": 512},
            "step_time": {"step_overhead_s": 0.01, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 1e-4},
            "workload": {"dataset_name": "random", "num_prompts": 60, "random_input_len": 300,
                         "random_output_len": 60, "request_rate": 20.0, "random_prefix_len": prefix}}
    return simulate(scenario_from_dict(data), record_steps=True)


@pytest.mark.parametrize("interval", [0.25, 1.0])
def test_intervals_add_up_to_the_run(interval):
    res = _run(blocks=150)  # small pool: some preemptions
    ts = timeseries(res, interval)
    assert list(ts.columns) == COLUMNS
    steps = res.instance_steps[0]
    assert ts.generation_tokens_per_s_per_gpu.sum() * interval == pytest.approx(sum(r.output_len for r in res.requests))
    assert ts.prompt_tokens_per_s_per_gpu.sum() * interval == pytest.approx(sum(s.shape.prefill_tokens for s in steps))
    assert ts.requests_completed_per_s.sum() * interval == pytest.approx(res.bench.metrics["completed"])
    assert ts.preemptions.sum() == res.num_preemptions > 0
    assert ts.kv_cache_usage_pct.between(0, 100).all() and ts.kv_cache_usage_pct.max() > 50
    assert ts.running.max() <= 256 and ts.waiting.min() >= 0


def test_hit_rate_reflects_a_shared_prefix():
    shared, unique = timeseries(_run(prefix=256)), timeseries(_run())
    # 256 of each ~556-token prompt are shared: the rate sits near 0.46 once the prefix is cached
    assert 0.4 < shared.prefix_cache_hit_rate.max() < 0.55
    assert unique.prefix_cache_hit_rate.fillna(0).max() == 0


def test_cli_writes_csv_and_png(tmp_path):
    out = tmp_path / "ts.csv"
    assert main(["run", "scenarios/seed004/enable-512.toml", "--set", "workload.num_prompts=50", "-q",
                 "--output-timeseries", str(out), "--timeseries-interval", "2"]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == COLUMNS and df.t_s.diff().dropna().eq(2).all()
    assert (tmp_path / "ts.png").read_bytes()[:4] == b"\x89PNG"
