"""One test per scheduling rule of the reference notes (engine-semantics.md §A, §B)."""

from __future__ import annotations

from conftest import apply, make_sched, req

from sim.kv_cache import AllocStatus, KVCache
from sim.request import Status


def names(reqs):
    return [r.rid for r in reqs]


# --- vLLM V0, chunked prefill off ---------------------------------------------------------
def test_v0_nochunk_prefill_and_decode_never_share_a_step():
    s = make_sched(scheduler="vllm-v0", enable_chunked_prefill=False)
    a = req(100)
    s.add(a)
    b1 = s.schedule()
    assert b1.shape.prefill_tokens == 100 and b1.shape.decode_seqs == 0
    apply(b1)
    late = req(50)
    s.add(late)
    b2 = s.schedule()  # a new arrival stalls the running decode for one step
    assert names(b2.reqs) == [late.rid] and b2.shape.decode_seqs == 0
    apply(b2)
    b3 = s.schedule()
    assert b3.shape.prefill_tokens == 0 and b3.shape.decode_seqs == 2


def test_v0_nochunk_strict_fcfs_head_blocks_the_queue():
    s = make_sched(scheduler="vllm-v0", enable_chunked_prefill=False, max_model_len=1000,
                   max_num_batched_tokens=1000)
    big, small = req(900), req(10)
    first = req(200)
    for r in (first, big, small):
        s.add(r)
    b = s.schedule()
    # `big` does not fit the remaining 800 tokens; `small` behind it must wait too
    assert names(b.reqs) == [first.rid]
    assert names(s.waiting) == [big.rid, small.rid]


def test_v0_nochunk_running_sequences_count_against_max_num_seqs():
    s = make_sched(scheduler="vllm-v0", enable_chunked_prefill=False, max_num_seqs=2)
    a, b, c = req(10), req(10), req(10)
    s.add(a), s.add(b)
    apply(s.schedule())
    s.add(c)
    batch = s.schedule()  # two running already: c may not be admitted, decodes run
    assert c.status is Status.WAITING
    assert batch.shape.decode_seqs == 2


def test_v0_nochunk_budget_limits_prefill_batch():
    s = make_sched(scheduler="vllm-v0", enable_chunked_prefill=False, max_model_len=300,
                   max_num_batched_tokens=300)
    rs = [req(100, out=5) for _ in range(5)]
    for r in rs:
        s.add(r)
    b = s.schedule()
    assert b.num_tokens == 300 and len(b) == 3


def test_v0_can_allocate_whole_prompt_with_one_percent_watermark():
    kv = KVCache(num_blocks=100, block_size=16, watermark=0.01)  # watermark = 1 block
    assert kv.can_allocate(99 * 16) is AllocStatus.OK  # 100 - 99 >= 1
    assert kv.can_allocate(99 * 16 + 1) is AllocStatus.NEVER  # needs 100 blocks: total - 100 < 1
    holder = req(16 * 50)
    kv.allocate(holder, 16 * 50)
    assert kv.can_allocate(16 * 49) is AllocStatus.OK  # 50 - 49 >= 1
    assert kv.can_allocate(16 * 50) is AllocStatus.LATER


def test_v0_prompt_that_can_never_fit_is_rejected_not_waited_on():
    s = make_sched(scheduler="vllm-v0", enable_chunked_prefill=False, max_model_len=1600,
                   max_num_batched_tokens=1600, num_gpu_blocks_override=100)
    r = req(100 * 16 - 1)  # 100 blocks: more than total minus the watermark
    s.add(r)
    b = s.schedule()
    assert len(b) == 0 and r.status is Status.FAILED
    assert "exceeds the capacity of block_manager" in r.error
    assert s.rejected == [r] and not s.waiting


def test_v0_nochunk_admission_allocates_whole_prompt():
    s = make_sched(scheduler="vllm-v0", enable_chunked_prefill=False)
    r = req(100)
    s.add(r)
    s.schedule()
    assert r.num_blocks == 7  # ceil(100 / 16)


