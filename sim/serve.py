"""`servesim serve`: the simulated engine behind an OpenAI-compatible HTTP endpoint.

The simulated clock follows wall time, sped up by `time_scale`: a request enters the simulated
deployment at the simulated instant it arrives over HTTP, and each of its tokens is released to
the client when the simulated engine emits it. One asyncio task owns the SimPy environment
(`LiveSim.run`): it advances the simulation to the current simulated time, hands the tokens
emitted meanwhile to their streams, and sleeps until the next simulated event or the next
request, whichever comes first. Steps are simulated one by one (no event compression), so a
request's token count is up to date at every instant.

Endpoints follow vLLM's OpenAI server: `/v1/completions` and `/v1/chat/completions` (streaming as
server-sent events in vLLM's chunk format, with a usage chunk last when
`stream_options.include_usage` is set, or one JSON response), `/v1/models`, `/health` and
`/metrics` (vLLM's Prometheus names). A request the engine's front door refuses (a prompt plus
max_tokens over `max_model_len`) gets HTTP 400 with the OpenAI error body, as vLLM answers it.

Lengths: the prompt's is the length of `prompt` when it is a list of token ids (or
`prompt_token_ids`); for text, its token count under `--tokenizer` (a Hugging Face
`tokenizer.json`, the same one a benchmark client counts with), or without one an estimate, one
token per `CHARS_PER_TOKEN` characters (of every message's content, for chat; no chat template). The output's is `max_tokens`
(vLLM's default when absent: what is left of `max_model_len`). By default the simulated model
never emits EOS, so every stream ends with finish_reason "length", as with `ignore_eos`. With
`eos_lengths` (`--eos-lengths sharegpt`, or a file of `completion_tokens`), a request that does not
set `ignore_eos` stops where a reply of a length drawn from them would (finish_reason "stop"),
or at `max_tokens` if that comes first; `ignore_eos: true` runs to `max_tokens`, as in vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import simpy

from .deployment import Deployment
from .engine import front_door_error
from .pd import PDDeployment
from .request import Request, Status

CHARS_PER_TOKEN = 4  # a text prompt's length without a tokenizer: ~4 characters per token (English)


@dataclass
class Stream:
    """One request's token stream, from the simulation to its HTTP response."""

    req: Request
    finish_reason: str = "length"  # "stop": the reply ended at its EOS before max_tokens
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: int = 0  # tokens handed to the response so far
    last_s: float = math.nan  # simulated time of the last token handed over


