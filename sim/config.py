"""Scenario files: one engine deployment plus one benchmark run, in TOML.

Engine keys are vLLM's flag names (`max_num_batched_tokens`, `enable_chunked_prefill`,
...); workload keys are the benchmark client's (`dataset_name`, `num_prompts`,
`request_rate`, `max_concurrency`, ...). A flag left out takes vLLM's default for the
pinned engine version (`resolve_engine_defaults`), and the combination is checked with
the same rules, and the same messages, vLLM uses at startup.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .step_time import EngineFacts, StepTimeParams


class ScenarioError(ValueError):
    """A scenario that cannot run: names the field and the rule it breaks."""


def check_fits_in_memory(count: int, bytes_each: int, field: str, what: str) -> None:
    """Refuse, before building anything, a run whose `count` objects cannot fit in this machine's
    memory (a hang or a kill for memory otherwise, minutes later and with no message)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return
    need = count * bytes_each
    if need > 0.8 * total:
        raise ScenarioError(f"{field}: {count:,} {what} need about {need / 2**30:,.0f} GiB (~{bytes_each // 1024} KiB "
                            f"each) and this machine has {total / 2**30:,.0f} GiB; simulate fewer")


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


# token counts and request counts beyond any real run (a billion): past them a length overflows
# the integer arithmetic of numpy's samplers instead of meaning anything
MAX_TOKENS = 10**9


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, defer_build=True)


VLLM_ONLY = ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "num_gpu_blocks_override",
             "enable_prefix_caching", "async_scheduling")
SGLANG_ONLY = ("chunked_prefill_size", "max_prefill_tokens", "max_running_requests", "enable_mixed_chunk",
               "max_total_tokens", "context_length", "disable_radix_cache", "disable_overlap_schedule",
               "cuda_graph_max_bs")


