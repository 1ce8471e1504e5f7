"""vLLM V0 scheduler (`vllm/core/scheduler.py`, v0.5–v0.8), single-sequence requests.

Two modes, as in the engine:
- chunked prefill off (`_schedule_default`): a step is prefill-only or decode-only. New
  prompts are admitted strictly first-come-first-served, whole; if any prefill is
  scheduled, no decode runs in that step.
- chunked prefill on (`_schedule_chunked_prefill`): one shared token budget, filled by the
  running queue in order (decodes, then unfinished prefill chunks) and then by new
  prefills, which may be chunked but get KV blocks for the whole prompt at admission.
Preemption is by recompute (swap is only used for n > 1 or beam search, not modelled).
"""

from __future__ import annotations

from collections import deque
from typing import ClassVar

from mypy_extensions import mypyc_attr

from ..kv_cache import AllocStatus
from ..request import Request, Status
from .base import Batch, Scheduler


@mypyc_attr(allow_interpreted_subclasses=True)
class VllmV0Scheduler(Scheduler):
    name: ClassVar[str] = "vllm-v0"

    def _prompt_limit(self) -> int:
        if self.cfg.enable_chunked_prefill:
            return self.cfg.max_model_len
        return min(self.cfg.max_model_len, self.cfg.max_num_batched_tokens)

    def _schedule(self) -> Batch:
        if self.cfg.enable_chunked_prefill:
            return self._schedule_chunked_prefill()
        return self._schedule_default()

    compress_rules: ClassVar[bool] = True  # see Scheduler.compress_rules

    # --- admission of waiting requests (both modes) ------------------------------

    def _schedule_prefills(self, batch: Batch, token_budget: int, num_seqs: int, chunking: bool) -> int:
        """Walk `waiting` from the head; return the token budget left.

        Strict FCFS: the first request that does not fit (budget, seqs or KV "later") stops
        the walk, so it blocks everyone behind it.
        """
        kv = self.kv
        limit = self._prompt_limit()
        admitted: list[Request] = []
        while self.waiting:
            req = self.waiting[0]
            remaining = req.num_tokens - req.num_computed
            n = min(remaining, token_budget) if chunking else remaining
            if n > limit:
                self.waiting.popleft()
                self.reject(req, f"Input prompt ({n} tokens) is too long and exceeds limit of {limit}")
                continue
            verdict = kv.can_allocate(remaining)
            if verdict is AllocStatus.LATER:
                break
            if verdict is AllocStatus.NEVER:
                self.waiting.popleft()
                self.reject(
                    req,
                    f"Input prompt ({remaining} tokens) is too long and exceeds the capacity of block_manager",
                )
                continue
            if n == 0 or n > token_budget or num_seqs + 1 > self.cfg.max_num_seqs:
                break
            self.waiting.popleft()
            kv.allocate(req, remaining)  # whole prompt, even when only a chunk runs now
            req.status = Status.RUNNING
            admitted.append(req)
            batch.add(req, n)
            token_budget -= n
            num_seqs += 1
        self.running.extend(admitted)
        return token_budget

    # --- running requests ----------------------------------------------------------
    def _ensure_slot(self, req: Request, queue: deque[Request], batch: Batch) -> bool:
        """Make room for `req`'s next token by preempting from the tail of `queue`.

        Returns False if `req` itself had to be preempted.
        """
        while not self.kv.can_append_slots(req):
            if queue:
                self.preempt(queue.pop(), batch)  # the most recently admitted request
            else:
                self.preempt_self(req, batch)  # nothing left behind it
                return False
        return True

    def _schedule_running(self, batch: Batch, token_budget: int, chunking: bool) -> int:
        """Walk the running queue in order; return the token budget left.

        The running queue is rebuilt as: requests the budget did not reach (they keep
        their place at the head), then this step's decodes, then its prefill chunks,
        those finishing their prompt first.
        """
        # the decoding requests at the head, at once (the loop's outcome for them); then the rest
        g = self._decode_all(batch, kv_reserve=1, budget=token_budget if chunking else None)
        if g == len(self.running):
            return token_budget - g
        if not g:
            self._sync_group()
        token_budget -= g
        group = self.running[:g]
        queue = deque(self.running[g:])
        decodes: list[Request] = []
        finishing: list[Request] = []  # prefill chunks that complete the prompt this step
        chunks: list[Request] = []
        while queue:
            req = queue[0]
            remaining = req.num_tokens - req.num_computed
            n = min(remaining, token_budget) if chunking else remaining
            if n == 0:
                break  # budget exhausted: V0 stops here
            queue.popleft()
            if not self._ensure_slot(req, queue, batch):
                continue
            self.kv.allocate(req, req.num_computed + n)
            batch.add(req, n)
            token_budget -= n
            if remaining == 1:
                decodes.append(req)
            else:
                (finishing if n == remaining else chunks).append(req)
        if queue and g:
            self._sync_group()  # requests the budget did not reach go first: the group is no longer the head
        self.running = list(queue) + group + decodes + finishing + chunks
        return token_budget

    # --- the two modes -----------------------------------------------------------------
    def _schedule_default(self) -> Batch:
        batch = Batch()
        # running sequences count against max_num_seqs before any prefill is admitted
        self._schedule_prefills(batch, self.cfg.max_num_batched_tokens, len(self.running), chunking=False)
        if len(batch) == 0:
            self._schedule_running(batch, self.cfg.max_num_batched_tokens, chunking=False)
        return batch

    def _schedule_chunked_prefill(self) -> Batch:
        batch = Batch()
        budget = self._schedule_running(batch, self.cfg.max_num_batched_tokens, chunking=True)
        # only the running requests scheduled this step count against max_num_seqs
        self._schedule_prefills(batch, budget, len(batch), chunking=True)
        return batch

    def steady_steps(self, batch: Batch) -> int:
        if not self._plans_as_written():
            return 1  # a policy that plans differently plans every step
        # admission stopped at the head (blocks "later", the budget, or max_num_seqs) and stays
        # stopped while decodes only take blocks; a decode needs one free block at its check
        # (so does a prompt chunk on a partly filled block)
        chunk = len(batch.reqs) - batch.group
        if chunk == 1 and batch.group and self.cfg.enable_chunked_prefill:
            steps = self._chunk_steps(batch)
            return self._decode_run_steps(batch, kv_reserve=1, chunk_steps=steps) if steps > 1 else 1
        return self._decode_run_steps(batch, kv_reserve=1)

    def _chunk_steps(self, batch: Batch) -> int:
        """Steps for which the decode group's batch with one running prompt's chunk stays the
        same: the chunk takes all the budget the decodes leave (nobody can be admitted) and
        is not the prompt's last (that one emits a token and the request starts decoding).
        Its blocks were all allocated at admission, so only the decodes take memory."""
        req, n = batch.reqs[-1], batch.num_new[-1]
        if batch.decode[-1] or n != self.cfg.max_num_batched_tokens - batch.group:
            return 0
        return (req.num_tokens - req.num_computed - 1) // n
