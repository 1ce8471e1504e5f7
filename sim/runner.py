"""Wire a scenario together and run it: client -> engine -> scheduler -> KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import simpy

from .client import BenchmarkClient
from .config import Scenario
from .deployment import Deployment
from .pd import PDDeployment
from .engine import SimulationStuck
from .instance import make_kv_cache  # noqa: F401 - its documented import path (sim.runner.make_kv_cache)
from .metrics import BenchmarkResult, calculate_metrics
from .request import Request, Status
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
    steps: list | None = None  # recorded steps of a single-instance run
    instance_steps: list | None = None  # recorded steps per instance (PD: prefill engines first)
    transfers: list | None = None  # PD: every KV transfer (request, link, start, end, bytes)
    prefix_hit_tokens: int = 0  # prompt tokens served from prefix caches instead of computed
    prefix_query_tokens: int = 0  # prompt tokens looked up at admissions (hit rate = hits / queries)
    num_recomputes: int = 0  # vllm-ascend recompute scheduler: requests D sent back through P
    instance_kv_blocks: list | None = None  # KV pool of each instance (blocks)
    instance_gpus: list | None = None  # devices of each instance (its tensor-parallel degree)
    num_plans: int = 0  # scheduler calls (see Engine.num_plans)


KEEP_TOKEN_TIMES_UP_TO = 100_000  # requests; beyond, only the aggregates are kept (memory)


def simulate(sc: Scenario, record_steps: bool = False, keep_token_times: bool | None = None,
             compress: bool = True) -> SimResult:
    """Run one scenario.

    record_steps: keep every engine step (timelines, calibration); steps are then simulated
    one by one. keep_token_times: keep every token's time on the requests (default: with
    record_steps, or for runs of up to 100,000 requests); the report never needs them.
    compress: advance runs of identical decode steps in one event (sim.engine); False runs
    every step through the scheduler, the reference the compressed path is tested against.
    """
    w = sc.workload
    env = simpy.Environment()
    requests = build_requests(w)
    if keep_token_times is None:
        keep_token_times = record_steps or len(requests) <= KEEP_TOKEN_TIMES_UP_TO
    client = BenchmarkClient(env, requests, w.max_concurrency, w.think_time_s, keep_token_times,
                             w.stage_interval_s if w.stages else None, w.request_timeout_s)
    pd = sc.deployment.mode == "pd"
    # a client deadline can fall inside a run of decode steps that compression advances as one
    # event, where a request's fields are not yet up to date: with one, every step is its own
    compress = compress and not record_steps and w.request_timeout_s is None
    dep = (PDDeployment if pd else Deployment)(env, sc, client.on_done, record_steps, compress=compress)
    client.start(dep.submit, getattr(dep, "abort", None))

    try:
        env.run(until=simpy.AnyOf(env, [client.all_done, *dep.processes]))
    except RuntimeError as exc:
        if "No scheduled events left" not in str(exc):
            raise
        waiting = [r.rid for r in requests if not r.done]
        raise SimulationStuck(
            f"nothing can happen any more but {len(waiting)} request(s) never ended (first: {waiting[:5]}); "
            "a queue is waiting for memory that will never be freed"
        ) from None
    if not client.all_done.triggered:
        raise SimulationStuck("the engine stopped before every request ended")  # pragma: no cover

    for r in requests:
        if r.aborted:  # the client gave up on it: a failure, however the server ended it
            r.status = Status.FAILED
    unfinished = [r for r in requests if not r.done]
    for eng in dep.engines:  # the step after the last completion frees what it carried (SGLang's overlap)
        eng.scheduler.release_lingering()
    in_use = sum(eng.scheduler.kv.num_used for eng in dep.engines)
    if unfinished or in_use:
        raise SimulationStuck(  # pragma: no cover - an invariant, checked on every run
            f"run ended with {len(unfinished)} unfinished request(s) and {in_use} KV blocks in use"
        )
    for eng in dep.engines:
        cache = eng.scheduler.kv.prefix
        if cache is not None and (cache.free_blocks() != eng.scheduler.kv.num_free
                                  or cache.referenced()):
            raise SimulationStuck(  # pragma: no cover - an invariant, checked on every run
                "prefix cache out of step with the KV pool: "
                f"{cache.free_blocks()} blocks queued, {eng.scheduler.kv.num_free} free")
    duration = client.end_s  # the client's last end (an aborted request may be let go later)
    rep = sc.report
    bench = calculate_metrics(
        requests,
        duration,
        [s.strip() for s in rep.percentile_metrics.split(",")],
        sorted({float(p) for p in rep.metric_percentiles.split(",")} | ({99.0} if w.client == "sglang" else set())),
        rep.goodput,
        client.stats,
    )
    engines = dep.engines
    caches = [g.scheduler.kv.prefix for g in engines if g.scheduler.kv.prefix is not None]
    return SimResult(
        scenario=sc,
        bench=bench,
        requests=requests,
        num_steps=sum(g.num_steps for g in engines),
        num_preemptions=sum(g.scheduler.num_preemptions for g in engines),
        max_batch_tokens=max(g.max_batch_tokens for g in engines),
        max_batch_seqs=max(g.max_batch_seqs for g in engines),
        peak_kv_blocks=max(g.scheduler.kv.peak_used for g in engines),
        max_in_flight=client.max_in_flight,
        steps=engines[0].steps if len(engines) == 1 else None,
        instance_steps=[g.steps for g in engines] if record_steps else None,
        transfers=dep.transfers if pd else None,
        prefix_hit_tokens=sum(c.hit_tokens for c in caches),
        prefix_query_tokens=sum(c.query_tokens for c in caches),
        num_recomputes=sum(g.scheduler.num_recomputes for g in engines),
        instance_kv_blocks=[g.scheduler.kv.num_blocks for g in engines],
        instance_gpus=[getattr(g.step_model, "tp", 1) for g in engines],
        num_plans=sum(g.num_plans for g in engines),
    )
