"""A serving engine's launch command, as the scenario's engine table.

Public benchmark pages give the exact command an engine was started with (`vllm serve MODEL
-tp 4 --max-num-batched-tokens 8192`, `python3 -m sglang.launch_server --model-path M --tp-size
8`). `engine_from_launch` reads it with the engine's own flag names and returns the model
name, the parallelism, the `[engine]` keys the simulator has for the flags, and the flags it
has no model for (listed, never dropped silently). Defaults are the engine's, applied later by
`sim.config.resolve_engine_defaults` from `engine.version`.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field


class LaunchError(ValueError):
    pass


@dataclass
class Launch:
    engine: str  # vllm | sglang
    model: str
    tp: int = 1
    dp: int = 1
    ep: bool = False
    settings: dict = field(default_factory=dict)  # [engine] keys
    memory_fraction: float | None = None  # --gpu-memory-utilization / --mem-fraction-static (None: default)
    async_scheduling: bool = False
    unmodelled: list[str] = field(default_factory=list)  # flags given that the simulator does not model


def _vllm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm serve", add_help=False, allow_abbrev=False)
    p.add_argument("model")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("-dp", "--data-parallel-size", type=int, default=1)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--block-size", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--enable-chunked-prefill", dest="chunked", action="store_true", default=None)
    p.add_argument("--no-enable-chunked-prefill", dest="chunked", action="store_false")
    p.add_argument("--enable-prefix-caching", dest="prefix", action="store_true", default=None)
    p.add_argument("--no-enable-prefix-caching", dest="prefix", action="store_false")
    return p


def _sglang_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglang.launch_server", add_help=False, allow_abbrev=False)
    p.add_argument("--model-path", "--model", dest="model", required=True)
    p.add_argument("--tp-size", "--tp", dest="tp", type=int, default=1)
    p.add_argument("--dp-size", "--dp", dest="dp", type=int, default=1)
    p.add_argument("--ep-size", "--ep", dest="ep", type=int, default=1)
    p.add_argument("--chunked-prefill-size", type=int)
    p.add_argument("--max-prefill-tokens", type=int)
    p.add_argument("--max-running-requests", type=int)
    p.add_argument("--context-length", type=int)
    p.add_argument("--mem-fraction-static", type=float)
    p.add_argument("--page-size", type=int)
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--enable-mixed-chunk", action="store_true")
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--disable-overlap-schedule", action="store_true")
    p.add_argument("--cuda-graph-max-bs", type=int)
    return p


# flags that change what the client sees but not the engine's timing (parsers of the output)
_NO_TIMING = ("--tool-call-parser", "--reasoning-parser", "--host", "--port", "--served-model-name",
              "--trust-remote-code", "--api-key", "--enable-auto-tool-choice", "--chat-template")


def engine_from_launch(cmd: str) -> Launch:
    words = shlex.split(cmd)
    if words[:2] == ["vllm", "serve"]:
        args, rest = _vllm_parser().parse_known_args(words[2:])
        out = Launch("vllm", args.model, tp=args.tensor_parallel_size, dp=args.data_parallel_size,
                     ep=args.enable_expert_parallel, async_scheduling=args.async_scheduling)
        if args.pipeline_parallel_size != 1:
            out.unmodelled.append(f"--pipeline-parallel-size {args.pipeline_parallel_size}")
        s = out.settings
        for key in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "block_size"):
            if getattr(args, key) is not None:
                s[key] = getattr(args, key)
        out.memory_fraction = args.gpu_memory_utilization
        if args.enforce_eager:
            s["enforce_eager"] = True
        if args.async_scheduling:
            s["async_scheduling"] = True
        if args.chunked is not None:
            s["enable_chunked_prefill"] = args.chunked
        if args.prefix is not None:
            s["enable_prefix_caching"] = args.prefix
    elif "sglang.launch_server" in words:
        args, rest = _sglang_parser().parse_known_args(words[words.index("sglang.launch_server") + 1:])
        out = Launch("sglang", args.model, tp=args.tp, dp=args.dp, ep=args.ep > 1)
        s = out.settings
        for key in ("chunked_prefill_size", "max_prefill_tokens", "max_running_requests", "context_length",
                    "cuda_graph_max_bs"):
            if getattr(args, key) is not None:
                s[key] = getattr(args, key)
        out.memory_fraction = args.mem_fraction_static
        if args.page_size is not None:
            s["block_size"] = args.page_size
        for flag in ("disable_radix_cache", "enable_mixed_chunk", "disable_cuda_graph", "disable_overlap_schedule"):
            if getattr(args, flag):
                s[flag] = True
    else:
        raise LaunchError(f"launch command: {words[0] if words else '(empty)'!r} is neither `vllm serve` nor "
                          "`python -m sglang.launch_server`")
    out.unmodelled += _unmodelled(rest)
    return out


def _unmodelled(rest: list[str]) -> list[str]:
    """The flags (with their values) the parser left, but those that do not touch timing."""
    out: list[str] = []
    skip = False
    for i, w in enumerate(rest):
        if skip:
            skip = False
            continue
        if not w.startswith("-"):
            out.append(w)
            continue
        name = w.split("=")[0]
        takes_value = "=" not in w and i + 1 < len(rest) and not rest[i + 1].startswith("-")
        if name in _NO_TIMING:
            skip = takes_value
            continue
        out.append(f"{w} {rest[i + 1]}" if takes_value else w)
        skip = takes_value
    return out
