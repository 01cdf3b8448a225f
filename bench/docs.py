"""BENCHMARKS.md: the machine, how to reproduce, the measured tables, the plots and what they mean."""

from __future__ import annotations

from typing import Any

from bench.report import TARGET_RATIO


def _interpretation(results: dict[str, Any]) -> list[str]:
    """Sentences that follow from this run's numbers; a claim is only made when its numbers support it."""
    an = results.get("analysis")
    sb = results.get("server_batched")
    if not an or not sb:
        return []
    sat, f = an["saturation"], an["saturation"]["factors"]
    sus = an["sustained"]
    limit = an["limit"]
    ratio = sb["max_sustained_ratio"]
    out = ["## What the numbers say", ""]
    verdict = "meets" if ratio >= TARGET_RATIO else "is below"
    out.append(f"- **The server's max sustained throughput is {ratio:.0%} of the raw engine's best fp32 throughput "
               f"({sb['max_sustained_rate']:.1f} of {limit:.1f}/s), so it {verdict} the {TARGET_RATIO:.0%} "
               f"target.** Overloaded, it completed at most {sat['achieved_rate']:.1f}/s "
               f"({sat['ratio']:.0%}), with failures.")
    e = results["engine"]["best"]["fp32"]
    if e["peak_samples_per_s"] > 1.3 * limit:
        out.append(f"- The raw engine itself is noisy here: the fastest single run ({e['peak_samples_per_s']:.0f}/s "
                   f"at batch {e['peak_batch_size']}) is {e['peak_samples_per_s'] / limit:.1f}× the median limit. "
                   "Large batches vary the most, with no other process visible in this machine, so the cause is "
                   "likely contention on the physical host. The limit is therefore the median of interleaved runs; "
                   "the `raw probe/s` column tracks the drift during the server steps.")
    dip = sus.get("dip_step")
    g1 = an.get("batch1")
    if dip and g1 and sat["engine_items_per_busy_s"]:
        d = dip["server"]
        e_dip = d["engine_items_per_busy_s"] or 0.0
        if e_dip < 0.85 * min(sat["engine_items_per_busy_s"], g1):
            out.append(
                f"- **Mid-load batches are the weak spot.** At {dip['fraction']:.0%} of the limit the engine was "
                f"busy {d['engine_busy_fraction']:.0%} of the time on batches of {d['mean_batch_size']:.0f} items with "
                f"{d['mean_padding_ratio']:.0%} padding, and finished only {e_dip:.0f} items per busy second, "
                f"fewer than at batch 1 (raw {g1:.0f}/s) and fewer than at saturation "
                f"({sat['engine_items_per_busy_s']:.0f}/s). While the queue fits in one batch "
                "(`--max-batch-size` items, `--max-batch-tokens`), `Batcher._take_batch` takes all of it in "
                "arrival order, so each batch is padded to its longest item (real lengths: mean ~33 tokens, "
                "p99 ~82, max 128; a padded token costs a CPU as much as a real one). Only when the queue is "
                "deeper than one batch does it group by length, which is why throughput recovers at saturation, "
                "but by then calls wait seconds. Throughput therefore falls just when load rises: a queue that "
                "starts to grow makes the engine slower, and the server tips from milliseconds to seconds "
                f"between {sus['max_sustained_rate']:.0f}/s and {sat['achieved_rate']:.0f}/s.")
    if f["batch_size"] < 0.9:
        out.append(f"- **At saturation the batches are too big for this CPU** (factor {f['batch_size']:.2f}): they "
                   f"averaged {sat['mean_batch_size']:.0f} items, where the raw engine does "
                   f"{sat['offline_grouped_rate_at_batch']:.0f}/s against {limit:.0f}/s at batch {e['batch_size']}. "
                   "The defaults (`--max-batch-size 64`, `--max-batch-tokens 8192`) suit a GPU; on this CPU, fp32 "
                   "throughput peaks at small batches and falls beyond them (section 3).")
    if f["padding"] < 0.9:
        out.append(f"- At saturation, padding still costs a factor {f['padding']:.2f} "
                   f"({sat['server_padding_ratio']:.0%} vs {sat['offline_grouped_padding_at_batch']:.0%} "
                   "for length-grouped batches of that size).")
    if f["engine_in_server"] < 0.85:
        out.append(f"- The engine ran slower inside the server than alone (factor {f['engine_in_server']:.2f}): "
                   "ONNX Runtime's two intra-op threads share the 2 cores with the event loop, gRPC's threads and "
                   "the load generator, and a parallel section waits for its slowest thread.")
    else:
        out.append(f"- The engine is not slower inside the server (factor {f['engine_in_server']:.2f} at "
                   "saturation, against the offline median): thread contention is not where the time goes.")
    out.append(f"- Python work per call is small: the server's event loop (gRPC, decoding, tokenizing, batching, "
               f"metrics) used {sat['event_loop_cores']:.2f} cores at saturation, about "
               f"{sat['event_loop_ms_per_call'] or 0:.2f} ms per call; the load generator "
               f"{sat['generator_ms_per_call'] or 0:.2f} ms per call.")
    variants = [w for w in results.get("server_what_if") or [] if w["flags"]]
    if variants:
        parts = [f"`{w['flags']}` at {w['fraction']:.0%}: {w['achieved_rate']:.0f}/s, p99 "
                 f"{w['latency']['p99_ms'] or float('nan'):.0f} ms, batches of "
                 f"{w['server']['mean_batch_size'] or 0:.0f} with {w['server']['mean_padding_ratio'] or 0:.0%} padding"
                 f"{'' if w['sustainable'] else ' (not sustainable)'}" for w in variants]
        out.append("- Server flags only (no code change), same offered loads: " + "; ".join(parts) + ". Smaller "
                   "batch or token limits make `_take_batch` group by length at a shorter queue.")
    u = an.get("unbatched")
    su = results.get("server_unbatched")
    if u and su:
        better = su["max_sustained_rate"] > sb["max_sustained_rate"]
        out.append(f"- Batching off sustains {su['max_sustained_rate']:.1f}/s ({su['max_sustained_rate'] / limit:.0%} "
                   f"of the limit; the raw engine at batch 1 does {u['offline_batch1_rate']:.0f}/s)"
                   + (", more than batching on: with FIFO batches, batching costs more in padding than it saves."
                      if better else "."))
    return [*out, ""]


