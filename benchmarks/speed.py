"""Simulator speed on fixed scenarios: wall time, peak memory, requests and engine steps per second.

    python benchmarks/speed.py                 # every case, written to benchmarks/results/speed.json
    python benchmarks/speed.py --only vidur    # cases whose name contains "vidur" (updates their rows)
    python benchmarks/speed.py --no-compress   # plan every step (the reference path), for ratios

With the optional compiled build (setup.py) the results go to speed-compiled.json.

Cases:
  vidur-sharegpt     Vidur's published benchmark workload: 10,000 ShareGPT requests (Vidur's Llama-2
                     length trace, clipped at 4096 tokens), Poisson 2 QPS, vLLM V0 scheduler, one
                     Llama-2-7B replica on an A100. Vidur took 23.6 s wall at best on a 2-core machine
                     as a process, 19.5 s of it in its event loop. Two ratios are reported, each
                     against its like: simulate() against Vidur's event loop, and the whole `servesim
                     run` process (and `servesim --help`, the start-up alone) against Vidur's process.
  seed004/<run>      every seed-004 scenario (1,000 ShareGPT requests at t=0, calibrated Qwen2.5-72B).
  azure-conv-1x/10x  the Azure 2023 conversation trace (19,366 requests) replayed at its own rate and
                     at 10x, on four instances of the seed-004 engine.
  synthetic-1m       1,000,000 random requests, Poisson, vLLM V1 on Llama-2-7B / A100.
  synthetic-200k[-8x-output]  200,000 of them, and the same with 8x the output tokens at 1/8 the rate.
  mooncake-100k      100,000 requests of a Mooncake-format trace with shared system prompts and growing
                     conversations (benchmarks/mooncake_like.py draws it into a temporary file, not timed),
                     at their timestamps on one Llama-3.1-8B / H100, vLLM V1 with prefix caching.
  mooncake-conversation  the real Mooncake FAST'25 conversation trace, first 2,000 requests at 1/12 rate,
                     on the same engine (scenarios/mooncake/vllm-v1.toml).

Each case runs in a fresh process (so its peak memory is its own), `--repeat` times for the small
ones, and reports the best wall time of `simulate()` (building the requests, simulating, computing the
report; the interpreter start, imports and scenario parsing are reported separately as `startup_s`).
Peak memory is the process's peak resident set size, imports included (~`baseline_rss_mib`).
A plain script, not a timed test: run it on the machine you care about and compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from mooncake_like import write_trace  # noqa: E402
VIDUR_BEST_WALL_S = 23.6  # Vidur's whole process on the same 2-core machine type
VIDUR_EVENT_LOOP_S = 19.5  # of which its event loop (19.5-19.7 s in the runs recorded here)

CASES: dict[str, tuple[str, list[str], int]] = {
    # name: (scenario, overrides, repeats)
    "vidur-sharegpt": ("scenarios/benchmarks/vidur-sharegpt.toml", [], 3),
    **{f"seed004/{p.stem}": (str(p.relative_to(ROOT)), [], 3)
       for p in sorted((ROOT / "scenarios" / "seed004").glob("[!_]*.toml"))},
    "azure-conv-1x": ("scenarios/benchmarks/azure-conv.toml", [], 1),
    "azure-conv-10x": ("scenarios/benchmarks/azure-conv.toml", ["workload.trace_time_scale=0.1"], 1),
    "synthetic-1m": ("scenarios/benchmarks/synthetic-1m.toml", [], 1),
    # the same requests with 8x the output tokens (at 1/8 the rate, so equally loaded): the cost
    # follows the events (arrivals, completions, batch changes), not the tokens
    "synthetic-200k": ("scenarios/benchmarks/synthetic-1m.toml", ["workload.num_prompts=200000"], 1),
    "synthetic-200k-8x-output": ("scenarios/benchmarks/synthetic-1m.toml",
                                 ["workload.num_prompts=200000", "workload.random_output_len=1024",
                                  "workload.request_rate=1.5"], 1),
    "mooncake-100k": ("scenarios/benchmarks/mooncake-100k.toml", [], 1),
    "mooncake-conversation": ("scenarios/mooncake/vllm-v1.toml", [], 1),
}
# cases whose trace is drawn first (into a temporary directory; the drawing is not timed)
GENERATED = {"mooncake-100k": lambda d: [f"workload.trace_path={write_trace(d / 'trace.jsonl')}"]}


def run_one(name: str, compress: bool) -> dict:
    """Measure one case in this process (called in a fresh subprocess)."""
    t0 = time.perf_counter()
    import gc

    from sim.config import load_scenario
    from sim.runner import simulate

    path, overrides, repeats = CASES[name]
    shown = overrides
    if name in GENERATED:
        tmp = tempfile.TemporaryDirectory()
        shown = overrides + ["workload.trace_path=(drawn by benchmarks/mooncake_like.py into a temporary file)"]
        overrides = overrides + GENERATED[name](Path(tmp.name))
        t0 = time.perf_counter()
    sc = load_scenario(ROOT / path, overrides)
    startup = time.perf_counter() - t0
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    walls = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        res = simulate(sc, compress=compress)
        walls.append(time.perf_counter() - t)
        m = res.bench.metrics
        summary = {"completed": m["completed"], "failed": m["failed"], "duration_s": m["duration"],
                   "mean_ttft_ms": m["mean_ttft_ms"], "mean_tpot_ms": m["mean_tpot_ms"],
                   "p99_itl_ms": m["p99_itl_ms"], "output_throughput": m["output_throughput"]}
        n_req, n_steps = len(res.requests), res.num_steps
        del res
    best = min(walls)
    return {"case": name, "scenario": path, "overrides": shown, "compress": compress,
            "best_wall_s": best, "walls_s": walls, "startup_s": startup,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "baseline_rss_mib": baseline, "requests": n_req, "engine_steps": n_steps,
            "requests_per_s": n_req / best, "steps_per_s": n_steps / best, "report": summary}


def process_times(repeats: int = 5) -> dict:
    """Wall time of whole `servesim` processes, best of `repeats`: `--help` (the start-up) and the
    Vidur workload from the command line (start-up, scenario, simulation and report)."""
    exe = shutil.which("servesim")
    cmd = [exe] if exe else [sys.executable, "-m", "sim.cli"]
    # as a user's shell runs it: bytecode cached after the first run (a PYTHONDONTWRITEBYTECODE
    # in this environment would have every run compile the sources again, ~0.1 s), and that first
    # run left out
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = {}
    for name, args in (("help_s", ["--help"]), ("run_vidur_s", ["run", "scenarios/benchmarks/vidur-sharegpt.toml"])):
        subprocess.run(cmd + args, cwd=ROOT, capture_output=True, check=True, env=env)
        walls = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run(cmd + args, cwd=ROOT, capture_output=True, check=True, env=env)
            walls.append(time.perf_counter() - t)
        out[name] = min(walls)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--no-compress", action="store_true", help="plan every step (reference path)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/speed[-nocompress][-compiled].json)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, not args.no_compress)))
        return
    rows = []
    head = f"{'case':<20} {'wall s':>8} {'peak MiB':>9} {'requests/s':>11} {'steps/s':>10} {'steps':>9}"
    print(head)
    for name in CASES:
        if args.only not in name:
            continue
        cmd = [sys.executable, __file__, "--one", name] + (["--no-compress"] if args.no_compress else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{name:<20} FAILED\n{out.stderr[-2000:]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:<20} {row['best_wall_s']:>8.3f} {row['peak_rss_mib']:>9.0f} {row['requests_per_s']:>11.0f} "
              f"{row['steps_per_s']:>10.0f} {row['engine_steps']:>9}", flush=True)
    vidur = next((r for r in rows if r["case"] == "vidur-sharegpt"), None)
    proc = process_times() if not args.only or "vidur" in args.only else None
    if vidur:
        print(f"vidur-sharegpt, simulation against Vidur's event loop: {VIDUR_EVENT_LOOP_S / vidur['best_wall_s']:.1f}x "
              f"({vidur['best_wall_s']:.2f} s against {VIDUR_EVENT_LOOP_S} s)")
    if proc:
        print(f"servesim --help: {proc['help_s']:.2f} s; servesim run vidur-sharegpt: {proc['run_vidur_s']:.2f} s, "
              f"process against Vidur's process: {VIDUR_BEST_WALL_S / proc['run_vidur_s']:.1f}x ({VIDUR_BEST_WALL_S} s)")
    seed004 = [r["best_wall_s"] for r in rows if r["case"].startswith("seed004/")]
    if seed004:
        print(f"seed004: slowest scenario {max(seed004):.3f} s")
    import sim.engine

    compiled = not sim.engine.__file__.endswith(".py")  # the optional compiled build (setup.py)
    default = f"speed{'-nocompress' if args.no_compress else ''}{'-compiled' if compiled else ''}.json"
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / default
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.only and out_path.exists():  # a partial run updates its cases, keeps the others
        new = {r["case"] for r in rows}
        rows = [r for r in json.loads(out_path.read_text())["rows"] if r["case"] not in new] + rows
        rows.sort(key=lambda r: list(CASES).index(r["case"]) if r["case"] in CASES else len(CASES))
    out_path.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                    "cpus": os.cpu_count(), "compiled": compiled, "vidur_best_wall_s": VIDUR_BEST_WALL_S,
                                    "vidur_event_loop_s": VIDUR_EVENT_LOOP_S, "process": proc,
                                    "rows": rows}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
