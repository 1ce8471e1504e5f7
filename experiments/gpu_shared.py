"""One efficiency set per GPU: a new model on a known GPU, predicted with no fit of its own.

For each GPU of calibration/data/gpustack_a100_ascend.csv (A100-SXM-80GB; Ascend 910B) and each
model run on it, the step-time coefficients are fitted once on the runs of every *other* model and
engine on that GPU (leave one model out), and the held-out model's runs are all predicted. Each
training row is timed with its own model spec and TP (calibration.fit.RowCase.step); the fit's
coefficients (efficiencies, per-step and per-request costs) are shared. Training rows are each
configuration's three lowest-load runs, as in experiments/gpustack_transfer.py, without the runs at a
fixed concurrency (their front-end latency behind permits needs a fit by simulation: with ~20 rows
that is hours on 2 cores). The attention kernels' efficiency, which those runs never time, is the
kernel's: each held-out configuration is predicted with the median of the values fitted on every
run of the other models' configurations on its kernel, or, where no other model ran that kernel,
on the same GPU's kernel of the same kind under another engine (experiments/gpustack_transfer.py,
gpu_attention_efficiency). Every figure is out of sample: no run of the held-out model is fitted.

    python experiments/gpu_shared.py      # writes experiments/results/gpu_shared.md
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from calibration.fit import RowCase, StepTimeFit
from calibration.gpustack import METRICS, load, runs

from gpustack_transfer import N_TRAIN, TARGETS, _load_rank, all_run_fits, held_attention, kernel_efficiencies

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "gpu_shared.md"


def _as_row(run, base_model: str, base_tp: int) -> RowCase:
    step = {k: v for k, v, base in (("model", run.model, base_model), ("tp", run.tp, base_tp)) if v != base}
    return RowCase(run.row_id, run.case.measured, run.case.scenario, step=step)


def main() -> None:
    by_gpu: dict[str, dict[str, list]] = {}
    skipped: list[str] = []
    for r in runs(load(), skipped):
        by_gpu.setdefault(r.hardware, {}).setdefault(r.config, []).append(r)
    out, fitted, notes = [], [], [f"- not a run: {why}" for why in skipped]
    every = {c: rs for configs in by_gpu.values() for c, rs in configs.items()}
    effs = kernel_efficiencies(all_run_fits(every), every)
    for hw, configs in by_gpu.items():
        models = sorted({rs[0].model for rs in configs.values()})
        if len(models) < 2:
            continue
        for held in models:
            train_runs = []
            for rs in configs.values():
                if rs[0].model == held or len(rs) < N_TRAIN + 1:
                    continue
                low = sorted(rs, key=_load_rank)[:N_TRAIN]
                train_runs += [r for r in low if "max_concurrency" not in r.case.scenario["workload"]]
            test_runs = [r for rs in configs.values() if rs[0].model == held for r in rs]
            if not train_runs or not test_runs:
                continue
            base = train_runs[0]
            fit = StepTimeFit(model=base.model, hardware=hw, tp=base.tp, metrics=METRICS, seeds=(0,))
            t0 = time.perf_counter()
            try:
                fit.fit([_as_row(r, base.model, base.tp) for r in train_runs])
            except ValueError as exc:  # too few rows for the coefficients: reported, not hidden
                notes.append(f"- {hw}, {held} held out: no fit ({exc})")
                continue
            # each held-out configuration with its kernel's attention efficiency, from the other models
            preds, shared, used = [], fit.coeffs_, set()
            for config in sorted({r.config for r in test_runs}):
                rs = [r for r in test_runs if r.config == config]
                held_eff = held_attention(effs, rs[0], {held})
                fit.coeffs_ = replace(shared, **held_eff)
                used |= set(held_eff.values())
                preds.append(fit.predict([_as_row(r, base.model, base.tp) for r in rs]))
            fit.coeffs_ = shared
            pred = pd.concat(preds, ignore_index=True)
            pred["gpu"], pred["held_out"] = hw, held
            pred["config"] = [next(r.config for r in test_runs if r.row_id == rid) for rid in pred["row_id"]]
            out.append(pred)
            c = fit.coeffs_
            fitted.append(f"| {hw} | {held} | {len(train_runs)} runs of {len({r.model for r in train_runs})} models | "
                          f"{c.step_overhead_s * 1e3:.1f} | {c.per_seq_s * 1e6:.0f} | {c.prefill_overhead_s * 1e3:.0f} | "
                          f"{c.frontend_latency_s * 1e3:.0f} | {c.frontend_per_request_s * 1e3:.2f} | "
                          f"{c.compute_efficiency:.2f} | {c.memory_efficiency:.2f} | {c.comm_efficiency:.2f} | "
                          f"{', '.join(f'{e:.2f}' for e in sorted(used)) or '-'} | {fit.loss_:.4f} |")
            med = pred[pred.metric.isin(METRICS)].groupby("metric").ape_pct.median()
            print(f"{hw}, {held} held out: fitted on {len(train_runs)} runs in {time.perf_counter() - t0:.0f} s; "
                  f"{med.round(1).to_dict()}", flush=True)
    res = pd.concat(out, ignore_index=True)
    res = res[res.metric.isin(METRICS)]
    lines = ["# One efficiency set per GPU: new models on a known GPU", "", " ".join(__doc__.split("\n\n")[1].split()), "",
             "## Medians over every predicted run", "", "| GPU | metric | median APE | target | runs |",
             "| --- | --- | --- | --- | --- |"]
    for hw, g in res.groupby("gpu", sort=False):
        for m, target in TARGETS.items():
            x = g[g.metric == m].ape_pct
            lines.append(f"| {hw} | {m} | {x.median():.1f} % | <= {target} % | {len(x)} |")
    lines += ["", "## By held-out model (median APE over its runs)", "",
              "| GPU | held-out model | runs | TTFT | TPOT | output tok/s |", "| --- | --- | --- | --- | --- | --- |"]
    for (hw, held), g in res.groupby(["gpu", "held_out"], sort=False):
        med = {m: g[g.metric == m].ape_pct.median() for m in METRICS}
        lines.append(f"| {hw} | {held} | {g.row_id.nunique()} | {med['mean_ttft_ms']:.1f} % | {med['mean_tpot_ms']:.1f} % | "
                     f"{med['output_throughput']:.1f} % |")
    lines += ["", "## The shared coefficients of each fit", "",
              "| GPU | held out | fitted on | step overhead (ms) | per sequence (us) | prefill overhead (ms) | front end (ms) | "
              "front end per request of a burst (ms) | compute eff. | memory eff. | comm eff. | attention eff. (the held-out model's kernels) | "
              "training loss |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *fitted]
    lines += ["", "## Every predicted run", "", "| GPU | configuration | run | metric | measured | predicted | error |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in res.iterrows():
        lines.append(f"| {r.gpu} | {r.config} | {r.row_id} | {r.metric} | {r.measured:.1f} | {r.predicted:.1f} | "
                     f"{(r.predicted - r.measured) / r.measured * 100:+.1f} % |")
    if notes:
        lines += ["", "## Not fitted", "", *notes]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
