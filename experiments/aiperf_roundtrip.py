"""Calibrate from a real benchmark client's result files: AIPerf against `servesim serve`.

A known profile (the round trip's: Llama-3.1-8B on one H100, vLLM V1) is served on localhost at
time scale 1. AIPerf, installed from the package index, benchmarks it at several concurrencies,
each run writing its own artifact directory (`profile_export.jsonl`, one record per request, and
`profile_export_aiperf.json`, its report). `servesim calibrate --table` on the directory that
holds the training runs fits a profile from AIPerf's per-request records alone; `servesim
predict` then replays every run, the held-out one included, and compares with AIPerf's own
numbers. The known profile is replayed on every run too: what it misses is what the live
server and client add.

What is measured here includes what a real deployment adds and the simulation does not: HTTP,
SSE framing, JSON and AIPerf's own timing on a busy 2-core machine. The fit absorbs the constant
part of it in its front-end latency.

    python experiments/aiperf_roundtrip.py              # 4 runs x 3 workload seeds, ~4 min
    python experiments/aiperf_roundtrip.py --small      # what the test runs: 3 runs, 1 seed
    # writes experiments/results/aiperf_roundtrip.md (full size only)

AIPerf comes from `SERVESIM_AIPERF` (its executable) or `.venv-client/bin/aiperf`; see `.ci/run`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "aiperf_roundtrip.md"

sys.path.insert(0, str(ROOT / "experiments"))
from roundtrip import CASES, TRUE  # noqa: E402  (the round trip's known profile and its first case)

ENGINE = CASES[0].engine()
MODEL, HARDWARE, TP = CASES[0].model, CASES[0].hardware, CASES[0].tp
SERVED = MODEL  # the model name the server answers to
# Each run: its name (the artifact directory's), AIPerf's load flags, requests, and whether the fit
# sees it. The fit sees the lightest and the heaviest closed loop; it predicts a closed loop in
# between and an open loop (Poisson arrivals) it has no example of.
RUNS = [("c1", ["--concurrency", "1"], 24, True), ("c24", ["--concurrency", "24"], 96, True),
        ("c8", ["--concurrency", "8"], 64, False),
        ("poisson12", ["--request-rate", "12", "--arrival-pattern", "poisson"], 96, False)]
SMALL = RUNS[:3]
ISL, ISL_SD, OSL, OSL_SD = 600, 200, 64, 24
METRICS = ["mean_ttft_ms", "mean_tpot_ms", "median_itl_ms", "mean_e2e_ms", "output_throughput"]


def aiperf_exe() -> str | None:
    exe = os.environ.get("SERVESIM_AIPERF") or str(ROOT / ".venv-client" / "bin" / "aiperf")
    return exe if os.path.exists(exe) else None


def word_level_tokenizer(path: Path) -> Path:
    """A tokenizer both sides count with (AIPerf cannot fetch one without the network): every
    whitespace-separated word is one token, unknown words `[UNK]`, which is itself one token."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab={"[UNK]": 0, "the": 1, "and": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["[UNK]"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "unk_token": "[UNK]"}))
    return path


@contextlib.contextmanager
def served(scenario: Path, tokenizer: Path, name: str | None = None):
    """`servesim serve` at time scale 1 with the tokenizer AIPerf counts with; yields its address
    as AIPerf's --url takes it (host:port)."""
    from sim.serve import server_process

    args = ["--time-scale", "1", "--tokenizer", str(tokenizer)] + (["--served-model-name", name] if name else [])
    with server_process(scenario, *args) as server:
        yield server.url.removeprefix("http://")


