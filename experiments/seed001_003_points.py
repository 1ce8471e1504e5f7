"""Seed 001 and seed 003's scattered points, reproduced from their scenario files.

    python experiments/seed001_003_points.py   # writes experiments/results/seed001_003_points.md

- Seed 001 (SGLang, DeepSeek-R1, 2x8 H100, TP16): the split `seed001` fits the 8k single-request
  TTFT and the single-stream decode speed and predicts the 16k and 32k TTFTs; the prefix-cache check
  sends one chat twice (scenarios/seed001/prefix-cache-hit.toml); SGLang's default max running
  requests for that pool is compared with the 78 the article's log showed.
- Seed 003 (vllm-ascend 2P1D with MTP on Ascend A3): scenarios/seed003/2p1d-mtp.toml with the
  assumptions written in it; nothing is fitted.
"""

from __future__ import annotations

from pathlib import Path

from calibration.validate import validate
from sim.config import load_scenario
from sim.runner import simulate

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "seed001_003_points.md"


def pct(pred: float, meas: float) -> str:
    return f"{100 * (pred - meas) / meas:+.1f} %"


def _decode_step_note(sc) -> str:
    """Where a full decode step of the DP32 group goes, per rank and as one TP32 engine (how the
    scenario was timed before `step_time.dp`): 896 sequences at the mean context of a request
    halfway through its output, each with its MTP draft."""
    from sim.config import StepTimeConfig
    from sim.perf_model import features
    from sim.step_time import BatchShape

    seqs = sc.decode.engine["max_num_seqs"]
    ctx = sc.workload.random_input_len + sc.workload.random_output_len // 2
    shape = BatchShape(num_seqs=seqs, prefill_tokens=0, prefill_attn_pairs=0, decode_seqs=seqs,
                       decode_ctx_tokens=seqs * ctx, spec_tokens=seqs)
    base = sc.step_time.model_dump(exclude_none=True)
    out = {}
    for name, par in (("dp", sc.decode.step_time), ("tp32", {"tp": 32, "dp": 1})):
        st = StepTimeConfig(**{**base, **par}).build()
        lin, weights, _, kv, comm, *_ = st.step_terms(features([shape]))
        out[name] = {"step": st.step_time(shape) * 1e3, "weights": weights[0] / st.coeffs.memory_efficiency * 1e3,
                     "kv": kv[0] / st.coeffs.memory_efficiency * 1e3, "comm": comm[0] / st.coeffs.comm_efficiency * 1e3,
                     "gemm": lin[0] / st.coeffs.compute_efficiency * 1e3}
    d, t = out["dp"], out["tp32"]
    return (f"A full decode step ({seqs} sequences at {ctx} tokens of context, one MTP draft each) takes "
            f"{d['step']:.0f} ms timed per DP rank: {d['weights']:.0f} ms of weight reads (each die reads the "
            f"non-expert weights whole and 1/32 of the experts; the GEMMs' {d['gemm']:.0f} ms run under them), "
            f"{d['kv']:.0f} ms of KV reads (its own 28 sequences), {d['comm']:.0f} ms of all-to-all, and the "
            f"10 ms step overhead. Timed as one TP32 engine, as this scenario was before DP attention was modelled, the "
            f"same step took {t['step']:.0f} ms, {t['kv']:.0f} ms of it KV reads: MLA's latent is not split "
            "by TP, so every die read every sequence's (TPOT +104 % then). The step is now faster than "
            "measured: the default efficiencies and 10 ms overhead are not Ascend's (no Ascend table "
            "exists to fit them), and a DP group's step waits for its slowest rank (uneven batches and "
            "expert loads), which the even spread assumed here does not see. The concurrency (480) was "
            "derived from the measured numbers, so throughput is not independent.")


