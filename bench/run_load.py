"""Load benchmark with real processes on loopback: SIPp caller -> proxy -> SIPp trunk.

The proxy is the edge, or Kamailio 5.6 running ``bench/reference/kamailio.cfg`` (the same job:
record-route, stateful relay, a Redis HGET per 911 call, the same four headers), or both
alternately (``--target edge|kamailio|both``). The edge runs on its location store of choice
(``--store redis|memory|both``): ``edge-redis`` is ``redis://`` with the default ``[store]
mirror = true`` (every record in memory, loaded from the redis-server Kamailio reads),
``edge-memory`` is ``memory://`` seeded from a JSON file with the same records.

Every call comes from its own provisioned line (``bench/callers.py``): ``--lines`` (10,000)
distinct lines ``e911:line:N`` with ``provider_endpoint 777777/probeN``, taken in turn from a
SIPp injection file, the caller written as ``+1N``, ``1N`` or ``N`` in From and in
P-Asserted-Identity (all nine combinations), so a proxy must normalise all three to the
10-digit key. The emergency trunk (``bench/scenarios/uas_load_lines.xml``) checks that each
INVITE carries its own caller's Geolocation and callback; one that does not is a mismatch.

What it measures, each with a fresh proxy process (so one measurement cannot warm up or
poison the next):

1. **Maximum sustained call rate**, for emergency calls (``911``, enriched from the location
   store) and for non-emergency pass-through (``2125550100``, sent to the default trunk; the
   edge's store makes no difference to it, so only the first store is measured). The call
   rate doubles from ``--start-rate`` (Kamailio: ``--kamailio-start-rate``), at most
   ``--max-rate``; each step places ``rate * duration`` calls (``--duration``, 30 s) of
   ``bench/scenarios/uac_load_lines.xml`` (INVITE, 100, 180, 200, ACK, 100 ms hold, BYE,
   200). A step passes when, on SIPp's ``-trace_stat`` counters, every call succeeded with 0
   failed calls and 0 retransmissions on the caller *and* the trunk side and 0 mismatches,
   the calls were completed on time (not held back by the concurrency limit or a backlog),
   and the proxy's own counters agree: the edge's ``/metrics`` shows no failover, fail-open
   or failed call and, for 911, one enriched call per call placed; Kamailio's statistics
   (read with ``kamcmd``) show one enriched call per 911 call and no failed lookup. Between
   the last pass and the first failure, two bisection steps refine the figure; then a long
   run (``--confirm-duration``, 60 s) at the best rate confirms it (if it fails, one at the
   middle of it and the next passing rate below, then one at that rate, until one passes).
   The quoted maximum is the confirmed rate.
2. **Latency added by the proxy, on the wire**, at ``--rates`` (200 calls/s). tcpdump
   captures, on ``lo``, only INVITEs (a BPF test on the first payload bytes) sent to the
   proxy by the caller and to the trunk by the proxy. Pairing them by Call-ID gives in->out
   per call with kernel timestamps, which is the figure comparable between the edge and
   Kamailio (SIPp's own response times come in 4 ms ticks). For the edge, its own
   ``e911_sip_emergency_enrich_seconds`` histogram is read alongside (count and p50/p99
   interpolated inside its buckets): it starts later (after the datagram has been read and
   parsed) and stops earlier (before the send), so it is below the wire figure; far below
   means datagrams wait in the socket buffer (the event loop is behind).
3. **CPU**, from ``/proc/<pid>/stat`` (utime + stime) of the proxy (for Kamailio, the sum of
   all its processes: main, UDP worker, timers, control socket), of every SIPp process, of
   tcpdump and redis-server when they run, as % of one core averaged over the run and the
   busiest one-second interval, plus the whole host's busy and steal share and the CPU of
   every other process on the host (a shared machine has neighbours). On a 2-core box
   the SIPp processes take about a core at high rates: when the host is near 100 % busy, a
   failed step is a limit of the box, not of the proxy. "us/call" is the proxy's CPU time
   divided by calls completed; the report lists the edge's at its maximum, at each latency
   point and in the soak.
4. **Soak** (``--soak``, instead of the above): the edge alone, 911 calls at ``--soak-rate``
   (default half the edge's confirmed 911 maximum in the newest report of
   ``bench/results/``) for ``--soak-duration`` (600 s), its RSS read from
   ``/proc/<pid>/status`` every ``--rss-interval`` (10 s): a table, and flat or not (the
   first minute's peak against the last minute's). ``--heap-probe`` adds, from inside the
   edge (a bench-only ``sitecustomize`` on its path), where the bytes are at each interval:
   glibc's heap in use and free (``mallinfo2``), its mmapped chunks, and Python's allocated
   blocks; heap that is free but not returned is fragmentation, not a container that grows.

How to read it: the machine's speed varies 2-3x over time, so an absolute calls/s figure
means little on its own. With ``--target both`` every measurement is taken for each proxy in
turn before the next one starts, so a change in the host's speed hits all of them, and the
report ends with the ratios edge / Kamailio. The report also records load average, host
busy/steal and a small fixed CPU probe ("speed probe", lower is faster) before and after.

    python bench/run_load.py                 # the edge on both stores: about 15 minutes
    python bench/run_load.py --target both   # and Kamailio, alternating: about 25 minutes
    python bench/run_load.py --quick         # smoke run, 5 s steps
    python bench/run_load.py --soak          # 600 s at half the edge's 911 maximum
    python bench/run_load.py --only emergency --skip-latency --start-rate 500

Results: a markdown report on stdout and in ``bench/results/<timestamp>.md``, the raw
figures in ``bench/results/<timestamp>.json`` and every process's logs (proxy stderr, SIPp
statistics and error logs) in ``bench/results/<timestamp>/``. This is run by hand; it is not
part of the test suite. ``bench/core_bench.py`` measures the sans-IO core's CPU per call
without sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a plain script (``python bench/run_load.py``): the harness and the Kamailio reference
# are imported from the repository, and the edge itself runs from src/ (the harness puts it on
# PYTHONPATH).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.callers import (  # noqa: E402
    CALLER_SCENARIO,
    DEFAULT_LINES,
    EMERGENCY_TRUNK_SCENARIO,
    ENDPOINT_ACCOUNT,
    FIRST_LINE,
    MISMATCH_COLUMNS,
    injection_file,
    line_numbers,
    provision,
    seed_records,
)
from bench.reference import kamailio as reference  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    LOOPBACK,
    PACKAGE_ROOT,
    EdgeProcess,
    HarnessError,
    RedisServer,
    Sipp,
    SippProcess,
    SippResult,
    _poll_until,
    _stop_process,
    edge_config,
    free_port,
    free_port_pair,
    metric_value,
    trunk_uri,
)

from e911_sip import build as edge_build  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_TRUNK_SCENARIO = "uas_load"
HOLD_MS = 100
SERVICES = {"emergency": "911", "passthrough": "2125550100"}
KINDS = tuple(SERVICES)
EDGE_STORES = ("redis", "memory")
# The process each store is deployed as (compose.yaml, README): with Redis, the edge runs on
# its own (``--role edge``: per 911 call it adds a call record and a notification event to
# Redis streams, which the provisioning process consumes elsewhere); memory:// is the
# embedded box, one process that also keeps the records and runs the notifier.
EDGE_ROLES = {"redis": "edge", "memory": "all"}
KAMAILIO = "kamailio"

# SIPp's default socket buffer (64 KiB) overflows on loopback as soon as SIPp is descheduled
# for a few ms at a few thousand messages per second; the drops then show up as
# retransmissions blamed on the proxy. The edge asks for 4 MiB (and the Kamailio config allows
# it as much), so SIPp gets the same.
SIPP_BUFFER = 4 * 1024 * 1024
# Each call lasts ~0.1 s, so ``rate / 10`` calls are up at once; five times that bounds SIPp's
# memory when the proxy stalls, and a step held back by it fails on the "placed on time" check.
CONCURRENCY_FACTOR = 0.5
MIN_CONCURRENCY = 100
MAX_RAMP_STEPS = 12
# Two bisection steps after the ramp: the interval between the last pass and the first failure
# shrinks to a quarter, and a full comparison run stays within about 25 minutes
# (bench/README.md).
BISECT_STEPS = 2
# A best rate that fails its long run gets up to two more (confirm_rates): the middle of it and
# the next passing rate below, then that rate.
CONFIRM_ATTEMPTS = 3
# A step must finish placing its calls within this much more than ``duration`` + hold.
LATE_SLACK_FRACTION = 0.05
LATE_SLACK_MIN_S = 1.0
# Bounds on every wait; the SIPp processes carry their own -timeout as well.
# The caller's -timeout is this much beyond the time a step may take to pass: a step still
# running then has failed already, and waiting longer for its stuck calls would only add to
# the run's wall time (each failing step of a search would cost half a minute more).
SIPP_TIMEOUT_MARGIN_S = 5.0
# The trunks start before the proxy and end when the caller has (TRUNK_DRAIN_S), so a long
# bound of their own costs nothing and covers a slow proxy start.
TRUNK_TIMEOUT_MARGIN_S = 60.0
TRUNK_DRAIN_S = 5.0
PAUSE_BETWEEN_RUNS_S = 1.0
CAPTURE_READY_S = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# First four payload bytes of a request that starts with "INVITE": only those are captured,
# which keeps tcpdump's cost and the pcap small at 1000+ calls/s.
_INVITE_BPF = "udp[8:4] = 0x494e5649"


# ----------------------------------------------------------------------------- results


@dataclass
class CpuUsage:
    """CPU time of one process (or the sum of a group of them) over a run, as % of one core."""

    name: str
    pid: int
    """The first (for Kamailio, the main) process."""
    seconds: float
    mean_pct: float
    peak_pct: float
    pids: list[int] = field(default_factory=list)
    """Every process counted under ``name``."""
    seconds_by_pid: dict[int, float] = field(default_factory=dict)
    """CPU seconds of each process, when ``name`` covers more than one."""


@dataclass
class HostCpu:
    """The whole machine over a run, from /proc/stat: % of all cores."""

    busy_pct: float
    steal_pct: float
    others_pct: float = 0.0
    """CPU used by processes other than the measured ones, % of one core (all cores: N*100)."""


@dataclass
class SippSummary:
    """What one SIPp process reported (its last -trace_stat row and exit code)."""

    role: str
    returncode: int
    successful: int
    failed: int
    retransmissions: int
    timed_out: bool
    out_of_call: int
    dead_call: int
    errors: list[str]
    rundir: str
    received: int = 0
    """Calls this SIPp took in (``IncomingCall(C)``); for a trunk, INVITEs it checked."""
    mismatches: int = 0
    """Calls failed by a check of the scenario (the emergency trunk's: an INVITE without its
    own caller's location or callback)."""


@dataclass
class Histogram:
    """A Prometheus histogram reduced to count and interpolated quantiles, in ms."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class EdgeSummary:
    """The edge's /metrics and log at the end of a run."""

    running_at_end: bool
    outcomes: dict[str, float]
    trunk_failovers: float
    discarded: float
    delivery_failures: float
    enrich: Histogram | None
    log_problems: list[str]
    metrics_error: str | None = None


@dataclass
class KamailioSummary:
    """Kamailio's statistics (``kamcmd stats.get_statistics all``) and log at the end of a run."""

    running_at_end: bool
    enriched: float
    """911 calls that got a Geolocation (``script:e911_enriched``)."""
    unlocated: float
    """911 calls whose line had no location (``script:e911_unlocated``)."""
    store_errors: float
    """Location lookups that failed (``script:e911_store_error``)."""
    processes: dict[int, str]
    """Every PID Kamailio ran as, with its role (``core.psx``)."""
    log_problems: list[str]
    statistics: dict[str, float] = field(default_factory=dict)
    stats_error: str | None = None


@dataclass
class WireLatency:
    """INVITE in -> INVITE out at the proxy, from the capture on lo."""

    captured: bool
    note: str
    invites_in: int = 0
    invites_out: int = 0
    paired: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    dropped_by_kernel: int | None = None
    retransmitted_in: int = 0
    """Calls whose INVITE reached the proxy more than once (the caller retransmitted it)."""
    repeated_out: int = 0
    """Calls whose INVITE the proxy sent to the trunk more than once."""
    new_branch_out: int = 0
    """Calls the proxy sent to the trunk under more than one Via branch."""


@dataclass
class RssSample:
    """The proxy's resident set size at one moment of a run."""

    t_s: float
    """Seconds since the caller started."""
    rss_kib: int


@dataclass
class HeapSample:
    """The edge's allocators at one moment of a soak, read inside the process (``--heap-probe``)."""

    t_s: float
    """Seconds since the caller started."""
    rss_kib: int
    glibc_used_kib: int
    """Bytes in chunks malloc has handed out (``mallinfo2().uordblks``)."""
    glibc_free_kib: int
    """Bytes malloc holds free in its heaps (``fordblks``): resident if ever touched, and
    not given back while live chunks sit above them."""
    glibc_mmap_kib: int
    """Large chunks malloc mapped on their own (``hblkhd``)."""
    python_blocks: int
    """``sys.getallocatedblocks()``: Python's small-object blocks in use."""


@dataclass
class RunResult:
    """One measurement: one proxy (the edge on one store, or Kamailio), one caller, one rate."""

    target: str
    """``edge-redis``, ``edge-memory`` or ``kamailio``."""
    kind: str
    purpose: str
    rate: int
    duration_s: float
    calls: int
    concurrency_limit: int
    passed: bool
    reasons: list[str]
    wall_s: float
    late_s: float
    """How much longer than ``duration`` + hold the caller took to complete its calls."""
    achieved_rate: float
    """Calls completed / (wall - hold): a lower bound, SIPp's start-up is included."""
    cpu_us_per_call: float | None
    """CPU time of the proxy (all its processes) per completed call."""
    redis_us_per_call: float | None
    """CPU time of redis-server per completed call, when one runs."""
    uac: SippSummary
    trunk: SippSummary
    idle_trunk: SippSummary
    edge: EdgeSummary | None
    kamailio: KamailioSummary | None
    cpu: list[CpuUsage]
    host: HostCpu
    udp_errors: dict[str, int]
    wire: WireLatency | None
    workdir: str
    rss: list[RssSample] = field(default_factory=list)
    """The edge's RSS every ``--rss-interval`` seconds (soak runs only)."""
    heap: list[HeapSample] = field(default_factory=list)
    """The edge's allocators every ``--rss-interval`` seconds (soak with ``--heap-probe``)."""


@dataclass
class MaxSearch:
    """The ramp and bisection for one proxy and one kind of call, then its confirmation."""

    target: str
    kind: str
    best_rate: int | None
    first_fail: int | None
    capped: bool
    steps: list[RunResult] = field(default_factory=list)
    confirm: list[RunResult] = field(default_factory=list)
    """The long runs at the best rate (and, if that failed, at the rates below it that
    :func:`confirm_rates` gives, until one passed)."""
    confirmed_rate: int | None = None
    """The rate a long run sustained; None when none did or none was run."""


@dataclass
class Environment:
    command: str
    started_at: str
    finished_at: str = ""
    interrupted: bool = False
    error: str | None = None
    nproc: str = ""
    cpu_model: str = ""
    kernel: str = ""
    python: str = ""
    uvloop: str = ""
    sipp: str = ""
    tcpdump: str = ""
    redis_server: str | None = None
    kamailio: str | None = None
    git: str = ""
    build: str = ""
    targets: str = ""
    store: str = ""
    loadavg_before: str = ""
    loadavg_after: str = ""
    speed_probe_before_ms: float = 0.0
    speed_probe_after_ms: float = 0.0


@dataclass
class Report:
    environment: Environment
    options: dict[str, Any]
    max_searches: list[MaxSearch] = field(default_factory=list)
    latency: list[RunResult] = field(default_factory=list)
    soak: RunResult | None = None


# ------------------------------------------------------------------------ host probes


def _run_text(command: Sequence[str]) -> str:
    """Output of a short informational command, or why it could not run."""
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (done.stdout + done.stderr).strip()


def _first_line_matching(text: str, pattern: str) -> str:
    for line in text.splitlines():
        if re.search(pattern, line):
            return line.strip()
    return text.splitlines()[0].strip() if text.strip() else "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def speed_probe() -> float:
    """Milliseconds for a fixed pure-Python loop, best of three (lower is faster).

    Not a benchmark of anything: a yardstick for the host's speed at the time, so two
    reports from a fast and a slow period can be told apart.
    """
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i * i
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 1)


