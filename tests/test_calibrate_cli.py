"""`servesim calibrate` and `servesim predict` as a user runs them on a recorded run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from calibration.fit import RowCase, StepTimeFit
from sim.cli import _row_cases, main
from sim.config import scenario_from_dict
from sim.runner import simulate

TRUE = {"step_overhead_s": 0.004, "per_seq_s": 2e-5, "prefill_overhead_s": 0.003, "frontend_latency_s": 0.012,
        "compute_efficiency": 0.55, "memory_efficiency": 0.8}
ENGINE = {"scheduler": "vllm-v1", "version": "0.11.0", "max_model_len": 4096, "kv_cache_tokens": 200000}
MODEL, HW = "llama-3.1-8b", "h100-80g"


def _record(tmp_path, stages=((8, 10), (20, 10)), seed=0) -> tuple:
    res = simulate(scenario_from_dict({
        "engine": ENGINE,
        "workload": {"dataset_name": "sharegpt", "seed": seed,
                     "stages": [{"rate": r, "duration": d} for r, d in stages]},
        "step_time": {"model": MODEL, "hardware": HW, **TRUE}}))
    run = tmp_path / "run.csv"
    res.bench.requests.to_csv(run, index=False)
    base = tmp_path / "base.toml"
    base.write_text('[engine]\nscheduler = "vllm-v1"\nversion = "0.11.0"\nmax_model_len = 4096\n'
                    'kv_cache_tokens = 200000\n\n[workload]\nclient = "vllm"\n')
    return res, run, base


def test_calibrate_writes_a_profile_and_its_report_in_the_working_directory(tmp_path, monkeypatch, capsys):
    _, run, base = _record(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc = main(["calibrate", "--table", str(run), "--base", str(base), "--model", MODEL, "--hardware", HW,
               "--out", "mine", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "mine.toml").exists() and (tmp_path / "mine.report.md").exists()
    # it checks itself: every training row and metric, measured against fitted by simulation
    assert "Training rows, re-simulated with the fitted coefficients:" in out
    assert "run-stage0" in out and "run-stage1" in out and "p99_ttft_ms" in out
    report = (tmp_path / "mine.report.md").read_text()
    assert "| run-stage1 | mean_tpot_ms |" in report and "no coefficient is on a bound" in report
    # the profile is found by name from here, by a scenario, before the bundled ones
    sc = tmp_path / "again.toml"
    sc.write_text(f'[engine]\nscheduler = "vllm-v1"\nmax_model_len = 4096\nkv_cache_tokens = 200000\n'
                  f'[workload]\ndataset_name = "trace"\ntrace_path = "{run}"\ntrace_stage = 1\n'
                  f'[step_time]\nprofile = "mine"\n')
    assert main(["run", str(sc), "-q"]) == 0
    assert "Step time" not in capsys.readouterr().out  # -q: the report only


def test_the_reported_loss_is_a_full_simulations(tmp_path):
    """Timed arrivals cannot be replayed exactly: whatever the fit optimised, the loss it reports
    is that of full simulations of its training rows with its coefficients."""
    _, run, base = _record(tmp_path)
    cases = _row_cases(str(run), None, str(base))
    f = StepTimeFit(model=MODEL, hardware=HW, metrics=("mean_ttft_ms", "mean_tpot_ms", "mean_e2e_ms", "p99_ttft_ms"),
                    processes=1).fit(cases)
    pred = f.predict(cases)
    pred = pred[pred.metric.isin(f.metrics)]
    assert f.loss_ == pytest.approx(float(np.mean(np.log(pred.predicted / pred.measured) ** 2)), rel=1e-9)
    assert f.loss_ < 0.0005  # the model that made the run: within the schedule's own noise (~1 %)


def test_a_poor_fit_exits_nonzero_and_writes_no_profile(tmp_path, monkeypatch, capsys):
    """A measured TTFT no step time explains (50x what the run shows) pushes the front-end
    latency to its bound: the fit says so, names the term, and refuses to write the profile."""
    _, run, base = _record(tmp_path, stages=((8, 10),))
    df = pd.read_csv(run)
    df["ttft_s"] *= 50
    df["e2el_s"] += df["ttft_s"] * 49 / 50
    df.to_csv(run, index=False)
    monkeypatch.chdir(tmp_path)
    args = ["calibrate", "--table", str(run), "--base", str(base), "--model", MODEL, "--hardware", HW, "--out", "bad",
            "--no-progress"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "POOR FIT: frontend_latency_s" in captured.out and "is at its upper bound" in captured.out
    assert "poor fit, profile not written" in captured.err
    assert not (tmp_path / "bad.toml").exists() and (tmp_path / "bad.report.md").exists()
    assert main(args + ["--allow-poor-fit"]) == 0
    assert "poor_fit = [" in (tmp_path / "bad.toml").read_text()


def test_too_few_numbers_for_the_coefficients_is_refused(tmp_path, capsys):
    p = tmp_path / "t.csv"
    pd.DataFrame({"run_id": ["a"], "median_ttft_ms": [120.0], "num_prompts": [100], "max_concurrency": [4],
                  "input_len": [512], "output_len": [128]}).to_csv(p, index=False)
    base = tmp_path / "base.toml"
    base.write_text('[engine]\nscheduler = "vllm-v1"\nmax_model_len = 4096\nkv_cache_tokens = 200000\n'
                    '[workload]\ndataset_name = "random"\n')
    rc = main(["calibrate", "--table", str(p), "--base", str(base), "--model", MODEL, "--hardware", HW,
               "--metrics", "median_ttft_ms", "--out", str(tmp_path / "x.toml"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "1 measured numbers" in err and "cannot determine 6 coefficients" in err and "hold coefficients fixed" in err


def test_predict_prints_every_row_measured_against_predicted(tmp_path, monkeypatch, capsys):
    _, run, base = _record(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "known.toml").write_text(
        f'[profile]\nname = "known"\nmodel = "{MODEL}"\nhardware = "{HW}"\ntp = 1\n\n[coefficients]\n'
        + "".join(f"{k} = {v}\n" for k, v in TRUE.items()) + '\n[fit]\nsource = "hand-set for the test"\n')
    out_csv = tmp_path / "p.csv"
    assert main(["predict", "--profile", "known", "--table", str(run), "--base", str(base), "--output", str(out_csv),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "run-stage0" in text and "run-stage1" in text and "median_ape_pct" in text
    p = pd.read_csv(out_csv)
    # the profile that made the run predicts it exactly (the same requests, the same step times)
    assert p[p.metric.str.startswith("mean")].ape_pct.max() < 1e-6


def test_fixed_coefficients_are_held_and_count_as_known(tmp_path):
    _, run, base = _record(tmp_path, stages=((8, 10),))
    cases = _row_cases(str(run), None, str(base))
    f = StepTimeFit(model=MODEL, hardware=HW, metrics=("mean_ttft_ms", "mean_tpot_ms"), processes=1,
                    fixed={k: v for k, v in TRUE.items() if k not in ("frontend_latency_s", "step_overhead_s")})
    f.fit(cases)
    assert f.coeffs_.compute_efficiency == TRUE["compute_efficiency"]
    assert f.coeffs_.frontend_latency_s == pytest.approx(TRUE["frontend_latency_s"], rel=0.1)


def test_closed_loop_rows_with_a_front_end_latency_fit_as_hand_set_coefficients_reproduce_them():
    """Max-concurrency 1: the engine idles between requests and every request reaches the
    scheduler a front-end latency after the previous one ended. Fitted on such rows made with
    known coefficients, TPOT and throughput come back (they did not, when replays held each
    restart at its recorded time)."""
    data = {"engine": ENGINE, "workload": {"dataset_name": "random", "num_prompts": 40, "random_input_len": 400,
                                           "random_output_len": 150, "max_concurrency": 1},
            "step_time": {"model": MODEL, "hardware": HW, **TRUE, "frontend_latency_s": 0.08}}
    cases = []
    for n_in in (400, 2000):
        d = {**data, "workload": {**data["workload"], "random_input_len": n_in}}
        m = simulate(scenario_from_dict(d)).bench.metrics
        cases.append(RowCase(f"in{n_in}", {"mean_ttft_ms": m["mean_ttft_ms"], "mean_tpot_ms": m["mean_tpot_ms"],
                                            "output_throughput": m["output_throughput"],
                                            "median_itl_ms": m["median_itl_ms"]},
                             {**d, "step_time": {}}))
    f = StepTimeFit(model=MODEL, hardware=HW, processes=1).fit(cases)
    pred = f.predict(cases)
    assert pred[pred.metric.isin(f.metrics)].ape_pct.max() < 2
    assert not math.isnan(f.loss_)
