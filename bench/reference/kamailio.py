"""Kamailio 5.6 running ``kamailio.cfg``: the reference the load benchmark compares the edge with.

``KamailioProcess`` starts one Kamailio (one UDP worker, loopback only, in the foreground,
logging to stderr, its pid file and control socket in a private temporary directory), waits
until it answers an OPTIONS, lists every PID it runs as (main process and its children, so
their CPU can be summed), reads its statistics through ``kamcmd`` and stops every one of those
PIDs. ``bench/run_load.py --target kamailio|both`` uses it.

Run as a script, it proves the config does what the edge does, with the trunk scenarios the
integration tests use against the edge:

    python bench/reference/kamailio.py check

places one 911 call (``uac_911.xml``) through Kamailio to ``uas_emergency.xml``, which checks
Priority, Geolocation, Geolocation-Routing, P-Asserted-Identity, Request-URI, Via, Record-Route
and the untouched headers and body, and one ordinary call to ``uas_passthrough.xml``, which
checks that nothing was added. Exit status 0 when both trunks passed every check.

Nothing here is part of the test suite: Kamailio is installed by hand
(``apt-get install kamailio kamailio-redis-modules``; Debian bookworm ships 5.6.3).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Run as a plain script, the harness is imported from the repository.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.callers import (  # noqa: E402
    CALLER_FORMS,
    CALLER_SCENARIO,
    EMERGENCY_TRUNK_SCENARIO,
    MISMATCH_COLUMNS,
    injection_file,
    line_numbers,
    provision,
)
from tests.integration.harness import (  # noqa: E402
    LOOPBACK,
    HarnessError,
    RedisServer,
    Sipp,
    _OutputFiles,
    _stop_process,
    _tail,
    free_port,
)

CONFIG = Path(__file__).resolve().with_name("kamailio.cfg")
INSTALL_HINT = "apt-get install kamailio kamailio-redis-modules"
# Transactions stay in shared memory for tm's wait timer (5 s) after they end: at several
# thousand calls/s that is tens of thousands of INVITE and BYE transactions. Kamailio's
# default of 64 MB runs out long before the CPU does, which would measure the setting.
SHM_MB = 1024
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
KAMCMD_TIMEOUT_S = 10.0
# Kamailio writes "<level>: <module>" after "idx(pid) " on every line it logs.
_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL|ALERT|BUG):\s*(.*)")


class KamailioUnavailable(HarnessError):
    """kamailio, kamcmd or the Redis module is not installed, or the config does not load."""


def binaries() -> tuple[str, str]:
    """Paths of ``kamailio`` and ``kamcmd``; KamailioUnavailable when either is missing."""
    kamailio = shutil.which("kamailio") or _sbin("kamailio")
    kamcmd = shutil.which("kamcmd") or _sbin("kamcmd")
    missing = [name for name, path in (("kamailio", kamailio), ("kamcmd", kamcmd)) if not path]
    if missing or kamailio is None or kamcmd is None:
        raise KamailioUnavailable(
            f"{' and '.join(missing)} not found: the reference needs Kamailio 5.6 ({INSTALL_HINT})"
        )
    return kamailio, kamcmd


def _sbin(name: str) -> str | None:
    # Debian installs both in /usr/sbin, which a non-root PATH may leave out.
    path = Path("/usr/sbin") / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def version() -> str:
    """``kamailio 5.6.3 (x86_64/linux)``, or why it is unavailable."""
    try:
        kamailio, _ = binaries()
        done = subprocess.run(
            [kamailio, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except (KamailioUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    for line in done.stdout.splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return (done.stdout + done.stderr).strip()[:200] or "unknown"


def check_config() -> None:
    """Load the config once with ``kamailio -c``; KamailioUnavailable with its output if not.

    Catches a missing module (``kamailio-redis-modules``) before any SIPp is started.
    """
    kamailio, _ = binaries()
    with tempfile.TemporaryDirectory(prefix="e911-kamailio-check-") as rundir:
        command = [kamailio, "-c", "-f", str(CONFIG), "-Y", rundir]
        command += _defines(
            sip_port=5060,
            emergency_trunk=f"{LOOPBACK}:5080",
            default_trunk=f"{LOOPBACK}:5090",
            redis_port=6379,
            ctl_socket=f"{rundir}/ctl",
        )
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=30, check=False, cwd=rundir
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KamailioUnavailable(f"kamailio -c could not run: {exc}") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise KamailioUnavailable(
            f"kamailio does not load {CONFIG} (exit {done.returncode}; is "
            f"kamailio-redis-modules installed?):\n{output[-2000:]}"
        )


def _defines(
    *,
    sip_port: int,
    emergency_trunk: str,
    default_trunk: str,
    redis_port: int,
    ctl_socket: str,
) -> list[str]:
    """The ``-A`` defines kamailio.cfg takes; string values keep their double quotes."""
    return [
        "-A",
        f"SIP_PORT={sip_port}",
        "-A",
        f'EMERGENCY_TRUNK="{emergency_trunk}"',
        "-A",
        f'DEFAULT_TRUNK="{default_trunk}"',
        "-A",
        f'REDIS_SERVER="name=loc;addr={LOOPBACK};port={redis_port}"',
        "-A",
        f'CTL_SOCKET="unix:{ctl_socket}"',
    ]


def _parent_pid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fields after it start at ")".
    return int(text[text.rindex(")") + 2 :].split()[1])


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``, read from /proc."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _parent_pid(int(entry.name)) == pid:
            found.append(int(entry.name))
    return sorted(found)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class KamailioProcess:
    """kamailio.cfg as a real process on 127.0.0.1, started and stopped by PID."""

    def __init__(
        self,
        workdir: Path,
        *,
        sip_port: int,
        emergency_trunk: str,
        default_trunk: str,
        redis_port: int,
        shm_mb: int = SHM_MB,
    ) -> None:
        """``emergency_trunk`` and ``default_trunk`` are ``host:port`` of the two trunks."""
        self.kamailio, self.kamcmd = binaries()
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="kamailio-", dir=workdir))
        # The control socket's path must fit in a sockaddr_un (108 bytes): results directories
        # are deep, so the pid file and socket live in a short private directory instead.
        self.rundir = Path(tempfile.mkdtemp(prefix="e911-kamailio-"))
        self.ctl_socket = self.rundir / "ctl"
        self.sip_port = sip_port
        self.log_path = self.dir / "stderr.log"
        self.command = [self.kamailio, "-f", str(CONFIG)]
        # -DD: the main process stays in the foreground (its PID is ours) and still forks its
        # workers; -E: log to stderr.
        self.command += ["-DD", "-E", "-Y", str(self.rundir), "-w", str(self.dir)]
        self.command += ["-P", str(self.rundir / "kamailio.pid"), "-m", str(shm_mb)]
        self.command += _defines(
            sip_port=sip_port,
            emergency_trunk=emergency_trunk,
            default_trunk=default_trunk,
            redis_port=redis_port,
            ctl_socket=str(self.ctl_socket),
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._output = _OutputFiles(self.dir / "stdout.log", self.log_path)
        self.processes: dict[int, str] = {}
        """Every PID Kamailio runs as, with what it does (from ``core.psx``)."""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def sip_target(self) -> str:
        return f"{LOOPBACK}:{self.sip_port}"

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start Kamailio; return once its worker answers OPTIONS and its PIDs are known."""
        if self.running:
            raise HarnessError(f"kamailio already running (pid {self.pid})")
        out, err = self._output.open()
        self._proc = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.dir
        )
        deadline = time.monotonic() + timeout
        answered = False
        # Bounded by the deadline; each probe waits at most 0.2 s for the answer.
        while time.monotonic() < deadline and self._proc.poll() is None:
            if self._answers_options():
                answered = True
                break
        if answered:
            self.processes = self._process_table()
            if self.processes:
                return
        exited = self._proc.poll() is not None
        self.stop()
        reason = (
            f"exited with {self._proc.returncode}"
            if exited
            else f"did not answer OPTIONS or list its processes within {timeout:g}s"
        )
        raise HarnessError(
            f"kamailio {reason}\ncommand: {' '.join(self.command)}\n"
            f"--- stderr ({self.log_path}) ---\n{_tail(self.log_path)}"
        )

    def _answers_options(self) -> bool:
        """One OPTIONS to the proxy itself: a 200 means the UDP worker runs the script."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((LOOPBACK, 0))
            sock.settimeout(0.2)
            port = sock.getsockname()[1]
            call_id = f"ready-{os.getpid()}-{time.monotonic_ns()}"
            request = (
                f"OPTIONS sip:{self.sip_target} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {LOOPBACK}:{port};branch=z9hG4bK-{call_id}\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:bench@{LOOPBACK}>;tag=ready\r\n"
                f"To: <sip:{self.sip_target}>\r\n"
                f"Call-ID: {call_id}\r\n"
                "CSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            try:
                sock.sendto(request.encode(), (LOOPBACK, self.sip_port))
                data = sock.recv(65535)
            except OSError:
                return False
        return data.startswith(b"SIP/2.0 200")

    def _process_table(self) -> dict[int, str]:
        """PID -> description from ``kamcmd core.psx``, else the children found in /proc."""
        text = self.rpc("core.psx")
        table: dict[int, str] = {}
        for pid, description in re.findall(r"PID:\s*(\d+)\s+DSC:\s*([^\n]+)", text or ""):
            table[int(pid)] = description.strip()
        if not table and self.pid is not None:
            table = {self.pid: "main process"}
            table.update({child: "child" for child in children_of(self.pid)})
        return table

    def pids(self) -> list[int]:
        """Every PID of this Kamailio: the main process first, then its workers and timers."""
        if self.pid is None:
            return []
        return [self.pid, *sorted(p for p in self.processes if p != self.pid)]

    def rpc(self, *command: str) -> str | None:
        """Output of ``kamcmd`` over the control socket; None when it fails."""
        try:
            done = subprocess.run(
                [self.kamcmd, "-s", f"unix:{self.ctl_socket}", *command],
                capture_output=True,
                text=True,
                timeout=KAMCMD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    def statistics(self) -> dict[str, float]:
        """Every statistic (``script:e911_enriched``, ``tmx:...``, ``shmem:...``), by name.

        Raises HarnessError when the control socket does not answer.
        """
        text = self.rpc("stats.get_statistics", "all")
        if text is None:
            raise HarnessError(f"kamcmd stats.get_statistics failed on {self.ctl_socket}")
        stats: dict[str, float] = {}
        for name, value in re.findall(r"^\s*([\w.-]+:[\w.-]+)\s*=\s*(-?\d+)", text, re.M):
            stats[name] = float(value)
        return stats

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to the main PID (it stops its children), then SIGKILL to any PID left.

        Idempotent. A leftover is killed only while its command line is still this
        Kamailio's, so a PID the kernel has meanwhile given to another process is left alone.
        """
        if self._proc is not None:
            _stop_process(self._proc, timeout)
        config = str(CONFIG)
        for pid in self.processes:
            if pid != self.pid and config in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._output.close()
        shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> KamailioProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def log_problems(log: str, limit: int = 5) -> list[str]:
    """The most frequent WARNING-or-worse lines of Kamailio's log, digits folded, with counts."""
    kinds: Counter[str] = Counter()
    for line in log.splitlines():
        match = _PROBLEM.search(line)
        if match is None:
            continue
        text = re.sub(r"\d+", "#", f"{match.group(1)} {match.group(2)}")
        kinds[text[:160]] += 1
    return [f"{count}x {text}" for text, count in kinds.most_common(limit)]


