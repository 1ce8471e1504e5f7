"""Fuzzing scenarios and input files: every case must end with a report or an error that names what is
wrong (the way `servesim run` prints it), never a traceback, a hang or a kill for memory.

    python tests/fuzz_scenarios.py --cases 2000 [--seed 0]    # prints the count of each outcome

A case is a small valid scenario with one to three of its keys (any section, known or unknown) set to a
value from a pool of edge values (negative, zero, huge, NaN, infinities, wrong types, empty tables), a
key deleted, a trace file of broken content, or a scenario file that is binary, includes itself or
includes a missing file. tests/test_fuzz.py draws the same cases with hypothesis.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))
from tests.test_properties import wall_clock_guard  # noqa: E402

BASE = {
    "engine": {"scheduler": "vllm-v1", "max_model_len": 512, "max_num_batched_tokens": 256, "max_num_seqs": 16,
               "num_gpu_blocks_override": 200, "block_size": 16},
    "workload": {"dataset_name": "random", "num_prompts": 20, "random_input_len": 100, "random_output_len": 20,
                 "request_rate": 50.0},
    "step_time": {"step_overhead_s": 0.002, "per_prefill_token_s": 1e-5, "per_decode_seq_s": 1e-4},
}
KEYS = {
    "engine": ["scheduler", "version", "max_model_len", "max_num_batched_tokens", "max_num_seqs", "block_size",
               "num_gpu_blocks_override", "kv_cache_tokens", "enable_chunked_prefill", "enable_prefix_caching",
               "num_speculative_tokens", "spec_acceptance_rate", "gpu_memory_gib", "chunked_prefill_size",
               "async_scheduling", "disable_overlap_schedule", "cuda_graph_max_bs", "enforce_eager", "nonsense"],
    "workload": ["client", "dataset_name", "num_prompts", "request_rate", "burstiness", "max_concurrency", "seed",
                 "random_input_len", "random_output_len", "random_range_ratio", "random_prefix_len", "turns",
                 "think_time_s", "output_len_mean", "ignore_eos", "request_timeout_s", "stages", "trace_path",
                 "trace_time_scale", "shared_prefix", "hash_block_tokens", "session_timing", "nonsense"],
    "step_time": ["step_overhead_s", "per_prefill_token_s", "per_decode_seq_s", "model", "hardware", "tp", "profile",
                  "cpu_overhead_s", "compute_efficiency", "attention_efficiency", "frontend_per_request_s", "nonsense"],
    "deployment": ["instances", "router", "mode", "prefill_instances", "decode_instances"],
    "report": ["percentile_metrics", "metric_percentiles", "goodput"],
}
VALUES = [-1, 0, 1, 2, 7, 100, 10**9, 10**15, 2**63, -0.5, 0.0, 1e-9, 0.5, 1e30, math.nan, math.inf, -math.inf,
          "", "abc", "inf", "1e3", "vllm-v0", "sglang", "sharegpt", "trace", "mooncake", "shared_prefix", "pd",
          True, False, [], [1, 2], [{"rate": 1, "duration": 1}], [{"rate": 0, "duration": -1}], {}, {"x": 1},
          {"num_groups": 2}, "/nonexistent/file.csv"]
TRACES = ["", "arrival_s,input_len,output_len\n", "arrival_s,input_len,output_len\n0,abc,3\n",
          "arrival_s,input_len,output_len\n0,-5,3\n", "arrival_s,input_len,output_len\n1,10,3\n0,10,3\n",
          "a,b\n1,2\n", "\x00\x01\x02binary", '{"timestamp": 0, "input_length": 10}\n', "not json at all\n",
          '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": "x"}\n', "[1, 2, 3]",
          "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,374,44\n",
          "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n5,ChatGPT,0,0,0,Conversation log\n"]
TRACE_SUFFIXES = [".csv", ".json", ".jsonl"]
FILES = ["binary", "self_include", "missing_include", "include_not_a_name"]


def mutated(changes: list[tuple[str, str, object]], deleted: tuple[str, str] | None = None) -> dict:
    data = {k: dict(v) for k, v in BASE.items()}
    for section, key, value in changes:
        data.setdefault(section, {})[key] = value
    if deleted and deleted[1] in data.get(deleted[0], {}):
        del data[deleted[0]][deleted[1]]
    return data


def run_case(data: dict | None = None, trace: tuple[str, str] | None = None, file_case: str | None = None,
             seconds: int = 60) -> str:
    """'report', or 'error: <message>' for a clean error; anything else raises (a failure)."""
    from sim.config import ScenarioError, load_scenario, scenario_from_dict
    from sim.runner import SimulationStuck, simulate
    from sim.workload import WorkloadError

    with tempfile.TemporaryDirectory() as d, wall_clock_guard(seconds):
        try:
            if file_case is not None:
                path = Path(d) / "case.toml"
                if file_case == "binary":
                    path.write_bytes(bytes(range(256)) * 4)
                elif file_case == "self_include":
                    path.write_text('include = "case.toml"\n')
                elif file_case == "missing_include":
                    path.write_text('include = "missing.toml"\n')
                else:
                    path.write_text("include = 5\n")
                sc = load_scenario(path)
            else:
                if trace is not None:
                    content, suffix = trace
                    p = Path(d) / f"trace{suffix}"
                    p.write_bytes(content.encode("utf-8", "surrogateescape"))
                    data = mutated([("workload", "dataset_name", "trace"), ("workload", "trace_path", str(p))])
                    data["workload"].pop("num_prompts")
                sc = scenario_from_dict(data)
            simulate(sc, keep_token_times=False)
            return "report"
        except (ScenarioError, WorkloadError, SimulationStuck, ValueError) as exc:  # what `servesim run` prints
            msg = str(exc)
            if not msg.strip():
                raise AssertionError(f"an error without a message: {type(exc).__name__}") from exc
            return f"error: {msg}"


def random_case(rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.15:
        return {"trace": (rng.choice(TRACES), rng.choice(TRACE_SUFFIXES))}
    if kind < 0.2:
        return {"file_case": rng.choice(FILES)}
    changes = []
    for _ in range(rng.randint(1, 3)):
        section = rng.choice(list(KEYS))
        changes.append((section, rng.choice(KEYS[section]), rng.choice(VALUES)))
    deleted = None
    if rng.random() < 0.2:
        section = rng.choice(list(BASE))
        deleted = (section, rng.choice(list(BASE[section])))
    return {"data": mutated(changes, deleted)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    counts = {"report": 0, "error": 0, "failure": 0}
    for k in range(args.cases):
        case = random_case(rng)
        try:
            out = run_case(**case)
            counts["report" if out == "report" else "error"] += 1
        except Exception as exc:  # a traceback, a timeout: what the fuzzing is for
            counts["failure"] += 1
            print(f"case {k} failed: {type(exc).__name__}: {exc}\n  {case}", file=sys.stderr)
    print(f"{args.cases} cases: {counts['report']} reports, {counts['error']} clean errors, "
          f"{counts['failure']} failures")
    sys.exit(1 if counts["failure"] else 0)


if __name__ == "__main__":
    main()
