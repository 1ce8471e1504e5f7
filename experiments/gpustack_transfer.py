"""Transfer on public runs the project never saw (GPUStack's performance lab), and across engines.

Within a configuration: for every vLLM and SGLang configuration of
calibration/data/gpustack_a100_ascend.csv (one model, engine and exact launch command) with at
least four runs, the step-time model is fitted on the three lowest-load runs (fewest concurrent
requests, then fewest prompt tokens per request) and predicts the others. Then, from the same
fits: the same model and launch with another --max-num-batched-tokens; another model of the same
family on the same GPU (Qwen3-14B to Qwen3-32B, gpt-oss-20b to gpt-oss-120b); and seed 002's vLLM
profile predicting its SGLang runs on the same 8x H20; and the family transfers again, fitted
on every run of the source configuration but those at a fixed concurrency. Every figure is out
of sample. The step-time
issue's targets, as medians over the predicted runs: TPOT <= 10 %, output throughput <= 10 %,
TTFT <= 20 %.

One coefficient is the GPU's, not the configuration's: the FLOP rate of the attention kernels,
`attention_efficiency` (FlashAttention for vLLM on the A100, the Triton kernels gpt-oss's sinks
need there, FlashInfer for SGLang, vllm-ascend's on the 910B). The three lowest-load runs never time
it (their prompts are too short), so within a configuration it is held at the median of the values
fitted on every run of each configuration of the *other* models on the same kernel (another model:
not the same network quantised otherwise; no run of the predicted model is seen), or, where no
other model ran that kernel, on the same GPU's kernel of the same kind under another engine
(GLM-4.5-Air on SGLang: FlashInfer, held at vLLM's FlashAttention rate on the A100). The transfers to
another model of the family hold it at the value without either model's runs. Each fit matches the
mean of three draws of its training runs (workload seeds 0-2; the fits on every run of a
configuration, one), and the predicted runs are reported per seed, seeds 0-4, with their mean.

    python experiments/gpustack_transfer.py      # writes experiments/results/gpustack_transfer.md
"""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from calibration.fit import StepTimeFit
from calibration.gpustack import METRICS, load, runs
from calibration.launch import engine_from_launch
from sim.perf_model import load_hardware_spec, load_model_spec, runs_triton_attention

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "gpustack_transfer.md"
TARGETS = {"mean_tpot_ms": 10, "output_throughput": 10, "mean_ttft_ms": 20}
N_TRAIN = 3
SPREAD_SEEDS = (0, 1, 2, 3, 4)  # workload seeds the predicted runs are drawn with, one at a time
FIT_SEEDS = (0, 1, 2)  # a fit matches the mean of these draws of its training runs, not one draw
HELD = " (the GPU's)"  # a coefficient held at the GPU's value, not fitted


def _unfixed_runs(rs: list) -> list:
    """Every run but those at a fixed concurrency (their front end behind permits needs a fit by
    simulation, hours with these many rows)."""
    return [r for r in rs if "max_concurrency" not in r.case.scenario["workload"]]


def attention_kernel(run) -> tuple:
    """The attention kernel a run's engine uses: (GPU, engine, and whether the model's sinks put it
    on the Triton kernels there)."""
    triton = runs_triton_attention(load_model_spec(run.model), load_hardware_spec(run.hardware))
    return (run.hardware, run.config.split(" · ")[1], "triton" if triton else "default")


def base_model(model: str) -> str:
    """The network without its quantisation (qwen3-235b-a22b-fp8 -> qwen3-235b-a22b)."""
    return re.sub(r"-(fp8|awq|gptq.*|w8a8|int4|int8)$", "", model)


def all_run_fits(by_config: dict) -> dict:
    """config -> its fit on every run but those at a fixed concurrency (its long prompts time the
    attention kernels, which its three lowest-load runs cannot)."""
    out = {}
    for config, rs in by_config.items():
        if len(rs) < N_TRAIN + 1:
            continue
        ra = _unfixed_runs(rs)
        out[config] = StepTimeFit(model=ra[0].model, hardware=ra[0].hardware, tp=ra[0].tp, metrics=METRICS,
                                  seeds=(0,)).fit([r.case for r in ra])
    return out


def kernel_efficiencies(full: dict, by_config: dict) -> dict:
    """config -> (model, attention kernel, attention_efficiency of its `all_run_fits` fit), for the
    configurations whose long prompts time it."""
    return {config: (by_config[config][0].model, attention_kernel(by_config[config][0]), fit.coeffs_.attention_efficiency)
            for config, fit in full.items() if fit.attention_}