def run_aiperf(url: str, model: str, tokenizer: Path, artifacts: Path, load: list[str], *, requests: int,
               isl: int, isl_sd: int, osl: int, osl_sd: int, seed: int = 0, timeout_s: float = 600) -> dict:
    """One `aiperf profile` run (streaming completions, EOS ignored); returns its report."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    cmd = [aiperf_exe(), "profile", "--model", model, "--url", url, "--endpoint-type", "completions", "--streaming",
           "--request-count", str(requests), *load,
           "--synthetic-input-tokens-mean", str(isl), "--synthetic-input-tokens-stddev", str(isl_sd),
           "--output-tokens-mean", str(osl), "--output-tokens-stddev", str(osl_sd), "--random-seed", str(seed),
           "--tokenizer", str(tokenizer), "--extra-inputs", "ignore_eos:true", "--artifact-dir", str(artifacts)]
    run = subprocess.run(cmd, cwd=artifacts.parent, env=env, capture_output=True, text=True, timeout=timeout_s)
    if run.returncode != 0:
        raise RuntimeError(f"aiperf exited {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads((artifacts / "profile_export_aiperf.json").read_text())


def known_coefficients(slowdown: float = 1.0) -> dict:
    """The known profile's coefficients, its every step and its front end `slowdown` times as
    long: a step is fixed times plus work over efficiencies, so the times scale up and the
    efficiencies down. A slower engine gives a live server more wall time per token it sends."""
    return {k: v / slowdown if k.endswith("_efficiency") else v * slowdown for k, v in TRUE.items()}


def write_known(work: Path, slowdown: float = 1.0) -> tuple[Path, Path]:
    """The known profile, and the scenario that serves it."""
    prof = work / "known.toml"
    prof.write_text(f'[profile]\nname = "known"\nmodel = "{MODEL}"\nhardware = "{HARDWARE}"\ntp = {TP}\n\n'
                    "[coefficients]\n"
                    + "".join(f"{k} = {v!r}\n" for k, v in known_coefficients(slowdown).items()))
    scenario = work / "served.toml"
    scenario.write_text(_engine_toml() + f'\n[step_time]\nprofile = "{prof}"\n')
    return prof, scenario


def _engine_toml() -> str:
    return ("[engine]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in ENGINE.items())
            + '\n[workload]\nclient = "vllm"\n')


def _cli(args: list[str]) -> str:
    from sim.cli import main as servesim

    with contextlib.redirect_stdout(io.StringIO()) as log:
        rc = servesim(args)
    if rc != 0:
        raise RuntimeError(f"servesim {args[0]} exited {rc}\n{log.getvalue()}")
    return log.getvalue()


def one(seed: int, work: Path, runs=RUNS, slowdown: float = 1.0) -> dict:
    """Record the runs, fit on those marked for it, predict all. Returns the errors (percent) of
    the fitted and of the known profile against AIPerf's numbers, per run and metric."""
    tok = word_level_tokenizer(work / "tokenizer")
    known, scenario = write_known(work, slowdown)
    train, held = work / "train", work / "held-out"
    reports = {}
    t0 = time.perf_counter()
    with served(scenario, tok, SERVED) as url:
        for name, load, n, fit in runs:
            art = (train if fit else held) / name
            art.parent.mkdir(exist_ok=True)
            reports[name] = run_aiperf(url, SERVED, tok, art, load, requests=n, isl=ISL, isl_sd=ISL_SD, osl=OSL,
                                       osl_sd=OSL_SD, seed=seed)
    record_s = time.perf_counter() - t0
    base = work / "base.toml"
    base.write_text(_engine_toml())
    prof = work / "fitted.toml"
    t0 = time.perf_counter()
    _cli(["calibrate", "--table", str(train), "--base", str(base), "--model", MODEL, "--hardware", HARDWARE,
          "--tp", str(TP), "--out", str(prof), "--no-progress"])
    fit_s = time.perf_counter() - t0
    rows = []
    for check, table in (("reproduce", train), ("predict", held)):
        for name, p in (("fitted", prof), ("known", known)):
            csv = work / f"{check}-{name}.csv"
            _cli(["predict", "--profile", str(p), "--table", str(table), "--base", str(base), "--output", str(csv),
                  "--no-progress"])
            df = pd.read_csv(csv)
            df = df[df["metric"].isin(METRICS)].assign(seed=seed, check=check, profile=name)
            rows.append(df.assign(error_pct=(df.predicted / df.measured - 1) * 100)[
                ["seed", "check", "row_id", "profile", "metric", "measured", "predicted", "error_pct"]])
    from sim.profile import load_profile

    return {"errors": pd.concat(rows, ignore_index=True), "record_s": record_s, "fit_s": fit_s, "reports": reports,
            "fitted": load_profile(str(prof)).coeffs.as_dict()}


# steps the runs are made of: one decode alone, 24 decodes, and a prompt's prefill
_STEPS = {"decode step, 1 request at 660 tokens": dict(num_seqs=1, decode_seqs=1, decode_ctx_tokens=660),
          "decode step, 24 requests at 660 tokens": dict(num_seqs=24, decode_seqs=24, decode_ctx_tokens=24 * 660),
          "prefill step, 600 tokens": dict(num_seqs=1, prefill_tokens=600, prefill_attn_pairs=600 * 601 / 2)}


