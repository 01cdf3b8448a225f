"""`python -m bench.compare`'s report: the table against the peers, the transport floor, the targets, how each
system ran, the method, every sweep step, and the plot (max throughput; p99 by offered load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.kit.fmt import mib, ms, num, pct, ratio, table, verdict
from bench.kit.machine import arrangement, describe

TARGET_RAW = 0.90  # this service's max throughput ≥ 90% of the raw engine's
TARGET_RAY = 2.0  # … and ≥ 2× Ray Serve's
DEFAULT_OBJECTIVE_MS = 100.0
LABELS = {"raw": "raw engine (ORT alone)", "naive": "naive gRPC server", "ray": "Ray Serve",
          "service": "this service", "mlserver": "MLServer", "litserve": "LitServe"}
COLORS = {"raw": "tab:gray", "naive": "tab:orange", "ray": "tab:purple", "service": "tab:blue",
          "mlserver": "tab:green", "litserve": "tab:red"}
# The config key holding each batching peer's wait, and how its framework names it.
WAITS = {"ray": "batch_wait_timeout_ms", "mlserver": "max_batch_time_ms", "litserve": "batch_timeout_ms"}


def label(name: str, config: dict[str, Any] | None = None) -> str:
    """Display name; a batching peer's carries its batching settings when `config` (or the name) gives them."""
    if name.startswith("ray:"):
        _, size, wait = name.split(":")
        return f"Ray Serve (batch ≤ {size}, wait {wait} ms)"
    if name in WAITS and config:
        return f"{LABELS[name]} (batch ≤ {config['max_batch_size']}, wait {config[WAITS[name]]:g} ms)"
    return LABELS[name]


def max_rate(sweep: dict[str, Any]) -> float:
    """Requests/s of the best sustainable step: every call was answered OK, so the offered rate (Poisson count /
    step length) is what completed; the achieved-rate window only adds counting noise."""
    return float(sweep["max_offered_rate"])


def batch_run_ms(raw: dict[str, Any], lanes: int) -> float:
    """How long one run of the raw engine's best batch takes on one lane."""
    return 1000.0 * raw["batch_size"] * lanes / raw["samples_per_s"] if raw["samples_per_s"] else 0.0


def swept(results: dict[str, Any]) -> dict[str, Any]:
    """Every system swept: the servers, then the other Ray Serve settings."""
    return {**results["systems"], **(results.get("ray_variants") or {})}


def best_ray(results: dict[str, Any]) -> tuple[str | None, float]:
    """The Ray Serve configuration with the highest max throughput (default and variants alike)."""
    rays = {n: max_rate(s["sweep"]) for n, s in swept(results).items() if n.split(":")[0] == "ray"}
    name = max(rays, key=lambda n: rays[n]) if rays else None
    return name, rays[name] if name else 0.0


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    raw = results["raw"]["samples_per_s"]
    ray_max = best_ray(results)[1] or None
    rows = [{"system": "raw", "max_rate": raw, "vs_raw": 1.0, "vs_ray": raw / ray_max if ray_max else None,
             "note": f"batch {results['raw']['batch_size']}, length-grouped"}]
    for name, s in results["systems"].items():
        m, fx = max_rate(s["sweep"]), s.get("fixed", {})
        lat, mem = fx.get("latency", {}), fx.get("memory", {})
        rows.append({"system": name, "max_rate": m, "vs_raw": m / raw if raw else None,
                     "vs_ray": m / ray_max if ray_max else None, "bracketed": s["sweep"]["bracketed"],
                     "p50": lat.get("p50_ms"), "p99": lat.get("p99_ms"), "fixed_ok": fx.get("sustainable"),
                     "cpu": fx.get("cpu", {}).get("server_cores"), "rss": mem.get("rss_mib"),
                     "pss": mem.get("pss_mib"), "procs": mem.get("processes"),
                     "saturation": s["sweep"]["saturation_rate"]})
    return rows


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {r["system"]: r for r in table_rows(results)}
    svc, out = rows.get("service"), []
    if svc is not None:
        out.append({"target": f"this service ≥ {TARGET_RAW:.0%} of the raw engine", "value": svc["vs_raw"],
                    "met": svc["vs_raw"] is not None and svc["vs_raw"] >= TARGET_RAW})
        if "ray" in rows:
            out.append({"target": f"this service ≥ {TARGET_RAY:g}× Ray Serve", "value": svc["vs_ray"],
                        "met": svc["vs_ray"] is not None and svc["vs_ray"] >= TARGET_RAY})
    return out


