"""Fault and attack bench: the real edge under floods, forgeries, relay attempts and faults.

Every scenario starts a fresh edge process (``python -m e911_sip serve``) reading a real
redis-server (``redis://``), with SIPp trunks behind it, all on loopback through the
integration harness (tests/integration/harness.py). Throughout each scenario, probe 911 calls
go to the edge at ``--probe-rate`` per second from the softswitch's address (127.0.0.1), each
from its own provisioned line: ``--lines`` lines ``e911:line:NNNNNNNNNN`` hold
``provider_endpoint 777777/probeNNNNNNNNNN``, the caller SIPp (uac_911_probe.xml) reads its
callers from an injection file (``-inf``), and the emergency trunk (uas_emergency_probe.xml)
logs each INVITE and checks that its Geolocation names the caller's own line. Attackers use
their own loopback address, 127.0.0.9, outside ``[security] trusted_sources``.

For each scenario the report gives the probes placed, those that reached the emergency trunk,
those enriched there with their own caller's location, those completed (caller side), the
edge's RSS before, at peak (VmRSS sampled every 100 ms) and after, its CPU, and the counters
of /metrics that matter (discards by reason, failovers, emergency outcomes):

1. ``flood``: non-emergency INVITEs from the trusted softswitch at ``--flood-rate`` (default
   twice the ~800 calls/s of docs/performance-history.md), answered by a SIPp default trunk;
2. ``garbage``: malformed datagrams from 127.0.0.9 (random bytes, truncated SIP, huge
   Content-Length, bad headers, oversized) at ``--datagram-rate``;
3. ``forged``: 503/200/487 responses with plausible branches, Call-IDs and tags sprayed at
   the edge from 127.0.0.9 and from other ports of 127.0.0.1;
4. ``relay``: relay attempts from 127.0.0.9 (INVITE to 911 claiming a provisioned line,
   INVITE with a Route to a victim, MESSAGE with a To-tag, ACK, OPTIONS), counted at the
   victim (must be 0) and at both trunks;
5. ``halfopen``: ``--half-open`` TCP connections from 127.0.0.9 each holding a partial header
   block, with UDP probes and TCP probes from 127.0.0.1;
6. ``burst``: ``--burst`` simultaneous 911 calls from as many lines;
7. ``redis-pause`` / ``redis-kill``: redis-server stopped with SIGSTOP for ``--fault-s``
   seconds, and killed then restarted, during probes (half of the probes during the fault
   come from lines already called, which the edge may serve from its cache);
8. ``blackhole``: the primary emergency trunk never answers, the secondary is a SIPp trunk;
9. ``sigterm``: SIGTERM to the edge while 911 and ordinary dialogs are up; the drain must
   let them complete (the BYE of an answered 911 dialog still routes through the edge).

    python bench/attack.py                       # everything, about 7 minutes
    python bench/attack.py --only forged relay --duration 10
    make attack ARGS="--flood-rate 1200"

Output: a Markdown report on stdout and in ``bench/results/attack-<timestamp>.md``, the raw
figures in ``attack-<timestamp>.json``, every process's files under
``bench/results/attack-<timestamp>/``. Run by hand; not part of the tests. All traffic goes to
127.0.0.0/8, every loop is bounded in count and time, and every process started is stopped by
PID at the end, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import selectors
import shlex
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.run_load import (  # noqa: E402
    CpuSampler,
    _first_line_matching,
    _run_text,
    _terminate,
    cpu_model,
    loadavg,
    udp_counters,
)
from tests.integration.harness import (  # noqa: E402
    LOOPBACK,
    EdgeProcess,
    HarnessError,
    RedisServer,
    SilentUdpPeer,
    Sipp,
    SippProcess,
    SippResult,
    edge_config,
    free_port,
    free_port_pair,
    trunk_uri,
)

from e911_sip.build import describe as describe_build  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
ATTACKER = "127.0.0.9"
"""The attackers' own loopback address, outside the default trusted sources."""
FIRST_LINE = 3_210_000_000
ENDPOINT_ACCOUNT = "777777"
PASSTHROUGH = "2125550100"
SIPP_BUFFER = 4 * 1024 * 1024
RSS_INTERVAL_S = 0.1
PROBE_HOLD_MS = 100
# A probe that got no answer for this long is failed by its SIPp (-recv_timeout).
PROBE_RECV_TIMEOUT_MS = 15_000
# Bounds on the waits after a scenario's traffic: SIPp gets this much beyond its own calls.
SIPP_MARGIN_S = 40.0
TRUNK_SETTLE_S = 10.0
EDGE_EXIT_S = 60.0
SCENARIOS = (
    "flood",
    "garbage",
    "forged",
    "relay",
    "halfopen",
    "burst",
    "redis-pause",
    "redis-kill",
    "blackhole",
    "sigterm",
)


def endpoint_of(line: str) -> str:
    """The provider_endpoint of a probe line; uas_emergency_probe.xml derives it the same way."""
    return f"{ENDPOINT_ACCOUNT}/probe{line}"


# ----------------------------------------------------------------------------- results


@dataclass
class ProbeResult:
    """The probe 911 calls of one caller SIPp, seen from both ends."""

    transport: str
    placed: int
    """Calls the caller SIPp created."""
    answered: int
    """Calls whose INVITE got its 200 back at the caller (from SIPp's message counts)."""
    completed: int
    """Calls the caller completed (INVITE answered 200, ACK, BYE answered 200)."""
    failed: int
    reached_trunk: int
    """Distinct Call-IDs of these probes that reached the emergency trunk."""
    enriched_own: int
    """Of those, with exactly one Geolocation naming the caller's own line."""
    enriched_other: int
    """With a Geolocation of another line (must be 0)."""
    unenriched: int
    """With no Geolocation of the probe form."""
    failure_causes: dict[str, int] = field(default_factory=dict)
    """SIPp's Failed* counters of the caller (e.g. TimeoutOnRecv: no answer in time)."""
    caller_errors: list[str] = field(default_factory=list)


@dataclass
class Rss:
    """The edge's VmRSS, KiB."""

    before_kib: int = 0
    peak_kib: int = 0
    after_kib: int = 0


@dataclass
class EdgeFigures:
    """What the edge's /metrics said at the end of a scenario (deltas are not needed: each
    scenario has its own edge)."""

    discarded: dict[str, float] = field(default_factory=dict)
    failovers: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, float] = field(default_factory=dict)
    results: dict[str, float] = field(default_factory=dict)
    requests: dict[str, float] = field(default_factory=dict)
    delivery_failures: float = 0.0
    udp_errors: dict[str, int] = field(default_factory=dict)
    """Host-wide UDP error counters over the scenario (RcvbufErrors: datagrams the kernel
    dropped because a socket's receive buffer was full, the edge's or a SIPp's)."""
    socket_drops: int | None = None
    """Datagrams the kernel dropped at the edge's own UDP SIP socket (its receive buffer
    full), from /proc/net/udp."""
    cpu_mean_pct: float | None = None
    cpu_peak_pct: float | None = None
    running_at_end: bool = True
    metrics_error: str | None = None
    log_problems: list[str] = field(default_factory=list)


@dataclass
class ScenarioResult:
    """Common to every scenario: what it did, its probes, the edge's memory and counters."""

    name: str
    title: str
    attack: str
    probes: list[ProbeResult] = field(default_factory=list)
    rss: Rss = field(default_factory=Rss)
    edge: EdgeFigures = field(default_factory=EdgeFigures)
    wall_s: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    workdir: str = ""

    def details(self) -> list[str]:
        """Scenario-specific lines of the report."""
        return []


