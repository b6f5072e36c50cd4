"""Real processes for integration tests: redis-server, SIPp, the edge (in any role) and the
Bandwidth emulator, all on 127.0.0.1.

Every process is started with ``subprocess.Popen``, remembered by PID and stopped by PID
(SIGTERM, a bounded wait, then SIGKILL). Readiness is polled against the real thing with a
deadline, never a fixed sleep: a PING for Redis, the listening socket owned by the SIPp
process (read from /proc), ``GET /readyz`` for the edge, ``GET /_emulator/state`` for the
emulator. All files a process writes (its configuration, stdout/stderr, SIPp's statistics
and message logs) go under the ``workdir`` the caller passes, normally pytest's
``tmp_path``, which pytest keeps after a failure.

The SIPp scenarios live in ``sipp_scenarios/``; see its README for what each one sends or
checks and which ``-key`` values it needs. ``SCENARIO_KEYS`` holds the documented defaults,
which this module fills in for any key a test does not pass.

For the provisioning side: ``provisioning_sections`` writes ``[provisioning]`` and
``[bandwidth]``, ``serve`` starts a process in a role, ``api`` calls its REST API.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import random
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import redis
import trustme

import e911_sip
from tests.certs import issue, write_ca

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIO_DIR = REPO_ROOT / "sipp_scenarios"
LOOPBACK = "127.0.0.1"
GEOLOCATION_BASE_URL = "https://emergency.bandwidth.com/locations/"

DEFAULT_CALLER = "1321551234"
"""The PortaSIP account of use scenario 1.6b; also the callback number of its line."""
DEFAULT_ENDPOINT = "555555/202369122819078578"
"""A provider_endpoint, ``{bw_account_id}/{endpoint_id}``, as in use scenario 1.6b."""
DEFAULT_PAI = "9195550100"
DEFAULT_HOLD_MS = "100"

_UAC_KEYS = {"caller": DEFAULT_CALLER, "hold_ms": DEFAULT_HOLD_MS}

SCENARIO_KEYS: dict[str, dict[str, str]] = {
    "uac_911": dict(_UAC_KEYS),
    "uac_911_pai": {**_UAC_KEYS, "pai": DEFAULT_PAI},
    "uac_911_device_location": dict(_UAC_KEYS),
    "uac_sos": dict(_UAC_KEYS),
    "uac_load": dict(_UAC_KEYS),
    "uac_911_probe": {"hold_ms": DEFAULT_HOLD_MS},
    "uac_cancel": {"caller": DEFAULT_CALLER},
    "uac_911_rejected": {"caller": DEFAULT_CALLER, "expected_status": "503"},
    "uac_911_enriched": {**_UAC_KEYS, "endpoint": DEFAULT_ENDPOINT, "callback": DEFAULT_CALLER},
    "uac_911_unlocated": {**_UAC_KEYS, "callback": DEFAULT_CALLER},
    "uac_911_proxied": dict(_UAC_KEYS),
    "uac_911_callee_hangs_up": {"caller": DEFAULT_CALLER},
    "uas_emergency": {
        "expected_ruser": "911",
        "expected_endpoint": DEFAULT_ENDPOINT,
        "expected_callback": DEFAULT_CALLER,
    },
    "uas_no_location": {"expected_ruser": "911", "expected_callback": DEFAULT_CALLER},
    "uas_passthrough": {"expected_ruser": "2125550100", "expected_pai": ""},
    "uas_408": {},
    "uas_486": {},
    "uas_500": {},
    "uas_503": {},
    "uas_603": {},
    "uas_ring_then_487": {},
    "uas_load": {},
    "uas_psap_hangs_up": {"ring_ms": DEFAULT_HOLD_MS, "hold_ms": DEFAULT_HOLD_MS},
    "uas_probed": {"expected_ruser": "911"},
    "uas_emergency_probe": {},
}
"""Every ``-key`` each scenario in sipp_scenarios/ uses, with its documented default."""

_TRANSPORTS = {"u1": "udp", "un": "udp", "t1": "tcp", "tn": "tcp"}


class HarnessError(RuntimeError):
    """A process of the harness could not be started, became unready or misbehaved."""


class EdgeStartError(HarnessError):
    """The edge exited or never answered ``/readyz`` with 200; the message holds its stderr."""


# ---------------------------------------------------------------------------- ports


# Test ports come from below the kernel's ephemeral range: a port the kernel picked (bind to
# port 0) is one it may hand to the next outgoing connection too (a Redis client, SIPp),
# which then holds it when the server under test binds it (EADDRINUSE). Ports below the range
# are only ever taken by an explicit bind. The floor keeps clear of SIPp's fixed ports
# (media 6000+, control 8888+).
_PORT_FLOOR = 10_000
_handed_out: set[int] = set()
_pick = random.Random()


def _port_range() -> tuple[int, int]:
    """The ports to pick from: ``_PORT_FLOOR`` up to the start of the ephemeral range."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32_768
    return _PORT_FLOOR, max(ephemeral_low, _PORT_FLOOR + 2_000) - 1


def _bindable(port: int, kinds: Sequence[int], host: str) -> bool:
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def _pick_port(kinds: Sequence[int], host: str) -> int:
    low, high = _port_range()
    if len(_handed_out) > (high - low) // 2:
        # A long session: the oldest ports were bound and released long ago.
        _handed_out.clear()
    for _ in range(500):
        port = _pick.randint(low, high)
        if port in _handed_out or not _bindable(port, kinds, host):
            continue
        # Never the same port twice: two picks made before either is bound must differ.
        _handed_out.add(port)
        return port
    raise HarnessError(f"no loopback port free in {low}-{high} after 500 tries")


