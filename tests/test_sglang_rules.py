"""SGLang scheduling rules (engine-semantics.md §C), one test each."""

from __future__ import annotations

import pytest
from conftest import apply, make_sched, req

from sim.request import Status
from sim.schedulers.sglang import CLIP_MAX_NEW_TOKENS


def sg(**kw):
    kw.setdefault("context_length", 4096)
    kw.setdefault("kv_cache_tokens", 10_000)
    kw.setdefault("chunked_prefill_size", 512)
    return make_sched(scheduler="sglang", max_model_len=None, num_gpu_blocks_override=None, **kw)


def test_sglang_prefill_and_decode_are_separate_passes():
    s = sg()
    a = req(100, out=10)
    s.add(a)
    apply(s.schedule())
    s.add(b := req(50, out=10))
    batch = s.schedule()  # a prefill batch can be formed: it runs alone, a's decode waits
    assert batch.reqs == [b] and batch.shape.decode_seqs == 0
    apply(batch)
    batch = s.schedule()
    assert batch.shape.decode_seqs == 2 and batch.shape.prefill_tokens == 0


def test_sglang_mixed_chunk_folds_decodes_into_the_prefill_batch():
    s = sg(enable_mixed_chunk=True)
    s.add(a := req(100, out=10))
    apply(s.schedule())
    s.add(b := req(50, out=10))
    batch = s.schedule()
    assert set(batch.reqs) == {a, b} and batch.shape.decode_seqs == 1


def test_sglang_long_prompt_is_chunked_and_its_next_chunk_goes_first_with_no_decode_between():
    s = sg(chunked_prefill_size=256)
    s.add(short := req(10, out=50))
    apply(s.schedule())
    s.add(long := req(600, out=5))
    b1 = s.schedule()
    assert b1.reqs == [long] and b1.num_new == [256]
    apply(b1)
    b2 = s.schedule()
    assert b2.reqs == [long] and b2.num_new == [256]  # the chunked request continues; short waits
    apply(b2)
    b3 = s.schedule()
    assert b3.reqs == [long] and b3.num_new == [88]
    apply(b3)
    assert s.schedule().shape.decode_seqs == 2


def test_sglang_admission_reserves_prompt_plus_clipped_max_new_against_discounted_running_output():
    s = sg(kv_cache_tokens=3000, chunked_prefill_size=-1, max_prefill_tokens=100_000)
    s.add(a := req(100, out=2000))
    apply(s.schedule())
    # a is running: it is expected to need (2000 - 1) * 0.7 more tokens
    reserved = (2000 - 1) * 0.7
    free = 3000 - 101
    assert s._reserved_for_running() == pytest.approx(reserved)
    fits = int(free - reserved) - CLIP_MAX_NEW_TOKENS  # none: max_new alone is clipped at 4096
    assert fits < 0
    s.add(b := req(100, out=500))  # 100 + 500 >= 2899 - 1399.3? 600 < 1499.7: admitted
    batch = s.schedule()
    assert b in batch.reqs
    s.add(c := req(100, out=1000))  # 1100 >= 1499.7 - 600: NO_TOKEN
    apply(batch)
    batch = s.schedule()
    assert c.status is Status.WAITING and c not in batch.reqs


def test_sglang_max_prefill_tokens_stops_a_nonempty_batch_but_the_first_request_always_goes():
    s = sg(chunked_prefill_size=-1, max_prefill_tokens=100)
    s.add(a := req(300, out=5))
    s.add(b := req(10, out=5))
    batch = s.schedule()
    assert batch.reqs == [a]  # over the budget, but first; b must wait for the next pass


def test_sglang_max_running_requests_caps_admission():
    s = sg(max_running_requests=2)
    for _ in range(3):
        s.add(req(10, out=5))
    batch = s.schedule()
    assert len(batch.reqs) == 2