def _step_ms(coeffs: dict, shape: dict) -> float:
    from sim.perf_model import RooflineCoefficients, RooflineStepTime, load_hardware_spec, load_model_spec
    from sim.step_time import BatchShape

    known = {k: v for k, v in coeffs.items() if k in RooflineCoefficients.__dataclass_fields__}
    st = RooflineStepTime(load_model_spec(MODEL), load_hardware_spec(HARDWARE), TP, RooflineCoefficients(**known))
    return 1000 * st.step_time(BatchShape(**shape))


def markdown(df: pd.DataFrame, fits: list[dict], seeds: list[int], record_s: list[float], fit_s: list[float]) -> str:
    g = df.assign(gap=df.measured - df.predicted).groupby(["check", "row_id", "profile", "metric"], sort=False)
    s = pd.DataFrame({"error": g.error_pct.mean(), "lo": g.error_pct.min(), "hi": g.error_pct.max(),
                      "gap_ms": g.gap.mean()}).reset_index()
    runs = ", ".join(f"{name} ({' '.join(load)}, {n} requests, {'fitted' if fit else 'predicted'})"
                     for name, load, n, fit in RUNS)
    lines = ["# Calibrating from AIPerf's result files: a round trip through a real client", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Runs: {runs}. Prompts {ISL} ± {ISL_SD} tokens, outputs {OSL} ± {OSL_SD} (EOS ignored), streaming "
             f"completions. Workload seeds {seeds} (AIPerf's --random-seed). Recording took {min(record_s):.0f}-"
             f"{max(record_s):.0f} s per seed, `servesim calibrate` {min(fit_s):.0f}-{max(fit_s):.0f} s.", "",
             "Errors are (predicted - AIPerf's) / AIPerf's, in percent: mean over seeds (min..max). `fitted` is the "
             "profile calibrated on the fitted runs' profile_export.jsonl; `known` is the profile the server ran, so "
             "its error is what HTTP, SSE, tokenising and AIPerf's own timing add (the last column, in ms, "
             "for latencies).", "",
             "| check | run | profile | metric | error % | min..max | AIPerf - predicted, ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in s.iterrows():
        gap = f"{r.gap_ms:+.2f}" if r.metric.endswith("_ms") else ""
        lines.append(f"| {r.check} | {r.row_id} | {r.profile} | {r.metric} | {r.error:+.2f} | {r.lo:+.2f}..{r.hi:+.2f} "
                     f"| {gap} |")
    lines += ["", "Coefficients, known and fitted per seed:", "", "| coefficient | known | " +
              " | ".join(f"seed {k}" for k in seeds) + " |", "| --- | --- |" + " --- |" * len(seeds)]
    for k, v in TRUE.items():
        lines.append(f"| {k} | {v:g} | " + " | ".join(f"{f[k]:.4g}" for f in fits) + " |")
    for label, shape in _STEPS.items():
        lines.append(f"| {label}, ms | {_step_ms(TRUE, shape):.3f} | "
                     + " | ".join(f"{_step_ms(f, shape):.3f}" for f in fits) + " |")
    lines += ["", "The coefficients move more than the steps do: a step's fixed overhead and its weight read (the "
              "weights' bytes over the bandwidth times memory_efficiency) are both paid once per step, whatever "
              "is in the batch, so runs like these pin their sum, which is the decode step. TTFT pins the sum of "
              "the front end's latency and a prompt's prefill step, not each: the fitted latency sits a few ms "
              "above the known one, which takes in the HTTP, SSE and tokenising time that the known profile's TTFT "
              "misses (the `known` rows' last column)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="one workload seed, three runs, no results file")
    ap.add_argument("--keep", type=Path, help="keep every run's files in this directory")
    args = ap.parse_args()
    if aiperf_exe() is None:
        sys.exit("AIPerf is not installed: python3 -m venv .venv-client && .venv-client/bin/pip install aiperf")
    seeds = [0] if args.small else [0, 1, 2]
    results = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.keep / f"seed{seed}" if args.keep else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            results.append(one(seed, work, SMALL if args.small else RUNS))
        print(f"seed {seed}: recorded in {results[-1]['record_s']:.0f} s, fitted in {results[-1]['fit_s']:.0f} s")
    df = pd.concat([r["errors"] for r in results], ignore_index=True)
    text = markdown(df, [r["fitted"] for r in results], seeds, [r["record_s"] for r in results],
                    [r["fit_s"] for r in results])
    if not args.small:
        OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
