"""A physically grounded step-time model: model spec + hardware spec + a few efficiencies.

For a batch (see `BatchShape`) on one tensor-parallel group:

    linear    = 2·active_params·tokens + 2·hidden·vocab·seqs (lm_head, last positions only) FLOPs,
                reading the weights once per step (for MoE: the dense part plus the experts the
                batch's tokens touch)
    attention = FLOPs per (query, key) pair · (prefill pairs + decode context), reading the KV
                the decodes see
    comm      = two all-reduces of the activations per layer (ring, 2·(TP-1)/TP of the bytes)

    gpu  = max(linear FLOPs / (peak FLOP/s · compute_efficiency), weights / (HBM bytes/s · memory_efficiency))
           + max(attention FLOPs / (peak FLOP/s · attention_efficiency),
                 KV bytes / (HBM bytes/s · memory_efficiency))
           + comm / (link bytes/s · comm_efficiency) + 2·layers·allreduce_latency
    rest = step_overhead_s + per_seq_s·seqs + prefill_overhead_s·[any prompt tokens]
           + max(launch_overhead_s, gpu)
    step = cpu_overhead_s + rest,  or max(cpu_overhead_s, rest) when the engine overlaps them

The linear layers and the attention are separate kernels that run one after the other, each
bound by its own resource, so their times add: a 2,048-token prompt chunk keeps the GEMMs
compute-bound while 256 decodes beside it make the attention read their KV (one max over the
step's totals hid those reads behind the GEMMs, and under-predicted TPOT of long-prompt runs).
The attention kernels have their own FLOP rate, `attention_efficiency`, a fraction of the peak like
compute_efficiency but a property of the kernel on the device, not of the model: fitted on every
GPUStack run of one configuration it comes out at 0.31-0.65 for vLLM's FlashAttention on the A100
across Qwen3 14B/32B/235B and GLM-4.5-Air (whose GEMMs run at 0.22-0.74: dense GEMMs fast, MoE
slow), 0.10-0.12 for the Triton kernels gpt-oss's sinks need there, and 0.11 for vllm-ascend on
the 910B for both Qwen3 models. Unset, the attention runs at compute_efficiency (a fit frees it only
when a training row's prompts are long enough to time it).

A decode that shares its step with prompt tokens costs vLLM V1 on Ampere and Ada 64 query rows of
attention FLOPs, not one (`_decode_rows_in_mixed_steps`: FlashAttention 2's split-KV tile). Without
it, the A100 runs' mixed steps came out 8-16 % short on their 2,000- and 4,000-token prompts, whose
decodes' contexts fill the KV pool, while their 32,000-token steps (few decodes) fitted.

Sliding-window layers (gpt-oss) count at most `sliding_window` keys per query in the attention
FLOPs and the KV reads. `allreduce_latency` is the hardware's small-message all-reduce time (a
fact of the spec, not fitted): the floor that makes a deep model on a wide TP group pay per
step whatever its batch, and that a fit on one TP size must not fold into step_overhead_s.

The engine's own facts (`sim.step_time.EngineFacts`, from its flags and version) enter twice:
a batch that runs in a CUDA graph computes its padding (the linear layers and the all-reduces
see the captured size, the attention and the lm_head do not), and vLLM V1's async scheduling
or SGLang's overlap scheduler plans step N+1 on the CPU while the GPU runs step N, so the
CPU's part and the GPU's part of a step are not added but overlapped.

`step_overhead_s` and `per_seq_s` are fixed costs every step's timeline carries, per step and
per sequence: CPU work the GPU waits for (sampling, detokenising), latencies of the all-reduces
and of launching graphs, small-batch kernels slower than the roofline. `cpu_overhead_s` is the
part of it the CPU alone does before a step (scheduling, preparing inputs, processing the last
step's outputs), which an engine that overlaps (`EngineFacts.overlap`) hides behind the GPU's
step; on an engine that does not, it adds like `step_overhead_s` and cannot be told from it, so
it is fitted only on rows from overlapping engines (0 otherwise: a profile fitted on a
synchronous engine predicts no gain from turning overlap on). `launch_overhead_s` is the time the CPU
needs to launch one step's kernels: without CUDA graphs (`--enforce-eager`) it runs
ahead of the GPU, so a step takes whichever is longer, not their sum; with CUDA graphs
it is small. `prefill_overhead_s` is the extra fixed cost of a step that computes prompt
tokens (prefill attention metadata, the eager prefill path when only decodes have CUDA
graphs); it is what makes a 128-token prefill cost more than a decode step. `frontend_latency_s`
is not a step cost: it is the time from the client sending a request to the scheduler
seeing it (HTTP, tokenisation, the API server's hop to the engine process), which every
TTFT contains and no token gap does. `frontend_per_request_s` is the wait of a burst in front of
the scheduler per request in it: N requests sent together reach the scheduler N of those later,
all together (sim.engine.Engine._ingest_round says why it is fitted, not derived).

Every quantity is per device (tensor parallelism divides FLOPs and weights, and GQA KV;
MLA's latent KV is replicated on every rank). The efficiencies are the fitted
coefficients: fractions of the hardware peak, so a fit that needs 300 % of peak or 1 %
of it is visibly wrong (`plausibility_warnings`).
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import numpy as np

from .step_time import BatchShape, EngineFacts

GIB = 1024**3

# columns of a step-feature matrix (see `features`)
SEQS, PREFILL_TOKENS, PREFILL_PAIRS, DECODE_SEQS, DECODE_CTX, SPEC_TOKENS = range(6)


def features(shapes: list[BatchShape]) -> np.ndarray:
    """Stack batch shapes into an (n_steps, 6) float matrix for vectorised step times."""
    return np.array(
        [(s.num_seqs, s.prefill_tokens, s.prefill_attn_pairs, s.decode_seqs, s.decode_ctx_tokens, s.spec_tokens)
         for s in shapes],
        dtype=float,
    ).reshape(-1, 6)


# --- specs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    weight_bits: int = 16
    compute_dtype: str = "bf16"
    kv_cache_bits: int = 16
    quant_group_size: int = 0  # 0: no per-group scales
    tie_word_embeddings: bool = False
    v_head_dim: int = 0  # 0: same as head_dim
    # MLA (DeepSeek): a latent of kv_lora_rank + qk_rope_head_dim is cached per token and layer
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    # MoE
    num_experts: int = 0
    experts_per_token: int = 0
    shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_dense_layers: int = 0
    # sliding-window attention (gpt-oss): `sliding_window_layers` of the layers see only the last
    # `sliding_window` tokens, so their attention FLOPs and KV reads stop growing with the context
    sliding_window: int = 0
    sliding_window_layers: int = 0
    # what an engine reported holding for the weights on one device (TP 1), when it differs from
    # the shapes' count (kernels that repack quantised weights); 0: the shapes' count. It sizes
    # the KV pool only: the bytes a step reads stay the shapes' count.
    loaded_weights_gib: float = 0.0
    # learned attention sinks (gpt-oss): FlashAttention 2 has none, so vLLM and SGLang run such a
    # model's attention on their Triton kernels before Hopper
    attention_sinks: bool = False

    def __post_init__(self) -> None:
        if self.sliding_window_layers and not (0 < self.sliding_window_layers <= self.num_layers and self.sliding_window > 0):
            raise ValueError(f"model spec {self.name}: sliding_window_layers must be in 1..num_layers "
                             f"({self.num_layers}) with sliding_window > 0")

    @property
    def window_fraction(self) -> float:
        """The share of the layers whose attention sees only the last `sliding_window` tokens."""
        return self.sliding_window_layers / self.num_layers if self.sliding_window else 0.0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def attention_params(self) -> int:
        h, nh = self.hidden_size, self.num_attention_heads
        if self.is_mla:
            nope = self.head_dim - self.qk_rope_head_dim
            vd = self.v_head_dim or self.head_dim
            q = h * self.q_lora_rank + self.q_lora_rank * nh * self.head_dim if self.q_lora_rank else h * nh * self.head_dim
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * nh * (nope + vd)
            return q + kv + nh * vd * h
        return h * nh * self.head_dim * 2 + h * self.num_kv_heads * self.head_dim * 2

    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    def layer_params_active(self) -> int:
        """Linear-layer parameters one token multiplies through, summed over layers."""
        dense_layers = self.num_layers - self.num_moe_layers
        total = self.num_layers * self.attention_params() + dense_layers * self.dense_mlp_params()
        if self.is_moe:
            active_experts = self.experts_per_token + self.shared_experts
            total += self.num_moe_layers * (active_experts * self.expert_params() + self.hidden_size * self.num_experts)
        return total

    def layer_params_total(self) -> int:
        dense_layers = self.num_layers - self.num_moe_layers
        total = self.num_layers * self.attention_params() + dense_layers * self.dense_mlp_params()
        if self.is_moe:
            total += self.num_moe_layers * (
                (self.num_experts + self.shared_experts) * self.expert_params() + self.hidden_size * self.num_experts
            )
        return total

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def bytes_per_weight(self) -> float:
        b = self.weight_bits / 8
        if self.quant_group_size:
            b += 2 / self.quant_group_size  # one 16-bit scale per group
        return b

    def weight_bytes_total(self) -> float:
        """Decoder weights in their quantized form plus 16-bit embeddings and lm_head."""
        return self.layer_params_total() * self.bytes_per_weight + self.embedding_params * 2

    def kv_bytes_per_token(self, tp: int) -> float:
        """KV-cache bytes one token occupies on each device."""
        b = self.kv_cache_bits / 8
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * b
        heads_per_rank = max(1.0, self.num_kv_heads / tp)  # KV heads are replicated when TP > heads
        return self.num_layers * heads_per_rank * self.head_dim * 2 * b

    def attention_flops_per_pair(self) -> float:
        """FLOPs of one (query token, key token) pair over all layers: QK^T plus PV."""
        vd = self.v_head_dim or self.head_dim
        return 2.0 * self.num_layers * self.num_attention_heads * (self.head_dim + vd)


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    memory_gib: float
    hbm_bandwidth_gbps: float
    peak_tflops: dict[str, float]
    interconnect_gbps: float = 0.0
    # one small-message all-reduce across the tensor-parallel group, as captured in a CUDA graph:
    # the floor every all-reduce pays whatever its bytes (the spec file says where it comes from)
    allreduce_latency_us: float = 0.0
    arch: str = ""  # ampere, ada, hopper, blackwell, ascend: which attention kernels the engines pick

    def compute_dtype(self, dtype: str) -> str:
        """What the matmuls run in: FP8 weights on a device without FP8 tensor cores (A100, Ascend
        910B) are computed in bf16 (vLLM's FP8 Marlin kernels dequantize weight-only), still read
        as 8 bits."""
        if dtype == "fp8" and "fp8" not in self.peak_tflops and "bf16" in self.peak_tflops:
            return "bf16"
        return dtype

    def peak_flops(self, dtype: str) -> float:
        dtype = self.compute_dtype(dtype)
        if dtype not in self.peak_tflops:
            raise ValueError(f"hardware {self.name}: no peak FLOP/s for dtype {dtype!r} (has {sorted(self.peak_tflops)})")
        return self.peak_tflops[dtype] * 1e12


def _spec_path(kind: str, name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml" and p.exists():
        return p
    base = resources.files("sim") / "specs" / kind
    cand = Path(str(base / f"{name}.toml"))
    if not cand.exists():
        known = sorted(q.name.removesuffix(".toml") for q in Path(str(base)).glob("*.toml"))
        raise ValueError(f"unknown {kind[:-1]} spec {name!r}; known: {', '.join(known)}")
    return cand


def _load_spec(kind: str, name: str, cls):
    if not name.endswith(".toml"):
        return _load_builtin_spec(kind, name, cls)
    return _read_spec(kind, name, cls)


@functools.lru_cache(maxsize=None)
def _load_builtin_spec(kind: str, name: str, cls):
    """The shipped specs never change while the program runs; a calibration builds thousands
    of scenarios from the same few."""
    return _read_spec(kind, name, cls)


def _read_spec(kind: str, name: str, cls):
    data = tomllib.loads(_spec_path(kind, name).read_text())
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{kind[:-1]} spec {name}: unknown key(s) {sorted(unknown)}")
    return cls(**data)


def load_model_spec(name: str) -> ModelSpec:
    return _load_spec("models", name, ModelSpec)


def load_hardware_spec(name: str) -> HardwareSpec:
    return _load_spec("hardware", name, HardwareSpec)


def kv_capacity_tokens(
    model: ModelSpec, hw: HardwareSpec, tp: int, gpu_memory_utilization: float, reserve_gib: float
) -> int:
    """vLLM-style KV budget: memory x utilization - weights - a non-KV reserve (activations,
    CUDA context, communication buffers), divided by the KV bytes of one token, per device.

    Sliding-window layers hold only their window per request (vLLM V1's hybrid KV cache manager,
    SGLang's SWA pool), so a token of context costs the pool the full-attention layers' bytes.
    The windows themselves (~window + one chunk per running request) are not charged: for
    gpt-oss at 256 running requests that is under 3 % of an A100's pool."""
    weights = model.loaded_weights_gib * GIB if model.loaded_weights_gib else model.weight_bytes_total()
    free = hw.memory_gib * GIB * gpu_memory_utilization - weights / tp - reserve_gib * GIB
    return max(0, int(free // (model.kv_bytes_per_token(tp) * (1.0 - model.window_fraction))))


def runs_triton_attention(model: ModelSpec, hw: HardwareSpec) -> bool:
    """Whether the engines run this model's attention on their Triton kernels on this device:
    learned sinks before Hopper (FlashAttention 2 has none; vLLM's gpt-oss recipe: TRITON_ATTN
    on Ampere). A different kernel, so a different `attention_efficiency` from FlashAttention's."""
    return model.attention_sinks and hw.arch in ("ampere", "ada")


# --- the step-time model -------------------------------------------------------------------
@dataclass(frozen=True)
class RooflineCoefficients:
    """The fitted numbers. Efficiencies are fractions of the hardware's peak."""

    step_overhead_s: float = 0.01
    per_seq_s: float = 0.0
    launch_overhead_s: float = 0.0
    prefill_overhead_s: float = 0.0
    frontend_latency_s: float = 0.0
    compute_efficiency: float = 0.5
    memory_efficiency: float = 0.7
    comm_efficiency: float = 0.5
    cpu_overhead_s: float = 0.0
    # the attention kernels' FLOP rate as a fraction of the peak (the kernel's on this device, not
    # the model's); None: at compute_efficiency, like the linear layers
    attention_efficiency: float | None = None
    # a burst's wait in front of the scheduler per request in it; requests sent together reach
    # the scheduler together (sim.engine.Engine._ingest_round)
    frontend_per_request_s: float = 0.0

    def as_dict(self) -> dict:
        """The coefficients that are set (an unset attention_efficiency is left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def attention_rate(self) -> float:
        """The attention kernels' fraction of the peak: their own, or the linear layers'."""
        return self.compute_efficiency if self.attention_efficiency is None else self.attention_efficiency


PLAUSIBLE = {
    "step_overhead_s": (0.0, 0.3),
    "per_seq_s": (0.0, 0.002),
    "launch_overhead_s": (0.0, 0.3),
    "prefill_overhead_s": (0.0, 0.5),
    "frontend_latency_s": (0.0, 0.5),
    "compute_efficiency": (0.05, 0.9),
    "memory_efficiency": (0.2, 0.95),
    "comm_efficiency": (0.05, 1.0),
    "cpu_overhead_s": (0.0, 0.1),
    "attention_efficiency": (0.03, 0.9),
    "frontend_per_request_s": (0.0, 0.02),
}


@dataclass
class RooflineStepTime:
    model: ModelSpec
    hardware: HardwareSpec
    tp: int = 1
    coeffs: RooflineCoefficients = field(default_factory=RooflineCoefficients)
    calibrated: bool = False
    source: str = "roofline with default efficiencies (uncalibrated)"
    facts: EngineFacts = field(default_factory=EngineFacts)  # the engine's graphs and overlap
    # DP attention with expert parallelism (SGLang --enable-dp-attention, vLLM -dp with
    # --enable-expert-parallel, vllm-ascend's DP decode groups): the instance is `dp` ranks of `tp`
    # devices each, every rank attends over its own share of the batch with the non-expert weights
    # whole (within its TP), and the routed experts are spread over all tp x dp devices, reached by
    # an all-to-all per MoE layer (`_dp_ep`)
    dp: int = 1

    def __post_init__(self) -> None:
        m, hw, tp = self.model, self.hardware, self.tp
        if tp < 1:
            raise ValueError("tp must be >= 1")
        if self.dp < 1:
            raise ValueError("dp must be >= 1")
        if self.dp > 1 and not m.is_moe:
            raise ValueError(f"dp = {self.dp}: DP attention with expert parallelism needs an MoE model "
                             f"({m.name} has no experts); a dense model's data parallelism is separate instances "
                             "(deployment.instances)")
        peak = hw.peak_flops(m.compute_dtype)
        bw = hw.hbm_bandwidth_gbps * 1e9
        # ideal seconds per unit, per device
        # per device: FLOPs divide over all g devices (with DP attention, 1/dp of the tokens through
        # 1/tp of the weights; see `_dp_ep`), a rank's KV is its own sequences'
        dp = self.dp
        g = tp * dp
        self._s_per_token_flop = 2.0 * m.layer_params_active() / g / peak
        self._s_per_seq_flop = 2.0 * m.hidden_size * m.vocab_size / g / peak
        # attention: layers that see the whole context, and sliding-window layers that see at most
        # `window` tokens per query (their pairs and KV reads: min(the batch's, window x tokens))
        full, win = 1.0 - m.window_fraction, m.window_fraction
        self._window = m.sliding_window if win else 0
        self._s_per_pair = m.attention_flops_per_pair() * full / g / peak
        self._s_per_win_pair = m.attention_flops_per_pair() * win / g / peak
        self._s_static_mem = (m.weight_bytes_total() - self._expert_bytes_all()) / tp / bw
        self._s_per_expert = m.num_moe_layers * m.expert_params() * m.bytes_per_weight / g / bw
        self._s_per_ctx_token = m.kv_bytes_per_token(tp) / dp * full / bw
        self._s_per_win_ctx = m.kv_bytes_per_token(tp) / dp * win / bw
        link = hw.interconnect_gbps * 1e9
        if tp > 1 and link <= 0:
            raise ValueError(f"hardware {hw.name}: tp={tp} needs interconnect_gbps")
        # two all-reduces per layer: a bandwidth part per token (ring: 2(TP-1)/TP of the bytes)
        # and a latency floor per all-reduce that no batch size amortises
        self._s_comm_per_token = (
            m.num_layers * 2 * m.hidden_size * 2 * 2 * (tp - 1) / tp / link if tp > 1 else 0.0
        )
        self._s_comm_latency = m.num_layers * 2 * hw.allreduce_latency_us * 1e-6 if tp > 1 else 0.0
        self._pad = self.facts.pad_table()
        self._mixed_rows = self._decode_rows_in_mixed_steps()
        if self.dp > 1:
            self._dp_ep()
        self._pad_array = np.array(self._pad, dtype=float)
        self._overlap = self.facts.overlap

    def _decode_rows_in_mixed_steps(self) -> float:
        """The query rows a decode costs the attention's FLOPs in a step that also carries prompt
        tokens. vLLM V1's FlashAttention backend sends the whole batch through one varlen call; on
        Ampere and Ada that is FlashAttention 2, which with a paged KV cache always runs its split-KV
        kernel, whose query tile is 64 rows for every head dimension. A decode's one query then
        fills a 64-row tile per head, and the tile's MMAs run over the decode's whole context as
        if 64 queries attended (the GQA packing that spares decode-only batches applies only when
        every sequence has one query). Its KV bytes are unchanged. Elsewhere a decode is one row:
        decode-only steps, V0 and SGLang (separate prefill and decode kernels), Triton attention
        (models with sinks), MLA backends, and FlashAttention 3 on Hopper (not established:
        left at 1)."""
        m, hw = self.model, self.hardware
        if self.facts.unified_attention and hw.arch in ("ampere", "ada") and not m.attention_sinks and not m.is_mla:
            return 64.0
        return 1.0

    def _dp_ep(self) -> None:
        """What changes from TP when the instance is of `dp` attention ranks of `tp` devices with its
        routed experts over all g = tp x dp devices, its batch spread evenly over the ranks. Per
        token of the instance's batch, each device computes 1/g of the FLOPs (1/dp of the tokens
        through 1/tp of the dense weights; all tokens' top-k experts through 1/g of them) and reads
        1/dp of the KV (a rank holds its own sequences' KV: MLA's latent is not divided by TP, but is
        by DP). Weights per step: the non-expert ones (attention, dense MLPs, shared experts,
        embeddings) whole per rank within its TP; the routed experts the batch touches, 1/g each.
        Communication: the TP all-reduces over a rank's own tokens, and per MoE layer a dispatch and
        a combine all-to-all, each device sending 1/g of the tokens (a rank's TP devices split
        its tokens) with a token's hidden state (16-bit) to its top-k experts, (g-1)/g elsewhere; each all-to-all pays the link's small-message latency (the
        all-reduce's figure from the spec, an estimate). A rank's batch runs in its own CUDA graph.
        (The FLOP, KV and routed-expert constants already divide by g and dp in `__post_init__`.)"""
        m, hw, tp, dp = self.model, self.hardware, self.tp, self.dp
        g = tp * dp
        bw = hw.hbm_bandwidth_gbps * 1e9
        # `_experts_touched` counts the shared experts too; they are read whole within a rank's TP
        shared = m.num_moe_layers * m.shared_experts * m.expert_params() * m.bytes_per_weight
        self._s_static_mem = ((m.weight_bytes_total() - self._expert_bytes_all()) / tp + shared / tp - shared / g) / bw
        link = hw.interconnect_gbps * 1e9
        if link <= 0:
            raise ValueError(f"hardware {hw.name}: dp={dp} (expert parallel) needs interconnect_gbps")
        allreduce = m.num_layers * 2 * m.hidden_size * 2 * 2 * (tp - 1) / tp / link / dp if tp > 1 else 0.0
        all_to_all = m.num_moe_layers * 2 * m.experts_per_token * m.hidden_size * 2 * (g - 1) / g / link / g
        self._s_comm_per_token = allreduce + all_to_all
        self._s_comm_latency = (m.num_layers * 2 * hw.allreduce_latency_us * 1e-6 if tp > 1 else 0.0) \
            + m.num_moe_layers * 2 * hw.allreduce_latency_us * 1e-6
        if self._pad:  # each rank pads its share of the batch to its own graph
            rank = self._pad
            self._pad = [0] + [dp * rank[-(-t // dp)] for t in range(1, dp * (len(rank) - 1) + 1)]

    def _run_tokens(self, tokens: int, prefill_tokens: int) -> int:
        """Tokens the linear layers compute: the batch padded to its CUDA graph, if it runs in one."""
        pad = self._pad
        if tokens < len(pad) and (self.facts.graph_mixed or not prefill_tokens):
            return pad[tokens]
        return tokens

    def _run_tokens_v(self, tokens: np.ndarray, prefill_tokens: np.ndarray) -> np.ndarray:
        if not self._pad:
            return tokens
        graphed = tokens < len(self._pad)
        if not self.facts.graph_mixed:
            graphed &= prefill_tokens == 0
        return np.where(graphed, self._pad_array[np.where(graphed, tokens, 0).astype(np.int64)], tokens)

    def _window_terms(self, prefill_pairs, prefill_tokens, ctx, decode_seqs):
        """(pairs, KV tokens read) of the sliding-window layers: a query sees at most `window`
        keys, so a prefill chunk's pairs are capped at window x its tokens and a decode's context
        at window. Batch totals stand in for per-request minima (exact once contexts pass the
        window, an overcount below it)."""
        w = self._window
        pairs = np.minimum(prefill_pairs, w * prefill_tokens)
        reads = np.minimum(ctx, w * decode_seqs)
        return pairs + reads, reads

    def _expert_bytes_all(self) -> float:
        m = self.model
        return m.num_moe_layers * m.num_experts * m.expert_params() * m.bytes_per_weight

    def _experts_touched(self, tokens):
        """Expected distinct routed experts per MoE layer for `tokens` tokens (uniform routing),
        plus the shared experts, which every token uses."""
        m = self.model
        if not m.is_moe:
            return 0.0 * tokens
        e, k = m.num_experts, m.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** tokens) + m.shared_experts

    def _experts_touched_each(self, tokens: np.ndarray) -> np.ndarray:
        """`_experts_touched` of every step's token count, through the scalar formula: numpy's
        vectorised power can differ from Python's in the last bit (numpy 1.26 here), and a
        replay must time a step with the simulation's floats."""
        if not self.model.is_moe:
            return 0.0 * tokens
        counts, where = np.unique(tokens, return_inverse=True)
        return np.array([self._experts_touched(int(n)) for n in counts])[where.reshape(-1)]

    def _linear_and_comm(self, b: BatchShape, c: RooflineCoefficients) -> tuple[float, float]:
        """Seconds of the batch's linear layers (their roofline) and of its all-reduces: the terms
        of a step that do not depend on the context it attends over."""
        tokens = b.prefill_tokens + b.decode_seqs + b.spec_tokens
        run = self._run_tokens(tokens, b.prefill_tokens)
        lin_c = (self._s_per_token_flop * run + self._s_per_seq_flop * b.num_seqs) / c.compute_efficiency
        lin_m = (self._s_static_mem + self._s_per_expert * self._experts_touched(tokens)) / c.memory_efficiency
        return max(lin_c, lin_m), self._s_comm_per_token * run / c.comm_efficiency + self._s_comm_latency

    # scalar path, called once per simulated step
    def step_time(self, b: BatchShape) -> float:
        c = self.coeffs
        ctx = b.decode_ctx_tokens
        attention = self._s_per_pair * (b.prefill_attn_pairs + (ctx * self._mixed_rows if b.prefill_tokens else ctx))
        kv = self._s_per_ctx_token * ctx
        if self._window:
            w = self._window
            reads = min(b.decode_ctx_tokens, w * b.decode_seqs)
            attention += self._s_per_win_pair * (min(b.prefill_attn_pairs, w * b.prefill_tokens) + reads)
            kv += self._s_per_win_ctx * reads
        lin, comm = self._linear_and_comm(b, c)
        t_gpu = lin + max(attention / c.attention_rate, kv / c.memory_efficiency) + comm
        prefill = c.prefill_overhead_s if b.prefill_tokens else 0.0
        if self._overlap:  # the CPU plans the next step while the GPU runs this one
            return max(c.cpu_overhead_s, c.step_overhead_s + c.per_seq_s * b.num_seqs + prefill
                       + max(c.launch_overhead_s, t_gpu))
        return c.cpu_overhead_s + c.step_overhead_s + c.per_seq_s * b.num_seqs + prefill + max(c.launch_overhead_s, t_gpu)

    # vectorised path for calibration (same arithmetic on columns)
    def step_terms(self, f: np.ndarray) -> tuple:
        """What `step_times` needs of a step-feature matrix that no coefficient changes: ideal
        seconds of the linear layers (FLOPs, weight bytes), of the attention (FLOPs, KV bytes) and
        of communication, sequences, and whether a prefill ran. A fit times the same steps under
        thousands of coefficient sets; these are computed once."""
        tokens = f[:, PREFILL_TOKENS] + f[:, DECODE_SEQS] + f[:, SPEC_TOKENS]
        run = self._run_tokens_v(tokens, f[:, PREFILL_TOKENS])
        linear = self._s_per_token_flop * run + self._s_per_seq_flop * f[:, SEQS]
        weights = self._s_static_mem + self._s_per_expert * self._experts_touched_each(tokens)
        ctx = f[:, DECODE_CTX]
        if self._mixed_rows != 1.0:
            ctx = np.where(f[:, PREFILL_TOKENS] > 0, ctx * self._mixed_rows, ctx)
        attention = self._s_per_pair * (f[:, PREFILL_PAIRS] + ctx)
        kv = self._s_per_ctx_token * f[:, DECODE_CTX]
        if self._window:
            pairs, reads = self._window_terms(f[:, PREFILL_PAIRS], f[:, PREFILL_TOKENS], f[:, DECODE_CTX], f[:, DECODE_SEQS])
            attention = attention + self._s_per_win_pair * pairs
            kv = kv + self._s_per_win_ctx * reads
        return (linear, weights, attention, kv, self._s_comm_per_token * run, f[:, SEQS], f[:, PREFILL_TOKENS] > 0,
                self._overlap, self._s_comm_latency)

    def step_times(self, f: np.ndarray, coeffs: RooflineCoefficients | None = None, terms: tuple | None = None) -> np.ndarray:
        c = coeffs or self.coeffs
        linear, weights, attention, kv, comm, seqs, prefill, overlap, latency = \
            terms if terms is not None else self.step_terms(f)
        t_gpu = (np.maximum(linear / c.compute_efficiency, weights / c.memory_efficiency)
                 + np.maximum(attention / c.attention_rate, kv / c.memory_efficiency)
                 + (comm / c.comm_efficiency + latency))
        if overlap:
            return np.maximum(c.cpu_overhead_s, c.step_overhead_s + c.per_seq_s * seqs + c.prefill_overhead_s * prefill
                              + np.maximum(c.launch_overhead_s, t_gpu))
        return (c.cpu_overhead_s + c.step_overhead_s + c.per_seq_s * seqs + c.prefill_overhead_s * prefill
                + np.maximum(c.launch_overhead_s, t_gpu))

    def decode_step_times(self, b: BatchShape, ctx: np.ndarray) -> np.ndarray:
        """`step_time` of the decode-only batch `b` with its context total replaced by each value
        of `ctx` (a run of decode steps). The batch-constant terms are computed as `step_time`
        computes them and only the context terms as arrays, in the same order: the same floats."""
        c = self.coeffs
        attention = self._s_per_pair * (b.prefill_attn_pairs + (ctx * self._mixed_rows if b.prefill_tokens else ctx))
        kv = self._s_per_ctx_token * ctx
        if self._window:
            pairs, reads = self._window_terms(b.prefill_attn_pairs, b.prefill_tokens, ctx, b.decode_seqs)
            attention = attention + self._s_per_win_pair * pairs
            kv = kv + self._s_per_win_ctx * reads
        lin, comm = self._linear_and_comm(b, c)
        t_gpu = lin + np.maximum(attention / c.attention_rate, kv / c.memory_efficiency) + comm
        prefill = c.prefill_overhead_s if b.prefill_tokens else 0.0
        if self._overlap:
            return np.maximum(c.cpu_overhead_s, c.step_overhead_s + c.per_seq_s * b.num_seqs + prefill
                              + np.maximum(c.launch_overhead_s, t_gpu))
        return c.cpu_overhead_s + c.step_overhead_s + c.per_seq_s * b.num_seqs + prefill + np.maximum(c.launch_overhead_s, t_gpu)

    def decode_run_ends(self, b: BatchShape, steps: int, now: float) -> list[float]:
        """See `sim.step_time.decode_run_ends`: the batch-constant terms once, the context terms
        per step, in `step_time`'s order (so `step_time`'s floats), in a plain loop."""
        c = self.coeffs
        lin, comm = self._linear_and_comm(b, c)
        prefill = c.prefill_overhead_s if b.prefill_tokens else 0.0
        fixed = c.cpu_overhead_s + c.step_overhead_s + c.per_seq_s * b.num_seqs + prefill
        rest = c.step_overhead_s + c.per_seq_s * b.num_seqs + prefill
        cpu = c.cpu_overhead_s
        s_pair, s_ctx, ae, me, launch = self._s_per_pair, self._s_per_ctx_token, c.attention_rate, \
            c.memory_efficiency, c.launch_overhead_s
        pairs, ctx, n, ends, t = b.prefill_attn_pairs, b.decode_ctx_tokens, b.num_seqs, [], now
        overlap, w = self._overlap, self._window
        rows = self._mixed_rows if b.prefill_tokens else 1.0
        if w:
            s_wpair, s_wctx, wpairs, wcap = self._s_per_win_pair, self._s_per_win_ctx, \
                min(pairs, w * b.prefill_tokens), w * b.decode_seqs
        for _ in range(steps):
            if w:  # step_time's sums, in its order
                reads = ctx if ctx < wcap else wcap
                att_c = (s_pair * (pairs + ctx * rows) + s_wpair * (wpairs + reads)) / ae
                att_m = (s_ctx * ctx + s_wctx * reads) / me
            else:
                att_c = s_pair * (pairs + ctx * rows) / ae
                att_m = s_ctx * ctx / me
            t_gpu = lin + (att_c if att_c >= att_m else att_m) + comm
            if overlap:
                gpu = rest + (t_gpu if t_gpu > launch else launch)
                t += cpu if cpu >= gpu else gpu
            else:
                t += fixed + (t_gpu if t_gpu > launch else launch)
            ends.append(t)
            ctx += n
        return ends

    @property
    def frontend_latency_s(self) -> float:
        return self.coeffs.frontend_latency_s

    @property
    def frontend_per_request_s(self) -> float:
        return self.coeffs.frontend_per_request_s

    def describe(self) -> dict:
        return {"kind": "roofline", "model": self.model.name, "hardware": self.hardware.name, "tp": self.tp,
                **({"dp_attention_ep": self.dp} if self.dp > 1 else {}),
                **self.coeffs.as_dict(), "calibrated": self.calibrated, "source": self.source,
                "overlap_schedule": self.facts.overlap,
                "cuda_graph_max_tokens": self.facts.graph_sizes[-1] if self.facts.graph_sizes else 0}

    def with_coeffs(self, coeffs: RooflineCoefficients) -> RooflineStepTime:
        return RooflineStepTime(self.model, self.hardware, self.tp, coeffs, self.calibrated, self.source, self.facts, self.dp)

    def with_facts(self, facts: EngineFacts) -> RooflineStepTime:
        """This model on an engine with these graphs and this overlap (`EngineConfig.step_facts`)."""
        if facts == self.facts:
            return self
        return RooflineStepTime(self.model, self.hardware, self.tp, self.coeffs, self.calibrated, self.source, facts, self.dp)

    def implied(self) -> dict:
        """What the coefficients claim about the hardware, for the fit report."""
        hw, c, m = self.hardware, self.coeffs, self.model
        return {
            "achieved_tflops_per_device": hw.peak_flops(m.compute_dtype) * c.compute_efficiency / 1e12,
            "peak_tflops_per_device": hw.peak_flops(m.compute_dtype) / 1e12,
            "achieved_hbm_gbps": hw.hbm_bandwidth_gbps * c.memory_efficiency,
            "peak_hbm_gbps": hw.hbm_bandwidth_gbps,
        }

    def plausibility_warnings(self) -> list[str]:
        out = []
        for name, (lo, hi) in PLAUSIBLE.items():
            v = getattr(self.coeffs, name)
            if v is not None and not lo <= v <= hi:
                out.append(f"{name} = {v:.4g} is outside its plausible range [{lo}, {hi}]")
        return out

