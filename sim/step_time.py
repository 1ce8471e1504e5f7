"""How long one engine step (one forward pass) takes, as a function of the batch only.

The batch is summarised by `BatchShape`; the model is a handful of named, unit-bearing
coefficients. Nothing here knows about schedulers or requests, so calibration can fit
the coefficients against measured tables and the same function serves every engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Protocol


@dataclass(slots=True)
class BatchShape:
    """What a forward pass costs depends on; filled in by the scheduler per step."""

    num_seqs: int = 0  # requests in the batch
    prefill_tokens: int = 0  # tokens of prompt chunks (and re-prefills) in the batch
    prefill_attn_pairs: float = 0.0  # Σ over chunks of query×key pairs (causal)
    decode_seqs: int = 0  # requests computing exactly one token
    decode_ctx_tokens: int = 0  # Σ context length those decodes attend over
    spec_tokens: int = 0  # draft tokens verified on top of one token per decode (speculative decoding)

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs + self.spec_tokens

    def add_chunk(self, num_computed: int, num_new: int, decode: bool | None = None) -> None:
        """Account a request computing `num_new` tokens after `num_computed` cached ones.

        A decode computes the KV of the token sampled last step; by default any one-token
        step after cached context counts as one (the cost is the same).
        """
        self.num_seqs += 1
        if decode is None:
            decode = num_new == 1 and num_computed > 0
        if decode:
            self.decode_seqs += 1
            self.decode_ctx_tokens += num_computed + 1
            if num_new > 1:  # verifying drafts: extra query tokens over the same context
                self.spec_tokens += num_new - 1
                self.prefill_attn_pairs += (num_new - 1) * (num_computed + 1)
        else:
            self.prefill_tokens += num_new
            # each new token attends to the cached context and to the new tokens before it
            self.prefill_attn_pairs += num_new * num_computed + num_new * (num_new + 1) / 2


@dataclass(frozen=True)
class EngineFacts:
    """What the engine, not the batch, adds to a step: CUDA-graph padding, and whether the CPU's
    work for the next step runs while the GPU computes this one. From the engine's flags and
    version (`sim.config.EngineConfig.step_facts`); the roofline model applies them.

    - `graph_sizes`: the batch sizes (tokens) captured as CUDA graphs, ascending; a batch that
      fits is padded up to the next one and its linear layers compute the padding too. Empty:
      eager (`--enforce-eager`, `--disable-cuda-graph`).
    - `graph_mixed`: batches carrying prompt tokens are padded too (vLLM V1's piecewise graphs);
      otherwise only decode-only batches run in a graph (vLLM V0, SGLang).
    - `overlap`: vLLM V1's async scheduling or SGLang's overlap scheduler plans step N+1 while
      the GPU runs step N, so a step takes the longer of the CPU's and the GPU's parts, not
      their sum.
    - `unified_attention`: a mixed batch's prompt chunks and decodes go through one varlen
      attention kernel (vLLM V1's FlashAttention backend), not a prefill and a decode kernel
      (vLLM V0, SGLang's FlashInfer); what that costs depends on the kernel the GPU gets
      (`RooflineStepTime`)."""

    overlap: bool = False
    graph_sizes: tuple[int, ...] = ()
    graph_mixed: bool = False
    unified_attention: bool = False

    def __reduce__(self):
        # (a frozen class compiled by mypyc cannot be unpickled field by field; traces carry these
        # facts back from the fit's worker processes)
        return (EngineFacts, (self.overlap, self.graph_sizes, self.graph_mixed, self.unified_attention))

    def pad_table(self) -> list[int]:
        """pad[t]: the tokens a batch of t tokens computes, for t up to the largest graph."""
        if not self.graph_sizes:
            return []
        pad, t = [0], 1
        for size in self.graph_sizes:
            while t <= size:
                pad.append(size)
                t += 1
        return pad


@dataclass(frozen=True, slots=True)
class StepTimeParams:
    """Linear step-time model; each coefficient's unit is in its name.

    step = step_overhead_s
         + per_seq_s · num_seqs
         + per_prefill_token_s · prefill_tokens
         + per_decode_seq_s · decode_seqs
         + per_prefill_attn_pair_s · prefill_attn_pairs
         + per_decode_ctx_token_s · decode_ctx_tokens

    The defaults are hand-set magnitudes for a 70B-class 4-bit model on one 80 GB GPU.
    They are NOT calibrated: use them for shapes and plumbing, not for numbers.
    """

    step_overhead_s: float = 0.015
    per_seq_s: float = 0.0
    per_prefill_token_s: float = 6.0e-4
    per_decode_seq_s: float = 6.0e-4
    per_prefill_attn_pair_s: float = 1.0e-8
    per_decode_ctx_token_s: float = 1.6e-7
    calibrated: bool = False
    source: str = "uncalibrated hand-set defaults"

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_s") and (not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"step_time.{f.name} must be a number >= 0, got {v!r}")
        if self.step_overhead_s <= 0 and self.per_prefill_token_s <= 0 and self.per_decode_seq_s <= 0:
            raise ValueError("step_time: every step would take 0 s; give a positive overhead or per-token cost")

    def describe(self) -> dict:
        return {"kind": "linear", **asdict(self)}

    def step_time(self, b: BatchShape) -> float:
        return self.decode_step_times(b, b.decode_ctx_tokens)

    def decode_step_times(self, b: BatchShape, ctx):
        """`step_time` of batch `b` with its context total replaced by `ctx` (a number, or an
        array for a run of decode steps): one expression for both, so the same floats."""
        return (
            self.step_overhead_s
            + self.per_seq_s * b.num_seqs
            + self.per_prefill_token_s * (b.prefill_tokens + b.spec_tokens)
            + self.per_decode_seq_s * b.decode_seqs
            + self.per_prefill_attn_pair_s * b.prefill_attn_pairs
            + self.per_decode_ctx_token_s * ctx
        )

    def decode_run_ends(self, b: BatchShape, steps: int, now: float) -> list[float]:
        """See `sim.step_time.decode_run_ends`: everything but the context term is added up once,
        in `step_time`'s order, so each step's float is `step_time`'s."""
        fixed = (self.step_overhead_s + self.per_seq_s * b.num_seqs
                 + self.per_prefill_token_s * (b.prefill_tokens + b.spec_tokens)
                 + self.per_decode_seq_s * b.decode_seqs + self.per_prefill_attn_pair_s * b.prefill_attn_pairs)
        per_ctx, ctx, n, ends, t = self.per_decode_ctx_token_s, b.decode_ctx_tokens, b.num_seqs, [], now
        for _ in range(steps):
            t += fixed + per_ctx * ctx
            ends.append(t)
            ctx += n
        return ends

    def step_times(self, f):
        """Vectorised over a step-feature matrix (columns as in `sim.perf_model.features`),
        the same operations in the same order as `step_time`, so the same floats come out."""
        return (
            self.step_overhead_s
            + self.per_seq_s * f[:, 0]
            + self.per_prefill_token_s * (f[:, 1] + f[:, 5])
            + self.per_decode_seq_s * f[:, 3]
            + self.per_prefill_attn_pair_s * f[:, 2]
            + self.per_decode_ctx_token_s * f[:, 4]
        )


RUN_VECTORISE_STEPS = 64  # a run this long or longer is one numpy call; shorter, a plain loop is cheaper


def decode_run_ends(model, shape: BatchShape, steps: int, now: float) -> list[float]:
    """End times of `steps` pure-decode steps of the batch `shape` starting at `now`, each
    attending over one more token per request than the step before (the only thing that
    changes in a run). The durations are `step_time`'s floats and the ends are added up one
    step at a time, as the step-by-step engine adds them: the same times, bit for bit. The
    engines' models split the step time into a part fixed for the run and the context terms
    (`decode_run_ends` on the model, a plain loop) and take long runs in one numpy call
    (`decode_step_times`); any other model is asked step by step."""
    if steps >= RUN_VECTORISE_STEPS and hasattr(model, "decode_step_times"):
        return _run_ends_vectorised(model.decode_step_times, shape, steps, now)
    run = getattr(model, "decode_run_ends", None)
    if run is not None:
        return run(shape, steps, now)
    b, ends, t = shape, [], now
    for j in range(steps):
        t += model.step_time(BatchShape(b.num_seqs, b.prefill_tokens, b.prefill_attn_pairs, b.decode_seqs,
                                        b.decode_ctx_tokens + b.num_seqs * j, b.spec_tokens))
        ends.append(t)
    return ends


def chunked_run_ends(model, shape: BatchShape, steps: int, now: float, chunk: int, computed: int) -> list[float]:
    """End times of `steps` steps of the batch `shape`: decodes plus one prompt chunk of `chunk`
    tokens after `computed` cached ones. From step to step the decodes attend over one more
    token each and the chunk moves on by `chunk` tokens; its attention pairs are summed as
    `BatchShape.add_chunk` sums them. These runs are short (a prompt's few chunks), so each
    step is timed by `step_time`: the same floats as step by step."""
    b, ends, t = shape, [], now
    for j in range(steps):
        c = computed + chunk * j
        t += model.step_time(BatchShape(b.num_seqs, b.prefill_tokens, 0.0 + (chunk * c + chunk * (chunk + 1) / 2),
                                        b.decode_seqs, b.decode_ctx_tokens + b.decode_seqs * j, b.spec_tokens))
        ends.append(t)
    return ends


def _run_ends_vectorised(step_times, b: BatchShape, steps: int, now: float) -> list[float]:
    """`decode_run_ends` for a long run: `step_times(b, ctx)` over every step's context total
    at once, then a running sum (numpy's cumsum adds in order, like `now += dt`)."""
    import numpy as np

    ctx = b.decode_ctx_tokens + b.num_seqs * np.arange(steps, dtype=np.int64)
    dts = np.asarray(step_times(b, ctx), dtype=np.float64) * np.ones(steps)
    return np.cumsum(np.concatenate(([now], dts)))[1:].tolist()


class StepTimeModel(Protocol):
    """Anything the engine can ask how long a batch takes."""

    calibrated: bool
    source: str

    def step_time(self, b: BatchShape) -> float: ...

    def describe(self) -> dict: ...
