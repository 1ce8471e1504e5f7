"""The seeds' own studies, regenerated from the calibrated profiles, measured points overlaid.

    python experiments/seed_studies.py      # writes experiments/results/seed_studies/*.png

(a) seed 004: mean TTFT, mean TPOT, median ITL and duration against the token budget, chunked
    prefill on and off (vLLM V0, Qwen2.5-72B GPTQ);
(b) seed 002: vLLM against SGLang on 8x H20 (DeepSeek-R1), TTFT, TPOT and output throughput against
    concurrency, for 128/128 and 256/256;
(c) seed 000: the three unlabelled series on 16 GPUs, each under the deployment hypothesis that fits
    it better (A: 1P1D PD, B and C: SGLang TP16), 3500/1500 rows.

Lines are simulations of each row's scenario file (averaged over the workload seeds its split uses);
markers are the measured values. Rows a split was fitted on are filled markers, predicted rows
hollow ones.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from calibration.splits import load_split, select_rows  # noqa: E402
from sim.config import load_scenario  # noqa: E402
from sim.runner import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "seed_studies"
KEYS = ["mean_ttft_ms", "mean_tpot_ms", "median_itl_ms", "output_throughput", "duration"]


def _sim(job) -> dict:
    path, seed = job
    m = simulate(load_scenario(path, [f"workload.seed={seed}"])).bench.metrics
    return {k: m.get(k, np.nan) for k in KEYS}


def predictions(split_name: str, scenario_dir: str | None = None) -> pd.DataFrame:
    """Measured rows of a split with simulated means (the split's seeds) beside them."""
    sp = load_split(split_name)
    df = select_rows(sp)
    jobs, owners = [], []
    for rid, row in df.iterrows():
        path = ROOT / sp.scenario.format(row_id=rid, **{k: v for k, v in row.items() if k != "row_id"})
        if scenario_dir:
            path = ROOT / scenario_dir / path.name
        for s in sp.seeds:
            jobs.append((str(path), s))
            owners.append(rid)
    with ProcessPoolExecutor() as ex:
        sims = pd.DataFrame(list(ex.map(_sim, jobs)))
    sims["row_id"] = owners
    sim = sims.groupby("row_id").mean().add_prefix("sim_")
    out = df.join(sim)
    out["train"] = out.index.isin(sp.train)
    return out


def _marks(ax, x, y, train, color, label):
    ax.scatter(x[train], y[train], color=color, marker="o", zorder=3, label=f"{label} measured (fitted)")
    ax.scatter(x[~train], y[~train], facecolors="none", edgecolors=color, marker="o", zorder=3,
               label=f"{label} measured (predicted)")


def _save(fig, title: str, name: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    path = OUT / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seed004() -> Path:
    d = predictions("seed004")
    d["mode"] = np.where(d.chunked_prefill.astype(str).str.lower() == "true", "on", "off")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, label) in zip(axes.flat, [("mean_ttft_ms", "mean TTFT (ms)"), ("mean_tpot_ms", "mean TPOT (ms)"),
                                            ("median_itl_ms", "median ITL (ms)"), ("duration_s", "duration (s)")]):
        sim_key = "sim_duration" if key == "duration_s" else f"sim_{key}"
        for mode, color in (("on", "tab:blue"), ("off", "tab:orange")):
            m = d[d["mode"] == mode].sort_values("max_num_batched_tokens")
            ax.plot(m.max_num_batched_tokens, m[sim_key], color=color, label=f"chunked prefill {mode}: simulated")
            _marks(ax, m.max_num_batched_tokens, m[key], m.train.to_numpy(), color, f"{mode}:")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max_num_batched_tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, "Seed 004: vLLM V0, Qwen2.5-72B GPTQ, 1000 ShareGPT requests at once (off: 256/512 reject long ones)",
                 "seed004_budget.png")


def seed002() -> Path:
    v, s = predictions("seed002-vllm"), predictions("seed002-sglang")
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for row, length in enumerate((128, 256)):
        for ax, (key, label) in zip(axes[row], [("mean_ttft_ms", "mean TTFT (ms)"), ("mean_tpot_ms", "mean TPOT (ms)"),
                                                ("output_throughput", "output tok/s")]):
            for d, name, color in ((v, "vLLM 0.8.2", "tab:red"), (s, "SGLang 0.4.4", "tab:green")):
                m = d[d.input_len == length].sort_values("num_prompts")
                ax.plot(m.num_prompts, m[f"sim_{key}"], color=color, label=f"{name}: simulated")
                _marks(ax, m.num_prompts, m[key], m.train.to_numpy(), color, f"{name}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (= prompts)")
            ax.set_ylabel(label)
            ax.set_title(f"{length}/{length}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, "Seed 002: DeepSeek-R1 on 8x H20, vLLM against SGLang",
                 "seed002_vllm_vs_sglang.png")


def seed000() -> Path:
    series = {"A": ("pd", "tab:purple", "A (as 1P1D PD)"), "B": ("tp16", "tab:gray", "B (as SGLang TP16)"),
              "C": ("tp16", "tab:brown", "C (as SGLang TP16)")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for name, (hyp, color, label) in series.items():
        d = predictions(f"seed000-{name}-{hyp}")
        d = d[d.input_len == 3500].sort_values("max_concurrency")
        for ax, (key, ylabel) in zip(axes, [("mean_ttft_ms", "mean TTFT (ms)"), ("mean_tpot_ms", "mean TPOT (ms)"),
                                            ("output_throughput", "output tok/s")]):
            ax.plot(d.max_concurrency, d[f"sim_{key}"], color=color, label=f"{label}: simulated")
            _marks(ax, d.max_concurrency, d[key], d.train.to_numpy(), color, name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("request rate = max concurrency")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    return _save(fig, "Seed 000: DeepSeek-R1 on 16 GPUs, random 3500/1500 (captions lost: deployments are the better-fitting hypotheses)",
                 "seed000_series.png")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for f in (seed004, seed002, seed000):
        print("wrote", f())


if __name__ == "__main__":
    main()