class EngineConfig(_Strict):
    """One engine instance. vLLM keys are vLLM's flags, SGLang keys are SGLang's (`sglang.launch_server`)."""

    scheduler: Literal["vllm-v0", "vllm-v1", "sglang"] = "vllm-v1"
    policy: str | None = Field(None, description="a user's scheduling policy, FILE.py:Class or module:Class "
                               "(a Scheduler subclass); `scheduler` still sets the flags and defaults")
    version: str | None = Field(None, description="engine release whose defaults apply (vLLM 0.11.0, SGLang 0.4.6)")
    gpu: str = Field("", description="device name, used only for per-GPU defaults")
    gpu_memory_gib: float | None = None

    max_model_len: int | None = Field(None, gt=0, le=MAX_TOKENS)
    block_size: int | None = Field(None, gt=0, le=4096, description="vLLM --block-size (1-128 on CUDA) / SGLang "
                                   "--page-size")
    # CUDA graphs (on by default in both): without them every step's kernels are launched one by
    # one, which a fit models as a per-step launch floor (launch_overhead_s); with them it is not fitted
    enforce_eager: bool = Field(False, description="vLLM --enforce-eager: no CUDA graphs")
    disable_cuda_graph: bool = Field(False, description="SGLang --disable-cuda-graph")
    # the CPU planning step N+1 while the GPU runs step N (sim.step_time.EngineFacts)
    async_scheduling: bool | None = Field(None, description="vLLM V1 --async-scheduling (default: on from 0.14.0)")
    disable_overlap_schedule: bool | None = Field(
        None, description="SGLang --disable-overlap-schedule (default: false; speculative decoding turns overlap off)")
    cuda_graph_max_bs: int | None = Field(None, gt=0, description="SGLang --cuda-graph-max-bs (default 160; from "
                                             "0.5.3 by GPU memory and TP, 256/512 below/from TP 4 on 60-160 GiB)")
    kv_cache_tokens: int | None = Field(None, gt=0)
    # vLLM
    max_num_batched_tokens: int | None = Field(None, gt=0)
    max_num_seqs: int | None = Field(None, gt=0)
    enable_chunked_prefill: bool | None = None
    long_prefill_token_threshold: int = Field(0, ge=0)
    num_gpu_blocks_override: int | None = Field(None, gt=0)
    enable_prefix_caching: bool | None = Field(None, description="default: on for vllm-v1, off for vllm-v0")
    # SGLang
    context_length: int | None = Field(None, gt=0)
    chunked_prefill_size: int | None = Field(None, description="-1 disables chunking")
    max_prefill_tokens: int | None = Field(None, gt=0)
    max_running_requests: int | None = Field(None, gt=0)
    max_total_tokens: int | None = Field(None, gt=0, description="SGLang's KV pool size in tokens")
    schedule_conservativeness: float = Field(1.0, gt=0)
    enable_mixed_chunk: bool | None = None
    disable_radix_cache: bool | None = Field(None, description="default: false (the radix prefix cache is on)")
    radix_chunk_tokens: int = Field(16, gt=0, description="granularity at which the simulated radix cache matches")
    # speculative decoding / MTP: k draft tokens verified per decode step
    num_speculative_tokens: int = Field(0, ge=0)
    spec_acceptance_rate: float | None = Field(None, ge=0, le=1, description="P(accept draft i | drafts < i accepted)")
    spec_acceptance: list[float] | None = Field(None, description="per-position conditional acceptance")

    @model_validator(mode="after")
    def _check(self):
        sglang = self.scheduler == "sglang"
        if self.policy is not None:
            from .schedulers import load_policy

            load_policy(self.policy)  # a bad path or class is an error now, naming the field
        if self.version is None:
            self.version = "0.4.6" if sglang else "0.11.0"
        wrong = [k for k in (VLLM_ONLY if sglang else SGLANG_ONLY) if getattr(self, k) is not None]
        if wrong:
            other = "vLLM" if sglang else "SGLang"
            raise ValueError(f"{', '.join(wrong)}: {other} flag(s), not valid for scheduler {self.scheduler!r}")
        if sglang:
            if self.context_length is not None:
                if self.max_model_len is not None and self.max_model_len != self.context_length:
                    raise ValueError("give context_length or max_model_len, not both")
                self.max_model_len = self.context_length
            if self.max_total_tokens is not None:
                if self.kv_cache_tokens is not None:
                    raise ValueError("give max_total_tokens or kv_cache_tokens, not both")
                self.kv_cache_tokens = self.max_total_tokens
        if self.max_model_len is None:
            raise ValueError("max_model_len is required (SGLang: context_length)")
        k = self.num_speculative_tokens
        if k:
            if self.scheduler == "vllm-v0":
                raise ValueError("num_speculative_tokens: speculative decoding is modelled for vllm-v1 and sglang")
            if self.spec_acceptance is None:
                if self.spec_acceptance_rate is None:
                    raise ValueError("num_speculative_tokens needs spec_acceptance_rate or spec_acceptance")
                self.spec_acceptance = [self.spec_acceptance_rate] * k
            if len(self.spec_acceptance) != k or not all(0 <= p <= 1 for p in self.spec_acceptance):
                raise ValueError(f"spec_acceptance: {k} probabilities in [0, 1], one per draft position")
        if self.block_size is None:
            self.block_size = 1 if sglang else 16
        if (self.num_gpu_blocks_override is None) == (self.kv_cache_tokens is None):
            raise ValueError(
                "give exactly one of num_gpu_blocks_override (blocks) or kv_cache_tokens (tokens) "
                "for the KV cache capacity" + (" (SGLang: max_total_tokens)" if sglang else "")
            )
        return self

    @property
    def cuda_graphs(self) -> bool:
        return not (self.enforce_eager or self.disable_cuda_graph)

    def sglang_retracts_ahead(self) -> bool:
        """SGLang's `retract_decode` retracts until the pool holds SGLANG_RETRACT_DECODE_STEPS
        more steps of every remaining request up to 0.5.1; from 0.5.2 (read in 0.5.2-0.5.5)
        only until `check_decode_mem` passes, the next step alone."""
        return _version_tuple(self.version) < (0, 5, 2)

    def step_facts(self) -> EngineFacts:
        """The batch sizes this engine captures as CUDA graphs and whether it overlaps the CPU's
        scheduling with the GPU (call on a resolved config: `resolve_engine_defaults`).

        vLLM V1 (`vllm/config/compilation.py`): 1, 2, 4, then steps of 8 up to 248 and of 16 from
        256 (from 0.11.1; steps of 8 throughout before), up to min(2 x max_num_seqs, 512) and no
        more than max_num_batched_tokens; every batch that fits is padded, prefills too (piecewise
        graphs). vLLM V0: decode-only batches, 1, 2, 4 and multiples of 8 up to min(max_num_seqs,
        256). SGLang (`cuda_graph_runner.get_batch_sizes_to_capture`): decode-only batches up to
        cuda_graph_max_bs (`sglang_cuda_graph_max_bs`), 1, 2, 4 and multiples of 8 up to 0.5.2;
        from 0.5.3 1, 2, 4, 8, 12, steps of 8 to 256, of 16 to 496, then 512 and steps of 32
        (server_args._generate_cuda_graph_batch_sizes); plus the request pool's size when that
        is smaller."""
        v = _version_tuple(self.version)
        sizes: list[int] = []
        if self.scheduler == "sglang":
            overlap = not self.disable_overlap_schedule
            if self.cuda_graphs:
                top = self.cuda_graph_max_bs or 160
                pool = self.max_running_requests or top
                if v < (0, 5, 3):
                    sizes = [1, 2, 4] + [8 * i for i in range(1, 21)]
                    if max(sizes) > pool:
                        sizes += [pool - 1, pool]
                else:  # server_args._generate_cuda_graph_batch_sizes
                    sizes = ([1, 2, 4, 8, 12] + list(range(16, 257, 8)) + list(range(272, 512, 16))
                             + list(range(512, top + 1, 32))) if not self.num_speculative_tokens else (
                        list(range(1, 9)) + list(range(10, 33, 2)) + list(range(40, 65, 4)) + list(range(72, 257, 8))
                        + list(range(272, top + 1, 16)))
                    sizes = [b for b in sizes if b <= top]
                    if max(sizes) > pool:
                        sizes += [pool]
                sizes = sorted({b for b in sizes if 0 < b <= min(top, pool)})
            return EngineFacts(overlap, tuple(sizes), graph_mixed=False)
        if self.scheduler == "vllm-v0":
            if self.cuda_graphs:
                top = min(self.max_num_seqs or 256, 256)
                sizes = [b for b in [1, 2, 4] + list(range(8, 257, 8)) if b <= -(-top // 8) * 8]
            return EngineFacts(False, tuple(sizes), graph_mixed=False)
        if self.cuda_graphs:
            top = min(2 * (self.max_num_seqs or 256), 512, self.max_num_batched_tokens or 512)
            if v >= (0, 11, 1):
                sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 513, 16))
            else:
                sizes = [1, 2, 4] + list(range(8, 513, 8))
            sizes = [b for b in sizes if b <= top]
        return EngineFacts(bool(self.async_scheduling), tuple(sizes), graph_mixed=True, unified_attention=True)

    @property
    def num_gpu_blocks(self) -> int:
        if self.num_gpu_blocks_override is not None:
            return self.num_gpu_blocks_override
        return self.kv_cache_tokens // self.block_size


