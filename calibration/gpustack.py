"""Rows of the public GPUStack benchmark table (calibration/data/gpustack_a100_ascend.csv) as runs
the simulator can replay: the engine from the row's exact launch command (`calibration.launch`),
the client and dataset from its workload columns, the model and GPU as specs.

Only vLLM and SGLang rows become runs (TensorRT-LLM and MindIE are not simulated). What a row's
command asks for that is not simulated (expert parallelism, an attention backend) stays listed in `RowRun.unmodelled`, so a result can say which rows carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sim.config import sglang_cuda_graph_max_bs, sglang_mem_fraction_static
from sim.perf_model import kv_capacity_tokens, load_hardware_spec, load_model_spec

from .fit import RowCase
from .launch import LaunchError, engine_from_launch

TABLE = Path(__file__).resolve().parent / "data" / "gpustack_a100_ascend.csv"

# the table's model and GPU names -> spec files (sim/specs/)
MODELS = {
    "Qwen/Qwen3-8B": "qwen3-8b", "Qwen/Qwen3-14B": "qwen3-14b", "Qwen/Qwen3-32B": "qwen3-32b",
    "Qwen/Qwen3-14B-FP8": "qwen3-14b-fp8", "Qwen/Qwen3-32B-FP8": "qwen3-32b-fp8",
    "Qwen/Qwen3-14B-AWQ": "qwen3-14b-awq", "Qwen/Qwen3-32B-AWQ": "qwen3-32b-awq",
    "Qwen/Qwen3-30B-A3B": "qwen3-30b-a3b", "Qwen/Qwen3-235B-A22B-Instruct-2507": "qwen3-235b-a22b",
    "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8": "qwen3-235b-a22b-fp8",
    "zai-org/GLM-4.5-Air": "glm-4.5-air", "GLM-4.5-Air": "glm-4.5-air", "zai-org/GLM-4.6-FP8": "glm-4.6-fp8",
    "openai/gpt-oss-20b": "gpt-oss-20b", "openai/gpt-oss-120b": "gpt-oss-120b",
}
GPUS = {"A100-SXM-80GB": ("a100-80g", "NVIDIA A100-SXM4-80GB", 80), "Ascend-910B": ("ascend-910b", "Ascend 910B", 64)}
SCHEDULERS = {"vLLM": "vllm-v1", "vLLM-Ascend": "vllm-v1", "SGLang": "sglang"}
METRICS = ("mean_ttft_ms", "mean_tpot_ms", "output_throughput")
# vLLM's default --gpu-memory-utilization 0.9, and what is left for activations, the CUDA
# context and graphs: an estimate, which a fit may move (kv_bounds)
VLLM_MEMORY_FRACTION = 0.9
RESERVE_GIB = 2.0
# SGLang sizes its pool from the memory free when it starts (model_runner.profile_max_num_token:
# free after loading - free at start x (1 - mem_fraction_static), so about mem_fraction_static x
# free at start - weights), its fraction from the GPU, TP and flags (sim.config.sglang_mem_fraction_static).
# Free at start: the nominal memory less the CUDA context and NCCL's buffers, about 1.5 GiB on an
# A100-80GB (an estimate: no GPUStack page prints SGLang's log).
SGLANG_START_RESERVE_GIB = 1.5
QWEN3_MAX_LEN = 40960  # Qwen3 8B/30B-A3B config.json max_position_embeddings


def _ascend_prefill_first(version: str, spec) -> bool:
    """Whether vllm-ascend schedules prompts first, V0-style (0.9.1 final forces it for models
    without MLA; its release candidates and later releases run vLLM's V1 scheduler)."""
    return version.split("+")[0] == "0.9.1" and not spec.is_mla


@dataclass
class RowRun:
    row_id: str
    config: str  # model · engine · launch command: the rows of one configuration
    model: str
    hardware: str
    tp: int
    case: RowCase
    kv_tokens: int
    unmodelled: list[str] = field(default_factory=list)


def load() -> pd.DataFrame:
    return pd.read_csv(TABLE)


def row_id(row: pd.Series) -> str:
    if row["workload"] == "random":
        load_ = f"random-{int(row['input_len'])}-{int(row['output_len'])}"
    else:
        load_ = f"sharegpt-{int(row['num_prompts'])}"
    if not pd.isna(row.get("max_concurrency")):
        load_ += f"-c{int(row['max_concurrency'])}"
    return f"{row.name}:{load_}"


def row_run(row: pd.Series) -> RowRun | None:
    """The row as a run, or None where its engine is not simulated. UnsizedPool where its KV
    pool cannot be sized (the model spec's loaded size leaves the engine's memory formula no
    room: the size is another engine's)."""
    if row["engine"] not in SCHEDULERS:
        return None
    try:
        launch = engine_from_launch(row["launch_cmd"])
    except LaunchError:
        return None
    model = MODELS.get(launch.model) or MODELS.get(row["model"])
    if model is None:
        raise KeyError(f"gpustack row {row.name}: no spec for model {row['model']!r}")
    hw, gpu_name, mem = GPUS[row["gpu"]]
    spec, hwspec = load_model_spec(model), load_hardware_spec(hw)
    version = str(row["engine_version"]).split("+")[0]
    engine = {"scheduler": SCHEDULERS[row["engine"]], "version": version, "gpu": gpu_name, "gpu_memory_gib": mem,
              **launch.settings}
    if launch.engine == "sglang":
        engine.setdefault("cuda_graph_max_bs", sglang_cuda_graph_max_bs(version, mem, launch.tp))
        frac = launch.memory_fraction or sglang_mem_fraction_static(
            version, mem, launch.tp, chunked_prefill_size=engine.get("chunked_prefill_size"),
            cuda_graph_max_bs=engine["cuda_graph_max_bs"])
        kv = kv_capacity_tokens(spec, hwspec, launch.tp, frac, frac * SGLANG_START_RESERVE_GIB)
    else:
        kv = kv_capacity_tokens(spec, hwspec, launch.tp, launch.memory_fraction or VLLM_MEMORY_FRACTION, RESERVE_GIB)
    if kv <= 0:  # the spec's loaded size is another engine's (gpt-oss-120b: vLLM's Marlin layout on SGLang)
        raise UnsizedPool(f"{row_id(row)} ({row['model']} · {row['engine']}): its KV pool cannot be sized, the "
                          f"model spec's loaded weights leave {launch.engine}'s memory formula no room")
    engine["kv_cache_tokens"] = kv
    if row["engine"] == "vLLM-Ascend" and _ascend_prefill_first(str(row["engine_version"]), spec):
        # vllm-ascend 0.9.1 (final) forces its AscendScheduler on models without MLA: whole prompts
        # first, no decode in a step that prefills, no chunking, the token budget raised to
        # max_model_len (vllm_ascend/platform.py check_and_update_config, PR #2659); blocks of 128.
        # That is vLLM V0's policy with chunked prefill off; the budget follows max_model_len, the
        # model's own 40,960 for Qwen3 (config.json max_position_embeddings).
        engine.update(scheduler="vllm-v0", enable_chunked_prefill=False, block_size=128,
                      max_model_len=min(QWEN3_MAX_LEN, kv), enable_prefix_caching=False)
    elif launch.engine == "vllm" and "max_model_len" not in engine:
        engine["max_model_len"] = min(32768, kv)  # the pages' runs fit; the model's own limit is larger
    if launch.engine == "sglang" and "context_length" not in engine:
        engine["context_length"] = min(32768, kv)
    workload: dict = {"client": "vllm", "num_prompts": int(row["num_prompts"]), "request_rate": "inf"}
    if not pd.isna(row.get("max_concurrency")):
        workload["max_concurrency"] = int(row["max_concurrency"])
    if row["workload"] == "random":
        out = int(row["output_len"])
        workload.update(dataset_name="random", random_input_len=int(row["input_len"]), random_output_len=out,
                        random_range_ratio=0.0)
        mean_out = row["total_output_tokens"] / row["num_completed"]
        if mean_out < out - 1e-9:  # without --ignore-eos some requests stopped early
            workload["output_len_mean"] = float(mean_out)
    else:
        workload["dataset_name"] = "sharegpt"
    scenario = {"engine": engine, "workload": workload}
    if launch.dp > 1:
        scenario["deployment"] = {"instances": launch.dp, "router": "round_robin"}
    measured = {m: float(row[m]) for m in METRICS if not pd.isna(row.get(m))}
    unmodelled = list(launch.unmodelled) + (["expert parallelism"] if launch.ep else [])
    rid = row_id(row)
    return RowRun(rid, f"{row['model']} · {row['engine']} · {row['launch_cmd']}", model, hw, launch.tp,
                  RowCase(rid, measured, scenario), kv, unmodelled)


class UnsizedPool(ValueError):
    """A row whose engine's memory formula leaves no KV pool with the model spec's weights."""


def runs(df: pd.DataFrame | None = None, skipped: list[str] | None = None) -> list[RowRun]:
    """Every row that is a run; each row of a simulated engine that is not, with why, goes to
    `skipped` when given (a result says which rows it leaves out)."""
    df = load() if df is None else df
    out = []
    for _, row in df.iterrows():
        try:
            r = row_run(row)
        except UnsizedPool as exc:
            if skipped is not None:
                skipped.append(str(exc))
            continue
        if r is not None:
            out.append(r)
    return out
