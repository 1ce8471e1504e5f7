"""A Mooncake-format trace of any size with shared prefixes and growing conversations, for speed runs.

    python benchmarks/mooncake_like.py OUT.jsonl [--requests 100000] [--rate 12] [--seed 0]

The real traces (scenarios/traces/mooncake_conversation_trace.jsonl: 12,031 requests, mean prompt
12k tokens) are too few requests and too heavy per request for a 100k-request speed run on one
engine, so this draws a trace with their shape and lighter lengths. Each line is a Mooncake
record (`timestamp` ms, `input_length`, `output_length`, `hash_ids` of 512-token blocks):
- 50 system prompts of 1-3 blocks, picked with Zipf-like popularity (weight 1/k);
- 60 % of requests open a conversation: a system prompt and 1-2 blocks of their own;
- 40 % continue one of the last 2,000 conversations: its blocks plus 1-2 new ones (its reply and
  the next message), up to 12 blocks, after which that conversation is not continued;
- the last block is partial (the prompt ends 0-511 tokens short of it), as in the real traces;
- outputs are lognormal (median 150 tokens, at most 1,024); arrivals Poisson at `rate`.
Mean prompt about 2,500 tokens; at 12 req/s one Llama-3.1-8B on an H100 is busy but not saturated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BLOCK = 512


def write_trace(path: str | Path, requests: int = 100_000, rate: float = 12.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    systems = [fresh(int(k)) for k in rng.integers(1, 4, size=50)]
    weights = 1.0 / np.arange(1, 51)
    weights /= weights.sum()
    open_convs: list[list[int]] = []
    t = np.cumsum(rng.exponential(1.0 / rate, size=requests)) * 1000
    out = rng.lognormal(np.log(150), 0.8, size=requests).clip(1, 1024).astype(int)
    lines = []
    for k in range(requests):
        if open_convs and rng.random() < 0.4:
            j = int(rng.integers(max(0, len(open_convs) - 2000), len(open_convs)))
            ids = open_convs[j] + fresh(int(rng.integers(1, 3)))
            if len(ids) >= 12:
                open_convs.pop(j)
            else:
                open_convs[j] = ids
        else:
            ids = systems[int(rng.choice(50, p=weights))] + fresh(int(rng.integers(1, 3)))
            open_convs.append(ids)
        length = len(ids) * BLOCK - int(rng.integers(0, BLOCK))
        lines.append(json.dumps({"timestamp": int(t[k]), "input_length": length, "output_length": int(out[k]),
                                 "hash_ids": ids}))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write_trace(a.out, a.requests, a.rate, a.seed)


if __name__ == "__main__":
    main()