def free_port(transport: str = "udp", *, host: str = LOOPBACK) -> int:
    """A port on ``host`` that is free right now for ``"udp"`` or ``"tcp"`` (``"both"``: both).

    Picked below the kernel's ephemeral range, so no outgoing connection can take it before
    the caller binds it; another test's explicit bind still could, and callers that start a
    server on it detect that and report it.
    """
    kind = transport.lower()
    if kind == "both":
        return free_port_pair(host=host)
    if kind not in ("udp", "tcp"):
        raise ValueError(f"transport must be 'udp', 'tcp' or 'both', not {transport!r}")
    return _pick_port([socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM], host)


def free_port_pair(*, host: str = LOOPBACK) -> int:
    """A port on ``host`` free for both UDP and TCP (the edge listens on both)."""
    return _pick_port([socket.SOCK_STREAM, socket.SOCK_DGRAM], host)


def trunk_uri(port: int, transport: str = "udp", host: str = LOOPBACK) -> str:
    """``sip:host:port`` for a trunk, with ``;transport=tcp`` when it is reached over TCP."""
    uri = f"sip:{host}:{port}"
    return uri if transport.lower() == "udp" else f"{uri};transport={transport.lower()}"


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for entry in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(entry)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _bound_inodes(transport: str, port: int) -> set[int]:
    """Inodes of IPv4 sockets bound to ``port``: UDP bound, or TCP listening."""
    table = Path("/proc/net/udp" if transport == "udp" else "/proc/net/tcp")
    wanted_state = "07" if transport == "udp" else "0A"
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == wanted_state:
                inodes.add(int(fields[9]))
    return inodes


def port_bound_by(pid: int, transport: str, port: int) -> bool:
    """True once process ``pid`` has bound ``port`` (UDP) or listens on it (TCP).

    Reads /proc (Linux). Without /proc it falls back to "someone listens" for TCP and
    to True for UDP, which cannot be probed without racing the owner for the port.
    """
    if not Path("/proc/net").is_dir():
        if transport == "udp":
            return True
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((LOOPBACK, port)) == 0
    return bool(_bound_inodes(transport, port) & _socket_inodes(pid))