def _transport(tr: dict[str, Any], service_vs_raw: float | None) -> str:
    if "error" in tr:
        return f"**The transport floor was not measured**: {tr['error']}"
    cpu_ms = 1000 * (tr["server_cores"] + tr["generator_cores"]) / tr["rate"]
    return (f"**The transport floor.** A canned-answer gRPC server (`bench/peers/canned_server.py`: the same "
            f"`grpc.aio` server on uvloop, decoding and response size, no model) carried {num(tr['rate'])}/s "
            f"({TARGET_RAW:.0%} of the raw engine) with {num(tr['server_cores'], 3)} cores, the generator "
            f"{num(tr['generator_cores'], 3)} ({num(cpu_ms, 2)} ms of CPU per call). The raw engine alone ran "
            f"{', '.join(num(x) for x in tr['engine_alone'])}/s, beside that transport "
            f"{', '.join(num(x) for x in tr['engine_loaded'])}/s (probes of {tr['probe_s']:g} s): it kept "
            f"**{tr['engine_share']:.2f}** of its speed, so no server paying this transport sustains more than "
            f"about **{ratio(tr['ceiling_ratio'])} the raw engine** (`bench.compare.ceiling`), less under a p99 "
            "objective" + (f"; this service reached {service_vs_raw / tr['ceiling_ratio']:.2f} of that ceiling."
                           if service_vs_raw else "."))


