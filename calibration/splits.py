"""Split files: which measured rows a fit may see, and how each row becomes a scenario.

A split (calibration/splits/NAME.toml) names a measured table, a row-id template built from
the table's columns, the scenario file of each row, the rows to fit on (everything else is
predicted), the metrics, the model and hardware (candidates), and the targets the
validation must meet. The split decides nothing after the fact: it is committed before
the fit runs, and `validate` never predicts a row it trained on.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from sim.config import _read_toml
from sim.perf_model import kv_capacity_tokens, load_hardware_spec, load_model_spec

from .fit import DEFAULT_METRICS, SIM_KEY, RowCase
from .tables import load_table

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_CMD = "launch_cmd"  # a split's scenario built from each row's launch command (calibration/gpustack.py)


@dataclass
class Split:
    name: str
    table: Path
    profile: str
    row_id: str  # a str.format template over the row's columns (see `row_fields`)
    scenario: str  # path template, relative to the repository root; "launch_cmd": built from the row (gpustack)
    train: list[str]
    model: str
    hardware: str | list[str]
    tp: int = 1
    rows: dict = field(default_factory=dict)  # column -> value filter applied to the table
    metrics: tuple[str, ...] = DEFAULT_METRICS
    seeds: tuple[int, ...] = (0,)
    kv_bounds: tuple[int, int] | None = None
    # {memory_fraction, reserve_gib}: the engine's memory formula, when it has no unknowns
    kv_prior: dict | None = None
    fit_by_simulation: bool = False  # see StepTimeFit.by_simulation
    fixed: dict = field(default_factory=dict)  # coefficients held, not fitted (StepTimeFit.fixed)
    targets: dict[str, float] = field(default_factory=dict)  # metric -> max median APE (%) on predicted rows
    count_targets: dict[str, list[float]] = field(default_factory=dict)  # row -> [measured, tolerance]
    # Rows of another engine predicted with the fit's step time (a transfer across engines): each
    # entry's `where` selects rows by column, whose KV pool is that engine's memory formula
    # (memory_fraction, reserve_gib) instead of the pool the fit found for its own engine.
    own_kv: list[dict] = field(default_factory=list)
    # column -> value(s): of the rows not trained on, only these are predicted (a transfer split
    # reports the transfer alone, not the fitted configuration's other rows)
    predict_rows: dict = field(default_factory=dict)
    notes: str = ""


    def kv_prior_tokens(self) -> int | None:
        """The pool the engine's memory formula gives for this split's model, hardware and TP."""
        if not self.kv_prior:
            return None
        return self._formula_tokens(self.kv_prior, "kv_prior")

    def _formula_tokens(self, formula: dict, key: str) -> int:
        if not isinstance(self.hardware, str):
            raise ValueError(f"split {self.name}: {key} needs one hardware, not {self.hardware}")
        extra = set(formula) - {"memory_fraction", "reserve_gib", "where"}
        if extra or "memory_fraction" not in formula:
            raise ValueError(f"split {self.name}: {key} takes memory_fraction and reserve_gib, got {sorted(formula)}")
        tokens = kv_capacity_tokens(load_model_spec(self.model), load_hardware_spec(self.hardware), self.tp,
                                    float(formula["memory_fraction"]), float(formula.get("reserve_gib", 0.0)))
        return int(round(tokens / 16) * 16)

    def own_kv_tokens(self, row: pd.Series) -> int | None:
        """A row's own KV pool when an `own_kv` entry selects it (a row of another engine)."""
        for entry in self.own_kv:
            where = entry.get("where", {})
            if where and all(col in row and row[col] == val for col, val in where.items()):
                return self._formula_tokens(entry, "own_kv")
        return None


def splits_dir() -> Path:
    return Path(str(resources.files("calibration") / "splits"))


