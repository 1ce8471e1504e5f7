"""`servesim serve`: the simulated engine behind vLLM's OpenAI API, driven over real HTTP on localhost."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from sim.config import scenario_from_dict  # noqa: E402
from sim.serve import (  # noqa: E402
    CHARS_PER_TOKEN, LiveSim, build_app, free_port, load_eos_lengths, load_tokenizer, wait_until_up)

STEP_S = 0.05  # every step of the test engine takes 50 simulated ms (the linear step model)


def scenario(deployment: dict | None = None, **engine):
    data = {
        "engine": {"scheduler": "vllm-v1", "max_model_len": 1024, "num_gpu_blocks_override": 64,
                   "max_num_batched_tokens": 512, "max_num_seqs": 8, **engine},
        "step_time": {"step_overhead_s": STEP_S},
        "workload": {"dataset_name": "random", "num_prompts": 1, "random_input_len": 8, "random_output_len": 4},
    }
    if deployment:
        data["deployment"] = deployment
        if deployment.get("mode") == "pd":
            data["kv_transfer"] = {"latency_s": 0.001, "bandwidth_gbps": 10.0, "bytes_per_token": 1000.0}
    return scenario_from_dict(data)


@contextlib.contextmanager
def running(time_scale: float = 1.0, deployment: dict | None = None, count=None, eos=None, **engine):
    live = LiveSim(scenario(deployment, **engine), time_scale, eos_lengths=eos)
    port = free_port()
    app = build_app(live, "sim-model", count) if count else build_app(live, "sim-model")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield live, client
    finally:
        server.should_exit = True
        thread.join(20)


def sse(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completion_stream_has_vllms_chunks_usage_last_and_done():
    with running(time_scale=20) as (_, client):
        body = {"model": "sim-model", "prompt": list(range(10)), "max_tokens": 5, "stream": True,
                "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 10, "completion_tokens": 5,
                                                         "total_tokens": 15}
    assert all(c["object"] == "text_completion" and c["model"] == "sim-model" for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert sum(c["choices"][0]["text"].count("tok") for c in chunks) == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_tokens_are_released_on_the_simulated_clock():
    """Prefill and 5 decodes: 6 steps of 50 simulated ms. At time scale 2 the stream cannot end
    before 150 ms of wall time; it may end later only by the server's own delays."""
    with running(time_scale=2) as (live, client):
        t0 = time.monotonic()
        r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 6})
        wall = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    assert wall >= 6 * STEP_S / 2 * 0.95
    assert wall < 5.0
    assert live.env.now >= 6 * STEP_S


def test_a_prompt_over_max_model_len_gets_vllms_400_and_never_reaches_the_engine():
    with running(time_scale=20) as (live, client):
        r = client.post("/v1/completions", json={"prompt": [1] * 1000, "max_tokens": 100})
        assert r.status_code == 400
        err = r.json()
        assert err["object"] == "error" and err["code"] == 400 and err["type"] == "BadRequestError"
        assert "maximum context length is 1024 tokens" in err["message"]
        assert client.post("/v1/completions", json={"prompt": {"a": 1}}).status_code == 400
        other = client.post("/v1/completions", json={"model": "other", "prompt": [1], "max_tokens": 1})
        assert other.status_code == 404 and other.json()["type"] == "NotFoundError"
        assert client.post("/v1/completions", json={"prompt": [1], "max_tokens": "x"}).status_code == 400
        assert live._rid == 0