@dataclass
class FloodResult(ScenarioResult):
    rate: int = 0
    flood_placed: int = 0
    flood_completed: int = 0
    flood_failed: int = 0
    flood_retransmissions: int = 0
    default_trunk_calls: int = 0
    flood_failure_causes: dict[str, int] = field(default_factory=dict)

    def details(self) -> list[str]:
        return [
            f"flood caller: {self.flood_placed} INVITEs placed at {self.rate}/s, "
            f"{self.flood_completed} completed, {self.flood_failed} failed, "
            f"{self.flood_retransmissions} retransmissions; the default trunk completed "
            f"{self.default_trunk_calls}; flood failures by cause: "
            + (", ".join(f"{k} {v}" for k, v in self.flood_failure_causes.items()) or "none")
        ]


@dataclass
class GarbageResult(ScenarioResult):
    rate: int = 0
    sent: int = 0
    send_errors: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    answers_to_attacker: int = 0

    def details(self) -> list[str]:
        kinds = ", ".join(f"{k} {v}" for k, v in self.kinds.items())
        return [
            f"sent {self.sent} datagrams from {ATTACKER} (asked {self.rate}/s; "
            f"{self.send_errors} send errors): {kinds}",
            f"datagrams the edge sent back to the attacker: {self.answers_to_attacker}",
        ]


@dataclass
class ForgedResult(ScenarioResult):
    rate: int = 0
    sent_from_attacker: int = 0
    sent_from_same_host: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def details(self) -> list[str]:
        statuses = ", ".join(f"{k} {v}" for k, v in self.by_status.items())
        return [
            f"forged responses: {self.sent_from_attacker} from {ATTACKER}, "
            f"{self.sent_from_same_host} from other ports of 127.0.0.1 ({statuses}); "
            "branches of the edge's form (z9hG4bK + 22 random base64url characters), "
            "the probes' predictable Call-IDs, tags and CSeq"
        ]


@dataclass
class RelayResult(ScenarioResult):
    sent: dict[str, int] = field(default_factory=dict)
    victim_received: int = 0
    emergency_trunk_received: int = 0
    default_trunk_received: int = 0
    answers_to_attacker: int = 0

    def details(self) -> list[str]:
        sent = ", ".join(f"{k} {v}" for k, v in self.sent.items())
        return [
            f"sent from {ATTACKER}: {sent}",
            f"reached the victim: **{self.victim_received}** (must be 0); the emergency "
            f"trunk: {self.emergency_trunk_received} attacker INVITEs; the default trunk: "
            f"{self.default_trunk_received} datagrams; answers to the attacker: "
            f"{self.answers_to_attacker}",
        ]


@dataclass
class HalfOpenResult(ScenarioResult):
    wanted: int = 0
    connected: int = 0
    connect_failures: int = 0
    connect_s: float = 0.0
    open_at_end: int = 0
    closed_by_edge: int = 0
    nofile_limit: int = 0

    def details(self) -> list[str]:
        return [
            f"{self.connected} of {self.wanted} connections from {ATTACKER} opened in "
            f"{self.connect_s:.1f} s ({self.connect_failures} failed), each holding a partial "
            f"header block; at the end {self.open_at_end} still open, {self.closed_by_edge} "
            f"closed by the edge (bench RLIMIT_NOFILE {self.nofile_limit})"
        ]


@dataclass
class BurstResult(ScenarioResult):
    calls: int = 0
    hold_ms: int = 0

    def details(self) -> list[str]:
        return [
            f"{self.calls} 911 calls from {self.calls} distinct lines created within "
            f"~{self.calls / 3000:.1f} s, each held {self.hold_ms} ms, so all are up at once"
        ]


@dataclass
class RedisFaultResult(ScenarioResult):
    fault: str = ""
    fault_s: float = 0.0
    fault_at_s: float = 0.0
    restart_s: float | None = None

    def details(self) -> list[str]:
        restart = (
            f"; redis-server answered again {self.restart_s:.1f} s after the restart began"
            if self.restart_s is not None
            else ""
        )
        return [
            f"{self.fault} at {self.fault_at_s:.1f} s into the probes for {self.fault_s:g} s"
            + restart
        ]


@dataclass
class BlackholeResult(ScenarioResult):
    silent_received: int = 0
    provisional_timeout_s: float = 0.0

    def details(self) -> list[str]:
        return [
            f"the silent primary received {self.silent_received} datagrams; each probe waited "
            f"[emergency] provisional_timeout = {self.provisional_timeout_s:g} s before the "
            "secondary was tried"
        ]


@dataclass
class DrainResult(ScenarioResult):
    load_rate: int = 0
    load_placed: int = 0
    load_completed: int = 0
    load_failed: int = 0
    hold_ms: int = 0
    readiness_after_signal: str = ""
    exit_code: int | None = None
    exit_s: float | None = None
    emergency_dialogs_at_signal: str = ""

    def details(self) -> list[str]:
        exit_text = (
            f"exited with {self.exit_code} {self.exit_s:.1f} s after SIGTERM"
            if self.exit_code is not None and self.exit_s is not None
            else "did not exit within the bound"
        )
        return [
            f"SIGTERM once every call was placed (911 and ordinary dialogs held {self.hold_ms} "
            f"ms); /readyz right after: {self.readiness_after_signal}; the edge {exit_text}",
            f"ordinary calls at {self.load_rate}/s: {self.load_placed} placed, "
            f"{self.load_completed} completed, {self.load_failed} failed",
            f"edge readiness at the signal: {self.emergency_dialogs_at_signal}",
        ]


@dataclass
class Environment:
    command: str
    started_at: str
    finished_at: str = ""
    nproc: str = ""
    cpu_model: str = ""
    kernel: str = ""
    python: str = ""
    build: str = ""
    sipp: str = ""
    redis_server: str = ""
    git: str = ""
    loadavg_before: str = ""
    loadavg_after: str = ""
    interrupted: bool = False
    error: str | None = None


@dataclass
class Options:
    only: list[str]
    duration: float
    probe_rate: float
    flood_rate: int
    datagram_rate: int
    lines: int
    half_open: int
    burst: int
    fault_s: float


# ------------------------------------------------------------------------ small tools


class BenchSipp(Sipp):
    """The harness's SIPp runner without the per-message trace (hundreds of MB in a flood);
    the action log stays: the probe trunk writes one line per INVITE there."""

    def _command(self, scenario: str | Path, **kwargs: Any) -> tuple[list[str], Path, str]:
        command, rundir, name = super()._command(scenario, **kwargs)
        kept: list[str] = []
        skip = 0
        for part in command:
            if skip:
                skip -= 1
            elif part == "-trace_msg":
                continue
            elif part == "-message_file":
                skip = 1
            else:
                kept.append(part)
        return kept, rundir, name


class Lines:
    """Hands out distinct provisioned lines; wraps around (and says so) when exhausted."""

    def __init__(self, count: int) -> None:
        self.all = [str(FIRST_LINE + i) for i in range(count)]
        self._next = 0
        self.wrapped = False

    def take(self, count: int) -> list[str]:
        out: list[str] = []
        for _ in range(count):
            if self._next >= len(self.all):
                self._next = 0
                self.wrapped = True
            out.append(self.all[self._next])
            self._next += 1
        return out


