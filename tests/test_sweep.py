"""`servesim sweep`: grid expansion, seeds, confidence intervals, outputs, and the Dask path."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from sim.cli import main
from sim.config import ScenarioError
from sim.sweep import pareto_front, parse_grid, points, sweep

SCENARIO = """
[engine]
scheduler = "vllm-v1"
max_model_len = 2048
num_gpu_blocks_override = 400
[workload]
dataset_name = "random"
num_prompts = 30
random_input_len = 400
random_output_len = 30
random_range_ratio = 0.5
request_rate = 20.0
[step_time]
step_overhead_s = 0.01
per_prefill_token_s = 1e-4
per_decode_seq_s = 1e-4
"""
GRID = ["engine.max_num_batched_tokens=256,2048", "workload.max_concurrency=2,16"]


@pytest.fixture
def scenario(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SCENARIO)
    return str(p)


def test_grid_is_the_cross_product_and_bad_axes_are_named():
    axes = parse_grid(["a.b=1,2,3", "c.d=x,y"])
    assert len(points(axes)) == 6 and points(axes)[0] == {"a.b": "1", "c.d": "x"}
    with pytest.raises(ScenarioError, match="expected KEY=V1,V2"):
        parse_grid(["engine.max_num_batched_tokens"])
    with pytest.raises(ScenarioError, match="given twice"):
        parse_grid(["a=1", "a=2"])


def test_bad_value_fails_before_anything_runs(scenario):
    with pytest.raises(ScenarioError, match="max_num_batched_tokens"):
        sweep(scenario, ["engine.max_num_batched_tokens=256,-5"], seeds=1, processes=1, progress=False)


def test_summary_has_means_and_t_intervals_over_seeds(scenario):
    runs, summary = sweep(scenario, GRID, seeds=3, processes=2, progress=False, slos=["ttft_ms=500"])
    assert len(runs) == 12 and len(summary) == 4 and (summary.seeds == 3).all()
    one = runs[runs.point == 0].mean_ttft_ms
    assert summary.mean_ttft_ms[0] == pytest.approx(one.mean())
    assert summary.mean_ttft_ms_ci95[0] == pytest.approx(4.302653 * one.std(ddof=1) / math.sqrt(3), rel=1e-5)
    assert "request_goodput" in summary and summary.request_goodput.notna().all()
    # more concurrency, more throughput: the sweep sees what the simulator does
    s = summary.set_index(["engine.max_num_batched_tokens", "workload.max_concurrency"])
    assert s.output_throughput[("2048", "16")] > s.output_throughput[("2048", "2")]


def test_dask_local_cluster_gives_identical_numbers(scenario):
    distributed = pytest.importorskip("distributed")
    local_runs, _ = sweep(scenario, GRID, seeds=2, processes=2, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            dask_runs, _ = sweep(scenario, GRID, seeds=2, dask=client, progress=False)
    pd.testing.assert_frame_equal(local_runs, dask_runs)


def test_pareto_front_keeps_only_undominated_points():
    df = pd.DataFrame({"x": [1, 2, 3, 2.5], "y": [5, 3, 1, 4]})
    assert list(pareto_front(df, "x", "y").index) == [0, 1, 2]


def test_cli_writes_tables_and_plots(scenario, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sweep", scenario, *sum((["--grid", g] for g in GRID), []), "--seeds", "2", "--slo", "ttft_ms=500",
                 "--out", str(out), "--processes", "2", "--no-progress"]) == 0
    assert "best under ttft_ms=500" in capsys.readouterr().out
    assert pd.read_parquet(out / "summary.parquet").shape[0] == 4
    for f in ("runs.csv", "summary.csv", "ttft_vs_itl.png", "latency_vs_throughput.png", "goodput.png"):
        assert (out / f).stat().st_size > 0
