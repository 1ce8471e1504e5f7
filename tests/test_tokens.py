"""Token times kept per engine step (sim/tokens.py): the aggregates are the client's exact
numbers, with or without per-token times; and Vidur's length-trace dataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.config import load_scenario
from sim.request import Request, Status
from sim.runner import simulate
from sim.tokens import TokenStats, _lerp_percentile
from sim.workload import WorkloadError, sample_lengths


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-6, 10.0), st.integers(1, 50)), min_size=1, max_size=30),
       st.floats(0, 100))
def test_weighted_percentile_is_numpys_on_the_repeated_values(pairs, q):
    values = np.array(sorted(v for v, _ in pairs))
    weights = np.array([w for _, w in sorted(pairs)])
    expected = np.percentile(np.repeat(values, weights), q)
    assert _lerp_percentile(values, weights, q) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pooled_itl_counts_each_stream_chunk_once_and_skips_failed_requests():
    a = Request(0, 5, 4, 0.0, start_s=0.0)
    a.token_times = [1.0, 1.5, 1.5, 2.5]  # two tokens in one chunk: one gap of 0.5, then 1.0
    a.output_len, a.status = 4, Status.FINISHED
    b = Request(1, 5, 3, 0.0, start_s=0.0)
    b.token_times = [1.0, 9.0, 20.0]
    b.output_len, b.status = 2, Status.FAILED  # its gaps are not the client's
    stats = TokenStats.from_requests([a, b])
    v, w = stats.itl_values()
    assert list(np.repeat(v, w)) == [0.5, 1.0]
    assert stats.peak_tokens_per_bucket(0.0) == 3  # buckets [0, 3, 1]
    assert stats.peak_tokens_per_bucket(-1e12) == 3  # a trillion seconds earlier: no array that long


def test_report_is_the_same_without_per_token_times():
    sc = load_scenario("scenarios/seed004/enable-512.toml", ["workload.num_prompts=300"])
    kept = simulate(sc, keep_token_times=True)
    dropped = simulate(sc, keep_token_times=False)
    assert all(r.pieces is None for r in dropped.requests)  # nothing per token is left
    assert dropped.bench.metrics == kept.bench.metrics
    assert all(len(r.token_times) == r.output_len for r in kept.requests)


def test_lengths_dataset_follows_vidurs_trace_generator(tmp_path):
    path = tmp_path / "lengths.csv"
    pd.DataFrame({"num_prefill_tokens": [3000, 100, 4000, 10], "num_decode_tokens": [2000, 50, 1, 5]}).to_csv(path)
    got = sample_lengths(str(path), 4, seed=0, max_tokens=4096)
    assert sorted((s.prompt_len, s.output_len) for s in got) == sorted([
        (3000 - 543, 2000 - 362),  # 904 over: ceil(904 * 0.6) from the prompt, ceil(904 * 0.4) from the output
        (100, 50), (4000, 1), (10, 5)])
    assert [(s.prompt_len, s.output_len) for s in got] == \
           [(s.prompt_len, s.output_len) for s in sample_lengths(str(path), 4, seed=0, max_tokens=4096)]
    with pytest.raises(WorkloadError, match="workload.num_prompts"):
        sample_lengths(str(path), 5, seed=0, max_tokens=None)
