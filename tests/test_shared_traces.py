"""Workloads that carry shared prefixes and sessions: Mooncake traces (hash_ids), per-request files
with prefix groups or sessions, inference-perf's shared-prefix generator. The simulated cache
hits are checked against hits worked out by hand from what the workload says is shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config import ScenarioError, scenario_from_dict
from sim.runner import simulate
from sim.workload import WorkloadError, build_requests
from tests.test_properties import scenarios, wall_clock_guard

STEP = {"step_overhead_s": 0.002, "per_prefill_token_s": 1e-5, "per_decode_seq_s": 1e-4}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _scenario(workload: dict, scheduler: str = "vllm-v1", blocks: int = 20000, caching: bool = True, **engine):
    eng = {"scheduler": scheduler, "max_model_len": 32768, "block_size": 16, **engine}
    if scheduler == "sglang":
        eng.update(max_total_tokens=blocks * 16, chunked_prefill_size=8192, disable_radix_cache=not caching)
    else:
        eng.update(num_gpu_blocks_override=blocks, max_num_batched_tokens=8192, enable_prefix_caching=caching)
    return scenario_from_dict({"engine": eng, "workload": workload, "step_time": STEP})


def _by_rid(res):
    return sorted(res.requests, key=lambda r: r.rid)


# --- Mooncake ------------------------------------------------------------------------------------
def test_mooncake_release_example_shares_twelve_blocks(tmp_path):
    """The two requests of the Mooncake FAST'25 README share their first 12 hash ids: 6,144 tokens
    of prefix. vLLM reuses every full 16-token block of it; SGLang's radix cache (matched in
    16-token chunks here) the same."""
    path = _write_jsonl(tmp_path / "mooncake.jsonl", [
        {"timestamp": 27482, "input_length": 6955, "output_length": 52,
         "hash_ids": [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2353, 2354]},
        {"timestamp": 30535, "input_length": 6472, "output_length": 26,
         "hash_ids": [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2366]}])
    for scheduler in ("vllm-v1", "sglang"):
        res = simulate(_scenario({"dataset_name": "mooncake", "trace_path": path}, scheduler))
        a, b = _by_rid(res)
        assert a.cached_tokens == 0 and b.cached_tokens == 12 * 512, scheduler
        assert res.prefix_hit_tokens == 6144 and res.prefix_query_tokens == 6955 + 6472


def test_mooncake_ids_are_named_with_their_history_and_blocks_past_the_ids_are_private(tmp_path):
    """A block is the same content only after the same blocks: an id seen after another parent
    (which a chained hash never gives, but a hand-made file can) shares nothing. A prompt longer
    than its ids cover has tokens of its own."""
    path = _write_jsonl(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 1024, "output_length": 2, "hash_ids": [1, 2]},
        {"timestamp": 1000, "input_length": 1024, "output_length": 2, "hash_ids": [9, 2]},
        {"timestamp": 2000, "input_length": 1600, "output_length": 2, "hash_ids": [1, 2]}])
    sc = _scenario({"dataset_name": "mooncake", "trace_path": path})
    a, b, c = build_requests(sc.workload)
    assert a.segments[1][0] != b.segments[1][0]  # id 2 after id 9 is other content
    assert c.segments[:2] == a.segments and c.segments[2] == (2 * c.rid + 1, 576)
    res = _by_rid(simulate(sc))
    assert [r.cached_tokens for r in res] == [0, 0, 1024]


def test_mooncake_needs_hash_ids_and_the_other_fields(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("arrival_s,input_len,output_len\n0,10,2\n")
    with pytest.raises(WorkloadError, match="not a Mooncake trace"):
        build_requests(_scenario({"dataset_name": "mooncake", "trace_path": str(plain)}).workload)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"timestamp": 0, "input_length": 10, "hash_ids": [1]}])
    with pytest.raises(WorkloadError, match="line 1 lacks output_length"):
        build_requests(_scenario({"dataset_name": "mooncake", "trace_path": bad}).workload)
    with pytest.raises(ScenarioError, match="dataset_name 'mooncake' needs trace_path"):
        _scenario({"dataset_name": "mooncake"})


# --- analytic hit rates ----------------------------------------------------------------------------
def _expected_hits(reqs, chunk: int) -> list[int]:
    """Hits worked out from the content alone, with memory to spare and one request at a time:
    the longest run of whole chunks from the start that an earlier prompt already held, never
    the chunk holding the last prompt token."""
    seen: set = set()
    hits = []
    for r in reqs:
        bounds, pos = [], 0
        for seg, n in r.segments:
            pos += n
            bounds.append((pos, seg))
        keys = [next(s for end, s in bounds if (i + 1) * chunk <= end) for i in range(r.prompt_len // chunk)]
        keys = [(k, (i + 1) * chunk) for i, k in enumerate(keys)]
        n = 0
        while n < (r.prompt_len - 1) // chunk and keys[n] in seen:
            n += 1
        hits.append(n * chunk)
        seen.update(keys)
    return hits


@pytest.mark.parametrize("scheduler", ["vllm-v1", "sglang"])
def test_shared_prefix_groups_hit_what_the_groups_share(scheduler):
    """inference-perf's shared-prefix data, groups x prompts, system prompt not block-aligned (1000
    tokens: 62 full blocks and a partial one the question completes), requests a second apart:
    a prompt's first send hits its group's system prompt once the group has been seen, a repeat
    hits all of it but the block holding its last token."""
    sp = {"num_groups": 3, "num_prompts_per_group": 4, "system_prompt_len": 1000, "question_len": 57,
          "output_len": 8}
    sc = _scenario({"dataset_name": "shared_prefix", "num_prompts": 30, "request_rate": 1.0,
                    "burstiness": "inf", "shared_prefix": sp}, scheduler)
    res = simulate(sc)
    reqs = _by_rid(res)
    expected = _expected_hits(reqs, 16)
    assert [r.cached_tokens for r in reqs] == expected
    # the same numbers by hand: 3 groups' first prompts miss, 9 other first sends hit 62 blocks,
    # 18 repeats hit (1057 - 1) // 16 = 66 blocks
    assert sorted(expected) == sorted([0] * 3 + [992] * 9 + [1056] * 18)
    assert res.prefix_hit_tokens == sum(expected)


def test_shared_prefix_request_order_walks_one_shuffle_and_restarts_every_stage():
    sp = {"num_groups": 2, "num_prompts_per_group": 3, "system_prompt_len": 40, "question_len": 8, "output_len": 4}
    sc = _scenario({"dataset_name": "shared_prefix", "stages": [{"rate": 2, "duration": 4}, {"rate": 1, "duration": 9}],
                    "shared_prefix": sp})
    reqs = build_requests(sc.workload)
    prompts = [r.segments[1][0] for r in reqs]
    first, second = prompts[:8], prompts[8:]
    assert len(set(first[:6])) == 6 and first[6:] == first[:2]  # every prompt once, then again in order
    assert second == first[:6] + first[:3]  # the data index restarts with the stage
    group = {r.segments[1][0]: r.segments[0][0] for r in reqs}
    assert len(set(group.values())) == 2 and sorted(list(group.values()).count(g) for g in set(group.values())) == [3, 3]


def test_shared_prefix_accepts_the_names_its_config_yaml_writes():
    alias = {"num_unique_system_prompts": 2, "num_users_per_system_prompt": 5}
    sc = _scenario({"dataset_name": "shared_prefix", "shared_prefix": alias})
    assert (sc.workload.shared_prefix.num_groups, sc.workload.shared_prefix.num_prompts_per_group) == (2, 5)
    with pytest.raises(ScenarioError, match="num_groups"):
        _scenario({"dataset_name": "shared_prefix", "shared_prefix": {"num_groups": 2, "num_unique_system_prompts": 2}})
    with pytest.raises(ScenarioError, match="need dataset_name 'shared_prefix'"):
        _scenario({"dataset_name": "random", "shared_prefix": {"num_groups": 2}})


def test_shared_prefix_multi_turn_users_carry_their_conversation():
    """Each (group, prompt) is a user; its next request is the conversation so far and its prompt
    again, sent at its slot or when its previous request completes, whichever is later."""
    sp = {"num_groups": 2, "num_prompts_per_group": 2, "system_prompt_len": 200, "question_len": 40,
          "output_len": 30, "enable_multi_turn_chat": True}
    res = simulate(_scenario({"dataset_name": "shared_prefix", "num_prompts": 12, "request_rate": 50.0,
                              "burstiness": "inf", "shared_prefix": sp}))
    reqs = _by_rid(res)
    for r in reqs[4:]:
        prev = reqs[r.follows]
        assert r.follows == r.rid - 4
        assert r.prompt_len == prev.prompt_len + prev.output_len + 240
        assert r.start_s >= prev.last_token_s and r.start_s >= r.not_before_s - 1e-12
        # the whole history, but the last reply token, whose KV is computed only with this turn
        assert r.cached_tokens == (prev.prompt_len + prev.output_len - 1) // 16 * 16
    assert [r.prompt_len for r in reqs[::4]] == [240, 510, 780]


# --- sessions and prefix groups in per-request files -------------------------------------------------
def test_per_request_csv_prefix_groups_and_sessions(tmp_path):
    path = tmp_path / "run.csv"
    path.write_text("arrival_s,input_len,output_len,e2e_ms,prefix_group,prefix_len,session_id,turn\n"
                    "0.0,500,20,,sys-a,320,,\n"
                    "1.0,700,20,,sys-a,320,,\n"
                    "2.0,300,10,400,,,chat-1,0\n"
                    "5.0,350,10,,,,chat-1,1\n"
                    "6.0,200,10,,,,chat-1,2\n")
    base = {"dataset_name": "trace", "trace_path": str(path)}
    res = _by_rid(simulate(_scenario(base)))
    a, b, t0, t1, t2 = res
    assert b.cached_tokens == 320  # the group's 320 tokens, 20 full blocks
    assert t1.follows == t0.rid and t1.prompt_len == 350
    assert t1.cached_tokens == 304  # turn 0's prompt and reply (310 tokens, 309 computed), whole blocks
    assert t1.start_s == pytest.approx(5.0)  # at its timestamp, which is after the reply
    # turn 2's recorded prompt (200) is shorter than the conversation (360): it shares what fits
    assert t2.segments[-1][1] == 1 and t2.cached_tokens == 192
    think = _by_rid(simulate(_scenario({**base, "session_timing": "think"})))
    # think time = the recorded gap after the reply: 5.0 - (2.0 + 0.4) = 2.6 s
    assert think[3].start_s == pytest.approx(think[2].start_s + (think[2].last_token_s - think[2].start_s) + 2.6)


def test_aiperf_mooncake_sessions_send_deltas_after_the_history(tmp_path):
    """AIPerf's Mooncake sessions: a later turn's blocks are a new message after the conversation
    so far (its replies included); a `delay` is the think time after the reply, in ms."""
    path = _write_jsonl(tmp_path / "sessions.jsonl", [
        {"session_id": "s1", "timestamp": 0, "input_length": 600, "output_length": 40, "hash_ids": [1, 2]},
        {"session_id": "s1", "delay": 1500, "input_length": 100, "output_length": 10, "hash_ids": [3]},
        {"session_id": "s2", "timestamp": 100, "input_length": 600, "output_length": 5, "hash_ids": [1, 4]}])
    res = _by_rid(simulate(_scenario({"dataset_name": "mooncake", "trace_path": path})))
    first, later, other = res
    assert later.follows == first.rid and later.prompt_len == 600 + 40 + 100
    assert later.start_s == pytest.approx(first.last_token_s + 1.5)
    assert later.cached_tokens == 624  # the history (640) but its last token, whose KV is not computed yet
    assert other.cached_tokens == 512  # the first block only: s2's second block is other content


# --- what a hit saves, and what memory pressure evicts -------------------------------------------------
def test_ttft_falls_by_the_prefill_the_cache_saves(tmp_path):
    """At low load a cached prompt's first token costs one prefill step of its uncached tokens, each
    attending to the whole context before it; without the cache, a step of the whole prompt."""
    from sim.step_time import BatchShape

    path = _write_jsonl(tmp_path / "two.jsonl", [
        {"timestamp": 0, "input_length": 4000, "output_length": 2, "hash_ids": list(range(8))},
        {"timestamp": 5000, "input_length": 4000, "output_length": 2, "hash_ids": list(range(7)) + [99]}])
    sc = _scenario({"dataset_name": "mooncake", "trace_path": path})
    model = sc.step_time.build()
    on = _by_rid(simulate(sc))
    off = _by_rid(simulate(_scenario({"dataset_name": "mooncake", "trace_path": path}, caching=False)))
    hit = on[1].cached_tokens
    assert hit == 7 * 512

    def prefill(new: int, ctx: int) -> float:  # new tokens after ctx cached ones: attention pairs sum
        return model.step_time(BatchShape(num_seqs=1, prefill_tokens=new,
                                          prefill_attn_pairs=float(sum(range(ctx + 1, ctx + new + 1)))))

    ttft = lambda r: r.first_token_s - r.start_s  # noqa: E731
    assert ttft(on[1]) == pytest.approx(prefill(4000 - hit, hit), rel=1e-12)
    assert ttft(off[1]) == pytest.approx(prefill(4000, 0), rel=1e-12)
    assert ttft(off[1]) - ttft(on[1]) > hit * STEP["per_prefill_token_s"]  # compute and attention saved


@pytest.mark.parametrize("scheduler", ["vllm-v1", "sglang"])
def test_memory_pressure_evicts_least_recently_freed_tails_first(tmp_path, scheduler):
    """vLLM's free queue (SGLang's LRU leaves amount to the same here): A's blocks were freed before
    B's, so a request that needs room evicts A's first, from A's tail. Afterwards A's prompt hits
    only the head that survived, B's all of it. 20 blocks of 16 tokens; A and B hold 9 each."""
    rows = [{"timestamp": 0, "input_length": 129, "output_length": 1, "hash_ids": list(range(1, 10))},  # A
            {"timestamp": 1000, "input_length": 129, "output_length": 1, "hash_ids": list(range(11, 20))},  # B
            {"timestamp": 2000, "input_length": 81, "output_length": 1, "hash_ids": list(range(31, 37))},  # C
            {"timestamp": 3000, "input_length": 129, "output_length": 1, "hash_ids": list(range(11, 20))},  # B again
            {"timestamp": 4000, "input_length": 129, "output_length": 1, "hash_ids": list(range(1, 10))}]  # A again
    path = _write_jsonl(tmp_path / "evict.jsonl", rows)
    sc = _scenario({"dataset_name": "mooncake", "trace_path": path, "hash_block_tokens": 16}, scheduler, blocks=20,
                   max_model_len=200)
    res = _by_rid(simulate(sc))
    # C (6 blocks) takes the 2 never-used blocks, A's partial tail block, then A's chunks 8, 7, 6;
    # B again hits all 8 of its chunks and takes one block for its last token: A's chunk 5
    assert [r.cached_tokens for r in res] == [0, 0, 0, 8 * 16, 4 * 16]


