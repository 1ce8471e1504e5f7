"""SGLang's scheduler (`managers/scheduler.py`, `schedule_policy.py`, `schedule_batch.py`, ≈v0.4).

Each iteration:
1. try to form a prefill batch (the PrefillAdder); if one forms, run it alone: prefill
   and decode are separate forward passes (unless `enable_mixed_chunk`, which folds the
   running decodes into the prefill batch);
2. otherwise run one decode step for every running request, after checking there is a
   free KV slot for each; if not, retract requests until there is room for 20 more steps
   (up to 0.5.1), or for this one (from 0.5.2: `retract_decode` loops on `check_decode_mem`).

Admission is by reservation, not by what is in use now: a new request needs its prompt
plus min(max_new_tokens, 4096) to fit in the free pool minus what running requests are
still expected to generate, discounted by `new_token_ratio`. The ratio starts at 0.7,
decays toward 0.098 as decode steps succeed, and jumps back up after a retraction, so
SGLang over-admits while things go well and backs off when memory runs out.
"""

from __future__ import annotations

from ..kv_cache import KVCacheError
from ..request import Request, Status
from .base import Batch, Scheduler

CLIP_MAX_NEW_TOKENS = 4096  # SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO_FACTOR = 0.14
NEW_TOKEN_RATIO_DECAY_STEPS = 600
RETRACT_DECODE_STEPS = 20


