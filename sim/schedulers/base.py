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

Event compression: after planning a step, the engine asks `steady_steps(batch)` how many steps,
this one included, would plan exactly the same pure-decode batch if nothing arrived, and runs
them as one event (sim.engine). The default answer is 1 (plan every step), so a policy that
overrides `_schedule` is simulated step by step unless it also answers `steady_steps`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mypy_extensions import mypyc_attr

from ..decode_group import DecodeGroup
from ..kv_cache import KVCache, KVCacheError
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
    group: int = 0  # the first `group` entries are the decode group's (sim.decode_group), one token each

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


@mypyc_attr(allow_interpreted_subclasses=True)
class Scheduler:
    """Holds the waiting and running queues; subclasses decide each step's batch."""

    name: ClassVar[str] = "base"

    def __init__(self, cfg, kv: KVCache):
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # requests the scheduler rejected itself (e.g. can never fit): the engine reports them
        self.rejected: list[Request] = []
        # vllm-ascend's RecomputeScheduler on a KV consumer: a victim is handed back to the
        # deployment (to be prefilled again on P) instead of being preempted here
        self.on_recompute: Any = None
        self.num_recomputes = 0
        # event compression (set by the engine): plan steady decodes as one DecodeGroup
        self.compress = False
        self.decode_clock: Any = None  # the engine's decode clock, which the group's tokens land on
        self.group: Any = None
        self._run_state: Any = None  # the decode group's planned batch and its run (see _decode_all)
        # does this class plan with the `_schedule` the compression rules were written for? (the
        # class that defines `_schedule` says so; asked per plan, so answered once here)
        owner = next(c for c in type(self).__mro__ if "_schedule" in vars(c))
        self._as_written: bool = vars(owner).get("compress_rules", False) is True
        # SGLang's overlap scheduler forms step N+1 before it reads step N's results, so a request
        # whose last token came in step N is still in step N+1 (it decodes once more, for nothing)
        # and its slot and KV are freed only after that step is launched (see `release_finished`)
        self.late_release = False
        self.lingering: list[Request] = []  # finished in the last step, released after this one

    # --- queue plumbing ----------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def release_finished(self, finished: list[Request]) -> None:
        """Called by the engine after a step: finished requests leave and free their KV, or with
        `late_release` leave `running` but keep their slot and KV through the next step."""
        for req in finished:
            if req.hold_kv:  # a PD prefill job keeps its KV until the transfer
                continue
            if self.late_release:
                self.lingering.append(req)
            else:
                self.kv.free(req)
        if len(finished) < 8:
            for req in finished:  # remove() compares by identity, in C
                self.running.remove(req)
        else:
            self.running = [r for r in self.running if r.status is not Status.FINISHED]

    def release_lingering(self) -> None:
        """Called by the engine after each step: the requests that finished the step before, which
        this step still carried, free their KV."""
        for req in self.lingering:
            self.kv.free(req)
        self.lingering = []

    def _carry_lingering(self, batch: Batch) -> None:
        """The finished requests a late-releasing engine does not know are finished decode in this
        batch once more: their token counts in the step's shape and is thrown away. (Its one KV slot
        is not taken: it is freed within the step.)"""
        for req in self.lingering:
            batch.shape.add_chunk(req.num_computed, 1, True)

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
        if req.status is Status.RUNNING:
            self._sync_group()  # it may be a member of the decode group
        req.status = Status.FAILED
        req.error = reason
        self.kv.free(req)
        self.rejected.append(req)

    def abort(self, req: Request) -> None:
        """The client went away: the request leaves its queue and frees its KV at once (vLLM's
        abort_requests, SGLang's abort), planned between steps by the engine."""
        self._sync_group()
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = Status.FAILED

    def preempt(self, req: Request, batch: Batch) -> None:
        """Preemption by recompute: drop the KV, re-prefill prompt + output later.

        Tokens already streamed to the client are kept. The victim rejoins the waiting
        queue at the end of the step (see `schedule`), so it cannot be re-admitted in the
        step that preempted it.
        """
        self._sync_group()
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
        self._sync_group()
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

    # --- event compression -------------------------------------------------------------------
    def steady_steps(self, batch: Batch) -> int:
        """How many steps, this one included, would schedule this same batch again if nothing
        arrived. 1: plan the next step as usual. The engines' schedulers answer with
        `_decode_run_steps` when they can show their admission rules stay shut."""
        return 1

    # True in each engine's scheduler class, beside the `_schedule` for which the compression
    # rules below were written; a policy that overrides `_schedule` plans every step
    compress_rules: ClassVar[bool] = False

    def _plans_as_written(self) -> bool:
        return self._as_written

    def arrival_may_change_plan(self) -> bool:
        """Asked during a run of steady decode steps, after a request joined `waiting`: could the
        next plan differ from the run's? Not for the engines' schedulers when the newcomer is not
        the head: vLLM's admission is first come, first served and stops at the head, which the
        run's plan found blocked; SGLang runs with requests waiting only when the batch is full
        (max_running_requests), and that ends with a completion, which ends the run anyway."""
        return not self._plans_as_written() or len(self.waiting) <= 1

    def _sync_group(self) -> None:
        """Bring every request's fields up to date before code that reads them one by one. A
        batch planned with the group becomes an ordinary batch (its blocks are already held)."""
        if self.group is not None and len(self.group):
            self.group.dissolve()
        if self._run_state is not None:
            self._run_state[0].group = 0
            self._run_state = None

    def _decode_all(self, batch: Batch, kv_reserve: int, budget: int | None = None, whole: bool = False) -> int:
        """With event compression: schedule the decoding requests at the head of `running` for
        one token each at once, as the per-request loop would: each has exactly one uncomputed
        token after generated ones, the token budget (if any) covers them, and the pool covers
        all their growth with `kv_reserve` blocks to spare (no allocation fails, no
        preallocation is cut short, no free-slot check trips). Same blocks, same batch, same
        order; they decode as a `DecodeGroup`, kept as counts. Returns how many were scheduled (the
        caller plans the rest of `running` request by request); 0: nothing was changed.
        `whole`: all of `running` or none."""
        if not self.compress or self.cfg.num_speculative_tokens:
            return 0
        running = self.running
        group = self.group
        if group is None:
            group = self.group = DecodeGroup(self.decode_clock, self.kv.block_size, self.kv.preallocate_blocks,
                                             self.kv.prefix)
        m = len(group)
        if (m and (len(running) < m or running[m - 1] is not group.reqs[-1])) or group.taken_to != group.adv:
            raise RuntimeError("decode group out of step with the running queue")  # pragma: no cover
        k = m
        for r in running[m:]:  # decoders right behind the members join them
            if not r.output_len or r.num_computed != r.num_tokens - 1:
                break
            k += 1
        if k > m:
            group.join(running[m:k])
        if not k or (whole and k < len(running)) or (budget is not None and budget < k):
            return 0
        kv = self.kv
        due = group.blocks_due()  # members whose blocks are full take one and the preallocation
        if due > kv.num_free - kv_reserve:
            return 0
        if due:
            kv.take_blocks(due)
        group.take()
        batch.reqs.extend(group.reqs)
        batch.num_new.extend([1] * k)
        batch.decode.extend([True] * k)
        batch.group = k
        shape = batch.shape
        shape.num_seqs += k
        shape.decode_seqs += k
        shape.decode_ctx_tokens += group.sum_computed() + k
        # batch, the fewest tokens left, the run's KV growth: for how many steps it was worked
        # out and what it is, and for how many steps it was already taken (a settled run, see
        # Engine)
        self._run_state = [batch, group.fewest_left(), 0, 0, 0]
        return k

    def _decode_run_steps(self, batch: Batch, kv_reserve: int, chunk_steps: int = 0, chunk_blocks=None) -> int:
        """For a batch in which the decode group (every running request) decodes one token and
        nothing else happens: the steps until the first request finishes, fewer if the KV pool
        could run short (the growth must never need more than `num_free - kv_reserve` blocks, so
        every allocation and every free-slot check succeeds exactly as step by step).
        `chunk_steps`: the batch also carries the one other running request's prompt chunk,
        which the caller showed stays the same for that many steps; `chunk_blocks(m)`: the
        blocks it takes in the m steps after the first (None: none, its prompt's are held).

        Why the batch repeats: each request's next step is again one decode token; the engine's
        admission rules were just tried and stopped, and a run of decodes only takes free
        blocks away, so they stay shut until something arrives (which ends the run)."""
        state = self._run_state
        if (state is None or state[0] is not batch or batch.group + (1 if chunk_steps else 0) != len(batch.reqs)
                or batch.preempted or batch.aborted or self.rejected or len(self.running) != len(batch.reqs)):
            return 1
        steps = state[1]  # the last step is the first completion
        if chunk_steps:
            steps = min(steps, chunk_steps)
        if steps < 2:
            return 1
        if self.waiting and self.group.registers_prompt_chunks():
            return 1  # the waiting head may hit the prompt chunks cached after this step
        limit = self.kv.num_free - kv_reserve
        due = self.group.blocks_due(steps - 1)
        if due + (chunk_blocks(steps - 1) if chunk_blocks else 0) <= limit:
            state[2], state[3] = steps, due  # kept for advance_decode_run if the run is not cut short
            return steps
        lo, hi = 0, steps - 1  # growth over `lo` extra steps fits, over `hi` it does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.group.blocks_due(mid) + (chunk_blocks(mid) if chunk_blocks else 0) <= limit:
                lo = mid
            else:
                hi = mid
        return lo + 1

    def advance_decode_run(self, batch: Batch, steps: int) -> int:
        """The engine ran `steps` steps of the decode group's batch (the first one planned by
        `schedule`): allocate the KV the other steps took, as they would have one by one.
        Returns the fewest tokens any member had left before the run."""
        _, fewest, due_for, due, settled = self._run_state
        self._run_state = None
        if settled:
            if settled != steps:  # pragma: no cover - an invariant
                raise RuntimeError(f"decode run settled at {settled} steps, ended after {steps}")
        elif steps > 1:
            if due_for != steps:  # worked out for the whole run; this one was cut short
                due = self.group.blocks_due(steps - 1)
            self._take_run_blocks(due, steps - 1)
        self.group.advance(steps)
        return fewest

    def advance_chunk(self, req: Request, n: int, steps: int) -> None:
        """The prompt chunk that ran along the decode group for `steps` steps (`steady_steps`):
        `n` more tokens computed each, their KV already held (vLLM V0 allocates a prompt's
        blocks at admission); full chunks become reusable as step by step."""
        req.num_computed += n * steps
        if self.kv.prefix is not None:
            self.kv.prefix.register(req)

    def settle_decode_run(self, steps: int) -> None:
        """The run will end after `steps` steps and someone outside the engine needs its KV pool
        now: the blocks of the steps planned so far are taken now."""
        if steps > 1:
            self._take_run_blocks(self.group.blocks_due(steps - 1), steps - 1)
        self._run_state[4] = steps

    def _take_run_blocks(self, total: int, steps: int) -> None:
        """The `total` blocks of `steps` more steps of the run are taken now (after the run's
        first step, so new members' chunks are registered first)."""
        self.group.register_fresh()
        kv = self.kv
        if total > kv.num_free:
            raise KVCacheError(f"a decode run needs {total} blocks, {kv.num_free} free")
        if total:
            kv.take_blocks(total)
        self.group.take(steps)