# ------------------------------------------------------------------------ processes


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM to ``proc.pid``, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def _poll_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    *,
    timeout: float,
    interval: float = 0.02,
) -> bool:
    """Poll ``ready()`` until it is true (True), ``proc`` exits or ``timeout`` passes (False).

    The pause between polls is a wait on the process, so an exit is noticed at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=min(interval, remaining))


def wait_until(
    condition: Callable[[], bool], what: str, *, timeout: float, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it is true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


PACKAGE_ROOT = str(Path(e911_sip.__file__).resolve().parent.parent)
"""Where this test process imported the package from: ``src/``, or the compiled build that
``scripts/compile`` unpacked. Child processes import the same one."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the package under test (:data:`PACKAGE_ROOT`) first
    on PYTHONPATH, so a child runs the same build even when it is not installed; ``extra``
    added."""
    env = dict(os.environ)
    src = PACKAGE_ROOT
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = src if not path else f"{src}{os.pathsep}{path}"
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    """The command line of ``e911-sip args`` run by this interpreter."""
    return [sys.executable, "-m", "e911_sip", *args]


def serve_command(role: str) -> list[str]:
    """``e911-sip serve --role role`` for EdgeProcess (``{config}``: its TOML file)."""
    return cli_command("serve", "--role", role, "--config", "{config}")


def run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``e911-sip args`` to its end (killed after ``timeout``); output captured as text."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        check=False,
    )


class _OutputFiles:
    """stdout/stderr files of one child process, closed once it has exited."""

    def __init__(self, stdout: Path, stderr: Path) -> None:
        self.stdout_path = stdout
        self.stderr_path = stderr
        self._handles: list[IO[bytes]] = []

    def open(self) -> tuple[IO[bytes], IO[bytes]]:
        # Appending keeps what an earlier run wrote when a process is restarted.
        out = self.stdout_path.open("ab")
        err = self.stderr_path.open("ab")
        self._handles = [out, err]
        return out, err

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []


# ---------------------------------------------------------------------------- Redis


class RedisServer:
    """A real redis-server on 127.0.0.1, in its own directory, started and stopped by PID.

    A subclass may write another configuration (``_write_config``), add arguments
    (``_command``) and name its directory and files after what it runs (``kind``).
    """

    kind = "redis"
    """Prefix of the directory, and name of the ``.conf`` and ``.log`` files."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        unix_socket: bool = False,
        tls: bool | trustme.CA = False,
    ) -> None:
        """``unix_socket``: listen on a Unix socket too (:attr:`unix_url`), in a directory of
        its own under the system's temp dir, where its path stays within the 107 bytes a
        socket address may have. ``tls``: serve TLS only (replication too), with a certificate
        for 127.0.0.1 from a CA of its own, or from the CA given (:attr:`ca_file`);
        :attr:`url` is then a ``rediss://`` URL that trusts it."""
        self.binary = shutil.which("redis-server")
        self.socket_dir = Path(tempfile.mkdtemp(prefix="e911-redis-")) if unix_socket else None
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.kind}-", dir=workdir))
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port("tcp")
        self.appendonly = appendonly
        self.log_path = self.dir / f"{self.kind}.log"
        self.config_path = self.dir / f"{self.kind}.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._output = _OutputFiles(self.dir / "stdout.log", self.dir / "stderr.log")
        self._clients: list[redis.Redis] = []
        self.ca_file: Path | None = None
        self._pems: tuple[Path, Path] | None = None
        if tls:
            ca = tls if isinstance(tls, trustme.CA) else trustme.CA()
            self.ca_file = write_ca(ca, self.dir / "ca.pem")
            pair = issue(ca, self.dir, "redis", LOOPBACK)
            self._pems = (pair.cert, pair.key)

    @property
    def url(self) -> str:
        if self.ca_file is not None:
            return f"rediss://{LOOPBACK}:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix:///PATH?db=0``; only with ``unix_socket=True``."""
        if self.socket_dir is None:
            raise HarnessError("this redis-server was started without a Unix socket")
        return f"unix://{self.socket_dir / 'redis.sock'}?db=0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        self.config_path.write_text(
            "\n".join(
                [
                    f"bind {LOOPBACK}",
                    *self._listen_lines(),
                    "protected-mode yes",
                    "daemonize no",
                    f'dir "{self.dir}"',
                    f'logfile "{self.log_path}"',
                    'save ""',
                    f"appendonly {'yes' if self.appendonly else 'no'}",
                    "appendfsync always",
                    *(
                        [f'unixsocket "{self.socket_dir / "redis.sock"}"', "unixsocketperm 700"]
                        if self.socket_dir is not None
                        else []
                    ),
                    "",
                ]
            ),
            encoding="utf-8",
        )

    def _listen_lines(self) -> list[str]:
        """The configuration lines for the port: plain, or TLS only (replication too)."""
        if self._pems is None:
            return [f"port {self.port}"]
        return [
            "port 0",
            f"tls-port {self.port}",
            f'tls-cert-file "{self._pems[0]}"',
            f'tls-key-file "{self._pems[1]}"',
            f'tls-ca-cert-file "{self.ca_file}"',
            "tls-auth-clients no",
            "tls-replication yes",
        ]

    def _command(self, binary: str) -> list[str]:
        return [binary, str(self.config_path)]

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it answers PING; raise HarnessError otherwise.

        Can be called again after ``stop()``: the same port and directory are reused, so an
        append-only file written before the stop is loaded again.
        """
        if self.running:
            raise HarnessError(f"redis-server already running (pid {self.pid})")
        if self.binary is None:
            raise HarnessError("redis-server is not installed (apt-get install redis-server)")
        attempts = 1 if self._fixed_port or self._proc is not None else 3
        for attempt in range(attempts):
            self._write_config()
            out, err = self._output.open()
            self._proc = subprocess.Popen(
                self._command(self.binary),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.dir,
            )
            if _poll_until(self._answers_ping, self._proc, timeout=timeout):
                return
            exited = self._proc.poll() is not None
            _stop_process(self._proc, 5.0)
            self._output.close()
            log = _tail(self.log_path)
            if exited and "Address already in use" in log and attempt + 1 < attempts:
                self.port = free_port("tcp")
                continue
            reason = (
                f"exited with {self._proc.returncode}"
                if exited
                else f"did not answer PING within {timeout}s"
            )
            raise HarnessError(f"redis-server on port {self.port} {reason}\n--- log ---\n{log}")

    def _answers_ping(self) -> bool:
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(
                    socket.create_connection((LOOPBACK, self.port), timeout=0.5)
                )
                if self.ca_file is not None:
                    context = ssl.create_default_context(cafile=str(self.ca_file))
                    sock = stack.enter_context(context.wrap_socket(sock, server_hostname=LOOPBACK))
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, bounded wait, SIGKILL. Idempotent; closes the clients handed out."""
        for client in self._clients:
            client.close()
        self._clients = []
        if self._proc is not None:
            _stop_process(self._proc, timeout)
        self._output.close()
        if self.socket_dir is not None and not self.running:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL by PID: the store vanishes without a shutdown (an outage, not a restart)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._output.close()

    def client(self) -> redis.Redis:
        """A synchronous client (``decode_responses=True``), closed by ``stop()``."""
        client = redis.Redis(
            host=LOOPBACK,
            port=self.port,
            db=0,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=5,
            **(
                {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self.ca_file is not None else {}
            ),
        )
        self._clients.append(client)
        return client

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ----------------------------------------------------------------------------- SIPp


@dataclass(repr=False)
class SippResult:
    """The outcome of one SIPp run, from its -trace_stat CSV (or its screen) and exit code."""

    returncode: int
    successful: int
    failed: int
    retransmissions: int
    stdout: str
    stderr: str
    error_log: str
    message_log: str
    log: str = ""
    """Output of the scenario's <log> actions."""
    stats: dict[str, str] = field(default_factory=dict)
    """The last row of the statistics CSV, by column name (e.g. ``"FailedCall(C)"``)."""
    scenario: str = ""
    command: list[str] = field(default_factory=list)
    timed_out: bool = False
    """The harness had to stop the process: it outlived the time it was given."""
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Exit code 0, no failed call, and SIPp finished by itself.

        SIPp exits 0 on SIGTERM, so a process the harness had to stop is never ok.
        """
        return self.returncode == 0 and self.failed == 0 and not self.timed_out

    def summary(self) -> str:
        """A few lines for an assertion message: outcome, counts, errors, stderr."""
        lines = [
            f"SIPp {self.scenario}: exit {self.returncode}"
            + (" (stopped by the harness)" if self.timed_out else "")
            + f", successful={self.successful} failed={self.failed}"
            + f" retransmissions={self.retransmissions}",
            "command: " + " ".join(self.command),
        ]
        if self.error_log.strip():
            error = self.error_log if len(self.error_log) < 3000 else self.error_log[:3000] + "..."
            lines.append("--- error log ---\n" + error.rstrip())
        stderr = self.stderr.strip()
        if stderr:
            lines.append("--- stderr ---\n" + stderr[-2000:])
        if self.files:
            lines.append("files: " + str(next(iter(self.files.values())).parent))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


_SCREEN_COUNTS = {
    "successful": re.compile(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)"),
    "failed": re.compile(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)"),
}


def _parse_stats(path: Path) -> dict[str, str]:
    rows = [line for line in _read(path).splitlines() if line.strip()]
    if len(rows) < 2:
        return {}
    header = rows[0].split(";")
    last = rows[-1].split(";")
    return {name: value for name, value in zip(header, last, strict=False) if name}


def _count(stats: Mapping[str, str], column: str) -> int | None:
    try:
        return int(float(stats[column]))
    except (KeyError, ValueError):
        return None


class SippProcess:
    """One SIPp process running in the background (a UAS, or a UAC started with start_uac)."""

    def __init__(
        self,
        *,
        command: list[str],
        scenario: str,
        rundir: Path,
        port: int,
        transport: str,
    ) -> None:
        self.command = command
        self.scenario = scenario
        self.rundir = rundir
        self.port = port
        self.transport = transport
        self.files = {
            "stats": rundir / "stats.csv",
            "errors": rundir / "errors.log",
            "messages": rundir / "messages.log",
            "log": rundir / "actions.log",
            "screen": rundir / "screen.log",
            "stdout": rundir / "stdout.log",
            "stderr": rundir / "stderr.log",
        }
        self._output = _OutputFiles(self.files["stdout"], self.files["stderr"])
        self._proc: subprocess.Popen[bytes] | None = None
        self._result: SippResult | None = None
        self._timed_out = False

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise HarnessError("SIPp has not been started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, wait_bound: bool, timeout: float = 10.0) -> None:
        out, err = self._output.open()
        self._proc = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.rundir
        )
        if not wait_bound:
            return
        kind = _TRANSPORTS.get(self.transport, "udp")
        if _poll_until(
            lambda: port_bound_by(self.pid, kind, self.port), self._proc, timeout=timeout
        ):
            return
        result = self.stop()
        raise HarnessError(
            f"SIPp {self.scenario} did not bind {kind} {LOOPBACK}:{self.port} "
            f"within {timeout}s\n{result.summary()}"
        )

    def wait(self, timeout: float = 30.0) -> SippResult:
        """Wait for SIPp to finish its calls; after ``timeout`` stop it and report that."""
        if self._result is not None:
            return self._result
        if self._proc is None:
            raise HarnessError("SIPp has not been started")
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._timed_out = True
            _stop_process(self._proc, 5.0)
        return self._collect()

    def stop(self) -> SippResult:
        """Stop SIPp by PID now (SIGTERM, then SIGKILL) and collect what it wrote."""
        if self._result is not None:
            return self._result
        if self._proc is not None and self._proc.poll() is None:
            self._timed_out = True
            _stop_process(self._proc, 5.0)
        return self._collect()

    def _collect(self) -> SippResult:
        self._output.close()
        stats = _parse_stats(self.files["stats"])
        stdout = _read(self.files["stdout"])
        screen = _read(self.files["screen"]) + stdout
        counts: dict[str, int] = {}
        for name, column in (("successful", "SuccessfulCall(C)"), ("failed", "FailedCall(C)")):
            value = _count(stats, column)
            if value is None:
                found = _SCREEN_COUNTS[name].findall(screen)
                value = int(found[-1]) if found else 0
            counts[name] = value
        returncode = self._proc.returncode if self._proc is not None else -1
        self._result = SippResult(
            returncode=returncode,
            successful=counts["successful"],
            failed=counts["failed"],
            retransmissions=_count(stats, "Retransmissions(C)") or 0,
            stdout=stdout,
            stderr=_read(self.files["stderr"]),
            error_log=_read(self.files["errors"]),
            message_log=_read(self.files["messages"]),
            log=_read(self.files["log"]),
            stats=stats,
            scenario=self.scenario,
            command=self.command,
            timed_out=self._timed_out,
            files=dict(self.files),
        )
        return self._result


def scenario_path(scenario: str | Path) -> Path:
    """``"uas_emergency"`` or ``"uas_emergency.xml"`` in sipp_scenarios/, or a path."""
    text = str(scenario)
    if "/" in text:
        path = Path(text)
    else:
        path = SCENARIO_DIR / (text if text.endswith(".xml") else f"{text}.xml")
    if not path.is_file():
        raise HarnessError(f"no SIPp scenario {path}")
    return path


def scenario_keys(scenario: str | Path, keys: Mapping[str, str] | None = None) -> dict[str, str]:
    """The scenario's documented ``-key`` defaults updated with ``keys``.

    For a scenario of sipp_scenarios/, a key it does not use is an error (a typo would
    otherwise leave the default silently in force).
    """
    name = scenario_path(scenario).stem
    given = dict(keys or {})
    if name not in SCENARIO_KEYS or scenario_path(scenario).parent != SCENARIO_DIR:
        return given
    unknown = sorted(set(given) - set(SCENARIO_KEYS[name]))
    if unknown:
        raise HarnessError(
            f"{name}.xml has no key {', '.join(unknown)}; it takes: "
            + (", ".join(sorted(SCENARIO_KEYS[name])) or "none")
        )
    return {**SCENARIO_KEYS[name], **given}


class Sipp:
    """Runs SIPp scenarios with every file under ``workdir``; stops what it started on close()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.binary = shutil.which("sipp")
        self._count = 0
        self._processes: list[SippProcess] = []

    def _command(
        self,
        scenario: str | Path,
        *,
        role: str,
        remote: str | None,
        port: int,
        transport: str,
        keys: Mapping[str, str] | None,
        calls: int,
        timeout: float,
        extra: Sequence[str],
        uac_options: Sequence[str] = (),
        host: str = LOOPBACK,
    ) -> tuple[list[str], Path, str]:
        if self.binary is None:
            raise HarnessError("sipp is not installed (apt-get install sip-tester)")
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {sorted(_TRANSPORTS)}, not {transport!r}")
        path = scenario_path(scenario)
        self._count += 1
        rundir = self.workdir / "sipp" / f"{self._count:02d}-{role}-{path.stem}"
        rundir.mkdir(parents=True)
        command = [self.binary]
        if remote is not None:
            command.append(remote)
        command += ["-sf", str(path), "-t", transport, "-i", host, "-p", str(port)]
        command += ["-bind_local", "-ci", host, "-mi", host, "-nostdin"]
        command += ["-m", str(calls), "-timeout", f"{max(1, math.ceil(timeout))}s"]
        command += ["-timeout_error"]
        command += ["-trace_stat", "-stf", str(rundir / "stats.csv")]
        command += ["-trace_err", "-error_file", str(rundir / "errors.log")]
        command += ["-trace_msg", "-message_file", str(rundir / "messages.log")]
        command += ["-trace_logs", "-log_file", str(rundir / "actions.log")]
        command += ["-trace_screen", "-screen_file", str(rundir / "screen.log")]
        command += list(uac_options)
        for name, value in scenario_keys(scenario, keys).items():
            command += ["-key", name, value]
        command += list(extra)
        return command, rundir, path.stem

    def uas(
        self,
        scenario: str,
        *,
        port: int,
        transport: str = "u1",
        keys: dict[str, str] | None = None,
        calls: int = 1,
        extra: Sequence[str] = (),
        timeout: float = 60.0,
        ready_timeout: float = 10.0,
        host: str = LOOPBACK,
    ) -> SippProcess:
        """Start a UAS on ``host`` (127.0.0.1; another loopback address puts it outside the
        edge's trust domain, as a real trunk is) and ``port`` in the background; returns once
        it is bound.

        It exits by itself after ``calls`` calls, or fails after ``timeout`` seconds
        (SIPp's -timeout with -timeout_error). OPTIONS and other out-of-dialog requests are
        answered 200 (-aa), so trunk probes do not disturb the scenario.
        """
        command, rundir, name = self._command(
            scenario,
            role="uas",
            remote=None,
            port=port,
            transport=transport,
            keys=keys,
            calls=calls,
            timeout=timeout,
            extra=["-aa", *extra],
            host=host,
        )
        process = SippProcess(
            command=command, scenario=name, rundir=rundir, port=port, transport=transport
        )
        self._processes.append(process)
        process.start(wait_bound=True, timeout=ready_timeout)
        return process

    def _uac_process(
        self,
        scenario: str,
        target: str,
        *,
        service: str,
        port: int | None,
        transport: str,
        keys: dict[str, str] | None,
        calls: int,
        rate: float,
        timeout: float,
        extra: Sequence[str],
    ) -> SippProcess:
        if port is None:
            port = free_port(_TRANSPORTS.get(transport, "udp"))
        command, rundir, name = self._command(
            scenario,
            role="uac",
            remote=target,
            port=port,
            transport=transport,
            keys=keys,
            calls=calls,
            timeout=timeout,
            extra=extra,
            uac_options=["-s", service, "-r", f"{rate:g}"],
        )
        process = SippProcess(
            command=command, scenario=name, rundir=rundir, port=port, transport=transport
        )
        self._processes.append(process)
        return process

    def uac(
        self,
        scenario: str,
        target: str,
        *,
        service: str = "911",
        port: int | None = None,
        transport: str = "u1",
        keys: dict[str, str] | None = None,
        calls: int = 1,
        rate: float = 10,
        timeout: float = 20.0,
        extra: Sequence[str] = (),
    ) -> SippResult:
        """Run a UAC against ``target`` (``"127.0.0.1:5060"``) to completion.

        Bounded twice: SIPp's own -timeout (a failure, exit 255) and a process wait of
        ``timeout`` + 15 s after which the harness stops it.
        """
        process = self._uac_process(
            scenario,
            target,
            service=service,
            port=port,
            transport=transport,
            keys=keys,
            calls=calls,
            rate=rate,
            timeout=timeout,
            extra=extra,
        )
        process.start(wait_bound=False)
        return process.wait(timeout=timeout + 15.0)

    def start_uac(
        self,
        scenario: str,
        target: str,
        *,
        service: str = "911",
        port: int | None = None,
        transport: str = "u1",
        keys: dict[str, str] | None = None,
        calls: int = 1,
        rate: float = 10,
        timeout: float = 60.0,
        extra: Sequence[str] = (),
    ) -> SippProcess:
        """As ``uac`` but in the background (e.g. a call in progress while the edge restarts)."""
        process = self._uac_process(
            scenario,
            target,
            service=service,
            port=port,
            transport=transport,
            keys=keys,
            calls=calls,
            rate=rate,
            timeout=timeout,
            extra=extra,
        )
        process.start(wait_bound=False)
        return process

    def close(self) -> None:
        """Stop every SIPp process this runner started that is still running."""
        for process in self._processes:
            process.stop()


# ------------------------------------------------------------------- silent peers


class _SilentPeer:
    def __init__(self, sock_type: int) -> None:
        self.sock = socket.socket(socket.AF_INET, sock_type)
        self.sock.bind((LOOPBACK, 0))
        self.port: int = self.sock.getsockname()[1]
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._changed = threading.Condition()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    def _record(self, data: bytes, addr: tuple[str, int]) -> None:
        with self._changed:
            self.received.append((data, addr))
            self._changed.notify_all()

    @property
    def count(self) -> int:
        """How many datagrams (UDP) or reads (TCP) arrived so far."""
        with self._changed:
            return len(self.received)

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> bool:
        """True once at least ``count`` datagrams/segments arrived, False after ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.received) >= count, timeout=timeout)

    @property
    def uri(self) -> str:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the reader thread (woken through a socket pair) and close the sockets."""
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
            self._thread = None
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SilentUdpPeer(_SilentPeer):
    """A trunk that never answers: a bound UDP socket that reads and counts datagrams."""

    def __init__(self) -> None:
        super().__init__(socket.SOCK_DGRAM)

    @property
    def uri(self) -> str:
        return trunk_uri(self.port, "udp")

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    data, addr = self.sock.recvfrom(65535)
                    self._record(data, addr)

    def __enter__(self) -> SilentUdpPeer:
        self.start()
        return self


class SilentTcpPeer(_SilentPeer):
    """A trunk that accepts TCP connections, reads everything and never answers."""

    def __init__(self) -> None:
        super().__init__(socket.SOCK_STREAM)
        self.sock.listen(16)
        self.connections = 0

    @property
    def uri(self) -> str:
        return trunk_uri(self.port, "tcp")

    def _run(self) -> None:
        conns: list[socket.socket] = []
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select():
                        if key.fileobj is self._wake_r:
                            return
                        if key.fileobj is self.sock:
                            conn, _addr = self.sock.accept()
                            conns.append(conn)
                            self.connections += 1
                            selector.register(conn, selectors.EVENT_READ)
                            continue
                        stream = key.fileobj
                        if not isinstance(stream, socket.socket):
                            continue
                        try:
                            data = stream.recv(65535)
                            peer = stream.getpeername()
                        except OSError:
                            data, peer = b"", ("", 0)
                        if data:
                            self._record(data, peer)
                        else:
                            selector.unregister(stream)
                            stream.close()
            finally:
                for conn in conns:
                    conn.close()

    def __enter__(self) -> SilentTcpPeer:
        self.start()
        return self


# ----------------------------------------------------------------------------- TOML

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys are strings, not {type(key).__name__}: {key!r}")
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def _is_table_array(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(v, Mapping) for v in value)
    )