def gpu_attention_efficiency(effs: dict, kernel: tuple, without: set[str]) -> float | None:
    """The kernel's attention efficiency, known without the runs of the models in `without`: the
    median over the other models' configurations on that kernel; when no other model ran it, over
    those on the same GPU's kernel of the same kind under another engine (SGLang's FlashInfer
    and vLLM's FlashAttention are both tiled softmax kernels of one generation, so the GPU's
    rate for one is a better guess for the other than the GEMMs' rate the fit falls back to);
    None if there are neither."""
    skip = {base_model(w) for w in without}

    def median(same) -> float | None:
        others = [e for m, k, e in effs.values() if same(k) and base_model(m) not in skip]
        return float(np.median(others)) if others else None

    own = median(lambda k: k == kernel)
    return own if own is not None else median(lambda k: (k[0], k[2]) == (kernel[0], kernel[2]))


def held_attention(effs: dict, run, without: set[str]) -> dict:
    """`StepTimeFit.fixed` for a fit of `run`'s configuration: the GPU's attention efficiency."""
    e = gpu_attention_efficiency(effs, attention_kernel(run), without)
    return {"attention_efficiency": e} if e is not None else {}


def _load_rank(run) -> tuple:
    w = run.case.scenario["workload"]
    conc = w.get("max_concurrency", math.inf)
    prompt = w.get("random_input_len", 215)  # ShareGPT: ~215 prompt tokens per request here
    return (conc, prompt, run.row_id)


def _predict_with(coeffs, model: str, hardware: str, tp: int, cases, kv: int | None = None) -> pd.DataFrame:
    """Simulate `cases` with fitted coefficients on another model (a profile moved, not refitted)."""
    moved = StepTimeFit(model=model, hardware=hardware, tp=tp, metrics=METRICS, seeds=FIT_SEEDS)
    moved.coeffs_, moved.hardware_, moved.kv_cache_tokens_ = coeffs, hardware, kv
    return moved.predict(cases)


def _launch_without_budget(config: str) -> tuple:
    """The configuration's launch (model, engine, parallelism, flags) but its token budget."""
    launch = engine_from_launch(config.split(" · ")[2])
    settings = {k: v for k, v in launch.settings.items() if k != "max_num_batched_tokens"}
    return (config.split(" · ")[:2], launch.tp, launch.dp, launch.ep, launch.async_scheduling,
            sorted(settings.items()), launch.memory_fraction, launch.unmodelled)


FAMILIES = [("Qwen/Qwen3-14B · vLLM · vllm serve Qwen/Qwen3-14B", "Qwen/Qwen3-32B · vLLM · vllm serve Qwen/Qwen3-32B"),
            ("openai/gpt-oss-20b · vLLM · vllm serve openai/gpt-oss-20b",
             "openai/gpt-oss-120b · vLLM · vllm serve openai/gpt-oss-120b --max-model-len 32768")]


def transfers(by_config: dict, fits: dict, effs: dict, full_fits: dict) -> tuple[pd.DataFrame, list[str]]:
    """Predictions of the fits for runs outside their configuration (see the module docstring)."""
    out, notes = [], []
    # another --max-num-batched-tokens: the same launch otherwise
    for config, fit in fits.items():
        base = _launch_without_budget(config)
        for other, rs in by_config.items():
            if other != config and _launch_without_budget(other) == base and other not in fits:
                p = fit.predict([r.case for r in rs])
                out.append(p.assign(kind="another budget", source=config, config=other))
    for a, b in FAMILIES:
        if a in fits and b in by_config:
            rb, src = by_config[b], fits[a]
            held = held_attention(effs, rb[0], {rb[0].model, src.model})
            if held != src.fixed:  # the source's held value came from the target's runs: without them
                low = sorted(by_config[a], key=_load_rank)[:N_TRAIN]
                src = StepTimeFit(model=low[0].model, hardware=low[0].hardware, tp=low[0].tp, metrics=METRICS,
                                  seeds=FIT_SEEDS, fixed=held)
                src.fit([r.case for r in low])
            p = _predict_with(src.coeffs_, rb[0].model, rb[0].hardware, rb[0].tp, [r.case for r in rb])
            out.append(p.assign(kind="another model, same family", source=a, config=b))
        else:
            notes.append(f"- {a} -> {b}: not run (no fit or no runs)")
            continue
        # the same, fitted on every run of the source (its long prompts time the attention
        # kernels, which its three lowest-load runs cannot): still no run of the target is fitted
        full = full_fits[a]
        p = _predict_with(full.coeffs_, rb[0].model, rb[0].hardware, rb[0].tp, [r.case for r in rb])
        out.append(p.assign(kind="another model, same family, every source run fitted", source=a, config=b))
        notes.append(f"- {a}, every run but those at a fixed concurrency fitted ({len(_unfixed_runs(by_config[a]))}): "
                     f"attention_efficiency {full.coeffs_.attention_rate:.3f}, "
                     f"frontend_per_request_s {full.coeffs_.frontend_per_request_s * 1e3:.2f} ms")
    # seed 002: the vLLM profile on the SGLang runs (same model, same 8x H20)
    from calibration.splits import cases, load_split
    from sim.profile import load_profile

    sg, _ = cases(load_split("seed002-sglang"))
    prof = load_profile("seed002-deepseek-r1-h20-vllm")
    # the SGLang engine's own KV pool (its memory formula, as in its split), the vLLM fit's step times
    p = _predict_with(prof.coeffs, prof.model, prof.hardware, prof.tp, sg,
                      load_profile("seed002-deepseek-r1-h20-sglang").kv_cache_tokens)
    out.append(p.assign(kind="another engine (seed 002)", source="seed002 vLLM profile", config="seed002 SGLang runs"))
    return pd.concat(out, ignore_index=True), notes


