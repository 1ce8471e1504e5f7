"""Does `servesim serve` keep up with its simulated clock under many concurrent streams?

    python benchmarks/serve_load.py                   # 256 streams at time scale 1
    python benchmarks/serve_load.py --streams 512 --time-scale 4

Starts `servesim serve` as its own process on a free localhost port, opens N streaming
completions at once from an asyncio client (httpx) in this one, and compares the client's mean
TTFT and E2E with the simulation's own (the server's /metrics histograms, in wall seconds:
simulated / time scale). The gap is the server's own delay: HTTP, JSON, the event loop, and the
simulation falling behind the clock, whose worst the server prints when it stops. Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import httpx

from sim.serve import server_process

ROOT = Path(__file__).resolve().parents[1]


async def one(client: httpx.AsyncClient, prompt_len: int, max_tokens: int) -> dict:
    body = {"prompt": [1] * prompt_len, "max_tokens": max_tokens, "stream": True}
    t0 = time.monotonic()
    first = last = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                now = time.monotonic()
                first = first if first is not None else now
                last = now
    return {"ttft": first - t0, "e2e": last - t0}


async def drive(url: str, streams: int, prompt_len: int, max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        return await asyncio.gather(*(one(client, prompt_len, max_tokens) for _ in range(streams)))


def _metric_mean(text: str, name: str) -> float:
    vals = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " "):
                vals[suffix] = float(line.split()[-1])
    return vals["_sum"] / vals["_count"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="scenarios/seed004/enable-512.toml")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    # the server in a process of its own (as a user runs it), the client here: two cores, two processes
    with server_process(ROOT / args.scenario, "--time-scale", str(args.time_scale), cwd=ROOT) as server:
        url = server.url
        t0 = time.monotonic()
        seen = asyncio.run(drive(url, args.streams, args.prompt_len, args.max_tokens))
        wall = time.monotonic() - t0
        metrics = httpx.get(url + "/metrics", timeout=30).text
    lag = re.search(r"at most ([0-9.]+) simulated ms", server.output)

    scale = args.time_scale
    client_ttft = [s["ttft"] for s in seen]
    client_e2e = [s["e2e"] for s in seen]
    out = {
        "streams": args.streams, "time_scale": scale, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "scenario": args.scenario, "wall_s": round(wall, 3),
        "mean_ttft_client_s": round(statistics.fmean(client_ttft), 4),
        "mean_ttft_simulated_s": round(_metric_mean(metrics, "vllm:time_to_first_token_seconds") / scale, 4),
        "mean_e2e_client_s": round(statistics.fmean(client_e2e), 4),
        "mean_e2e_simulated_s": round(_metric_mean(metrics, "vllm:e2e_request_latency_seconds") / scale, 4),
        "max_lag_simulated_ms": float(lag.group(1)) if lag else None,
        "cpus": os.cpu_count(), "python": platform.python_version(),
    }
    out["mean_e2e_gap_pct"] = round(100 * (out["mean_e2e_client_s"] / out["mean_e2e_simulated_s"] - 1), 2)
    out["mean_ttft_gap_ms"] = round(1000 * (out["mean_ttft_client_s"] - out["mean_ttft_simulated_s"]), 1)
    print(json.dumps(out, indent=2))
    path = ROOT / "benchmarks" / "results" / "serve_load.json"
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
