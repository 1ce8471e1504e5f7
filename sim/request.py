"""A request as both the benchmark client and the engine see it.

The engine's view follows vLLM V1: a request is a token sequence (prompt plus the
tokens generated so far) and a count of tokens whose KV is already computed. A step
schedules some of the uncomputed tokens; when all are computed the model samples one
new token. Decodes, prefill chunks and re-prefills after a preemption are all the same
rule, which is why the schedulers need no special cases for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from itertools import groupby
from typing import Any

from . import tokens


class Status(str, Enum):
    PENDING = "pending"  # created by the client, not yet sent
    WAITING = "waiting"  # in the engine's waiting queue
    RUNNING = "running"  # holds KV blocks, scheduled step by step
    FINISHED = "finished"  # generated max_tokens
    FAILED = "failed"  # rejected (HTTP 400 at the front door, or can never fit)


@dataclass(slots=True, eq=False)
class Request:
    rid: int
    prompt_len: int
    max_tokens: int  # requested output length (the client asks for it; EOS is ignored)
    arrival_s: float  # when the client's schedule says to send it

    # client side
    start_s: float = math.nan  # request clock starts once the concurrency permit is held
    stage: int = 0  # load stage (inference-perf's load.stages); arrival_s is from its start until sent
    aborted: bool = False  # the client gave up on it (request timeout); the server aborts it
    # engine side
    status: Status = Status.PENDING
    num_computed: int = 0  # tokens whose KV has been computed
    output_len: int = 0  # tokens emitted so far
    num_blocks: int = 0  # KV blocks held
    num_preemptions: int = 0
    instance: int = -1  # which engine instance the router sent it to
    hold_kv: bool = False  # a PD prefill job keeps its KV after finishing, until the transfer ends
    # streamed tokens (see sim.tokens): first and last token times, and runs of engine steps
    first_token_s: float = math.nan
    last_token_s: float = math.nan
    pieces: Any = None  # [clock, first step, end step, tokens per step]; None once folded
    error: str = ""
    # prefix caching: the prompt's content as (segment id, length) runs and the id of the generated
    # tokens; segments None with out_segment >= 0: one segment of its own, id out_segment - 1,
    # which no other prompt contains, nor its reply (a private request); both unset: content
    # not named (never cached)
    segments: tuple[tuple[int, int], ...] | None = None
    out_segment: int = -1
    kv_keys: list | None = None  # cached chunks this request references (see prefix_cache)
    kv_chunks: int = 0  # of its chunks, how many the cache has accounted for (registered or hit)
    kv_run: int = 0  # a private request's own cached chunks it holds, counted (see prefix_cache)
    kv_by_chunk: bool = False  # a private request whose chunks are kept one by one after all
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at (last) admission
    # multi-turn: sent after request `follows` completes, its prompt extended by that turn's
    # prompt and reply (the client fills them in then)
    follows: int = -1
    has_next_turn: bool = False  # a later turn holds its reply (set when the workload is built)
    new_message_len: int = 0  # 0 for a turn whose whole prompt is known in advance (a trace's)
    think_s: float = math.nan  # pause after the previous turn's reply (NaN: the client's think time)
    not_before_s: float = 0.0  # a recorded turn is not sent before its timestamp either
    # for exact replay (calibration)
    permit_from: int = -1  # rid of the request whose completion freed this one's permit (-1: none)
    end_step: int = -1  # for a request the scheduler rejected: engine steps completed when the client heard

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: everything whose KV must exist before sampling."""
        return self.prompt_len + self.output_len

    @property
    def is_prefilling(self) -> bool:
        """True while more than one token is uncomputed (a prompt, or a re-prefill)."""
        return self.num_tokens - self.num_computed > 1 or self.output_len == 0

    @property
    def token_times(self) -> list[float]:
        """Every token's arrival time; needs the pieces (kept with keep_token_times)."""
        if self.pieces is None and self.output_len:
            raise ValueError(f"request {self.rid}: per-token times were not kept (simulate(keep_token_times=True))")
        return tokens.token_times(self)

    @token_times.setter
    def token_times(self, times) -> None:
        """Give a request these token times (tests, hand-made requests): one clock step per
        distinct time, tokens at the same time forming one chunk."""
        clock = tokens.StepClock()
        self.pieces = None
        for t, n in _runs(list(times)):
            clock.tick(t)
            tokens.emit_chunk(self, clock, len(clock) - 1, n)

    @property
    def token_steps(self) -> list[int]:
        """The engine step that emitted each token (single-engine runs)."""
        return tokens.token_steps(self)

    @property
    def done(self) -> bool:
        return self.status in (Status.FINISHED, Status.FAILED)


def _runs(times: list[float]):
    return [(t, len(list(g))) for t, g in groupby(times)]