def test_with_eos_lengths_a_reply_stops_at_its_eos_unless_ignore_eos():
    """vLLM stops a request at the model's EOS unless the request sets ignore_eos; the simulated
    model's replies end at lengths drawn from `eos_lengths` (here 2 or 3 tokens)."""
    with running(time_scale=50, eos=np.array([2, 3])) as (live, client):
        r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 8}).json()
        assert r["usage"]["completion_tokens"] in (2, 3) and r["choices"][0]["finish_reason"] == "stop"
        body = {"prompt": [1, 2, 3], "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/completions", json=body) as s:
            *chunks, usage, done = sse(s.iter_lines())
        assert usage["usage"]["completion_tokens"] in (2, 3) and chunks[-1]["choices"][0]["finish_reason"] == "stop"
        r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 8, "ignore_eos": True}).json()
        assert r["usage"]["completion_tokens"] == 8 and r["choices"][0]["finish_reason"] == "length"
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 1}).json()
        assert r["usage"]["completion_tokens"] == 1 and r["choices"][0]["finish_reason"] == "length"
        assert client.post("/v1/completions", json={"prompt": [1], "ignore_eos": "yes"}).status_code == 400
        assert live.metrics.running_requests == 0
    assert len(load_eos_lengths("sharegpt")) > 1000  # the bundled ShareGPT completions
    with pytest.raises(ValueError, match="--eos-lengths: file not found"):
        load_eos_lengths("no-such-file.csv")


def test_models_health_and_the_default_max_tokens():
    with running(time_scale=50) as (_, client):
        assert client.get("/health").status_code == 200
        models = client.get("/v1/models").json()["data"]
        assert models[0]["id"] == "sim-model" and models[0]["max_model_len"] == 1024
        # no max_tokens: vLLM's default, what is left of the context (here 1024 - 1000)
        r = client.post("/v1/completions", json={"prompt": [7] * 1000})
        assert r.json()["usage"]["completion_tokens"] == 24


def test_chat_stream_starts_with_the_role_and_counts_characters_without_a_tokenizer():
    with running(time_scale=20) as (_, client):
        text = "x" * (CHARS_PER_TOKEN * 12)
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            events = sse(r.iter_lines())
    first, *chunks, usage, done = events
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert sum(c["choices"][0]["delta"]["content"].count("tok") for c in chunks) == 3
    assert usage["usage"]["prompt_tokens"] == 12 and done == "[DONE]"


def test_a_client_that_disconnects_aborts_its_request_and_frees_its_kv():
    with running(time_scale=1) as (live, client):
        body = {"prompt": list(range(100)), "max_tokens": 500, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # the first token: then hang up
        deadline = time.monotonic() + 10
        while True:
            st = live.engine_state()
            if st["running"] == 0 and st["waiting"] == 0 and st["kv_usage"] == 0:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        assert live.num_aborted == 1


def test_metrics_use_vllms_names():
    with running(time_scale=20) as (_, client):
        client.post("/v1/completions", json={"prompt": [1, 2, 3, 4], "max_tokens": 4})
        text = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total"):
        assert name in text, name
    assert "vllm:generation_tokens_total 4.0" in text and "vllm:prompt_tokens_total 4.0" in text


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_the_server_process_shuts_down_cleanly_on_a_signal(tmp_path, sig):
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "serve", "scenarios/seed004/enable-512.toml",
                             "--port", str(port), "--time-scale", "5"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", alive=lambda: proc.poll() is None)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("deployment", [{"instances": 2, "router": "round_robin"},
                                        {"mode": "pd", "prefill_instances": 1, "decode_instances": 1}])
def test_the_scenarios_router_places_requests_on_dp_and_pd_deployments(deployment):
    with running(time_scale=20, deployment=deployment) as (live, client):
        for _ in range(2):
            r = client.post("/v1/completions", json={"prompt": [1] * 20, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert all(eng.num_steps > 0 for eng in live.dep.engines)  # both instances (or P and D) ran


def test_a_tokenizer_counts_text_prompts_as_the_client_does(tmp_path):
    """With --tokenizer the server counts a text prompt with the same tokenizer.json a benchmark
    client counts with (here a word-level one: one token per word), not by its characters."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["alpha", "beta", "gamma"])}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    count = load_tokenizer(str(tmp_path))
    text = "alpha beta gamma delta " * 5  # 20 words, 115 characters
    assert count(text) == 20
    with running(time_scale=20, count=count) as (_, client):
        r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 2})
        assert r.json()["usage"]["prompt_tokens"] == 20
    with running(time_scale=20) as (_, client):  # without one: 115 characters / 4
        r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 2})
        assert r.json()["usage"]["prompt_tokens"] == 29
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing"))
