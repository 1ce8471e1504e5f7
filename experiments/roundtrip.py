"""Round trip with no outside data: does `servesim calibrate` recover a profile it generated?

For each case (a dense model on one GPU, a 70B-class model at TP4, an MoE model), a known
profile simulates a run of three constant-rate load stages below saturation (inference-perf's
`load.stages`, ShareGPT lengths), written as per-request results exactly as `servesim run
--output-requests` writes them. `servesim calibrate` fits a profile on that file alone (one
row per stage, each replaying its own requests). The fitted profile then
- reproduces the run: mean TTFT, TPOT and E2E per stage, and their p99;
- predicts runs it never saw, against the known profile on the same requests: another
  request rate, other lengths, other token budgets, a closed loop at fixed concurrency.
Every workload seed gives its own recorded run and its own fit; the tables give the mean
error over seeds and its spread (min..max).

    python experiments/roundtrip.py                 # full size: ~5,000 requests per run, 3 seeds
    python experiments/roundtrip.py --small         # what the test runs: ~600 requests, 1 seed
    # writes experiments/results/roundtrip.md (full size only)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sim.cli import main as servesim
from sim.config import scenario_from_dict
from sim.profile import load_profile
from sim.runner import simulate

OUT = Path(__file__).resolve().parents[1] / "experiments" / "results" / "roundtrip.md"

# The profile that generates the runs: plausible values for a CUDA-graph vLLM V1 server.
TRUE = {"step_overhead_s": 0.004, "per_seq_s": 2e-5, "launch_overhead_s": 0.002, "prefill_overhead_s": 0.003,
        "frontend_latency_s": 0.012, "compute_efficiency": 0.55, "memory_efficiency": 0.8, "comm_efficiency": 0.6}


@dataclass
class Case:
    name: str
    model: str
    hardware: str
    tp: int
    kv_cache_tokens: int
    rates: tuple[float, float, float]  # the three stages, about 20, 45 and 70 % of saturation

    def engine(self) -> dict:
        return {"scheduler": "vllm-v1", "version": "0.11.0", "gpu": "H100", "max_model_len": 8192,
                "kv_cache_tokens": self.kv_cache_tokens}

    def step_time(self, coeffs: dict) -> dict:
        return {"model": self.model, "hardware": self.hardware, "tp": self.tp, **coeffs}


CASES = [
    Case("dense, 1 GPU (Llama-3.1-8B, H100)", "llama-3.1-8b", "h100-80g", 1, 450_000, (10, 22, 35)),
    Case("70B at TP4 (Llama-3.1-70B, 4x H100)", "llama-3.1-70b", "h100-80g", 4, 600_000, (5, 11, 17)),
    Case("MoE (Qwen3-30B-A3B, H100)", "qwen3-30b-a3b", "h100-80g", 1, 300_000, (6, 13, 20)),
]

MEANS = ["mean_ttft_ms", "mean_tpot_ms", "mean_e2el_ms"]
TAILS = ["p99_ttft_ms", "p99_tpot_ms", "p99_e2el_ms"]


def staged(case: Case, total: int, seed: int) -> dict:
    duration = total / sum(case.rates)
    return {"client": "vllm", "dataset_name": "sharegpt", "seed": seed,
            "stages": [{"rate": r, "duration": duration} for r in case.rates]}


def variants(case: Case, seed: int, n: int) -> dict[str, dict]:
    """Runs the fit never saw: (engine overrides, workload)."""
    mid, top = case.rates[1], case.rates[2]
    return {
        "rate (Poisson, 0.85x the top stage)": ({}, {"dataset_name": "sharegpt", "num_prompts": n,
                                                      "request_rate": 0.85 * top, "seed": seed}),
        "lengths (random 1024 in / 256 out)": ({}, {"dataset_name": "random", "num_prompts": n, "random_input_len": 1024,
                                                    "random_output_len": 256, "random_range_ratio": 0.5,
                                                    "request_rate": mid / 3, "seed": seed}),
        "budget 512 tokens": ({"max_num_batched_tokens": 512}, {"dataset_name": "sharegpt", "num_prompts": n,
                                                                "request_rate": mid, "seed": seed}),
        "budget 16384 tokens": ({"max_num_batched_tokens": 16384}, {"dataset_name": "sharegpt", "num_prompts": n,
                                                                    "request_rate": mid, "seed": seed}),
        "concurrency 32 (closed loop)": ({}, {"dataset_name": "sharegpt", "num_prompts": n, "max_concurrency": 32,
                                              "seed": seed}),
    }


def metrics(case: Case, coeffs: dict, engine: dict, workload: dict) -> dict:
    sc = scenario_from_dict({"engine": {**case.engine(), **engine}, "workload": {"client": "vllm", **workload},
                             "step_time": case.step_time(coeffs)})
    return simulate(sc).bench.metrics


def stage_metrics(res_requests: pd.DataFrame) -> dict[int, dict]:
    out = {}
    for k, g in res_requests.groupby("stage"):
        ok = g[g.success]
        out[int(k)] = {**{f"mean_{m}_ms": 1000 * ok[f"{m}_s"].mean() for m in ("ttft", "tpot", "e2el")},
                       **{f"p99_{m}_ms": 1000 * float(np.nanpercentile(ok[f"{m}_s"], 99)) for m in ("ttft", "tpot", "e2el")}}
    return out


def one(case: Case, seed: int, total: int, n_variant: int, work: Path) -> dict:
    """One recorded run, one fit, and its errors (percent, signed)."""
    truth = scenario_from_dict({"engine": case.engine(), "workload": staged(case, total, seed),
                                "step_time": case.step_time(TRUE)})
    rec = simulate(truth)
    run = work / f"run-{seed}.csv"
    rec.bench.requests.to_csv(run, index=False)  # what `servesim run --output-requests` writes
    base = work / "base.toml"
    eng = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in case.engine().items())
    base.write_text(f"[engine]\n{eng}\n\n[workload]\nclient = \"vllm\"\n")
    prof = work / f"fit-{seed}.toml"
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as log:
        rc = servesim(["calibrate", "--table", str(run), "--base", str(base), "--model", case.model, "--hardware",
                       case.hardware, "--tp", str(case.tp), "--out", str(prof), "--no-progress"])
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{case.name}, seed {seed}: calibrate exited {rc}\n{log.getvalue()}")
    fitted = load_profile(str(prof)).coeffs.as_dict()
    errors: dict[str, float] = {}
    again = simulate(scenario_from_dict({"engine": case.engine(), "workload": staged(case, total, seed),
                                         "step_time": case.step_time(fitted)}))
    want, got = stage_metrics(rec.bench.requests), stage_metrics(again.bench.requests)
    for k in want:
        for m in MEANS + TAILS:
            errors[f"reproduce|stage {k}|{m}"] = (got[k][m] - want[k][m]) / want[k][m] * 100
    for label, (engine, workload) in variants(case, seed, n_variant).items():
        t, f = metrics(case, TRUE, engine, workload), metrics(case, fitted, engine, workload)
        for m in MEANS + ["output_throughput"]:
            errors[f"predict|{label}|{m}"] = (f[m] - t[m]) / t[m] * 100
    return {"errors": errors, "seconds": seconds, "fitted": fitted, "requests": len(rec.requests)}


def run(cases: list[Case], seeds: list[int], total: int, n_variant: int) -> pd.DataFrame:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for seed in seeds:
                r = one(case, seed, total, n_variant, Path(tmp))
                for key, err in r["errors"].items():
                    kind, what, metric = key.split("|")
                    rows.append({"case": case.name, "seed": seed, "kind": kind, "what": what, "metric": metric,
                                 "error_pct": err, "fit_s": r["seconds"], "requests": r["requests"]})
                rows += [{"case": case.name, "seed": seed, "kind": "coefficient", "what": k, "metric": "fitted",
                          "error_pct": v, "fit_s": r["seconds"], "requests": r["requests"]} for k, v in r["fitted"].items()]
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby(["case", "kind", "what", "metric"], sort=False)["error_pct"]
    return pd.DataFrame({"mean_error_pct": g.mean(), "min": g.min(), "max": g.max()}).reset_index()


def markdown(df: pd.DataFrame, seeds: list[int]) -> str:
    s = summary(df)
    lines = ["# Round trip: calibrate on a simulated run, reproduce it, predict what it never saw", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Known profile: {TRUE}. Workload seeds {seeds}; errors are (fitted - known) / known, in percent, "
             "mean over seeds (min..max).", ""]
    for case, cs in s.groupby("case", sort=False):
        fit_s = df[df.case == case].groupby("seed").fit_s.first()
        lines += [f"## {case}", "", f"{int(df[df.case == case].requests.iloc[0])} requests per recorded run; "
                  f"`servesim calibrate` took {fit_s.mean():.0f} s ({fit_s.min():.0f}..{fit_s.max():.0f}) on this machine.",
                  "", "| check | run | metric | error % (mean) | min..max |", "| --- | --- | --- | --- | --- |"]
        for _, r in cs.iterrows():
            lines.append(f"| {r.kind} | {r.what} | {r.metric} | {r.mean_error_pct:+.2f} | {r['min']:+.2f}..{r['max']:+.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="~600 requests, one seed, two cases (the test's size)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cases", help="comma-separated case numbers (default: all)")
    args = ap.parse_args()
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    if args.small:
        df = run(cases[:1], [0], 600, 300)
    else:
        seeds = list(range(args.seeds))
        df = run(cases, seeds, 5000, 1000)
        if not args.cases:
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(markdown(df, seeds))
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(summary(df).to_string(index=False, float_format="%.2f"))


if __name__ == "__main__":
    main()
