"""What every scheduler shares: the batch it returns and recompute preemption.

Writing your own policy (`engine.policy = "my_policy.py:MyPolicy"`, or `--set engine.policy=...`):
subclass `Scheduler` (or an engine's scheduler, e.g. `VllmV1Scheduler`, to change one thing) and
implement `_schedule(self) -> Batch`, called once per engine step. What it sees:

- `self.waiting` (deque of `Request`, arrival order unless you reorder it) and `self.running` (list);
  a request's `num_tokens` (prompt + generated), `num_computed` (KV already computed),
  `prompt_len`, `output_len`, `max_tokens`, `arrival_s`;
- `self.kv` (`KVCache`): `allocate(req, total_tokens)` grows a request's blocks or returns False
  (nothing changes); `num_free`, `num_blocks`, `block_size`; `lookup(req)` for prefix-cache hits;
- `self.cfg` (`EngineConfig`): the budget `max_num_batched_tokens`, `max_num_seqs`, and every flag.

What it returns: a `Batch`. `batch.add(req, n)` schedules `n` of the request's uncomputed tokens
(allocate their KV first); move an admitted request from `waiting` to `running` and set its
status to `Status.RUNNING`. To make room, `self.preempt(victim, batch)` frees a running request's
KV (it rejoins `waiting` at the head after the step). The engine times the batch, advances the
requests, streams tokens and frees finished requests; the invariants (budget, KV capacity, every
request ends) are checked on every run, so a policy that breaks them fails loudly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..kv_cache import KVCache
from ..request import Request, Status
from ..step_time import BatchShape


@dataclass(slots=True)
class Batch:
    """One step's work: requests and how many tokens each computes."""

    reqs: list[Request] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    shape: BatchShape = field(default_factory=BatchShape)
    preempted: list[Request] = field(default_factory=list)
    decode: list[bool] = field(default_factory=list)  # per request: a decode (maybe verifying drafts)
    aborted: list[Request] = field(default_factory=list)  # handed back for a re-prefill elsewhere

    def add(self, req: Request, n: int, decode: bool | None = None) -> None:
        """`decode`: the scheduler's own word; by default, one token after a generated one."""
        self.reqs.append(req)
        self.num_new.append(n)
        if decode is None:
            decode = n == 1 and req.output_len > 0 and req.num_computed == req.num_tokens - 1
        self.decode.append(decode)
        self.shape.add_chunk(req.num_computed, n, decode)

    def __len__(self) -> int:
        return len(self.reqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    """Holds the waiting and running queues; subclasses decide each step's batch."""

    name = "base"

    def __init__(self, cfg, kv: KVCache):
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # requests the scheduler rejected itself (e.g. can never fit): the engine reports them
        self.rejected: list[Request] = []
        self.steps_done = 0  # kept up to date by the engine
        # vllm-ascend's RecomputeScheduler on a KV consumer: a victim is handed back to the
        # deployment (to be prefilled again on P) instead of being preempted here
        self.on_recompute = None
        self.num_recomputes = 0

    # --- queue plumbing ----------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def release_finished(self, finished: list[Request]) -> None:
        """Called by the engine after a step: finished requests leave and free their KV."""
        for req in finished:
            if not req.hold_kv:
                self.kv.free(req)
        self.running = [r for r in self.running if r.status is not Status.FINISHED]

    # --- the decode side of prefill/decode disaggregation ---------------------------------
    def admit_transferred(self, req: Request, computed: int) -> None:
        """A request whose prompt KV arrived from a prefill engine (blocks already allocated).

        With the first token already sampled on P (SGLang keeps it) the request decodes from
        here; with the last prompt token uncomputed it waits for a one-token step that samples
        the first token (vLLM's D recomputes it and discards P's).
        """
        req.num_computed = computed
        if req.output_len > 0:
            req.status = Status.RUNNING
            self.running.append(req)
        else:
            req.status = Status.WAITING
            self.waiting.append(req)

    def reject(self, req: Request, reason: str) -> None:
        req.status = Status.FAILED
        req.end_step = self.steps_done
        req.error = reason
        self.kv.free(req)
        self.rejected.append(req)

    def preempt(self, req: Request, batch: Batch) -> None:
        """Preemption by recompute: drop the KV, re-prefill prompt + output later.

        Tokens already streamed to the client are kept. The victim rejoins the waiting
        queue at the end of the step (see `schedule`), so it cannot be re-admitted in the
        step that preempted it.
        """
        self.kv.free(req)
        req.num_computed = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.num_preemptions += 1
        batch.preempted.append(req)

    def evict(self, req: Request, batch: Batch) -> None:
        """Make room by taking `req`'s KV: a recompute preemption, or on a vllm-ascend consumer
        with the recompute scheduler an abort ("recomputed") that the proxy re-routes through P.
        Either way no waiting request is admitted in this step."""
        if self.on_recompute is None:
            self.preempt(req, batch)
            return
        self.kv.free(req)
        req.num_computed = 0
        self.num_recomputes += 1
        batch.aborted.append(req)

    def preempt_self(self, req: Request, batch: Batch) -> None:
        """`req` cannot get a slot even after every request behind it was preempted.

        If every other block is held by waiting requests (PD: requests whose KV arrived, queued
        behind it), nothing will ever free memory for it: re-admitting it changes nothing and
        it would be preempted again forever (real vLLM livelocks here, e.g. a one-block V0
        pool under the touched-block rule, or a decode instance whose pool is full of
        transferred requests). The simulator never hangs, so such a request is rejected
        instead, with the reason.
        """
        if self.kv.num_used - req.num_blocks == sum(r.num_blocks for r in self.waiting):
            self.reject(req, f"request needs more KV blocks than the cache has ({self.kv.num_blocks} blocks of "
                             f"{self.kv.block_size} tokens) even with nothing else running")
            return
        self.preempt(req, batch)

    def schedule(self) -> Batch:
        """One step's batch. Preempted requests go back to the head of `waiting`.

        Victims come off the tail of `running` (newest first); prepending them one by one
        leaves the oldest victim at the very head, as vLLM V0's `extendleft` and V1's
        `prepend_request` both do.
        """
        batch = self._schedule()
        self.waiting.extendleft(batch.preempted)
        for req in batch.aborted:
            self.on_recompute(req)
        return batch

    def _schedule(self) -> Batch:  # pragma: no cover - interface
        raise NotImplementedError
