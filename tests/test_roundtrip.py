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
    3 % on the means and 5 % on the p99s per stage, and the runs it never saw (another rate,
    3x longer prompts and outputs, other token budgets, a closed loop) to 8 % on the means.

    The means' bound was 2 %: with the linear layers and the attention as two rooflines, the
    stage-0 mean TTFT comes out 0.5 % off with today's numpy and scipy and 2.3 % with the oldest
    releases the floors admit (numpy 1.26.0, scipy 1.11.1), where the optimiser stops elsewhere in
    the flat valley between the front end's latency and the per-prefill overhead. The experiment,
    at 5,000 requests and three seeds, reproduces every stage's means within 1.1 %.

    The round trip's 5 % target is judged on the experiment (5,000 requests, mean over three
    seeds, experiments/results/roundtrip.md). At this size one seed's fit leaves memory efficiency
    and the per-step overhead loosely pinned, and the worst prediction (TPOT at 3x the context)
    spread 2.9-6.4 % over seeds 0-2; 8 % still fails a fit that lands in a worse basin (seed 0's
    fit gave 9.1 % before a search from the re-optimised replay point was added)."""
    r = one(CASES[0], seed=0, total=2400, n_variant=400, work=tmp_path)
    err = r["errors"]
    reproduce = {k: v for k, v in err.items() if k.startswith("reproduce")}
    assert len(reproduce) == 3 * len(MEANS + TAILS)
    worst_mean = max(abs(v) for k, v in reproduce.items() if k.split("|")[2] in MEANS)
    worst_tail = max(abs(v) for k, v in reproduce.items() if k.split("|")[2] in TAILS)
    assert worst_mean <= 3, reproduce
    assert worst_tail <= 5, reproduce
    predict = {k: v for k, v in err.items() if k.startswith("predict")}
    assert len(predict) == 5 * 4
    assert max(np.abs(list(predict.values()))) <= 8, predict