class RssSampler:
    """VmRSS of one process every ``RSS_INTERVAL_S`` in a thread, bounded in samples."""

    def __init__(self, pid: int, max_s: float) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._max_samples = int(max_s / RSS_INTERVAL_S) + 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def read(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib = int(line.split()[1])
                    self.peak_kib = max(self.peak_kib, kib)
                    return kib
        return 0

    def _run(self) -> None:
        for _ in range(self._max_samples):
            if self._stop.wait(RSS_INTERVAL_S):
                return
            self.read()

    def start(self) -> int:
        before = self.read()
        self._thread.start()
        return before

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.read()


class Paced(threading.Thread):
    """Calls ``send(i)`` ``rate`` times a second for ``duration`` s: at most ``rate*duration``
    calls, ending by ``duration + 5`` s or when stopped, whichever comes first."""

    def __init__(self, name: str, rate: float, duration: float, send: Callable[[int], None]):
        super().__init__(name=name, daemon=True)
        self.rate = rate
        self.duration = duration
        self.send = send
        self.sent = 0
        self.errors = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        total = int(self.rate * self.duration)
        start = time.monotonic()
        while self.sent < total and not self.stopped.is_set():
            elapsed = time.monotonic() - start
            if elapsed > self.duration + 5.0:
                break
            due = min(total, int(elapsed * self.rate) + 1)
            while self.sent < due:
                try:
                    self.send(self.sent)
                except OSError:
                    self.errors += 1
                self.sent += 1
            self.stopped.wait(0.005)

    def finish(self, timeout: float) -> None:
        self.join(timeout=timeout)
        self.stopped.set()
        self.join(timeout=5)


def udp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    return sock


def udp_socket_drops(port: int) -> int | None:
    """The kernel's drop counter of the IPv4 UDP socket bound to ``port`` (None: not found)."""
    with contextlib.suppress(OSError):
        for row in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = row.split()
            if len(fields) > 12 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[-1])
    return None


def drain_socket(sock: socket.socket, limit: int = 100_000) -> int:
    """Datagrams waiting on a non-blocking socket, read and counted (bounded)."""
    count = 0
    for _ in range(limit):
        try:
            sock.recvfrom(65535)
        except (BlockingIOError, OSError):
            break
        count += 1
    return count


def sipp_stat(process: SippProcess, column: str) -> int:
    """A column of the last row SIPp wrote to its statistics file so far (-fd 1)."""
    try:
        rows = [r for r in process.files["stats"].read_text().splitlines() if r.strip()]
    except OSError:
        return 0
    if len(rows) < 2:
        return 0
    values = dict(zip(rows[0].split(";"), rows[-1].split(";"), strict=False))
    try:
        return int(float(values.get(column, "0")))
    except ValueError:
        return 0


