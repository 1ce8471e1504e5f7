"""Worked example: a real shared-prefix trace on vLLM V1 and on SGLang, prefix caching on and off.

The Mooncake FAST'25 conversation trace (its first 2,000 requests at 1/12 of their rate), on one
Llama-3.1-8B on one H100 (scenarios/mooncake/). For each engine: caching off, caching on with
the KV of one H100 (450k tokens), and, as a what-if, caching on with ten times that KV (what a
larger pool could reuse; it ignores what moving KV from a slower tier would cost). Beside the
simulated hit rates, the hit rate an unbounded cache would reach on the same requests, worked
out from the trace alone. Step times are the uncalibrated roofline: read the differences.

    python experiments/shared_prefix_trace.py      # writes experiments/results/shared_prefix_trace.{md,png}
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sim.config import load_scenario  # noqa: E402
from sim.runner import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results"
KV = 450_000
RUNS = [  # (engine, label, overrides)
    ("vllm-v1", "caching off", ["engine.enable_prefix_caching=false"]),
    ("vllm-v1", "caching on", []),
    ("vllm-v1", "caching on, 10x KV (what-if)", [f"engine.kv_cache_tokens={10 * KV}"]),
    ("sglang", "caching off", ["engine.disable_radix_cache=true"]),
    ("sglang", "caching on", []),
    ("sglang", "caching on, 10x KV (what-if)", [f"engine.kv_cache_tokens={10 * KV}"]),
]


def unbounded_hit_rate(trace: Path, n: int, block_tokens: int, chunk: int) -> float:
    """Prompt tokens an unbounded cache would serve: each request's leading run of hash blocks seen
    in an earlier request, in whole chunks of `chunk` tokens, never its last token."""
    seen: set = set()
    hit = total = 0
    for line in trace.read_text().splitlines()[:n]:
        r = json.loads(line)
        ids, k = r["hash_ids"], 0
        while k < len(ids) and (tuple(ids[:k + 1])) in seen:
            k += 1
        hit += min(k * block_tokens, r["input_length"] - 1) // chunk * chunk
        total += r["input_length"]
        seen.update(tuple(ids[:j + 1]) for j in range(len(ids)))
    return hit / total


def reuse_distances(trace: Path, n: int) -> list[int]:
    """For each request that reuses more than the trace's common first block: the prompt tokens
    the other requests sent since that prefix was last used (what a cache must hold to hit)."""
    reqs = [json.loads(line) for line in trace.read_text().splitlines()[:n]]
    sent, last, out = [0], {}, []
    for r in reqs:
        sent.append(sent[-1] + r["input_length"])
    for k, r in enumerate(reqs):
        ids, m = r["hash_ids"], 0
        while m < len(ids) and tuple(ids[:m + 1]) in last:
            m += 1
        if m > 1:
            out.append(sent[k] - sent[last[tuple(ids[:m])] + 1])
        for j in range(len(ids)):
            last[tuple(ids[:j + 1])] = k
    return out


def main() -> None:
    rows = []
    for engine, label, overrides in RUNS:
        sc = load_scenario(ROOT / "scenarios" / "mooncake" / f"{engine}.toml", overrides)
        res = simulate(sc)
        m = res.bench.metrics
        rate = res.prefix_hit_tokens / res.prefix_query_tokens if res.prefix_query_tokens else 0.0
        rows.append({"engine": engine, "setting": label, "hit_rate": rate, "preemptions": res.num_preemptions,
                     "mean_ttft_ms": m["mean_ttft_ms"], "median_ttft_ms": m["median_ttft_ms"],
                     "p99_ttft_ms": m["p99_ttft_ms"], "mean_tpot_ms": m["mean_tpot_ms"],
                     "output_throughput": m["output_throughput"], "failed": m["failed"]})
        print(rows[-1], flush=True)
    w = sc.workload
    ideal = unbounded_hit_rate(ROOT / w.trace_path, w.num_prompts, w.hash_block_tokens, 16)
    dist = sorted(reuse_distances(ROOT / w.trace_path, w.num_prompts))
    q = [dist[int(p * (len(dist) - 1))] / 1e6 for p in (0.25, 0.5, 0.75)]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['engine']}\n{r['setting'].replace(', ', chr(10))}" for r in rows]
    colors = ["#bbbbbb", "#1f77b4", "#aec7e8", "#bbbbbb", "#ff7f0e", "#ffbb78"]
    axes[0].bar(range(len(rows)), [100 * r["hit_rate"] for r in rows], color=colors)
    axes[0].axhline(100 * ideal, color="k", ls="--", lw=1, label=f"unbounded cache ({100 * ideal:.1f} %)")
    axes[0].set_ylabel("prefix cache hit rate (%)")
    axes[0].legend(loc="upper left")
    axes[1].bar(range(len(rows)), [r["mean_ttft_ms"] / 1000 for r in rows], color=colors, label="mean")
    axes[1].plot(range(len(rows)), [r["median_ttft_ms"] / 1000 for r in rows], "k_", ms=18, mew=2, label="median")
    axes[1].set_ylabel("TTFT (s)")
    axes[1].legend(loc="upper right")
    for ax in axes:
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
    fig.suptitle("Mooncake conversation trace (first 2,000 requests, 1/12 rate), Llama-3.1-8B on one H100")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "shared_prefix_trace.png", dpi=110)
    plt.close(fig)

    lines = ["# A shared-prefix trace on vLLM V1 and SGLang, prefix caching on and off", "",
             " ".join(__doc__.split("\n\n")[1].split()), "",
             f"An unbounded cache would serve **{100 * ideal:.1f} %** of the prompt tokens (16-token chunks).", "",
             "| engine | setting | hit rate | mean TTFT (s) | median TTFT (s) | P99 TTFT (s) | mean TPOT (ms) | output tok/s | preemptions |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['setting']} | {100 * r['hit_rate']:.1f} % | {r['mean_ttft_ms'] / 1000:.2f} | "
                     f"{r['median_ttft_ms'] / 1000:.2f} | {r['p99_ttft_ms'] / 1000:.2f} | {r['mean_tpot_ms']:.1f} | "
                     f"{r['output_throughput']:.1f} | {r['preemptions']} |")
    on = {r["engine"]: r for r in rows if r["setting"] == "caching on"}
    big = next(r for r in rows if r["engine"] == "vllm-v1" and "10x" in r["setting"])
    lines += ["", "![hit rate and TTFT](shared_prefix_trace.png)", "",
              "What it shows:", "",
              f"- **The cache is too small for this trace's reuse, not the engines too different.** Every request "
              f"shares the trace's first block (512 tokens); beyond it, a conversation's next turn comes back after "
              f"the other requests have sent {q[1]:.1f}M prompt tokens (median; quartiles {q[0]:.1f}M and {q[2]:.1f}M), "
              f"ten times the {KV // 1000}k tokens one H100 holds. By then LRU eviction has taken the earlier turn's "
              f"blocks, so both engines reuse {100 * on['vllm-v1']['hit_rate']:.1f} % of the prompt tokens of the "
              f"{100 * ideal:.1f} % an unbounded cache would, and TTFT barely moves. Ten times the KV reuses "
              f"{100 * big['hit_rate'] / ideal:.0f} % of what an unbounded cache would and cuts the mean TTFT by "
              f"{100 * (1 - big['mean_ttft_ms'] / on['vllm-v1']['mean_ttft_ms']):.0f} %: the case for a KV pool "
              "beyond one GPU's memory that Mooncake was built on (what moving that KV would cost is not in this "
              "what-if).",
              "- **Same hits, different TPOT.** vLLM V1 runs decodes inside every prefill chunk's step; SGLang "
              "(`enable_mixed_chunk` off by default) runs a prefill batch on its own, so its decodes wait behind "
              "every chunk of these long prompts: a higher TPOT for the same TTFT.",
              ""]
    (OUT / "shared_prefix_trace.md").write_text("\n".join(lines))
    print(f"wrote {OUT / 'shared_prefix_trace.md'}")


if __name__ == "__main__":
    main()
