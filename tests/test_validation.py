"""The committed calibrations are reproducible and meet their out-of-sample targets.

These run the same fits as `servesim validate`, without rewriting the committed profiles, and
check both. "Reproducible" is judged on what a user sees, on any machine: the refit predicts
every row of the split as the committed report does (to half a percentage point of error), has
its training loss, and lies where the committed coefficients lie in every direction the training
rows pin down. Directions the rows leave flat are not compared: there, the last bits of a
measured number or of a BLAS sum may move the optimum without changing any prediction.
"""

from __future__ import annotations

import pandas as pd
import pytest

from calibration.validate import RESULTS, validate
from sim.profile import load_profile

APE_PP = 0.5  # percentage points of error a refit may differ from the committed report by
PINNED_RMS = 0.005  # change of the training residuals' RMS a pinned-direction gap may make


def _check_reproduces_profile(res):
    held = res.predictions[~res.predictions.train]
    assert not set(held.row_id) & set(res.split.train)  # never a fitted row among the predictions
    committed = load_profile(res.split.profile)
    assert committed.hardware == res.fitter.hardware_
    assert committed.kv_cache_tokens == res.fitter.kv_cache_tokens_
    report = pd.read_csv(RESULTS / res.split.name / "predictions.csv")
    both = res.predictions.merge(report, on=["row_id", "metric"], suffixes=("", "_committed"), validate="1:1")
    assert len(both) == len(report) == len(res.predictions)
    gap = (both.ape_pct - both.ape_pct_committed).abs()
    worst = both.loc[gap.idxmax()]
    assert gap.max() <= APE_PP, f"{worst.row_id} {worst.metric}: {worst.ape_pct:.2f} % vs {worst.ape_pct_committed:.2f} %"
    assert res.fitter.loss_ == pytest.approx(committed.fit["loss_mean_sq_log_ratio"], rel=0.01, abs=1e-6)
    pinned = res.fitter.compare_coefficients(committed.coeffs)
    assert pinned, "the training rows pin no direction: nothing was fitted"
    assert max(p["rms_change"] for p in pinned) <= PINNED_RMS, pinned


def test_seed004_meets_every_target_and_reproduces_its_profile(tmp_path):
    """Every prediction target is met, but the fit checks itself and says its front-end latency
    sits on its 0.5 s bound: TTFT of 1,000 prompts sent at once needs a queue in front of the
    engine that the model does not have."""
    res = validate("seed004", progress=False, write_profile=False, out_dir=tmp_path, interval=0.9, interval_draws=8)
    assert res.ok, res.failures
    _check_reproduces_profile(res)
    assert (tmp_path / "report.md").exists() and (tmp_path / "mean_ttft_ms.png").exists()
    assert [f.split(" ")[0] for f in res.fit_check.failures] == ["frontend_latency_s"]
    assert "Poor fit" in (tmp_path / "report.md").read_text()
    # Every predicted row carries a 90 % interval. Most measured values fall inside (31 of 32 with
    # 20 draws when this was written), and the intervals say something: a median width under 40 %
    # of the prediction (12-22 % then), where intervals from every unpinned direction of the fit
    # spanned 40-230 %.
    held = res.predictions[~res.predictions.train & res.predictions.metric.isin(res.split.metrics)]
    assert held.low.notna().all() and (held.low <= held.predicted).all() and (held.predicted <= held.high).all()
    assert held.inside.mean() >= 0.8, held[["row_id", "metric", "measured", "low", "high"]]
    assert ((held.high - held.low) / held.predicted).median() < 0.4
    assert "inside their 90 % prediction interval" in (tmp_path / "report.md").read_text()


def test_seed002_vllm_meets_every_target_and_reproduces_its_profile(tmp_path):
    """TTFT meets its 25 % target narrowly: the fitted rows themselves are reproduced only to
    ~25 % (the table's low-concurrency TTFTs are not monotonic in prompt length), which the
    fit's own check reports."""
    res = validate("seed002-vllm", progress=False, write_profile=False, out_dir=tmp_path)
    _check_reproduces_profile(res)
    assert res.ok, res.failures
    assert any("vllm-128-128-c1: mean_ttft_ms" in f for f in res.fit_check.failures)


@pytest.fixture(scope="module")
def sglang(tmp_path_factory):
    return validate("seed002-sglang", progress=False, write_profile=False, out_dir=tmp_path_factory.mktemp("sglang"))