def wait_until(ready: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


_ERROR_KIND = re.compile(r"\d+")


def error_kinds(result: SippResult, limit: int = 3) -> list[str]:
    kinds: Counter[str] = Counter()
    for line in result.error_log.splitlines():
        if ":" not in line or not line[:4].isdigit():
            continue
        text = line.split(": ", 1)[-1]
        kinds[_ERROR_KIND.sub("#", text)[:140]] += 1
    return [f"{n}x {text}" for text, n in kinds.most_common(limit)]


_SCREEN_200 = re.compile(r"^\s*200 <-+\s+(\d+)", re.MULTILINE)


def answered(result: SippResult) -> int:
    """200s to the INVITE the caller received: the first '200 <---' row of the last message
    table SIPp drew on its screen (the second is the 200 to the BYE)."""
    try:
        screen = result.files["screen"].read_text(errors="replace")
    except (KeyError, OSError):
        return 0
    tables = screen.split("Messages  Retrans")
    found = _SCREEN_200.findall(tables[-1]) if len(tables) > 1 else []
    return int(found[0]) if found else 0


def failure_causes(result: SippResult) -> dict[str, int]:
    causes: dict[str, int] = {}
    for column, value in result.stats.items():
        if column.startswith("Failed") and column.endswith("(C)") and column != "FailedCall(C)":
            with contextlib.suppress(ValueError):
                if int(float(value)):
                    causes[column[len("Failed") : -len("(C)")]] = int(float(value))
    return causes


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def by_label(text: str, name: str, *labels: str) -> dict[str, float]:
    """Non-zero samples of ``name`` keyed by the values of ``labels`` joined with '/'."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        found = dict(_LABEL.findall(match.group(2) or ""))
        value = float(match.group(3))
        if value:
            key = "/".join(found.get(label, "") for label in labels)
            out[key] = out.get(key, 0.0) + value
    return out


def log_problems(log: str, limit: int = 5) -> list[str]:
    kinds: Counter[str] = Counter()
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if line.strip():
                kinds[f"(not JSON) {line.strip()[:120]}"] += 1
            continue
        if isinstance(record, dict) and record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            detail = record.get("reason") or record.get("error") or ""
            kinds[f"{record['level']} {record.get('msg', '')} {detail}".strip()[:140]] += 1
    return [f"{n}x {text}" for text, n in kinds.most_common(limit)]


# -------------------------------------------------------------------------- the stage


class Stage:
    """One scenario's processes: its edge, SIPp runner, peers and attack threads, every one
    stopped (by PID for processes) when the scenario ends, however it ends."""

    def __init__(self, bench: AttackBench, result: ScenarioResult) -> None:
        self.bench = bench
        self.result = result
        self.dir = bench.workdir / f"{len(bench.results) + 1:02d}-{result.name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        result.workdir = str(self.dir)
        self.sipp = BenchSipp(self.dir)
        self.edge: EdgeProcess | None = None
        self.rss: RssSampler | None = None
        self.cpu: CpuSampler | None = None
        self.threads: list[Paced] = []
        self.closers: list[Callable[[], None]] = []
        self.probe_trunks: list[SippProcess] = []
        self._started = time.monotonic()
        self._udp_before: dict[str, int] | None = None
        self._drops_before: int | None = None

    # -- processes

    def start_edge(
        self,
        *,
        emergency_trunks: list[str],
        default_trunks: list[str] | None = None,
        **overrides: Any,
    ) -> EdgeProcess:
        default = default_trunks or [trunk_uri(free_port("udp"))]
        config = edge_config(
            sip_port=free_port_pair(),
            http_port=free_port("tcp"),
            emergency_trunks=emergency_trunks,
            default_trunks=default,
            store_url=self.bench.redis.url,
            **overrides,
        )
        self.edge = EdgeProcess(self.dir, config)
        self.edge.start(timeout=30.0)
        return self.edge

    def probe_trunk(self, port: int | None = None) -> tuple[SippProcess, int]:
        """The emergency trunk that checks each probe's own location (uas_emergency_probe)."""
        port = port or free_port("udp")
        trunk = self.sipp.uas(
            "uas_emergency_probe",
            port=port,
            calls=1_000_000,
            timeout=self.bench.options.duration + 600,
            extra=["-fd", "1", "-buff_size", str(SIPP_BUFFER)],
        )
        self.probe_trunks.append(trunk)
        return trunk, port

    def default_trunk(self) -> tuple[SippProcess, int]:
        port = free_port("udp")
        trunk = self.sipp.uas(
            "uas_load",
            port=port,
            calls=10_000_000,
            timeout=self.bench.options.duration + 600,
            extra=["-fd", "1", "-buff_size", str(SIPP_BUFFER)],
        )
        return trunk, port

    def start_probes(
        self,
        lines: Sequence[str],
        *,
        rate: float | None = None,
        transport: str = "u1",
        hold_ms: int = PROBE_HOLD_MS,
        limit: int | None = None,
    ) -> SippProcess:
        """A caller SIPp placing one 911 call per line in ``lines``, in order, at ``rate``."""
        assert self.edge is not None
        rate = rate or self.bench.options.probe_rate
        csv = self.dir / f"probe-lines-{len(self.threads)}-{transport}-{len(lines)}.csv"
        csv.write_text("SEQUENTIAL\n" + "".join(f"{line};\n" for line in lines))
        extra = ["-inf", str(csv), "-fd", "1", "-buff_size", str(SIPP_BUFFER)]
        extra += ["-recv_timeout", str(PROBE_RECV_TIMEOUT_MS)]
        if limit is not None:
            extra += ["-l", str(limit)]
        return self.sipp.start_uac(
            "uac_911_probe",
            self.edge.sip_target,
            service="911",
            transport=transport,
            keys={"hold_ms": str(hold_ms)},
            calls=len(lines),
            rate=rate,
            timeout=len(lines) / rate + hold_ms / 1000 + SIPP_MARGIN_S,
            extra=extra,
        )

    def watch(self, max_s: float) -> None:
        """Start sampling the edge's RSS and CPU; the RSS read now is 'before'."""
        assert self.edge is not None and self.edge.pid is not None
        self.rss = RssSampler(self.edge.pid, max_s)
        self.result.rss.before_kib = self.rss.start()
        self.cpu = CpuSampler({"edge": self.edge.pid}, interval=1.0, max_s=max_s)
        self.cpu.start()
        self._udp_before = udp_counters()
        self._drops_before = udp_socket_drops(self.edge.sip_port)

    def attack(self, name: str, rate: float, duration: float, send: Callable[[int], None]) -> Paced:
        thread = Paced(name, rate, duration, send)
        self.threads.append(thread)
        thread.start()
        return thread

    # -- collecting

    def finish_probes(self, uacs: Sequence[tuple[SippProcess, set[str]]]) -> None:
        """Wait for the probe callers, let the trunk see the last BYEs, count both ends."""
        results = [(uac.wait(timeout=_uac_bound(uac)), lines) for uac, lines in uacs]
        seen = self.trunk_calls()
        for (result, lines), (uac, _) in zip(results, uacs, strict=True):
            mine = {cid: entry for cid, entry in seen.items() if entry[0] in lines}
            own = sum(1 for caller, geo, second in mine.values() if geo == caller and not second)
            other = sum(1 for caller, geo, _ in mine.values() if geo and geo != caller)
            self.result.probes.append(
                ProbeResult(
                    transport="tcp" if uac.transport.startswith("t") else "udp",
                    placed=int(float(result.stats.get("TotalCallCreated", "0") or 0)),
                    answered=answered(result),
                    completed=result.successful,
                    failed=result.failed,
                    reached_trunk=len(mine),
                    enriched_own=own,
                    enriched_other=other,
                    unenriched=sum(1 for _c, geo, _s in mine.values() if not geo),
                    failure_causes=failure_causes(result),
                    caller_errors=error_kinds(result),
                )
            )

    def trunk_calls(self) -> dict[str, tuple[str, str, str]]:
        """Call-ID -> (caller, geolocation line number, second Geolocation) from the trunks'
        action logs, once every trunk has finished the calls it received (bounded)."""

        def settled() -> bool:
            return all(
                sipp_stat(t, "SuccessfulCall(C)") + sipp_stat(t, "FailedCall(C)")
                >= sipp_stat(t, "TotalCallCreated")
                and sipp_stat(t, "CurrentCall") == 0
                for t in self.probe_trunks
            )

        wait_until(settled, TRUNK_SETTLE_S, interval=0.5)
        seen: dict[str, tuple[str, str, str]] = {}
        for trunk in self.probe_trunks:
            with contextlib.suppress(OSError):
                for line in trunk.files["log"].read_text(errors="replace").splitlines():
                    match = _PROBE_LOG.search(line)
                    if match:
                        caller, geo, second, call_id = match.groups()
                        seen.setdefault(call_id, (caller, geo, second.strip()))
        return seen

    def finish_edge(self) -> None:
        """Read /metrics and the log, stop the samplers."""
        result = self.result
        figures = result.edge
        if self.edge is not None:
            figures.running_at_end = self.edge.running
            if self.edge.running:
                try:
                    text = self.edge.metrics()
                    self.bench.fill_metrics(figures, text)
                except (OSError, HarnessError) as exc:
                    figures.metrics_error = str(exc)[:300]
            figures.log_problems = log_problems(self.edge.log_text())
            drops = udp_socket_drops(self.edge.sip_port) if self.edge.running else None
            if drops is not None and self._drops_before is not None:
                figures.socket_drops = drops - self._drops_before
        if self._udp_before is not None:
            after = udp_counters()
            figures.udp_errors = {
                k: v - self._udp_before.get(k, 0) for k, v in after.items() if k in self._udp_before
            }
            self._udp_before = None
        if self.rss is not None:
            result.rss.after_kib = self.rss.stop() or result.rss.after_kib
            result.rss.peak_kib = max(self.rss.peak_kib, result.rss.before_kib)
        if self.cpu is not None:
            usage = self.cpu.stop()
            if usage:
                figures.cpu_mean_pct = usage[0].mean_pct
                figures.cpu_peak_pct = usage[0].peak_pct
            self.cpu = None

    def close(self) -> None:
        for thread in self.threads:
            thread.stopped.set()
        for thread in self.threads:
            thread.join(timeout=5)
        if self.rss is not None:
            self.rss.stop()
        if self.cpu is not None:
            with contextlib.suppress(Exception):
                self.cpu.stop()
        self.sipp.close()
        if self.edge is not None:
            self.edge.stop()
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()
        self.result.wall_s = round(time.monotonic() - self._started, 1)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PROBE_LOG = re.compile(r"probe caller=(\d*) geo=(\d*) second=(.*?) call_id=(\S+)")


def _uac_bound(uac: SippProcess) -> float:
    """How long to wait for a caller SIPp: its own -timeout plus a margin."""
    try:
        value = uac.command[uac.command.index("-timeout") + 1]
        return float(value.rstrip("s")) + 15.0
    except (ValueError, IndexError):
        return 120.0


# ------------------------------------------------------------------------------ bench


class AttackBench:
    """The session: one redis-server with every probe line, and the scenarios' results."""

    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.lines = Lines(options.lines)
        self.results: list[ScenarioResult] = []
        workdir.mkdir(parents=True, exist_ok=True)
        # Append-only, so that a killed and restarted redis-server comes back with the lines,
        # as a real one restarting from its disk would.
        self.redis = RedisServer(workdir, appendonly=True)

    def __enter__(self) -> AttackBench:
        self.redis.start()
        self.provision()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.redis.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.redis.pid, signal.SIGCONT)
        self.redis.stop()

    def provision(self) -> None:
        client = self.redis.client()
        for start in range(0, len(self.lines.all), 1000):
            pipe = client.pipeline(transaction=False)
            for line in self.lines.all[start : start + 1000]:
                pipe.hset(f"e911:line:{line}", "provider_endpoint", endpoint_of(line))
            pipe.execute()

    def fill_metrics(self, figures: EdgeFigures, text: str) -> None:
        figures.discarded = by_label(text, "e911_sip_messages_discarded_total", "reason")
        figures.failovers = by_label(text, "e911_sip_trunk_failovers_total", "route", "reason")
        figures.outcomes = by_label(text, "e911_sip_emergency_calls_total", "outcome")
        figures.results = by_label(text, "e911_sip_emergency_results_total", "status_class")
        figures.requests = by_label(text, "e911_sip_requests_total", "method", "route")
        figures.delivery_failures = sum(
            by_label(text, "e911_sip_delivery_failures_total", "transport").values()
        )

    def probe_count(self, duration: float | None = None) -> int:
        return max(1, round(self.options.probe_rate * (duration or self.options.duration)))

    def run(self, name: str) -> ScenarioResult:
        scenario = SCENARIO_FUNCTIONS[name]
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        result = scenario(self)
        self.results.append(result)
        probes = result.probes
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: "
            + "; ".join(
                f"{p.transport} placed {p.placed} reached {p.reached_trunk} "
                f"enriched {p.enriched_own} completed {p.completed}"
                for p in probes
            )
            + (f" ERROR {result.error}" if result.error else ""),
            file=sys.stderr,
            flush=True,
        )
        return result


def guarded(
    make: Callable[[], ScenarioResult],
) -> Callable[[Callable[[AttackBench, Stage, Any], None]], Callable[[AttackBench], ScenarioResult]]:
    """Runs a scenario body inside a Stage; a harness error is recorded, not raised."""

    def wrap(
        body: Callable[[AttackBench, Stage, Any], None],
    ) -> Callable[[AttackBench], ScenarioResult]:
        def run(bench: AttackBench) -> ScenarioResult:
            result = make()
            with Stage(bench, result) as stage:
                try:
                    body(bench, stage, result)
                except (HarnessError, OSError, AssertionError) as exc:
                    result.error = f"{type(exc).__name__}: {str(exc)[:1500]}"
                finally:
                    stage.finish_edge()
            return result

        run.__doc__ = body.__doc__
        return run

    return wrap