# ------------------------------------------------------------------------------- check

CHECK_CALLER = "3215551234"
CHECK_ENDPOINT = "5555555/e911abc123def456"
PASSTHROUGH_NUMBER = "2125550100"


def check(workdir: Path) -> bool:
    """One 911 call and one ordinary call through Kamailio to the trunks that check them."""
    check_config()
    ok = True
    with RedisServer(workdir) as redis_server:
        redis_server.client().hset(f"e911:line:{CHECK_CALLER}", "provider_endpoint", CHECK_ENDPOINT)
        sipp = Sipp(workdir)
        emergency_port = free_port("udp")
        default_port = free_port("udp")
        while default_port == emergency_port:
            default_port = free_port("udp")
        kamailio = KamailioProcess(
            workdir,
            sip_port=free_port("udp"),
            emergency_trunk=f"{LOOPBACK}:{emergency_port}",
            default_trunk=f"{LOOPBACK}:{default_port}",
            redis_port=redis_server.port,
        )
        try:
            kamailio.start()
            cases = (
                (
                    "911 -> uas_emergency",
                    "911",
                    "uas_emergency",
                    emergency_port,
                    {
                        "expected_ruser": "911",
                        "expected_endpoint": CHECK_ENDPOINT,
                        "expected_callback": CHECK_CALLER,
                    },
                ),
                (
                    f"{PASSTHROUGH_NUMBER} -> uas_passthrough",
                    PASSTHROUGH_NUMBER,
                    "uas_passthrough",
                    default_port,
                    {"expected_ruser": PASSTHROUGH_NUMBER, "expected_pai": ""},
                ),
            )
            for label, service, scenario, port, keys in cases:
                trunk = sipp.uas(scenario, port=port, keys=keys, timeout=30.0)
                caller = sipp.uac(
                    "uac_911",
                    kamailio.sip_target,
                    service=service,
                    keys={"caller": CHECK_CALLER},
                    timeout=20.0,
                )
                checked = trunk.wait(timeout=10.0)
                passed = caller.ok and checked.ok
                ok = ok and passed
                print(f"{'pass' if passed else 'FAIL'}: {label}")
                if not passed:
                    print(caller.summary())
                    print(checked.summary())
            ok = _check_caller_forms(sipp, kamailio, redis_server, emergency_port) and ok
            stats = kamailio.statistics()
            print(
                "kamailio statistics: "
                + ", ".join(f"{k} {v:g}" for k, v in stats.items() if k.startswith("script:"))
            )
        finally:
            sipp.close()
            kamailio.stop()
    print(f"logs: {workdir}")
    return ok


