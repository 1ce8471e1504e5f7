"""Out-of-sample validation: fit on a split's training rows, predict every other row.

`validate(split)` writes, under experiments/results/validation/<split>/:
- predictions.csv: every row and metric, measured vs predicted, with `train` marking fitted rows;
- report.md: the same as tables, per-metric median and max APE over the predicted rows only, the
  fitted parameters with their implied FLOP/s and bytes/s against the hardware peak, warnings;
- <metric>.png: measured points against simulated values per row.
It also writes the fitted profile to calibration/profiles/<profile>.toml, which the split's
scenarios use. Targets in the split file decide the exit status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sim.profile import profiles_dir

from .check import FitCheck, check_fit, check_markdown, identifiability_markdown
from .fit import StepTimeFit
from .splits import ROOT, Split, cases, load_split

RESULTS = ROOT / "experiments" / "results" / "validation"


@dataclass
class ValidationResult:
    split: Split
    fitter: StepTimeFit
    predictions: pd.DataFrame
    summary: pd.DataFrame  # per metric: median/max APE over predicted rows, target, ok
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fit_check: FitCheck | None = None  # the fit on its own training rows (calibration.check)

    @property
    def ok(self) -> bool:
        """Every out-of-sample target met (the fit's own check is `fit_check.ok`)."""
        return not self.failures


def _kv_line(f: StepTimeFit) -> str:
    if not f.kv_cache_tokens_:
        return "as stated in the scenarios"
    if f.kv_prior:
        return (f"{f.kv_cache_tokens_} tokens (the engine's memory formula gives {f.kv_prior}; "
                "the fit checks the training rows agree)")
    return f"{f.kv_cache_tokens_} tokens (fitted)"


def fitter_for(split: Split, processes: int | None = None, progress: bool = False) -> StepTimeFit:
    """The fit a split asks for (model, hardware candidates, metrics, seeds, KV bounds), unfitted."""
    return StepTimeFit(model=split.model, hardware=split.hardware, tp=split.tp, metrics=split.metrics,
                       seeds=split.seeds, kv_bounds=split.kv_bounds, kv_prior=split.kv_prior_tokens(),
                       by_simulation=split.fit_by_simulation, fixed=dict(split.fixed), processes=processes,
                       progress=progress)


def validate(split_name: str, processes: int | None = None, progress: bool = True,
             write_profile: bool = True, out_dir: Path | None = None, interval: float | None = None,
             interval_draws: int = 20) -> ValidationResult:
    """Fit a split's training rows, predict every row; with `interval` (a coverage, e.g. 0.9),
    also each predicted row's interval and how often the measured values fall inside."""
    t0 = time.perf_counter()
    split = load_split(split_name)
    all_cases, _ = cases(split)
    train = [c for c in all_cases if c.row_id in split.train]
    fitter = fitter_for(split, processes, progress)
    fitter.fit(train)
    pred = fitter.predict(all_cases)
    pred["train"] = pred["row_id"].isin(split.train)
    held = pred[~pred["train"]]
    assert not set(held["row_id"]) & set(split.train)  # never report a fitted row as a prediction
    if interval is not None:
        from .interval import case_intervals

        iv = case_intervals(fitter, [c for c in all_cases if c.row_id not in split.train], interval,
                            interval_draws, processes, progress)
        pred = pred.merge(iv, on=["row_id", "metric"], how="left")
        held = pred[~pred["train"]]

    rows, failures = [], []
    for m in split.metrics:
        ape = held.loc[held["metric"] == m, "ape_pct"]
        target = split.targets.get(m)
        med = float(ape.median()) if len(ape) else float("nan")
        ok = target is None or (len(ape) > 0 and med <= target)
        rows.append({"metric": m, "predicted_rows": len(ape), "median_ape_pct": med,
                     "max_ape_pct": float(ape.max()) if len(ape) else float("nan"),
                     "target_median_ape_pct": target, "ok": ok})
        if interval is not None:
            inside = held.loc[held["metric"] == m, "inside"].dropna()
            rows[-1][f"inside_{interval * 100:g}pct_interval"] = \
                f"{int(inside.sum())}/{len(inside)}" if len(inside) else "-"

        if not ok:
            failures.append(f"{split.name}: {m} median APE {med:.1f} % > target {target} %")
    for rid, (measured, tol) in split.count_targets.items():
        got = pred[(pred["row_id"] == rid) & (pred["metric"] == "successful_requests")]["predicted"]
        if got.empty or abs(float(got.iloc[0]) - measured) > tol:
            val = float(got.iloc[0]) if not got.empty else float("nan")
            failures.append(f"{split.name}: {rid} completed {val:.1f}, measured {measured} ± {tol}")
    summary = pd.DataFrame(rows)
    res = ValidationResult(split, fitter, pred, summary, failures, time.perf_counter() - t0,
                           check_fit(fitter, train, pred=pred))

    if write_profile and split.profile:  # (a transfer split writes none: its fit is another split's)
        prof = fitter.to_profile(split.profile, {
            "data_source": f"calibration/data/{split.table.name}",
            "split": f"calibration/splits/{split.name}.toml",
            "rows_fitted": list(split.train),
            "metrics_fitted": list(split.metrics),
            "workload_seeds": list(split.seeds),
        })
        prof.save(profiles_dir() / f"{split.profile}.toml")
    write_report(res, out_dir or RESULTS / split.name)
    return res


def write_report(res: ValidationResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sp, f = res.split, res.fitter
    res.predictions.to_csv(out / "predictions.csv", index=False)
    st = f.step_model()
    implied = st.implied()
    lines = [
        f"# Validation: {sp.name}",
        "",
        f"Table `calibration/data/{sp.table.name}`, split `calibration/splits/{sp.name}.toml`. "
        f"Model `{sp.model}`, TP {sp.tp}. Workload seeds {list(sp.seeds)} (predictions are their mean).",
        "",
        f"**Fitted on:** {', '.join(sp.train)}.  ",
        f"**Predicted (never seen by the fit):** "
        f"{', '.join(sorted(set(res.predictions.row_id) - set(sp.train), key=_natural))}.",
        "",
        "## Out-of-sample error (predicted rows only)",
        "",
        "| metric | rows | median APE % | max APE % | target (median) | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in res.summary.iterrows():
        tgt = "–" if r["target_median_ape_pct"] is None or pd.isna(r["target_median_ape_pct"]) else f"≤ {r['target_median_ape_pct']:g}"
        lines.append(f"| {r['metric']} | {r['predicted_rows']} | {r['median_ape_pct']:.1f} | {r['max_ape_pct']:.1f} "
                     f"| {tgt} | {'yes' if r['ok'] else 'NO'} |")
    cov = [c for c in res.summary.columns if c.startswith("inside_")]
    if cov:
        pct = cov[0].removeprefix("inside_").removesuffix("pct_interval")
        lines += ["", f"Predicted rows whose measured value falls inside their {pct} % prediction interval "
                  "(`calibration/interval.py`: coefficients drawn from the fit's covariance, other workload seeds, "
                  "the training rows' residual error): " + ", ".join(
                      f"{r['metric']} {r[cov[0]]}" for _, r in res.summary.iterrows()) + "."]
    if res.failures:
        lines += ["", "Missed: " + "; ".join(res.failures)]
    lines += ["", "## Fitted parameters", "",
              f"Hardware: `{f.hardware_}`" + (f" (candidates: {', '.join(f.candidates_hw())})" if len(f.candidates_) > 1 else ""),
              f"KV cache: {_kv_line(f)}",
              f"Training loss (mean squared log ratio): {f.loss_:.5f}", "",
              "| parameter | value |", "| --- | --- |"]
    for k, v in f.coeffs_.as_dict().items():
        if k == "comm_efficiency" and sp.tp == 1:
            continue
        lines.append(f"| {k} | {v:.4g}{' (held, not fitted: the split sets it)' if k in f.fixed else ''} |")
    lines += ["", f"Implied: {implied['achieved_tflops_per_device']:.0f} of {implied['peak_tflops_per_device']:.0f} "
              f"TFLOP/s per device, {implied['achieved_hbm_gbps']:.0f} of {implied['peak_hbm_gbps']:.0f} GB/s HBM "
              "(the memory figure is a ceiling the fit never needed when every step is compute-bound)."]
    ties = f.indistinguishable()
    if len(ties) > 1:
        lines += ["", "Not identifiable from these rows: " + ", ".join(
            f"{c['hardware']}" + (f" with KV {c['kv_cache_tokens']}" if c["kv_cache_tokens"] else "")
            for c in ties) + " fit within 2 % of the best training loss. Among ties the fit keeps the first "
            "hardware listed and " + ("the KV capacity nearest the engine's memory formula" if f.kv_prior
                                      else "the smallest KV capacity (the least memory that explains the rows)")
            + "; that is a rule, not evidence."]
    lines += [""] + check_markdown(res.fit_check) + [""] + identifiability_markdown(f)
    lines += ["", "## Every row", "", "| row | set | metric | measured | predicted | APE % |",
              "| --- | --- | --- | --- | --- | --- |"]
    p = res.predictions
    for rid in sorted(p.row_id.unique(), key=_natural):
        for _, r in p[(p.row_id == rid) & p.metric.isin(list(sp.metrics) + ["successful_requests"])].iterrows():
            lines.append(f"| {rid} | {'fit' if r['train'] else 'predicted'} | {r['metric']} | {r['measured']:.2f} "
                         f"| {r['predicted']:.2f} | {r['ape_pct']:.1f} |")
    lines += ["", f"Reproduce: `servesim validate {sp.name}` ({res.seconds:.0f} s on the machine that wrote this)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plots(res, out)


def _natural(s: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _plots(res: ValidationResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = res.predictions
    for m in res.split.metrics:
        d = p[p.metric == m].copy()
        d = d.iloc[sorted(range(len(d)), key=lambda i: _natural(d.row_id.iloc[i]))]
        x = np.arange(len(d))
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(d) + 2), 4))
        ax.plot(x, d.predicted, "-", color="tab:blue", label="simulated", zorder=1)
        tr = d.train.to_numpy()
        ax.scatter(x[tr], d.measured[tr], marker="s", color="tab:gray", label="measured (fitted)", zorder=2)
        ax.scatter(x[~tr], d.measured[~tr], marker="o", color="tab:red", label="measured (predicted)", zorder=2)
        ax.set_xticks(x)
        ax.set_xticklabels(d.row_id, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(m)
        if d.measured.max() / max(d.measured.min(), 1e-9) > 30:
            ax.set_yscale("log")
        ax.set_title(f"{res.split.name}: {m}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{m}.png", dpi=110)
        plt.close(fig)