def main() -> None:
    lines = ["# Seed 001 and seed 003 points", "", __doc__.split("\n\n", 2)[2].strip(), ""]

    # the report `servesim validate --interval 90` writes, so running this keeps it as it was
    res = validate("seed001", progress=False, write_profile=False, out_dir=ROOT / "experiments/results/validation/seed001",
                   interval=0.9, interval_draws=20)
    lines += ["## Seed 001: TTFT against prompt length (fitted: 8k TTFT, single-stream TPOT)", "",
              "| row | set | metric | measured | predicted | error |", "| --- | --- | --- | --- | --- | --- |"]
    for _, r in res.predictions.iterrows():
        lines.append(f"| {r.row_id} | {'fit' if r.train else 'predicted'} | {r.metric} | {r.measured:.1f} | "
                     f"{r.predicted:.1f} | {pct(r.predicted, r.measured)} |")

    sc = load_scenario(ROOT / "scenarios/seed001/prefix-cache-hit.toml")
    run = simulate(sc)
    first, second = sorted(run.requests, key=lambda r: r.rid)
    t1, t2 = (first.first_token_s - first.start_s) * 1e3, (second.first_token_s - second.start_s) * 1e3
    lines += ["", "## Seed 001: prefix-cache hit", "",
              f"Prompt: {sc.workload.random_prefix_len} shared tokens + {sc.workload.random_input_len} new "
              f"(assumed; the article gives no length). {second.cached_tokens} tokens came from the radix cache.", "",
              "| send | measured TTFT (ms) | simulated TTFT (ms) |", "| --- | --- | --- |",
              f"| first (uncached) | ~1900 | {t1:.0f} |", f"| second (cached) | 430 | {t2:.0f} ({pct(t2, 430)}) |", "",
              "The cache removes the prompt's compute. What is left of a TTFT is the fixed part (front end, "
              "scheduling, a prefill step's overhead), which the split holds at 0: two measured numbers fit "
              "two coefficients, and one 8k TTFT cannot separate a fixed part from prefill. (An earlier split "
              "that fitted a fixed part too over-predicted this cached TTFT, 1.04 s.)",
              "",
              "Why no fixed part fits every seed-001 point: with chunked prefill at 8192 tokens, the 8k, 16k "
              "and 32k single-request TTFTs are F + c1, F + c1 + c2 and F + c1 + c2 + c3 + c4, where F is the "
              "fixed part and chunk k costs c_k. A later chunk attends to more context, so it costs no less "
              "than an earlier one (c1 <= c2). The measured series gives c2 = 5110 - 2940 = 2170 ms and "
              "(c3 + c4) / 2 = (11780 - 5110) / 2 = 3335 ms, so c1 <= 2170 ms and F = 2940 - c1 >= 770 ms. "
              "The cached TTFT is F plus a short prefill, so F <= 430 ms. No step-time model whose chunk cost "
              "grows with context meets both: the 8k point holds at least 340 ms that the others do not (a "
              "first request's one-off cost, or the spread of single measurements; the article reports one "
              "run of each). The split keeps the 8k point with F = 0, so its first chunk carries all of it and "
              "every later chunk costs more still: it over-predicts 16k and 32k by 23-33 % and under-predicts "
              "the cached TTFT. A model held to both F <= 430 ms and the measured c2 would under-predict the 8k "
              "point by at least 340 ms (12 %).",
              "", f"SGLang's default max_running_requests for this pool ({sc.engine.kv_cache_tokens} tokens, context "
              f"{sc.engine.max_model_len}): {sc.engine.max_running_requests}; the article's log said 78. "
              "The 0.4.4 formula floors the request pool at 2048, so 78 is not reproduced; the article's "
              "release is not stated."]

    sc3 = load_scenario(ROOT / "scenarios/seed003/2p1d-mtp.toml")
    m = simulate(sc3).bench.metrics
    cards = 64
    tok = m["total_token_throughput"] / cards
    lines += ["", "## Seed 003: vllm-ascend 2P1D with MTP (no fit; assumptions in the scenario file)", "",
              "| metric | measured | simulated | error |", "| --- | --- | --- | --- |",
              f"| mean TTFT (ms) | 6160 | {m['mean_ttft_ms']:.0f} | {pct(m['mean_ttft_ms'], 6160)} |",
              f"| mean TPOT (ms) | 48.82 | {m['mean_tpot_ms']:.2f} | {pct(m['mean_tpot_ms'], 48.82)} |",
              f"| total tokens/s per card | 478 | {tok:.0f} | {pct(tok, 478)} |", "",
              _decode_step_note(sc3)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