def test_sglang_retracts_fewest_generated_ties_longest_prompt_to_the_tail():
    s = sg(kv_cache_tokens=98, chunked_prefill_size=-1, context_length=98)
    a, b, c = req(30, out=60), req(35, out=60), req(30, out=60)
    for r, generated in ((a, 2), (b, 1), (c, 1)):  # b and c tie on output; b has the longer prompt
        r.output_len = generated
        r.num_computed = r.num_tokens - 1  # decoding
        r.status = Status.RUNNING
        s.kv.allocate(r, r.num_computed)
        s.running.append(r)
    s.add(w := req(5, out=5))  # already waiting
    s.waiting.clear()
    s.waiting.append(w)
    s.new_token_ratio = s.min_ratio
    assert s.kv.num_free == 2 < 3  # 98 - 31 - 35 - 30: no slot for every decode
    batch = s.schedule()
    # retraction continues until 20 steps fit per remaining request: only one request can stay
    assert b in s.waiting and s.waiting[-1] in (b, c) and s.waiting[0] is w  # appended to the tail
    assert s.waiting.index(b) < s.waiting.index(c)  # b (tie, longest prompt) went first
    assert s.running == [a] and batch.reqs == [a]
    assert b.num_computed == 0 and b.num_blocks == 0 and b.output_len == 1  # output kept, KV dropped
    assert s.new_token_ratio == pytest.approx(min(1.0, (2 + 20) / 60))


def test_sglang_decode_memory_check_counts_a_page_per_request_whose_pages_are_full():
    """check_decode_mem with pages: a request whose pages are full needs a whole new page for
    its next token, the others none (new_page_count_next_decode); with 1-token pages, one slot
    per request. Retraction starts when the free pages cannot cover that."""
    s = sg(kv_cache_tokens=40, block_size=4, chunked_prefill_size=-1, context_length=40)
    full, roomy = req(7, out=20), req(5, out=20)  # 8 and 6 tokens computed after one decode each
    for r in (full, roomy):
        r.output_len = 2
        r.num_computed = r.num_tokens - 1
        r.status = Status.RUNNING
        s.kv.allocate(r, r.num_computed)
        s.running.append(r)
    assert s._decode_mem([full, roomy]) == 4  # one page, for `full` (8 computed in 2 pages of 4)
    s.kv.num_free = 1  # one page left: enough, nothing is retracted
    batch = s.schedule()
    assert s.running == [full, roomy] and batch.reqs == [full, roomy] and not batch.preempted
    one = sg(kv_cache_tokens=40)
    assert one._decode_mem([full, roomy]) == 2


def test_sglang_decodes_never_outgrow_their_pages(monkeypatch):
    """A pool of 64 four-token pages shared by requests that outgrow it: every planned step's
    tokens have pages (the memory check retracts first when they would not; counting one
    token per request, an allocation could fail and a request compute tokens its pages did
    not hold)."""
    from sim.config import scenario_from_dict
    from sim.runner import simulate
    from sim.schedulers.sglang import SglangScheduler

    plan = SglangScheduler._schedule

    def checked(self):
        batch = plan(self)
        for r, n in zip(batch.reqs, batch.num_new):
            assert r.num_blocks * self.kv.block_size >= r.num_computed + n, r.rid
        return batch

    monkeypatch.setattr(SglangScheduler, "_schedule", checked)
    res = simulate(scenario_from_dict({
        "engine": {"scheduler": "sglang", "block_size": 4, "context_length": 124, "chunked_prefill_size": -4,
                   "max_prefill_tokens": 1, "max_running_requests": 3, "kv_cache_tokens": 256},
        "workload": {"dataset_name": "random", "num_prompts": 3, "random_input_len": 25, "random_output_len": 62,
                     "random_range_ratio": 0.0, "request_rate": "inf", "seed": 0},
        "step_time": {"step_overhead_s": 0.01}}), compress=False)  # every request's fields up to date
    assert res.bench.metrics["completed"] == 3 and res.num_preemptions >= 1


def test_sglang_new_token_ratio_decays_per_decode_step_and_resets_when_idle():
    s = sg()
    s.add(a := req(10, out=5))
    apply(s.schedule())
    r0 = s.new_token_ratio
    apply(s.schedule())
    assert s.new_token_ratio == pytest.approx(r0 - (0.7 - 0.098) / 600)
    while a.output_len < a.max_tokens:
        apply(s.schedule())
    a.status = Status.FINISHED
    s.release_finished([a])
    s.add(req(10, out=5))  # the server was idle
    assert s.new_token_ratio == pytest.approx(0.7)


def test_sglang_front_door_rejects_input_plus_max_new_at_context_length():
    from sim.engine import front_door_error

    assert front_door_error(req(100, out=28), 128, "sglang")  # 128 >= 128: rejected
    assert not front_door_error(req(100, out=27), 128, "sglang")
    assert not front_door_error(req(100, out=28), 128, "vllm")  # vLLM allows equality


