"""What if seed 000's workload ran on another layout of the same GPUs?

Workload: seed 000's benchmark (sglang.bench_serving, random 3500/1500 fixed lengths, Poisson
arrivals at R/s with max concurrency R and 4R prompts), R = 1 ... 128, mean of three arrival seeds.

Layouts (H20 96 GB, DeepSeek-R1 FP8):
- tp16:  one SGLang server, TP16 across two nodes (16 GPUs), KV pool 537,368 tokens;
- 1p1d:  one TP8 prefill node and one TP8 decode node (16 GPUs), 100,192 tokens each;
- 2p1d:  two TP8 prefill nodes and one TP8 decode node (24 GPUs).

Method: the engine is held fixed and only the layout changes. Each engine's fitted efficiencies
and overheads (from `servesim validate seed000-<series>-<hyp>`) are applied to every layout's own
hardware spec and TP degree (h20 for TP8 on one node, h20-2node for TP16 over the network), so
differences come from the layout (who computes what, KV room, transfers), not from a different
engine. Two engines: "sglang" = series C's fit as a TP16 SGLang server; "xllm" = series A's fit as
a 1P1D deployment. Throughput is per GPU (output tokens/s divided by the layout's GPUs).

    python experiments/seed000_whatif.py          # writes experiments/results/seed000_whatif.{csv,md}
"""

from __future__ import annotations

import argparse
import copy
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from sim.config import _read_toml, scenario_from_dict
from sim.profile import load_profile
from sim.runner import simulate

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results"
LAYOUTS = {"tp16": ("tp16", 16), "1p1d": ("pd", 16), "2p1d": ("pd", 24)}
ENGINES = {"sglang": "seed000-C-tp16", "xllm": "seed000-A-pd"}
CONCURRENCY = [1, 4, 8, 16, 32, 64, 128]


def scenario(layout: str, engine: str, c: int, seed: int) -> dict:
    hyp, _ = LAYOUTS[layout]
    data = copy.deepcopy(_read_toml(ROOT / "scenarios" / "seed000" / f"_{hyp}.toml"))
    prof = load_profile(ENGINES[engine])
    tp, hw = (16, "h20-2node") if hyp == "tp16" else (8, "h20")
    data["step_time"] = {"model": prof.model, "hardware": hw, "tp": tp, **prof.coeffs.as_dict(),
                         "calibrated": True, "source": f"{ENGINES[engine]} coefficients on {hw} TP{tp}"}
    if layout == "2p1d":
        data["deployment"]["prefill_instances"] = 2
    data["workload"].update(random_input_len=3500, random_output_len=1500, request_rate=c, max_concurrency=c,
                            num_prompts=4 * c, seed=seed)
    return data


def run(job) -> dict:
    layout, engine, c, seed = job
    m = simulate(scenario_from_dict(scenario(layout, engine, c, seed))).bench.metrics
    return {"layout": layout, "engine": engine, "concurrency": c, "seed": seed, "gpus": LAYOUTS[layout][1],
            **{k: m[k] for k in ("mean_ttft_ms", "mean_tpot_ms", "output_throughput", "completed")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--processes", type=int, default=None)
    args = ap.parse_args()
    jobs = [(lay, eng, c, s) for eng in ENGINES for lay in LAYOUTS for c in CONCURRENCY
            for s in range(1, args.seeds + 1)]
    with ProcessPoolExecutor(args.processes) as ex:
        rows = list(tqdm(ex.map(run, jobs), total=len(jobs), desc="simulate"))
    df = pd.DataFrame(rows)
    df["output_tok_s_per_gpu"] = df.output_throughput / df.gpus
    g = df.groupby(["engine", "layout", "concurrency"], sort=False)
    summary = g.agg(gpus=("gpus", "first"), mean_ttft_ms=("mean_ttft_ms", "mean"),
                    ttft_sd=("mean_ttft_ms", "std"), mean_tpot_ms=("mean_tpot_ms", "mean"),
                    tpot_sd=("mean_tpot_ms", "std"), output_tok_s_per_gpu=("output_tok_s_per_gpu", "mean"),
                    tok_s_sd=("output_tok_s_per_gpu", "std")).reset_index()
    OUT.mkdir(parents=True, exist_ok=True)
    summary.to_csv(OUT / "seed000_whatif.csv", index=False, float_format="%.2f")
    lines = ["# Seed-000 workload on other layouts (what-if)", "",
             __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0], "",
             f"Mean over {args.seeds} arrival seeds (± one standard deviation across seeds).", ""]
    for eng in ENGINES:
        lines += [f"## Engine: {eng} (`{ENGINES[eng]}`)", "",
                  "| concurrency | layout | GPUs | mean TTFT (ms) | mean TPOT (ms) | output tok/s per GPU |",
                  "| --- | --- | --- | --- | --- | --- |"]
        sub = summary[summary.engine == eng].sort_values(["concurrency", "layout"])
        for _, r in sub.iterrows():
            lines.append(f"| {r.concurrency} | {r.layout} | {r.gpus} | {r.mean_ttft_ms:.0f} ± {np.nan_to_num(r.ttft_sd):.0f} "
                         f"| {r.mean_tpot_ms:.1f} ± {np.nan_to_num(r.tpot_sd):.1f} "
                         f"| {r.output_tok_s_per_gpu:.1f} ± {np.nan_to_num(r.tok_s_sd):.1f} |")
        lines.append("")
    (OUT / "seed000_whatif.md").write_text("\n".join(lines) + "\n")
    print((OUT / "seed000_whatif.md").read_text())


if __name__ == "__main__":
    main()
