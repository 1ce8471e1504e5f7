"""Teaching example: the same 20 requests under chunked prefill off, budget 512 and budget 8192.

Seed 004's calibrated vLLM V0 engine (Qwen2.5-72B GPTQ, one GPU), its first 20 ShareGPT requests
all sent at t = 0. For each setting it writes a Perfetto trace and a PNG timeline
(experiments/results/timeline/) and a short write-up with the TTFT/ITL numbers of these runs.

    python experiments/timeline_chunked_prefill.py
"""

from __future__ import annotations

from pathlib import Path

from sim.config import load_scenario
from sim.runner import simulate
from sim.timeline import plot_timeline, write_trace

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "timeline"
RUNS = {  # label -> (scenario, overrides)
    "chunked prefill off (budget 2048)": ("disable-2048", []),
    "chunked prefill on, budget 512": ("enable-512", []),
    "chunked prefill on, budget 8192": ("enable-8192", []),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, (name, extra) in RUNS.items():
        sc = load_scenario(ROOT / "scenarios" / "seed004" / f"{name}.toml", ["workload.num_prompts=20", *extra])
        res = simulate(sc, record_steps=True)
        write_trace(res, OUT / f"{name}.json")
        plot_timeline(res, OUT / f"{name}.png", seconds=6.0, title=f"20 ShareGPT requests, {label}")
        m = res.bench.metrics
        rows.append((label, name, m["mean_ttft_ms"], m["median_ttft_ms"], m["p99_itl_ms"], m["median_itl_ms"],
                     m["mean_tpot_ms"], max(s.shape.prefill_tokens + s.shape.decode_seqs for s in res.steps)))
    lines = ["# Chunked prefill on a timeline", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| setting | mean TTFT (ms) | median TTFT (ms) | median ITL (ms) | P99 ITL (ms) | mean TPOT (ms) | largest step (tokens) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, _, mt, md, p99, mi, tp, big in rows:
        lines.append(f"| {label} | {mt:.0f} | {md:.0f} | {mi:.1f} | {p99:.1f} | {tp:.1f} | {big} |")
    lines += ["", "What to look at (top panel: tokens per step, orange = prefill, blue = decode; bottom: one row "
              "per request, grey = waiting, orange = prefill, blue = decoding):", "",
              "- **Off** (budget 2048): a step is either whole prompts, up to 2048 tokens, or decodes, and V0 "
              "prefills while anything waits. The 20 prompts go through in a few batches of whole prompts, so "
              "first tokens come in waves and decoding starts only after the last wave.",
              "- **Budget 512**: prompts are cut into 512-token chunks and the first requests get their first "
              "token soonest (lowest mean TTFT here). Their decodes then ride in every following chunk step "
              "(thin blue on top of the orange), and each of those steps takes ~0.4 s: their token gaps are "
              "the chunk steps' length, the P99 ITL of ~400 ms. Without chunking, V0 runs all waiting prompts "
              "before any decode: the first waves wait ~2 s for their second token (the white gap), once per "
              "request, too rare to move the P99 ITL (37 ms); no decode rides in a prefill step.",
              "- **Budget 8192**: all 20 prompts (4,292 tokens) fit one step, so every request waits for that one "
              "long step: the same, highest TTFT for all, then only decode steps (lowest TPOT).",
              "",
              "The seed-004 trade-off (a bigger budget lowers TTFT and raises ITL) needs a backlog many steps "
              "long, as in its 1000-request runs: then a bigger budget drains the queue in fewer, larger steps. "
              "With 20 requests the whole backlog fits one large step, and that step delays everyone's first "
              "token instead. `servesim timeline` on the 1000-request scenarios shows the other regime.", ""]
    lines += [f"![{label}]({name}.png)" for label, name, *_ in rows]
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print((OUT / "README.md").read_text())


if __name__ == "__main__":
    main()
