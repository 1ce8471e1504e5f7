"""Wire a scenario together and run it: client -> engine -> scheduler -> KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import simpy

from .client import BenchmarkClient
from .config import Scenario, _version_tuple
from .engine import Engine, SimulationStuck
from .kv_cache import KVCache
from .metrics import BenchmarkResult, calculate_metrics
from .request import Request
from .schedulers import make_scheduler
from .workload import build_requests


@dataclass
class SimResult:
    scenario: Scenario
    bench: BenchmarkResult
    requests: list[Request]
    num_steps: int
    num_preemptions: int
    max_batch_tokens: int
    max_batch_seqs: int
    peak_kv_blocks: int
    max_in_flight: int  # most requests in flight at one instant
    steps: list | None = None


def make_kv_cache(e) -> KVCache:
    """V0's block manager keeps a 1 % watermark at admission; V1 has none, and until 0.8.x it
    preallocated 64 tokens of blocks whenever a request grew (removed in later versions)."""
    if e.scheduler == "sglang":
        return KVCache(e.num_gpu_blocks, e.block_size)  # a token pool (page size 1 by default)
    if e.scheduler == "vllm-v0":
        return KVCache(e.num_gpu_blocks, e.block_size, watermark=0.01)
    prealloc = 64 if _version_tuple(e.version) < (0, 9) else 0
    return KVCache(e.num_gpu_blocks, e.block_size, preallocate_tokens=prealloc)


def simulate(sc: Scenario, record_steps: bool = False) -> SimResult:
    e, w = sc.engine, sc.workload
    env = simpy.Environment()
    requests = build_requests(w)
    kv = make_kv_cache(e)
    scheduler = make_scheduler(e, kv)
    client = BenchmarkClient(env, requests, w.max_concurrency)
    engine = Engine(env, scheduler, sc.step_time.build(), e.max_model_len, client.on_done, record_steps)
    client.start(engine.submit)

    env.run(until=client.all_done | engine.process)
    if not client.all_done.triggered:
        raise SimulationStuck("the engine stopped before every request ended")  # pragma: no cover

    unfinished = [r for r in requests if not r.done]
    if unfinished or kv.num_used:
        raise SimulationStuck(  # pragma: no cover - an invariant, checked on every run
            f"run ended with {len(unfinished)} unfinished request(s) and {kv.num_used} KV blocks in use"
        )
    duration = env.now
    rep = sc.report
    bench = calculate_metrics(
        requests,
        duration,
        [s.strip() for s in rep.percentile_metrics.split(",")],
        sorted({float(p) for p in rep.metric_percentiles.split(",")} | ({99.0} if w.client == "sglang" else set())),
        rep.goodput,
    )
    return SimResult(
        scenario=sc,
        bench=bench,
        requests=requests,
        num_steps=engine.num_steps,
        num_preemptions=scheduler.num_preemptions,
        max_batch_tokens=engine.max_batch_tokens,
        max_batch_seqs=engine.max_batch_seqs,
        peak_kv_blocks=kv.peak_used,
        max_in_flight=client.max_in_flight,
        steps=engine.steps,
    )
