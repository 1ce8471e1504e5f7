"""Prefill/decode disaggregation: P engines compute prompts, D engines generate.

Per request (router: one P and one D, as SGLang's mini_lb and vLLM's proxy pick them):

SGLang design (`pd_design = "sglang"`):
  1. D pre-allocates the prompt's KV, admitting FIFO only if prompt + reserved decode tokens
     (512) fit in its free pool after reserving 512 for every request it already holds;
     until then the request waits in P's bootstrap queue (D's memory throttles P).
  2. P prefills it as a one-token request and keeps its KV.
  3. The KV crosses P's link (latency + bytes / bandwidth, FIFO per P instance); P frees it.
  4. D streams P's first token and decodes the rest.

vLLM design (`pd_design = "vllm"`, NIXL/Mooncake connectors):
  1. P prefills first (max_tokens = 1) and keeps the blocks.
  2. D admits FIFO when blocks for the whole prompt are free, then pulls the KV.
  3. D recomputes the last prompt token; its sample is the client's first token (P's is
     discarded).
  With vllm-ascend's recompute scheduler (`recompute_scheduler = true`), a request D cannot
  grow is aborted instead of preempted, and goes through P again with its prompt plus the
  tokens it has generated; the client sees one long gap in the stream.

TTFT and TPOT are measured at the client exactly as for one instance.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import simpy

from .config import ScenarioError, check_fits_in_memory, role_config
from .deployment import BYTES_PER_INSTANCE, Router
from .engine import Engine, front_door_error
from .instance import make_engine
from .request import Request, Status
from .tokens import StepClock, emit_chunk


@dataclass
class Transfer:
    rid: int
    link: int
    start_s: float
    end_s: float
    bytes: float


class PDDeployment:
    def __init__(self, env: simpy.Environment, sc, on_done: Callable[[Request], None], record_steps: bool,
                 compress: bool = True):
        # decode engines compress runs of decode steps; the hand-off settles a decode engine's run
        # before touching its KV pool (Engine.settle). Prefill engines have no decode runs.
        self.env, self.sc, self.on_done = env, sc, on_done
        d = sc.deployment
        self.design = d.pd_design or ("sglang" if sc.engine.scheduler == "sglang" else "vllm")
        p_eng, p_st = role_config(sc, "prefill")
        d_eng, d_st = role_config(sc, "decode")
        self.max_model_len = min(p_eng.max_model_len, d_eng.max_model_len)
        self.front_door = "sglang" if sc.engine.scheduler == "sglang" else "vllm"
        p_model, d_model = p_st.build(), d_st.build()
        for field in ("prefill_instances", "decode_instances"):
            check_fits_in_memory(getattr(d, field), BYTES_PER_INSTANCE, f"deployment.{field}", "engine instances")
        self.prefill = [make_engine(env, p_eng, p_model, self._prefilled, record_steps, compress=False)
                        for _ in range(d.prefill_instances)]
        self.decode = [make_engine(env, d_eng, d_model, self._decoded, record_steps,
                                   spec_seed=sc.workload.seed * 1000 + i, compress=compress)
                       for i in range(d.decode_instances)]
        self.p_router = Router(d.router, d.prefill_instances, sc.workload.seed)
        self.d_router = Router(d.router, d.decode_instances, sc.workload.seed + 1)
        self.links = [simpy.Resource(env, capacity=1) for _ in self.prefill]
        self.transfers: list[Transfer] = []
        self.first_token_clock = StepClock()  # SGLang design: P's first token reaches the client when its KV lands
        self.reserved = d.reserved_decode_tokens
        self.queues: list[deque] = [deque() for _ in self.decode]  # D admission queues (FIFO)
        self.holding = [0] * len(self.decode)  # requests holding KV on D but not yet in its queues
        for i, eng in enumerate(self.decode):
            eng.after_step.append(lambda i=i: self._admit(i))
            eng.hooks_idle = lambda i=i: not self.queues[i]  # nobody waits for D's memory
            eng.step_markers = True  # P engines' events may coincide with D's step ends
        if d.recompute_scheduler:
            if self.design != "vllm" or d_eng.scheduler != "vllm-v1":
                raise ScenarioError("deployment.recompute_scheduler: vllm-ascend's recompute scheduler needs "
                                    "pd_design = \"vllm\" and a vllm-v1 decode engine")
            for eng in self.decode:
                eng.scheduler.on_recompute = self._recompute
        t = sc.kv_transfer
        self.latency, self.bandwidth, self.layerwise = t.latency_s, t.bandwidth_gbps * 1e9, t.layerwise
        spec = getattr(p_model, "model", None)
        if t.bytes_per_token is not None:
            self.bytes_per_token = t.bytes_per_token
        elif spec is not None:
            self.bytes_per_token = spec.kv_bytes_per_token(p_model.tp)
        else:
            raise ValueError("kv_transfer.bytes_per_token: needed when the step-time model has no model spec")
        self.num_layers = spec.num_layers if spec is not None else 1
        self._jobs: dict[int, tuple[Request, int, int]] = {}  # P job id -> (request, P, D)
        self._prefill_start: dict[int, float] = {}
        self._pending_jobs: dict[int, tuple[Request, float]] = {}  # vLLM: finished P jobs awaiting D

    @property
    def engines(self) -> list[Engine]:
        return self.prefill + self.decode

    @property
    def processes(self):
        return [e.process for e in self.engines]

    # --- arrival ---------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        error = front_door_error(req, self.max_model_len, self.front_door)
        if error:
            req.status, req.error = Status.FAILED, error
            self.on_done(req)
            return
        p, dd = self.p_router.pick(), self.d_router.pick()
        req.instance = dd
        self.p_router.outstanding[p] += 1
        self.d_router.outstanding[dd] += 1
        if self.design == "sglang":
            self.queues[dd].append((req, p))  # D pre-allocates first; P waits in its bootstrap queue
            self._admit(dd)
        else:
            self._start_prefill(req, p, dd)

    def _start_prefill(self, req: Request, p: int, dd: int) -> None:
        # a re-routed request is prefilled with everything it has generated so far
        job = Request(rid=req.rid, prompt_len=req.num_tokens, max_tokens=1, arrival_s=req.arrival_s,
                      start_s=req.start_s, hold_kv=True)
        self._jobs[id(job)] = (req, p, dd)
        self._prefill_start[id(job)] = self.env.now
        self.prefill[p].submit(job)

    def _recompute(self, req: Request) -> None:
        """D aborted `req` ("recomputed"); the proxy sends prompt + generated text to a P node and
        the stream continues from D once the new KV arrives."""
        dd = req.instance
        p = self.p_router.pick()
        self.p_router.outstanding[p] += 1
        self._start_prefill(req, p, dd)

    # --- D admission -------------------------------------------------------------------------
    def _admit(self, dd: int) -> None:
        eng = self.decode[dd]
        eng.settle()
        kv, sched = eng.scheduler.kv, eng.scheduler
        q = self.queues[dd]
        cap = sched.cfg.max_running_requests if sched.name == "sglang" else sched.cfg.max_num_seqs
        while q:
            req, p = q[0]
            if len(sched.running) + len(sched.waiting) + self.holding[dd] >= cap:
                return  # D holds as many requests as it may run
            idle = not (sched.running or sched.waiting or self.holding[dd])
            if self.design == "sglang":
                held = len(sched.running) + len(sched.waiting) + self.holding[dd]
                free_tokens = kv.num_free * kv.block_size - self.reserved * held
                fits = free_tokens >= req.prompt_len + self.reserved
            else:
                fits = kv.blocks_for(req.num_tokens) <= kv.num_free
            if not fits:
                if idle:  # nothing on D will ever free memory: this request can never be admitted
                    q.popleft()
                    job_info = self._pending_jobs.pop(req.rid, None)
                    if job_info is not None:
                        self.prefill[p].scheduler.kv.free(job_info[0])
                        self.prefill[p].wake()
                    self._fail(req, p, dd, f"prompt ({req.prompt_len} tokens) plus the decode reservation "
                                           f"never fits the decode instance's KV pool ({kv.capacity_tokens} tokens)")
                    continue
                return  # FIFO: the head blocks the rest until memory frees
            kv.allocate(req, req.num_tokens)
            q.popleft()
            self.holding[dd] += 1
            if self.design == "sglang":
                self._start_prefill(req, p, dd)
            else:
                self.env.process(self._transfer(req, p, dd, None))

    # --- P done -> transfer -> D ---------------------------------------------------------------
    def _prefilled(self, job: Request) -> None:
        req, p, dd = self._jobs.pop(id(job))
        if job.status is Status.FAILED:  # P could never fit it
            self.decode[dd].settle()
            self.decode[dd].scheduler.kv.free(req)
            self.decode[dd].wake()  # the memory it held may let D's waiting head run
            if self.design == "sglang":
                self.holding[dd] -= 1
            self._fail(req, p, dd, job.error)
            return
        started = self._prefill_start.pop(id(job))
        if self.design == "sglang":
            self.env.process(self._transfer(req, p, dd, (job, started)))
        else:
            self.queues[dd].append((req, p))
            self._pending_jobs[req.rid] = (job, started)
            self._admit(dd)

    def _transfer(self, req: Request, p: int, dd: int, job_info):
        if job_info is None:  # vLLM: the P job finished before D admitted the request
            job_info = self._pending_jobs.pop(req.rid)
        job, prefill_start = job_info
        size = req.num_tokens * self.bytes_per_token
        with self.links[p].request() as slot:
            yield slot
            t0 = self.env.now
            duration = self.latency + size / self.bandwidth
            if self.layerwise:
                # pushed layer by layer during the prefill: only what the link could not hide remains
                hidden = max(0.0, t0 - prefill_start)
                duration = max(self.latency + size / self.bandwidth / self.num_layers,
                               self.latency + size / self.bandwidth - hidden)
            yield self.env.timeout(duration)
            self.transfers.append(Transfer(req.rid, p, t0, self.env.now, size))
        self.prefill[p].scheduler.kv.free(job)  # P keeps the KV until the transfer ends
        self.prefill[p].wake()  # the freed memory may admit P's waiting requests
        self.p_router.outstanding[p] -= 1
        self.holding[dd] -= 1
        eng = self.decode[dd]
        eng.settle()  # its queues (and maybe its pool) change now
        if self.design == "sglang":
            req.output_len = 1  # P's first token, streamed by D
            emit_chunk(req, self.first_token_clock, self.first_token_clock.tick(self.env.now))
            if req.max_tokens == 1:
                req.status = Status.FINISHED
                eng.scheduler.kv.free(req)
                eng.wake()  # the memory it held may let D's waiting head run
                self._finish(req, dd)
                return
            eng.scheduler.admit_transferred(req, computed=req.prompt_len)
        else:
            eng.scheduler.admit_transferred(req, computed=req.num_tokens - 1)
        eng.wake()

    # --- D done ------------------------------------------------------------------------------------
    def _decoded(self, req: Request) -> None:
        self._finish(req, req.instance)

    def _finish(self, req: Request, dd: int) -> None:
        self.d_router.outstanding[dd] -= 1
        self.on_done(req)
        self._admit(dd)

    def _fail(self, req: Request, p: int, dd: int, error: str) -> None:
        req.status, req.error = Status.FAILED, error
        self.p_router.outstanding[p] -= 1
        self.d_router.outstanding[dd] -= 1
        self.on_done(req)
        self._admit(dd)  # whatever it held on D is free again
