"""Scheduling policies, one module per engine."""

from .base import Batch, Scheduler
from .sglang import SglangScheduler
from .vllm_v0 import VllmV0Scheduler
from .vllm_v1 import VllmV1Scheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    VllmV0Scheduler.name: VllmV0Scheduler,
    VllmV1Scheduler.name: VllmV1Scheduler,
    SglangScheduler.name: SglangScheduler,
}


def make_scheduler(engine_cfg, kv) -> Scheduler:
    return SCHEDULERS[engine_cfg.scheduler](engine_cfg, kv)


__all__ = ["Batch", "Scheduler", "SCHEDULERS", "make_scheduler", "VllmV0Scheduler", "VllmV1Scheduler", "SglangScheduler"]