def main(only: str = "") -> None:
    df = load()
    by_config: dict[str, list] = {}
    skipped: list[str] = []
    for r in runs(df, skipped):
        by_config.setdefault(r.config, []).append(r)
    rows, notes, fitted, fits = [], [f"- not a run: {why}" for why in skipped], [], {}
    full_fits = all_run_fits(by_config)
    effs = kernel_efficiencies(full_fits, by_config)
    for config, (model, kernel, e) in effs.items():
        notes.append(f"- {config} ({', '.join(kernel)}), every run but those at a fixed concurrency fitted: "
                     f"attention_efficiency {e:.3f}")
    for config, rs in by_config.items():
        if len(rs) < N_TRAIN + 1 or only not in config:
            continue
        rs = sorted(rs, key=_load_rank)
        train, test = rs[:N_TRAIN], rs[N_TRAIN:]
        first = rs[0]
        fit = StepTimeFit(model=first.model, hardware=first.hardware, tp=first.tp, metrics=METRICS, seeds=FIT_SEEDS,
                          fixed=held_attention(effs, first, {first.model}))
        t0 = time.perf_counter()
        try:
            fit.fit([r.case for r in train])
        except Exception as exc:  # a configuration the fit refuses is reported, not hidden
            notes.append(f"- {config}: no fit ({type(exc).__name__}: {exc})")
            continue
        pred = fit.predict([r.case for r in rs])
        pred["set"] = ["fit" if rid in {r.row_id for r in train} else "predicted" for rid in pred["row_id"]]
        pred["config"] = config
        pred["unmodelled"] = [", ".join(next(r.unmodelled for r in rs if r.row_id == rid)) for rid in pred["row_id"]]
        rows.append(pred)
        fits[config] = fit
        c = fit.coeffs_
        fitted.append(f"| {config} | {c.step_overhead_s * 1e3:.1f} | {c.per_seq_s * 1e6:.0f} | {c.prefill_overhead_s * 1e3:.0f} | "
                      f"{c.frontend_latency_s * 1e3:.0f} | {c.frontend_per_request_s * 1e3:.2f} | {c.compute_efficiency:.2f} | "
                      f"{c.memory_efficiency:.2f} | {c.comm_efficiency:.2f} | {c.attention_rate:.2f}"
                      f"{HELD if fit.fixed else ''} | {'; '.join(fit.warnings()) or '-'} |")
        print(f"{config}: fitted in {time.perf_counter() - t0:.0f} s; loss {fit.loss_:.4f}; {fit.coeffs_}", flush=True)
        print(pred[pred["set"] == "predicted"].groupby("metric")["ape_pct"].median().to_string(), flush=True)
    res = pd.concat(rows, ignore_index=True)
    pred = res[res["set"] == "predicted"]
    lines = ["# Transfer within a configuration: GPUStack's public runs", "", " ".join(__doc__.split("\n\n")[1].split()),
             "", " ".join(__doc__.split("\n\n")[2].split()), "", "## Medians over every predicted run", "", "| metric | median APE | target | runs |", "| --- | --- | --- | --- |"]
    for m, target in TARGETS.items():
        x = pred[pred["metric"] == m]["ape_pct"]
        lines.append(f"| {m} | {x.median():.1f} % | <= {target} % | {len(x)} |")
    # the random workloads are sampled: the same fits, the predicted runs drawn with other seeds
    lines += ["", "Over workload seeds (the fits unchanged, the predicted runs re-drawn; median APE per seed):", "",
              "| seed | " + " | ".join(TARGETS) + " |", "| --- |" + " --- |" * len(TARGETS)]
    per_seed = {}
    for seed in SPREAD_SEEDS:
        parts = []
        for config, fit in fits.items():
            test = [r for r in sorted(by_config[config], key=_load_rank)[N_TRAIN:]]
            fit.seeds = (seed,)
            parts.append(fit.predict([r.case for r in test]))
            fit.seeds = FIT_SEEDS
        ps = pd.concat(parts, ignore_index=True)
        per_seed[seed] = {m: ps[ps["metric"] == m]["ape_pct"].median() for m in TARGETS}
    for seed, med in per_seed.items():
        lines.append(f"| {seed} | " + " | ".join(f"{med[m]:.1f} %" for m in TARGETS) + " |")
    mean = {m: float(np.mean([v[m] for v in per_seed.values()])) for m in TARGETS}
    spread = {m: (min(v[m] for v in per_seed.values()), max(v[m] for v in per_seed.values())) for m in TARGETS}
    lines.append("| mean (min-max) | " + " | ".join(f"{mean[m]:.1f} % ({spread[m][0]:.1f}-{spread[m][1]:.1f})"
                                                     for m in TARGETS) + " |")
    lines += ["", "## Per configuration (median APE over its predicted runs)", "",
              "| configuration | fitted runs | predicted runs | TTFT | TPOT | output tok/s |", "| --- | --- | --- | --- | --- | --- |"]
    for config, g in res.groupby("config", sort=False):
        p = g[g["set"] == "predicted"]
        med = {m: p[p["metric"] == m]["ape_pct"].median() for m in METRICS}
        lines.append(f"| {config} | {g[g['set'] == 'fit']['row_id'].nunique()} | {p['row_id'].nunique()} | "
                     f"{med['mean_ttft_ms']:.1f} % | {med['mean_tpot_ms']:.1f} % | {med['output_throughput']:.1f} % |")
    tr, tr_notes = transfers(by_config, fits, effs, full_fits) if not only else (pd.DataFrame(), [])
    notes += tr_notes
    if len(tr):
        lines += ["", "## Beyond the configuration (median APE, every run predicted)", "",
                  "| transfer | fitted on | predicting | runs | TTFT | TPOT | output tok/s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for (kind, src, cfg), g in tr.groupby(["kind", "source", "config"], sort=False):
            med = {m: g[g["metric"] == m]["ape_pct"].median() for m in METRICS}
            lines.append(f"| {kind} | {src} | {cfg} | {g['row_id'].nunique()} | {med['mean_ttft_ms']:.1f} % | "
                         f"{med['mean_tpot_ms']:.1f} % | {med['output_throughput']:.1f} % |")
        lines += ["", "| transfer | median TTFT | median TPOT | median output tok/s | runs |", "| --- | --- | --- | --- | --- |"]
        for kind, g in tr.groupby("kind", sort=False):
            med = {m: g[g["metric"] == m]["ape_pct"].median() for m in METRICS}
            lines.append(f"| {kind} | {med['mean_ttft_ms']:.1f} % | {med['mean_tpot_ms']:.1f} % | "
                         f"{med['output_throughput']:.1f} % | {g['row_id'].nunique()} |")
    lines += ["", "## Fitted coefficients", "",
              "| configuration | step overhead (ms) | per sequence (us) | prefill overhead (ms) | front end (ms) | "
              "front end per request of a burst (ms) | compute eff. | memory eff. | comm eff. | attention eff. | "
              "the fit's warnings |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
              *fitted]
    lines += ["", "## Every run", "", "| configuration | run | set | metric | measured | predicted | error | not simulated |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in res.iterrows():
        err = (r.predicted - r.measured) / r.measured * 100
        lines.append(f"| {r.config} | {r.row_id} | {r.set} | {r.metric} | {r.measured:.1f} | {r.predicted:.1f} | "
                     f"{err:+.1f} % | {r.unmodelled} |")
    if notes:
        lines += ["", "## Notes", ""] + notes
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