class SglangScheduler(Scheduler):
    name = "sglang"

    def __init__(self, cfg, kv):
        super().__init__(cfg, kv)
        self.init_ratio = min(INIT_NEW_TOKEN_RATIO * cfg.schedule_conservativeness, 1.0)
        self.min_ratio = self.init_ratio * MIN_NEW_TOKEN_RATIO_FACTOR
        self.ratio_decay = (self.init_ratio - self.min_ratio) / NEW_TOKEN_RATIO_DECAY_STEPS
        self.new_token_ratio = self.init_ratio
        self.chunked_req: Request | None = None  # the one request whose prompt is being chunked
        self.num_retractions = 0
        self.late_release = not cfg.disable_overlap_schedule  # the overlap scheduler: one step late
        self.retract_ahead = cfg.sglang_retracts_ahead()  # room for RETRACT_DECODE_STEPS, or the next step

    def abort(self, req: Request) -> None:
        if self.chunked_req is req:
            self.chunked_req = None
        super().abort(req)

    def add(self, req: Request) -> None:
        # validate_input_length: the usable length is bounded by the token pool as well
        max_req_len = min(self.cfg.max_model_len, self.kv.capacity_tokens)
        if req.prompt_len >= max_req_len - 1 - 5:
            self.reject(req, f"Input length ({req.prompt_len} tokens) exceeds the maximum allowed length "
                             f"({max_req_len - 6} tokens).")
            return
        req.max_tokens = min(req.max_tokens, max_req_len - req.prompt_len - 1)
        if not self.running and not self.waiting:
            self.new_token_ratio = self.init_ratio  # the server was idle: start cautious again
        super().add(req)

    def _schedule(self) -> Batch:
        batch = self._prefill_batch()
        if not batch.reqs:
            batch = self._decode_batch()
        if self.lingering and (not batch.reqs or batch.decode[-1]):
            # a decode step (or a mixed one) carries the running batch, and with it the requests
            # that finished in the last step; a prefill-only step does not
            self._carry_lingering(batch)
        return batch

    compress_rules = True  # see Scheduler.compress_rules

    # --- prefill: the PrefillAdder -------------------------------------------------------------

    def _reserved_for_running(self) -> float:
        return sum(
            min(r.max_tokens - r.output_len, CLIP_MAX_NEW_TOKENS) * self.new_token_ratio
            for r in self.running
            if r is not self.chunked_req
        )

    def _prefill_batch(self) -> Batch:
        cfg, kv = self.cfg, self.kv
        batch = Batch()
        if not self.waiting and self.chunked_req is None:
            return batch
        self._sync_group()  # the reservations below read every running request
        decoding = [r for r in self.running if r is not self.chunked_req]
        if len(self.running) + len(self.lingering) >= cfg.max_running_requests and self.chunked_req is None:
            return batch  # batch_is_full
        chunk_size = cfg.chunked_prefill_size if cfg.chunked_prefill_size and cfg.chunked_prefill_size > 0 else None
        mixed_tokens = len(decoding) if cfg.enable_mixed_chunk else 0
        rem_total = kv.num_free * kv.block_size - self._reserved_for_running() - mixed_tokens
        rem_input = cfg.max_prefill_tokens - mixed_tokens
        rem_chunk = chunk_size - mixed_tokens if chunk_size else None

        # the request being chunked continues first, with no budget check (add_chunked_req)
        if self.chunked_req is not None:
            req = self.chunked_req
            remaining = req.num_tokens - req.num_computed
            n = remaining if rem_chunk is None else max(0, min(remaining, rem_chunk))
            if n <= 0:
                return batch
            if not kv.allocate(req, req.num_computed + n):
                if decoding or not self.waiting:
                    return batch  # a decode step frees or retracts; or a transfer is still coming
                # Nothing runs that could ever free a page, and the waiting requests hold the rest
                # of the pool (a PD decode instance: their KV was transferred in). SGLang would
                # run out of memory here; the simulator retracts the chunked request instead, as
                # its decode-side memory check does, so those requests can run first.
                self._requeue(req)
                self.chunked_req = None
                return self._prefill_batch()
            batch.add(req, n, decode=False)
            last = n == remaining
            if last:
                self.chunked_req = None
            rem_total -= n + (min(req.max_tokens - req.output_len, CLIP_MAX_NEW_TOKENS) if last else 0)
            rem_input -= n
            if rem_chunk is not None:
                rem_chunk -= n

        admitted: list[Request] = []
        while self.waiting and self.chunked_req is None:
            if rem_total <= 0 or rem_input <= 0 or (rem_chunk is not None and rem_chunk <= 0):
                break  # budget_state: NO_TOKEN / OTHER
            if len(self.running) + len(self.lingering) + len(admitted) >= cfg.max_running_requests:
                break  # batch_is_full
            req = self.waiting[0]
            hit, cached = kv.lookup(req)  # radix match: only the rest of the prompt is computed
            extend = req.num_tokens - max(req.num_computed, cached)
            if extend + min(req.max_tokens - req.output_len, CLIP_MAX_NEW_TOKENS) >= rem_total:
                break  # NO_TOKEN
            if extend > rem_input and (admitted or batch.reqs):
                break  # over max_prefill_tokens; the first request is always accepted
            n = extend if rem_chunk is None or extend <= rem_chunk else rem_chunk  # truncated to the budget
            free_before = kv.num_free
            if not kv.allocate(req, req.num_tokens - extend + n, hit):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            admitted.append(req)
            batch.add(req, n, decode=False)
            # the new tokens' slots, plus a matched prefix that was evictable and is now locked
            taken = (free_before - kv.num_free) * kv.block_size
            if n < extend:
                self.chunked_req = req  # reserves no output tokens while it is being chunked
                rem_total -= taken
            else:
                rem_total -= taken + min(req.max_tokens - req.output_len, CLIP_MAX_NEW_TOKENS)
            rem_input -= n
            if rem_chunk is not None:
                rem_chunk -= n
        self.running.extend(admitted)
        if mixed_tokens and batch.reqs and kv.num_free * kv.block_size >= self._decode_mem(decoding):
            # the running requests decode in the same step; when the prefill left no room for
            # their next pages (SGLang would run out of memory), they wait for the next decode
            # step, whose memory check retracts as needed
            self._add_decodes(batch, decoding)
        return batch

    # --- decode --------------------------------------------------------------------------------
    def _add_decodes(self, batch: Batch, reqs: list[Request]) -> None:
        n = 1 + self.cfg.num_speculative_tokens  # with MTP/EAGLE every decode verifies its drafts
        for req in reqs:
            if not self.kv.allocate(req, req.num_computed + n):  # pragma: no cover - check_decode_mem passed
                raise KVCacheError(f"request {req.rid}: no KV for its decode after the memory check")
            batch.add(req, n, decode=True)

    def _decode_batch(self) -> Batch:
        batch = Batch()
        decoding = [r for r in self.running if r is not self.chunked_req]
        if not decoding:
            return batch
        if self.kv.num_free * self.kv.block_size < self._decode_mem(decoding):  # check_decode_mem
            self._sync_group()
            decoding = self._retract(decoding, batch)
            self.new_token_ratio = self._ratio_after_retract(decoding)
            if self.kv.num_free * self.kv.block_size < self._decode_mem(decoding) and self.chunked_req is not None:
                self._requeue(self.chunked_req)  # SGLang would assert here; the simulator makes room
                self.chunked_req = None
            if self.kv.num_free * self.kv.block_size < self._decode_mem(decoding):
                for req in decoding:  # one request left and no slot: it can never finish
                    self.running.remove(req)
                    self.reject(req, f"request needs more KV than the pool holds ({self.kv.capacity_tokens} tokens)")
                return batch
        else:
            self.new_token_ratio = max(self.new_token_ratio - self.ratio_decay, self.min_ratio)
        if len(decoding) == len(self.running) and self._decode_all(batch, kv_reserve=0, whole=True):
            return batch  # every running request decodes: the loop's outcome, at once
        self._sync_group()
        self._add_decodes(batch, decoding)
        return batch

    def _decode_mem(self, decoding: list[Request]) -> int:
        """`check_decode_mem`: KV slots the next decode step needs. One per request (and one
        per draft token) with 1-token pages; with larger pages, a whole page for each request
        whose pages are full (SGLang's `new_page_count_next_decode`), so that every decode's
        allocation then succeeds."""
        kv = self.kv
        per_req = 1 + self.cfg.num_speculative_tokens
        if kv.block_size == 1:
            return len(decoding) * per_req
        group = self.group if self.group is not None and len(self.group) else None
        pages = group.blocks_due() if group is not None else 0  # members' fields are stale
        pages += sum(max(0, kv.blocks_for(r.num_computed + per_req) - r.num_blocks)
                     for r in decoding if group is None or r not in group.info)
        return pages * kv.block_size

    def _retract(self, decoding: list[Request], batch: Batch) -> list[Request]:
        """Retract the requests with the fewest generated tokens (ties: the longest prompt)
        until the pool has room for RETRACT_DECODE_STEPS more tokens per remaining request (up
        to 0.5.1) or for their next step (from 0.5.2). Retracted requests free their KV and go
        to the tail of the waiting queue."""
        order = sorted(decoding, key=lambda r: (r.output_len, -r.prompt_len), reverse=True)
        first = True
        while first or self.kv.num_free * self.kv.block_size < (
                len(order) * RETRACT_DECODE_STEPS if self.retract_ahead else self._decode_mem(order)):
            if len(order) == 1:
                break
            first = False
            self._requeue(order.pop())
        return [r for r in decoding if r in order]

    def _requeue(self, req: Request) -> None:
        """Retraction: free the KV, recompute prompt + output later, at the tail of the queue."""
        self.kv.free(req)
        req.num_computed = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.num_preemptions += 1
        self.num_retractions += 1
        self.running.remove(req)
        self.waiting.append(req)

    def _ratio_after_retract(self, remaining: list[Request]) -> float:
        decoded = sum(r.output_len for r in remaining)
        max_new = sum(r.max_tokens for r in remaining)
        return min(1.0, (decoded + RETRACT_DECODE_STEPS * len(remaining)) / max(max_new, 1))

    # --- event compression ------------------------------------------------------------------
    def steady_steps(self, batch: Batch) -> int:
        if not self._plans_as_written() or self.chunked_req is not None or self.lingering:
            return 1
        if self.waiting and len(self.running) < self.cfg.max_running_requests:
            return 1  # the PrefillAdder's budget moves with new_token_ratio every step
        # check_decode_mem must pass before every step: room for one token per request
        reserve = -(-len(batch.reqs) // self.kv.block_size)
        return self._decode_run_steps(batch, kv_reserve=reserve)

    def advance_decode_run(self, batch: Batch, steps: int):
        for _ in range(steps - 1):  # every successful decode step lowers the ratio
            if self.new_token_ratio <= self.min_ratio:
                break
            self.new_token_ratio = max(self.new_token_ratio - self.ratio_decay, self.min_ratio)
        return super().advance_decode_run(batch, steps)