# --- the extents agree with a cache kept chunk by chunk ----------------------------------------------
@st.composite
def shared_scenarios(draw):
    """Random scenarios (tests/test_properties.py) on an engine that caches prefixes, with a workload
    whose prompts share content: a Mooncake trace drawn from a small tree of blocks, inference-perf's
    shared-prefix groups (multi-turn or not), or random prompts with a shared prefix and turns."""
    data = draw(scenarios())
    eng = data["engine"]
    if eng["scheduler"] == "vllm-v0":
        eng["scheduler"] = "vllm-v1"
    if eng["scheduler"] == "vllm-v1":
        eng["enable_prefix_caching"] = True
    else:
        eng["disable_radix_cache"] = False
    w = data["workload"]
    limit = eng.get("max_model_len") or eng.get("context_length")
    kind = draw(st.sampled_from(["mooncake", "shared_prefix", "random"]))
    keep = {k: w[k] for k in ("client", "seed", "max_concurrency", "request_timeout_s") if k in w}
    if kind == "mooncake":
        block = draw(st.sampled_from([4, 16, 50]))
        rows, t = [], 0
        for _ in range(draw(st.integers(1, 30))):
            depth = draw(st.integers(1, 6))
            path = [draw(st.integers(0, 2)) for _ in range(depth)]  # a small tree: shared branches
            ids = [hash(tuple(path[:k + 1])) % 10_000 for k in range(depth)]
            t += draw(st.sampled_from([0, 3, 40, 500]))
            rows.append({"timestamp": t, "input_length": max(1, min(limit - 2, depth * block - draw(st.integers(0, block - 1)))),
                         "output_length": draw(st.integers(1, max(1, limit // 4))), "hash_ids": ids})
        data["workload"] = {**keep, "dataset_name": "mooncake", "hash_block_tokens": block, "rows": rows}
    elif kind == "shared_prefix":
        data["workload"] = {**keep, "dataset_name": "shared_prefix", "num_prompts": draw(st.integers(1, 40)),
                            "request_rate": draw(st.sampled_from(["inf", 20.0])),
                            "shared_prefix": {"num_groups": draw(st.integers(1, 3)),
                                              "num_prompts_per_group": draw(st.integers(1, 3)),
                                              "system_prompt_len": draw(st.integers(1, max(1, limit // 3))),
                                              "question_len": draw(st.integers(1, max(1, limit // 6))),
                                              "output_len": draw(st.integers(1, max(1, limit // 6))),
                                              "enable_multi_turn_chat": draw(st.booleans())}}
    else:
        w["random_prefix_len"] = draw(st.integers(1, max(1, limit // 3)))
        w["turns"] = draw(st.integers(1, 3))
    return data


def _outcome(data, monkeypatch, reference: bool):
    import tempfile

    import sim.kv_cache

    from tests.per_chunk_prefix_cache import PrefixCache as PerChunk
    from sim.prefix_cache import PrefixCache as Extents

    data = json.loads(json.dumps(data))
    rows = data["workload"].pop("rows", None)
    with tempfile.TemporaryDirectory() as d:
        if rows is not None:
            data["workload"]["trace_path"] = _write_jsonl(Path(d) / "t.jsonl", rows)
        monkeypatch.setattr(sim.kv_cache, "PrefixCache", PerChunk if reference else Extents)
        with wall_clock_guard(60):
            res = simulate(scenario_from_dict(data))
    reqs = _by_rid(res)
    return ([(r.status.value, r.cached_tokens, r.num_preemptions, r.token_times) for r in reqs],
            res.num_steps, res.num_preemptions, res.prefix_hit_tokens, res.prefix_query_tokens, res.peak_kv_blocks)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=shared_scenarios())
def test_extents_give_what_a_cache_kept_chunk_by_chunk_gives(data):
    """The cache keeps runs of chunks (extents) for speed; one kept chunk by chunk (the reference, in
    tests/per_chunk_prefix_cache.py) must give the same hits, evictions, preemptions and token times."""
    with pytest.MonkeyPatch.context() as mp:
        assert _outcome(data, mp, reference=False) == _outcome(data, mp, reference=True)


def test_burstgpt_rows_replay_and_its_failures_are_counted(tmp_path):
    """BurstGPT's CSV (seconds, request and response tokens); a row with 0 response tokens is a failed
    request whose length is unknown: not replayed, and the report says how many."""
    from sim.workload import trace_skipped

    path = tmp_path / "BurstGPT_1.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "5,ChatGPT,472,18,490,Conversation log\n45,ChatGPT,1087,0,1087,Conversation log\n"
                    "118,GPT-4,417,276,693,Conversation log\n")
    reqs = build_requests(_scenario({"dataset_name": "trace", "trace_path": str(path)}).workload)
    assert [(r.prompt_len, r.max_tokens, r.arrival_s) for r in reqs] == [(472, 18, 0.0), (417, 276, 113.0)]
    assert trace_skipped(str(path)) == 1