# --- vLLM V0, chunked prefill on -----------------------------------------------------------
def test_v0_chunked_running_decodes_then_prefill_chunks_then_new_prefills_share_one_budget():
    s = make_sched(scheduler="vllm-v0", enable_chunked_prefill=True, max_num_batched_tokens=64,
                   max_num_seqs=8)
    d1, d2 = req(10), req(10)
    s.add(d1), s.add(d2)
    apply(s.schedule())  # both prefilled (20 tokens)
    long = req(200)
    s.add(long)
    b = s.schedule()  # 2 decodes + 62-token chunk of `long`
    assert names(b.reqs) == [d1.rid, d2.rid, long.rid]
    assert b.num_new == [1, 1, 62]
    apply(b)
    newer = req(30)
    s.add(newer)
    b = s.schedule()
    # running decodes first, then the running chunk, which uses up the budget: newer waits
    assert names(b.reqs) == [d1.rid, d2.rid, long.rid]
    assert b.num_tokens == 64
    assert newer.status is Status.WAITING


def test_v0_chunked_new_prefill_gets_whole_prompt_blocks_at_admission():
    s = make_sched(scheduler="vllm-v0", enable_chunked_prefill=True, max_num_batched_tokens=64,
                   max_num_seqs=8)
    r = req(640)
    s.add(r)
    b = s.schedule()
    assert b.num_new == [64]
    assert r.num_blocks == 40  # all 640 prompt tokens, not just the 64-token chunk


def test_v0_chunked_budget_exhausted_stops_the_running_pass():
    s = make_sched(scheduler="vllm-v0", enable_chunked_prefill=True, max_num_batched_tokens=4,
                   max_num_seqs=4)
    rs = [req(1, out=5) for _ in range(4)]
    for r in rs:
        s.add(r)
    apply(s.schedule())
    late = req(1, out=5)
    s.add(late)
    b = s.schedule()
    assert b.num_tokens == 4 and late.status is Status.WAITING


# --- vLLM V1 ---------------------------------------------------------------------------------
def test_v1_running_first_then_waiting_in_one_budget():
    s = make_sched(scheduler="vllm-v1", max_num_batched_tokens=64, max_num_seqs=8)
    a = req(100)
    s.add(a)
    apply(s.schedule())  # 64 of 100
    b_ = req(50)
    s.add(b_)
    b = s.schedule()
    assert names(b.reqs) == [a.rid, b_.rid] and b.num_new == [36, 28]


def test_v1_allocates_kv_per_chunk_not_whole_prompt():
    s = make_sched(scheduler="vllm-v1", max_num_batched_tokens=64, max_num_seqs=8)
    r = req(640)
    s.add(r)
    s.schedule()
    assert r.num_blocks == 4  # 64 tokens only


def test_v1_waiting_not_admitted_in_a_step_that_preempted():
    s = make_sched(scheduler="vllm-v1", max_num_batched_tokens=256, max_num_seqs=8,
                   num_gpu_blocks_override=4, block_size=16, max_model_len=64)
    a, b = req(32, out=30), req(32, out=30)  # two blocks each: the pool is full after admission
    s.add(a), s.add(b)
    apply(s.schedule())
    c = req(8)
    s.add(c)
    batch = s.schedule()  # a's first decode needs a third block: b (newest) is preempted
    assert batch.preempted == [b]
    assert c.status is Status.WAITING  # not admitted in the step that preempted
    assert names(s.waiting) == [b.rid, c.rid]


def test_v1_running_request_with_nothing_to_compute_is_skipped_not_a_stop():
    s = make_sched(scheduler="vllm-v1", max_num_batched_tokens=64, max_num_seqs=8,
                   long_prefill_token_threshold=16)
    a = req(40)
    s.add(a)
    b = s.schedule()
    assert b.num_new == [16]  # long_prefill_token_threshold caps the chunk


def test_v1_before_0_9_preallocates_64_tokens_of_blocks_when_a_request_grows():
    s = make_sched(scheduler="vllm-v1", version="0.8.2", max_num_batched_tokens=512, max_num_seqs=8)
    r = req(100)
    s.add(r)
    s.schedule()
    assert r.num_blocks == 7 + 4  # ceil(100/16) + 64/16 preallocated
    s2 = make_sched(scheduler="vllm-v1", version="0.10.0", max_num_batched_tokens=512, max_num_seqs=8)
    r2 = req(100)
    s2.add(r2)
    s2.schedule()
    assert r2.num_blocks == 7