def resolve_engine_defaults(e: EngineConfig, tp: int | None = None) -> EngineConfig:
    """Fill omitted flags with the engine's defaults for `e.version`, then apply vLLM's checks.
    `tp`: the instance's tensor parallelism, where a default depends on it (SGLang's CUDA graphs)."""
    if e.scheduler == "sglang":
        return _resolve_sglang(e, tp)
    v = _version_tuple(e.version)
    upd: dict[str, Any] = {}
    chunking = e.enable_chunked_prefill
    if e.scheduler == "vllm-v0":
        if chunking is None:
            # arg_utils (v0.6-v0.8): switched on when unset and max_model_len > 32K on CUDA
            chunking = v >= (0, 6) and e.max_model_len > 32768
        budget = e.max_num_batched_tokens
        if budget is None:
            if not chunking:
                budget = max(e.max_model_len, 2048)
            else:
                # 512 until v0.6.4; 2048 from v0.6.5 (vllm PR 10544)
                budget = 2048 if v >= (0, 6, 5) else 512
        seqs = e.max_num_seqs if e.max_num_seqs is not None else 256
    else:
        if chunking is None or v < (0, 9):
            # V1 always chunks: 0.8.x's `_set_default_args_v1` sets enable_chunked_prefill = True
            # whatever the flag said (checked in the 0.8.2 source); later V1 honours "false".
            chunking = True
        big_gpu = _v1_big_gpu(e, v)
        budget = e.max_num_batched_tokens
        if budget is None:
            budget = (8192 if big_gpu else 2048) if chunking else e.max_model_len
        seqs = e.max_num_seqs
        if seqs is None:
            seqs = 1024 if (big_gpu and v >= (0, 9)) else 256
            if v >= (0, 10):
                seqs = min(seqs, budget)
    caching = e.enable_prefix_caching
    if caching is None:
        caching = e.scheduler == "vllm-v1"  # V1 caches prefixes by default; V0 did not
    if caching and e.scheduler == "vllm-v0":
        raise ScenarioError("engine.enable_prefix_caching: prefix caching is modelled for vllm-v1 and sglang, "
                            "not for the V0 block manager")
    overlap = e.async_scheduling
    if e.scheduler == "vllm-v0":
        if overlap:
            raise ScenarioError("engine.async_scheduling: async scheduling is a vLLM V1 feature (scheduler vllm-v1)")
        overlap = False
    elif overlap is None:
        overlap = v >= (0, 14)  # default on from 0.14.0
    upd.update(enable_chunked_prefill=chunking, max_num_batched_tokens=budget, max_num_seqs=seqs,
               enable_prefix_caching=caching, async_scheduling=overlap)
    e = e.model_copy(update=upd)
    _verify_engine(e)
    return e


def sglang_cuda_graph_max_bs(version: str | None, gpu_memory_gib: float | None, tp: int | None) -> int:
    """SGLang's default --cuda-graph-max-bs: 160 up to 0.5.2 and when the memory is unknown;
    from 0.5.3 by the GPU's memory (nvidia-smi's) and TP (`server_args._handle_gpu_memory_settings`,
    read in 0.5.3, 0.5.4.post2, 0.5.5.post1; Ascend's own rows left out)."""
    if _version_tuple(version or "0.4.6") < (0, 5, 3) or gpu_memory_gib is None:
        return 160
    small_tp = (tp or 1) < 4
    mem = gpu_memory_gib
    if mem < 20:
        return 8
    if mem < 35:
        return (16 if _version_tuple(version) < (0, 5, 4) else 24) if small_tp else 80
    if mem < 60:
        return 32 if small_tp else 160
    if mem < 160:
        return 256 if small_tp else 512
    return 512


def sglang_chunked_prefill_size(version: str | None, gpu_memory_gib: float | None) -> int:
    """SGLang's default --chunked-prefill-size, by the GPU's memory (nvidia-smi's)."""
    mem = gpu_memory_gib
    if _version_tuple(version or "0.4.6") <= (0, 4, 6):  # 0.4.4-0.4.6: by nvidia-smi memory, 25,000 MB threshold
        return 2048 if mem is not None and mem * 1024 < 25000 else 8192
    if mem is None:
        return 4096  # later versions: unknown device
    return 2048 if mem < 35 else 4096 if mem < 60 else 8192 if mem < 160 else 16384


