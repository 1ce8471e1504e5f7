"""A deployment: one or more engine instances behind a router.

Data parallelism is several identical instances, each with its own scheduler, KV cache and
step-time model; tensor/expert parallelism lives inside one instance's step-time profile.
The router sees only what a real load balancer sees: how many requests it has sent to each
instance that have not finished.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import simpy

from .config import check_fits_in_memory
from .engine import Engine
from .instance import make_engine
from .request import Request


class Router:
    """round_robin (the default of most proxies), least_outstanding, or random."""

    def __init__(self, policy: str, n: int, seed: int):
        self.policy, self.n = policy, n
        self.outstanding = [0] * n
        self._next = 0
        self._rng = random.Random(seed)

    def pick(self) -> int:
        if self.policy == "round_robin":
            i = self._next
            self._next = (self._next + 1) % self.n
        elif self.policy == "least_outstanding":
            i = min(range(self.n), key=lambda k: (self.outstanding[k], k))
        else:
            i = self._rng.randrange(self.n)
        return i


# what one engine instance (scheduler, KV pool, clocks) costs in memory, measured at ~6.5 KiB
BYTES_PER_INSTANCE = 8 * 1024


class Deployment:
    def __init__(self, env: simpy.Environment, sc, on_done: Callable[[Request], None], record_steps: bool,
                 compress: bool = True):
        e, d = sc.engine, sc.deployment
        check_fits_in_memory(d.instances, BYTES_PER_INSTANCE, "deployment.instances", "engine instances")
        self.on_done = on_done
        self.router = Router(d.router, d.instances, sc.workload.seed)
        self.engines: list[Engine] = []
        for i in range(d.instances):
            self.engines.append(make_engine(env, e, sc.step_time.build(), self._done, record_steps,
                                            spec_seed=sc.workload.seed * 1000 + i, compress=compress))
        for eng in self.engines:
            eng.step_markers = len(self.engines) > 1

    def submit(self, req: Request) -> None:
        i = self.router.pick()
        req.instance = i
        self.router.outstanding[i] += 1
        self.engines[i].submit(req)

    def abort(self, req: Request) -> None:
        self.engines[req.instance].abort(req)

    def _done(self, req: Request) -> None:
        self.router.outstanding[req.instance] -= 1
        self.on_done(req)

    @property
    def processes(self) -> list:
        return [eng.process for eng in self.engines]