BEGIN = "<!-- BEGIN python -m bench: generated by `make bench`; edits between these markers are overwritten -->"
END = "<!-- END python -m bench -->"




def merge_into(existing: str, block: str) -> str:
    """Replaces this tool's block in BENCHMARKS.md, keeping every other section (other tools write there too).
    Without a block yet, it goes right after the title (a title is added when there is none)."""
    block = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if BEGIN in existing and END in existing:
        head, _, rest = existing.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + block + tail
    body = existing.lstrip("\n")
    if body.startswith("# "):
        title, _, rest = body.partition("\n")
        return f"{title}\n\n{block}\n\n{rest.lstrip(chr(10))}".rstrip() + "\n"
    return f"# Benchmarks\n\n{block}\n" + (f"\n{body}" if body else "")


def _demote(markdown: str) -> str:
    """The summary's ### headings become #### inside BENCHMARKS.md's ### Results."""
    return "\n".join("#" + line if line.startswith("### ") else line for line in markdown.splitlines())


def benchmarks_md(results: dict[str, Any], summary: str, plots: dict[str, str]) -> str:
    """This tool's block of BENCHMARKS.md (see `merge_into`)."""
    m = results["machine"]
    elapsed = results.get("elapsed_s", 0.0)
    lines = [
        "## Serving: raw engine vs the server (`make bench`)",
        "",
        "Every number in this section comes from one run of `make bench` (`python -m bench`). The machines "
        "this project runs on are shared and their speed drifts, so the server is always reported as a ratio "
        "of the raw engine's throughput measured in the same run, and the tables show how much CPU other "
        "processes used meanwhile (`foreign CPU`). CPU only: the CUDA path is not measured here.",
        "",
        "### Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu_model']} ({', '.join(m['cpu_features']) or 'no AVX-512/AMX'}) |",
        f"| cores | {m['usable_cpus']} usable of {m['logical_cpus']} logical |",
        f"| RAM | {m['ram_gib']} GiB |",
        f"| onnxruntime | {m['onnxruntime']} (CPUExecutionProvider) |",
        f"| Python | {m['python']} |",
        f"| OS | {m['os']} |",
        f"| date | {m['date']} |",
        f"| code | {m['git']} |",
        f"| load average at start | {' '.join(m['loadavg_at_start'])} |",
        f"| run time | {elapsed / 60:.1f} min |",
        "",
        "### Reproduce",
        "",
        "```sh",
        "make bench   # builds the demo model if needed; python -m bench --model-repo model_repo --out bench_out",
        "```",
        "",
        "Results: `bench_out/results.json` (every number, per step), `bench_out/summary.md`, the plots and the "
        "server logs. `python -m bench --help` lists the knobs (step length, fractions, flag variants, `--quick`, "
        "`--skip`). The query/title pairs are read from `../shared/data/qbqtc_test_public.jsonl` (never copied "
        "into the repository); without it a synthetic set with the same length profile is used and the tables "
        "say so.",
        "",
        "### Method",
        "",
        "1. **Build**: `python -m tools.build_model --demo --precision int8` into a temporary folder, timed.",
        "2. **Agreement**: fp32 and int8 score the same real pairs (length-grouped batches of 32); Spearman rank "
        "correlation per head, absolute differences over all scores.",
        "3. **Raw engine**: one ONNX Runtime session per variant with the server's options (full graph "
        "optimization, sequential, 2 intra-op threads), fed with `FeatureEncoder` + `pad_batch` output. "
        "*Grouped*: pairs sorted by length and cut into batches (the least padding possible: this is the limit). "
        "*FIFO*: the same pairs in arrival order (what a batcher without length grouping builds). Rounds "
        "interleave all configurations; each reports the median (and range) of its rounds.",
        "4. **Server**: `python -m server --precision fp32 --intra-op-threads 2` as a subprocess (result cache "
        "off, pinned to the measured version), driven by `loadtest.openloop`: Poisson arrivals at a fixed rate, "
        "each call its own task at its scheduled time, latency from the scheduled send time (no coordinated "
        "omission), one gRPC channel, pre-serialized requests. Rates step through fractions of the raw fp32 "
        "limit, then the boundary is bisected; achieved = OK answers per second in the window after the first "
        "20% of the step. Before each step the raw engine is re-measured for 2 s (`raw probe/s`). A step during "
        "which other processes used > 0.3 cores is run again (at most twice per sweep). Batching off "
        "(`--max-batch-size 1`) is stepped in fractions of the raw batch-1 rate. Server-side columns (batch, "
        "padding, engine busy) come from the server's own `/metrics`; CPU from `/proc`.",
        "",
        "### Results",
        "",
        _demote(summary.rstrip()),
        "",
        "### Plots",
        "",
    ]
    for title, name in plots.items():
        lines += [f"![{title}](docs/bench/{name})", ""]
    lines += [_demote("\n".join(_interpretation(results))).replace("## What the numbers say",
                                                                   "### What the numbers say")]
    return "\n".join(lines).rstrip() + "\n"
