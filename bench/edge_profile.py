"""Profile the edge as a real process: what it spends per call around the sans-IO core.

Starts the edge as the integration harness does (``python -m e911_sip serve``, the memory
store from a seed file, or Redis mirrored in memory) with ``--lines`` distinct provisioned
lines, drives it with SIPp (``uac_load.xml`` through the edge to ``uas_load.xml`` trunks) at
a fixed rate for a bounded time on 127.0.0.1, and reports:

- **edge CPU µs per call**: utime + stime of the edge's PID from ``/proc/<pid>/stat`` between
  the first and the last call, divided by the calls SIPp completed. Each run has a fresh edge;
  the median of ``--runs`` is printed. The host is shared: compare figures taken minutes
  apart, alternating, never against an old report.
- **the garbage collector**: a ``sitecustomize`` put on the edge's path (bench only, nothing
  in the product) times every collection through ``gc.callbacks`` and writes, at exit, the
  collections per generation, their total (wall and CPU) and their longest pause.
- **where it goes** (``--profile``): one more run with py-spy sampling the edge (``py-spy
  record --format raw``), then the top functions by own samples and by inclusive samples.
  py-spy stops the process for each sample, so that run's µs/call is not counted. With
  ``--native`` py-spy samples C frames too, and the report starts with the samples by area:
  the compiled modules, each libc call (the syscalls), uvloop, Python by file.
- **the role**: ``--role`` as ``run_load.py`` deploys each store unless given (``redis``: the
  edge alone, ``--role edge``; ``memory``: the embedded box, ``--role all``, which also runs
  the notifier and provisioning).

Each caller is a different line (SIPp's injection file, sequential): one caller would
measure a cache. Runs are short (``--duration`` ≤ 30 s); the machine is shared.

    PYTHONPATH=src python bench/edge_profile.py                       # 3 x 10 s at 200 calls/s
    PYTHONPATH=src python bench/edge_profile.py --profile --runs 1
    PYTHONPATH=src python bench/edge_profile.py --store redis --kind passthrough --rate 300

Needs ``sipp`` and, for ``--profile``, ``py-spy`` (``pip install py-spy``); for ``--store
redis`` also ``redis-server``. Output under ``bench/results/profile-<time>/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.run_load import EDGE_ROLES, BenchSipp  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    PACKAGE_ROOT,
    SCENARIO_DIR,
    EdgeProcess,
    HarnessError,
    RedisServer,
    _stop_process,
    edge_config,
    free_port,
    free_port_pair,
    trunk_uri,
)

from e911_sip import build as edge_build  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FIRST_LINE = 3_215_500_000
PROVIDER_ENDPOINT = "5555555/e911abc123def456"
SERVICES = {"emergency": "911", "passthrough": "2125550100"}
HOLD_MS = 100
MAX_DURATION = 30.0
SIPP_MARGIN = 20.0

# Imported by the edge at start-up (``sitecustomize`` on its PYTHONPATH): every collection
# timed, the figures written when the process exits.
GC_PROBE = """
import atexit, gc, json, os, time

_out = os.environ["EDGE_PROFILE_GC_FILE"]
_stats = {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "max_pause": 0.0,
          "cpu_seconds": 0.0, "max_cpu_pause": 0.0, "collected": 0, "pauses": []}
_started = [0.0, 0.0]

def _probe(phase, info):
    if phase == "start":
        _started[0] = time.perf_counter()
        _started[1] = time.thread_time()
        return
    pause = time.perf_counter() - _started[0]
    cpu = time.thread_time() - _started[1]
    _stats["cpu_seconds"] += cpu
    if cpu > _stats["max_cpu_pause"]:
        _stats["max_cpu_pause"] = cpu
    generation = info["generation"]
    _stats["collections"][generation] += 1
    _stats["seconds"][generation] += pause
    _stats["collected"] += info["collected"]
    # (ended at, on the host's monotonic clock; wall; CPU): the report keeps those of the run.
    _stats["pauses"].append((time.monotonic(), pause, cpu))
    if pause > _stats["max_pause"]:
        _stats["max_pause"] = pause

gc.callbacks.append(_probe)

@atexit.register
def _write():
    with open(_out, "w") as f:
        json.dump(_stats, f)