def test_v1_max_num_seqs_stops_admission():
    s = make_sched(scheduler="vllm-v1", max_num_batched_tokens=512, max_num_seqs=2)
    rs = [req(10) for _ in range(3)]
    for r in rs:
        s.add(r)
    b = s.schedule()
    assert len(b) == 2 and rs[2].status is Status.WAITING


def test_v1_chunking_disabled_waits_for_whole_prompt_to_fit_budget():
    s = make_sched(scheduler="vllm-v1", enable_chunked_prefill=False, max_model_len=128,
                   max_num_batched_tokens=128, max_num_seqs=8)
    a, b_ = req(100, out=5), req(100, out=5)
    s.add(a), s.add(b_)
    batch = s.schedule()
    assert names(batch.reqs) == [a.rid]


# --- preemption, both engines ----------------------------------------------------------------
def _full_pool(scheduler):
    kw = dict(max_num_batched_tokens=256, max_num_seqs=8, num_gpu_blocks_override=6, block_size=16,
              max_model_len=96)
    if scheduler == "vllm-v0":
        kw["enable_chunked_prefill"] = True
    s = make_sched(scheduler=scheduler, **kw)
    rs = [req(32, out=40) for _ in range(3)]  # 2 blocks each fill the 6-block pool
    return s, rs


def test_preemption_by_recompute_victim_is_newest_and_requeued_at_head_v0():
    s, rs = _full_pool("vllm-v0")
    s.kv.watermark_blocks = 0  # isolate the preemption rule from the admission watermark
    for r in rs:
        s.add(r)
    apply(s.schedule())
    s.add(extra := req(8))
    batch = s.schedule()  # V0 needs one free block per running sequence: none left
    victim = rs[-1]
    assert batch.preempted[0] is victim
    assert victim.num_computed == 0 and victim.num_blocks == 0 and victim.num_preemptions == 1
    assert s.waiting[0] is victim and s.waiting[-1] is extra


def test_preemption_by_recompute_victim_is_newest_and_requeued_at_head_v1():
    s, rs = _full_pool("vllm-v1")
    for r in rs:
        s.add(r)
    apply(s.schedule())
    batch = s.schedule()  # first decode crosses into a third block for the oldest request
    assert batch.preempted == [rs[-1]]
    assert s.waiting[0] is rs[-1]


def test_preempted_request_reprefills_prompt_and_generated_tokens():
    s, rs = _full_pool("vllm-v1")
    for r in rs:
        s.add(r)
    apply(s.schedule())
    victim = rs[-1]
    s.schedule()
    assert victim.output_len == 1 and victim.num_tokens == 33
    # free the pool: the victim comes back and recomputes all 33 tokens in one prefill
    for r in rs[:-1]:
        r.status = Status.FINISHED
    s.release_finished(rs[:-1])
    b = s.schedule()
    assert b.reqs == [victim] and b.num_new == [33]


def test_request_that_preempts_itself_with_nothing_else_running_is_rejected_not_looped():
    """A one-block pool: V0 counts a touched block for every running sequence, so a lone
    request can never get its next slot. Real V0 would preempt and re-admit it forever; the
    simulator rejects it with the reason instead."""
    from sim.config import scenario_from_dict
    from sim.runner import simulate

    sc = scenario_from_dict({
        "engine": {"scheduler": "vllm-v0", "enable_chunked_prefill": True, "max_model_len": 8,
                   "max_num_seqs": 1, "max_num_batched_tokens": 1, "num_gpu_blocks_override": 1},
        "workload": {"dataset_name": "random", "num_prompts": 1, "random_input_len": 1, "random_output_len": 3},
    })
    res = simulate(sc)
    assert res.bench.metrics["failed"] == 1
    assert "more KV blocks than the cache has" in res.requests[0].error
