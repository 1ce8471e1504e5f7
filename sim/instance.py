"""One engine instance: its KV pool, its scheduler and the engine loop, as the scenario's engine table
says. Every deployment builds its instances here (sim.deployment for data parallelism, sim.pd for
prefill and decode), so imports flow one way: runner -> deployments -> instance -> engine ->
schedulers -> KV cache -> step time.
"""

from __future__ import annotations

from collections.abc import Callable

import simpy

from .config import EngineConfig, _version_tuple
from .engine import Engine
from .kv_cache import KVCache
from .request import Request
from .schedulers import make_scheduler


def make_kv_cache(e: EngineConfig) -> KVCache:
    """V0's block manager keeps a 1 % watermark at admission; V1 has none, and until 0.8.x it
    preallocated 64 tokens of blocks whenever a request grew (removed in later versions)."""
    if e.scheduler == "sglang":
        # a token pool (page size 1 by default) with a radix cache matched in radix_chunk_tokens
        chunk = 0 if e.disable_radix_cache else max(1, e.radix_chunk_tokens // e.block_size)
        return KVCache(e.num_gpu_blocks, e.block_size, prefix_chunk_blocks=chunk)
    if e.scheduler == "vllm-v0":
        return KVCache(e.num_gpu_blocks, e.block_size, watermark=0.01)
    prealloc = 64 if _version_tuple(e.version) < (0, 9) else 0
    return KVCache(e.num_gpu_blocks, e.block_size, preallocate_tokens=prealloc,
                   prefix_chunk_blocks=1 if e.enable_prefix_caching else 0)


def make_engine(env: simpy.Environment, e: EngineConfig, step_model, on_done: Callable[[Request], None],
                record_steps: bool, spec_seed: int = 0, compress: bool = True) -> Engine:
    # the step model learns the engine's CUDA graphs and CPU/GPU overlap (the linear model has none)
    with_facts = getattr(step_model, "with_facts", None)
    if with_facts is not None:
        step_model = with_facts(e.step_facts())
    return Engine(env, make_scheduler(e, make_kv_cache(e)), step_model, e.max_model_len, on_done, record_steps,
                  spec_seed=spec_seed, compress=compress)