"""


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid``, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def host_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, for the share other work took meanwhile."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def lines(count: int) -> list[str]:
    return [str(FIRST_LINE + i) for i in range(count)]


def caller_scenario(workdir: Path) -> Path:
    """``uac_load.xml`` with the caller taken from the injection file, one line per call."""
    text = (SCENARIO_DIR / "uac_load.xml").read_text()
    path = workdir / "uac_load_lines.xml"
    path.write_text(text.replace("[caller]", "[field0]"))
    return path


def injection_file(workdir: Path, callers: list[str]) -> Path:
    path = workdir / "callers.csv"
    path.write_text("SEQUENTIAL\n" + "".join(f"{c};\n" for c in callers))
    return path


@dataclass
class Run:
    calls: int
    successful: int
    failed: int
    retransmissions: int
    edge_cpu: float
    edge_system: float
    """The part of ``edge_cpu`` spent in the kernel (sendto and recvfrom, mostly)."""
    wall: float
    host_busy_pct: float
    gc: dict[str, Any] | None = None
    calls_from: float = 0.0
    calls_to: float = 0.0
    """When SIPp started and ended, on the host's monotonic clock (the probe's too)."""

    def pauses_during_calls(self) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each collection that ended while the calls ran: the
        start-up collections over the whole imported heap are not the call path's."""
        if self.gc is None:
            return []
        return [
            (wall, cpu)
            for ended, wall, cpu in self.gc.get("pauses", [])
            if self.calls_from <= ended <= self.calls_to
        ]

    @property
    def us_per_call(self) -> float:
        return 1e6 * self.edge_cpu / max(1, self.successful)

    @property
    def system_us_per_call(self) -> float:
        return 1e6 * self.edge_system / max(1, self.successful)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.callers = lines(args.lines)
        self.redis: RedisServer | None = None
        self.seed = workdir / "locations.json"
        self.scenario = caller_scenario(workdir)
        self.inject = injection_file(workdir, self.callers)
        self.runs = 0
        self.role: str = args.role or EDGE_ROLES[args.store]

    def __enter__(self) -> Bench:
        if self.args.store == "redis":
            self.redis = RedisServer(self.workdir)
            self.redis.start()
            client = self.redis.client()
            pipe = client.pipeline(transaction=False)
            for caller in self.callers:
                pipe.hset(f"e911:line:{caller}", "provider_endpoint", PROVIDER_ENDPOINT)
            pipe.execute()
        else:
            records = {c: {"provider_endpoint": PROVIDER_ENDPOINT} for c in self.callers}
            self.seed.write_text(json.dumps(records))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.redis is not None:
            self.redis.stop()

    def config(self, emergency_port: int, default_port: int) -> dict[str, object]:
        common: dict[str, object] = {
            "sip_port": free_port_pair(),
            "http_port": free_port("tcp"),
            "emergency_trunks": [trunk_uri(emergency_port)],
            "default_trunks": [trunk_uri(default_port)],
            "log": {"level": self.args.log_level},
        }
        if self.redis is not None:
            return edge_config(store_url=self.redis.url, **common)  # type: ignore[arg-type]
        return edge_config(seed_file=self.seed, **common)  # type: ignore[arg-type]

    def run(self, *, profile: bool) -> tuple[Run, Path | None]:
        self.runs += 1
        args = self.args
        rundir = self.workdir / f"{self.runs:02d}{'-profile' if profile else ''}"
        rundir.mkdir()
        calls = max(1, round(args.rate * args.duration))
        timeout = args.duration + HOLD_MS / 1000 + SIPP_MARGIN
        sipp = BenchSipp(rundir)
        edge: EdgeProcess | None = None
        spy: subprocess.Popen[bytes] | None = None
        raw = rundir / "py-spy.txt"
        try:
            ports = [free_port("udp"), free_port("udp")]
            while ports[1] == ports[0]:
                ports[1] = free_port("udp")
            trunks = {
                name: sipp.uas("uas_load", port=port, calls=calls, timeout=timeout + SIPP_MARGIN)
                for name, port in zip(("emergency", "passthrough"), ports, strict=True)
            }
            probe = rundir / "gcprobe"
            probe.mkdir()
            (probe / "sitecustomize.py").write_text(GC_PROBE)
            gc_file = rundir / "gc.json"
            env = {
                "PYTHONPATH": f"{probe}{os.pathsep}{PACKAGE_ROOT}",
                "EDGE_PROFILE_GC_FILE": str(gc_file),
            }
            edge = EdgeProcess(
                rundir,
                self.config(ports[0], ports[1]),
                command=[
                    sys.executable,
                    "-m",
                    "e911_sip",
                    "serve",
                    "--role",
                    self.role,
                    "--config",
                    "{config}",
                ],
                env=env,
            )
            edge.start()
            assert edge.pid is not None
            if profile:
                spy = subprocess.Popen(
                    [
                        str(shutil.which("py-spy")),
                        "record",
                        *(["--native"] if args.native else []),
                        "--pid",
                        str(edge.pid),
                        "--format",
                        "raw",
                        "--rate",
                        str(args.sample_rate),
                        "--output",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=open(rundir / "py-spy.log", "wb"),  # noqa: SIM115
                )
            busy0 = host_busy()
            cpu0 = cpu_seconds(edge.pid)
            started = time.monotonic()
            uac = sipp.start_uac(
                str(self.scenario),
                edge.sip_target,
                service=SERVICES[args.kind],
                keys={"hold_ms": str(HOLD_MS)},
                calls=calls,
                rate=args.rate,
                timeout=timeout,
                extra=["-inf", str(self.inject), "-l", str(max(100, int(args.rate)))],
            )
            result = uac.wait(timeout=timeout + 15.0)
            cpu1 = cpu_seconds(edge.pid)
            wall = time.monotonic() - started
            busy1 = host_busy()
            trunks[args.kind].wait(timeout=5.0)
        finally:
            if spy is not None:
                # py-spy writes its file on SIGINT.
                spy.send_signal(2)
                try:
                    spy.wait(timeout=15.0)
                except subprocess.TimeoutExpired:
                    _stop_process(spy, 1.0)
            sipp.close()
            if edge is not None:
                # A second signal skips the drain (dialogs SIPp left unfinished would hold
                # it), and the process still exits normally: the GC probe writes its file.
                with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
                    edge.signal(signal.SIGTERM)
                    time.sleep(0.2)
                    edge.signal(signal.SIGTERM)
                    edge.wait(timeout=10.0)
                edge.stop()
        if not result.ok:
            print(f"  SIPp caller failed:\n{result.summary()}", flush=True)
        share = 100.0 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
        run = Run(
            calls=calls,
            successful=result.successful,
            failed=result.failed,
            retransmissions=result.retransmissions,
            edge_cpu=sum(cpu1) - sum(cpu0),
            edge_system=cpu1[1] - cpu0[1],
            wall=wall,
            host_busy_pct=share,
            gc=json.loads(gc_file.read_text()) if gc_file.exists() else None,
            calls_from=started,
            calls_to=started + wall,
        )
        return run, raw if profile else None


_COMPILED_FRAME = ("CPy", "__native")


def by_area(raw: Path) -> str:
    """Own samples grouped by where the CPU went, from a ``--native`` run's stacks: in a
    libc call (the syscalls, whoever made them), inside the compiled modules (with the other
    C they call), in uvloop,
    as Python in each file, or as other C called from Python in each file."""
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        python = [i for i, frame in enumerate(frames) if ".py:" in frame]
        below = frames[python[-1] + 1 :] if python else frames
        leaf = frames[-1]
        caller = frames[python[-1]] if python else ""
        where = caller.partition(" (")[2].split(":")[0].rsplit("/", 2)[-2:]
        file = "/".join(where) if caller else "?"
        if "libc" in leaf:
            # A syscall, whether Python or a compiled module made it.
            areas[f"libc: {leaf.partition(' ')[0]}"] += count
        elif any(marker in frame for frame in below for marker in _COMPILED_FRAME):
            areas["compiled modules (and the C they call)"] += count
        elif not below:
            areas[f"Python: {file}"] += count
        elif any(marker in frame for frame in below for marker in ("loop.c", "uv_", "uv__")):
            areas["uvloop"] += count
        else:
            areas[f"C under Python: {file}"] += count
    out = [f"{total} samples by area (own)", ""]
    out += [f"{100 * n / max(1, total):5.1f}  {name}" for name, n in areas.most_common(40)]
    return "\n".join(out)


def top_functions(raw: Path, limit: int) -> str:
    """Own and inclusive samples per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += count
    out = [f"{total} samples (busy only)", "", "own %  function"]
    out += [f"{100 * n / total:5.1f}  {name}" for name, n in own.most_common(limit)]
    out += ["", "incl % function"]
    out += [f"{100 * n / total:5.1f}  {name}" for name, n in inclusive.most_common(limit)]
    return "\n".join(out)


def _short(frame: str) -> str:
    # "name (path/to/file.py:123)" -> "name (file.py:123)"; the line says which one it is.
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of calls, ≤ 30")
    parser.add_argument("--runs", type=int, default=3, help="measured runs (median reported)")
    parser.add_argument("--lines", type=int, default=5000, help="distinct provisioned callers")
    parser.add_argument("--store", choices=("memory", "redis"), default="memory")
    parser.add_argument("--kind", choices=tuple(SERVICES), default="emergency")
    parser.add_argument("--profile", action="store_true", help="one more run under py-spy")
    parser.add_argument(
        "--native",
        action="store_true",
        help="with --profile: py-spy --native (C frames too: the compiled modules, syscalls)",
    )
    parser.add_argument(
        "--role",
        choices=("edge", "all"),
        help="the edge's --role (default: as run_load.py deploys the store: redis -> edge, "
        "memory -> all)",
    )
    parser.add_argument("--sample-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--log-level", default="INFO", help="the edge's [log] level")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}]")
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = RESULTS_DIR / f"profile-{stamp}"
    workdir.mkdir(parents=True)
    print(
        f"edge {args.kind}, {args.store} store, {args.lines} lines, {args.rate:g} calls/s x "
        f"{args.duration:g} s; load average {os.getloadavg()[0]:.2f}; {workdir}\n"
        f"  build: {edge_build.describe()} ({PACKAGE_ROOT})",
        flush=True,
    )
    figures: list[float] = []
    with Bench(args, workdir) as bench:
        for _ in range(args.runs):
            run, _raw = bench.run(profile=False)
            figures.append(run.us_per_call)
            print(
                f"  run: {run.successful}/{run.calls} calls ok, {run.failed} failed, "
                f"{run.retransmissions} retransmissions; edge {run.edge_cpu:.2f} s CPU = "
                f"{run.us_per_call:.0f} µs/call ({run.system_us_per_call:.0f} in the kernel); "
                f"host busy {run.host_busy_pct:.0f} %",
                flush=True,
            )
            if run.gc is not None:
                gc_stats = run.gc
                print(
                    f"    gc (whole process life): collections by generation "
                    f"{gc_stats['collections']}, {sum(gc_stats['seconds']):.3f} s in all "
                    f"{[round(x, 3) for x in gc_stats['seconds']]} "
                    f"({gc_stats['cpu_seconds']:.3f} s CPU), longest pause "
                    f"{1000 * gc_stats['max_pause']:.1f} ms "
                    f"({1000 * gc_stats['max_cpu_pause']:.1f} ms CPU), {gc_stats['collected']} "
                    "objects collected",
                    flush=True,
                )
                during = run.pauses_during_calls()
                if during:
                    cpu_ms = sorted(1000 * c for _, c in during)
                    wall_ms = sorted(1000 * w for w, _ in during)
                    print(
                        f"    gc while the calls ran: {len(during)} collections, "
                        f"{sum(cpu_ms):.0f} ms CPU in all ({sum(cpu_ms) / run.calls * 1000:.0f} "
                        f"µs/call); pause median {statistics.median(wall_ms):.2f} ms "
                        f"({statistics.median(cpu_ms):.2f} ms CPU), longest {wall_ms[-1]:.2f} ms "
                        f"({cpu_ms[-1]:.2f} ms CPU)",
                        flush=True,
                    )
        if figures:
            print(
                f"edge CPU per call, median of {len(figures)}: {statistics.median(figures):.0f} µs"
            )
        if args.profile:
            run, raw = bench.run(profile=True)
            print(f"  profiled run: {run.successful}/{run.calls} calls ok (µs/call not counted)")
            if raw is not None and raw.exists():
                report = top_functions(raw, args.top)
                if args.native:
                    report = f"{by_area(raw)}\n\n{report}"
                (workdir / "top.txt").write_text(report + "\n")
                print(report)
            else:
                print(f"  py-spy wrote nothing; see {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
