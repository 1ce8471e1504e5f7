"""How long `servesim calibrate` takes on a recorded run of ~5,000 requests (target: 3 minutes on 2 cores).

The run is the round trip's (experiments/roundtrip.py): three constant-rate load stages of ShareGPT
requests, simulated with a known profile and written as per-request results. Timed arrivals are the
expensive case (the fit minimises over full simulations); a closed-loop run (every request released
by another's end, no front-end latency) is replayed exactly and is timed for comparison.

    python benchmarks/calibration_speed.py            # all three round-trip cases, one run each
    python benchmarks/calibration_speed.py --cases 0  # the dense case only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from roundtrip import CASES, TRUE, staged  # noqa: E402

from sim.cli import main as servesim  # noqa: E402
from sim.config import scenario_from_dict  # noqa: E402
from sim.runner import simulate  # noqa: E402


def time_calibrate(case, workload: dict, work: Path, label: str, client_keys: str = "") -> tuple[float, int]:
    rec = simulate(scenario_from_dict({"engine": case.engine(), "workload": workload, "step_time": case.step_time(TRUE)}))
    run = work / f"{label}.csv"
    rec.bench.requests.to_csv(run, index=False)
    base = work / "base.toml"
    eng = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in case.engine().items())
    # what the per-request file cannot say: the client's concurrency limit, if it had one
    base.write_text(f"[engine]\n{eng}\n\n[workload]\nclient = \"vllm\"\n{client_keys}")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = servesim(["calibrate", "--table", str(run), "--base", str(base), "--model", case.model, "--hardware",
                       case.hardware, "--tp", str(case.tp), "--out", str(work / f"{label}.toml"), "--no-progress",
                       "--allow-poor-fit"])
    assert rc == 0
    return time.perf_counter() - t0, len(rec.requests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help="comma-separated round-trip case numbers (default: all)")
    args = ap.parse_args()
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    print(f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            secs, n = time_calibrate(case, staged(case, 5000, 0), Path(tmp), "staged")
            print(f"{case.name}: {n} requests in 3 timed stages, calibrate {secs:.0f} s")
            closed = {"client": "vllm", "dataset_name": "sharegpt", "num_prompts": 5000, "max_concurrency": 64}
            secs, n = time_calibrate(case, closed, Path(tmp), "closed", "max_concurrency = 64\n")
            print(f"{case.name}: {n} requests closed loop (concurrency 64), calibrate {secs:.0f} s")


if __name__ == "__main__":
    main()
