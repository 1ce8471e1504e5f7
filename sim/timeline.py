"""What happened when: a Chrome/Perfetto trace and a matplotlib picture of a simulated run.

Tracks (open the JSON in ui.perfetto.dev or chrome://tracing):
- one per engine instance: every forward pass as a slice, with its prefill-chunk tokens and
  decode tokens, plus counter tracks of both;
- one per request: waiting (from the moment it was sent, or preempted, to its next scheduled
  step), each prefill chunk, decoding (consecutive decode steps merged) and preemptions as
  instant events.

Times are simulated seconds, written as microseconds (the trace format's unit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

US = 1e6


@dataclass
class Span:
    rid: int
    kind: str  # waiting | prefill | decode
    start_s: float
    end_s: float
    tokens: int = 0


def request_spans(res) -> tuple[list[Span], list[tuple[int, float]]]:
    """Per-request phases from the recorded steps; and (rid, time) of every preemption."""
    steps = sorted(((s, i) for i, steps in enumerate(res.instance_steps) for s in steps), key=lambda x: x[0].t_start_s)
    ready = {r.rid: r.start_s for r in res.requests if r.start_s == r.start_s}  # NaN: never sent
    spans: list[Span] = []
    preemptions: list[tuple[int, float]] = []
    decoding: dict[int, Span] = {}
    for step, _inst in steps:
        t0, t1 = step.t_start_s, step.t_start_s + step.duration_s
        for rid, n, decode in step.work:
            if rid in ready:  # it was waiting until this step picked it up
                if t0 > ready[rid]:
                    spans.append(Span(rid, "waiting", ready[rid], t0))
                del ready[rid]
            if decode:
                cur = decoding.get(rid)
                if cur is not None and abs(cur.end_s - t0) < 1e-9 * max(1.0, t0) + 1e-12:
                    cur.end_s, cur.tokens = t1, cur.tokens + 1
                    continue
                decoding[rid] = Span(rid, "decode", t0, t1, 1)
                spans.append(decoding[rid])
            else:
                decoding.pop(rid, None)
                spans.append(Span(rid, "prefill", t0, t1, n))
        for rid in step.preempted_rids:
            preemptions.append((rid, t1))
            decoding.pop(rid, None)
            ready[rid] = t1
    return spans, preemptions


def chrome_trace(res) -> dict:
    """The run as Chrome trace JSON (the Trace Event Format's "JSON object" form)."""
    if res.instance_steps is None:
        raise ValueError("the timeline needs a run simulated with record_steps=True")
    ev: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "engine steps"}},
                      {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "requests"}}]
    for i, steps in enumerate(res.instance_steps):
        ev.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": f"instance {i}"}})
        for k, s in enumerate(steps):
            pre, dec = s.shape.prefill_tokens, s.shape.decode_seqs
            name = "prefill+decode" if pre and dec else "prefill" if pre else "decode"
            ev.append({"name": name, "ph": "X", "pid": 0, "tid": i, "ts": s.t_start_s * US, "dur": s.duration_s * US,
                       "args": {"step": k, "prefill_tokens": pre, "decode_tokens": dec, "seqs": s.shape.num_seqs,
                                "kv_blocks_used": s.kv_blocks_used, "waiting": s.num_waiting}})
            ev.append({"name": f"tokens (instance {i})", "ph": "C", "pid": 0, "tid": i, "ts": s.t_start_s * US,
                       "args": {"prefill": pre, "decode": dec}})
    spans, preemptions = request_spans(res)
    for r in res.requests:
        ev.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": r.rid, "args": {"name": f"request {r.rid}"}})
    for sp in spans:
        args = {"tokens": sp.tokens} if sp.kind != "waiting" else {}
        ev.append({"name": sp.kind, "ph": "X", "pid": 1, "tid": sp.rid, "ts": sp.start_s * US,
                   "dur": (sp.end_s - sp.start_s) * US, "args": args})
    for rid, t in preemptions:
        ev.append({"name": "preempted", "ph": "i", "s": "t", "pid": 1, "tid": rid, "ts": t * US})
    return {"traceEvents": ev, "displayTimeUnit": "ms"}


def write_trace(res, path: str | Path) -> None:
    Path(path).write_text(json.dumps(chrome_trace(res)))


def plot_timeline(res, path: str | Path, seconds: float | None = None, max_requests: int = 40, title: str = ""):
    """Two panels over the first `seconds`: tokens per step (prefill vs decode) on instance 0,
    and a Gantt chart of the first `max_requests` requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    steps = res.instance_steps[0]
    end = seconds if seconds is not None else max(s.t_start_s + s.duration_s for s in steps)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12.5, 7), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    shown = [s for s in steps if s.t_start_s < end]
    starts = [s.t_start_s for s in shown]
    widths = [s.duration_s for s in shown]
    pre = [s.shape.prefill_tokens for s in shown]
    dec = [s.shape.decode_seqs for s in shown]
    ax1.bar(starts, pre, width=widths, align="edge", color="tab:orange", label="prefill tokens")
    ax1.bar(starts, dec, width=widths, align="edge", bottom=pre, color="tab:blue", label="decode tokens")
    ax1.set_ylabel("tokens in the step")
    ax1.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    colors = {"waiting": "lightgray", "prefill": "tab:orange", "decode": "tab:blue"}
    spans, preemptions = request_spans(res)
    rids = sorted({r.rid for r in res.requests})[:max_requests]
    row = {rid: k for k, rid in enumerate(rids)}
    for sp in spans:
        if sp.rid in row and sp.start_s < end:
            ax2.barh(row[sp.rid], min(sp.end_s, end) - sp.start_s, left=sp.start_s, height=0.7, color=colors[sp.kind])
    for rid, t in preemptions:
        if rid in row and t < end:
            ax2.plot(t, row[rid], "rx")
    first = {r.rid: r.first_token_s for r in res.requests if r.output_len and r.rid in row}
    ax2.plot([t for t in first.values() if t < end], [row[r] for r, t in first.items() if t < end], "k|", ms=9)
    ax2.set_ylabel("request id")
    ax2.set_yticks(range(len(rids)), [str(r) for r in rids], fontsize=7)
    ax2.set_xlabel("simulated time (s)")
    ax2.invert_yaxis()
    ax2.set_xlim(0, end)
    ax2.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()]
               + [plt.Line2D([], [], color="k", marker="|", ls="", label="first token"),
                  plt.Line2D([], [], color="r", marker="x", ls="", label="preempted")],
               loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
