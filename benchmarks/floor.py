"""How far the engine is from a floor on Vidur's workload: the same run with only the bare work.

    python benchmarks/floor.py [rounds]

The floor engine below is NOT a simulator of anything: it takes the same requests and the
same roofline step times as `scenarios/benchmarks/vidur-sharegpt.toml`, admits whole prompts
first come first served (1 % watermark, 128 sequences, 4096 tokens) and runs the decode batch
to its first completion in one event, as sim.engine does. It leaves out what makes the
simulator faithful: KV growth during decode runs (blocks are counted at completion), the
free-slot checks and preemption, per-request token pieces and ITL tallies, the client's
semantics and the general scheduler interface. Its wall time per plan bounds from below what
this design (SimPy events, plans in Python) could reach. The two are run interleaved, so the
ratio is from the same minutes of this machine.
"""

from __future__ import annotations

import heapq
import sys
import time
from array import array
from collections import deque
from pathlib import Path

import simpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.config import load_scenario  # noqa: E402
from sim.runner import simulate  # noqa: E402
from sim.step_time import BatchShape  # noqa: E402
from sim.workload import build_requests  # noqa: E402

BLOCK, MAX_SEQS, BUDGET = 16, 128, 4096


def floor_run(sc, model) -> int:
    """Simulate the bare workload; returns the number of plans."""
    reqs = sorted(build_requests(sc.workload), key=lambda r: r.arrival_s)
    env = simpy.Environment()
    free = [sc.engine.num_gpu_blocks]
    watermark = int(0.01 * free[0])
    waiting: deque = deque()
    state = {"wake": None, "in_run": False}
    clock = array("d")  # decode step end times, as the engine keeps them
    done: list = []
    plans = [0]

    def client():
        for r in reqs:
            if r.arrival_s > env.now:
                yield env.timeout(r.arrival_s - env.now)
            r.start_s = env.now
            waiting.append(r)
            if state["wake"] is not None and not state["wake"].triggered:
                state["wake"].succeed()
            elif state["in_run"] and len(waiting) == 1:  # the head arrived: the run ends at this step
                state["in_run"] = False
                engine.interrupt()

    def loop():
        finishing: list = []  # (decode step at which it is done, order, request)
        order = steps_run = members = ctx = 0
        while True:
            plans[0] += 1
            shape, admitted = None, []
            while waiting:
                r = waiting[0]
                need = -(-r.prompt_len // BLOCK)
                if (need > free[0] - watermark or members + len(admitted) >= MAX_SEQS
                        or (shape is not None and shape.prefill_tokens + r.prompt_len > BUDGET)):
                    break
                waiting.popleft()
                free[0] -= need
                shape = shape or BatchShape()
                shape.add_chunk(0, r.prompt_len, False)
                admitted.append(r)
            if shape is not None:  # a prefill step
                yield env.timeout(model.step_time(shape))
                for r in admitted:
                    r.first_token_s = env.now
                    if r.max_tokens == 1:
                        free[0] += -(-r.prompt_len // BLOCK)
                        done.append(r)
                        continue
                    order += 1
                    heapq.heappush(finishing, (steps_run + r.max_tokens - 1, order, r))
                    members += 1
                    ctx += r.prompt_len
                continue
            if not members:
                state["wake"] = env.event()
                yield state["wake"]
                state["wake"] = None
                continue
            steps = finishing[0][0] - steps_run  # a decode run to the first completion
            ends = model.decode_run_ends(BatchShape(num_seqs=members, decode_seqs=members,
                                                    decode_ctx_tokens=ctx + members), steps, env.now)
            state["in_run"] = True
            try:
                yield env.timeout(ends[-1] - env.now)
                ran = steps
            except simpy.Interrupt:
                ran = next(k for k, t in enumerate(ends) if t >= env.now) + 1
                yield env.timeout(ends[ran - 1] - env.now)
            state["in_run"] = False
            clock.extend(ends[:ran])
            steps_run += ran
            ctx += members * ran
            while finishing and finishing[0][0] == steps_run:
                r = heapq.heappop(finishing)[2]
                members -= 1
                total = r.prompt_len + r.max_tokens
                ctx -= total - 1
                r.last_token_s = env.now
                free[0] += -(-total // BLOCK)
                done.append(r)

    env.process(client())
    engine = env.process(loop())
    while len(done) < len(reqs):
        env.step()
    return plans[0]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    sc = load_scenario(ROOT / "scenarios/benchmarks/vidur-sharegpt.toml")
    model = sc.step_time.build()
    simulate(sc)  # datasets and specs read once, as in the benchmark's later runs
    best_floor = best_full = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        plans_floor = floor_run(sc, model)
        best_floor = min(best_floor, time.perf_counter() - t)
        t = time.perf_counter()
        res = simulate(sc)
        best_full = min(best_full, time.perf_counter() - t)
    print(f"floor: {best_floor:.3f} s, {plans_floor} plans, {1e6 * best_floor / plans_floor:.1f} us per plan")
    print(f"simulator: {best_full:.3f} s, {res.num_steps} engine steps")
    print(f"ratio simulator / floor: {best_full / best_floor:.2f}")


if __name__ == "__main__":
    main()
