"""The benchmark client's request list: datasets (lengths) and arrival times.

Mirrors `vllm bench serve` / `benchmarks/benchmark_serving.py` (and, where selected,
the older client): the same length distributions, filters, defaults and arrival
processes. Lengths are token counts only; there is no text.
"""

from __future__ import annotations

import csv
import functools
import gc
import itertools

import math
import random
import warnings
from typing import TYPE_CHECKING, NamedTuple
from importlib import resources
from pathlib import Path

import numpy as np

if TYPE_CHECKING:  # pandas only for traces: a run of a dataset does not import it (a fast start)
    import pandas as pd

from .config import check_fits_in_memory
from .prefix_cache import segments
from .request import Request

SHAREGPT_DEFAULT = "sharegpt_v3_qwen_lengths.csv"
SHAREGPT_COLUMNS = ("prompt_tokens", "completion_tokens")


class WorkloadError(ValueError):
    pass


class Sample(NamedTuple):  # a tuple: a million of them are built in a large run
    prompt_len: int
    output_len: int


# --- datasets -------------------------------------------------------------------------
def load_sharegpt_lengths(path: str | None) -> dict[str, np.ndarray]:
    """Prompt/completion token counts, columns `prompt_tokens,completion_tokens`."""
    if path is None:
        with resources.as_file(resources.files("sim.data") / SHAREGPT_DEFAULT) as p:
            return _read_csv(p, SHAREGPT_COLUMNS)
    return _read_dataset(path, SHAREGPT_COLUMNS)