class LiveSim:
    """A scenario's deployment running on a simulated clock that follows wall time."""

    def __init__(self, sc, time_scale: float = 1.0, clock=time.monotonic, eos_lengths=None):
        if not time_scale > 0:
            raise ValueError(f"--time-scale must be > 0, got {time_scale}")
        self.sc = sc
        # reply lengths at which the model emits EOS (None: never), drawn with the scenario's seed
        self._eos = eos_lengths
        self._eos_rng = np.random.default_rng(sc.workload.seed)
        self.time_scale = time_scale
        self.env = simpy.Environment()
        deployment = PDDeployment if sc.deployment.mode == "pd" else Deployment
        self.dep = deployment(self.env, sc, self._on_done, False, compress=False)
        if isinstance(self.dep, PDDeployment):
            self.max_model_len, self._server = self.dep.max_model_len, self.dep.front_door
        else:
            self.max_model_len, self._server = self.dep.engines[0].max_model_len, self.dep.engines[0]._server
        self._clock = clock
        self._t0 = clock()
        self._rid = 0
        self.streams: dict[int, Stream] = {}
        self._finished: list[Stream] = []
        self._wake = asyncio.Event()
        self.metrics = LiveMetrics()
        self.on_request_done = None  # called with each request that ends (benchmarks, tests)
        self.num_aborted = 0  # requests whose client went away before their last token
        self.max_lag_s = 0.0  # the most the simulation fell behind the clock after an advance (simulated s)

    # --- the clock -------------------------------------------------------------------------
    def now(self) -> float:
        """The simulated time now: wall seconds since start, times `time_scale`."""
        return (self._clock() - self._t0) * self.time_scale

    def advance(self) -> None:
        """Run the simulation up to now and release the tokens emitted meanwhile."""
        t = self.now()
        if t > self.env.now:
            self.env.run(until=t)
        for s in self.streams.values():
            self._release(s)
        for s in self._finished:
            self._release(s)
            s.queue.put_nowait(None)  # the end of the stream
            self.streams.pop(s.req.rid, None)
        self._finished = []
        self.max_lag_s = max(self.max_lag_s, self.now() - self.env.now)

    def _release(self, s: Stream) -> None:
        n = s.req.output_len - s.sent
        if n > 0:
            t = s.req.last_token_s
            self.metrics.tokens(s, n, t)
            s.sent += n
            s.last_s = t
            s.queue.put_nowait(n)

    async def run(self) -> None:
        """Own the simulation: advance it, then sleep until its next event or a new request. The
        simulated clock starts here, at simulated time 0."""
        self._t0 = self._clock() - self.env.now / self.time_scale
        while True:
            self.advance()
            nxt = self.env.peek()
            delay = None if nxt == math.inf else max(0.0, (nxt - self.now()) / self.time_scale)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass

    # --- requests --------------------------------------------------------------------------
    def front_door(self, prompt_len: int, max_tokens: int | None) -> tuple[int, str]:
        """max_tokens (vLLM's default when None) and the engine's HTTP 400 message, if any."""
        if max_tokens is None:
            max_tokens = max(1, self.max_model_len - prompt_len)
        probe = Request(rid=-1, prompt_len=prompt_len, max_tokens=max_tokens, arrival_s=0.0)
        return max_tokens, front_door_error(probe, self.max_model_len, self._server)

    def submit(self, prompt_len: int, max_tokens: int, ignore_eos: bool = False) -> Stream:
        self.advance()  # the request arrives now, not at the last event
        self._rid += 1
        t = self.env.now
        out, reason = max_tokens, "length"
        if self._eos is not None and not ignore_eos:
            eos = max(1, int(self._eos[self._eos_rng.integers(len(self._eos))]))
            if eos < max_tokens:  # the engine stops the request at its EOS
                out, reason = eos, "stop"
        req = Request(rid=self._rid, prompt_len=prompt_len, max_tokens=out, arrival_s=t, start_s=t)
        s = Stream(req, reason)
        self.streams[req.rid] = s
        self.metrics.running_requests += 1
        self.dep.submit(req)
        self._wake.set()
        return s

    def abort(self, s: Stream) -> None:
        """The client went away: the engine aborts the request and frees its KV."""
        if s.req.done:
            return
        self.advance()
        self.num_aborted += 1
        s.req.aborted = True
        abort = getattr(self.dep, "abort", None)
        if abort is not None:
            abort(s.req)
        self._wake.set()

    def _on_done(self, req: Request) -> None:
        if self.on_request_done is not None:
            self.on_request_done(req)
        s = self.streams.get(req.rid)
        if s is not None:
            self._finished.append(s)
            self.metrics.done(s)

    # --- the engine's state, for /metrics ---------------------------------------------------
    def engine_state(self) -> dict:
        scheds = [eng.scheduler for eng in self.dep.engines]
        used = sum(s.kv.num_used for s in scheds)
        total = sum(s.kv.num_blocks for s in scheds)
        caches = [s.kv.prefix for s in scheds if s.kv.prefix is not None]
        return {
            "running": sum(len(s.running) for s in scheds),
            "waiting": sum(len(s.waiting) for s in scheds),
            "kv_usage": used / total if total else 0.0,
            "preemptions": sum(s.num_preemptions for s in scheds),
            "prefix_queries": sum(c.query_tokens for c in caches),
            "prefix_hits": sum(c.hit_tokens for c in caches),
        }