def toml_dumps(document: Mapping[str, Any]) -> str:
    """Write a document (nested dicts of str/int/float/bool/Path/lists) as TOML.

    Nested dicts become ``[tables]``, lists of dicts ``[[arrays of tables]]`` (their own
    nested dicts inline); ``tomllib.loads`` reads back the same document.
    """
    lines: list[str] = []

    def table(path: list[str], body: Mapping[str, Any]) -> None:
        header = ".".join(_toml_key(part) for part in path)
        plain = [(k, v) for k, v in body.items() if not isinstance(v, Mapping)]
        plain = [(k, v) for k, v in plain if not _is_table_array(v)]
        tables = [(k, v) for k, v in body.items() if isinstance(v, Mapping)]
        arrays = [(k, v) for k, v in body.items() if _is_table_array(v)]
        if path and (plain or not (tables or arrays)):
            lines.append(f"[{header}]")
        for key, value in plain:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        if plain or (path and not (tables or arrays)):
            lines.append("")
        for key, value in tables:
            table([*path, key], value)
        for key, items in arrays:
            array_header = ".".join(_toml_key(part) for part in [*path, key])
            for item in items:
                lines.append(f"[[{array_header}]]")
                for item_key, item_value in item.items():
                    lines.append(f"{_toml_key(item_key)} = {_toml_value(item_value)}")
                lines.append("")

    table([], document)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_toml(document: Mapping[str, Any], path: Path) -> Path:
    path.write_text(toml_dumps(document), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- edge


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def edge_config(
    *,
    sip_port: int,
    http_port: int,
    emergency_trunks: list[str],
    default_trunks: list[str],
    store_url: str = "memory://",
    seed_file: Path | None = None,
    transports: Iterable[str] = ("udp", "tcp"),
    sip_host: str = LOOPBACK,
    **overrides: Any,
) -> dict[str, Any]:
    """The edge's configuration document for a test, every address on 127.0.0.1 (the SIP
    listeners on ``sip_host``).

    Each keyword in ``overrides`` names a top-level table: a dict is merged into it
    (recursively), anything else replaces it, e.g. ``emergency={"numbers": ["911"]}``.
    """
    store: dict[str, Any] = {"url": store_url}
    if seed_file is not None:
        store["seed_file"] = str(seed_file)
    config: dict[str, Any] = {
        "sip": {"listen": [f"{t}:{sip_host}:{sip_port}" for t in transports]},
        "emergency": {
            "numbers": ["911", "933"],
            "trunks": list(emergency_trunks),
            "geolocation_base_url": GEOLOCATION_BASE_URL,
            # Probes would reach the silent peers and SIPp trunks of every test; the tests
            # of probing turn them on.
            "probe_interval": 0,
        },
        "default": {"trunks": list(default_trunks), "probe_interval": 0},
        "store": store,
        "http": {"listen": f"{LOOPBACK}:{http_port}"},
    }
    return _merge(config, overrides)


def edge_config_on_free_ports(
    *, trunk: int | None = None, sip_host: str = LOOPBACK, **options: Any
) -> dict[str, Any]:
    """``edge_config`` on free loopback ports: SIP (on ``sip_host``), HTTP, one default trunk
    and one emergency trunk (UDP port ``trunk``, or a free one nobody answers on);
    ``options`` as there."""
    return edge_config(
        sip_port=free_port("both", host=sip_host),
        sip_host=sip_host,
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(trunk if trunk is not None else free_port("udp"))],
        default_trunks=[trunk_uri(free_port("udp"))],
        **options,
    )