def load_split(name_or_path: str) -> Split:
    p = Path(name_or_path)
    if not (p.suffix == ".toml" and p.exists()):
        p = splits_dir() / f"{name_or_path}.toml"
    if not p.exists():
        known = sorted(q.stem for q in splits_dir().glob("*.toml"))
        raise ValueError(f"no split {name_or_path!r}; known: {', '.join(known)}")
    d = tomllib.loads(p.read_text())
    table = Path(d.pop("table"))
    if not table.is_absolute():
        table = Path(str(resources.files("calibration") / "data")) / table
    for key in ("metrics", "seeds"):
        if key in d:
            d[key] = tuple(d[key])
    if "kv_bounds" in d:
        d["kv_bounds"] = tuple(d["kv_bounds"])
    return Split(name=d.pop("name", p.stem), table=table, **d)


def row_fields(row: pd.Series) -> dict:
    """The row's columns (whole floats as ints) plus `cp` = enable/disable for chunked prefill."""
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        out[k] = v
    cp = row.get("chunked_prefill")
    out["cp"] = "enable" if cp is True or str(cp).lower() == "true" else "disable"
    return out


def select_rows(split: Split) -> pd.DataFrame:
    df = load_table(split.table)
    for col, val in split.rows.items():
        df = df[df[col].isin(val)] if isinstance(val, list) else df[df[col] == val]
    ids = [split.row_id.format(**row_fields(r)) for _, r in df.iterrows()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"split {split.name}: row_id template {split.row_id!r} does not make ids unique")
    df = df.assign(row_id=ids).set_index("row_id", drop=False)
    if split.predict_rows:
        keep = df.index.isin(split.train)
        for col, val in split.predict_rows.items():
            keep |= df[col].isin(val if isinstance(val, list) else [val]).to_numpy()
        df = df[keep]
    unknown = [r for r in split.train if r not in df.index]
    if unknown:
        raise ValueError(f"split {split.name}: training rows {unknown} are not in the table")
    return df


def _check_row_matches(split: Split, rid: str, row: pd.Series, data: dict) -> None:
    """A scenario must describe the run its row measured; mismatches are errors, not fits."""
    eng, wl = data.get("engine", {}), data.get("workload", {})
    checks = [("max_num_batched_tokens", eng.get("max_num_batched_tokens")),
              ("max_num_seqs", eng.get("max_num_seqs")), ("max_model_len", eng.get("max_model_len")),
              ("num_prompts", wl.get("num_prompts")), ("max_concurrency", wl.get("max_concurrency"))]
    for col, val in checks:
        if val is None or col not in row or pd.isna(row[col]):
            continue
        if float(row[col]) != float(val):
            raise ValueError(f"split {split.name}: scenario of row {rid} has {col} = {val}, the table says {row[col]}")
    if "chunked_prefill" in row and not pd.isna(row["chunked_prefill"]) and "enable_chunked_prefill" in eng:
        if bool(row["chunked_prefill"]) != bool(eng["enable_chunked_prefill"]):
            raise ValueError(f"split {split.name}: scenario of row {rid} disagrees on chunked prefill")


def cases(split: Split) -> tuple[list[RowCase], pd.DataFrame]:
    df = select_rows(split)
    out = []
    for rid, row in df.iterrows():
        if split.scenario == LAUNCH_CMD:  # the run as its launch command and workload columns say
            from .gpustack import row_run

            run = row_run(row)
            if run is None:
                raise ValueError(f"split {split.name}: row {rid} ({row['engine']}) is not a simulated engine")
            data = {"name": rid, **run.case.scenario}
            # another model of the family (or GPU, TP) than the split fits: predicted with its own spec
            step = {k: v for k, v in (("model", run.model), ("hardware", run.hardware), ("tp", run.tp))
                    if v != getattr(split, k)}
        else:
            path = ROOT / split.scenario.format(**row_fields(row))
            data = _read_toml(path)
            data.setdefault("name", path.stem)
            step = {}
        _check_row_matches(split, rid, row, data)
        measured = {m: float(row[m]) for m in SIM_KEY if m in row and not pd.isna(row[m])}
        out.append(RowCase(rid, measured, data, step=step, kv_tokens=split.own_kv_tokens(row)))
    return out, df
