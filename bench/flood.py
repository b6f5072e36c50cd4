"""Flood benchmark: do 911 calls get through while a trusted source floods the edge?

One edge process (in-memory store seeded with the probe caller's location, product defaults
for ``[overload]`` unless overridden), a default trunk that never answers (each admitted
flood call keeps its transactions and retransmits, as against a dead carrier), a SIPp trunk
that checks every emergency INVITE's enrichment, and on loopback:

- a flood of unique non-emergency INVITEs from the softswitch's address (trusted) at
  ``--rate`` per second for ``--duration`` seconds (``tests/integration/flood.py``);
- 911 probe calls from SIPp (``uac_911.xml``) at ``--probe-rate`` per second over the same
  time, each a full INVITE/200/ACK/BYE call.

Reported: probes placed, probes that reached the trunk enriched (the trunk scenario fails a
call whose Priority, Geolocation, Geolocation-Routing or PAI is wrong), probes completed at
the caller; the flood's answers (503 with Retry-After, 100, other); the edge's shed counters,
evictions, peak transactions and receive-queue depth from ``/metrics``; the edge's RSS before,
at its peak and after, and its CPU. Not part of the test suite; run by hand:

    python bench/flood.py --rate 1600 --duration 20
    python bench/flood.py --rate 1600 --duration 20 --set max_transactions=20000

Loopback only; bounded by ``--rate * --duration`` INVITEs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.integration.flood import UdpFlood  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    DEFAULT_CALLER,
    DEFAULT_ENDPOINT,
    EdgeProcess,
    SilentUdpPeer,
    Sipp,
    edge_config,
    free_port,
    metric_value,
    trunk_uri,
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """RSS and a few gauges of the edge, sampled in a thread."""

    def __init__(self, edge: EdgeProcess) -> None:
        self.edge = edge
        self.peak_rss = 0
        self.peak = {"transactions": 0.0, "queue": 0.0, "lag": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pid = self.edge.pid
        assert pid is not None
        tick = 0
        while not self._stop.wait(0.1):
            self.peak_rss = max(self.peak_rss, rss_kib(pid))
            tick += 1
            if tick % 5:
                continue
            try:
                text = self.edge.metrics()
            except OSError:
                continue
            for key, name in (
                ("transactions", "e911_sip_transactions_in_flight"),
                ("queue", "e911_sip_receive_queue_depth"),
                ("lag", "e911_sip_event_loop_lag_seconds"),
            ):
                self.peak[key] = max(self.peak[key], metric_value(text, name) or 0.0)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            key = labels.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[key] = float(value)
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = float(value) if "." in value else int(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1600.0, help="flood INVITEs per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of flood")
    parser.add_argument(
        "--malformed", action="store_true", help="flood with INVITEs the edge answers 400"
    )
    parser.add_argument("--probe-rate", type=float, default=10.0, help="911 calls per second")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an [overload] key"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / "bench" / "results" / time.strftime("flood-%Y%m%d-%H%M%S"),
        help="where the edge's and SIPp's files go (a new directory)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    seed = args.workdir / "seed.json"
    seed.write_text(
        json.dumps(
            {DEFAULT_CALLER: {"provider_endpoint": DEFAULT_ENDPOINT, "updated_at": "2026-11-01"}}
        )
    )
    flood_count = int(args.rate * args.duration)
    probes = max(1, int(args.probe_rate * args.duration))
    sipp = Sipp(args.workdir)
    trunk = free_port("udp")
    with SilentUdpPeer() as dead_trunk:
        uas = sipp.uas("uas_emergency.xml", port=trunk, calls=probes, timeout=args.duration + 120.0)
        config = edge_config(
            sip_port=free_port("both"),
            http_port=free_port("tcp"),
            emergency_trunks=[trunk_uri(trunk)],
            default_trunks=[dead_trunk.uri],
            seed_file=seed,
            overload=parse_overrides(args.set),
            log={"level": "INFO"},
        )
        edge = EdgeProcess(args.workdir, config)
        edge.start(timeout=30)
        pid = edge.pid
        assert pid is not None
        try:
            rss_before = rss_kib(pid)
            cpu_before = cpu_seconds(pid)
            with (
                Sampler(edge) as sampler,
                UdpFlood(("127.0.0.1", edge.sip_port), malformed=args.malformed) as flood,
            ):
                sender = threading.Thread(
                    target=flood.send, args=(flood_count,), kwargs={"rate": args.rate}
                )
                started = time.monotonic()
                sender.start()
                caller = sipp.start_uac(
                    "uac_911.xml",
                    edge.sip_target,
                    calls=probes,
                    rate=args.probe_rate,
                    timeout=args.duration + 120.0,
                )
                sender.join()
                flood_seconds = time.monotonic() - started
                caller_result = caller.wait(timeout=args.duration + 150.0)
                trunk_result = uas.wait(timeout=60.0)
                cpu_flood = cpu_seconds(pid) - cpu_before
                rss_end = rss_kib(pid)
                # Transactions linger up to 32 s (Timers B, J, L, M); wait for them to go.
                deadline = time.monotonic() + 60.0
                while time.monotonic() < deadline:
                    if (edge.metric("e911_sip_transactions_in_flight") or 0) < 100:
                        break
                    time.sleep(1.0)
                rss_after = rss_kib(pid)
                statuses = dict(flood.statuses)
                retry_after = flood.retry_after
            text = edge.metrics()
        finally:
            edge.stop()
            sipp.close()
    figures = {
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.platform()}",
        "python": platform.python_version(),
        "flood": {
            "malformed": args.malformed,
            "rate": args.rate,
            "duration": args.duration,
            "sent": flood_count,
            "seconds": round(flood_seconds, 1),
            "answers": statuses,
            "503_with_retry_after": retry_after,
        },
        "probes": {
            "placed": probes,
            "reached_trunk_enriched": trunk_result.successful,
            "trunk_failed": trunk_result.failed,
            "completed": caller_result.successful,
            "caller_failed": caller_result.failed,
            "caller_retransmissions": caller_result.retransmissions,
        },
        "edge": {
            "rss_kib": {
                "before": rss_before,
                "peak": sampler.peak_rss,
                "end_of_flood": rss_end,
                "after_drain": rss_after,
            },
            "cpu_seconds_during_flood": round(cpu_flood, 1),
            "peak_transactions": sampler.peak["transactions"],
            "peak_queue_depth": sampler.peak["queue"],
            "peak_lag_seconds": sampler.peak["lag"],
            "shed": by_label(text, "e911_sip_shed_total", "reason"),
            "queue_dropped": by_label(text, "e911_sip_receive_queue_dropped_total", "priority"),
            "evicted": by_label(text, "e911_sip_evicted_total", "table"),
            "emergency_results": by_label(text, "e911_sip_emergency_results_total", "status_class"),
            "emergency_outcomes": {
                k: v
                for k, v in by_label(text, "e911_sip_emergency_calls_total", "outcome").items()
                if v
            },
            "log_lines": len(edge.log_text().splitlines()),
        },
    }
    p, e = figures["probes"], figures["edge"]
    print(
        f"flood: {flood_count} INVITEs at {args.rate:g}/s for {args.duration:g} s "
        f"(sent in {flood_seconds:.1f} s); answers {statuses}, {retry_after} 503 with Retry-After"
    )
    print(
        f"911 probes: placed {p['placed']}, reached trunk enriched "
        f"{p['reached_trunk_enriched']}, completed {p['completed']} "
        f"(caller failed {p['caller_failed']}, retransmissions {p['caller_retransmissions']})"
    )
    rss = e["rss_kib"]
    print(
        f"edge RSS MiB: before {rss['before'] / 1024:.0f}, peak {rss['peak'] / 1024:.0f}, "
        f"end of flood {rss['end_of_flood'] / 1024:.0f}, after drain "
        f"{rss['after_drain'] / 1024:.0f}; CPU {e['cpu_seconds_during_flood']} s"
    )
    print(
        f"edge peaks: transactions {e['peak_transactions']:.0f}, queue "
        f"{e['peak_queue_depth']:.0f}, lag {e['peak_lag_seconds']:.3f} s; shed {e['shed']}; "
        f"queue dropped {e['queue_dropped']}; evicted {e['evicted']}; "
        f"log lines {e['log_lines']}"
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    ok = p["completed"] == probes and p["reached_trunk_enriched"] == probes
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