def test_seed002_sglang_takes_its_kv_pool_from_sglangs_memory_formula(sglang):
    """The pool SGLang's formula gives (100,192 tokens) is among those the training rows cannot
    separate, so it is kept. TPOT at c >= 256, learned from c <= 64, misses its 10 % target
    (26.2 %; 22.4 % with the burst's wait held at 0, which the c = 64 row lets the fit use for its
    TTFT, 18.9 -> 15.2 %): the check below guards today's figure; the README says why."""
    _check_reproduces_profile(sglang)
    assert sglang.fitter.kv_cache_tokens_ == sglang.split.kv_prior_tokens()
    s = sglang.summary.set_index("metric")
    assert s.loc["mean_ttft_ms", "ok"] and s.loc["output_throughput", "ok"]
    assert s.loc["mean_tpot_ms", "median_ape_pct"] < 28


def test_a_refit_does_not_depend_on_the_last_bits_of_its_data(sglang):
    """This split's loss has basins whose TPOT predictions at c >= 256 differ by 2x. With four
    random starts, a refit on another machine (other library versions, the same code) landed in
    another basin and moved predictions by up to 45 points of error. Measured numbers changed in
    their ninth digit must give the same predictions."""
    import numpy as np

    from calibration.splits import cases
    from calibration.validate import fitter_for

    all_cases, _ = cases(sglang.split)
    rng = np.random.default_rng(1)
    train = [c for c in all_cases if c.row_id in sglang.split.train]
    for c in train:
        c.measured = {m: v * (1 + 1e-9 * rng.standard_normal()) for m, v in c.measured.items()}
    fitter = fitter_for(sglang.split).fit(train)
    pred = fitter.predict(all_cases)
    both = pred.merge(sglang.predictions, on=["row_id", "metric"], suffixes=("", "_unperturbed"))
    assert len(both) == len(pred)
    assert (both.ape_pct - both.ape_pct_unperturbed).abs().max() <= APE_PP


def test_seed001_predicts_long_prompt_ttft_from_one_chunk(tmp_path):
    res = validate("seed001", progress=False, write_profile=False, out_dir=tmp_path)
    _check_reproduces_profile(res)
    held = res.predictions[~res.predictions.train]
    assert set(held.row_id) == {"sglang_r1_2x8h100_ttft_vs_len-16384", "sglang_r1_2x8h100_ttft_vs_len-32768"}
    # two measured numbers fit two coefficients (the split holds the rest): the 16k and 32k TTFTs
    # come out 23 % and 33 % high; the README says why
    assert held.ape_pct.max() < 35
    assert sorted(res.fitter._names()) == ["compute_efficiency", "step_overhead_s"]


def test_a_public_configuration_validates_from_its_launch_command(tmp_path):
    """GPUStack's Qwen3-14B runs: each scenario built from the row's launch command, a refit
    reproduces the committed report. The burst's wait in front of the scheduler
    (frontend_per_request_s) now explains the 128-in/4-out run's late first tokens, which the fit
    used to absorb by missing that run by 38-47 %; on its own rows it is now within 18 %. The
    4,000- and 32,000-token runs time the attention kernels, which the three lowest-load runs
    cannot: held at FlashAttention's efficiency on the A100 from the other models' runs (the split's
    `fixed`), every target is met (6.7 / 8.1 / 7.9 %; left at the GEMMs' rate, TPOT -15 and -11 %
    on those runs and 13.0 / 12.0 % median TPOT / throughput)."""
    res = validate("gpustack-qwen3-14b-vllm", progress=False, write_profile=False, out_dir=tmp_path)
    _check_reproduces_profile(res)
    s = res.summary.set_index("metric")
    assert s["ok"].all(), s
    assert "attention_efficiency" not in res.fitter._names()  # held, the split's value
    assert "frontend_per_request_s" in res.fitter._names() and res.fitter.coeffs_.frontend_per_request_s > 0.005
    assert res.fit_check.table["ape_pct"].abs().max() < 20  # its own rows, the 128/4 run included


@pytest.mark.parametrize("folder", ["seed000", "seed001", "seed002", "seed003", "seed004"])
def test_every_seed_scenario_is_valid(folder):
    from pathlib import Path

    from sim.config import load_scenario

    root = Path(__file__).resolve().parents[1] / "scenarios" / folder
    files = [p for p in root.rglob("*.toml") if not p.name.startswith("_")]
    assert files
    for p in files:
        load_scenario(p)