def test_sglang_flags_are_refused_for_vllm_and_the_other_way_round():
    from sim.config import ScenarioError, scenario_from_dict

    with pytest.raises(ScenarioError, match="chunked_prefill_size: SGLang flag"):
        scenario_from_dict({"engine": {"scheduler": "vllm-v1", "max_model_len": 100, "kv_cache_tokens": 1600,
                                       "chunked_prefill_size": 512}})
    with pytest.raises(ScenarioError, match="max_num_seqs: vLLM flag"):
        scenario_from_dict({"engine": {"scheduler": "sglang", "context_length": 100, "max_total_tokens": 1600,
                                       "max_num_seqs": 8}})


# --- the overlap scheduler: results one step late (engine-semantics.md, SGLang overlap) ----------
def _one_engine(engine: dict, num_prompts: int = 1, out: int = 8, concurrency: int | None = None):
    from sim.config import scenario_from_dict
    from sim.runner import simulate

    workload = {"dataset_name": "random", "num_prompts": num_prompts, "request_rate": "inf",
                "random_input_len": 32, "random_output_len": out, "random_range_ratio": 0.0}
    if concurrency:
        workload["max_concurrency"] = concurrency
    return simulate(scenario_from_dict({"engine": engine, "workload": workload}), record_steps=True)


_SGLANG = {"scheduler": "sglang", "context_length": 2048, "kv_cache_tokens": 4096, "max_running_requests": 1}
_V1 = {"scheduler": "vllm-v1", "max_model_len": 2048, "num_gpu_blocks_override": 256, "max_num_seqs": 1}


def _shapes(res) -> list[tuple[int, int]]:
    return [(st.shape.num_seqs, st.shape.prefill_tokens) for st in res.steps]


def test_sglang_overlap_decodes_a_finished_request_once_more_and_vllm_async_does_not():
    """SGLang forms step N+1 before it reads step N's results, so a request whose last token came
    in step N decodes once more in N+1, for nothing, and its slot is taken through that step. Two
    requests of 8 tokens, one slot: 1 prefill + 7 decodes, the extra decode, then the second's 8
    steps (the run ends when the client has the last token, before the last extra step): 17 steps,
    16 without overlap. vLLM V1's async scheduling counts placeholders and never schedules a request
    past max_tokens: 16 steps either way."""
    one = [(1, 32)] + [(1, 0)] * 7
    overlap = _one_engine(_SGLANG, num_prompts=2)
    sync = _one_engine({**_SGLANG, "disable_overlap_schedule": True}, num_prompts=2)
    assert _shapes(overlap) == one + [(1, 0)] + one
    assert _shapes(sync) == one + one
    assert [r.output_len for r in overlap.requests] == [8, 8]
    for async_on in (True, False):
        assert _shapes(_one_engine({**_V1, "async_scheduling": async_on}, num_prompts=2)) == one + one


def test_sglang_overlap_delays_the_waiting_request_by_one_step_not_the_finished_ones_last_token():
    """The client hears the first request's last token when step 8 ends in both modes; the second
    request, waiting for the slot, starts a step later with overlap on."""
    overlap = _one_engine(_SGLANG, num_prompts=2)
    first, second = overlap.requests
    ends = [st.t_start_s + st.duration_s for st in overlap.steps]
    assert first.token_times[-1] == pytest.approx(ends[7])
    assert second.token_times[0] == pytest.approx(ends[9])  # after the extra step (index 8) and its prefill
    assert overlap.steps[9].t_start_s == pytest.approx(ends[8])


def test_sglang_from_0_5_2_retracts_only_until_the_next_decode_fits():
    """0.5.2 on, `retract_decode` loops on `check_decode_mem` (one slot per request), where
    0.4.x-0.5.1 kept retracting until 20 steps fit (the test above): here one request goes,
    not two."""
    s = sg(kv_cache_tokens=98, chunked_prefill_size=-1, context_length=98, version="0.5.4.post2")
    a, b, c = req(30, out=60), req(35, out=60), req(30, out=60)
    for r, generated in ((a, 2), (b, 1), (c, 1)):
        r.output_len = generated
        r.num_computed = r.num_tokens - 1
        r.status = Status.RUNNING
        s.kv.allocate(r, r.num_computed)
        s.running.append(r)
    assert s.kv.num_free == 2 < 3
    batch = s.schedule()
    assert list(s.waiting) == [b] and s.running == [a, c] and batch.reqs == [a, c]
    assert s.new_token_ratio == pytest.approx(min(1.0, (2 + 1 + 20 * 2) / 120))  # the ratio still counts 20


