"""vLLM V1 scheduler (`vllm/v1/core/sched/scheduler.py`): one loop, one token budget.

Each step tries to bring every request's computed tokens up to its token count. Running
requests go first, in order; waiting requests are admitted only if nothing was preempted
in this step. KV is allocated for the tokens scheduled now (a prefill chunk), not for the
whole prompt.
"""

from __future__ import annotations

from typing import ClassVar

from mypy_extensions import mypyc_attr

from ..kv_cache import KVCacheError
from ..prefix_cache import private
from ..request import Status
from .base import Batch, Scheduler


@mypyc_attr(allow_interpreted_subclasses=True)
class VllmV1Scheduler(Scheduler):
    name: ClassVar[str] = "vllm-v1"

    def _num_new_tokens(self, req, token_budget: int, computed: int | None = None, drafts: bool = True) -> int:
        computed = req.num_computed if computed is None else computed
        n = req.num_tokens - computed
        if drafts and n == 1 and req.output_len > 0:
            n += self.cfg.num_speculative_tokens  # a decode verifies its draft tokens too
        threshold = self.cfg.long_prefill_token_threshold
        if threshold > 0:
            n = min(n, threshold)
        n = min(n, token_budget)
        # the model never computes position max_model_len - 1 and beyond
        return min(n, self.cfg.max_model_len - 1 - computed)

    def _schedule(self) -> Batch:
        batch = Batch()
        kv = self.kv
        token_budget = self.cfg.max_num_batched_tokens

        # 1. running requests, in order (all decoding and room for all: the loop's outcome at once)
        i = self._decode_all(batch, kv_reserve=0, budget=token_budget)  # the decoding head, at once
        if i:
            token_budget -= i
        else:
            self._sync_group()
        while i < len(self.running) and token_budget > 0:
            req = self.running[i]
            n = self._num_new_tokens(req, token_budget)
            if n <= 0:
                i += 1
                continue  # V1 skips, it does not stop
            scheduled = True
            while not kv.allocate(req, req.num_computed + n):
                # preempt the newest admission; it is never one already scheduled, because
                # the loop walks from the head and the victim comes off the tail
                victim = self.running.pop()
                if victim is req:
                    self.preempt_self(req, batch)
                    scheduled = False
                    break
                self.evict(victim, batch)
            if not scheduled:
                break
            is_decode = req.output_len > 0 and req.num_computed == req.num_tokens - 1
            batch.add(req, n, decode=is_decode)
            token_budget -= n
            i += 1

        # 2. waiting requests, only if this step preempted nothing
        if not batch.preempted and not batch.aborted:
            chunking = self.cfg.enable_chunked_prefill
            while self.waiting and token_budget > 0:
                if len(self.running) >= self.cfg.max_num_seqs:
                    break
                req = self.waiting[0]
                hit, cached = kv.lookup(req)  # prefix cache: full blocks, never the last token
                computed = max(req.num_computed, cached)
                # a request resumed from the cache has no draft tokens yet: it samples one first
                n = self._num_new_tokens(req, token_budget, computed, drafts=False)
                if not chunking and n < req.num_tokens - computed:
                    break  # chunking disabled and the whole prompt does not fit the budget
                if not kv.allocate(req, computed + n, hit):
                    break
                self.waiting.popleft()
                req.status = Status.RUNNING
                self.running.append(req)
                batch.add(req, n)
                token_budget -= n
        return batch

    compress_rules: ClassVar[bool] = True  # see Scheduler.compress_rules

    def steady_steps(self, batch: Batch) -> int:
        if not self._plans_as_written():
            return 1  # a policy that plans differently plans every step
        # waiting requests were not admitted (seats, budget or blocks) and will not be while
        # decodes only take blocks; V1 has no watermark or free-slot check
        if len(batch.reqs) == batch.group + 1 and batch.group:
            steps, blocks = self._chunk_steps(batch)
            return self._decode_run_steps(batch, kv_reserve=0, chunk_steps=steps, chunk_blocks=blocks) if steps > 1 else 1
        return self._decode_run_steps(batch, kv_reserve=0)

    def _chunk_steps(self, batch: Batch):
        """Steps for which the decode group's batch with the one other running request's prompt
        chunk stays the same: the chunk takes all the budget the decodes leave (so nobody is
        admitted), it is not the prompt's last, and the context limit does not shorten it; and
        the blocks that chunk takes in the steps after the first (V1 allocates chunk by chunk).
        With prefix caching only a request whose content nobody shares and whose own cached
        chunks are not in the free queue (its registration is then a count)."""
        req, n = batch.reqs[-1], batch.num_new[-1]
        cfg, kv = self.cfg, self.kv
        if batch.decode[-1] or n != cfg.max_num_batched_tokens - batch.group:
            return 0, None
        if kv.prefix is not None and (not private(req) or ("run", req.rid) in kv.prefix.free_queue):
            return 0, None
        c0 = req.num_computed  # before this step
        steps = min((req.num_tokens - c0 - 1) // n, (cfg.max_model_len - 1 - c0) // n)

        def blocks(m: int) -> int:
            held = held0 = req.num_blocks  # after this step's allocation
            for j in range(1, m + 1):
                need = kv.blocks_for(c0 + (j + 1) * n) - held
                if need > 0:
                    held += need + kv.preallocate_blocks
            return held - held0

        return steps, blocks

    def advance_chunk(self, req, n: int, steps: int) -> None:
        """The chunk's blocks for the steps after the first, allocated one step at a time as
        step by step (with the preallocation); `steady_steps` made sure they were free."""
        c0 = req.num_computed
        for j in range(1, steps):
            if not self.kv.allocate(req, c0 + (j + 1) * n):  # pragma: no cover - an invariant
                raise KVCacheError(f"request {req.rid}: no KV for a prompt chunk of a planned run")
        super().advance_chunk(req, n, steps)