def _check_caller_forms(
    sipp: Sipp, kamailio: KamailioProcess, redis_server: RedisServer, trunk_port: int
) -> bool:
    """One 911 call per combination of caller forms (+1N, 1N, N in From and in
    P-Asserted-Identity), each from its own line, to the load benchmark's emergency trunk:
    each INVITE must carry its own line's location and callback."""
    lines = line_numbers(len(CALLER_FORMS) ** 2)
    provision(redis_server.client(), lines)
    callers = sipp.workdir / "caller-forms.csv"
    callers.write_text(injection_file(lines))
    trunk = sipp.uas(str(EMERGENCY_TRUNK_SCENARIO), port=trunk_port, calls=len(lines))
    caller = sipp.uac(
        str(CALLER_SCENARIO),
        kamailio.sip_target,
        service="911",
        keys={"hold_ms": "100"},
        calls=len(lines),
        rate=len(lines),
        timeout=20.0,
        extra=["-inf", str(callers)],
    )
    checked = trunk.wait(timeout=10.0)
    mismatches = sum(int(float(checked.stats.get(c, "0") or 0)) for c in MISMATCH_COLUMNS)
    passed = caller.ok and checked.ok and checked.successful == len(lines) and not mismatches
    print(
        f"{'pass' if passed else 'FAIL'}: 911 from {len(lines)} lines, callers as +1N, 1N and N "
        f"in From and P-Asserted-Identity -> uas_load_lines ({mismatches} mismatches)"
    )
    if not passed:
        print(caller.summary())
        print(checked.summary())
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=("check",), help="check: one call of each kind")
    parser.add_argument("--workdir", type=Path, help="where logs go (default: a new temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="e911-kamailio-check-"))
    try:
        return 0 if check(workdir) else 1
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