def markdown(results: dict[str, Any], png: str | None) -> str:
    m, a, raw = results["machine"], results["args"], results["raw"]
    obj, rate, sv = a["p99_objective_ms"], num(results.get("fixed_rate")), results["systems"]
    batch = f"batch {raw['batch_size']}: {batch_run_ms(raw, arrangement(a['threads'])[1]):.0f} ms"
    why = (f"2.5 runs of the best batch on one lane ({batch}), at least {DEFAULT_OBJECTIVE_MS:g} ms"
           if results.get("objective_derived") else f"`--p99-objective-ms`; best batch on one lane: {batch}")
    rows = table_rows(results)
    out = ["## Peers: this service vs a naive gRPC server, MLServer, LitServe and Ray Serve "
           "(`python -m bench.compare`)", "",
           f"One run ({'`--quick`, rough numbers; ' if a['quick'] else ''}{results['elapsed_s'] / 60:.1f} min, "
           f"{m['date']}, code {m['git']}, {m['cpu_model']}, {m['usable_cpus']} CPUs, load average at start "
           f"{' '.join(m['loadavg_at_start'])}): every system runs the demo model's fp32 graph "
           f"({results['model']['heads']} heads), the same tokenizer and ORT options ({describe(a['threads'])}; "
           "MLServer, LitServe and Ray Serve: that many inference processes or replicas), on "
           f"{results['data']['pairs']} {results['data']['kind']} query/title pairs "
           "under the same open-loop Poisson load (`loadtest.openloop`, latency from the scheduled send).", "",
           f"**Objective: p99 ≤ {obj:g} ms**, {why}: a scoring call sits inside a search request's budget; where "
           "one batch takes longer, a call may find its lane busy and then run.", ""]
    body = []
    for r in rows:
        if r["system"] == "raw":
            again = raw.get("after_samples_per_s")
            body.append([f"raw engine, ORT alone (batch {raw['batch_size']}, median of {raw['rounds']} run(s)"
                         + (f"; {num(again)}/s after the servers)" if again is not None else ")"),
                         f"{num(r['max_rate'])}/s", ratio(1.0), ratio(r["vs_ray"]), "–", "–", "–", "–"])
            continue
        bad = "" if r["fixed_ok"] in (None, True) else " ✗"
        procs = f" ({r['procs']} processes, PSS {mib(r['pss'], False)})" if (r["procs"] or 1) > 1 else ""
        body.append([label(r["system"], sv[r["system"]]["config"]),
                     f"{num(r['max_rate'])}/s" + ("" if r["bracketed"] else " (≥: no failing rate above it)"),
                     ratio(r["vs_raw"]), ratio(r["vs_ray"]), ms(r["p50"]) + bad, ms(r["p99"]) + bad,
                     num(r["cpu"], 2), mib(r["rss"], False) + procs])
    out += table(["system", f"max throughput, p99 ≤ {obj:g} ms", "× raw engine", "× Ray Serve", f"p50 at {rate}/s",
                  f"p99 at {rate}/s", f"CPU at {rate}/s (cores)", "RSS (MiB)"], body)
    if results.get("transport"):
        out += ["", _transport(results["transport"], next((r["vs_raw"] for r in rows if r["system"] == "service"),
                                                           None))]
    ray_name, ray_max = best_ray(results)
    if ray_name is not None:
        out += ["", f"× Ray Serve divides by the best Ray Serve configuration measured: "
                f"{label(ray_name, sv.get('ray', {}).get('config'))}, {num(ray_max)}/s."]
    if results.get("ray_variants"):
        rays = {n: s for n, s in swept(results).items() if n.split(":")[0] == "ray"}
        out += ["", "Ray Serve batching settings (max throughput sweep only):", ""]
        out += table(["configuration", f"max throughput, p99 ≤ {obj:g} ms", "p99 at that rate",
                      "most completed at any step"],
                     [[label(n, s["config"]), f"{num(max_rate(s['sweep']))}/s", ms(s["sweep"]["p99_at_max_ms"]),
                       f"{num(s['sweep']['saturation_rate'])}/s"] for n, s in rays.items()])
    out += [f"\n**{label(n)} was not measured**: {err}" for n, err in (results.get("not_measured") or {}).items()]
    out += ["", "Targets:", ""]
    for t in targets(results):
        shown = ratio(t["value"]) if "Ray" in t["target"] else pct(t["value"])
        out.append(f"- {t['target']}: {shown}: {verdict(t['met'])}")
    failed = [label(n) for n, s in sv.items() if not s.get("fixed", {}).get("sustainable", True)]
    if failed:
        out.append(f"- ✗ at the fixed load: {', '.join(failed)} had failed calls or a p99 over the objective.")
    out += ["", "### How each system ran", ""]
    if "naive" in sv:
        out.append(f"- **Naive gRPC server** (`bench/peers/naive_server.py`): `ThreadPoolExecutor("
                   f"{sv['naive']['config']['workers']})`, one session run per call, no batching.")
    if "ray" in sv:
        c = sv["ray"]["config"]
        out.append(f"- **Ray Serve {c['ray']}** (`bench/peers/ray_peer.py`): gRPC proxy → {c['replicas']} "
                   f"replica(s) of {c.get('threads', 2)} ORT thread(s), `@serve.batch` (max_batch_size "
                   f"{c['max_batch_size']}, wait {c['batch_wait_timeout_ms']:g} ms), `max_ongoing_requests` "
                   f"{c['max_ongoing_requests']}, `num_cpus={c['num_cpus']}`; memory sums all of Ray's processes.")
    if "mlserver" in sv:
        c = sv["mlserver"]["config"]
        out.append(f"- **MLServer {c['mlserver']}** (`bench/peers/mlserver_peer.py`, its own environment): Open "
                   "Inference Protocol gRPC (`ModelInfer`, the ScoreRequest in a BYTES tensor, the ScoreResponse "
                   f"back in one) → adaptive batching (max_batch_size {c['max_batch_size']}, max_batch_time "
                   f"{c['max_batch_time_ms']:g} ms) in the main process → {c['parallel_workers']} inference "
                   f"process(es) of {c['threads']} ORT thread(s).")
    if "litserve" in sv:
        c = sv["litserve"]["config"]
        out.append(f"- **LitServe {c['litserve']}** (`bench/peers/litserve_peer.py`): HTTP/1.1 `POST /predict`, "
                   f"JSON both ways (LitServe has no gRPC; the generator drives it through `bench.kit.http_channel`) "
                   f"→ {c['num_api_servers']} uvicorn process(es) → LitServe's batching (max_batch_size "
                   f"{c['max_batch_size']}, batch_timeout {c['batch_timeout_ms']:g} ms) → {c['workers']} inference "
                   f"process(es) of {c['threads']} ORT thread(s)"
                   + (", ZeroMQ queues." if c.get("fast_queue") else ", multiprocessing queues."))
    if "service" in sv:
        out.append(f"- **This service**: `python -m server {' '.join(sv['service']['config']['flags'])}`.")
    out.append("- The peers' sessions are the raw engine's (`bench.kit.engine.load_engine`); this service builds "
               "its own (`server/runtime.py`).")
    fixed_how = "the given rate" if a["fixed_rate"] else f"{a['fixed_fraction']:.0%} of the lowest max"
    floor = results.get("transport") and "error" not in results["transport"]
    out += ["", "### Method", "",
            f"1. **Raw engine**: length-grouped batches of {a['batch_sizes']}, {a['engine_rounds']} interleaved "
            f"rounds of ≥ {a['engine_min_s']:g} s; the best median is the ceiling.",
            f"2. **Max throughput** (`loadtest.sweep.find_max_rate`): {a['step_s']:g} s steps from "
            f"{a['start_fraction']:.0%} of the raw engine, doubling, then {a['refine']} bisections; a step counts "
            f"when every call succeeded (deadline {a['timeout_s']:g} s), ≥ 95% was achieved and p99 ≤ {obj:g} ms; "
            "each step starts once the server's processes are idle (MLServer and LitServe go on computing calls "
            "whose clients gave up, which would otherwise load the next step: `idle_wait_s` in results.json).",
            f"3. **Fixed load**: {fixed_how} ({rate}/s) for {a['fixed_s']:g} s; CPU and memory (RSS, PSS) of the "
            "server's whole process tree. Servers are swept one after another (the earlier ones left up, idle; Ray "
            "last), then each is measured at the fixed load and stopped, newest first; leftover processes ended.",
            *([f"4. **Transport floor** (first): the canned server at {TARGET_RAW:.0%} of the raw engine, "
               f"{4 * a['engine_min_s']:g} s alone, then {2 * a['engine_min_s']:g} s raw-engine probes: three "
               "alone, two under that load, interleaved; share = loaded mean / alone mean."] if floor else []), ""]
    if png:
        out += [f"![Peers: max throughput and p99 by offered load](docs/bench/{png})", ""]
    out += ["### Sweep steps", ""]
    out += table(["system", "offered/s", "achieved/s", "p50", "p99", "failed", "verdict"],
                 [[label(n), num(st["offered_rate"]), num(st["achieved_rate"]), ms(st["latency"]["p50_ms"]),
                   ms(st["latency"]["p99_ms"]), ", ".join(f"{k} {v}" for k, v in st["failures"].items()) or "0",
                   st["verdict"]] for n, s in swept(results).items() for st in s["sweep"]["steps"]], "lrrrrll")
    out += ["", "Reproduce: `make bench` (or `python -m bench.compare --model-repo model_repo --out bench_out`; "
            "`--quick` for a smoke run). Every number: `bench_out/compare/results.json`."]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, obj = table_rows(results), results["args"]["p99_objective_ms"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.0), dpi=80)
    bars = ax1.bar([LABELS[r["system"]].replace(" (ORT alone)", "") for r in rows], [r["max_rate"] for r in rows],
                   color=[COLORS[r["system"]] for r in rows])
    ax1.bar_label(bars, [f"{r['max_rate']:.0f}/s" for r in rows], fontsize=8)
    ax1.set(ylabel="requests/s")
    ax1.set_title(f"Max throughput with p99 ≤ {obj:g} ms", fontsize=10)
    ax1.tick_params(axis="x", labelsize=8)
    for name, s in swept(results).items():
        steps = sorted((st for st in s["sweep"]["steps"] if st["latency"]["p99_ms"] is not None),
                       key=lambda st: st["offered_rate"])
        variant = name.startswith("ray:")
        ax2.plot([st["offered_rate"] for st in steps], [st["latency"]["p99_ms"] for st in steps],
                 "o--" if variant else "o-", color=COLORS[name.split(":")[0]], alpha=0.5 if variant else 1.0,
                 label=label(name))
    ax2.axhline(obj, color="red", ls="--", lw=1, label=f"objective {obj:g} ms")
    ax2.axvline(results["raw"]["samples_per_s"], color="tab:gray", ls=":", lw=1, label="raw engine")
    ax2.set(yscale="log", xlabel="offered requests/s", ylabel="p99 latency (ms)")
    ax2.set_title("p99 by offered load (open-loop Poisson)", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
