"""The numbers a serving dashboard plots, per interval, from a simulated run.

vLLM's and SGLang's Prometheus metrics are what the seeds' Grafana panels show: requests finished
per second, running and waiting requests, KV-cache usage, prompt and generation throughput,
preemptions and the prefix-cache hit rate. This computes the same per interval of simulated time
so a user can hold the simulation next to their own dashboard.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

COLUMNS = ["t_s", "requests_completed_per_s", "running", "waiting", "kv_cache_usage_pct",
           "prompt_tokens_per_s_per_gpu", "generation_tokens_per_s_per_gpu", "preemptions", "prefix_cache_hit_rate"]


def timeseries(res, interval_s: float = 1.0) -> pd.DataFrame:
    """One row per interval [t, t + interval): rates are per second; running, waiting and KV usage
    are means over the steps that started in the interval (summed over instances); the hit rate
    is cached prompt tokens over all prompt tokens admitted in it (NaN when none were)."""
    if res.instance_steps is None:
        raise ValueError("the time series needs a run simulated with record_steps=True")
    if interval_s <= 0:
        raise ValueError(f"interval must be positive, got {interval_s}")
    end = max([s.t_start_s + s.duration_s for steps in res.instance_steps for s in steps] + [0.0])
    n = max(1, math.ceil(end / interval_s))
    edges = np.arange(n + 1) * interval_s
    out = {c: np.zeros(n) for c in COLUMNS}
    out["t_s"] = edges[:-1]
    gpus = sum(res.instance_gpus)
    total_blocks = sum(res.instance_kv_blocks)
    prompt, hits = np.zeros(n), np.zeros(n)
    for steps in res.instance_steps:
        running, waiting, usage, count = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
        last_hits = 0
        for s in steps:
            k = min(int(s.t_start_s // interval_s), n - 1)
            running[k] += s.running
            waiting[k] += s.num_waiting
            usage[k] += s.kv_blocks_used
            count[k] += 1
            prompt[min(int((s.t_start_s + s.duration_s) // interval_s), n - 1)] += s.shape.prefill_tokens
            out["preemptions"][k] += s.num_preempted
            hits[k] += s.prefix_hit_tokens - last_hits
            last_hits = s.prefix_hit_tokens
        seen = count > 0
        out["running"][seen] += running[seen] / count[seen]
        out["waiting"][seen] += waiting[seen] / count[seen]
        out["kv_cache_usage_pct"][seen] += 100 * usage[seen] / count[seen] / total_blocks  # of all pools
    gen = np.zeros(n)
    for r in res.requests:
        for t in r.token_times:
            gen[min(int(t // interval_s), n - 1)] += 1
        if r.token_times and r.output_len >= r.max_tokens:
            out["requests_completed_per_s"][min(int(r.token_times[-1] // interval_s), n - 1)] += 1 / interval_s
    out["prompt_tokens_per_s_per_gpu"] = prompt / interval_s / gpus
    out["generation_tokens_per_s_per_gpu"] = gen / interval_s / gpus
    admitted = prompt + hits
    with np.errstate(invalid="ignore", divide="ignore"):
        out["prefix_cache_hit_rate"] = np.where(admitted > 0, hits / admitted, np.nan)
    return pd.DataFrame(out, columns=COLUMNS)


def plot_timeseries(df: pd.DataFrame, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("requests_completed_per_s", "requests completed / s"), ("running", "running requests"),
              ("waiting", "waiting requests"), ("kv_cache_usage_pct", "KV cache usage (%)"),
              ("prompt_tokens_per_s_per_gpu", "prompt tokens / s / GPU"),
              ("generation_tokens_per_s_per_gpu", "generation tokens / s / GPU"),
              ("preemptions", "preemptions"), ("prefix_cache_hit_rate", "prefix-cache hit rate")]
    fig, axes = plt.subplots(4, 2, figsize=(12, 10), sharex=True)
    for ax, (col, label) in zip(axes.flat, panels):
        ax.step(df["t_s"], df[col], where="post")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("simulated time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
