"""`servesim` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the simulator is imported once the arguments are parsed: `--help` starts fast
    from .runner import SimResult


def _load_simulator() -> None:
    """Import what the commands use (numpy, the simulator) into this module; pandas is imported
    by the commands that print or read tables (a run that prints its report starts without it)."""
    global np, ScenarioError, load_scenario, SimulationStuck, format_report, result_json, \
        sglang_result_json, stage_table, traffic_lines, simulate, WorkloadError, trace_skipped
    import numpy as np

    from .config import ScenarioError, load_scenario
    from .engine import SimulationStuck
    from .metrics import format_report, result_json, sglang_result_json, stage_table, traffic_lines
    from .runner import simulate
    from .workload import WorkloadError, trace_skipped


def _result_json(res: SimResult, detailed: bool) -> dict:
    """The client's result JSON (vLLM's, or SGLang's JSONL line), plus a `servesim` section."""
    sc, w = res.scenario, res.scenario.workload
    if w.client == "sglang":
        out = sglang_result_json(res.bench, {
            "backend": "sglang", "dataset_name": w.dataset_name,
            "request_rate": "inf" if math.isinf(w.request_rate) else w.request_rate,
            "max_concurrency": w.max_concurrency, "sharegpt_output_len": w.sharegpt_output_len,
            "random_input_len": w.random_input_len, "random_output_len": w.random_output_len,
            "random_range_ratio": w.resolved_range_ratio})
        out["servesim"] = _servesim_section(res)
        return out
    header = {"date": datetime.now().strftime("%Y%m%d-%H%M%S")}
    if w.client != "vllm-legacy":
        header.update(endpoint_type="openai", label=None)
    header.update(
        backend="vllm",
        model_id=sc.name,
        tokenizer_id=sc.name,
        num_prompts=len(res.requests),
        request_rate="inf" if math.isinf(w.request_rate) else w.request_rate,
        burstiness=w.burstiness,
        max_concurrency=w.max_concurrency,
    )
    out = result_json(res.bench, w.client, header, res.requests if detailed else None)
    out["servesim"] = _servesim_section(res)
    return out


def _servesim_section(res: SimResult) -> dict:
    sc = res.scenario
    return {
        "simulated": True,
        "scenario": sc.name,
        "engine": sc.engine.model_dump(),
        "step_time": _engine_step_model(sc).describe(),
        "num_steps": res.num_steps,
        "num_preemptions": res.num_preemptions,
        "max_batch_tokens": res.max_batch_tokens,
        "max_batch_seqs": res.max_batch_seqs,
        "peak_kv_blocks": res.peak_kv_blocks,
    }


def _overlap_note(e) -> str:
    if not e.step_facts().overlap:
        return ""
    return ", async scheduling" if e.scheduler != "sglang" else ", overlap scheduler"