def _host_ticks() -> tuple[int, int, int]:
    """(total, idle incl. iowait, steal) jiffies of all CPUs."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return (0, 0, 0)
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    # counted in user/nice.
    total = sum(fields[:8])
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    return total, idle, steal


def _host_cpu(before: tuple[int, int, int], after: tuple[int, int, int]) -> HostCpu:
    total = after[0] - before[0]
    if total <= 0:
        return HostCpu(busy_pct=0.0, steal_pct=0.0)
    busy = total - (after[1] - before[1])
    return HostCpu(
        busy_pct=round(100.0 * busy / total, 1),
        steal_pct=round(100.0 * (after[2] - before[2]) / total, 1),
    )


_UDP_FIELDS = ("InErrors", "RcvbufErrors", "SndbufErrors")


def udp_counters() -> dict[str, int]:
    """Host-wide UDP error counters: drops anywhere on the box show here (not only ours)."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    except OSError:
        return {}
    udp = [line for line in lines if line and line[0] == "Udp:"]
    if len(udp) < 2:
        return {}
    values = dict(zip(udp[0][1:], udp[1][1:], strict=False))
    return {name: int(values[name]) for name in _UDP_FIELDS if name in values}


def _proc_cpu_seconds(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it start at ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuSampler:
    """Samples utime+stime of named processes once a second in a background thread.

    A name may cover several PIDs (Kamailio's main process and its children): its figures are
    the sum over them, each PID counted from its own first to its last sample.
    """

    def __init__(
        self, pids: Mapping[str, int | Sequence[int]], *, interval: float = 1.0, max_s: float
    ) -> None:
        self._groups = {
            name: [pid] if isinstance(pid, int) else list(pid) for name, pid in pids.items()
        }
        self._interval = interval
        self._max_samples = max(2, int(max_s / interval) + 2)
        self._samples: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        now = time.monotonic()
        values: dict[int, float] = {}
        for group in self._groups.values():
            for pid in group:
                seconds = _proc_cpu_seconds(pid)
                if seconds is not None:
                    values[pid] = seconds
        self._samples.append((now, values))

    def _run(self) -> None:
        # Bounded both by the stop event and by a sample count derived from the run's limit.
        for _ in range(self._max_samples):
            if self._stop.wait(self._interval):
                return
            self._sample()

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> list[CpuUsage]:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        usage: list[CpuUsage] = []
        first_t = self._samples[0][0]
        last_t = self._samples[-1][0]
        wall = max(last_t - first_t, 1e-6)
        for name, group in self._groups.items():
            by_pid: dict[int, float] = {}
            # CPU per one-second interval, summed over the group's processes.
            per_interval = [0.0] * (len(self._samples) - 1)
            for pid in group:
                series = [v.get(pid) for _, v in self._samples]
                seen = [c for c in series if c is not None]
                if len(seen) < 2:
                    continue
                by_pid[pid] = round(seen[-1] - seen[0], 3)
                for i, (c0, c1) in enumerate(zip(series, series[1:], strict=False)):
                    if c0 is not None and c1 is not None:
                        per_interval[i] += c1 - c0
            seconds = sum(by_pid.values())
            peak = 0.0
            for i, cpu in enumerate(per_interval):
                span = self._samples[i + 1][0] - self._samples[i][0]
                if span > 0.5:
                    peak = max(peak, cpu / span)
            usage.append(
                CpuUsage(
                    name=name,
                    pid=group[0],
                    seconds=round(seconds, 3),
                    mean_pct=round(100.0 * seconds / wall, 1),
                    peak_pct=round(100.0 * peak, 1),
                    pids=list(group),
                    seconds_by_pid=by_pid if len(group) > 1 else {},
                )
            )
        return usage


def child_pids(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children (the edge's workers when it supervises some)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(part) for part in text.split()]


def proc_rss_kib(pid: int) -> int | None:
    """VmRSS of a process from /proc/<pid>/status, in KiB; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Reads one process's RSS every ``interval`` seconds in a background thread."""

    def __init__(self, pid: int, *, interval: float, max_s: float, started: float) -> None:
        self._pid = pid
        self._interval = interval
        self._started = started
        self._max_samples = max(2, int(max_s / interval) + 2)
        self._samples: list[RssSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        kib = proc_rss_kib(self._pid)
        if kib is not None:
            t_s = round(time.monotonic() - self._started, 1)
            self._samples.append(RssSample(t_s=t_s, rss_kib=kib))

    def _run(self) -> None:
        # Bounded by the stop event and by a sample count derived from the run's limit; each
        # sample is due at a multiple of the interval from the start, so they do not drift.
        for n in range(1, self._max_samples):
            due = self._started + n * self._interval
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            self._sample()

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> list[RssSample]:
        self._stop.set()
        self._thread.join(timeout=5)
        return list(self._samples)


# Imported by the edge at start-up (``sitecustomize`` on its PYTHONPATH, soak with
# ``--heap-probe`` only; nothing in the product): every interval, one JSON line with the
# RSS, glibc's mallinfo2() and Python's block count, read in a daemon thread of the edge.
HEAP_PROBE = """
import ctypes, json, os, sys, threading, time

class _Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

def _run(path, interval):
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Info
    except (OSError, AttributeError):
        return  # not glibc >= 2.33: no probe
    started = time.monotonic()
    with open(path, "a") as out:
        for n in range(1_000_000):
            info = libc.mallinfo2()
            out.write(json.dumps({
                "time": time.time(), "rss_kib": _rss_kib(),
                "glibc_used_kib": info.uordblks // 1024,
                "glibc_free_kib": info.fordblks // 1024,
                "glibc_mmap_kib": info.hblkhd // 1024,
                "python_blocks": sys.getallocatedblocks(),
            }) + "\\n")
            out.flush()
            time.sleep(max(0.0, started + (n + 1) * interval - time.monotonic()))

_path = os.environ.get("E911_BENCH_HEAP_FILE")
if _path:
    threading.Thread(
        target=_run, args=(_path, float(os.environ["E911_BENCH_HEAP_INTERVAL"])),
        name="bench-heap-probe", daemon=True,
    ).start()
"""


def read_heap_samples(path: Path, started_wall: float) -> list[HeapSample]:
    """The lines ``HEAP_PROBE`` wrote, timed from ``started_wall`` (the caller's start)."""
    samples: list[HeapSample] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return samples
    for line in text.splitlines():
        try:
            data = json.loads(line)
            samples.append(
                HeapSample(
                    t_s=round(float(data["time"]) - started_wall, 1),
                    rss_kib=int(data["rss_kib"]),
                    glibc_used_kib=int(data["glibc_used_kib"]),
                    glibc_free_kib=int(data["glibc_free_kib"]),
                    glibc_mmap_kib=int(data["glibc_mmap_kib"]),
                    python_blocks=int(data["python_blocks"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the edge's exit
    return samples


# ------------------------------------------------------------------------------- SIPp


class BenchSipp(Sipp):
    """The harness's SIPp runner without the per-message trace files.

    The tests keep ``-trace_msg`` (every message, to a file) and ``-trace_logs``; at a few
    thousand calls/s that is hundreds of MB per step and enough CPU in SIPp to distort the
    measurement. The statistics CSV, the error log and the screen stay.
    """

    _DROP = {"-trace_msg": 0, "-message_file": 1, "-trace_logs": 0, "-log_file": 1}

    def _command(self, scenario: str | Path, **kwargs: Any) -> tuple[list[str], Path, str]:
        command, rundir, name = super()._command(scenario, **kwargs)
        kept: list[str] = []
        skip = 0
        for part in command:
            if skip:
                skip -= 1
                continue
            if part in self._DROP:
                skip = self._DROP[part]
                continue
            kept.append(part)
        return kept, rundir, name


# Each SIPp error-log entry starts with "date time epoch: "; the SIP message it quotes runs
# over the next lines, and the next entry may follow on the same line without a break.
_ENTRY_START = r"\d{4}-\d\d-\d\d\s+[\d:.]+\s+[\d.]+:"
_ERROR_ENTRY = re.compile(_ENTRY_START + r"\s*([^\n]*?)(?=" + _ENTRY_START + r"|\n|$)")


def _error_kinds(error_log: str, limit: int = 4) -> list[str]:
    """The most frequent kinds of SIPp error-log entries, with counts."""
    kinds: Counter[str] = Counter()
    for match in _ERROR_ENTRY.finditer(error_log):
        head, _, quoted = match.group(1).partition("received '")
        text = re.sub(r"\d+", "#", re.sub(r"'([^']*)'", _short_quote, head))
        if quoted:
            words = quoted.split()
            text += "received " + " ".join(words[:2] if quoted.startswith("SIP/") else words[:1])
        kinds[text[:160]] += 1
    return [f"{count}x {text}" for text, count in kinds.most_common(limit)]


def _short_quote(match: re.Match[str]) -> str:
    """Keeps 'ACK' or '200' in an entry; a quoted Call-ID or file name becomes '...'."""
    inner = match.group(1)
    return match.group(0) if len(inner) <= 8 and "@" not in inner else "'...'"


def _stat(stats: Mapping[str, str], column: str) -> int:
    try:
        return int(float(stats[column]))
    except (KeyError, ValueError):
        return 0


def summarize_sipp(role: str, result: SippResult) -> SippSummary:
    rundir = next(iter(result.files.values())).parent if result.files else Path()
    return SippSummary(
        role=role,
        returncode=result.returncode,
        successful=result.successful,
        failed=result.failed,
        retransmissions=result.retransmissions,
        timed_out=result.timed_out,
        out_of_call=_stat(result.stats, "OutOfCallMsgs(C)"),
        dead_call=_stat(result.stats, "DeadCallMsgs(C)"),
        errors=_error_kinds(result.error_log),
        rundir=str(rundir),
        received=_stat(result.stats, "IncomingCall(C)"),
        mismatches=sum(_stat(result.stats, column) for column in MISMATCH_COLUMNS),
    )


# ---------------------------------------------------------------------------- tcpdump


class InviteCapture:
    """tcpdump on lo writing only the INVITEs into and out of the proxy to a pcap file."""

    def __init__(self, pcap: Path, *, proxy_port: int, uac_port: int, trunk_port: int) -> None:
        self.pcap = pcap
        self.stderr_path = pcap.with_suffix(".stderr.log")
        self.binary = shutil.which("tcpdump")
        self.filter = (
            f"udp and ((src port {uac_port} and dst port {proxy_port}) or "
            f"(src port {proxy_port} and dst port {trunk_port})) and {_INVITE_BPF}"
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self.problem: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> bool:
        """Start tcpdump and wait until it listens; False (and ``problem`` set) otherwise."""
        if self.binary is None:
            self.problem = "tcpdump is not installed"
            return False
        # --immediate-mode: without it libpcap hands packets over in blocks that retire only
        # when full or after a second, and the last block is lost when tcpdump is stopped.
        # Only INVITEs pass the filter, so per-packet delivery costs little.
        command = [self.binary, "-i", "lo", "-nn", "-s", "0", "-B", "32768", "-U"]
        command += ["--immediate-mode"]
        command += ["--time-stamp-precision=micro", "-w", str(self.pcap)]
        # Running as root, tcpdump would switch to its own user and then fail to write here.
        if os.geteuid() == 0:
            command += ["-Z", "root"]
        command.append(self.filter)
        self._stderr = self.stderr_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
            )
        except OSError as exc:
            self.problem = f"tcpdump could not start: {exc}"
            return False
        if _poll_until(self._listening, self._proc, timeout=CAPTURE_READY_S, interval=0.05):
            return True
        self.stop()
        self.problem = "tcpdump did not start capturing: " + self._stderr_text()[-500:].strip()
        return False

    def _stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def _listening(self) -> bool:
        return "listening on" in self._stderr_text()

    def stop(self) -> int | None:
        """Stop tcpdump by PID (it flushes the file on SIGTERM); returns kernel drops."""
        if self._proc is not None:
            _stop_process(self._proc, 10.0)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        found = re.findall(r"(\d+) packets? dropped by kernel", self._stderr_text())
        return int(found[-1]) if found else None


_BRANCH = re.compile(rb"^(?:Via|v)[ \t]*:[^\r\n]*?;branch=([^;,\s]+)", re.IGNORECASE | re.MULTILINE)
_CALL_ID = re.compile(rb"^(?:Call-ID|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)


def read_pcap_udp(path: Path) -> Iterator[tuple[float, int, int, bytes]]:
    """(timestamp, source port, destination port, payload) of each IPv4 UDP packet."""
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path} is not a pcap file (magic {magic.hex()})")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    record = struct.Struct(endian + "IIII")
    offset = 24
    # The loop advances by at least the record header each time, so it ends with the file.
    while offset + record.size <= len(data):
        sec, frac, incl_len, _orig = record.unpack_from(data, offset)
        offset += record.size
        frame = data[offset : offset + incl_len]
        offset += incl_len
        ip = _ip_payload(frame, linktype)
        if ip is None or len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        header_len = (ip[0] & 0x0F) * 4
        total_len = min(struct.unpack("!H", ip[2:4])[0], len(ip))
        udp = ip[header_len:total_len]
        if len(udp) < 8:
            continue
        sport, dport = struct.unpack("!HH", udp[:4])
        yield sec + frac / (1e9 if nano else 1e6), sport, dport, udp[8:]


def _ip_payload(frame: bytes, linktype: int) -> bytes | None:
    if linktype == 1:  # Ethernet (what lo reports)
        return frame[14:] if frame[12:14] == b"\x08\x00" else None
    if linktype == 113:  # Linux cooked (-i any)
        return frame[16:] if frame[14:16] == b"\x08\x00" else None
    if linktype == 276:  # Linux cooked v2
        return frame[20:] if frame[0:2] == b"\x08\x00" else None
    if linktype == 0:  # BSD loopback
        return frame[4:]
    if linktype in (12, 101, 228):  # raw IP / raw IPv4
        return frame
    return None


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def wire_latency(pcap: Path, *, proxy_port: int, trunk_port: int) -> WireLatency:
    """Pair the first INVITE into the proxy with the first one out to the trunk, by Call-ID.

    Also counts calls whose INVITE crossed more than once: retransmitted by the caller, or
    sent to the trunk again (a retransmission keeps its branch; a new branch means the proxy
    started a second client transaction for the same call).
    """
    into: dict[bytes, float] = {}
    out: dict[bytes, float] = {}
    in_count: Counter[bytes] = Counter()
    out_count: Counter[bytes] = Counter()
    out_branches: dict[bytes, set[bytes]] = {}
    try:
        for ts, _sport, dport, payload in read_pcap_udp(pcap):
            if not payload.startswith(b"INVITE "):
                continue
            match = _CALL_ID.search(payload)
            if match is None:
                continue
            call_id = match.group(1).strip()
            # setdefault: a retransmitted INVITE must not move the first timestamp.
            if dport == proxy_port:
                into.setdefault(call_id, ts)
                in_count[call_id] += 1
            elif dport == trunk_port:
                out.setdefault(call_id, ts)
                out_count[call_id] += 1
                branch = _BRANCH.search(payload)
                out_branches.setdefault(call_id, set()).add(branch.group(1) if branch else b"")
    except (OSError, ValueError) as exc:
        return WireLatency(captured=False, note=f"could not read the capture: {exc}")
    deltas = sorted(
        (out[cid] - into[cid]) * 1000.0 for cid in into.keys() & out.keys() if out[cid] >= into[cid]
    )
    result = WireLatency(
        captured=bool(into or out),
        note="",
        invites_in=len(into),
        invites_out=len(out),
        paired=len(deltas),
        retransmitted_in=sum(1 for n in in_count.values() if n > 1),
        repeated_out=sum(1 for n in out_count.values() if n > 1),
        new_branch_out=sum(1 for b in out_branches.values() if len(b) > 1),
    )
    if not deltas:
        result.note = "no INVITE captured" if not (into or out) else "no INVITE could be paired"
        return result
    result.p50_ms = round(_percentile(deltas, 0.50), 3)
    result.p95_ms = round(_percentile(deltas, 0.95), 3)
    result.p99_ms = round(_percentile(deltas, 0.99), 3)
    result.max_ms = round(deltas[-1], 3)
    return result


# ------------------------------------------------------------------------------- edge

_LE = re.compile(r'le="([^"]+)"')


def histogram(text: str, name: str) -> Histogram | None:
    """Count and interpolated p50/p99 of a Prometheus histogram, in milliseconds.

    Interpolates linearly inside the bucket holding the quantile, as Prometheus's
    histogram_quantile does: only as good as the bucket bounds (0.05, 0.1, 0.2, 0.3, 0.5,
    0.75, 1, 2, ... ms for this one).
    """
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        match = _LE.search(line)
        if match is None:
            continue
        bound = math.inf if match.group(1) == "+Inf" else float(match.group(1))
        buckets.append((bound, float(line.rsplit(None, 1)[1])))
    if not buckets:
        return None
    buckets.sort()
    count = int(buckets[-1][1])
    total = metric_value(text, name + "_sum")
    mean = None if not count or total is None else round(total / count * 1000.0, 3)

    def quantile(q: float) -> float | None:
        if count == 0:
            return None
        rank = q * count
        lower_bound, lower_count = 0.0, 0.0
        for bound, cumulative in buckets:
            if cumulative >= rank:
                if math.isinf(bound):
                    return round(lower_bound * 1000.0, 3)  # beyond the last finite bound
                width = cumulative - lower_count
                fraction = (rank - lower_count) / width if width else 1.0
                return round((lower_bound + (bound - lower_bound) * fraction) * 1000.0, 3)
            lower_bound, lower_count = bound, cumulative
        return None

    return Histogram(count=count, mean_ms=mean, p50_ms=quantile(0.50), p99_ms=quantile(0.99))


_OUTCOMES = ("enriched", "no_location", "store_error", "cached", "fail_open", "failover", "failed")


def summarize_edge(edge: EdgeProcess, log_offset: int = 0) -> EdgeSummary:
    problems = _log_problems(edge.log_text()[log_offset:])
    try:
        text = edge.metrics()
    except (OSError, HarnessError) as exc:
        return EdgeSummary(
            running_at_end=edge.running,
            outcomes={},
            trunk_failovers=0.0,
            discarded=0.0,
            delivery_failures=0.0,
            enrich=None,
            log_problems=problems,
            metrics_error=str(exc),
        )
    outcomes = {
        outcome: metric_value(text, "e911_sip_emergency_calls_total", outcome=outcome) or 0.0
        for outcome in _OUTCOMES
    }
    return EdgeSummary(
        running_at_end=edge.running,
        outcomes=outcomes,
        trunk_failovers=metric_value(text, "e911_sip_trunk_failovers_total") or 0.0,
        discarded=metric_value(text, "e911_sip_messages_discarded_total") or 0.0,
        delivery_failures=metric_value(text, "e911_sip_delivery_failures_total") or 0.0,
        enrich=histogram(text, "e911_sip_emergency_enrich_seconds"),
        log_problems=problems,
    )


def _log_problems(log: str, limit: int = 5) -> list[str]:
    """The most frequent WARNING-or-worse lines of the edge's JSON log, with counts."""
    kinds: Counter[str] = Counter()
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if line.strip():
                kinds[f"(not JSON) {line.strip()[:120]}"] += 1
            continue
        if not isinstance(record, dict):
            continue
        level = str(record.get("level", ""))
        if level in ("WARNING", "ERROR", "CRITICAL"):
            detail = record.get("reason") or record.get("error") or ""
            kinds[f"{level} {record.get('msg', '')} {detail}".strip()[:160]] += 1
    return [f"{count}x {text}" for text, count in kinds.most_common(limit)]


# --------------------------------------------------------------------------- Kamailio


def summarize_kamailio(kamailio: reference.KamailioProcess, log_offset: int = 0) -> KamailioSummary:
    problems = reference.log_problems(kamailio.log_text()[log_offset:])
    running = kamailio.running
    try:
        stats = kamailio.statistics()
    except HarnessError as exc:
        return KamailioSummary(
            running_at_end=running,
            enriched=0.0,
            unlocated=0.0,
            store_errors=0.0,
            processes=dict(kamailio.processes),
            log_problems=problems,
            stats_error=str(exc),
        )
    return KamailioSummary(
        running_at_end=running,
        enriched=stats.get("script:e911_enriched", 0.0),
        unlocated=stats.get("script:e911_unlocated", 0.0),
        store_errors=stats.get("script:e911_store_error", 0.0),
        processes=dict(kamailio.processes),
        log_problems=problems,
        # Over a hundred counters, most of them 0 in this scenario: the rest say enough.
        statistics={k: v for k, v in stats.items() if v or k.startswith("script:")},
    )


# ----------------------------------------------------------------------------- runner


@dataclass
class Options:
    duration: float
    latency_duration: float
    rates: list[int]
    start_rate: int
    max_rate: int
    store: str
    """The edge's location store: ``redis``, ``memory`` or ``both`` (two edge proxies).
    Kamailio always reads the private redis-server."""
    quick: bool
    only: str | None
    skip_max: bool
    skip_latency: bool
    keep_pcap: bool
    target: str = "edge"
    lines: int = DEFAULT_LINES
    """Distinct provisioned lines the calls come from."""
    kamailio_start_rate: int = 800
    """First rate step of Kamailio's searches."""
    confirm_duration: float = 60.0
    """Seconds of the run that confirms each search's best rate (0: none)."""
    soak: bool = False
    soak_duration: float = 600.0
    soak_rate: int | None = None
    rss_interval: float = 10.0
    heap_probe: bool = False
    """Soak only: the edge reports its allocators from inside (``HEAP_PROBE``)."""
    workers: int = 1
    """``[sip] workers`` of the edge: above 1, a supervisor and that many worker processes
    (UDP only, the Redis store)."""
    edge_settings: tuple[tuple[str, Any], ...] = ()
    """``--edge-set``: (``table.key``, value) pairs written into the edge's configuration,
    e.g. to measure it with the call records or the notifications off."""

    def edge_overrides(self) -> dict[str, Any]:
        """``edge_settings`` as nested tables, for ``edge_config``'s overrides."""
        tables: dict[str, Any] = {}
        for dotted, value in self.edge_settings:
            *path, key = dotted.split(".")
            table = tables
            for name in path:
                table = table.setdefault(name, {})
            table[key] = value
        return tables

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.only,) if self.only else KINDS

    @property
    def edge_stores(self) -> tuple[str, ...]:
        return EDGE_STORES if self.store == "both" else (self.store,)

    @property
    def targets(self) -> tuple[str, ...]:
        """Every proxy measured: ``edge-<store>`` for each edge store, then ``kamailio``."""
        proxies: list[str] = []
        if self.target in ("edge", "both"):
            proxies += [f"edge-{store}" for store in self.edge_stores]
        if self.target in (KAMAILIO, "both"):
            proxies.append(KAMAILIO)
        return tuple(proxies)

    def targets_for(self, kind: str) -> tuple[str, ...]:
        """The proxies measured with ``kind``: a pass-through call is never looked up, so the
        edge's store makes no difference to it and only the first store is measured."""
        if kind == "emergency":
            return self.targets
        first_edge = next((t for t in self.targets if t.startswith("edge-")), None)
        return tuple(t for t in self.targets if t == first_edge or t == KAMAILIO)

    @property
    def needs_redis(self) -> bool:
        return "redis" in self.edge_stores or KAMAILIO in self.targets


class LoadBench:
    """Starts the processes of each measurement and stops every one of them by PID."""

    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self._runs = 0
        self.redis: RedisServer | None = None
        self.seed_file = workdir / "locations.json"
        self.callers_file = workdir / "callers.csv"
        self.lines = line_numbers(options.lines)

    def __enter__(self) -> LoadBench:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.callers_file.write_text(injection_file(self.lines))
        # One redis-server for the whole session: the edge on the Redis store and Kamailio
        # read the same records from the same server.
        if self.options.needs_redis:
            self.redis = RedisServer(self.workdir)
            self.redis.start()
            try:
                provision(self.redis.client(), self.lines)
            except RuntimeError as exc:
                raise HarnessError(str(exc)) from exc
        if "memory" in self.options.edge_stores:
            # The memory store's documented seed: a JSON object of line -> record
            # ([store] seed_file), holding the same records as Redis.
            records = seed_records(self.lines)
            self.seed_file.write_text(json.dumps(records, indent=0, sort_keys=True) + "\n")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.redis is not None:
            self.redis.stop()

    def _edge_config(
        self,
        store: str,
        *,
        sip_port: int,
        http_port: int,
        emergency_port: int,
        default_port: int,
    ) -> dict[str, Any]:
        if store == "redis":
            if self.redis is None:
                raise HarnessError("the edge's Redis store needs the private redis-server")
            # [store] mirror is left at its default (true): every record in memory, loaded
            # from Redis before the edge reports ready.
            workers = self.options.workers
            overrides = self.options.edge_overrides()
            overrides["sip"] = {"workers": workers, **overrides.get("sip", {})}
            return edge_config(
                sip_port=sip_port,
                http_port=http_port,
                emergency_trunks=[trunk_uri(emergency_port)],
                default_trunks=[trunk_uri(default_port)],
                store_url=self.redis.url,
                # Several workers serve UDP listeners only.
                transports=("udp",) if workers > 1 else ("udp", "tcp"),
                **overrides,
            )
        return edge_config(
            sip_port=sip_port,
            http_port=http_port,
            emergency_trunks=[trunk_uri(emergency_port)],
            default_trunks=[trunk_uri(default_port)],
            seed_file=self.seed_file,
            **self.options.edge_overrides(),
        )

    def run(self, target: str, kind: str, rate: int, duration: float, *, purpose: str) -> RunResult:
        """One measurement with its own proxy, trunks, caller and (for latency) capture."""
        self._runs += 1
        rundir = self.workdir / f"{self._runs:02d}-{target}-{purpose}-{kind}-{rate}cps"
        rundir.mkdir(parents=True)
        capture_wanted = purpose == "latency"
        calls = max(1, round(rate * duration))
        limit = max(MIN_CONCURRENCY, math.ceil(rate * CONCURRENCY_FACTOR))
        sipp_timeout = allowed_s(duration) + SIPP_TIMEOUT_MARGIN_S
        sipp_extra = ["-buff_size", str(SIPP_BUFFER)]
        sipp = BenchSipp(rundir)
        edge: EdgeProcess | None = None
        kamailio: reference.KamailioProcess | None = None
        capture: InviteCapture | None = None
        heap_file = rundir / "heap.jsonl" if purpose == "soak" and self.options.heap_probe else None
        probe_env: dict[str, str] = {}
        print(
            f"-- {target} {purpose} {kind} {rate} calls/s x {duration:g} s ({calls} calls)",
            flush=True,
        )
        try:
            emergency_port = free_port("udp")
            default_port = free_port("udp")
            while default_port == emergency_port:
                default_port = free_port("udp")
            # Both trunks run in every measurement, as in production; only one gets calls.
            trunks: dict[str, SippProcess] = {}
            for name, port, scenario in (
                ("emergency", emergency_port, str(EMERGENCY_TRUNK_SCENARIO)),
                ("passthrough", default_port, DEFAULT_TRUNK_SCENARIO),
            ):
                trunks[name] = sipp.uas(
                    scenario,
                    port=port,
                    calls=calls,
                    timeout=sipp_timeout + TRUNK_TIMEOUT_MARGIN_S,
                    extra=sipp_extra,
                )
            if target.startswith("edge-"):
                store = target.removeprefix("edge-")
                if heap_file is not None:
                    probe = rundir / "heapprobe"
                    probe.mkdir()
                    (probe / "sitecustomize.py").write_text(HEAP_PROBE, encoding="utf-8")
                    probe_env = {
                        "PYTHONPATH": f"{probe}{os.pathsep}{PACKAGE_ROOT}",
                        "E911_BENCH_HEAP_FILE": str(heap_file),
                        "E911_BENCH_HEAP_INTERVAL": str(self.options.rss_interval),
                    }
                edge = EdgeProcess(
                    rundir,
                    self._edge_config(
                        store,
                        sip_port=free_port_pair(),
                        http_port=free_port("tcp"),
                        emergency_port=emergency_port,
                        default_port=default_port,
                    ),
                    command=[
                        sys.executable,
                        "-m",
                        "e911_sip",
                        "serve",
                        "--role",
                        EDGE_ROLES[store],
                        "--config",
                        "{config}",
                    ],
                    env=probe_env,
                )
                edge.start(timeout=15.0 * self.options.workers)
                proxy_port, proxy_target = edge.sip_port, edge.sip_target
                # With workers, the supervisor and every worker.
                proxy_pids = [_pid(edge.pid), *child_pids(_pid(edge.pid))]
                # Only what the proxy logs under load counts; its start-up lines are not news.
                log_offset = len(edge.log_text())
            else:
                if self.redis is None:
                    raise HarnessError("Kamailio needs the private redis-server")
                kamailio = reference.KamailioProcess(
                    rundir,
                    sip_port=free_port("udp"),
                    emergency_trunk=f"{LOOPBACK}:{emergency_port}",
                    default_trunk=f"{LOOPBACK}:{default_port}",
                    redis_port=self.redis.port,
                )
                kamailio.start()
                proxy_port, proxy_target = kamailio.sip_port, kamailio.sip_target
                proxy_pids = kamailio.pids()
                log_offset = len(kamailio.log_text())
            trunk_port = emergency_port if kind == "emergency" else default_port
            uac_port = free_port("udp")
            capture_problem: str | None = None
            if capture_wanted:
                capture = InviteCapture(
                    rundir / "invites.pcap",
                    proxy_port=proxy_port,
                    uac_port=uac_port,
                    trunk_port=trunk_port,
                )
                if not capture.start():
                    capture_problem = capture.problem
                    capture = None

            udp_before = udp_counters()
            host_before = _host_ticks()
            started = time.monotonic()
            started_wall = time.time()
            uac = sipp.start_uac(
                str(CALLER_SCENARIO),
                proxy_target,
                service=SERVICES[kind],
                port=uac_port,
                keys={"hold_ms": str(HOLD_MS)},
                calls=calls,
                rate=rate,
                timeout=sipp_timeout,
                extra=["-inf", str(self.callers_file), "-l", str(limit), *sipp_extra],
            )
            pids: dict[str, int | list[int]] = {target: proxy_pids, "sipp caller": uac.pid}
            pids["sipp emergency trunk"] = trunks["emergency"].pid
            pids["sipp default trunk"] = trunks["passthrough"].pid
            if capture is not None and capture.pid is not None:
                pids["tcpdump"] = capture.pid
            if self.redis is not None and self.redis.pid is not None:
                pids["redis-server"] = self.redis.pid
            sampler = CpuSampler(pids, max_s=sipp_timeout + 20.0)
            sampler.start()
            rss: RssSampler | None = None
            if purpose == "soak" and edge is not None:
                rss = RssSampler(
                    _pid(edge.pid),
                    interval=self.options.rss_interval,
                    max_s=sipp_timeout + 20.0,
                    started=started,
                )
                rss.start()
            try:
                uac_result = uac.wait(timeout=sipp_timeout + 15.0)
            finally:
                wall = time.monotonic() - started
                cpu = sampler.stop()
                rss_samples = rss.stop() if rss is not None else []
            host = _host_cpu(host_before, _host_ticks())
            # What the rest of the box did meanwhile: on a shared host, other work competing
            # for the two cores explains a failure the proxy's own figures cannot.
            ours = sum(usage.mean_pct for usage in cpu)
            host.others_pct = round(max(0.0, host.busy_pct * (os.cpu_count() or 1) - ours), 1)
            udp_after = udp_counters()

            active = trunks[kind]
            idle = trunks["passthrough" if kind == "emergency" else "emergency"]
            trunk_result = active.wait(timeout=TRUNK_DRAIN_S)
            idle_result = idle.stop()
            edge_summary = summarize_edge(edge, log_offset) if edge is not None else None
            kamailio_summary = (
                summarize_kamailio(kamailio, log_offset) if kamailio is not None else None
            )

            wire: WireLatency | None = None
            if capture_wanted:
                if capture is None:
                    wire = WireLatency(captured=False, note=capture_problem or "no capture")
                else:
                    drops = capture.stop()
                    wire = wire_latency(capture.pcap, proxy_port=proxy_port, trunk_port=trunk_port)
                    wire.dropped_by_kernel = drops
                    if not self.options.keep_pcap:
                        capture.pcap.unlink(missing_ok=True)
        finally:
            if capture is not None:
                capture.stop()
            sipp.close()
            if edge is not None:
                edge.stop()
            if kamailio is not None:
                kamailio.stop()

        uac_summary = summarize_sipp("caller", uac_result)
        trunk_summary = summarize_sipp(f"{kind} trunk", trunk_result)
        idle_summary = summarize_sipp("idle trunk", idle_result)
        hold_s = HOLD_MS / 1000
        placing = max(wall - hold_s, 1e-3)
        reasons = self._verdict(kind, calls, duration, wall, uac_summary, trunk_summary)
        if edge_summary is not None:
            reasons += self._edge_verdict(kind, calls, edge_summary)
        if kamailio_summary is not None:
            reasons += self._kamailio_verdict(kind, calls, kamailio_summary)
        result = RunResult(
            target=target,
            kind=kind,
            purpose=purpose,
            rate=rate,
            duration_s=duration,
            calls=calls,
            concurrency_limit=limit,
            passed=not reasons,
            reasons=reasons,
            wall_s=round(wall, 2),
            late_s=round(max(0.0, wall - duration - hold_s), 2),
            achieved_rate=round(uac_summary.successful / placing, 1),
            cpu_us_per_call=_us_per_call(cpu, target, uac_summary.successful),
            redis_us_per_call=_us_per_call(cpu, "redis-server", uac_summary.successful),
            uac=uac_summary,
            trunk=trunk_summary,
            idle_trunk=idle_summary,
            edge=edge_summary,
            kamailio=kamailio_summary,
            cpu=cpu,
            host=host,
            udp_errors={k: udp_after.get(k, 0) - v for k, v in udp_before.items()},
            wire=wire,
            workdir=str(rundir),
            rss=rss_samples,
            heap=read_heap_samples(heap_file, started_wall) if heap_file is not None else [],
        )
        verdict = "pass" if result.passed else "FAIL: " + "; ".join(reasons)
        print(f"   {verdict}", flush=True)
        time.sleep(PAUSE_BETWEEN_RUNS_S)  # let the CPU settle before the next proxy starts
        return result

    @staticmethod
    def _verdict(
        kind: str,
        calls: int,
        duration: float,
        wall: float,
        uac: SippSummary,
        trunk: SippSummary,
    ) -> list[str]:
        """What SIPp saw, the same for either proxy."""
        reasons: list[str] = []
        if uac.timed_out:
            reasons.append("caller had to be stopped")
        elif uac.returncode != 0:
            reasons.append(f"caller exit {uac.returncode}")
        if uac.failed:
            reasons.append(f"{uac.failed} failed calls")
        if uac.successful < calls:
            reasons.append(f"{uac.successful}/{calls} calls completed")
        if uac.retransmissions or trunk.retransmissions:
            reasons.append(
                f"retransmissions caller {uac.retransmissions} / trunk {trunk.retransmissions}"
            )
        if trunk.mismatches:
            reasons.append(
                f"{trunk.mismatches} mismatches: INVITEs without their own caller's location "
                "and callback at the trunk"
            )
        if trunk.failed > trunk.mismatches:
            reasons.append(f"{trunk.failed - trunk.mismatches} failed calls at the trunk")
        allowed = allowed_s(duration)
        if wall > allowed:
            reasons.append(f"calls took {wall:.1f} s to complete (allowed {allowed:.1f} s)")
        return reasons

    @staticmethod
    def _edge_verdict(kind: str, calls: int, edge: EdgeSummary) -> list[str]:
        reasons: list[str] = []
        if not edge.running_at_end:
            reasons.append("edge exited")
        if edge.metrics_error:
            reasons.append(f"no /metrics: {edge.metrics_error}")
        else:
            if edge.trunk_failovers:
                reasons.append(f"{edge.trunk_failovers:g} trunk failovers")
            for outcome in ("fail_open", "failover", "failed"):
                if edge.outcomes.get(outcome):
                    reasons.append(f"{edge.outcomes[outcome]:g} {outcome}")
            enriched = edge.outcomes.get("enriched", 0.0)
            if kind == "emergency" and enriched < calls:
                reasons.append(f"{enriched:g}/{calls} calls enriched")
        return reasons

    @staticmethod
    def _kamailio_verdict(kind: str, calls: int, kamailio: KamailioSummary) -> list[str]:
        reasons: list[str] = []
        if not kamailio.running_at_end:
            reasons.append("kamailio exited")
        if kamailio.stats_error:
            reasons.append(f"no statistics: {kamailio.stats_error}")
        else:
            if kamailio.store_errors:
                reasons.append(f"{kamailio.store_errors:g} location lookups failed")
            if kind == "emergency" and kamailio.enriched < calls:
                reasons.append(f"{kamailio.enriched:g}/{calls} calls enriched")
        return reasons


def allowed_s(duration: float) -> float:
    """The longest a step of ``duration`` seconds may take to complete its calls and pass."""
    return duration + HOLD_MS / 1000 + max(LATE_SLACK_MIN_S, LATE_SLACK_FRACTION * duration)


class RateSearch:
    """Doubling, then bisection, for one MaxSearch, one step at a time.

    Asking for one rate at a time lets the searches of two proxies alternate step by step, so
    a change in the host's speed falls on both. Each search takes at most MAX_RAMP_STEPS +
    BISECT_STEPS steps.
    """

    def __init__(self, result: MaxSearch, *, start_rate: int, max_rate: int) -> None:
        self.result = result
        self.max_rate = max_rate
        self._next: int | None = min(start_rate, max_rate)
        self._ramp_left = MAX_RAMP_STEPS
        self._bisect_left = BISECT_STEPS
        self._bisecting = False

    @property
    def next_rate(self) -> int | None:
        """The rate of the next step; None once the search is over."""
        return self._next

    def record(self, step: RunResult) -> None:
        """Take a step's outcome into account and choose the next rate."""
        search = self.result
        search.steps.append(step)
        if not self._bisecting:
            self._ramp_left -= 1
            if step.passed:
                search.best_rate = step.rate
                if step.rate >= self.max_rate:
                    search.capped = True
                    self._next = None
                elif self._ramp_left <= 0:
                    self._next = None
                else:
                    self._next = min(step.rate * 2, self.max_rate)
                return
            search.first_fail = step.rate
            self._bisecting = True
        else:
            self._bisect_left -= 1
            if step.passed:
                search.best_rate = step.rate
            else:
                search.first_fail = step.rate
        self._next = self._bisect_next()

    def _bisect_next(self) -> int | None:
        search = self.result
        if self._bisect_left <= 0 or search.first_fail is None:
            return None
        low, high = search.best_rate or 0, search.first_fail
        middle = _round_rate((low + high) / 2, high - low)
        return None if middle <= low or middle >= high else middle


def run_max_searches(bench: LoadBench, report: Report) -> None:
    """The max-rate search of every proxy, kind by kind, the proxies' steps alternating; then
    each search's best rate confirmed by a long run, the proxies again alternating.

    Fills the report as it goes, so an interrupted search still reports its steps.
    """
    opts = bench.options
    for kind in opts.kinds:
        searches: list[RateSearch] = []
        for target in opts.targets_for(kind):
            result = MaxSearch(
                target=target, kind=kind, best_rate=None, first_fail=None, capped=False
            )
            report.max_searches.append(result)
            start = opts.kamailio_start_rate if target == KAMAILIO else opts.start_rate
            searches.append(RateSearch(result, start_rate=start, max_rate=opts.max_rate))
        for _ in range(MAX_RAMP_STEPS + BISECT_STEPS):
            pending = [search for search in searches if search.next_rate is not None]
            if not pending:
                break
            for search in pending:
                rate = search.next_rate
                if rate is not None:
                    step = bench.run(search.result.target, kind, rate, opts.duration, purpose="max")
                    search.record(step)
        if opts.confirm_duration > 0:
            confirm_best_rates(bench, [search.result for search in searches])


def confirm_rates(passing: Sequence[int]) -> list[int]:
    """The rates of the long runs for a search whose passing step rates are ``passing``, in
    the order they are tried until one passes: the best; then the middle of the best and the
    next passing rate below it; then that rate.

    The ramp doubles, so the next passing rate is often half the best: a best rate that
    fails its long run by a little would otherwise be quoted at half of what the proxy
    sustains. The middle lies between two rates that each passed a step, for either proxy
    alike.
    """
    rates = sorted(set(passing), reverse=True)
    if not rates:
        return []
    out = [rates[0]]
    if len(rates) > 1:
        best, below = rates[0], rates[1]
        middle = _round_rate((best + below) / 2, best - below)
        if below < middle < best:
            out.append(middle)
        out.append(below)
    return out[:CONFIRM_ATTEMPTS]


def confirm_best_rates(bench: LoadBench, searches: Sequence[MaxSearch]) -> None:
    """Holds each search's best rate for ``--confirm-duration``; when that fails, the rates
    :func:`confirm_rates` gives below it get a long run each until one passes, the proxies'
    runs alternating."""
    for attempt in range(CONFIRM_ATTEMPTS):
        for search in searches:
            if search.confirmed_rate is not None or len(search.confirm) != attempt:
                continue
            rates = confirm_rates([step.rate for step in search.steps if step.passed])
            if attempt >= len(rates):
                continue
            run = bench.run(
                search.target,
                search.kind,
                rates[attempt],
                bench.options.confirm_duration,
                purpose="confirm",
            )
            search.confirm.append(run)
            if run.passed:
                search.confirmed_rate = run.rate


def run_latency_points(bench: LoadBench, report: Report) -> None:
    """Every latency point for every kind and proxy, alternating at each rate."""
    opts = bench.options
    # Kinds and proxies alternate at each rate so all are measured in the same period of the
    # host's speed.
    for rate in opts.rates:
        for kind in opts.kinds:
            for target in opts.targets_for(kind):
                run = bench.run(target, kind, rate, opts.latency_duration, purpose="latency")
                report.latency.append(run)


def run_soak(bench: LoadBench, report: Report, rate: int) -> None:
    """The edge (first store) placing 911 calls at ``rate`` for ``--soak-duration``, its RSS
    read every ``--rss-interval`` seconds."""
    opts = bench.options
    target = f"edge-{opts.edge_stores[0]}"
    report.soak = bench.run(target, "emergency", rate, opts.soak_duration, purpose="soak")


def _round_rate(value: float, gap: int) -> int:
    """Rates to a round figure (multiples of 10 when the interval allows it)."""
    return int(round(value / 10) * 10) if gap >= 40 else int(round(value))


def _pid(pid: int | None) -> int:
    if pid is None:
        raise HarnessError("process has no PID")
    return pid


def _us_per_call(cpu: Sequence[CpuUsage], name: str, calls: int) -> float | None:
    usage = next((c for c in cpu if c.name == name), None)
    if usage is None or not calls:
        return None
    return round(usage.seconds / calls * 1e6, 1)


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cpu(result: RunResult, name: str) -> str:
    for usage in result.cpu:
        if usage.name == name:
            return f"{usage.mean_pct:.0f} ({usage.peak_pct:.0f})"
    return "-"


def _sipp_cpu(result: RunResult) -> str:
    total = sum(u.mean_pct for u in result.cpu if u.name.startswith("sipp"))
    return f"{total:.0f}"


def _best(search: MaxSearch, interrupted: bool) -> str:
    best = "none passed" if search.best_rate is None else str(search.best_rate)
    if search.capped:
        return f">= {best} (--max-rate reached)"
    if search.first_fail is None and interrupted:
        return best + " (search interrupted)"
    return best


def render(report: Report) -> str:
    env = report.environment
    out: list[str] = ["# e911-sip load benchmark", ""]
    out += [
        f"- command: `{env.command}`",
        f"- started {env.started_at}, finished {env.finished_at}"
        + (" (interrupted)" if env.interrupted else ""),
        f"- host: {env.nproc} CPUs (`nproc`), {env.cpu_model}, kernel {env.kernel}",
        f"- Python {env.python}, uvloop {env.uvloop}, {env.sipp}, {env.tcpdump}"
        + (f", redis-server {env.redis_server}" if env.redis_server else "")
        + (f", Kamailio {env.kamailio}" if env.kamailio else ""),
        f"- code: {env.git}, {env.build or 'build not recorded'}; proxies: {env.targets}; "
        f"location store: {env.store}",
        f"- load average before {env.loadavg_before}, after {env.loadavg_after}",
        f"- speed probe (fixed Python loop, lower is faster): before "
        f"{env.speed_probe_before_ms} ms, after {env.speed_probe_after_ms} ms",
    ]
    if env.error:
        out.append(f"- **stopped by an error:** {env.error}")
    out.append("")

    if report.max_searches:
        out += ["## Maximum sustained rate", ""]
        out += [
            "A step passes with every call completed on time, 0 failed calls and 0 "
            "retransmissions at the caller and the trunk (SIPp -trace_stat) and the proxy's "
            "own counters in order: for the edge no failover / fail-open / failed call in its "
            "/metrics, for Kamailio no failed location lookup in its statistics, and for 911 "
            "every call enriched. "
            "Late: seconds beyond duration + hold the caller needed to complete its calls "
            f"(allowed: {LATE_SLACK_FRACTION:.0%} of the duration, at least "
            f"{LATE_SLACK_MIN_S:g} s). CPU: % of one core, mean over the step (busiest second "
            "in brackets); proxy = the edge, or all of Kamailio's processes together; SIPp = "
            "all SIPp processes together; other = every other process on the host.",
            "",
        ]
        confirm_s = report.options.get("confirm_duration") or 0
        step_s = report.options.get("duration") or 0
        out += [
            f"| proxy | kind | best {step_s:g} s step, calls/s | first failing calls/s "
            f"| confirmed ({confirm_s:g} s run), calls/s |",
            "|---|---|---|---|---|",
        ]
        for search in report.max_searches:
            fail = "-" if search.first_fail is None else str(search.first_fail)
            out.append(
                f"| {search.target} | {search.kind} | {_best(search, env.interrupted)} | {fail} "
                f"| {_confirmed(search)} |"
            )
        out.append("")
        out += [
            "Mismatches: 911 INVITEs the emergency trunk found without their own caller's "
            "location (Geolocation 777777/probe<line>) or callback (P-Asserted-Identity "
            "<line>), the line taken from the mixed-format From user; a step passes only with "
            "0. Runs marked confirm are the long runs at the best rate.",
            "",
            "| proxy | kind | run | target calls/s | calls | completed | failed "
            "| retrans caller/trunk | mismatches | late s | proxy CPU % | proxy us/call "
            "| SIPp CPU % | other CPU % | UDP rcvbuf errors | result |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        steps = sorted(
            (s for m in report.max_searches for s in [*m.steps, *m.confirm]),
            key=lambda s: _run_number(s),
        )
        for step in steps:
            out.append(_step_row(step))
        out.append("")
        out += _failure_notes(steps)

    if report.latency:
        out += ["## Latency added by the proxy (INVITE in -> INVITE out)", ""]
        out += [
            "Wire: tcpdump on lo, kernel timestamps, INVITE pairs by Call-ID. Histogram (edge "
            "only): the edge's own e911_sip_emergency_enrich_seconds (911 only; interpolated "
            "inside its buckets, and blind to time spent in the socket queue before the edge "
            "reads). Repeats: calls whose INVITE the caller retransmitted / the proxy sent to "
            "the trunk more than once / under a second branch. A point marked FAIL missed the "
            "pass criteria of a rate step: its latency is that of an overloaded proxy or box.",
            "",
            "| proxy | kind | calls/s | result | paired | wire p50 ms | p95 ms | p99 ms "
            "| max ms | hist count | hist p50 ms | hist p99 ms | SIPp failed / retrans "
            "| repeats | proxy CPU % | SIPp CPU % | other CPU % | capture drops |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run in report.latency:
            wire = run.wire or WireLatency(captured=False, note="not captured")
            hist = run.edge.enrich if run.edge is not None else None
            if not wire.captured or wire.paired == 0:
                cells = [f"no capture: {wire.note}", "-", "-", "-", "-"]
            else:
                cells = [str(wire.paired)]
                cells += [_fmt(v, 3) for v in (wire.p50_ms, wire.p95_ms, wire.p99_ms, wire.max_ms)]
            cells += [
                str(hist.count) if hist is not None else "-",
                _fmt(hist.p50_ms if hist else None, 3),
                _fmt(hist.p99_ms if hist else None, 3),
                f"{run.uac.failed} / {run.uac.retransmissions + run.trunk.retransmissions}",
                f"{wire.retransmitted_in}/{wire.repeated_out}/{wire.new_branch_out}",
                _cpu(run, run.target),
                _sipp_cpu(run),
                f"{run.host.others_pct:.0f}",
                "-" if wire.dropped_by_kernel is None else str(wire.dropped_by_kernel),
            ]
            verdict = "pass" if run.passed else "FAIL"
            out.append(
                f"| {run.target} | {run.kind} | {run.rate} | {verdict} | "
                + " | ".join(cells)
                + " |"
            )
        out.append("")
        out += _failure_notes([r for r in report.latency if not r.passed])

    runs = sorted(
        [s for m in report.max_searches for s in [*m.steps, *m.confirm]]
        + report.latency
        + ([report.soak] if report.soak is not None else []),
        key=_run_number,
    )
    names = sorted({u.name for r in runs for u in r.cpu}, key=_cpu_order)
    if runs:
        out += ["## CPU per process (% of one core: mean over the run, busiest second)", ""]
        out += [
            "kamailio: the sum of all its processes (main, UDP worker, timers, control socket; "
            "each one's seconds are in the JSON). Other processes: CPU of everything else on "
            f"the host during the run, % of one core (host busy is % of all {os.cpu_count()} "
            "cores).",
            "",
        ]
        out += [
            "| run | " + " | ".join(names) + " | other processes | host busy % | steal % |",
            "|---|" + "---|" * (len(names) + 3),
        ]
        for run in runs:
            cells = [_cpu(run, name) for name in names]
            out.append(
                f"| {run.target} {run.purpose} {run.kind} {run.rate}/s | "
                + " | ".join(cells)
                + f" | {run.host.others_pct:.0f} | {run.host.busy_pct:.0f}"
                + f" | {run.host.steal_pct:.0f} |"
            )
        out.append("")

    if report.soak is not None:
        out += _soak_section(report.soak)
    out += _edge_cpu_section(report)
    if _compared_edge({r.target for r in runs}) is not None and KAMAILIO in {
        r.target for r in runs
    }:
        out += _comparison(report)
    return "\n".join(out)


def _interval(samples: Sequence[RssSample]) -> str:
    if len(samples) < 2:
        return "-"
    return f"{samples[1].t_s - samples[0].t_s:g}"


def _compared_edge(targets: set[str]) -> str | None:
    """The edge compared with Kamailio: on the Redis store (the one Kamailio reads) if it was
    measured, else on the memory store."""
    for store in EDGE_STORES:
        if f"edge-{store}" in targets:
            return f"edge-{store}"
    return None


def _confirmed(search: MaxSearch) -> str:
    if not search.confirm:
        return "not run"
    if search.confirmed_rate is None:
        tried = ", ".join(str(run.rate) for run in search.confirm)
        return f"none (failed at {tried})"
    if search.confirmed_rate != search.best_rate:
        return f"{search.confirmed_rate} (failed at {search.confirm[0].rate})"
    return str(search.confirmed_rate)


def _max_figure(search: MaxSearch) -> int | None:
    """The rate a search is quoted at: confirmed by its long run, else its best step."""
    return search.confirmed_rate if search.confirm else search.best_rate


def _edge_cpu_section(report: Report) -> list[str]:
    """The edge's CPU per completed call at its maximum and at each latency point."""
    rows: list[str] = []
    for search in report.max_searches:
        if not search.target.startswith("edge-"):
            continue
        for run in search.confirm:
            rows.append(_edge_cpu_row(run, f"confirm run at {run.rate} calls/s"))
        if not search.confirm:
            best = next((s for s in search.steps if s.passed and s.rate == search.best_rate), None)
            if best is not None:
                rows.append(_edge_cpu_row(best, f"best step, {best.rate} calls/s"))
    for run in report.latency:
        if run.target.startswith("edge-"):
            rows.append(_edge_cpu_row(run, f"latency point, {run.rate} calls/s"))
    if report.soak is not None:
        rows.append(_edge_cpu_row(report.soak, f"soak, {report.soak.rate} calls/s"))
    if not rows:
        return []
    return [
        "## The edge's CPU per call",
        "",
        "CPU time (utime + stime) of the edge process divided by the calls completed, in us; "
        "% of one core in brackets. For comparison: the Kamailio reference spent about 150 us "
        "per 911 call, plus about 28 us in Redis (performance anchor, bench/README.md).",
        "",
        "| proxy | kind | run | us/call | edge CPU % | result |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _edge_cpu_row(run: RunResult, what: str) -> str:
    verdict = "pass" if run.passed else "FAIL"
    return (
        f"| {run.target} | {run.kind} | {what} | {_fmt(run.cpu_us_per_call, 0)} "
        f"| {_cpu(run, run.target)} | {verdict} |"
    )


# The soak judges growth from the first to the last minute: beyond this share of the first
# minute's peak, and this much memory, the RSS is not flat.
SOAK_FLAT_FRACTION = 0.05
SOAK_FLAT_MIN_KIB = 4096
SOAK_WINDOW_S = 60.0


@dataclass
class SoakVerdict:
    verdict: str
    """``flat``, ``growing``, ``shrinking``, or why it was not judged."""
    first_peak_kib: int = 0
    last_peak_kib: int = 0
    kib_per_1000_calls: float | None = None
    """Growth from the first minute's peak to the last one's, per 1,000 calls between."""


def soak_verdict(samples: Sequence[RssSample], duration: float, rate: int) -> SoakVerdict:
    """First minute (samples after the start, up to 60 s) against the last minute of the calls.

    Peaks rather than means: the edge's transaction tables fill during the first half minute
    or so (an ended transaction is kept for its 32 s timers) and then stay level, so the first
    minute's peak is the steady state, and memory that is never returned shows as a later
    peak above it.
    """
    first = [s.rss_kib for s in samples if 0 < s.t_s <= SOAK_WINDOW_S]
    last = [s.rss_kib for s in samples if duration - SOAK_WINDOW_S <= s.t_s <= duration + 1]
    if not first or not last:
        return SoakVerdict("not judged: no samples in the first or the last minute")
    result = SoakVerdict("flat", max(first), max(last))
    if duration < 2 * SOAK_WINDOW_S:
        result.verdict = "not judged: a soak under 2 minutes has no separate first and last minute"
        return result
    growth = result.last_peak_kib - result.first_peak_kib
    calls_between = rate * (duration - SOAK_WINDOW_S)
    if calls_between > 0:
        result.kib_per_1000_calls = round(growth / calls_between * 1000, 2)
    allowed = max(SOAK_FLAT_MIN_KIB, SOAK_FLAT_FRACTION * result.first_peak_kib)
    if growth > allowed:
        result.verdict = "growing"
    elif -growth > allowed:
        result.verdict = "shrinking"
    return result


def _soak_section(run: RunResult) -> list[str]:
    judged = soak_verdict(run.rss, run.duration_s, run.rate)
    per_calls = (
        ""
        if judged.kib_per_1000_calls is None
        else f", {judged.kib_per_1000_calls:g} KiB per 1,000 calls between them"
    )
    out = [
        "## Soak",
        "",
        f"{run.target}, {run.kind} calls at {run.rate} calls/s for {run.duration_s:g} s "
        f"({run.calls} calls from the provisioned lines in turn): "
        + ("pass" if run.passed else "FAIL: " + "; ".join(run.reasons))
        + f"; {run.trunk.mismatches} mismatches; edge CPU {_cpu(run, run.target)} % of one core, "
        f"{_fmt(run.cpu_us_per_call, 0)} us/call.",
        "",
        f"RSS of the edge (VmRSS from /proc/<pid>/status, every "
        f"{_interval(run.rss)} s): peak of the first minute {judged.first_peak_kib / 1024:.1f} "
        f"MiB, of the last minute {judged.last_peak_kib / 1024:.1f} MiB{per_calls}: "
        f"**{judged.verdict}** (flat: within {SOAK_FLAT_FRACTION:.0%} or "
        f"{SOAK_FLAT_MIN_KIB // 1024} MiB, whichever is larger; t = 0 is before the first call).",
        "",
        "| t s | RSS MiB |",
        "|---|---|",
    ]
    out += [f"| {sample.t_s:g} | {sample.rss_kib / 1024:.1f} |" for sample in run.rss]
    out.append("")
    out += _heap_table(run.heap)
    out += _failure_notes([run])
    return out


def _heap_table(samples: Sequence[HeapSample]) -> list[str]:
    """Where the RSS is (``--heap-probe``): what glibc handed out, what it keeps free, what
    Python's small-object allocator holds."""
    if not samples:
        return []
    out = [
        "Inside the edge (`--heap-probe`): glibc's `mallinfo2()` (in use: chunks handed out; "
        "free: held in its heaps, not returned to the system) and Python's allocated blocks.",
        "",
        "| t s | RSS MiB | glibc in use MiB | glibc free MiB | glibc mmapped MiB | Python blocks |",
        "|---|---|---|---|---|---|",
    ]
    out += [
        f"| {s.t_s:g} | {s.rss_kib / 1024:.1f} | {s.glibc_used_kib / 1024:.1f} "
        f"| {s.glibc_free_kib / 1024:.1f} | {s.glibc_mmap_kib / 1024:.1f} "
        f"| {s.python_blocks:,} |"
        for s in samples
    ]
    out.append("")
    return out


def _run_number(run: RunResult) -> int:
    """The order runs were taken in, from their directory name (``NN-...``)."""
    head = Path(run.workdir).name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _ratio(edge: float | None, kamailio: float | None, digits: int = 2) -> str:
    if edge is None or kamailio is None or kamailio == 0:
        return "-"
    return f"{edge / kamailio:.{digits}f}"


def _max_ratio(edge: MaxSearch, kamailio: MaxSearch) -> str:
    """edge / kamailio of the quoted maximum rates (confirmed ones when long runs were made);
    a bound when a search hit --max-rate."""
    edge_rate, kamailio_rate = _max_figure(edge), _max_figure(kamailio)
    if edge_rate is None or kamailio_rate is None:
        # A long run that failed leaves the 30 s steps: quoted, but marked as such.
        if edge.best_rate is None or kamailio.best_rate is None:
            return "-"
        return f"{_ratio(edge.best_rate, kamailio.best_rate, 3)} (unconfirmed: best steps)"
    ratio = _ratio(edge_rate, kamailio_rate, 3)
    if edge.capped and kamailio.capped:
        return f"{ratio} (both reached --max-rate)"
    if edge.capped:
        return f">= {ratio}"
    if kamailio.capped:
        return f"<= {ratio}"
    return ratio


def _max_cell(search: MaxSearch, interrupted: bool) -> str:
    if not search.confirm:
        return _best(search, interrupted)
    if search.confirmed_rate is None:
        best = "-" if search.best_rate is None else str(search.best_rate)
        return f"none confirmed (best step {best})"
    return str(search.confirmed_rate) + (" (--max-rate reached)" if search.capped else "")


def _comparison(report: Report) -> list[str]:
    """Edge next to Kamailio: max rate, wire latency and CPU per call, with ratios."""
    out = ["## Edge vs Kamailio (measured alternately in this session)", ""]
    out += [
        "Every measurement was taken for each proxy in turn before the next one, so a change in "
        "the host's speed falls on all. Ratios are edge / Kamailio: above 1 the edge sustains "
        "more calls/s, or takes more time or CPU per call. Maximum rates are the confirmed "
        "ones (the long run) when long runs were made. edge-redis reads the same redis-server "
        "as Kamailio (through its in-memory mirror); edge-memory is memory:// with the same "
        "records.",
        "",
    ]
    targets = {m.target for m in report.max_searches} | {r.target for r in report.latency}
    compared = _compared_edge(targets) or "edge-redis"
    searches = {(m.target, m.kind): m for m in report.max_searches}
    interrupted = report.environment.interrupted
    latency = _pairs(report.latency, compared)
    headline: list[str] = []
    for kind in KINDS:
        edge, kamailio = searches.get((compared, kind)), searches.get((KAMAILIO, kind))
        if edge is not None and kamailio is not None:
            headline.append(
                f"- {kind} maximum rate, {compared} / kamailio: **{_max_ratio(edge, kamailio)}** "
                f"({_max_cell(edge, interrupted)} / {_max_cell(kamailio, interrupted)} calls/s)"
            )
    for (kind, rate), pair in latency.items():
        if kind != "emergency":
            continue
        edge_wire, kamailio_wire = pair[compared].wire, pair[KAMAILIO].wire
        headline.append(
            f"- emergency INVITE in -> out at {rate} calls/s, {compared} / kamailio: p50 "
            f"**{_ratio(_p(edge_wire, 50), _p(kamailio_wire, 50))}**, p99 "
            f"**{_ratio(_p(edge_wire, 99), _p(kamailio_wire, 99))}** "
            f"({_wire_cell(pair[compared])} vs {_wire_cell(pair[KAMAILIO])} ms)"
        )
    if headline:
        out += [*headline, ""]

    edges = [f"edge-{store}" for store in EDGE_STORES if f"edge-{store}" in targets]
    kinds = [
        k for k in KINDS if (KAMAILIO, k) in searches and any((e, k) in searches for e in edges)
    ]
    if kinds:
        out += [
            "| kind | "
            + " | ".join(f"{e} max calls/s" for e in edges)
            + " | kamailio max calls/s | "
            + " | ".join(f"{e} / kamailio" for e in edges)
            + " |",
            "|---|" + "---|" * (2 * len(edges) + 1),
        ]
        for kind in kinds:
            kamailio = searches[(KAMAILIO, kind)]
            edge_searches = [searches.get((e, kind)) for e in edges]
            out.append(
                f"| {kind} | "
                + " | ".join("-" if m is None else _max_cell(m, interrupted) for m in edge_searches)
                + f" | {_max_cell(kamailio, interrupted)} | "
                + " | ".join("-" if m is None else _max_ratio(m, kamailio) for m in edge_searches)
                + " |"
            )
        out.append("")

    if latency:
        out += [
            f"Latency on the wire, INVITE in -> INVITE out, ms ({compared}; FAIL: the point "
            "missed the pass criteria):",
            "",
            "| kind | calls/s | edge p50 / p99 | kamailio p50 / p99 | p50 ratio | p99 ratio |",
            "|---|---|---|---|---|---|",
        ]
        for (kind, rate), pair in latency.items():
            edge_wire, kamailio_wire = pair[compared].wire, pair[KAMAILIO].wire
            out.append(
                f"| {kind} | {rate} | {_wire_cell(pair[compared])} | "
                f"{_wire_cell(pair[KAMAILIO])} "
                f"| {_ratio(_p(edge_wire, 50), _p(kamailio_wire, 50))} "
                f"| {_ratio(_p(edge_wire, 99), _p(kamailio_wire, 99))} |"
            )
        out.append("")

    cpu_pairs = _pairs([s for m in report.max_searches for s in m.steps], compared, purpose="max")
    cpu_pairs.update(
        _pairs([s for m in report.max_searches for s in m.confirm], compared, purpose="confirm")
    )
    cpu_pairs.update(_pairs(report.latency, compared, purpose="latency"))
    if cpu_pairs:
        out += [
            f"CPU per completed call, us, at every rate both ran ({compared}: the edge "
            "process; kamailio: all its processes; redis: the redis-server both read; FAIL: "
            "the run missed the pass criteria):",
            "",
            "| run | kind | calls/s | edge us/call | kamailio us/call | edge / kamailio "
            "| redis us/call, edge run / kamailio run |",
            "|---|---|---|---|---|---|---|",
        ]
        order = {"max": 0, "confirm": 1, "latency": 2}
        for key in sorted(cpu_pairs, key=lambda k: (order.get(k[0], 3), KINDS.index(k[1]), k[2])):
            purpose, kind, rate = key
            edge_run, kamailio_run = cpu_pairs[key][compared], cpu_pairs[key][KAMAILIO]
            out.append(
                f"| {purpose} | {kind} | {rate} | {_cpu_cell(edge_run)} "
                f"| {_cpu_cell(kamailio_run)} "
                f"| {_ratio(edge_run.cpu_us_per_call, kamailio_run.cpu_us_per_call)} "
                f"| {_fmt(edge_run.redis_us_per_call, 0)} / "
                f"{_fmt(kamailio_run.redis_us_per_call, 0)} |"
            )
        out.append("")
    return out


def _pairs(
    runs: Sequence[RunResult], edge: str, purpose: str | None = None
) -> dict[Any, dict[str, RunResult]]:
    """Runs of ``edge`` and Kamailio at the same kind and rate (and purpose), keyed by those."""
    by_key: dict[Any, dict[str, RunResult]] = {}
    for run in runs:
        key: Any = (run.kind, run.rate) if purpose is None else (purpose, run.kind, run.rate)
        by_key.setdefault(key, {})[run.target] = run
    return {key: pair for key, pair in by_key.items() if {edge, KAMAILIO} <= set(pair)}


def _p(wire: WireLatency | None, quantile: int) -> float | None:
    if wire is None or not wire.captured or not wire.paired:
        return None
    return wire.p50_ms if quantile == 50 else wire.p99_ms


def _wire_cell(run: RunResult) -> str:
    if _p(run.wire, 50) is None:
        return "no capture"
    text = f"{_fmt(_p(run.wire, 50), 3)} / {_fmt(_p(run.wire, 99), 3)}"
    return text if run.passed else text + " FAIL"


def _cpu_cell(run: RunResult) -> str:
    text = _fmt(run.cpu_us_per_call, 0)
    return text if run.passed else text + " FAIL"


def _cpu_order(name: str) -> tuple[int, str]:
    order = [
        "edge-redis",
        "edge-memory",
        KAMAILIO,
        "sipp caller",
        "sipp emergency trunk",
        "sipp default trunk",
    ]
    return (order.index(name) if name in order else len(order), name)


def _step_row(step: RunResult) -> str:
    retrans = f"{step.uac.retransmissions}/{step.trunk.retransmissions}"
    rcvbuf = step.udp_errors.get("RcvbufErrors", 0)
    result = "pass" if step.passed else "FAIL: " + "; ".join(step.reasons)
    mismatches = str(step.trunk.mismatches) if step.kind == "emergency" else "-"
    return (
        f"| {step.target} | {step.kind} | {step.purpose} {step.duration_s:g} s | {step.rate}"
        f" | {step.calls} | {step.uac.successful} | {step.uac.failed} | {retrans}"
        f" | {mismatches} | {step.late_s:.1f} | {_cpu(step, step.target)}"
        f" | {_fmt(step.cpu_us_per_call, 0)} | {_sipp_cpu(step)}"
        f" | {step.host.others_pct:.0f} | {rcvbuf} | {result} |"
    )


def _failure_notes(runs: Sequence[RunResult]) -> list[str]:
    out: list[str] = []
    for run in runs:
        if run.passed:
            continue
        out.append(
            f"- {run.target} {run.purpose} {run.kind} {run.rate} calls/s: "
            + "; ".join(run.reasons)
            + f" (logs: {run.workdir})"
        )
        for summary in (run.uac, run.trunk):
            for line in summary.errors:
                out.append(f"  - SIPp {summary.role}: {line}")
            if summary.out_of_call or summary.dead_call:
                out.append(
                    f"  - SIPp {summary.role}: {summary.out_of_call} out-of-call and "
                    f"{summary.dead_call} dead-call messages"
                )
        if run.edge is not None:
            for line in run.edge.log_problems:
                out.append(f"  - edge log: {line}")
            if run.edge.discarded or run.edge.delivery_failures:
                out.append(
                    f"  - edge metrics: {run.edge.discarded:g} messages discarded, "
                    f"{run.edge.delivery_failures:g} delivery failures"
                )
        if run.kamailio is not None:
            for line in run.kamailio.log_problems:
                out.append(f"  - kamailio log: {line}")
            stats = run.kamailio.statistics
            dropped = {k: v for k, v in stats.items() if k.startswith("core:drop") and v}
            if dropped:
                out.append(
                    "  - kamailio statistics: "
                    + ", ".join(f"{k} {v:g}" for k, v in sorted(dropped.items()))
                )
        udp = ", ".join(f"{k} {v}" for k, v in run.udp_errors.items() if v)
        if udp:
            out.append(f"  - host UDP counters during the run: {udp}")
    if out:
        out.append("")
    return out


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description="Load benchmark of the edge (and of Kamailio as a reference): max sustained "
        "rate, latency on the wire, CPU, and a soak mode for the edge's memory.",
    )
    parser.add_argument("--duration", type=float, help="seconds per rate step (default 30)")
    parser.add_argument(
        "--confirm-duration",
        type=float,
        help="seconds of the run confirming each search's best rate (default 60; 0: none)",
    )
    parser.add_argument(
        "--latency-duration", type=float, help="seconds per latency point (default 20)"
    )
    parser.add_argument(
        "--rates",
        default="200",
        help="calls/s of the latency points, comma-separated (default 200)",
    )
    parser.add_argument(
        "--start-rate", type=int, default=200, help="first step of the edge, calls/s (default 200)"
    )
    parser.add_argument(
        "--kamailio-start-rate",
        type=int,
        default=800,
        help="first step of Kamailio, calls/s (default 800)",
    )
    parser.add_argument("--max-rate", type=int, default=12800, help="highest step, calls/s")
    parser.add_argument(
        "--lines",
        type=int,
        default=DEFAULT_LINES,
        help=f"distinct provisioned lines the calls come from (default {DEFAULT_LINES})",
    )
    parser.add_argument(
        "--store",
        choices=("redis", "memory", "both"),
        default="both",
        help="the edge's location store: redis (the mirror loaded from the redis-server "
        "Kamailio reads), memory (memory:// seeded from a JSON file), or both as two proxies "
        "(default both; pass-through calls use the first only)",
    )
    parser.add_argument(
        "--target",
        choices=("edge", KAMAILIO, "both"),
        default="edge",
        help="the proxy to measure; both: the edge and Kamailio alternately (default edge)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="5 s steps and points, 10 s confirmations"
    )
    parser.add_argument("--only", choices=KINDS, help="one kind of call only")
    parser.add_argument("--skip-max", action="store_true", help="no max-rate search")
    parser.add_argument("--skip-latency", action="store_true", help="no latency points")
    parser.add_argument("--keep-pcap", action="store_true", help="keep the latency captures")
    parser.add_argument(
        "--soak",
        action="store_true",
        help="instead of the searches: the edge alone at --soak-rate for --soak-duration, "
        "its RSS read every --rss-interval seconds",
    )
    parser.add_argument(
        "--soak-duration", type=float, default=600.0, help="seconds of the soak (default 600)"
    )
    parser.add_argument(
        "--soak-rate",
        type=int,
        help="911 calls/s of the soak (default: half the edge's confirmed 911 maximum in the "
        "newest report in bench/results/ that has one)",
    )
    parser.add_argument(
        "--rss-interval", type=float, default=10.0, help="seconds between RSS reads (default 10)"
    )
    parser.add_argument(
        "--heap-probe",
        action="store_true",
        help="soak only: the edge also reports glibc's heap in use and free and Python's "
        "blocks from inside, every --rss-interval (where the RSS is)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="[sip] workers of the edge (default 1); above 1 needs --store redis",
    )
    parser.add_argument(
        "--edge-set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="a setting written into the edge's configuration, the value in TOML, e.g. "
        "records.enabled=false or log.level='\"WARNING\"' (repeatable; the report names them)",
    )
    args = parser.parse_args(argv)
    try:
        edge_settings = tuple(_edge_setting(text) for text in args.edge_set)
    except ValueError as exc:
        parser.error(f"--edge-set: {exc}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and args.store != "redis":
        parser.error("--workers above 1 needs --store redis (workers share the Redis store)")
    short = 5.0 if args.quick else None
    duration = args.duration or short or 30.0
    latency_duration = args.latency_duration or short or 20.0
    confirm_duration = args.confirm_duration
    if confirm_duration is None:
        confirm_duration = 10.0 if args.quick else 60.0
    try:
        rates = [int(part) for part in args.rates.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--rates: expected integers separated by commas, got {args.rates!r}")
    positive = (args.start_rate, args.kamailio_start_rate, args.max_rate, args.lines)
    if any(rate <= 0 for rate in [*rates, *positive]):
        parser.error("rates and --lines must be positive")
    if args.soak_rate is not None and args.soak_rate <= 0:
        parser.error("--soak-rate must be positive")
    if duration <= 0 or latency_duration <= 0 or confirm_duration < 0:
        parser.error("durations must be positive")
    if args.soak_duration <= 0 or args.rss_interval <= 0:
        parser.error("--soak-duration and --rss-interval must be positive")
    if args.soak and args.target == KAMAILIO:
        parser.error("--soak measures the edge: use --target edge")
    if args.heap_probe and not args.soak:
        parser.error("--heap-probe is a --soak option")
    # The soak measures the edge alone, on one store (Redis unless --store memory).
    store = ("memory" if args.store == "memory" else "redis") if args.soak else args.store
    return Options(
        duration=duration,
        latency_duration=latency_duration,
        rates=rates,
        start_rate=args.start_rate,
        max_rate=args.max_rate,
        store=store,
        quick=args.quick,
        only=args.only,
        skip_max=args.skip_max,
        skip_latency=args.skip_latency,
        keep_pcap=args.keep_pcap,
        # The soak measures the edge alone: Kamailio would only wait.
        target="edge" if args.soak else args.target,
        lines=args.lines,
        kamailio_start_rate=args.kamailio_start_rate,
        confirm_duration=confirm_duration,
        soak=args.soak,
        soak_duration=args.soak_duration,
        soak_rate=args.soak_rate,
        rss_interval=args.rss_interval,
        heap_probe=args.heap_probe,
        workers=args.workers,
        edge_settings=edge_settings,
    )


def _edge_setting(text: str) -> tuple[str, Any]:
    """``table.key=value`` (the value in TOML) as (``table.key``, value)."""
    dotted, sep, value = text.partition("=")
    names = dotted.strip().split(".")
    if not sep or len(names) < 2 or not all(names):
        raise ValueError(f"expected TABLE.KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{text!r}: the value is not TOML ({exc})") from exc
    return ".".join(names), parsed


def environment(options: Options, argv: Sequence[str]) -> Environment:
    return Environment(
        command=shlex.join([Path(sys.executable).name, *argv]),
        started_at=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        nproc=_run_text(["nproc"]),
        cpu_model=cpu_model(),
        kernel=platform.release(),
        python=platform.python_version(),
        uvloop=package_version("uvloop"),
        sipp=_first_line_matching(_run_text(["sipp", "-v"]), r"SIPp v"),
        tcpdump=_first_line_matching(_run_text(["tcpdump", "--version"]), r"tcpdump version"),
        redis_server=(
            _first_line_matching(_run_text(["redis-server", "--version"]), r"v=")
            if options.needs_redis
            else None
        ),
        kamailio=reference.version() if KAMAILIO in options.targets else None,
        git=_run_text(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"]),
        build=f"{edge_build.describe()} ({PACKAGE_ROOT})",
        targets=" and ".join(options.targets)
        + (", alternating" if len(options.targets) > 1 else ""),
        store=_store_text(options),
        loadavg_before=loadavg(),
        speed_probe_before_ms=speed_probe(),
    )


def _store_text(options: Options) -> str:
    lines = (
        f"{options.lines} lines e911:line:{FIRST_LINE}..{FIRST_LINE + options.lines - 1}, "
        f"provider_endpoint {ENDPOINT_ACCOUNT}/probeN; callers as +1N, 1N and N in From and "
        "P-Asserted-Identity"
    )
    stores = {
        "redis": "edge-redis: serve --role edge, redis:// with [store] mirror = true (records "
        "loaded from the private redis-server into memory)",
        "memory": "edge-memory: serve --role all (the embedded box), memory:// seeded from a "
        "JSON file ([store] seed_file)",
    }
    parts = [lines]
    if any(t.startswith("edge-") for t in options.targets):
        parts += [stores[store] for store in options.edge_stores]
    if KAMAILIO in options.targets:
        parts.append("kamailio: ndb_redis HGET on the same redis-server per 911 call")
    if options.edge_settings and any(t.startswith("edge-") for t in options.targets):
        settings = ", ".join(f"{key} = {json.dumps(value)}" for key, value in options.edge_settings)
        parts.append(f"the edge's configuration also sets {settings}")
    return "; ".join(parts)


def soak_rate_from_results(results: Path) -> tuple[int, str] | None:
    """Half the edge's confirmed 911 maximum (Redis store first) from the newest report in
    ``results`` that has one, with that report's name."""
    for path in sorted(results.glob("*.json"), reverse=True):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            searches = data.get("max_searches") or []
        except (OSError, ValueError, AttributeError):
            continue
        for store in EDGE_STORES:
            for search in searches:
                if not isinstance(search, dict):
                    continue
                rate = search.get("confirmed_rate")
                if (
                    search.get("target") == f"edge-{store}"
                    and search.get("kind") == "emergency"
                    and isinstance(rate, int)
                    and rate > 0
                ):
                    return max(1, rate // 2), path.name
    return None


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same path as Ctrl-C, so every process is stopped by the finally blocks.
    # Further signals are ignored meanwhile: a second Ctrl-C must not cut that cleanup short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(args)
    for tool in ("sipp", "tcpdump"):
        if shutil.which(tool) is None:
            print(f"warning: {tool} is not installed", file=sys.stderr)
    if options.soak and options.soak_rate is None:
        found = soak_rate_from_results(RESULTS_DIR)
        if found is None:
            print(
                "error: --soak needs --soak-rate (half the edge's 911 maximum); no report in "
                f"{RESULTS_DIR} has a confirmed 911 maximum of the edge to take it from",
                file=sys.stderr,
            )
            return 2
        options.soak_rate, source = found
        print(f"soak at {options.soak_rate} calls/s: half the edge's 911 maximum in {source}")
    if KAMAILIO in options.targets:
        # Refuse before anything starts: a missing package would otherwise surface as a failed
        # step in the middle of the run.
        missing = [] if shutil.which("redis-server") else ["redis-server (apt-get install redis)"]
        try:
            reference.check_config()
        except reference.KamailioUnavailable as exc:
            missing.append(str(exc))
        if missing:
            print(
                f"error: --target {options.target} needs Kamailio and redis-server:\n  "
                + "\n  ".join(missing)
                + "\n(use --target edge to measure the edge alone)",
                file=sys.stderr,
            )
            return 2
    # SIGINT too: a shell starting the script in the background leaves SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS_DIR / stamp
    report = Report(
        environment=environment(options, [sys.argv[0], *args]),
        options=asdict(options),
    )
    status = 0
    try:
        with LoadBench(options, workdir) as bench:
            if options.soak:
                run_soak(bench, report, options.soak_rate or 1)
            else:
                if not options.skip_max:
                    run_max_searches(bench, report)
                if not options.skip_latency:
                    run_latency_points(bench, report)
    except KeyboardInterrupt:
        report.environment.interrupted = True
        status = 130
    except HarnessError as exc:
        report.environment.error = f"{type(exc).__name__}: {str(exc)[:2000]}"
        status = 1
    finally:
        report.environment.finished_at = (
            dt.datetime.now().astimezone().isoformat(timespec="seconds")
        )
        report.environment.loadavg_after = loadavg()
        report.environment.speed_probe_after_ms = speed_probe()
        text = render(report)
        (RESULTS_DIR / f"{stamp}.md").write_text(text + "\n", encoding="utf-8")
        (RESULTS_DIR / f"{stamp}.json").write_text(
            json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8"
        )
        print()
        print(text)
        print(f"\nwritten: {RESULTS_DIR / stamp}.md, {RESULTS_DIR / stamp}.json, logs in {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
