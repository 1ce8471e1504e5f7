"""Step-time profiles: a model spec, a hardware spec, TP and fitted coefficients, in TOML.

`servesim calibrate --out NAME` writes `NAME.toml` in the working directory; `servesim validate`
writes the bundled ones under calibration/profiles/. A scenario refers to one by name
(`[step_time] profile = "seed004-qwen72b-gptq"`), found in the working directory first, then
among the bundled ones, or by a path to its .toml. A profile may also state the KV capacity it
was fitted with, which scenarios use when they do not state their own.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .perf_model import RooflineCoefficients, RooflineStepTime, load_hardware_spec, load_model_spec

UNITS = {
    "step_overhead_s": "s per step",
    "per_seq_s": "s per request in the batch",
    "launch_overhead_s": "s of kernel launches per step, overlapping GPU work",
    "prefill_overhead_s": "s extra for a step that computes prompt tokens",
    "frontend_latency_s": "s from the client sending a request to the scheduler seeing it",
    "compute_efficiency": "fraction of the device's peak FLOP/s",
    "memory_efficiency": "fraction of the device's peak HBM bandwidth",
    "comm_efficiency": "fraction of the device's interconnect bandwidth",
    "cpu_overhead_s": "s of CPU work before each step, hidden behind the GPU when the engine overlaps them",
    "attention_efficiency": "fraction of peak FLOP/s the attention kernels reach (unset: compute_efficiency)",
    "frontend_per_request_s": "s a burst waits in front of the scheduler per request in it, all reaching it together",
    "kv_cache_tokens": "tokens",
}


def profiles_dir() -> Path:
    return Path(str(resources.files("calibration") / "profiles"))


@dataclass
class Profile:
    name: str
    model: str
    hardware: str
    tp: int
    coeffs: RooflineCoefficients
    kv_cache_tokens: int | None = None
    fit: dict = field(default_factory=dict)  # where it came from: data, rows, loss, ...

    def step_model(self) -> RooflineStepTime:
        return RooflineStepTime(
            load_model_spec(self.model), load_hardware_spec(self.hardware), self.tp, self.coeffs,
            calibrated=bool(self.fit), source=f"profile {self.name}",
        )

    def to_toml(self) -> str:
        lines = ["[profile]", f'name = "{self.name}"', f'model = "{self.model}"', f'hardware = "{self.hardware}"',
                 f"tp = {self.tp}"]
        if self.kv_cache_tokens is not None:
            lines.append(f"kv_cache_tokens = {self.kv_cache_tokens}")
        lines += ["", "[coefficients]"]
        for k, v in self.coeffs.as_dict().items():
            lines.append(f"{k} = {v!r}  # {UNITS[k]}")
        if self.fit:
            lines += ["", "[fit]"]
            for k, v in self.fit.items():
                lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_toml())


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def find_profile(name_or_path: str) -> Path | None:
    """A .toml path, else NAME.toml in the working directory, else a bundled profile."""
    p = Path(name_or_path)
    if p.suffix == ".toml":
        return p if p.exists() else None
    for q in (Path.cwd() / f"{name_or_path}.toml", profiles_dir() / f"{name_or_path}.toml"):
        if q.exists():
            return q
    return None


def load_profile(name_or_path: str) -> Profile:
    p = find_profile(name_or_path)
    if p is None:
        known = sorted(q.stem for q in profiles_dir().glob("*.toml"))
        raise ValueError(f"step_time.profile: no profile {name_or_path!r} (no {name_or_path}.toml in the working "
                         f"directory); bundled: {', '.join(known) or 'none'}")
    data = tomllib.loads(p.read_text())
    head = data.get("profile", {})
    try:
        return Profile(
            name=head.get("name", p.stem), model=head["model"], hardware=head["hardware"], tp=int(head.get("tp", 1)),
            coeffs=RooflineCoefficients(**data.get("coefficients", {})),
            kv_cache_tokens=head.get("kv_cache_tokens"), fit=data.get("fit", {}),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"profile {p}: malformed ({exc})") from None