def _engine_step_model(sc):
    """The step-time model as the engine uses it: with its CUDA graphs and CPU/GPU overlap."""
    model = sc.step_time.build()
    with_facts = getattr(model, "with_facts", None)
    return with_facts(sc.engine.step_facts()) if with_facts is not None else model


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"workload.seed={args.seed}")
    return overrides


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    if args.percentile_metrics:
        overrides.append(f'report.percentile_metrics="{args.percentile_metrics}"')
    if args.metric_percentiles:
        overrides.append(f'report.metric_percentiles="{args.metric_percentiles}"')
    for slo in args.goodput or []:
        key, _, ms = slo.partition(":")
        overrides.append(f"report.goodput.{key}={ms}")
    sc = load_scenario(args.scenario, overrides)
    res = simulate(sc, record_steps=bool(args.output_timeseries), keep_token_times=args.save_detailed or None)
    e = sc.engine
    if not args.quiet:
        print(f"Scenario: {sc.name}  ({e.scheduler}, chunked prefill "
              f"{'on' if e.enable_chunked_prefill else 'off'}, max_num_batched_tokens "
              f"{e.max_num_batched_tokens}, max_num_seqs {e.max_num_seqs}, max_model_len {e.max_model_len}"
              f"{_overlap_note(e)})")
        model = sc.step_time.build()
        if not model.calibrated:
            print(f"WARNING: step time uses {model.source}; latencies are illustrative, not predictions.")
        else:
            print(f"Step time: {model.source}")
        for line in traffic_lines(res.bench, sc.workload):
            print(line)
        if sc.workload.dataset_name in ("trace", "mooncake"):
            skipped = trace_skipped(sc.workload.trace_path, sc.workload.trace_stage)
            if skipped:
                print(f"  ({skipped} requests the trace records as failed, with no length, are not replayed)")
    w = sc.workload
    print(format_report(res.bench, w.client, w.max_concurrency, w.request_rate))
    if w.stages is not None and not args.quiet:
        print(stage_table(res.bench))
    if not args.quiet:
        hits = (f", prefix cache hit rate {100 * res.prefix_hit_tokens / res.prefix_query_tokens:.1f} % "
                f"({res.prefix_hit_tokens} of {res.prefix_query_tokens} prompt tokens looked up)"
                if res.prefix_query_tokens else "")
        print(f"(simulated: {res.num_steps} engine steps, {res.num_preemptions} preemptions, "
              f"peak KV {res.peak_kv_blocks} blocks on the fullest instance{hits})")
    if args.output_timeseries:
        from .timeseries import plot_timeseries, timeseries

        ts = timeseries(res, args.timeseries_interval)
        ts.to_csv(args.output_timeseries, index=False, float_format="%.6g")
        png = Path(args.output_timeseries).with_suffix(".png")
        plot_timeseries(ts, png, title=sc.name)
        print(f"wrote {args.output_timeseries} and {png}")
    if args.output_json:
        data = _result_json(res, args.save_detailed)
        # SGLang's client writes one JSON line per run (JSONL); vLLM's a JSON document
        text = json.dumps(data) + "\n" if sc.workload.client == "sglang" else json.dumps(data, indent=2)
        Path(args.output_json).write_text(text)
    if args.output_requests:
        res.bench.requests.to_csv(args.output_requests, index=False)
    if args.interval is not None:
        from calibration.interval import format_interval, scenario_interval

        iv = scenario_interval(sc, args.interval / 100, args.interval_draws, progress=not args.quiet)
        print(format_interval(iv, args.interval / 100, args.interval_draws))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from calibration.splits import splits_dir
    from calibration.validate import validate

    names = args.splits or sorted(p.stem for p in splits_dir().glob("*.toml"))
    failed = []
    for name in names:
        res = validate(name, processes=args.processes, progress=not args.no_progress,
                       write_profile=not args.no_profile,
                       interval=None if args.interval is None else args.interval / 100,
                       interval_draws=args.interval_draws)
        print(f"== {name}: fitted on {', '.join(res.split.train)}; hardware {res.fitter.hardware_}"
              + (f", KV {res.fitter.kv_cache_tokens_} tokens" if res.fitter.kv_cache_tokens_ else "")
              + f"; {res.seconds:.0f} s")
        p = res.predictions
        shown = p[p.metric.isin(list(res.split.metrics) + ["successful_requests"])]
        print(shown.assign(set=np.where(shown.train, "fit", "predicted"))[
            ["row_id", "set", "metric", "measured", "predicted", "ape_pct"]].to_string(index=False, float_format="%.2f"))
        print(res.summary.to_string(index=False, float_format="%.1f"))
        for f in res.failures:
            print(f"MISSED: {f}")
        for f in res.fit_check.failures:
            print(f"POOR FIT: {f}")
        failed += res.failures + ([] if args.allow_poor_fit else res.fit_check.failures)
    return 1 if failed else 0


def _row_cases(table: str, rows: str | None, base_path: str):
    """The measured rows of a table (any format calibration.tables reads), each with the scenario
    that reproduces it: a per-request run replays its own requests; an aggregate row takes its
    columns over the base scenario."""
    import pandas as pd

    from calibration.fit import SIM_KEY, RowCase
    from calibration.rows import row_to_scenario
    from calibration.tables import load_table
    from sim.config import _read_toml

    _load_simulator()  # (also called on its own, by tests)

    df = load_table(table)
    if rows:
        df = df.query(rows)
    if df.empty:
        raise ScenarioError(f"--rows {rows!r} selects no row of {table}")
    base = _read_toml(Path(base_path))
    base.pop("step_time", None)
    cases = []
    for i, row in df.iterrows():
        measured = {m: float(row[m]) for m in SIM_KEY if m in row and not pd.isna(row[m])}
        cases.append(RowCase(str(row.get("run_id", i)), measured, row_to_scenario(row, base)))
    return cases