class LiveMetrics:
    """What the server has seen, as vLLM's Prometheus metrics count it (simulated seconds)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        buckets = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.",
                                         registry=self.registry)
        self.request_success = Counter("vllm:request_success", "Finished requests.", ["finished_reason"],
                                       registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.",
                              buckets=buckets, registry=self.registry)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.",
                             buckets=buckets, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End to end request latency in seconds.",
                             buckets=buckets, registry=self.registry)
        self.running_requests = 0

    def tokens(self, s: Stream, n: int, t: float) -> None:
        self.generation_tokens.inc(n)
        if s.sent == 0:
            self.ttft.observe(t - s.req.start_s)
        elif n:
            self.itl.observe(t - s.last_s)

    def done(self, s: Stream) -> None:
        self.running_requests -= 1
        r = s.req
        if r.status is Status.FINISHED and not r.aborted:
            self.prompt_tokens.inc(r.prompt_len)
            self.request_success.labels(finished_reason=s.finish_reason).inc()
            self.e2e.observe(r.last_token_s - r.start_s)


# --- HTTP ----------------------------------------------------------------------------------
def count_by_characters(text: str) -> int:
    """The tokenizer-free estimate: one token per `CHARS_PER_TOKEN` characters."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def load_tokenizer(path: str):
    """A Hugging Face tokenizer (`tokenizer.json`, or a directory holding one) as a token counter."""
    from pathlib import Path

    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("--tokenizer needs the tokenizers package: pip install -e '.[serve]'") from None
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"--tokenizer {path}: no tokenizer.json there")
    tok = Tokenizer.from_file(str(file))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def prompt_length(body: dict, chat: bool, count=count_by_characters) -> int:
    """Tokens in the request's prompt: given as ids, or counted from its text (by `count`: a
    tokenizer, or the characters)."""
    if chat:
        text = "".join(_content(m.get("content")) for m in body.get("messages") or [] if isinstance(m, dict))
        return max(1, count(text))
    ids = body.get("prompt_token_ids")
    prompt = body.get("prompt", ids)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, str):
        return max(1, count(prompt)) if prompt else 0
    raise BadRequest("prompt must be a string or a list of token ids")


