"""The benchmark client's request list: datasets (lengths) and arrival times.

Mirrors `vllm bench serve` / `benchmarks/benchmark_serving.py` (and, where selected,
the older client): the same length distributions, filters, defaults and arrival
processes. Lengths are token counts only; there is no text.
"""

from __future__ import annotations

import functools
import gc

import math
import random
from typing import NamedTuple
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from .request import Request

SHAREGPT_DEFAULT = "sharegpt_v3_qwen_lengths.csv"


class WorkloadError(ValueError):
    pass


class Sample(NamedTuple):  # a tuple: a million of them are built in a large run
    prompt_len: int
    output_len: int


# --- datasets -------------------------------------------------------------------------
def load_sharegpt_lengths(path: str | None) -> pd.DataFrame:
    """Prompt/completion token counts, columns `prompt_tokens,completion_tokens`."""
    if path is None:
        with resources.as_file(resources.files("sim.data") / SHAREGPT_DEFAULT) as p:
            return _read_csv(p)
    return _read_dataset(path, ("prompt_tokens", "completion_tokens"))


def _read_csv(path) -> pd.DataFrame:
    """A CSV file's table, read once per process while the file stays the same: a sweep or a
    calibration builds its workload from the same file thousands of times. Callers must not
    change the table."""
    st = Path(path).stat()
    return _read_csv_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_csv_cached(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    return pd.read_csv(path)


def _read_dataset(path: str, columns: tuple[str, ...]) -> pd.DataFrame:
    if not Path(path).exists():
        raise WorkloadError(f"workload.dataset_path: file not found: {path}")
    df = _read_csv(path)
    missing = set(columns) - set(df.columns)
    if missing:
        raise WorkloadError(f"workload.dataset_path: {path} lacks column(s) {sorted(missing)}")
    return df


def sample_sharegpt(df: pd.DataFrame, num_prompts: int, seed: int, fixed_output_len: int | None) -> list[Sample]:
    """vLLM's ShareGPT sampler: shuffle with the seed, keep the first that pass the filter.

    Filter: prompt < 4 or output < 4 is too short (the output check is skipped when the
    output length is fixed); prompt > 1024 or prompt + output > 2048 is too long.
    """
    prompts = df["prompt_tokens"].to_numpy()
    completions = df["completion_tokens"].to_numpy()
    order = _shuffled(len(df), seed)
    out: list[Sample] = []
    for i in order:
        p = int(prompts[i])
        o = int(completions[i]) if fixed_output_len is None else fixed_output_len
        if p < 4 or (fixed_output_len is None and o < 4):
            continue
        if p > 1024 or p + o > 2048:
            continue
        out.append(Sample(p, o))
        if len(out) == num_prompts:
            return out
    raise WorkloadError(
        f"workload.num_prompts: only {len(out)} ShareGPT samples pass vLLM's filter, {num_prompts} requested"
    )


@functools.lru_cache(maxsize=16)
def _shuffled(n: int, seed: int) -> tuple[int, ...]:
    """range(n) in the order `random.Random(seed).shuffle` leaves it (vLLM's sampler), once per
    process for each dataset size and seed."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return tuple(order)


def sample_random(
    rng: np.random.RandomState | np.random.Generator,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    prefix_len: int,
    legacy: bool,
    sglang: bool = False,
) -> list[Sample]:
    """vLLM's random dataset.

    vLLM >= 0.8 (`RandomDataset`): input uniform on [floor(L(1-r)), ceil(L(1+r))], output on
    [max(floor(O(1-r)), 1), ceil(O(1+r))], r in [0, 1).
    Older `sample_random_requests`: input on [int(L·r), L], output on [int(O·r), O].
    SGLang's bench_serving: input on [max(int(L·r), 1), L], output on [int(O·r), O].
    A shared prefix of `prefix_len` tokens is added to every prompt. Input lengths are
    drawn for all requests, then output lengths, as both clients do.
    """
    if sglang:
        in_lo, in_hi = max(int(input_len * range_ratio), 1), input_len
        out_lo, out_hi = int(output_len * range_ratio), output_len
    elif legacy:
        in_lo, in_hi = int(input_len * range_ratio), input_len
        out_lo, out_hi = int(output_len * range_ratio), output_len
    else:
        in_lo, in_hi = math.floor(input_len * (1 - range_ratio)), math.ceil(input_len * (1 + range_ratio))
        out_lo, out_hi = max(math.floor(output_len * (1 - range_ratio)), 1), math.ceil(output_len * (1 + range_ratio))
    draw = rng.integers if isinstance(rng, np.random.Generator) else rng.randint
    ins = draw(in_lo, in_hi + 1, size=num_prompts)
    outs = draw(out_lo, out_hi + 1, size=num_prompts)
    return list(map(Sample, (ins + prefix_len).tolist(), outs.tolist()))


def stop_early_at_eos(samples: list[Sample], mean: float, rng: np.random.Generator) -> list[Sample]:
    """Let a share q of requests stop at a uniform length in [1, L]; the rest generate L.

    With L the requested length, the expected output is (1 - q)·L + q·(L + 1)/2, so
    q = 2·(L - mean)/(L - 1) makes the mean come out right on average.
    """
    out = []
    for s in samples:
        L = s.output_len
        if L <= 1 or mean >= L:
            out.append(s)
            continue
        q = min(1.0, 2 * (L - mean) / (L - 1))
        n = int(rng.integers(1, L + 1)) if rng.random() < q else L
        out.append(Sample(s.prompt_len, n))
    return out


def sample_lengths(path: str, num_prompts: int, seed: int, max_tokens: int | None) -> list[Sample]:
    """Vidur's trace length generator: a CSV of `num_prefill_tokens, num_decode_tokens`, rows in
    a seeded shuffled order. A request over `max_tokens` in total gives up the excess from prompt
    and output in proportion to their lengths (each rounded up), keeping at least one of each."""
    df = _read_dataset(path, ("num_prefill_tokens", "num_decode_tokens"))
    p = df["num_prefill_tokens"].astype(int)
    d = df["num_decode_tokens"].astype(int)
    if max_tokens is not None:
        total = p + d
        excess = (total - max_tokens).clip(lower=0)
        p, d = p - np.ceil(excess * p / total).astype(int), d - np.ceil(excess * d / total).astype(int)
    p, d = p.clip(lower=1), d.clip(lower=1)
    if num_prompts > len(df):
        raise WorkloadError(f"workload.num_prompts: {path} has {len(df)} rows, {num_prompts} requested")
    order = pd.DataFrame({"p": p, "d": d}).sample(frac=1, random_state=seed).iloc[:num_prompts]
    return list(map(Sample, order["p"].tolist(), order["d"].tolist()))


def load_trace(path: str, num_prompts: int | None, time_scale: float) -> tuple[list[Sample], np.ndarray]:
    """Azure-style trace: TIMESTAMP (datetime or seconds), ContextTokens, GeneratedTokens.

    Arrival times are relative to the first row, multiplied by `time_scale`
    (0.1 replays the trace at 10x its rate).
    """
    if not Path(path).exists():
        raise WorkloadError(f"workload.trace_path: file not found: {path}")
    df = _read_csv(path)
    cols = {c.lower(): c for c in df.columns}
    try:
        ts_col, in_col, out_col = cols["timestamp"], cols["contexttokens"], cols["generatedtokens"]
    except KeyError:
        raise WorkloadError(
            f"workload.trace_path: {path} needs columns TIMESTAMP, ContextTokens, GeneratedTokens; has {list(df.columns)}"
        ) from None
    if num_prompts is not None:
        df = df.iloc[:num_prompts]
    ts = df[ts_col]
    if pd.api.types.is_numeric_dtype(ts):
        t = ts.to_numpy(dtype=float)
    else:
        t = pd.to_datetime(ts).astype("int64").to_numpy() / 1e9
    t = (t - t[0]) * time_scale
    if np.any(np.diff(t) < 0):
        raise WorkloadError(f"workload.trace_path: {path}: timestamps must not decrease")
    samples = list(map(Sample, df[in_col].astype("int64").tolist(), df[out_col].astype("int64").tolist()))
    bad = [k for k, s in enumerate(samples) if s.prompt_len < 1 or s.output_len < 1]
    if bad:
        raise WorkloadError(
            f"workload.trace_path: row {bad[0] + 2} has a prompt or output length below 1 "
            "(a request must have at least one prompt token and ask for one output token)"
        )
    return samples, t


# --- arrivals -------------------------------------------------------------------------
def arrival_times(
    rs: np.random.RandomState, n: int, request_rate: float, burstiness: float, legacy: bool
) -> np.ndarray:
    """Dispatch times in seconds from the start of the benchmark.

    Gaps are Gamma(shape=burstiness, scale=1/(rate·burstiness)); burstiness 1 is Poisson.
    The older client sends the first request at once and sleeps a gap after each.
    `vllm bench serve` draws a delay for every request, accumulates them, and rescales so
    the last request lands exactly at n / rate.
    """
    if math.isinf(request_rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / request_rate)
    else:
        gaps = rs.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    if legacy:
        return np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    t = np.cumsum(gaps)
    return t * ((n / request_rate) / t[-1])


def build_requests(w) -> list[Request]:
    """The request list of one benchmark run, from a validated `WorkloadConfig`."""
    legacy = w.client in ("vllm-legacy", "sglang")  # first request at once, a gap after each
    # Both clients seed numpy's global generator with --seed and draw arrival gaps from it.
    # The old client also draws random-dataset lengths from it; `vllm bench serve` uses
    # its own np.random.default_rng(seed) for them.
    rs = np.random.RandomState(w.seed)
    times = None
    if w.dataset_name == "sharegpt":
        samples = sample_sharegpt(load_sharegpt_lengths(w.dataset_path), w.num_prompts, w.seed, w.sharegpt_output_len)
    elif w.dataset_name == "random":
        samples = sample_random(
            rs if legacy else np.random.default_rng(w.seed), w.num_prompts, w.random_input_len, w.random_output_len,
            w.resolved_range_ratio, w.random_prefix_len, legacy, sglang=w.client == "sglang",
        )
    elif w.dataset_name == "lengths":
        samples = sample_lengths(w.dataset_path, w.num_prompts, w.seed, w.lengths_max_tokens)
    else:
        samples, times = load_trace(w.trace_path, w.num_prompts, w.trace_time_scale)
    if w.output_len_mean is not None:
        samples = stop_early_at_eos(samples, w.output_len_mean, np.random.default_rng([w.seed, 1]))
    if times is None:
        times = arrival_times(rs, len(samples), w.request_rate, w.burstiness, legacy)
    # Python's cycle collector would walk the growing list again and again while a million
    # requests are made (40 % of this function's time); they hold no cycles, so it waits.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:  # positional: rid, prompt_len, max_tokens, arrival_s
        reqs = [Request(i, p, o, t) for i, (p, o), t in zip(range(len(samples)), samples,
                                                           np.asarray(times, dtype=float).tolist())]
    finally:
        if gc_was_on:
            gc.enable()
    # every prompt is named, so a preempted request can find its own freed blocks again
    _add_segments(reqs, w.random_prefix_len if w.dataset_name == "random" else 0,
                  w.turns if w.dataset_name == "random" else 1)
    return reqs


def _add_segments(reqs: list[Request], prefix_len: int, turns: int) -> None:
    """Name the prompts' content for prefix caching. Segment 0 is the shared prefix; every
    request's own tokens and its reply get fresh ids. With `turns` > 1, consecutive requests
    form conversations: turn k+1 is sent after turn k completes and its prompt is turn k's
    prompt, turn k's reply and its own new message (the client fills in the lengths)."""
    for r in reqs:
        own = r.prompt_len - prefix_len
        r.out_segment = 2 * r.rid + 2
        if prefix_len or turns > 1:  # otherwise one segment of its own, id 2·rid + 1 (not stored)
            r.segments = ((0, prefix_len), (2 * r.rid + 1, own)) if prefix_len else ((2 * r.rid + 1, own),)
        if turns > 1 and r.rid % turns:
            r.follows = r.rid - 1
            r.new_message_len = own
