"""The benchmark client's datasets and arrival processes (engine-semantics.md §D)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.config import WorkloadConfig
from sim.workload import (
    WorkloadError,
    arrival_times,
    build_requests,
    load_sharegpt_lengths,
    load_trace,
    sample_random,
    sample_sharegpt,
)


def test_sharegpt_filter_is_vllms():
    df = pd.DataFrame({
        "prompt_tokens": [3, 10, 10, 1025, 1024, 1000, 500],
        "completion_tokens": [100, 3, 100, 10, 1024, 1049, 700],
    })
    kept = sample_sharegpt(df, 3, seed=0, fixed_output_len=None)
    assert sorted((s.prompt_len, s.output_len) for s in kept) == [(10, 100), (500, 700), (1024, 1024)]
    # with a fixed output length the output >= 4 check is skipped, the total cap still applies
    fixed = sample_sharegpt(df, 5, seed=0, fixed_output_len=2)
    assert sorted(s.prompt_len for s in fixed) == [10, 10, 500, 1000, 1024]


def test_sharegpt_too_few_samples_oversampled_by_vllm_bench_serve_only():
    """`vllm bench serve` (0.11.1+) re-seeds and tops up with random.choice of the kept samples;
    the old benchmark_serving.py and SGLang's client do not oversample."""
    import random

    df = pd.DataFrame({"prompt_tokens": [10, 20, 3], "completion_tokens": [10, 20, 10]})
    got = sample_sharegpt(df, 5, seed=7, fixed_output_len=None)
    kept = got[:2]
    rng = random.Random(7)
    assert got[2:] == [rng.choice(kept) for _ in range(3)]
    for client, n in (("vllm-legacy", 2), ("sglang", 3)):  # SGLang keeps a 3-token prompt
        with pytest.raises(WorkloadError, match=f"only {n} ShareGPT samples pass the {client} client's filter"):
            sample_sharegpt(df, 5, seed=0, fixed_output_len=None, client=client)


def test_sglang_sharegpt_filter_drops_only_what_is_under_two_tokens():
    df = pd.DataFrame({"prompt_tokens": [1, 2, 3000, 10], "completion_tokens": [10, 1, 5000, 2]})
    kept = sample_sharegpt(df, 2, seed=1, fixed_output_len=None, client="sglang")
    assert sorted((s.prompt_len, s.output_len) for s in kept) == [(10, 2), (3000, 5000)]


def test_sharegpt_order_is_pythons_shuffle_of_the_conversations():
    """Both clients shuffle the list of conversations with `random.seed(seed); random.shuffle`,
    then walk it: the first that pass are the sample, in that order."""
    import random

    n = 200
    df = pd.DataFrame({"prompt_tokens": np.arange(n) + 10, "completion_tokens": np.full(n, 50)})
    order = list(range(n))
    random.seed(3)
    random.shuffle(order)
    got = sample_sharegpt(df, 20, seed=3, fixed_output_len=None)
    assert [s.prompt_len for s in got] == [i + 10 for i in order[:20]]


def test_bundled_sharegpt_matches_seed004_workload():
    df = load_sharegpt_lengths(None)
    assert len(df["prompt_tokens"]) == len(df["completion_tokens"]) == 17400
    s = sample_sharegpt(df, 1000, seed=0, fixed_output_len=None)
    mean_in = np.mean([x.prompt_len for x in s])
    assert 190 < mean_in < 250  # seed 004 measured 217.4 per request


def test_random_vllm_semantics_is_symmetric_around_the_length():
    rs = np.random.RandomState(0)
    s = sample_random(rs, 5000, 100, 50, 0.5, prefix_len=0, legacy=False)
    ins = np.array([x.prompt_len for x in s])
    outs = np.array([x.output_len for x in s])
    assert ins.min() == 50 and ins.max() == 150
    assert outs.min() == 25 and outs.max() == 75


def test_random_vllm_output_lower_bound_is_one():
    rs = np.random.RandomState(0)
    s = sample_random(rs, 2000, 10, 1, 0.99, prefix_len=0, legacy=False)
    assert min(x.output_len for x in s) == 1


def test_random_legacy_semantics_is_r_times_l_to_l_and_prefix_is_added():
    rs = np.random.RandomState(0)
    s = sample_random(rs, 5000, 100, 50, 0.5, prefix_len=7, legacy=True)
    ins = np.array([x.prompt_len for x in s])
    assert ins.min() == 57 and ins.max() == 107


def test_random_default_range_ratio_differs_by_client():
    assert WorkloadConfig(client="vllm").resolved_range_ratio == 0.0
    assert WorkloadConfig(client="vllm-legacy").resolved_range_ratio == 1.0  # fixed length


def test_infinite_rate_sends_everything_at_zero():
    assert np.all(arrival_times(np.random.RandomState(0), 10, float("inf"), 1.0, legacy=False) == 0)


def test_new_client_rescales_so_last_arrival_is_n_over_rate():
    t = arrival_times(np.random.RandomState(0), 100, 4.0, 1.0, legacy=False)
    assert t[-1] == pytest.approx(25.0) and t[0] > 0 and np.all(np.diff(t) >= 0)


def test_legacy_client_sends_first_request_at_once():
    t = arrival_times(np.random.RandomState(0), 100, 4.0, 1.0, legacy=True)
    assert t[0] == 0 and t[-1] != pytest.approx(25.0)


def test_gamma_burstiness_changes_dispersion_not_mean_rate():
    n = 20000
    steady = np.diff(arrival_times(np.random.RandomState(1), n, 10.0, 4.0, legacy=True))
    bursty = np.diff(arrival_times(np.random.RandomState(1), n, 10.0, 0.25, legacy=True))
    assert steady.mean() == pytest.approx(0.1, rel=0.05) and bursty.mean() == pytest.approx(0.1, rel=0.05)
    assert bursty.std() > 3 * steady.std()


def test_trace_replay_and_time_scale(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.0000000,374,44\n"
                 "2023-11-16 18:15:50.0000000,396,109\n"
                 "2023-11-16 18:15:56.0000000,10,1\n")
    samples, t = load_trace(str(p), None, 1.0)
    assert [s.prompt_len for s in samples] == [374, 396, 10]
    assert list(t) == pytest.approx([0, 4, 10])
    _, fast = load_trace(str(p), 2, 0.1)
    assert list(fast) == pytest.approx([0, 0.4])


def test_trace_bad_columns_named(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("time,in,out\n0,1,1\n")
    with pytest.raises(WorkloadError, match=r"workload.trace_path: .*needs columns arrival_s, input_len .*TIMESTAMP, ContextTokens, GeneratedTokens; it has \[.time., .in., .out.\]"):
        load_trace(str(p), None, 1.0)


def test_same_seed_same_requests_other_seed_other_requests():
    w = WorkloadConfig(dataset_name="random", num_prompts=50, request_rate=5.0, random_range_ratio=0.5, seed=3)
    a, b = build_requests(w), build_requests(w)
    assert [(r.prompt_len, r.max_tokens, r.arrival_s) for r in a] == [(r.prompt_len, r.max_tokens, r.arrival_s) for r in b]
    c = build_requests(w.model_copy(update={"seed": 4}))
    assert [r.prompt_len for r in a] != [r.prompt_len for r in c]
