"""Shortest-prompt-first: vLLM V1's scheduler, but the waiting queue is served shortest prompt first.

Not an engine's policy: an example of a user policy for `servesim compare`. Under load, short
prompts stop queueing behind long ones, which lowers mean TTFT; long prompts wait longer (p99 TTFT
can rise) and, with a steady stream of short ones, could starve.

    servesim run SCENARIO --set 'engine.policy="examples/policies/shortest_prompt_first.py:ShortestPromptFirst"'
"""

from __future__ import annotations

from collections import deque

from sim.schedulers import Batch, VllmV1Scheduler


class ShortestPromptFirst(VllmV1Scheduler):
    name = "shortest-prompt-first"

    def _schedule(self) -> Batch:
        # preempted requests (already partly served) keep their place at the head
        fresh = sorted((r for r in self.waiting if r.output_len == 0 and r.num_preemptions == 0),
                       key=lambda r: (r.prompt_len, r.arrival_s))
        resumed = [r for r in self.waiting if r.output_len > 0 or r.num_preemptions > 0]
        self.waiting = deque(resumed + fresh)
        return super()._schedule()