def _read_csv(path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named numeric columns of a CSV file, read once per process while the file stays the
    same: a sweep or a calibration builds its workload from the same file thousands of times.
    Callers must not change the arrays."""
    st = Path(path).stat()
    return _read_csv_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size, columns)


@functools.lru_cache(maxsize=8)
def _read_csv_cached(path: str, mtime_ns: int, size: int, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        header = [h.strip() for h in next(csv.reader([f.readline()]), [])]
    missing = [c for c in columns if c not in header]
    if missing:
        raise WorkloadError(f"workload.dataset_path: {path} lacks column(s) {sorted(missing)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a header without rows: an empty table, not a warning
            table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=[header.index(c) for c in columns],
                               dtype=float, ndmin=2, quotechar='"')
    except (ValueError, IndexError):
        raise WorkloadError(f"workload.dataset_path: {path}: columns {', '.join(columns)} must hold a number "
                            "in every row") from None
    return {c: table[:, k] for k, c in enumerate(columns)}


def _read_dataset(path: str, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not Path(path).exists():
        raise WorkloadError(f"workload.dataset_path: file not found: {path}")
    return _read_csv(path, columns)


def sample_sharegpt(df: pd.DataFrame, num_prompts: int, seed: int, fixed_output_len: int | None,
                    client: str = "vllm") -> list[Sample]:
    """The clients' ShareGPT sampler: shuffle the conversations with Python's `random` seeded with
    the seed, walk them in that order, keep the first that pass the client's filter.

    vLLM (every version from 0.6.3): prompt < 4 or output < 4 is too short (the output check is
    skipped when the output length is fixed), prompt > 1024 or prompt + output > 2048 too long.
    When fewer pass than asked, `vllm bench serve` (0.11.1 and later) re-seeds and adds
    `random.choice` of the kept ones for each missing request (0.8.2-0.11.0 drew them with one
    `random.choices`; the old benchmark_serving.py returned fewer). SGLang's bench_serving
    (0.4.2 and later) drops only prompts or outputs under 2 tokens, and never oversamples.
    """
    prompts = np.asarray(df["prompt_tokens"])
    completions = np.asarray(df["completion_tokens"])
    order = _shuffled(len(prompts), seed)
    sglang = client == "sglang"
    out: list[Sample] = []
    for i in order:
        p = int(prompts[i])
        o = int(completions[i]) if fixed_output_len is None else fixed_output_len
        if sglang:
            if p < 2 or o < 2:
                continue
        elif p < 4 or (fixed_output_len is None and o < 4) or p > 1024 or p + o > 2048:
            continue
        out.append(Sample(p, o))
        if len(out) == num_prompts:
            return out
    if client == "vllm" and out:
        rng = random.Random(seed)
        return out + [rng.choice(out) for _ in range(num_prompts - len(out))]
    raise WorkloadError(
        f"workload.num_prompts: only {len(out)} ShareGPT samples pass the {client} client's filter, "
        f"{num_prompts} requested (that client does not oversample)"
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
    p = df["num_prefill_tokens"].astype(np.int64)
    d = df["num_decode_tokens"].astype(np.int64)
    if max_tokens is not None:
        total = p + d
        excess = np.maximum(total - max_tokens, 0)
        p, d = p - np.ceil(excess * p / total).astype(np.int64), d - np.ceil(excess * d / total).astype(np.int64)
    p, d = np.maximum(p, 1), np.maximum(d, 1)
    if num_prompts > len(p):
        raise WorkloadError(f"workload.num_prompts: {path} has {len(p)} rows, {num_prompts} requested")
    # Vidur's shuffle, pandas' sample(frac=1, random_state=seed): RandomState(seed).permutation
    order = np.random.RandomState(seed).permutation(len(p))[:num_prompts]
    return list(map(Sample, p[order].tolist(), d[order].tolist()))


def load_trace(path: str, num_prompts: int | None, time_scale: float,
               stage: int | None = None) -> tuple[list[Sample], np.ndarray]:
    """A recorded run's requests (any format `sim.traces` reads): arrival times relative to the
    first request, multiplied by `time_scale` (0.1 replays it at 10x its rate), and lengths.

    `stage`: only that load stage, its first request at time 0. Requests the file records as
    failed without saying how long they were cannot be replayed; `trace_skipped` counts them."""
    df, t = trace_table(path, num_prompts, time_scale, stage)
    return list(map(Sample, df["input_len"].tolist(), df["output_len"].tolist())), t


def trace_table(path: str, num_prompts: int | None, time_scale: float,
                stage: int | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """`load_trace`'s requests as `sim.traces` rows (with their prefix and session columns), and
    their arrival times."""
    from .traces import TraceError, read_requests

    try:
        df = _read_trace(path, read_requests)
    except TraceError as exc:
        raise WorkloadError(f"workload.trace_path: {exc}") from None
    if stage is not None:
        df = df[df["stage"] == stage]
        if df.empty:
            raise WorkloadError(f"workload.trace_stage: {path} has no stage {stage}")
    df = df[~_unreplayable(df)]
    if num_prompts is not None:
        df = df.iloc[:num_prompts]
    if df.empty:
        raise WorkloadError(f"workload.trace_path: {path} has no request that can be replayed")
    t = df["arrival_s"].to_numpy(dtype=float)
    t = (t - t[0]) * time_scale
    if np.any(np.diff(t) < 0):
        raise WorkloadError(f"workload.trace_path: {path}: arrival times must not decrease")
    bad = np.flatnonzero((df["input_len"].to_numpy() < 1) | (df["output_len"].to_numpy() < 1))
    if len(bad):
        raise WorkloadError(
            f"workload.trace_path: request {bad[0] + 1} has a prompt or output length below 1 "
            "(a request must have at least one prompt token and ask for one output token)"
        )
    return df, t


def trace_skipped(path: str, stage: int | None = None) -> int:
    """How many requests of a recorded run cannot be replayed (recorded as failed, length unknown)."""
    from .traces import read_requests

    df = _read_trace(path, read_requests)
    if stage is not None:
        df = df[df["stage"] == stage]
    return int(_unreplayable(df).sum())


def _unreplayable(df: pd.DataFrame) -> pd.Series:
    return ~df["success"] & ((df["input_len"] < 1) | (df["output_len"] < 1))


def _read_trace(path: str, reader) -> pd.DataFrame:
    st = Path(path).stat() if Path(path).exists() else None
    if st is None:
        return reader(path)  # raises: file not found
    return _read_trace_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size, reader)


@functools.lru_cache(maxsize=8)
def _read_trace_cached(path: str, mtime_ns: int, size: int, reader) -> pd.DataFrame:
    return reader(path)


def stage_offsets(rng: np.random.Generator, n: int, rate: float, duration: float, kind: str) -> np.ndarray:
    """inference-perf's arrival times within a stage, from its start.

    constant: n exponential gaps of mean 1/rate rescaled to sum to `duration` (the last request
    at `duration`, the first after one gap). poisson: for each second a Poisson(rate) count,
    spread over that second the same way, until n requests."""
    if kind == "constant":
        c = np.cumsum(rng.exponential(1.0 / rate, size=n))
        return duration * c / c[-1]
    out: list[np.ndarray] = []
    start, have = 0.0, 0
    while have < n:
        k = int(rng.poisson(rate))
        if k:
            c = np.cumsum(rng.exponential(1.0 / k, size=k))
            out.append(start + c / c[-1])
            have += k
        start += 1.0
    return np.concatenate(out)[:n]


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


# what one request costs in memory over a run (the request, its sample and times, its share of
# the token aggregates; benchmarks/speed.py: a million requests peak under 1 GiB)
BYTES_PER_REQUEST = 1024


def build_requests(w) -> list[Request]:
    """The request list of one benchmark run, from a validated `WorkloadConfig`."""
    if w.num_prompts is not None and w.dataset_name not in ("trace", "mooncake"):  # (a trace has what it has)
        check_fits_in_memory(w.num_prompts, BYTES_PER_REQUEST, "workload.num_prompts" if w.stages is None
                             else "workload.stages", "requests")
    legacy = w.client in ("vllm-legacy", "sglang")  # first request at once, a gap after each
    # Both clients seed numpy's global generator with --seed and draw arrival gaps from it.
    # The old client also draws random-dataset lengths from it; `vllm bench serve` uses
    # its own np.random.default_rng(seed) for them.
    rs = np.random.RandomState(w.seed)
    times = table = None
    # staged: every stage asks the dataset from its start, so the largest stage's count is drawn
    n_draw = max(st.num_requests for st in w.stages) if w.stages else w.num_prompts
    if w.dataset_name == "sharegpt":
        samples = sample_sharegpt(load_sharegpt_lengths(w.dataset_path), n_draw, w.seed, w.sharegpt_output_len,
                                  w.client)
    elif w.dataset_name == "random":
        samples = sample_random(
            rs if legacy else np.random.default_rng(w.seed), n_draw, w.random_input_len, w.random_output_len,
            w.resolved_range_ratio, w.random_prefix_len, legacy, sglang=w.client == "sglang",
        )
    elif w.dataset_name == "shared_prefix":
        sp = w.shared_prefix
        samples = [Sample(sp.system_prompt_len + sp.question_len, sp.output_len)] * n_draw
    elif w.dataset_name == "lengths":
        samples = sample_lengths(w.dataset_path, n_draw, w.seed, w.lengths_max_tokens)
    else:
        table, times = trace_table(w.trace_path, w.num_prompts, w.trace_time_scale, w.trace_stage)
        if w.dataset_name == "mooncake" and table["hash_ids"].isna().all():
            raise WorkloadError(f"workload.trace_path: {w.trace_path} is not a Mooncake trace (no hash_ids); "
                                "use dataset_name = 'trace' for a per-request file")
        samples = list(map(Sample, table["input_len"].tolist(), table["output_len"].tolist()))
    stage_of = None
    if w.stages is not None:
        # every stage asks the dataset from its start again (inference-perf restarts its data
        # index each stage); times are from the stage's own start, which the client sets
        rng = np.random.default_rng([w.seed, 2])
        sizes = [st.num_requests for st in w.stages]
        samples = [samples[i] for n in sizes for i in range(n)]
        times = np.concatenate([stage_offsets(rng, n, st.rate, st.duration, w.stage_arrivals)
                                for n, st in zip(sizes, w.stages)])
        stage_of = np.repeat(np.arange(len(sizes)), sizes)
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
    if stage_of is not None:
        for r, k in zip(reqs, stage_of.tolist()):
            r.stage = k
    # every prompt is named, so a preempted request can find its own freed blocks again
    _add_segments(reqs, w.random_prefix_len if w.dataset_name == "random" else 0,
                  w.turns if w.dataset_name == "random" else 1)
    if table is not None:
        trace_content(reqs, table, times, w.hash_block_tokens, w.session_timing)
    if w.dataset_name == "shared_prefix":
        shared_prefix_content(reqs, w.shared_prefix, np.random.default_rng([w.seed, 3]))
    for r in reqs:
        if r.follows >= 0:
            reqs[r.follows].has_next_turn = True  # (rid is the index)
    return reqs


def shared_prefix_content(reqs: list[Request], sp, rng: np.random.Generator) -> None:
    """inference-perf's shared-prefix data: the num_groups × num_prompts_per_group prompts (a
    group's system prompt, then the prompt's own question) are shuffled once, and the k-th request
    of a stage sends prompt k mod N of that order (the data index restarts every stage).

    Multi-turn chat: each of the N prompts is a user; its next request (N later) is sent at its
    own slot, or when the previous one completes if that is later (a user has one request in
    flight; the wait is not in its latency), and its text is the conversation so far (every
    earlier prompt and reply of that user) followed by the prompt again. The conversation ends
    with the stage. Lengths are fixed, so only the order of the groups is drawn (with its own
    seeded generator; inference-perf's own draws cannot be reproduced without its text)."""
    n = sp.num_groups * sp.num_prompts_per_group
    order = rng.permutation(n).tolist()
    base = 2 * len(reqs) + 1
    sys_len, q_len = sp.system_prompt_len, sp.question_len
    index: dict[int, int] = {}  # stage -> its next data index
    user_last: dict[tuple[int, int], Request] = {}
    for r in reqs:
        k = index.get(r.stage, 0)
        index[r.stage] = k + 1
        p = order[k % n]
        g = p // sp.num_prompts_per_group
        prev = user_last.get((r.stage, p)) if sp.enable_multi_turn_chat else None
        if prev is None:
            r.segments = ((base + g, sys_len), (base + sp.num_groups + p, q_len))
        else:  # the client builds its prompt when the turn before completes
            r.follows, r.new_message_len, r.think_s, r.not_before_s = prev.rid, sys_len + q_len, 0.0, r.arrival_s
        user_last[(r.stage, p)] = r


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


def trace_content(reqs: list[Request], df: pd.DataFrame, times: np.ndarray, block_tokens: int,
                  session_timing: str) -> None:
    """What a trace says the prompts share, as segments (see `sim.prefix_cache`), and its
    conversations as turns the client sends after the turn before.

    - Mooncake `hash_ids`: id j stands for tokens [j·block_tokens, (j+1)·block_tokens) of the
      prompt (the last block may be partial; tokens past the last id are the request's own). A
      block is the same content only after the same blocks before it, as a chained hash says,
      so each id is named together with its parent's name.
    - `prefix_group`, `prefix_len`: the group's first prefix_len tokens are one content.
    - `session_id`, `turn`: turn k + 1's prompt is turn k's prompt, its reply and a new message
      of the rest of its recorded length (a recorded prompt shorter than that history shares
      what fits of it, all but its last token). In an AIPerf Mooncake session a later turn's
      `input_length` and `hash_ids` are the new message itself (AIPerf's default context mode
      for such traces): its prompt is the conversation so far, then those blocks.
      A turn is sent after the reply to the one before: the file's `delay` after it where
      there is one (AIPerf), else at its recorded time when that is later (`session_timing =
      "timestamp"`), or a think time after the reply (`"think"`: the recorded gap between the
      reply's end and the send, else `workload.think_time_s`).
    """
    ids = itertools.count(2 * len(reqs) + 1)  # past every request's own ids (2·rid + 1, 2·rid + 2)
    chain: dict[tuple[int, object], int] = {}
    groups: dict[int, int] = {}
    hashes = df["hash_ids"].tolist()
    group, plen = df["prefix_group"].to_numpy(), df["prefix_len"].to_numpy()
    for r, h, g, n in zip(reqs, hashes, group.tolist(), plen.tolist()):
        if h:
            segs, parent = [], -1
            n = min(len(h), -(-r.prompt_len // block_tokens))  # ids past the prompt's end name nothing
            for x in h[:n]:
                key = (parent, x)
                parent = chain.get(key, -1)
                if parent < 0:
                    parent = chain[key] = next(ids)
                segs.append((parent, block_tokens))
            pos = n * block_tokens
            if pos > r.prompt_len:  # the last block is partial
                segs[-1] = (parent, block_tokens - (pos - r.prompt_len))
            elif pos < r.prompt_len:
                segs.append((2 * r.rid + 1, r.prompt_len - pos))
            r.segments = tuple(segs)
        elif g >= 0:
            gid = groups.setdefault(g, next(ids))
            r.segments = ((gid, n), (2 * r.rid + 1, r.prompt_len - n)) if n < r.prompt_len else ((gid, n),)
    sessions = df["session_id"].to_numpy()
    if not (sessions >= 0).any():
        return
    pos_of = np.arange(len(reqs))
    order = np.lexsort((pos_of, df["turn"].to_numpy(), sessions))
    e2e, delay = df["e2e_ms"].to_numpy() / 1000, df["delay_ms"].to_numpy() / 1000
    delta = df["hash_delta"].to_numpy()
    prev = -1
    for i in order.tolist():
        if sessions[i] < 0:
            continue
        if prev < 0 or sessions[prev] != sessions[i]:
            prev = i
            continue
        a, b = reqs[prev], reqs[i]
        a.segments = segments(a)  # named: not a private request, its chunks are the next turn's
        b.follows = a.rid
        if delay[i] == delay[i]:  # the file says how long after the reply
            b.think_s = max(float(delay[i]), 0.0)
        elif session_timing == "timestamp":
            b.not_before_s = float(times[i])
        else:
            gap = times[i] - times[prev] - e2e[prev]
            b.think_s = max(float(gap), 0.0) if gap == gap else math.nan
        if delta[i]:  # AIPerf: the conversation so far, then this turn's blocks as a new message
            b.new_message_len = b.prompt_len
        elif not hashes[i]:  # the conversation so far is its prompt's prefix
            history = (*segments(a), (a.out_segment, a.max_tokens))
            shared = min(a.prompt_len + a.max_tokens, b.prompt_len - 1)
            b.segments = (*_cut(history, shared), (2 * b.rid + 1, b.prompt_len - shared))
        prev = i


def _cut(segs: tuple[tuple[int, int], ...], n: int) -> list[tuple[int, int]]:
    """The first `n` tokens of a content."""
    out, pos = [], 0
    for seg, length in segs:
        if pos >= n:
            break
        out.append((seg, min(length, n - pos)))
        pos += length
    return out