def _fixed(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ScenarioError(f"--fix {item!r}: expected NAME=VALUE, e.g. frontend_latency_s=0.02") from None
    return out


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from calibration.check import check_fit, check_markdown, format_check, identifiability_markdown
    from calibration.fit import CALIBRATE_METRICS, StepTimeFit

    cases = _row_cases(args.table, args.rows, args.base)
    if args.metrics:
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    else:
        metrics = tuple(m for m in CALIBRATE_METRICS if any(m in c.measured for c in cases))
    kv = tuple(int(x) for x in args.kv_bounds.split(",")) if args.kv_bounds else None
    hw = args.hardware.split(",") if "," in args.hardware else args.hardware
    fitter = StepTimeFit(model=args.model, hardware=hw, tp=args.tp, seeds=tuple(range(args.seeds)), metrics=metrics,
                         kv_bounds=kv, fixed=_fixed(args.fix), processes=args.processes, progress=not args.no_progress)
    fitter.fit(cases)
    check = check_fit(fitter, cases)
    out = Path(args.out) if args.out.endswith(".toml") else Path.cwd() / f"{args.out}.toml"
    report = out.with_suffix(".report.md")
    prof = fitter.to_profile(out.stem, {"data_source": str(args.table), "rows_fitted": [c.row_id for c in cases],
                                        "row_filter": args.rows or "all", "metrics_fitted": list(fitter.metrics),
                                        "fixed": fitter.fixed, "poor_fit": check.failures})
    report.write_text("\n".join([f"# Calibration: {out.stem}", "", f"Data `{args.table}`, rows: "
                                  f"{', '.join(c.row_id for c in cases)}. Model `{args.model}`, hardware "
                                  f"`{fitter.hardware_}`, TP {args.tp}.", "", "```toml", prof.to_toml().rstrip(), "```",
                                  "", *check_markdown(check), "", *identifiability_markdown(fitter)]) + "\n")
    print(prof.to_toml())
    print(format_check(check))
    if check.ok or args.allow_poor_fit:
        prof.save(out)
        print(f"wrote {out} and {report}")
        return 0
    print(f"servesim: error: poor fit, profile not written (see {report}); --allow-poor-fit writes it anyway",
          file=sys.stderr)
    return 1


def _cmd_predict(args: argparse.Namespace) -> int:
    """Every row of a measured table predicted from a profile, measured against predicted."""
    import pandas as pd

    from calibration.fit import SIM_KEY, StepTimeFit
    from sim.profile import load_profile

    prof = load_profile(args.profile)
    cases = _row_cases(args.table, args.rows, args.base)
    f = StepTimeFit(model=prof.model, hardware=prof.hardware, tp=prof.tp, seeds=tuple(range(args.seeds)),
                    processes=args.processes, progress=not args.no_progress)
    f.coeffs_, f.hardware_, f.kv_cache_tokens_ = prof.coeffs, prof.hardware, prof.kv_cache_tokens
    pred = f.predict(cases)
    wanted = [m.strip() for m in args.metrics.split(",")] if args.metrics else [m for m in SIM_KEY if m.endswith("_ms")
                                                                                  or m.endswith("throughput")]
    pred = pred[pred["metric"].isin(wanted)]
    print(f"Profile {prof.name} ({prof.model} on {prof.hardware}, TP {prof.tp}): {len(cases)} rows of {args.table}")
    with pd.option_context("display.width", 200, "display.max_rows", 10000):
        print(pred.assign(error_pct=(pred.predicted - pred.measured) / pred.measured * 100)[
            ["row_id", "metric", "measured", "predicted", "error_pct"]].to_string(index=False, float_format="%.2f"))
    summary = pred.groupby("metric")["ape_pct"].agg(["median", "max"]).rename(
        columns={"median": "median_ape_pct", "max": "max_ape_pct"})
    print(summary.to_string(float_format="%.1f"))
    if args.output:
        pred.to_csv(args.output, index=False)
    return 0


def _cmd_timeline(args: argparse.Namespace) -> int:
    from .timeline import plot_timeline, write_trace

    sc = load_scenario(args.scenario, _overrides(args))
    res = simulate(sc, record_steps=True)
    write_trace(res, args.out)
    print(f"wrote {args.out} ({res.num_steps} steps, {len(res.requests)} requests): open it in ui.perfetto.dev")
    if args.png:
        plot_timeline(res, args.png, seconds=args.seconds, max_requests=args.requests, title=sc.name)
        print(f"wrote {args.png}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import pandas as pd

    from .sweep import parse_grid, sweep, write_outputs

    runs, summary = sweep(args.scenario, args.grid, seeds=args.seeds, slos=args.slo, base_set=args.set,
                          processes=args.processes, dask=args.dask_scheduler, progress=not args.no_progress)
    keys = [k for k, _ in parse_grid(args.grid)]
    out = Path(args.out)
    files = write_outputs(runs, summary, keys, out, args.slo)
    cols = [*keys, "mean_ttft_ms", "mean_ttft_ms_ci95", "mean_itl_ms", "mean_itl_ms_ci95", "output_throughput",
            "output_throughput_ci95"] + (["request_goodput", "request_goodput_ci95"] if args.slo else [])
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary[cols].round(2).to_string(index=False))
    if args.slo:
        best = summary.loc[summary.request_goodput.idxmax()]
        print(f"best under {', '.join(args.slo)}: " + ", ".join(f"{k}={best[k]}" for k in keys)
              + f" (goodput {best.request_goodput:.3f} ± {best.request_goodput_ci95:.3f} req/s)")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, format_table

    df = compare(args.baseline, args.candidate, args.suite, args.seeds, args.tolerance, args.processes,
                 progress=not args.no_progress)
    print(format_table(df, args.baseline, args.candidate, args.tolerance, args.seeds))
    if args.output:
        df.to_csv(args.output, index=False)
    return 1 if (df.verdict == "WORSE").any() else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import load_eos_lengths, serve
    except ImportError as exc:  # the server's packages are an optional extra
        raise ScenarioError(f"servesim serve needs the server's packages: pip install -e '.[serve]' ({exc})") from None
    sc = load_scenario(args.scenario, _overrides(args))
    eos = load_eos_lengths(args.eos_lengths) if args.eos_lengths else None
    name = args.served_model_name or (sc.step_time.model or sc.step_time.profile or sc.name)
    print(f"Serving {sc.name} as {name!r} on http://{args.host}:{args.port} (simulated time x{args.time_scale:g}); "
          "Ctrl-C stops", flush=True)
    serve(sc, args.host, args.port, args.time_scale, name, args.tokenizer, eos)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="servesim",
        description="Simulate an LLM serving engine under a benchmark workload.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="simulate one scenario and print vLLM's benchmark report",
        description="Simulate one scenario (a TOML file) and print the report vLLM's benchmark_serving prints.",
    )
    r.add_argument("scenario", help="scenario TOML file, e.g. scenarios/seed004/enable-512.toml")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set engine.max_num_batched_tokens=1024 (repeatable)")
    r.add_argument("--seed", type=int, help="workload seed (same as --set workload.seed=N)")
    r.add_argument("--percentile-metrics", help="comma-separated metrics to report: ttft,tpot,itl,e2el")
    r.add_argument("--metric-percentiles", help='comma-separated percentiles, e.g. "50,90,99"')
    r.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:2000 tpot:100")
    r.add_argument("--output-json", metavar="PATH", help="write vLLM's result JSON")
    r.add_argument("--save-detailed", action="store_true", help="with --output-json: per-request lists too")
    r.add_argument("--output-requests", metavar="PATH", help="write per-request results as CSV")
    r.add_argument("--output-timeseries", metavar="PATH",
                   help="write dashboard numbers per interval as CSV (and a PNG beside it): requests completed/s, "
                        "running, waiting, KV usage %%, prompt and generation tokens/s per GPU, preemptions, "
                        "prefix-cache hit rate")
    r.add_argument("--timeseries-interval", type=float, default=1.0, metavar="S", help="interval in seconds (default 1)")
    r.add_argument("--interval", type=float, metavar="PCT",
                   help="also print a PCT %% prediction interval (e.g. 90) from the profile's fit: coefficients "
                        "drawn from its covariance, other workload seeds, its residual error")
    r.add_argument("--interval-draws", type=int, default=20, metavar="N",
                   help="simulations behind --interval (default 20)")
    r.add_argument("-q", "--quiet", action="store_true", help="print only the report")
    r.set_defaults(func=_cmd_run)

    v = sub.add_parser(
        "validate",
        help="fit each split's training rows, predict the rest, report out-of-sample errors",
        description="Fit the step-time model on each split's training rows (calibration/splits/NAME.toml), "
                    "predict every other row by simulation, print measured vs predicted, write "
                    "experiments/results/validation/NAME/ (report.md, predictions.csv, plots) and the "
                    "profile. Exits 1 if a split misses a target.",
    )
    v.add_argument("splits", nargs="*", help="split names (default: all in calibration/splits)")
    v.add_argument("--processes", type=int, help="simulation processes (default: all cores)")
    v.add_argument("--no-profile", action="store_true", help="do not rewrite calibration/profiles/")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    v.add_argument("--interval", type=float, metavar="PCT",
                   help="also give each predicted row a PCT %% interval (e.g. 90) and report how often the "
                        "measured value falls inside")
    v.add_argument("--interval-draws", type=int, default=20, metavar="N", help="simulations per row (default 20)")
    v.add_argument("--allow-poor-fit", action="store_true",
                   help="exit 0 even when a fit misses its own training rows by more than 25 %% or has a "
                        "coefficient on a bound (targets missed still exit 1)")
    v.set_defaults(func=_cmd_validate)

    c = sub.add_parser(
        "calibrate",
        help="fit a step-time profile to measured benchmark results",
        description="Fit the roofline step-time model to measured rows: a tidy CSV, vLLM --save-result JSON "
                    "files, sglang.bench_serving JSONL, inference-perf's or AIPerf's files, or per-request results "
                    "(a directory loads them all, AIPerf artifact directories one row each).",
    )
    c.add_argument("--table", required=True, help="measured results: file or directory")
    c.add_argument("--rows", help="pandas query selecting the rows to fit, e.g. \"num_prompts <= 64\"")
    c.add_argument("--model", required=True, help="model spec name (sim/specs/models) or a .toml path")
    c.add_argument("--hardware", required=True, help="hardware spec name, or several comma-separated to choose from")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    c.add_argument("--base", required=True, help="scenario TOML with what the table does not say "
                                                 "(scheduler, version, KV capacity, client)")
    c.add_argument("--kv-bounds", help="LO,HI: fit the KV capacity (tokens) within these bounds")
    c.add_argument("--seeds", type=int, default=1, help="workload seeds averaged per row")
    c.add_argument("--metrics", help="comma-separated metrics to fit (default: those of mean/p99 TTFT, TPOT and "
                                     "E2E, median ITL and output throughput the rows have)")
    c.add_argument("--fix", action="append", metavar="NAME=VALUE",
                   help="hold a coefficient at a value instead of fitting it, e.g. frontend_latency_s=0.02")
    c.add_argument("--out", required=True, help="profile name (writes NAME.toml and NAME.report.md in the working "
                                                "directory) or a .toml path")
    c.add_argument("--allow-poor-fit", action="store_true",
                   help="write the profile even when a training metric is off by more than 25 %% or a "
                        "coefficient sits on a bound (otherwise: exit 1, profile not written)")
    c.add_argument("--processes", type=int)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_cmd_calibrate)

    q = sub.add_parser(
        "predict",
        help="predict every row of a measured table from a profile, measured against predicted",
        description="Simulate every row of a measured table (any format calibrate reads) with a profile's "
                    "coefficients and print measured against predicted per row and metric, with the median and "
                    "largest error per metric.",
    )
    q.add_argument("--profile", required=True, help="profile name (./NAME.toml or bundled) or .toml path")
    q.add_argument("--table", required=True, help="measured results: file or directory")
    q.add_argument("--rows", help="pandas query selecting rows, e.g. \"max_concurrency > 8\"")
    q.add_argument("--base", required=True, help="scenario TOML with what the table does not say")
    q.add_argument("--metrics", help="comma-separated metrics to show (default: all the rows have)")
    q.add_argument("--seeds", type=int, default=1, help="workload seeds averaged per row")
    q.add_argument("--output", metavar="CSV", help="also write the table as CSV")
    q.add_argument("--processes", type=int)
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_cmd_predict)

    w = sub.add_parser(
        "sweep",
        help="run a scenario over a grid of settings, several seeds per point",
        description="Run SCENARIO over the cross product of every --grid axis, --seeds seeds per point, on local "
                    "processes (default) or a Dask cluster (--dask-scheduler). Writes runs.csv, summary.csv and "
                    "summary.parquet (mean and 95 %% confidence half-width over seeds per metric) and plots: TTFT "
                    "vs ITL with its Pareto front, latency vs throughput along the last axis, and goodput under "
                    "--slo.",
    )
    w.add_argument("scenario", help="scenario TOML file")
    w.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="one axis, e.g. engine.max_num_batched_tokens=256,512,2048 (repeatable; cross product)")
    w.add_argument("--seeds", type=int, default=3, help="workload seeds per point (default 3)")
    w.add_argument("--slo", action="append", metavar="METRIC=MS",
                   help="goodput SLO, e.g. ttft_ms=2000 or tpot_ms=100 (repeatable); picks the best point")
    w.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key for every point")
    w.add_argument("--out", default="sweep-results", help="output directory (default ./sweep-results)")
    w.add_argument("--processes", type=int, help="local processes (default: all cores)")
    w.add_argument("--dask-scheduler", metavar="tcp://HOST:PORT", help="run on this Dask distributed scheduler")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=_cmd_sweep)

    k = sub.add_parser(
        "compare",
        help="check a candidate policy against a baseline on a scenario suite (exit 1 on a regression)",
        description="Run every scenario of a suite under a baseline and a candidate policy with the same seeds and "
                    "report, per scenario and metric, the mean paired difference with its 95 %% interval. Exits 1 "
                    "when the candidate is worse than --tolerance on any metric (and the interval excludes 0). "
                    "A policy is a scheduler (vllm-v1, vllm-v0), FILE.py:Class or module:Class, or KEY=VALUE "
                    "overrides separated by ';'.",
    )
    k.add_argument("--baseline", required=True, help='e.g. vllm-v1')
    k.add_argument("--candidate", required=True,
                   help='e.g. examples/policies/shortest_prompt_first.py:ShortestPromptFirst or '
                        '"engine.max_num_batched_tokens=64"')
    k.add_argument("--suite", default="standard", help="a suite under scenarios/suites/ or a directory of TOML files")
    k.add_argument("--seeds", type=int, default=3, help="workload seeds per scenario (default 3)")
    k.add_argument("--tolerance", type=float, default=5.0, help="allowed worsening in %% (default 5)")
    k.add_argument("--output", metavar="CSV", help="also write the table as CSV")
    k.add_argument("--processes", type=int, help="local processes (default: all cores)")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=_cmd_compare)

    t = sub.add_parser(
        "timeline",
        help="write a Perfetto/Chrome trace (and a PNG) of what every step and request did",
        description="Simulate a scenario and write a Chrome trace JSON that opens in ui.perfetto.dev: one track "
                    "per engine instance (each step's prefill and decode tokens) and one per request (waiting, "
                    "prefill chunks, decoding, preemptions). --png draws the same for the first seconds.",
    )
    t.add_argument("scenario", help="scenario TOML file")
    t.add_argument("--out", required=True, help="trace JSON to write")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    t.add_argument("--seed", type=int, help="workload seed")
    t.add_argument("--png", metavar="PATH", help="also draw the timeline with matplotlib")
    t.add_argument("--seconds", type=float, help="PNG: draw only the first this many simulated seconds")
    t.add_argument("--requests", type=int, default=40, help="PNG: at most this many request rows (default 40)")
    t.set_defaults(func=_cmd_timeline)

    s = sub.add_parser(
        "serve",
        help="serve a scenario's simulated engine as an OpenAI-compatible HTTP endpoint",
        description="Serve the scenario's deployment behind vLLM's OpenAI API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics): each request enters the simulated "
                    "engine when it arrives and each token is released when the engine emits it, on a clock "
                    "that follows wall time (sped up by --time-scale). The scenario's workload is not used.",
    )
    s.add_argument("scenario", help="scenario TOML file (its engine, deployment and step time)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--time-scale", type=float, default=1.0, metavar="S",
                   help="simulated seconds per wall second (default 1: real time)")
    s.add_argument("--served-model-name", help="the model name /v1/models lists (default: the scenario's model)")
    s.add_argument("--tokenizer", metavar="PATH",
                   help="count text prompts with this Hugging Face tokenizer (tokenizer.json, or a directory "
                        "holding one); default: one token per 4 characters")
    s.add_argument("--eos-lengths", metavar="SOURCE",
                   help="let the model stop at EOS: a request without ignore_eos ends at a reply length drawn "
                        "from SOURCE (\"sharegpt\": the bundled ShareGPT completions, or a file of "
                        "prompt_tokens,completion_tokens) or at max_tokens, whichever comes first; default: "
                        "never, every reply runs to max_tokens")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    s.add_argument("--seed", type=int, help="seed (routing, speculative acceptance, EOS lengths)")
    s.set_defaults(func=_cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _load_simulator()
    try:
        return args.func(args)
    except (ScenarioError, WorkloadError, SimulationStuck, ValueError) as exc:
        print(f"servesim: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if argv is None:  # the process's own command line: it ends next
            # Python's exit walks every object left for a last garbage collection (~0.1 s after
            # a 10,000-request run, a sixth of the process); frozen, they are only freed
            import gc

            gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
