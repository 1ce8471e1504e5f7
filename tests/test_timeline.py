"""`servesim timeline`: a Chrome/Perfetto trace and a PNG of what each step and request did."""

from __future__ import annotations

import json

from sim.cli import main
from sim.config import scenario_from_dict
from sim.runner import simulate
from sim.timeline import chrome_trace, request_spans

PHASES = {"X", "C", "M", "i"}


def _run(**engine):
    eng = {"scheduler": "vllm-v1", "max_model_len": 2048, "num_gpu_blocks_override": 1000,
           "max_num_batched_tokens": 512, **engine}
    data = {"engine": eng, "step_time": {"step_overhead_s": 0.01, "per_prefill_token_s": 1e-4, "per_decode_seq_s": 1e-4},
            "workload": {"dataset_name": "random", "num_prompts": 20, "random_input_len": 600,
                         "random_output_len": 40, "request_rate": 50.0}}
    return simulate(scenario_from_dict(data), record_steps=True)


def check_chrome_trace_schema(trace: dict) -> None:
    """The Trace Event Format's JSON-object form, as ui.perfetto.dev and chrome://tracing load it."""
    assert set(trace) <= {"traceEvents", "displayTimeUnit"} and isinstance(trace["traceEvents"], list)
    assert trace["displayTimeUnit"] in ("ms", "ns")
    for e in trace["traceEvents"]:
        assert isinstance(e["name"], str) and e["ph"] in PHASES and isinstance(e["pid"], int)
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name") and isinstance(e["args"]["name"], str)
            continue
        assert isinstance(e["tid"], int) and isinstance(e["ts"], float) and e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0
        if e["ph"] == "C":
            assert all(isinstance(v, int) for v in e["args"].values())
        if e["ph"] == "i":
            assert e["s"] in ("g", "p", "t")
    json.loads(json.dumps(trace))  # plain JSON, no NaN


def test_trace_is_valid_chrome_json_with_step_and_request_tracks():
    res = _run()
    trace = chrome_trace(res)
    check_chrome_trace_schema(trace)
    steps = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 0]
    assert len(steps) == res.num_steps
    assert sum(e["args"]["prefill_tokens"] for e in steps) >= sum(r.prompt_len for r in res.requests)


def test_request_spans_add_up_to_what_each_request_computed():
    res = _run()
    spans, preemptions = request_spans(res)
    assert not preemptions and res.num_preemptions == 0
    for r in res.requests:
        mine = [s for s in spans if s.rid == r.rid]
        assert sum(s.tokens for s in mine if s.kind == "prefill") == r.prompt_len
        assert sum(s.tokens for s in mine if s.kind == "decode") == r.output_len - 1  # the first comes with the prefill
        first = min(s.start_s for s in mine if s.kind == "prefill")
        waits = [s for s in mine if s.kind == "waiting"]
        assert all(s.end_s <= first + 1e-12 for s in waits)


def test_preemptions_show_as_instant_events_and_restart_waiting():
    res = _run(num_gpu_blocks_override=130)  # 2080 tokens for 20 requests of ~640: preemption
    spans, preemptions = request_spans(res)
    assert res.num_preemptions > 0 and len(preemptions) == res.num_preemptions
    rid, t = preemptions[0]
    assert any(s.rid == rid and s.kind == "waiting" and abs(s.start_s - t) < 1e-9 for s in spans)
    check_chrome_trace_schema(chrome_trace(res))


def test_cli_writes_the_trace_and_a_png(tmp_path):
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    rc = main(["timeline", "scenarios/seed004/enable-512.toml", "--set", "workload.num_prompts=20",
               "--out", str(out), "--png", str(png), "--seconds", "5"])
    assert rc == 0
    check_chrome_trace_schema(json.loads(out.read_text()))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
