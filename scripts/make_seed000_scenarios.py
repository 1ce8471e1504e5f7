"""Write one scenario per seed-000 row and deployment hypothesis (scenarios/seed000/{pd,tp16}/).

Each row's file only states what the row measured (lengths, rate, concurrency, prompts) and
includes the hypothesis's common file; run it again after changing the table or the layout.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "calibration/data/seed000_deepseek_r1_16gpu_xllm_sglang.csv"


def main() -> None:
    df = pd.read_csv(TABLE)
    for hyp in ("pd", "tp16"):
        out = ROOT / "scenarios/seed000" / hyp
        out.mkdir(parents=True, exist_ok=True)
        for _, r in df.iterrows():
            series = r["note"].split(";")[0].replace("series ", "")
            c = int(r["max_concurrency"])
            rid = f"{r['table_id']}-c{c}"
            (out / f"{rid}.toml").write_text(
                f"# Seed 000, series {series}, random {r['input_len']}/{r['output_len']}, request rate {c}/s, "
                f"max concurrency {c}, {int(r['num_prompts'])} prompts; hypothesis: {hyp}.\n"
                f'include = "../_{hyp}.toml"\n\n[workload]\n'
                f"random_input_len = {int(r['input_len'])}\nrandom_output_len = {int(r['output_len'])}\n"
                f"request_rate = {c}\nmax_concurrency = {c}\nnum_prompts = {int(r['num_prompts'])}\n"
                f'\n[step_time]\nprofile = "seed000-{series}-{hyp}"\n')


if __name__ == "__main__":
    main()