# -------------------------------------------------------------------------- scenarios


@guarded(
    lambda: FloodResult(
        name="flood",
        title="1. INVITE flood from the softswitch",
        attack="non-emergency INVITEs from 127.0.0.1 at about twice the edge's capacity",
    )
)
def scenario_flood(bench: AttackBench, stage: Stage, result: FloodResult) -> None:
    """Ordinary calls from the trusted softswitch at ``--flood-rate``, with the probes."""
    options = bench.options
    trunk, trunk_port = stage.probe_trunk()
    default, default_port = stage.default_trunk()
    edge = stage.start_edge(
        emergency_trunks=[trunk_uri(trunk_port)], default_trunks=[trunk_uri(default_port)]
    )
    stage.watch(options.duration + 120)
    result.rate = options.flood_rate
    flood_calls = round(options.flood_rate * options.duration)
    flood = stage.sipp.start_uac(
        "uac_load",
        edge.sip_target,
        service=PASSTHROUGH,
        keys={"caller": "3215550000", "hold_ms": str(PROBE_HOLD_MS)},
        calls=flood_calls,
        rate=options.flood_rate,
        timeout=options.duration + SIPP_MARGIN_S,
        extra=["-l", str(options.flood_rate), "-fd", "1", "-buff_size", str(SIPP_BUFFER)],
    )
    lines = bench.lines.take(bench.probe_count())
    probes = stage.start_probes(lines)
    stage.finish_probes([(probes, set(lines))])
    flooded = flood.wait(timeout=options.duration + SIPP_MARGIN_S + 15)
    result.flood_placed = int(float(flooded.stats.get("TotalCallCreated", "0") or 0))
    result.flood_completed = flooded.successful
    result.flood_failed = flooded.failed
    result.flood_retransmissions = flooded.retransmissions
    result.flood_failure_causes = failure_causes(flooded)
    result.default_trunk_calls = sipp_stat(default, "SuccessfulCall(C)")


@guarded(
    lambda: GarbageResult(
        name="garbage",
        title="2. Malformed-datagram flood",
        attack="random bytes, truncated SIP, huge Content-Length, bad headers, oversized, "
        f"from {ATTACKER}",
    )
)
def scenario_garbage(bench: AttackBench, stage: Stage, result: GarbageResult) -> None:
    """Malformed datagrams from the attacker at ``--datagram-rate``, with the probes."""
    options = bench.options
    trunk, trunk_port = stage.probe_trunk()
    edge = stage.start_edge(emergency_trunks=[trunk_uri(trunk_port)])
    stage.watch(options.duration + 120)
    sock = udp_socket(ATTACKER)
    stage.closers.append(sock.close)
    payloads = garbage_payloads(edge.sip_port, count=512)
    target = (LOOPBACK, edge.sip_port)
    kinds: Counter[str] = Counter()

    def send(i: int) -> None:
        kind, data = payloads[i % len(payloads)]
        kinds[kind] += 1
        sock.sendto(data, target)

    result.rate = options.datagram_rate
    attack = stage.attack("garbage", options.datagram_rate, options.duration, send)
    lines = bench.lines.take(bench.probe_count())
    probes = stage.start_probes(lines)
    stage.finish_probes([(probes, set(lines))])
    attack.finish(options.duration + 10)
    result.sent, result.send_errors = attack.sent, attack.errors
    result.kinds = dict(kinds.most_common())
    result.answers_to_attacker = drain_socket(sock)


def garbage_payloads(edge_port: int, count: int) -> list[tuple[str, bytes]]:
    """Malformed SIP of several kinds, made once (seeded, so every run sends the same)."""
    rng = random.Random(911)
    invite = (
        f"INVITE sip:911@127.0.0.1:{edge_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {ATTACKER}:5060;branch=z9hG4bK-junk-{{n}}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:3215550001@127.0.0.9>;tag=j{n}\r\n"
        f"To: <sip:911@127.0.0.1:{edge_port}>\r\nCall-ID: junk-{{n}}@127.0.0.9\r\n"
        "CSeq: 1 INVITE\r\nContact: <sip:3215550001@127.0.0.9:5060>\r\n"
        "Content-Type: application/sdp\r\nContent-Length: {length}\r\n\r\n{body}"
    )
    body = "v=0\r\no=- 1 1 IN IP4 127.0.0.9\r\ns=-\r\nc=IN IP4 127.0.0.9\r\nt=0 0\r\n"

    def valid(n: int, length: int | None = None) -> str:
        return invite.format(n=n, length=len(body) if length is None else length, body=body)

    makers: list[tuple[str, Callable[[int], bytes]]] = [
        ("random bytes", lambda n: rng.randbytes(rng.randint(1, 1400))),
        ("truncated SIP", lambda n: valid(n).encode()[: rng.randint(1, len(valid(n)) - 1)]),
        ("huge Content-Length", lambda n: valid(n, 99_999_999).encode()),
        ("negative Content-Length", lambda n: valid(n, -5).encode()),
        (
            "bad headers",
            lambda n: (
                valid(n)
                .replace("CSeq: 1 INVITE", rng.choice(["CSeq: one INVITE", "CSeq: 1", "CSeq:"]))
                .replace("Via: SIP/2.0/UDP", rng.choice(["Via: ???", "Via: SIP/2.0/UDP\0", "Via:"]))
                .encode()
            ),
        ),
        (
            "no header colon",
            lambda n: valid(n).replace("Max-Forwards: 70", "Max-Forwards").encode(),
        ),
        (
            "too many headers",
            lambda n: valid(n).replace("\r\n\r\n", "\r\n" + "X-A: b\r\n" * 400 + "\r\n").encode(),
        ),
        (
            "long header line",
            lambda n: (
                valid(n).replace("\r\n\r\n", "\r\nX-Long: " + "a" * 8000 + "\r\n\r\n").encode()
            ),
        ),
        ("oversized datagram", lambda n: valid(n).encode() + b"a" * 64_000),
        ("binary in start line", lambda n: b"INV\x00\xffITE sip:911@x SIP/2.0\r\n\r\n"),
        ("response garbage", lambda n: b"SIP/2.0 999999 ?\r\nVia: ;;;\r\n\r\n"),
    ]
    return [(kind, make(i)) for i in range(count) for kind, make in [makers[i % len(makers)]]]


