"""A benchmark client nobody here wrote, AIPerf (installed from the package index), against
`servesim serve` on localhost; its own report compared with `servesim run` of the same workload.

CI installs AIPerf into a virtual environment of its own (`.venv-client`, see `.ci/run`): its
dependencies are not the project's. Elsewhere the test runs when `SERVESIM_AIPERF` names an
`aiperf` executable or `.venv-client/bin/aiperf` exists, and is skipped otherwise.

Both sides must count the same prompt tokens: AIPerf counts with a tokenizer, and without the
network it cannot fetch one, so the test writes a word-level tokenizer (every word one token,
unknown words `[UNK]`) and hands the same file to the server (`--tokenizer`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "seed004" / "enable-512.toml"
ISL, OSL, REQUESTS, CONCURRENCY = 200, 16, 16, 4
TOLERANCE = 0.05  # the bound on client report against simulation


def _aiperf() -> str | None:
    exe = os.environ.get("SERVESIM_AIPERF") or str(ROOT / ".venv-client" / "bin" / "aiperf")
    return exe if os.path.exists(exe) else None


def _tokenizer(path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab={"[UNK]": 0, "the": 1, "and": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["[UNK]"])  # "[UNK]" in a prompt's text is one token, on both sides
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "unk_token": "[UNK]"}))


def _simulated() -> dict:
    from sim.config import load_scenario, scenario_from_dict
    from sim.runner import simulate

    data = load_scenario(SCENARIO).model_dump(exclude_none=True)
    data.pop("name", None)
    data["workload"] = {"client": "vllm", "dataset_name": "random", "random_input_len": ISL, "random_output_len": OSL,
                        "random_range_ratio": 0.0, "num_prompts": REQUESTS, "max_concurrency": CONCURRENCY,
                        "request_rate": "inf", "ignore_eos": True}
    return simulate(scenario_from_dict(data)).bench.metrics


@pytest.mark.skipif(_aiperf() is None, reason="AIPerf is not installed: python3 -m venv .venv-client && "
                                              ".venv-client/bin/pip install aiperf")
def test_aiperf_against_the_server_reports_what_servesim_run_predicts(tmp_path):
    from sim.serve import free_port, wait_until_up

    _tokenizer(tmp_path / "tokenizer")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sim.cli", "serve", str(SCENARIO), "--port", str(port),
                               "--time-scale", "1", "--tokenizer", str(tmp_path / "tokenizer")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    try:
        wait_until_up(f"http://127.0.0.1:{port}", alive=lambda: server.poll() is None)
        run = subprocess.run([_aiperf(), "profile", "--model", "seed004-qwen72b-gptq", "--url", f"127.0.0.1:{port}",
                              "--endpoint-type", "completions", "--streaming", "--request-count", str(REQUESTS),
                              "--concurrency", str(CONCURRENCY), "--synthetic-input-tokens-mean", str(ISL),
                              "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(OSL),
                              "--output-tokens-stddev", "0", "--tokenizer", str(tmp_path / "tokenizer"),
                              "--extra-inputs", "ignore_eos:true", "--artifact-dir", str(tmp_path / "aiperf")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        server.terminate()
        server.communicate(timeout=60)
    report = json.loads((tmp_path / "aiperf" / "profile_export_aiperf.json").read_text())
    assert report["request_count"]["avg"] == REQUESTS and report["input_sequence_length"]["avg"] == ISL
    sim = _simulated()
    pairs = {  # AIPerf's name: servesim's (vLLM's benchmark report)
        "time_to_first_token": "mean_ttft_ms", "inter_token_latency": "mean_itl_ms",
        "request_latency": "mean_e2el_ms", "output_token_throughput": "output_throughput"}
    for theirs, ours in pairs.items():
        measured, predicted = report[theirs]["avg"], sim[ours]
        assert abs(measured / predicted - 1) <= TOLERANCE, f"{theirs}: AIPerf {measured:.2f}, servesim run {predicted:.2f}"