def _listen_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` in Prometheus text whose labels include ``labels``.

    None when no sample matches (a counter that was never incremented may be absent).
    """
    total: float | None = None
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        found = dict(_LABEL.findall(match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total = (total or 0.0) + float(match.group(4))
    return total


class EdgeProcess:
    """The edge as a real process: ``python -m e911_sip serve --config edge.toml``."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        *,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``command`` replaces the default command line; ``{config}`` in it is the TOML path.

        ``env`` adds to the inherited environment; ``src/`` is put on PYTHONPATH so the
        package under test is imported even when it is not installed. ``ssl_context``: the
        ``[http]`` listener serves HTTPS, and ``http_get`` (readiness included) uses it.
        """
        self.ssl_context = ssl_context
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="edge-", dir=workdir))
        self.config = config
        self.config_path = self.dir / "edge.toml"
        self.log_path = self.dir / "stderr.log"
        self.stdout_path = self.dir / "stdout.log"
        listen = config["sip"]["listen"]
        self.sip_port = _listen_port(listen if isinstance(listen, str) else listen[0])
        self.http_address: str = config["http"]["listen"]
        self.http_host, _, port = self.http_address.rpartition(":")
        self.http_port = int(port)
        template = list(command) if command is not None else self.default_command()
        self.command = [part.replace("{config}", str(self.config_path)) for part in template]
        self.env = child_env({"PYTHONUNBUFFERED": "1", **(env or {})})
        self._proc: subprocess.Popen[bytes] | None = None
        self._output = _OutputFiles(self.stdout_path, self.log_path)

    @staticmethod
    def default_command() -> list[str]:
        return cli_command("serve", "--config", "{config}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def sip_target(self) -> str:
        """``127.0.0.1:port``: the target a SIPp UAC sends to."""
        return f"{LOOPBACK}:{self.sip_port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the edge and return once ``GET /readyz`` answers 200.

        Raises EdgeStartError, with the process's stderr, if it exits first or is not ready
        within ``timeout`` (it is then stopped).
        """
        if self.running:
            raise HarnessError(f"edge already running (pid {self.pid})")
        write_toml(self.config, self.config_path)
        out, err = self._output.open()
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=self.dir,
            env=self.env,
            # Its own process group: what is left of it at the end of a test (workers still
            # draining when the supervisor was killed) is stopped with it.
            start_new_session=True,
        )
        last: list[str] = ["no answer"]

        def ready() -> bool:
            try:
                status, body = self.http_get("/readyz", timeout=1.0)
            except OSError as exc:
                last[0] = f"{type(exc).__name__}: {exc}"
                return False
            last[0] = f"{status} {body[:200]!r}"
            return status == 200

        if _poll_until(ready, self._proc, timeout=timeout, interval=0.05):
            return
        exited = self._proc.poll() is not None
        self.stop()
        reason = (
            f"exited with {self._proc.returncode} before /readyz answered 200"
            if exited
            else f"/readyz did not answer 200 within {timeout}s (last: {last[0]})"
        )
        raise EdgeStartError(
            f"edge {reason}\ncommand: {' '.join(self.command)}\nconfig: {self.config_path}\n"
            f"--- stderr ({self.log_path}) ---\n{_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, wait up to ``timeout``, SIGKILL; then SIGKILL to whatever of its
        process group is left (workers). Idempotent; output stays in files."""
        if self._proc is not None:
            _stop_process(self._proc, timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._output.close()

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL by PID (a crash: no drain, no cleanup) and wait for the exit."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=timeout)
        self._output.close()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the edge's PID (e.g. SIGHUP to reload)."""
        if not self.running or self._proc is None:
            raise HarnessError("edge is not running")
        self._proc.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the edge to exit by itself; returns its exit code."""
        if self._proc is None:
            raise HarnessError("edge has not been started")
        code = self._proc.wait(timeout=timeout)
        self._output.close()
        return code

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """``GET path`` on the edge's HTTP listener: (status, body)."""
        conn: http.client.HTTPConnection
        if self.ssl_context is None:
            conn = http.client.HTTPConnection(self.http_host, self.http_port, timeout=timeout)
        else:
            conn = http.client.HTTPSConnection(
                self.http_host, self.http_port, timeout=timeout, context=self.ssl_context
            )
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8", errors="replace")
        finally:
            conn.close()

    def metrics(self) -> str:
        """The Prometheus text of ``GET /metrics``."""
        status, body = self.http_get("/metrics")
        if status != 200:
            raise HarnessError(f"GET /metrics answered {status}: {body[:500]}")
        return body

    def metric(self, name: str, **labels: str) -> float | None:
        """One value from ``metrics()``; see ``metric_value``."""
        return metric_value(self.metrics(), name, **labels)

    def wait_metric(
        self,
        name: str,
        condition: Callable[[float], bool],
        what: str,
        *,
        timeout: float = 30.0,
        **labels: str,
    ) -> float:
        """Poll ``/metrics`` until ``name{labels}`` satisfies ``condition``; returns the value.

        An absent series never satisfies it. AssertionError naming ``what`` after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if value is not None and condition(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {name} is {value} after {timeout} s")
            time.sleep(0.05)

    def log_text(self) -> str:
        """Everything the edge wrote to stderr so far (its structured log)."""
        return _read(self.log_path)

    def __enter__(self) -> EdgeProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    workdir: Path,
    processes: list[EdgeProcess],
    config: dict[str, Any],
    role: str,
    *,
    timeout: float = 30.0,
) -> EdgeProcess:
    """Start ``e911-sip serve --role role`` and return it once ready; it joins ``processes``
    before it starts, so whoever stops those stops it even when the start failed."""
    process = EdgeProcess(workdir, config, command=serve_command(role))
    processes.append(process)
    process.start(timeout=timeout)
    return process


def call_and_check(sipp: Sipp, edge: EdgeProcess, trunk: int, line: str, endpoint: str) -> None:
    """One 911 call from ``line`` through ``edge``: the SIPp trunk on UDP ``trunk`` checks it
    carries ``endpoint`` and ``line`` as the callback; caller and trunk must both succeed."""
    uas = sipp.uas(
        "uas_emergency.xml",
        port=trunk,
        keys={"expected_endpoint": endpoint, "expected_callback": line},
    )
    caller = sipp.uac("uac_911.xml", edge.sip_target, keys={"caller": line})
    assert caller.ok, caller.summary()
    trunk_result = uas.wait()
    assert trunk_result.ok, trunk_result.summary()


# ---------------------------------------------------------------------- provisioning

API_TOKEN = "integration-token-0123456789"
"""The bearer token ``api`` sends unless told otherwise."""

EMBEDDED_EMULATOR = {"run_emulator": True, "max_retry_time": 5.0}
"""``[bandwidth]`` keys that run the bundled Bandwidth emulator inside the process."""


def json_request(
    url: str,
    method: str = "GET",
    body: Any = None,
    *,
    token: str | None = None,
    data: bytes | None = None,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """``method url`` with ``body`` as JSON (or the bytes ``data``): (status, decoded JSON).

    An error status is returned, not raised; ``token`` goes as a bearer token.
    """
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if data is None and body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def api(
    port: int, method: str, path: str, body: Any = None, *, token: str = API_TOKEN, **options: Any
) -> tuple[int, Any]:
    """A request to the provisioning API on 127.0.0.1:``port``; see ``json_request``."""
    return json_request(f"http://{LOOPBACK}:{port}{path}", method, body, token=token, **options)


def provisioning_sections(
    api_port: int,
    bandwidth_url: str,
    *,
    tokens: Mapping[str, str],
    bandwidth: Mapping[str, Any] = EMBEDDED_EMULATOR,
    **provisioning: Any,
) -> dict[str, Any]:
    """``[provisioning]`` and ``[bandwidth]`` for ``edge_config``: the API on
    127.0.0.1:``api_port`` taking ``tokens`` (name: token) and ``provisioning``'s keys;
    Bandwidth's API at ``bandwidth_url`` (``http://host:port``) with ``bandwidth``'s keys."""
    return {
        "provisioning": {
            "listen": f"{LOOPBACK}:{api_port}",
            "tokens": dict(tokens),
            **provisioning,
        },
        "bandwidth": {
            "api_base": f"{bandwidth_url}/api/v2",
            "token_url": f"{bandwidth_url}/api/v1/oauth2/token",
            **bandwidth,
        },
    }


class BandwidthEmulator:
    """``e911-sip bandwidth-emulator`` in its own process, so it outlives a provisioning
    process that is killed; its ``/_emulator`` control API injects faults."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="emulator-", dir=workdir))
        self.port = free_port("tcp")
        self.base = f"http://{LOOPBACK}:{self.port}"
        self.command = cli_command(
            "bandwidth-emulator", "--listen", f"{LOOPBACK}:{self.port}", "--log-level", "WARNING"
        )
        self._output = _OutputFiles(self.dir / "stdout.log", self.dir / "stderr.log")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start it and return once ``/_emulator/state`` answers; HarnessError otherwise."""
        out, err = self._output.open()
        self._proc = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env()
        )
        if _poll_until(self._answers, self._proc, timeout=timeout, interval=0.05):
            return
        self.stop()
        raise HarnessError(
            f"the Bandwidth emulator did not answer within {timeout}s "
            f"(exit {self._proc.returncode})\n{_tail(self._output.stderr_path)}"
        )

    def _answers(self) -> bool:
        try:
            self.state()
        except OSError:
            return False
        return True

    def state(self) -> dict[str, Any]:
        """Everything it holds and every request it answered (``GET /_emulator/state``)."""
        status, state = json_request(f"{self.base}/_emulator/state", timeout=10)
        if status != 200:
            raise HarnessError(f"GET /_emulator/state answered {status}: {state}")
        result: dict[str, Any] = state
        return result

    def fault(self, spec: dict[str, Any]) -> None:
        """Inject a fault (see the emulator's module documentation for ``spec``)."""
        status, answer = json_request(f"{self.base}/_emulator/faults", "POST", spec)
        if status != 201:
            raise HarnessError(f"POST /_emulator/faults answered {status}: {answer}")

    def clear_faults(self) -> None:
        request = urllib.request.Request(f"{self.base}/_emulator/faults", method="DELETE")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, bounded wait, SIGKILL. Idempotent."""
        if self._proc is not None:
            _stop_process(self._proc, timeout)
        self._output.close()