def sglang_mem_fraction_static(version: str | None, gpu_memory_gib: float, tp: int, *,
                               chunked_prefill_size: int | None = None, cuda_graph_max_bs: int | None = None,
                               max_prefill_tokens: int = 16384, pp: int = 1) -> float:
    """SGLang's default --mem-fraction-static from 0.5.3 (`_handle_gpu_memory_settings`, read in
    0.5.3, 0.5.4.post2, 0.5.5.post1): the share of the GPU's memory left to weights and the KV
    pool once activations (1.5 MiB per token of a chunk) and CUDA graphs (2 MiB per batch of
    the largest) are set aside, with 512 MiB of metadata and 128 MiB per device of the TP x PP
    group; at least 10 GiB on a device over 60 GiB. Flags left None take their defaults. Not
    for DP attention or speculative decoding, which set more aside."""
    if _version_tuple(version or "0.4.6") < (0, 5, 3):
        raise ValueError(f"SGLang {version}: its default mem_fraction_static is known here from 0.5.3 on; "
                         "give --mem-fraction-static")
    chunk = chunked_prefill_size or sglang_chunked_prefill_size(version, gpu_memory_gib)
    graphs = cuda_graph_max_bs or sglang_cuda_graph_max_bs(version, gpu_memory_gib, tp)
    mem_mib = gpu_memory_gib * 1024
    reserved = 512 + max(chunk if chunk > 0 else max_prefill_tokens, 2048) * 1.5 + graphs * 2 + tp * pp / 8 * 1024
    if mem_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return round((mem_mib - reserved) / mem_mib, 3)