def test_sglang_0_5_memory_defaults_follow_gpu_memory_and_tp():
    """server_args._handle_gpu_memory_settings (0.5.3-0.5.5): on an 80 GiB device, CUDA graphs
    up to 256 below TP 4 and 512 from it; mem_fraction_static = (memory - reserved) / memory
    with reserved = 512 MiB + 1.5 MiB x chunk (8192) + 2 MiB x graphs' top + TP x 128 MiB."""
    from sim.config import EngineConfig, resolve_engine_defaults, sglang_cuda_graph_max_bs, sglang_mem_fraction_static

    assert sglang_cuda_graph_max_bs("0.4.6", 80, 4) == 160 and sglang_cuda_graph_max_bs("0.5.4", None, 4) == 160
    assert sglang_cuda_graph_max_bs("0.5.4.post2", 80, 4) == 512 and sglang_cuda_graph_max_bs("0.5.4", 80, 1) == 256
    assert sglang_cuda_graph_max_bs("0.5.4", 40, 1) == 32 and sglang_cuda_graph_max_bs("0.5.4", 96, 8) == 512
    assert sglang_mem_fraction_static("0.5.4.post2", 80, 4) == pytest.approx((81920 - 14336) / 81920, abs=5e-4)
    assert sglang_mem_fraction_static("0.5.4.post2", 80, 4) == 0.825
    assert sglang_mem_fraction_static("0.5.3", 80, 1) == 0.836
    assert sglang_mem_fraction_static("0.5.5.post1", 80, 8) == 0.819
    assert sglang_mem_fraction_static("0.5.4", 80, 1, chunked_prefill_size=4096) == round((81920 - 10240) / 81920, 3)
    with pytest.raises(ValueError, match="mem-fraction-static"):
        sglang_mem_fraction_static("0.4.6", 80, 1)
    # a scenario's CUDA graphs follow its step time's TP; 0.5.3's capture list
    e = EngineConfig(scheduler="sglang", version="0.5.4", gpu_memory_gib=80, kv_cache_tokens=400_000,
                     context_length=32768)
    sizes = resolve_engine_defaults(e, tp=4).step_facts().graph_sizes
    assert max(sizes) == 512 and 12 in sizes and 264 not in sizes and 272 in sizes
    assert max(resolve_engine_defaults(e, tp=1).step_facts().graph_sizes) == 256
    assert max(resolve_engine_defaults(e.model_copy(update={"version": "0.4.6"}), tp=4).step_facts().graph_sizes) == 160


def test_gpustack_sglang_pool_is_sglangs_default_fraction_of_the_memory_free_at_start():
    """calibration/gpustack.py: GLM-4.5-Air on SGLang 0.5.4 at TP 4 on A100s sizes its pool at
    0.825 x (80 - 1.5 GiB at start) less its weights (SGLang's profile_max_num_token), not at
    vLLM's 0.9; a model whose loaded size leaves that no room is not a run."""
    from calibration.gpustack import runs
    from sim.perf_model import load_hardware_spec, load_model_spec

    glm = [r for r in runs() if r.config.startswith("GLM-4.5-Air · SGLang")]
    assert glm and {r.case.scenario["engine"]["cuda_graph_max_bs"] for r in glm} == {512}
    spec = load_model_spec("glm-4.5-air")
    weights_gib = (spec.loaded_weights_gib or spec.weight_bytes_total() / 2**30) / 4
    pool_gib = glm[0].kv_tokens * spec.kv_bytes_per_token(4) / 2**30
    assert pool_gib == pytest.approx(0.825 * (load_hardware_spec("a100-80g").memory_gib - 1.5) - weights_gib, abs=0.01)
    skipped: list[str] = []
    assert not [r for r in runs(skipped=skipped) if "gpt-oss-120b · SGLang" in r.config]
    assert len(skipped) == 1 and "openai/gpt-oss-120b · SGLang" in skipped[0] and "cannot be sized" in skipped[0]
