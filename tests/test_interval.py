"""Prediction intervals from a fit: the covariance it leaves, its draws, and the printed range."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration.interval import Uncertainty, bounds, z_of
from sim.perf_model import RooflineCoefficients
from sim.profile import load_profile

ROOT = Path(__file__).resolve().parents[1]


def test_the_interval_is_the_draws_spread_and_the_residual_error_in_log_space():
    z = z_of(0.9)
    assert z == pytest.approx(1.6449, abs=1e-4)
    lo, hi = bounds([100.0] * 5, 0.1, 0.9)  # no spread in the draws: the residual error alone
    assert (lo, hi) == pytest.approx((100 * math.exp(-0.1 * z), 100 * math.exp(0.1 * z)))
    wide = bounds([80.0, 100.0, 125.0], 0.0, 0.9)
    assert wide[0] < 80 and wide[1] > 125
    with pytest.raises(ValueError, match="between 0 and 100"):
        z_of(1.5)


def test_draws_start_from_the_fit_stay_in_bounds_and_keep_what_is_fixed():
    unc = Uncertainty(["step_overhead_s", "per_seq_s", "memory_efficiency"], np.array([math.log(0.01), 0.5, math.log(0.7)]),
                      np.diag([0.04, 4.0, 0.01]), 0.05)
    base = RooflineCoefficients(step_overhead_s=0.01, per_seq_s=0.0015, memory_efficiency=0.7, compute_efficiency=0.33)
    sets = unc.draws(base, 50, seed=1)
    assert sets[0].as_dict() == pytest.approx(base.as_dict())
    per_seq = np.array([c.per_seq_s for c in sets])
    assert per_seq.min() >= 0 and per_seq.max() <= 0.003  # its range, though its spread is far wider
    assert all(c.compute_efficiency == 0.33 for c in sets)  # not fitted: not drawn
    mem = np.array([c.memory_efficiency for c in sets[1:]])
    assert 0.6 < np.exp(np.mean(np.log(mem))) < 0.8 and np.std(np.log(mem)) == pytest.approx(0.1, rel=0.35)
    again = unc.draws(base, 50, seed=1)
    assert [c.as_dict() for c in again] == [c.as_dict() for c in sets]


def test_a_coefficient_on_its_bound_is_not_drawn():
    class Fit:  # what Uncertainty.of_fit reads of a StepTimeFit
        loss_ = 0.001
        x_ = np.array([math.log(0.01), 1.0])
        jacobian_ = np.array([[1.0, 0.5], [0.5, 0.0], [0.2, 0.1]])

        def _names(self):
            return ["step_overhead_s", "frontend_latency_s"]

        def _bounds(self):
            return np.array([math.log(1e-4), 0.0]), np.array([math.log(0.5), 1.0])

    unc = Uncertainty.of_fit(Fit())
    assert unc.covariance[1, 1] == 0 and unc.covariance[0, 0] > 0
    assert unc.residual_rms_log == pytest.approx(math.sqrt(0.001 * 3 / 2))


def _servesim(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sim.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_run_prints_the_interval_around_the_prediction():
    out = _servesim("run", "scenarios/seed004/enable-512.toml", "--interval", "90", "--interval-draws", "4", "-q")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if "90 % prediction interval (4 draws)" in l)
    row = next(l for l in lines[start:] if l.startswith("Mean TPOT (ms):"))
    mid, lo, hi = map(float, row.split(":")[1].split())
    report = next(l for l in lines[:start] if l.startswith("Mean TPOT (ms):"))
    assert float(report.split()[-1]) == pytest.approx(mid, abs=0.01)  # the first draw is the run itself
    assert lo < mid < hi


def test_an_interval_needs_a_profile_with_its_fit(tmp_path):
    prof = load_profile("seed004-qwen72b-gptq")
    bare = tmp_path / "bare.toml"
    prof.fit = {k: v for k, v in prof.fit.items() if not k.startswith("interval_")}
    prof.save(bare)
    sc = tmp_path / "s.toml"
    sc.write_text(f'include = "{ROOT}/scenarios/seed004/enable-512.toml"\n\n[step_time]\nprofile = "{bare}"\n')
    out = _servesim("run", str(sc), "--interval", "90", "-q")
    assert out.returncode != 0 and "no fit covariance" in out.stderr
    hand = tmp_path / "hand.toml"
    hand.write_text('[engine]\nmax_model_len = 4096\nkv_cache_tokens = 100000\n\n[workload]\nnum_prompts = 4\n'
                    'random_input_len = 64\nrandom_output_len = 8\n\n[step_time]\nmodel = "llama-3.1-8b"\n'
                    'hardware = "h100-80g"\n')
    out = _servesim("run", str(hand), "--interval", "90", "-q")
    assert out.returncode != 0 and "needs a fitted profile" in out.stderr
