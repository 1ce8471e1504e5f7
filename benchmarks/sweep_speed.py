"""Time a 48-point sweep of a seed-004 scenario with 3 seeds (144 simulations) on local processes.

    python benchmarks/sweep_speed.py [--prompts 200]

The issue's bound: under 2 minutes on 2 cores. Each seed-004 run simulates 1000 ShareGPT requests
by default; --prompts shrinks the workload for a quicker check.
"""

from __future__ import annotations

import argparse
import os
import time

from sim.sweep import sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1000)
    args = ap.parse_args()
    grid = ["engine.max_num_batched_tokens=256,512,1024,2048,4096,8192",
            "engine.max_num_seqs=32,64,128,256", "workload.request_rate=4,inf"]
    t0 = time.perf_counter()
    runs, summary = sweep("scenarios/seed004/enable-512.toml", grid, seeds=3,
                          base_set=[f"workload.num_prompts={args.prompts}"], progress=True)
    dt = time.perf_counter() - t0
    print(f"{len(summary)} points x 3 seeds = {len(runs)} simulations of {args.prompts} requests: "
          f"{dt:.1f} s on {os.cpu_count()} cores ({dt / len(runs):.2f} s per simulation)")


if __name__ == "__main__":
    main()