@guarded(
    lambda: ForgedResult(
        name="forged",
        title="3. Forged responses",
        attack=f"503/200/487 with plausible branches from {ATTACKER} and other 127.0.0.1 ports",
    )
)
def scenario_forged(bench: AttackBench, stage: Stage, result: ForgedResult) -> None:
    """Responses sprayed at the edge's SIP port while probes run."""
    options = bench.options
    trunk, trunk_port = stage.probe_trunk()
    edge = stage.start_edge(emergency_trunks=[trunk_uri(trunk_port)])
    stage.watch(options.duration + 120)
    outsider = udp_socket(ATTACKER)
    insiders = [udp_socket(LOOPBACK) for _ in range(4)]
    stage.closers.append(outsider.close)
    stage.closers.extend(s.close for s in insiders)
    lines = bench.lines.take(bench.probe_count())
    probes = stage.start_probes(lines)
    statuses: Counter[str] = Counter()
    rng = random.Random(487)
    target = (LOOPBACK, edge.sip_port)
    per_source = {"attacker": 0, "same host": 0}

    def send(i: int) -> None:
        # What an attacker can guess: SIPp's Call-IDs, tags and Via branches follow its PID
        # and call number; the edge's own branch is random, so only its form is known.
        n = 1 + (i // 3) % max(1, len(lines))
        code, reason, cseq = rng.choice(
            [(503, "Service Unavailable", "102 INVITE"), (200, "OK", "102 INVITE")]
            + [(487, "Request Terminated", "102 INVITE"), (200, "OK", "103 BYE")]
        )
        token = base64.urlsafe_b64encode(rng.randbytes(16)).decode().rstrip("=")
        data = (
            f"SIP/2.0 {code} {reason}\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{edge.sip_port};branch=z9hG4bK{token}\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{probes.port};branch=z9hG4bK-uac-{probes.pid}-{n}-inv\r\n"
            f"From: <sip:{lines[(n - 1) % len(lines)]}@127.0.0.1>;tag={probes.pid}SIPpTag00{n}\r\n"
            f"To: <sip:911@127.0.0.1:{edge.sip_port}>;tag=forged{i}\r\n"
            f"Call-ID: {n}-{probes.pid}@127.0.0.1\r\nCSeq: {cseq}\r\n"
            f"Contact: <sip:127.0.0.1:{trunk_port}>\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        statuses[f"{code} ({cseq.split()[1]})"] += 1
        if i % 2:
            outsider.sendto(data, target)
            per_source["attacker"] += 1
        else:
            insiders[i % len(insiders)].sendto(data, target)
            per_source["same host"] += 1

    result.rate = options.flood_rate
    attack = stage.attack("forged", options.flood_rate, options.duration, send)
    stage.finish_probes([(probes, set(lines))])
    attack.finish(options.duration + 10)
    result.sent_from_attacker = per_source["attacker"]
    result.sent_from_same_host = per_source["same host"]
    result.by_status = dict(statuses.most_common())


@guarded(
    lambda: RelayResult(
        name="relay",
        title="4. Relay attempts from outside",
        attack=f"INVITE to 911, INVITE with Route to a victim, MESSAGE with To-tag, ACK, OPTIONS "
        f"from {ATTACKER}",
    )
)
def scenario_relay(bench: AttackBench, stage: Stage, result: RelayResult) -> None:
    """Requests from outside the trust domain that a relay would pass on; none may."""
    options = bench.options
    trunk, trunk_port = stage.probe_trunk()
    victim = SilentUdpPeer()
    victim.start()
    stage.closers.append(victim.close)
    default = SilentUdpPeer()
    default.start()
    stage.closers.append(default.close)
    edge = stage.start_edge(emergency_trunks=[trunk_uri(trunk_port)], default_trunks=[default.uri])
    stage.watch(options.duration + 120)
    sock = udp_socket(ATTACKER)
    stage.closers.append(sock.close)
    claimed = bench.lines.take(1)[0]
    via = f"{ATTACKER}:{sock.getsockname()[1]}"
    edge_host = f"127.0.0.1:{edge.sip_port}"
    victim_uri = f"sip:victim@127.0.0.1:{victim.port}"
    kinds = [
        ("INVITE 911", "INVITE", f"sip:911@{edge_host}", "", ""),
        ("INVITE Route", "INVITE", f"sip:{PASSTHROUGH}@{edge_host}", "", "route"),
        ("MESSAGE To-tag", "MESSAGE", victim_uri, "x", ""),
        ("ACK", "ACK", victim_uri, "x", ""),
        ("OPTIONS", "OPTIONS", victim_uri, "", ""),
    ]
    sent: Counter[str] = Counter()

    def send(i: int) -> None:
        label, method, ruri, to_tag, extra = kinds[i % len(kinds)]
        headers = ""
        if method == "INVITE" and not extra:
            headers = f"P-Asserted-Identity: <sip:{claimed}@127.0.0.1>\r\nPrivacy: id\r\n"
        if extra == "route":
            headers = f"Route: <sip:127.0.0.1:{victim.port};lr>\r\n"
        tag = f";tag={to_tag}" if to_tag else ""
        data = (
            f"{method} {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {via};branch=z9hG4bK-relay-{i};rport\r\nMax-Forwards: 70\r\n"
            f"From: <sip:{claimed}@{ATTACKER}>;tag=a{i}\r\nTo: <{ruri}>{tag}\r\n"
            f"Call-ID: relay-{i}@{ATTACKER}\r\nCSeq: 1 {method}\r\n"
            f"Contact: <sip:{claimed}@{via}>\r\n{headers}Content-Length: 0\r\n\r\n"
        ).encode()
        sock.sendto(data, (LOOPBACK, edge.sip_port))
        sent[label] += 1

    attack = stage.attack("relay", 500, options.duration, send)
    lines = bench.lines.take(bench.probe_count())
    probes = stage.start_probes(lines)
    stage.finish_probes([(probes, set(lines))])
    attack.finish(options.duration + 10)
    result.sent = dict(sent)
    result.victim_received = victim.count
    result.default_trunk_received = default.count
    result.answers_to_attacker = drain_socket(sock)
    attacker_calls = {
        cid for cid, (caller, _g, _s) in stage.trunk_calls().items() if caller == claimed
    }
    result.emergency_trunk_received = len(attacker_calls)


@guarded(
    lambda: HalfOpenResult(
        name="halfopen",
        title="5. Half-open TCP connections",
        attack=f"TCP connections from {ATTACKER}, each sending a partial header block and "
        "holding it",
    )
)
def scenario_halfopen(bench: AttackBench, stage: Stage, result: HalfOpenResult) -> None:
    """Many idle partial-message TCP connections, with UDP and TCP probes."""
    options = bench.options
    trunk, trunk_port = stage.probe_trunk()
    edge = stage.start_edge(emergency_trunks=[trunk_uri(trunk_port)])
    stage.watch(options.duration + 180)
    # The bench's own descriptors: the edge was started before this, with its own limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, options.half_open + 512))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    # Restored afterwards, so that processes of later scenarios start with the usual limit.
    stage.closers.append(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    result.nofile_limit = wanted
    result.wanted = options.half_open
    conns: list[socket.socket] = []

    def close_all() -> None:
        for conn in conns:
            conn.close()

    stage.closers.append(close_all)
    started = time.monotonic()
    failures_in_a_row = 0
    for i in range(options.half_open):
        if time.monotonic() - started > 60 or failures_in_a_row >= 50:
            break
        conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            conn.bind((ATTACKER, 0))
            conn.settimeout(1.0)
            conn.connect((LOOPBACK, edge.sip_port))
            conn.sendall(
                f"INVITE sip:911@127.0.0.1:{edge.sip_port} SIP/2.0\r\n"
                f"Via: SIP/2.0/TCP {ATTACKER}:{conn.getsockname()[1]};branch=z9hG4bK-ho-{i}\r\n"
                f"From: <sip:3215550002@{ATTACKER}>;tag=h{i}\r\nCall-ID: halfopen-{i}\r\n"
                "Content-Le".encode()
            )
        except OSError:
            conn.close()
            result.connect_failures += 1
            failures_in_a_row += 1
            continue
        failures_in_a_row = 0
        conn.setblocking(False)
        conns.append(conn)
    result.connected = len(conns)
    result.connect_s = round(time.monotonic() - started, 1)
    udp_lines = bench.lines.take(bench.probe_count())
    tcp_lines = bench.lines.take(max(1, bench.probe_count() // 5))
    udp = stage.start_probes(udp_lines)
    tcp = stage.start_probes(tcp_lines, rate=max(1.0, options.probe_rate / 5), transport="t1")
    stage.finish_probes([(udp, set(udp_lines)), (tcp, set(tcp_lines))])
    closed = 0
    with selectors.DefaultSelector() as selector:
        for conn in conns:
            selector.register(conn, selectors.EVENT_READ)
        for key, _ in selector.select(timeout=0.5):
            stream = key.fileobj
            assert isinstance(stream, socket.socket)
            try:
                if stream.recv(65535) == b"":
                    closed += 1
            except OSError:
                closed += 1
    result.closed_by_edge = closed
    result.open_at_end = len(conns) - closed


@guarded(
    lambda: BurstResult(
        name="burst",
        title="6. Burst of simultaneous 911 calls",
        attack="911 calls from distinct provisioned lines, all at once",
    )
)
def scenario_burst(bench: AttackBench, stage: Stage, result: BurstResult) -> None:
    """``--burst`` calls created within ~0.1 s and held 3 s, each from its own line."""
    trunk, trunk_port = stage.probe_trunk()
    stage.start_edge(emergency_trunks=[trunk_uri(trunk_port)])
    stage.watch(bench.options.duration + 120)
    result.calls, result.hold_ms = bench.options.burst, 3000
    lines = bench.lines.take(result.calls)
    probes = stage.start_probes(lines, rate=3000, hold_ms=result.hold_ms, limit=result.calls)
    stage.finish_probes([(probes, set(lines))])


def redis_fault_lines(bench: AttackBench, calls: int) -> list[str]:
    """First half fresh lines; second half alternately a line of the first half (which the
    edge has looked up, so it may be cached) and a fresh one."""
    first = bench.lines.take(calls // 2)
    fresh = bench.lines.take(calls - len(first))
    second = [first[i // 2] if i % 2 == 0 else fresh[i // 2] for i in range(len(fresh))]
    return first + second


def _redis_fault(bench: AttackBench, stage: Stage, result: RedisFaultResult, kill: bool) -> None:
    options = bench.options
    trunk, trunk_port = stage.probe_trunk()
    stage.start_edge(emergency_trunks=[trunk_uri(trunk_port)])
    stage.watch(options.duration + 120)
    redis = bench.redis
    assert redis.pid is not None
    result.fault_s = options.fault_s
    result.fault = "redis-server killed (SIGKILL), then restarted" if kill else "SIGSTOP"
    lines = redis_fault_lines(bench, bench.probe_count())
    probes = stage.start_probes(lines)
    started = time.monotonic()
    time.sleep(0.6 * options.duration)
    result.fault_at_s = round(time.monotonic() - started, 1)
    if kill:
        redis.kill()
        time.sleep(options.fault_s)
        restart = time.monotonic()
        redis.start(timeout=30)
        result.restart_s = round(time.monotonic() - restart, 1)
    else:
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            time.sleep(options.fault_s)
        finally:
            os.kill(redis.pid, signal.SIGCONT)
    result.notes.append(
        f"{len(lines)} probes: the first half from fresh lines, the second half alternately "
        "a line already called (which the edge may have cached) and a fresh one"
    )
    stage.finish_probes([(probes, set(lines))])


@guarded(
    lambda: RedisFaultResult(
        name="redis-pause",
        title="7a. Redis paused (SIGSTOP)",
        attack="redis-server stopped with SIGSTOP during probes, then SIGCONT",
    )
)
def scenario_redis_pause(bench: AttackBench, stage: Stage, result: RedisFaultResult) -> None:
    """The store stops answering without closing its connections."""
    _redis_fault(bench, stage, result, kill=False)


@guarded(
    lambda: RedisFaultResult(
        name="redis-kill",
        title="7b. Redis killed and restarted",
        attack="redis-server killed (SIGKILL) during probes, restarted from its append-only file",
    )
)
def scenario_redis_kill(bench: AttackBench, stage: Stage, result: RedisFaultResult) -> None:
    """The store's connections are refused, then it comes back."""
    _redis_fault(bench, stage, result, kill=True)


@guarded(
    lambda: BlackholeResult(
        name="blackhole",
        title="8. Primary emergency trunk blackholed",
        attack="the first emergency trunk never answers; the second is a SIPp trunk",
    )
)
def scenario_blackhole(bench: AttackBench, stage: Stage, result: BlackholeResult) -> None:
    """Every probe must fail over to the secondary trunk and complete."""
    options = bench.options
    silent = SilentUdpPeer()
    silent.start()
    stage.closers.append(silent.close)
    trunk, trunk_port = stage.probe_trunk()
    edge = stage.start_edge(emergency_trunks=[silent.uri, trunk_uri(trunk_port)])
    result.provisional_timeout_s = float(
        edge.config.get("emergency", {}).get("provisional_timeout", 2.0)
    )
    stage.watch(options.duration + 120)
    lines = bench.lines.take(bench.probe_count())
    probes = stage.start_probes(lines)
    stage.finish_probes([(probes, set(lines))])
    result.silent_received = silent.count


@guarded(
    lambda: DrainResult(
        name="sigterm",
        title="9. SIGTERM under load (drain)",
        attack="SIGTERM to the edge while 911 and ordinary dialogs are up",
    )
)
def scenario_sigterm(bench: AttackBench, stage: Stage, result: DrainResult) -> None:
    """SIGTERM once every call is placed; dialogs up must still complete through the edge."""
    options = bench.options
    trunk, trunk_port = stage.probe_trunk()
    default, default_port = stage.default_trunk()
    edge = stage.start_edge(
        emergency_trunks=[trunk_uri(trunk_port)], default_trunks=[trunk_uri(default_port)]
    )
    stage.watch(options.duration + 180)
    window = max(2.0, options.duration / 2)
    result.hold_ms = 3000
    result.load_rate = max(1, options.flood_rate // 8)
    load_calls = round(result.load_rate * window)
    load = stage.sipp.start_uac(
        "uac_load",
        edge.sip_target,
        service=PASSTHROUGH,
        keys={"caller": "3215550000", "hold_ms": str(result.hold_ms)},
        calls=load_calls,
        rate=result.load_rate,
        timeout=window + SIPP_MARGIN_S,
        extra=["-fd", "1", "-buff_size", str(SIPP_BUFFER)],
    )
    lines = bench.lines.take(bench.probe_count(window))
    probes = stage.start_probes(lines, hold_ms=result.hold_ms)
    placed = wait_until(
        lambda: (
            sipp_stat(probes, "TotalCallCreated") >= len(lines)
            and sipp_stat(load, "TotalCallCreated") >= load_calls
        ),
        window + 30,
        interval=0.05,
    )
    if not placed:
        result.notes.append("not every call was placed before the bound; SIGTERM sent anyway")
    with contextlib.suppress(OSError, HarnessError):
        result.emergency_dialogs_at_signal = edge.http_get("/readyz", timeout=2)[1][:200]
    with contextlib.suppress(OSError, HarnessError):
        bench.fill_metrics(result.edge, edge.metrics())
    signalled = time.monotonic()
    edge.signal(signal.SIGTERM)
    with contextlib.suppress(OSError, HarnessError):
        status, body = edge.http_get("/readyz", timeout=2)
        result.readiness_after_signal = f"{status} {body[:120]}"
    stage.finish_probes([(probes, set(lines))])
    loaded = load.wait(timeout=window + SIPP_MARGIN_S + 15)
    result.load_placed = int(float(loaded.stats.get("TotalCallCreated", "0") or 0))
    result.load_completed, result.load_failed = loaded.successful, loaded.failed
    try:
        result.exit_code = edge.wait(timeout=EDGE_EXIT_S)
        result.exit_s = round(time.monotonic() - signalled, 1)
    except Exception as exc:  # subprocess.TimeoutExpired: reported, then stopped by close()
        result.notes.append(f"the edge had not exited {EDGE_EXIT_S:g} s after SIGTERM: {exc}")
    result.notes.append(
        "counters of /metrics were read just before SIGTERM (the edge is gone at the end)"
    )


SCENARIO_FUNCTIONS: dict[str, Callable[[AttackBench], ScenarioResult]] = {
    "flood": scenario_flood,
    "garbage": scenario_garbage,
    "forged": scenario_forged,
    "relay": scenario_relay,
    "halfopen": scenario_halfopen,
    "burst": scenario_burst,
    "redis-pause": scenario_redis_pause,
    "redis-kill": scenario_redis_kill,
    "blackhole": scenario_blackhole,
    "sigterm": scenario_sigterm,
}


# ----------------------------------------------------------------------------- report


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f}" if kib else "-"


def _counts(values: dict[str, float] | dict[str, int]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(values.items())) or "none"


def _verdict(result: ScenarioResult) -> str:
    if result.error:
        return "ERROR"
    placed = sum(p.placed for p in result.probes)
    lost = sum(p.placed - p.completed for p in result.probes)
    unenriched = sum(p.placed - p.enriched_own for p in result.probes)
    if placed == 0:
        return "no probe placed"
    if lost == 0 and unenriched == 0:
        return "all probes enriched and completed"
    parts = []
    if lost:
        parts.append(f"{lost} probes not completed")
    if unenriched:
        parts.append(f"{unenriched} without their own location at the trunk")
    return "; ".join(parts)


def render(env: Environment, options: Options, results: Sequence[ScenarioResult]) -> str:
    out = [
        f"# Attack and fault bench, {env.started_at}",
        "",
        f"- command: `{env.command}`",
        f"- machine: {env.nproc} CPUs, {env.cpu_model}; Linux {env.kernel}; "
        f"Python {env.python}; {env.sipp}; {env.redis_server}",
        f"- build: {env.build} (the edges import the same package as this bench)",
        f"- load average before / after: {env.loadavg_before} / {env.loadavg_after}",
        f"- git: {env.git}; finished {env.finished_at}"
        + (" (INTERRUPTED)" if env.interrupted else ""),
        f"- probes: 911 calls at {options.probe_rate:g}/s from 127.0.0.1, each from its own "
        f"provisioned line (redis `e911:line:*`, {options.lines} lines), for "
        f"{options.duration:g} s per scenario; attackers on {ATTACKER}",
    ]
    if env.error:
        out.append(f"- error: {env.error}")
    out += [
        "",
        "| scenario | probes placed | reached trunk | enriched (own line) | completed "
        "| edge RSS MiB before / peak / after | edge CPU % mean / peak | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        placed = sum(p.placed for p in r.probes)
        reached = sum(p.reached_trunk for p in r.probes)
        own = sum(p.enriched_own for p in r.probes)
        done = sum(p.completed for p in r.probes)
        cpu = (
            f"{r.edge.cpu_mean_pct:.0f} / {r.edge.cpu_peak_pct:.0f}"
            if r.edge.cpu_mean_pct is not None and r.edge.cpu_peak_pct is not None
            else "-"
        )
        out.append(
            f"| {r.title} | {placed} | {reached} | {own} | {done} "
            f"| {_mib(r.rss.before_kib)} / {_mib(r.rss.peak_kib)} / {_mib(r.rss.after_kib)} "
            f"| {cpu} | {_verdict(r)} |"
        )
    out.append("")
    for r in results:
        out += [f"### {r.title}", "", f"Attack: {r.attack}. Scenario wall time {r.wall_s} s.", ""]
        if len(r.probes) > 1 or any(p.enriched_other or p.failed for p in r.probes):
            out += [
                "| probes | placed | reached trunk | enriched own | other line's | none "
                "| answered (200) | completed | failed |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for p in r.probes:
                out.append(
                    f"| {p.transport} | {p.placed} | {p.reached_trunk} | {p.enriched_own} "
                    f"| {p.enriched_other} | {p.unenriched} | {p.answered} | {p.completed} "
                    f"| {p.failed} |"
                )
            out.append("")
        for line in r.details():
            out.append(f"- {line}")
        e = r.edge
        out.append(f"- discarded by reason: {_counts(e.discarded)}")
        out.append(f"- emergency outcomes: {_counts(e.outcomes)}")
        out.append(f"- emergency final responses: {_counts(e.results)}")
        out.append(f"- failovers (route/reason): {_counts(e.failovers)}")
        out.append(f"- requests (method/route): {_counts(e.requests)}")
        if e.socket_drops is not None:
            out.append(
                f"- datagrams dropped at the edge's UDP socket (buffer full): {e.socket_drops}"
            )
        udp = {k: v for k, v in e.udp_errors.items() if v}
        if udp:
            out.append(
                "- host UDP errors during the scenario: "
                + ", ".join(f"{k} {v}" for k, v in udp.items())
            )
        if e.delivery_failures:
            out.append(f"- delivery failures: {e.delivery_failures:g}")
        if not e.running_at_end:
            out.append("- the edge was not running at the end")
        if e.metrics_error:
            out.append(f"- /metrics: {e.metrics_error}")
        for p in r.probes:
            if p.failure_causes:
                out.append(
                    f"- probe caller ({p.transport}) failures by cause: {_counts(p.failure_causes)}"
                )
            for line in p.caller_errors:
                out.append(f"- probe caller ({p.transport}) error log: {line}")
        for line in e.log_problems:
            out.append(f"- edge log: {line}")
        for note in r.notes:
            out.append(f"- {note}")
        if r.error:
            out.append(f"- **error**: {r.error}")
        out.append(f"- files: `{r.workdir}`")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, help="scenarios to run")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per scenario")
    parser.add_argument("--probe-rate", type=float, default=10.0, help="probe 911 calls/s")
    parser.add_argument(
        "--flood-rate",
        type=int,
        default=1600,
        help="INVITEs/s of the flood (about twice the ~800 calls/s pass-through capacity of "
        "docs/performance-history.md) and forged responses/s (default 1600)",
    )
    parser.add_argument(
        "--datagram-rate", type=int, default=5000, help="malformed datagrams/s (default 5000)"
    )
    parser.add_argument("--lines", type=int, default=5000, help="provisioned probe lines")
    parser.add_argument("--half-open", type=int, default=3000, help="half-open TCP connections")
    parser.add_argument("--burst", type=int, default=300, help="simultaneous 911 calls")
    parser.add_argument("--fault-s", type=float, default=3.0, help="seconds Redis is down")
    args = parser.parse_args(list(argv))
    if args.duration <= 0 or args.probe_rate <= 0 or args.lines <= 0:
        parser.error("--duration, --probe-rate and --lines must be positive")
    if min(args.flood_rate, args.datagram_rate, args.half_open, args.burst) <= 0:
        parser.error("rates and counts must be positive")
    return Options(
        only=list(args.only or SCENARIOS),
        duration=args.duration,
        probe_rate=args.probe_rate,
        flood_rate=args.flood_rate,
        datagram_rate=args.datagram_rate,
        lines=args.lines,
        half_open=args.half_open,
        burst=args.burst,
        fault_s=args.fault_s,
    )


def environment(argv: Sequence[str]) -> Environment:
    return Environment(
        command=shlex.join(["python", *argv]),
        started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        nproc=_run_text(["nproc"]),
        cpu_model=cpu_model(),
        kernel=platform.release(),
        python=platform.python_version(),
        build=describe_build(),
        sipp=_first_line_matching(_run_text(["sipp", "-v"]), r"SIPp v"),
        redis_server=_first_line_matching(_run_text(["redis-server", "--version"]), r"v="),
        git=_run_text(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"]),
        loadavg_before=loadavg(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(args)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = RESULTS_DIR / f"attack-{stamp}"
    env = environment(["bench/attack.py", *args])
    results: list[ScenarioResult] = []
    status = 0
    try:
        with AttackBench(options, workdir) as bench:
            results = bench.results
            for name in options.only:
                bench.run(name)
            if bench.lines.wrapped:
                env.error = "--lines was too small: some lines were used by more than one probe"
    except KeyboardInterrupt:
        env.interrupted = True
        status = 130
    except HarnessError as exc:
        env.error = f"{type(exc).__name__}: {str(exc)[:2000]}"
        status = 1
    finally:
        env.finished_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        env.loadavg_after = loadavg()
        text = render(env, options, results)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"attack-{stamp}.md").write_text(text + "\n", encoding="utf-8")
        raw = {
            "environment": asdict(env),
            "options": asdict(options),
            "results": [{"kind": type(r).__name__, **asdict(r)} for r in results],
        }
        (RESULTS_DIR / f"attack-{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
        print(text)
        print(f"\nwritten: {RESULTS_DIR}/attack-{stamp}.md, .json; files in {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
