"""The run that `bench.overload`, `bench.swaps` and `bench.soak` share: the real server on a throw-away repository with
the throughput flags, the sustainable rate (`rates.obtain_rate`), open-loop segments with the server sampled and hot
swaps on a schedule (`Sustained.load`), then results.json, the timeline plot and the section (`Sustained.publish`).
A scenario brings its plan and its judgement (`check`); its report builds on `section` and `targets`."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from bench.kit.cli import Progress, logger, throughput_flags
from bench.kit.data import Workload, load_requests
from bench.kit.fmt import table, verdict
from bench.kit.machine import machine, machine_line
from bench.kit.publish import publish
from bench.kit.rates import obtain_rate, rate_sentence
from bench.kit.scrape import per_version
from bench.kit.server import ServerProcess, ServerSpec, serving
from bench.kit.swap import Swap, hot_swap, temp_repo
from bench.kit.timeline import Calls, Sample, Segment, chunk_line, plot_timeline, run_segments, sample


@dataclass
class Sustained:
    """One run: what `sustained` set up, then what `load` saw."""

    args: argparse.Namespace
    name: str
    log: Progress
    src: Path
    work: Workload
    flags: list[str]  # as the server ran: the throughput flags and --poll-interval-s
    server: ServerProcess
    rate: dict[str, Any]
    machine: dict[str, Any]  # at the start
    sample_s: float = 0.5
    swaps: list[Swap] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    alive: bool = True  # the server, once the load is over
    answered: dict[int, float] = field(default_factory=dict)  # items scored during the load, by version
    after: dict[str, float] = field(default_factory=dict)  # /metrics after the load

    async def load(self, segments: Sequence[Segment], *, chunk_s: float = 5.0, sample_s: float = 0.5,
                   swap_at: Sequence[float] = (), hold_s: float = 2.0) -> Calls:
        """`segments` of open-loop load from half a second from now, the server sampled every `sample_s`, and a hot
        swap (the next version, the same bytes) at each of `swap_at` (s from the start; never before the previous
        one is over, none after a failed one). The load lasts as planned and at least `hold_s` after the last swap."""
        before, t0, self.sample_s = await self.server.ascrape(), time.perf_counter() + 0.5, sample_s
        sampler = asyncio.get_running_loop().create_task(sample(self.server, t0, sample_s, self.samples))
        stop, planned = asyncio.Event(), sum(s.seconds for s in segments)

        async def swapper() -> None:
            version = int(self.src.name)
            for at in swap_at:
                await asyncio.sleep(max(t0 + at - time.perf_counter(), 0.0))
                self.swaps.append(sw := await hot_swap(self.server, self.src, version + 1, version, t0))
                self.log(f"swap v{sw.version}: {sw.failed or sw.phases()}")
                if sw.failed:
                    break
                version += 1
            end = max([planned] + [sw.end_t + hold_s for sw in self.swaps[-1:]])
            await asyncio.sleep(max(t0 + end - 0.1 - time.perf_counter(), 0.0))  # before the next chunk's slot
            stop.set()  # the chunks after `planned` (a late swap's extra time) that have not started are skipped

        late = replace(segments[-1], seconds=60.0 * len(swap_at) + 60.0)  # room for late swaps
        async with grpc.aio.insecure_channel(self.server.target) as channel:
            calls, _ = await asyncio.gather(run_segments(
                channel, self.work.requests, [*segments, late], t0=t0, chunk_s=chunk_s, timeout_s=self.args.timeout_s,
                seed=self.args.seed, stop=stop, on_chunk=lambda seg, start, res: self.log(
                    chunk_line(seg, start, res, self.samples))), swapper())
        await asyncio.sleep(1.0)  # one more sample after the last answer
        sampler.cancel()
        self.alive = self.server.proc.poll() is None
        self.after = await self.server.ascrape() if self.alive else {}
        pv_before = per_version(before, "model_pv_total")
        self.answered = {v: n - pv_before.get(v, 0.0) for v, n in per_version(self.after, "model_pv_total").items()
                         if n - pv_before.get(v, 0.0) > 0}
        return calls

    def publish(self, calls: Calls, results: dict[str, Any], markdown: Callable[[dict[str, Any]], str], title: str,
                **plot: Any) -> dict[str, Any]:
        """results.json (the scenario's `results` with the rate, data, flags and samples), <name>.png and the
        section (`markdown` of those results), printed and published."""
        r = {"machine": self.machine, "args": vars(self.args), "rate": self.rate, "data": self.work.source,
             "server_flags": self.flags, "sample_s": self.sample_s, **results,
             "swaps": [sw.to_json() for sw in self.swaps], "samples": [vars(s) for s in self.samples]}
        png = plot_timeline(calls, self.samples, self.args.out / self.name / f"{self.name}.png", title,
                            swaps=self.swaps, **plot)
        r["plot"] = str(png)
        publish(self.args, self.name, r, markdown(r), [png], self.log)
        return r


@asynccontextmanager
async def sustained(args: argparse.Namespace, name: str, *, poll_interval_s: float = 0.0,
                    log_level: str = "WARNING") -> AsyncIterator[Sustained]:
    """The server (`--log-level INFO` for swaps: the lifecycle log) on a throw-away copy of the newest version, and
    the sustainable rate; the server is stopped and the copy removed on exit."""
    log, started = logger(name), machine()
    with temp_repo(args.model_repo, args.model, args.out / name) as (root, src):
        work = load_requests(src, args.data)
        log(f"data: {work.source}: {work.pairs} pairs; model {args.model}/{src.name} (hard-linked into {root})")
        flags = throughput_flags(args)
        ran = [*flags, "--poll-interval-s", f"{poll_interval_s:g}"]
        spec = ServerSpec(root, extra=[*ran, "--log-level", log_level], log_path=args.out / name / "server.log")
        async with serving(spec, log) as server:
            rate = await obtain_rate(server, work.requests, args, flags, log)
            yield Sustained(args, name, log, src, work, ran, server, rate, started)


def check(what: str, value: str, target: str, met: bool | None) -> dict[str, Any]:
    """A target with its measured value; `met` is None when it could not be measured."""
    return {"what": what, "value": value, "target": target, "met": met}


def targets(checks: Sequence[dict[str, Any]]) -> list[str]:
    """The targets table and how many were met."""
    unmet = [c["what"] for c in checks if c["met"] is False]
    return [*table(["target", "measured", "bound", ""], [[c["what"], c["value"], c["target"], "not measured"
                                                          if c["met"] is None else verdict(c["met"])] for c in checks],
                   "llll"), "", f"**{len(checks) - len(unmet)} of {len(checks)} targets met**"
            + (f"; not met: {'; '.join(unmet)}." if unmet else ".")]


def section(r: dict[str, Any], name: str, title: str, intro: str, body: Sequence[str], alt: str,
            flags: str = "") -> str:
    """A sustained-load section: what ran, the server and its load, the machine, the rate, `body`, the figure."""
    a = r["args"]
    return "\n".join([
        f"## {title} (`python -m bench.{name}`)", "",
        f"{intro} The real server (`python -m server {' '.join(r['server_flags'])}`) under open-loop Poisson load "
        f"(`loadtest.openloop`: latency from the scheduled send, deadline {a['timeout_s']:g} s); RSS and CPU from "
        f"/proc, queue depth and serving version from /metrics, every {r['sample_s']:g} s.", "",
        machine_line(r["machine"]), f"Sustainable rate: {rate_sentence(r['rate'])}. Data: {r['data']}.", "",
        *body, "", f"![{alt}](docs/bench/{name}.png)", "",
        f"Reproduce: `python -m bench.{name} --model-repo model_repo --out bench_out{flags}` (results in "
        f"`bench_out/{name}/results.json`)."]) + "\n"