def _resolve_sglang(e: EngineConfig, tp: int | None = None) -> EngineConfig:
    """SGLang's server_args defaults (≈v0.4, read in 0.4.4-0.4.6; 0.5.3+ where marked): chunk
    size by GPU memory, 16384 prefill tokens, running requests bounded by half the token pool
    and the request pool (pool tokens / context length x 512, clamped to 2048..4096, plus one),
    the CUDA graphs' largest batch by version, memory and TP."""
    upd: dict[str, Any] = {}
    if e.cuda_graph_max_bs is None and not e.disable_cuda_graph:
        upd["cuda_graph_max_bs"] = sglang_cuda_graph_max_bs(e.version, e.gpu_memory_gib, tp)
    if e.chunked_prefill_size is None:
        upd["chunked_prefill_size"] = sglang_chunked_prefill_size(e.version, e.gpu_memory_gib)
    if e.max_prefill_tokens is None:
        upd["max_prefill_tokens"] = 16384
    if e.max_running_requests is None:
        pool = e.num_gpu_blocks * e.block_size
        req_pool = min(4096, max(2048, int(pool / e.max_model_len * 512))) + 1
        upd["max_running_requests"] = max(1, min(pool // 2, req_pool))
    if e.enable_mixed_chunk is None:
        upd["enable_mixed_chunk"] = False
    if e.disable_radix_cache is None:
        upd["disable_radix_cache"] = False
    if e.disable_overlap_schedule is None:
        # server_args: speculative decoding (EAGLE) switches the overlap scheduler off
        upd["disable_overlap_schedule"] = e.num_speculative_tokens > 0
    e = e.model_copy(update=upd)
    if e.chunked_prefill_size > 0 and e.chunked_prefill_size % e.block_size:
        raise ScenarioError(
            f"engine.chunked_prefill_size: {e.chunked_prefill_size} must be a multiple of the page size "
            f"({e.block_size}): chunks are cut at page boundaries"
        )
    return e


def _v1_big_gpu(e: EngineConfig, v: tuple[int, ...]) -> bool:
    """V1 `EngineArgs` picks larger defaults on H100-class devices (the server's numbers)."""
    name = e.gpu.lower()
    if v >= (0, 10):
        mem = e.gpu_memory_gib or 0
        return mem >= 70 and "a100" not in name
    return "h100" in name or "h200" in name


def _verify_engine(e: EngineConfig) -> None:
    """`SchedulerConfig._verify_args` and the KV-capacity startup check, vLLM's wording."""
    if e.max_num_batched_tokens < e.max_num_seqs:
        raise ScenarioError(
            f"engine.max_num_batched_tokens: max_num_batched_tokens ({e.max_num_batched_tokens}) must "
            f"be greater than or equal to max_num_seqs ({e.max_num_seqs})."
        )
    if not e.enable_chunked_prefill and e.max_num_batched_tokens < e.max_model_len:
        raise ScenarioError(
            f"engine.max_num_batched_tokens: max_num_batched_tokens ({e.max_num_batched_tokens}) is "
            f"smaller than max_model_len ({e.max_model_len}). This effectively limits the maximum "
            "sequence length to max_num_batched_tokens and makes vLLM reject longer sequences. "
            "Please increase max_num_batched_tokens or decrease max_model_len."
        )
    kv_tokens = e.num_gpu_blocks * e.block_size
    if e.max_model_len > kv_tokens:
        raise ScenarioError(
            f"engine.max_model_len: The model's max seq len ({e.max_model_len}) is larger than the "
            f"maximum number of tokens that can be stored in KV cache ({kv_tokens}). Try increasing "
            "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine."
        )


class StageConfig(_Strict):
    """One load stage of inference-perf's `load.stages`: int(rate x duration) requests."""

    rate: float = Field(gt=0, description="requests per second")
    duration: float = Field(gt=0, description="seconds")

    @property
    def num_requests(self) -> int:
        return int(self.rate * self.duration)


class SharedPrefixConfig(_Strict):
    """inference-perf's `data.shared_prefix` generator (its source, not its docs, where they differ):
    `num_groups` system prompts, each with `num_prompts_per_group` questions; every prompt is its
    group's system prompt followed by its own question. Its report's config.yaml writes the two
    counts as `num_unique_system_prompts` and `num_users_per_system_prompt`: the same numbers
    under other names, accepted here too (one name per count, as inference-perf insists)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, defer_build=True)
    num_groups: int = Field(10, ge=1, validation_alias=AliasChoices("num_groups", "num_unique_system_prompts"))
    num_prompts_per_group: int = Field(10, ge=1, validation_alias=AliasChoices("num_prompts_per_group",
                                                                             "num_users_per_system_prompt"))
    system_prompt_len: int = Field(100, ge=1, description="tokens (fixed lengths only; inference-perf also takes "
                                   "a distribution)")
    question_len: int = Field(50, ge=1)
    output_len: int = Field(50, ge=1)
    enable_multi_turn_chat: bool = Field(False, description="every (group, prompt) pair is a user who re-sends its "
                                         "prompt after its whole conversation so far, each round")

    @model_validator(mode="before")
    @classmethod
    def _one_name(cls, data):
        for a, b in (("num_groups", "num_unique_system_prompts"), ("num_prompts_per_group", "num_users_per_system_prompt")):
            if isinstance(data, dict) and a in data and b in data:
                raise ValueError(f"give {a} or {b} (the same count), not both")
        return data


class WorkloadConfig(_Strict):
    client: Literal["vllm", "vllm-legacy", "sglang"] = Field(
        "vllm", description="vllm: `vllm bench serve` (>= 0.8); vllm-legacy: old benchmark_serving.py; "
        "sglang: python -m sglang.bench_serving"
    )
    dataset_name: Literal["random", "sharegpt", "trace", "mooncake", "lengths", "shared_prefix"] = "random"
    num_prompts: int | None = Field(None, ge=1, le=MAX_TOKENS)
    request_rate: float = Field(math.inf, gt=0)
    burstiness: float = Field(1.0, gt=0)
    max_concurrency: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="default: 0 for vLLM's clients, 1 for SGLang's "
                             "(both seed numpy's generator, which takes 0 to 2**32 - 1)")
    ignore_eos: bool | None = Field(
        None, description="default: off for vLLM's clients, on for SGLang's (--disable-ignore-eos)"
    )
    # random
    random_input_len: int = Field(1024, ge=1, le=MAX_TOKENS)
    random_output_len: int = Field(128, ge=1, le=MAX_TOKENS)
    random_range_ratio: float | None = Field(None, ge=0)
    random_prefix_len: int = Field(0, ge=0, le=MAX_TOKENS, description="a prefix shared by every prompt (vLLM --random-prefix-len)")
    turns: int = Field(1, ge=1, description="random dataset: conversations of this many turns, each turn's "
                       "prompt holding the whole conversation so far; a turn is sent when the previous completes")
    think_time_s: float = Field(0.0, ge=0, description="pause between a reply and the next turn")
    # Without --ignore-eos (vLLM's default) a real model may stop before max_tokens. When a
    # measured run reports a mean output length below the requested one, set it here: a share
    # of requests stops early, at a uniformly drawn length, the rest run to their requested
    # length, so that the expected mean matches. (An assumption about the shape; the mean and
    # the maximum are what the measurement pins down.)
    output_len_mean: float | None = Field(None, gt=0)
    # sharegpt
    dataset_path: str | None = None
    sharegpt_output_len: int | None = Field(None, ge=1, le=MAX_TOKENS)
    # lengths: a CSV of num_prefill_tokens, num_decode_tokens (Vidur's length traces), in dataset_path
    lengths_max_tokens: int | None = Field(None, ge=2, description="Vidur's trace max_tokens: a longer request "
                                           "loses the excess from prompt and output in proportion")
    # trace: a recorded run's requests (sim.traces reads the clients' per-request files)
    trace_path: str | None = None
    trace_time_scale: float = Field(1.0, gt=0)
    trace_stage: int | None = Field(None, ge=0, description="replay only this load stage of the recorded run, "
                                    "its first request at time 0")
    shared_prefix: SharedPrefixConfig | None = Field(None, description="dataset_name 'shared_prefix' "
                                                     "(inference-perf's data.shared_prefix)")
    hash_block_tokens: int = Field(512, ge=1, description="mooncake: tokens per hash id (AIPerf's default block)")
    session_timing: Literal["timestamp", "think"] = Field(
        "timestamp", description="a recorded conversation's next turn: at its timestamp (never before the reply "
        "to the turn before), or a think time after that reply")
    # inference-perf's load stages, run one after another (each waits for the one before to end)
    stages: list[StageConfig] | None = Field(None, min_length=1, description="inference-perf load.stages")
    stage_arrivals: Literal["constant", "poisson"] = Field(
        "constant", description="inference-perf load.type: constant (rescaled exponential gaps) or poisson")
    stage_interval_s: float = Field(1.0, ge=0, description="inference-perf load.interval: the pause after a stage")
    # a client-side deadline: a request not finished this long after it was sent fails, and the
    # server aborts it (inference-perf load.request_timeout)
    request_timeout_s: float | None = Field(None, gt=0)

    @field_validator("request_rate", "burstiness", mode="before")
    @classmethod
    def _inf(cls, v):
        return math.inf if isinstance(v, str) and v.strip().lower() in ("inf", "infinity") else v

    @model_validator(mode="after")
    def _check(self):
        if self.dataset_name in ("trace", "mooncake") and not self.trace_path:
            raise ValueError(f"dataset_name '{self.dataset_name}' needs trace_path")
        if self.dataset_name == "lengths" and not self.dataset_path:
            raise ValueError("dataset_name 'lengths' needs dataset_path (a CSV of num_prefill_tokens, num_decode_tokens)")
        if self.client == "vllm" and self.random_range_ratio is not None and not self.random_range_ratio < 1:
            raise ValueError("random_range_ratio must be in [0, 1) for the vllm client")
        if self.client != "vllm" and self.random_range_ratio is not None and self.random_range_ratio > 1:
            raise ValueError(f"random_range_ratio must be in [0, 1] for the {self.client} client")
        if self.seed is None:
            self.seed = 1 if self.client == "sglang" else 0
        if self.ignore_eos is None:
            self.ignore_eos = self.client == "sglang"
        if self.output_len_mean is not None:
            if self.ignore_eos:
                raise ValueError("output_len_mean describes outputs ended by EOS; it contradicts ignore_eos = true")
            if self.dataset_name != "random":
                raise ValueError("output_len_mean applies to the random dataset")
        if self.dataset_name == "shared_prefix" and self.shared_prefix is None:
            self.shared_prefix = SharedPrefixConfig()
        if self.shared_prefix is not None and self.dataset_name != "shared_prefix":
            raise ValueError("shared_prefix: its settings need dataset_name 'shared_prefix'")
        if self.turns > 1 and self.dataset_name != "random":
            raise ValueError("turns: multi-turn conversations are built from the random dataset")
        if self.trace_stage is not None and self.dataset_name not in ("trace", "mooncake"):
            raise ValueError("trace_stage selects a stage of a recorded run: it needs dataset_name 'trace'")
        if self.stages is not None:
            if self.dataset_name in ("trace", "mooncake"):
                raise ValueError("stages: a trace brings its own arrival times; stages need a dataset "
                                 "(random, sharegpt, lengths)")
            if not math.isinf(self.request_rate):
                raise ValueError("stages give every stage its own rate: leave request_rate unset")
            if self.max_concurrency is not None or self.turns > 1:
                raise ValueError("stages: max_concurrency and turns are not modelled together with stages")
            sizes = [st.num_requests for st in self.stages]
            if min(sizes) < 1:
                raise ValueError(f"stages: stage {sizes.index(min(sizes))} has rate x duration < 1: no request")
            if self.num_prompts is not None and self.num_prompts != sum(sizes):
                raise ValueError(f"num_prompts ({self.num_prompts}) contradicts the stages, which send "
                                 f"{sum(sizes)} requests (int(rate x duration) each); leave it unset")
            self.num_prompts = sum(sizes)
        if self.num_prompts is None and self.dataset_name not in ("trace", "mooncake"):
            self.num_prompts = 1000
        return self

    @property
    def resolved_range_ratio(self) -> float:
        if self.random_range_ratio is not None:
            return self.random_range_ratio
        return 1.0 if self.client == "vllm-legacy" else 0.0


class ReportConfig(_Strict):
    percentile_metrics: str = "ttft,tpot,itl"
    metric_percentiles: str = "99"
    goodput: dict[str, float] = Field(default_factory=dict, description="SLOs in ms: ttft, tpot, e2el")

    @field_validator("percentile_metrics")
    @classmethod
    def _metrics(cls, v: str):
        bad = [m for m in v.split(",") if m.strip() not in ("ttft", "tpot", "itl", "e2el")]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; choose from ttft, tpot, itl, e2el")
        return v

    @field_validator("metric_percentiles")
    @classmethod
    def _pcts(cls, v: str):
        for p in v.split(","):
            try:
                x = float(p)
            except ValueError:
                raise ValueError(f"percentile {p!r} is not a number") from None
            if not 0 < x < 100:
                raise ValueError(f"percentile {p} must be in (0, 100)")
        return v

    @field_validator("goodput")
    @classmethod
    def _slos(cls, v: dict):
        for k, ms in v.items():
            if k not in ("ttft", "tpot", "e2el"):
                raise ValueError(f"unknown goodput SLO {k!r}; choose from ttft, tpot, e2el")
            if ms < 0:
                raise ValueError(f"goodput SLO {k} must be >= 0 ms")
        return v


class StepTimeConfig(_Strict):
    """Either a calibrated `profile`, or `model` + `hardware` (+ efficiencies) for the roofline
    model, or the linear model's coefficients (hand-set, uncalibrated)."""

    profile: str | None = None
    model: str | None = None
    hardware: str | None = None
    tp: int | None = Field(None, ge=1)
    dp: int = Field(1, ge=1, description="DP attention ranks of tp devices each, the MoE's routed experts "
                    "expert-parallel over all tp x dp devices (SGLang --dp with --enable-dp-attention, "
                    "vLLM -dp with --enable-expert-parallel); the engine's limits are the whole group's")
    # roofline coefficients (override the profile's)
    launch_overhead_s: float | None = Field(None, ge=0)
    prefill_overhead_s: float | None = Field(None, ge=0)
    frontend_latency_s: float | None = Field(None, ge=0)
    cpu_overhead_s: float | None = Field(None, ge=0)
    compute_efficiency: float | None = Field(None, gt=0)
    memory_efficiency: float | None = Field(None, gt=0)
    comm_efficiency: float | None = Field(None, gt=0)
    attention_efficiency: float | None = Field(None, gt=0)
    frontend_per_request_s: float | None = Field(None, ge=0)
    # shared by both models
    step_overhead_s: float | None = None
    per_seq_s: float | None = None
    # linear model only
    per_prefill_token_s: float | None = None
    per_decode_seq_s: float | None = None
    per_prefill_attn_pair_s: float | None = None
    per_decode_ctx_token_s: float | None = None
    calibrated: bool = False
    source: str | None = None

    _ROOFLINE = ("launch_overhead_s", "prefill_overhead_s", "frontend_latency_s", "compute_efficiency",
                 "memory_efficiency", "comm_efficiency", "step_overhead_s", "per_seq_s", "cpu_overhead_s",
                 "attention_efficiency", "frontend_per_request_s")
    _LINEAR_ONLY = ("per_prefill_token_s", "per_decode_seq_s", "per_prefill_attn_pair_s", "per_decode_ctx_token_s")

    @model_validator(mode="after")
    def _one_kind(self):
        for k in (*self._ROOFLINE, *self._LINEAR_ONLY):
            v = getattr(self, k)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{k} = {v}: a step-time coefficient must be a finite number")
        roofline = self.profile is not None or self.model is not None or self.hardware is not None
        if roofline and any(getattr(self, k) is not None for k in self._LINEAR_ONLY):
            raise ValueError(
                "linear coefficients (per_prefill_token_s, ...) cannot be combined with profile/model/hardware"
            )
        if self.dp > 1 and not roofline:
            raise ValueError(f"dp = {self.dp}: DP attention with expert parallelism is a roofline term "
                             "(needs a profile or model + hardware)")
        if self.profile is None and (self.model is None) != (self.hardware is None):
            raise ValueError("the roofline model needs both model and hardware (or a profile)")
        shared = ("step_overhead_s", "per_seq_s")
        only = [k for k in self._ROOFLINE if k not in shared and getattr(self, k) is not None]
        if not roofline and only:
            raise ValueError(f"{', '.join(only)}: roofline coefficient(s), need a profile or model + hardware "
                             "(the linear model has per_prefill_token_s, per_decode_seq_s, ...)")
        return self

    def build(self):
        """The step-time model the engine calls."""
        from .perf_model import RooflineCoefficients, RooflineStepTime, load_hardware_spec, load_model_spec
        from .profile import load_profile

        if self.profile is None and self.model is None:
            given = {k: v for k, v in self.model_dump().items()
                     if v is not None and k in StepTimeParams.__dataclass_fields__}
            return StepTimeParams(**given)
        coeff_over = {k: getattr(self, k) for k in self._ROOFLINE if getattr(self, k) is not None}
        if self.profile is not None:
            prof = load_profile(self.profile)
            base = prof.step_model()
            model = load_model_spec(self.model) if self.model else base.model
            hw = load_hardware_spec(self.hardware) if self.hardware else base.hardware
            coeffs = RooflineCoefficients(**{**prof.coeffs.as_dict(), **coeff_over})
            return RooflineStepTime(model, hw, self.tp or prof.tp, coeffs, base.calibrated and not coeff_over,
                                    base.source + (" with overrides" if coeff_over else ""), dp=self.dp)
        return RooflineStepTime(load_model_spec(self.model), load_hardware_spec(self.hardware), self.tp or 1,
                                RooflineCoefficients(**coeff_over), self.calibrated,
                                self.source or "roofline with hand-set efficiencies (uncalibrated)", dp=self.dp)

    def profile_kv_cache_tokens(self) -> int | None:
        if self.profile is None:
            return None
        from .profile import load_profile

        return load_profile(self.profile).kv_cache_tokens


class DeploymentConfig(_Strict):
    """Identical engine instances (data parallelism) behind a router, or prefill/decode
    disaggregation (`mode = "pd"`: `prefill_instances` P engines hand each request's KV to one
    of `decode_instances` D engines)."""

    mode: Literal["colocated", "pd"] = "colocated"
    instances: int = Field(1, ge=1)
    router: Literal["round_robin", "least_outstanding", "random"] = "round_robin"
    prefill_instances: int = Field(1, ge=1)
    decode_instances: int = Field(1, ge=1)
    pd_design: Literal["sglang", "vllm"] | None = Field(
        None, description="sglang: D pre-allocates prompt + reserved tokens before P starts and keeps "
        "P's first token; vllm: P first, D allocates the whole prompt and recomputes the last token. "
        "Default: the engine's own.")
    reserved_decode_tokens: int = Field(512, ge=0, description="SGLANG_NUM_RESERVED_DECODE_TOKENS")
    recompute_scheduler: bool = Field(
        False, description="vllm-ascend's RecomputeScheduler on D (additional_config.recompute_scheduler_enable): "
        "a request D cannot grow is aborted and re-prefilled on a P node with what it generated so far")


class KVTransferConfig(_Strict):
    """The link a request's KV crosses from P to D (one per prefill instance, FIFO)."""

    latency_s: float = Field(0.001, ge=0)
    bandwidth_gbps: float = Field(25.0, gt=0, description="GB/s per rank-to-rank link")
    layerwise: bool = Field(False, description="push layer by layer during prefill (Mooncake layerwise)")
    bytes_per_token: float | None = Field(None, gt=0, description="per rank; default from the model spec")


class RoleConfig(_Strict):
    """Overrides for the prefill or decode engines, merged over [engine] and [step_time]."""

    engine: dict = Field(default_factory=dict)
    step_time: dict = Field(default_factory=dict)


class Scenario(_Strict):
    name: str = ""
    description: str = ""
    engine: EngineConfig
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    prefill: RoleConfig = Field(default_factory=RoleConfig)
    decode: RoleConfig = Field(default_factory=RoleConfig)
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    step_time: StepTimeConfig = Field(default_factory=StepTimeConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _check(self):
        if self.workload.request_timeout_s is not None and self.deployment.mode == "pd":
            raise ValueError("workload.request_timeout_s: aborting a request that may sit on a prefill node, in "
                             "a KV transfer or on a decode node is not modelled; use it with colocated engines")
        return self


# --- loading ----------------------------------------------------------------------------
def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ScenarioError(f"include: {path.name} includes itself (cycle {' -> '.join(p.name for p in seen)})")
    if not path.exists():
        raise ScenarioError(f"scenario file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path.name}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not a text file (a scenario is TOML, UTF-8 text)") from None
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ScenarioError(f"{path.name}: include must be a file name or a list of file names, not {includes!r}")
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, _read_toml(path.parent / inc, seen + (path,)))
    return _deep_merge(merged, data)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`engine.max_num_batched_tokens=1024` -> (['engine', 'max_num_batched_tokens'], 1024)."""
    if "=" not in assignment:
        raise ScenarioError(f"--set {assignment!r}: expected KEY=VALUE, e.g. engine.max_num_seqs=128")
    key, raw = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    if raw.strip().lower() in ("inf", "+inf"):
        value = math.inf
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _deep_merge({}, data)
    for a in overrides:
        keys, value = parse_override(a)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ScenarioError(f"--set {a!r}: {k} is not a table")
        node[keys[-1]] = value
    return data


def scenario_from_dict(data: dict, origin: str = "scenario") -> Scenario:
    data = _kv_from_profile(data, origin)
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as exc:
        lines = [f"{origin}: invalid scenario"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ScenarioError("\n".join(lines)) from None
    try:
        st = sc.step_time.build()
    except ValueError as exc:
        raise ScenarioError(f"{origin}: step_time: {exc}") from None
    sc = sc.model_copy(update={"engine": resolve_engine_defaults(sc.engine, getattr(st, "tp", None))})
    if sc.deployment.mode == "pd":
        for role in ("prefill", "decode"):
            role_config(sc, role, origin)  # fail early, naming the role
    return sc


def role_config(sc: Scenario, role: str, origin: str = "scenario") -> tuple[EngineConfig, StepTimeConfig]:
    """The engine and step-time config of the prefill or decode engines of a PD deployment."""
    over: RoleConfig = getattr(sc, role)
    base_engine = sc.engine.model_dump(exclude_none=True)
    base_engine.pop("max_total_tokens", None)  # resolved into kv_cache_tokens / max_model_len already
    base_engine.pop("context_length", None)
    for k in ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "chunked_prefill_size",
              "max_prefill_tokens", "max_running_requests", "enable_mixed_chunk"):
        if k in over.engine:
            base_engine.pop(k, None)
    if "kv_cache_tokens" in over.engine or "max_total_tokens" in over.engine:
        base_engine.pop("num_gpu_blocks_override", None)
        base_engine.pop("kv_cache_tokens", None)
        base_engine.pop("max_total_tokens", None)
    data = _deep_merge(base_engine, over.engine)
    if "context_length" in over.engine:
        data.pop("max_model_len", None)
    try:
        st = StepTimeConfig.model_validate(_deep_merge(sc.step_time.model_dump(exclude_none=True), over.step_time))
        eng = resolve_engine_defaults(EngineConfig.model_validate(data), getattr(st.build(), "tp", None))
    except (ValidationError, ValueError) as exc:
        raise ScenarioError(f"{origin}: {role}: {exc}") from None
    return eng, st


def _kv_from_profile(data: dict, origin: str) -> dict:
    """A scenario that states no KV capacity takes the one its profile was fitted with."""
    eng = data.get("engine")
    st = data.get("step_time")
    if not isinstance(eng, dict) or not isinstance(st, dict) or "profile" not in st:
        return data
    if "kv_cache_tokens" in eng or "num_gpu_blocks_override" in eng:
        return data
    try:
        kv = StepTimeConfig(profile=st["profile"]).profile_kv_cache_tokens()
    except ValueError as exc:
        raise ScenarioError(f"{origin}: {exc}") from None
    if kv is None:
        return data
    return {**data, "engine": {**eng, "kv_cache_tokens": kv}}


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    path = Path(path)
    data = apply_overrides(_read_toml(path), overrides or [])
    data.setdefault("name", path.stem)
    return scenario_from_dict(data, origin=str(path))
