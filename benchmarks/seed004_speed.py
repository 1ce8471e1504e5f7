"""Wall time of every seed-004 scenario (simulate only, scenario already loaded).

    python benchmarks/seed004_speed.py [--repeat 3] [--out benchmarks/results/seed004_speed.json]

Prints, per scenario, the best of `--repeat` runs and engine steps per second. A plain
script, not a timed test: run it on the machine you care about and compare ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from sim.config import load_scenario
from sim.runner import simulate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "seed004_speed.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'scenario':<16} {'best wall s':>11} {'steps':>7} {'steps/s':>9} {'requests/s':>10}")
    for path in sorted((ROOT / "scenarios" / "seed004").glob("[!_]*.toml")):
        sc = load_scenario(path)
        walls = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            res = simulate(sc)
            walls.append(time.perf_counter() - t0)
        best = min(walls)
        row = {"scenario": path.stem, "best_wall_s": best, "walls_s": walls, "num_steps": res.num_steps,
               "steps_per_s": res.num_steps / best, "requests_per_s": len(res.requests) / best}
        rows.append(row)
        print(f"{path.stem:<16} {best:>11.3f} {res.num_steps:>7} {row['steps_per_s']:>9.0f} {row['requests_per_s']:>10.0f}")
    print(f"slowest: {max(r['best_wall_s'] for r in rows):.3f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
