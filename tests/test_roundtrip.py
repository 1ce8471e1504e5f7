"""The round trip at test size: calibrate on a run this simulator recorded with a known profile,
then reproduce that run and predict others (experiments/roundtrip.py runs it at full size)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from roundtrip import CASES, MEANS, TAILS, one  # noqa: E402


def test_calibrate_recovers_a_profile_that_reproduces_its_run_and_predicts_others(tmp_path):
    """~2,400 requests in three stages (the experiment records 5,000): the run is reproduced to
    2 % on the means and 5 % on the p99s per stage, and the runs it never saw (another rate,
    3x longer prompts and outputs, other token budgets, a closed loop) to 5 % on the means."""
    r = one(CASES[0], seed=0, total=2400, n_variant=400, work=tmp_path)
    err = r["errors"]
    reproduce = {k: v for k, v in err.items() if k.startswith("reproduce")}
    assert len(reproduce) == 3 * len(MEANS + TAILS)
    worst_mean = max(abs(v) for k, v in reproduce.items() if k.split("|")[2] in MEANS)
    worst_tail = max(abs(v) for k, v in reproduce.items() if k.split("|")[2] in TAILS)
    assert worst_mean <= 2, reproduce
    assert worst_tail <= 5, reproduce
    predict = {k: v for k, v in err.items() if k.startswith("predict")}
    assert len(predict) == 5 * 4
    assert max(np.abs(list(predict.values()))) <= 5, predict
