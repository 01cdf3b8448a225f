"""`python -m bench.percall`'s report: CPU per call of the server's event loop, unary and streamed, against the
gRPC floor at the same concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.kit.fmt import num, ratio, table
from bench.kit.machine import machine_line

TARGET = 1.3  # event-loop CPU per call / the floor's, same concurrency, same method
CASES = {"hit": "cache hit (pairs)", "miss_pairs": "miss: query/title pairs", "miss_queries": "miss: queries only"}
METHODS = {"unary": "unary Score", "stream": "ScoreStream"}


def plot(r: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8.0, 3.8))
    width = 0.38
    names = list(CASES)
    for k, (kind, label) in enumerate(METHODS.items()):
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        ys = [r["cases"][c][kind]["loop_us"] or 0.0 for c in names]
        color = ("tab:blue", "tab:green")[k]
        ax.bar(xs, ys, width, color=color, label=f"server, {label}")
        for x, c in zip(xs, names, strict=True):
            same = r["cases"][c][kind].get("floor_same_rate")
            if same and same["loop_us"]:
                ax.plot([x - width / 2, x + width / 2], [same["loop_us"]] * 2, color="black", lw=2,
                        label="floor at the miss's own rate" if (k, c) == (0, "miss_pairs") else None)
        floor = r["floor"][kind]["loop_us"]
        ax.hlines(floor, -0.5, len(names) - 0.5, colors=color, linestyles=":", label=f"floor, {label}")
        ax.hlines(floor * TARGET, -0.5, len(names) - 0.5, colors=color, linestyles="--", lw=0.8,
                  label=f"target {TARGET} × floor, {label}")
    ax.set_xticks(range(len(names)), [CASES[c] for c in names], fontsize=8)
    ax.set(ylabel="event-loop CPU per call (µs)",
           title=f"Front-end CPU per call, closed loop of {r['args']['concurrency']}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def markdown(r: dict[str, Any]) -> str:
    a = r["args"]
    rows = []
    for kind, label in METHODS.items():
        f = r["floor"][kind]
        rows.append([f"floor (canned answers), {label}", num(f["calls_per_s"]), num(f["loop_us"]), "1.00", "—",
                     num(f["process_us"]), num(f["client_us"]), num(f["p99_ms"]), _failed(f)])
        for case, name in CASES.items():
            c = r["cases"][case][kind]
            same = c.get("floor_same_rate")
            rows.append([f"server, {name}, {label}", num(c["calls_per_s"]), num(c["loop_us"]),
                         *_against(c, f), num(c["process_us"]), num(c["client_us"]), num(c["p99_ms"]), _failed(c)])
            if same:
                rows.append([f"floor at that rate (answers after {num(same['delay_ms'])} ms), {label}",
                             num(same["calls_per_s"]), num(same["loop_us"]), "1.00", "—", num(same["process_us"]),
                             num(same["client_us"]), num(same["p99_ms"]), _failed(same)])
                rows.append([f"server, {name}, {label}, against the floor at its rate", "", "",
                             *_against(c, same), "", "", "", ""])
    return "\n".join([
        "## Per-call cost (`python -m bench.percall`)", "",
        f"Issue 20: the front end's CPU per call, not the engine, decides throughput on short traffic. Closed loops "
        f"of {a['concurrency']} callers for {a['duration_s']:g} s per row (after {a['warmup_s']:g} s unmeasured), the "
        "load generator on the same cores: the transport floor (a grpc.aio server on uvloop answering canned "
        "responses of the same size) and then `python -m server` "
        f"(`{' '.join(r['server_flags'])}`, the cache on for hits), each unary and over {a['streams']} ScoreStream "
        "calls. CPU from /proc: the server's event-loop (main) thread and its whole process, per answered call; "
        f"the generator's own. Target: event loop ≤ {TARGET} × the floor of the same method.", "",
        machine_line(r["machine"]) + f" Data: {r['data']}.", "",
        *table(["case", "calls/s", "event loop µs/call", "× floor", "≤ target", "process µs/call",
                "generator µs/call", "p99 ms", "failed"], rows), "",
        "Misses run at the engine's pace, so each is compared with the floor at the same concurrency (the first "
        "floor rows) and with the floor at its own rate (a canned server answering after the delay that gives the "
        "same rate with the same callers). Misses include the engine's work in the process column (its lanes' "
        "threads), not in the event loop's.", "",
        "![Event-loop CPU per call against the floor](docs/bench/percall.png)", "",
        f"Reproduce: `python -m bench.percall --model-repo model_repo --out bench_out --concurrency "
        f"{a['concurrency']}` (results in `bench_out/percall/results.json`)."]) + "\n"


def _against(case: dict[str, Any], floor: dict[str, Any]) -> list[str]:
    x = case["loop_us"] / floor["loop_us"] if case["loop_us"] and floor["loop_us"] else None
    return [ratio(x), "yes" if x is not None and x <= TARGET else "no"]


def _failed(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in row["failures"].items()) or "0"
