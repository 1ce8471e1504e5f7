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


def load_policy(spec: str) -> type[Scheduler]:
    """A user's scheduling policy: "path/to/file.py:ClassName" or "package.module:ClassName".

    The class subclasses `Scheduler` (usually one of the engines' schedulers) and implements
    `_schedule(self) -> Batch`; see docs in `sim/schedulers/base.py` and the example in
    `examples/policies/`.
    """
    import importlib
    import importlib.util
    from pathlib import Path

    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"engine.policy: {spec!r} is not FILE.py:ClassName or module:ClassName")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise ValueError(f"engine.policy: file not found: {target}")
        mod_spec = importlib.util.spec_from_file_location(f"servesim_policy_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"engine.policy: cannot import {target!r}: {exc}") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise ValueError(f"engine.policy: {spec!r} is not a subclass of sim.schedulers.Scheduler")
    return cls


def make_scheduler(engine_cfg, kv) -> Scheduler:
    policy = getattr(engine_cfg, "policy", None)
    cls = load_policy(policy) if policy else SCHEDULERS[engine_cfg.scheduler]
    return cls(engine_cfg, kv)


__all__ = ["Batch", "Scheduler", "SCHEDULERS", "load_policy", "make_scheduler", "VllmV0Scheduler", "VllmV1Scheduler", "SglangScheduler"]