def _content(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


class BadRequest(Exception):
    pass


def error_body(message: str, code: int = 400) -> dict:
    """OpenAI's error JSON, as vLLM's server sends it."""
    kind = "BadRequestError" if code == 400 else "NotFoundError" if code == 404 else "InternalServerError"
    return {"object": "error", "message": message, "type": kind, "param": None, "code": code}


TOKEN_TEXT = " tok"  # what each simulated token reads as


def build_app(live: LiveSim, model_name: str, count=count_by_characters):
    """The Starlette application serving `live`; `count` turns a text prompt into its tokens."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    created = int(time.time())

    async def health(_: HTTPRequest) -> Response:
        return Response(status_code=200)

    async def models(_: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "servesim", "root": model_name,
             "parent": None, "max_model_len": live.max_model_len}]})

    async def metrics(_: HTTPRequest) -> Response:
        from prometheus_client import generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        live.advance()
        st = live.engine_state()
        model = {"model_name": model_name}

        class State:
            def collect(self):
                for family, name, doc, value in (
                        (GaugeMetricFamily, "vllm:num_requests_running", "Requests in model execution batches.", st["running"]),
                        (GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting to be processed.", st["waiting"]),
                        (GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", st["kv_usage"]),
                        (CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemptions.", st["preemptions"]),
                        (CounterMetricFamily, "vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", st["prefix_queries"]),
                        (CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", st["prefix_hits"])):
                    metric = family(name, doc, labels=list(model))
                    metric.add_metric(list(model.values()), value)
                    yield metric

        text = generate_latest(live.metrics.registry).decode() + _render(State())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def completions(request: HTTPRequest) -> Response:
        return await _generate(request, chat=False)

    async def chat(request: HTTPRequest) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: HTTPRequest, chat: bool) -> Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            prompt_len = prompt_length(body, chat, count)
            asked = body.get("max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens")
            if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool)):
                raise BadRequest("max_tokens must be an integer")
            ignore_eos = body.get("ignore_eos", False)
            if not isinstance(ignore_eos, bool):
                raise BadRequest("ignore_eos must be a boolean")
        except (BadRequest, ValueError) as exc:
            return JSONResponse(error_body(str(exc)), status_code=400)
        if body.get("model") not in (None, model_name):  # vLLM answers a model it does not serve with 404
            return JSONResponse(error_body(f"The model `{body['model']}` does not exist.", 404), status_code=404)
        max_tokens, refused = live.front_door(prompt_len, asked)
        if refused:
            return JSONResponse(error_body(refused), status_code=400)
        stream = live.submit(prompt_len, max_tokens, ignore_eos)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        if body.get("stream"):
            return StreamingResponse(_events(request, stream, rid, chat, usage_wanted),
                                     media_type="text/event-stream")
        try:
            while (await stream.queue.get()) is not None:
                pass
        except asyncio.CancelledError:
            live.abort(stream)
            raise
        n = stream.sent
        text = TOKEN_TEXT * n
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": stream.finish_reason}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": stream.finish_reason,
                                "stop_reason": None})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": model_name, "choices": [choice],
                             "usage": _usage(stream.req.prompt_len, n)})

    async def _events(request: HTTPRequest, stream: Stream, rid: str, chat: bool, usage_wanted: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        made = int(time.time())
        done = False
        try:
            if chat:  # vLLM's first chat chunk carries the role only
                yield _sse({"id": rid, "object": obj, "created": made, "model": model_name,
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
            sent = 0
            while True:
                n = await stream.queue.get()
                if n is None:
                    break
                sent += n
                last = sent >= stream.req.max_tokens
                reason = stream.finish_reason if last else None
                text = TOKEN_TEXT * n
                choice = ({"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": reason}
                          if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                                        "stop_reason": None})
                yield _sse({"id": rid, "object": obj, "created": made, "model": model_name, "choices": [choice]})
            if usage_wanted:
                yield _sse({"id": rid, "object": obj, "created": made, "model": model_name, "choices": [],
                            "usage": _usage(stream.req.prompt_len, sent)})
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client went away mid-stream
                live.abort(stream)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        driver = asyncio.get_running_loop().create_task(live.run())
        try:
            yield
        finally:
            driver.cancel()

    return Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ], lifespan=lifespan)


def _render(collector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    reg.register(collector)
    return generate_latest(reg).decode()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for tests, benchmarks and examples on localhost)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, timeout_s: float = 30.0, alive=lambda: True) -> None:
    """Poll `url`/health until the server answers 200; `alive()` false means it died first."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if not alive():
            raise RuntimeError(f"the server at {url} exited before it answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server at {url} did not answer /health within {timeout_s:g} s")
        time.sleep(0.1)


@dataclass
class ServerProcess:
    url: str  # http://127.0.0.1:PORT
    output: str = ""  # what the server printed (stdout and stderr), once it has stopped


@contextlib.contextmanager
def server_process(scenario, *args: str, cwd=None):
    """`servesim serve SCENARIO ARGS...` as a process of its own on a free localhost port (for
    tests, benchmarks and examples): yields a `ServerProcess` once /health answers, and on leaving
    stops it with SIGINT, as Ctrl-C would. Its output goes to a file, not a pipe nobody reads
    until the end (a full pipe would stall the server); on an error its tail is printed."""
    import signal
    import subprocess
    import sys
    import tempfile

    port = free_port()
    cmd = [sys.executable, "-m", "sim.cli", "serve", str(scenario), "--port", str(port), *args]
    handle = ServerProcess(f"http://127.0.0.1:{port}")
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        failed = False
        try:
            wait_until_up(handle.url, alive=lambda: proc.poll() is None)
            yield handle
        except BaseException:
            failed = True
            raise
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.seek(0)
            handle.output = log.read()
            if failed:
                print(handle.output[-3000:], file=sys.stderr)


def load_eos_lengths(source: str) -> np.ndarray:
    """Reply lengths for `--eos-lengths`: "sharegpt" (the bundled ShareGPT completions) or a file
    of them (`prompt_tokens,completion_tokens`, any format the sharegpt dataset reads)."""
    from .workload import WorkloadError, load_sharegpt_lengths

    try:
        lengths = load_sharegpt_lengths(None if source == "sharegpt" else source)["completion_tokens"]
    except WorkloadError as exc:  # named for the workload's dataset_path: say which flag it was
        raise ValueError(f"--eos-lengths: {str(exc).removeprefix('workload.dataset_path: ')}") from None
    if not len(lengths):
        raise ValueError(f"--eos-lengths {source}: no reply lengths in it")
    return lengths


def serve(sc, host: str, port: int, time_scale: float, model_name: str, tokenizer: str | None = None,
          eos_lengths: np.ndarray | None = None) -> None:
    """Run the server until SIGINT or SIGTERM, then shut down cleanly and return."""
    import signal

    import uvicorn

    count = load_tokenizer(tokenizer) if tokenizer else count_by_characters
    live = LiveSim(sc, time_scale, eos_lengths=eos_lengths)
    # uvicorn stops gracefully on either signal, then hands it on to the handler that was there
    # before it; a handler that does nothing lets the command end with status 0 instead of dying
    # of the signal it already handled
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(build_app(live, model_name, count), host=host, port=port, log_level="warning")
    print(f"servesim serve: stopped (the simulation fell behind the clock by at most "
          f"{live.max_lag_s * 1000:.1f} simulated ms)")
