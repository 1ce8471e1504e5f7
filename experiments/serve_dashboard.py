"""Start the simulated endpoint, point a client at it, read its dashboard series.

    python experiments/serve_dashboard.py     # writes experiments/results/serve_dashboard.{csv,png,md}

`servesim serve` runs the seed-004 engine (Qwen2.5-72B GPTQ, vLLM V0, budget 512) at 10x real
time. A client sends 120 streaming completions (ShareGPT-like: 100-1,000-token prompts, 50-400
output tokens, drawn with a fixed seed) as a Poisson process at 2 requests per simulated second,
which is more than the engine serves, so a queue builds. Meanwhile the script scrapes /metrics
every simulated second, as Prometheus would, and records the panels a vLLM dashboard shows:
running and waiting requests, KV-cache usage, and the generation-token rate. It is a live run: the
client's arrivals are wall-clock sleeps and the server follows the wall clock, so the figures move a
little from run to run with the machine's load.
"""

from __future__ import annotations

import asyncio
import csv
import random
import re
import time
from pathlib import Path

import httpx

from sim.serve import server_process

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results"
SCALE = 10.0  # simulated seconds per wall second
RATE = 2.0  # requests per simulated second
N = 120


def gauge(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def request(client: httpx.AsyncClient, prompt: int, out: int) -> None:
    body = {"prompt": [1] * prompt, "max_tokens": out, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for _ in r.aiter_lines():
            pass


async def load(client: httpx.AsyncClient, rng: random.Random) -> None:
    tasks = []
    for _ in range(N):
        tasks.append(asyncio.create_task(request(client, rng.randint(100, 1000), rng.randint(50, 400))))
        await asyncio.sleep(rng.expovariate(RATE) / SCALE)
    await asyncio.gather(*tasks)


async def scrape(client: httpx.AsyncClient, rows: list, stop: asyncio.Event) -> None:
    t0, last_tokens = time.monotonic(), 0.0
    while not stop.is_set():
        text = (await client.get("/metrics")).text
        tokens = gauge(text, "vllm:generation_tokens_total")
        rows.append({"t_s": round((time.monotonic() - t0) * SCALE, 1),
                     "running": gauge(text, "vllm:num_requests_running"),
                     "waiting": gauge(text, "vllm:num_requests_waiting"),
                     "kv_usage_pct": round(100 * gauge(text, "vllm:kv_cache_usage_perc"), 1),
                     "generation_tok_per_s": 0.0 if not rows else round(tokens - last_tokens, 1)})
        last_tokens = tokens
        await asyncio.sleep(1.0 / SCALE)


async def main_async(url: str) -> list:
    rows: list = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=N + 8)) as client:
        scraper = asyncio.create_task(scrape(client, rows, stop))
        await load(client, random.Random(0))
        stop.set()
        await scraper
    return rows


def main() -> None:
    with server_process("scenarios/seed004/enable-512.toml", "--time-scale", str(SCALE), cwd=ROOT) as server:
        rows = asyncio.run(main_async(server.url))

    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "serve_dashboard.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(t, [r["running"] for r in rows], label="running")
    axes[0].plot(t, [r["waiting"] for r in rows], label="waiting")
    axes[0].set_ylabel("requests")
    axes[0].legend()
    axes[1].plot(t, [r["kv_usage_pct"] for r in rows])
    axes[1].set_ylabel("KV cache %")
    axes[2].plot(t, [r["generation_tok_per_s"] for r in rows])
    axes[2].set_ylabel("generation tok/s")
    axes[2].set_xlabel("simulated s (scraped once per simulated second)")
    fig.suptitle("servesim serve, seed-004 engine, 2 req/s Poisson: /metrics as a dashboard scrapes it")
    fig.tight_layout()
    fig.savefig(OUT / "serve_dashboard.png", dpi=90)

    peak_wait = max(r["waiting"] for r in rows)
    peak_kv = max(r["kv_usage_pct"] for r in rows)
    busy = [r["generation_tok_per_s"] for r in rows if r["running"] > 0]
    (OUT / "serve_dashboard.md").write_text(
        "# The simulated endpoint's dashboard\n\n" + __doc__.split("\n\n", 2)[2].strip() + "\n\n"
        f"{len(rows)} scrapes over {rows[-1]['t_s']:.0f} simulated s: at most {peak_wait:.0f} requests waiting, "
        f"KV usage up to {peak_kv:.1f} %, {sum(busy) / max(1, len(busy)):.0f} generated tokens per simulated "
        "second while busy. Series: `serve_dashboard.csv`, plot: `serve_dashboard.png`. "
        f"Server: {server.output.strip().splitlines()[-1] if server.output.strip() else ''}\n")
    print((OUT / "serve_dashboard.md").read_text())


if __name__ == "__main__":
    main()
