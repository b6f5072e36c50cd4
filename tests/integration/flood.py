"""A bounded UDP flood of unique non-emergency INVITEs, for tests and ``bench/flood.py``.

Loopback only: the target must be in 127.0.0.0/8. The sender paces itself to a rate and
stops after a count; a receiver thread counts what the edge answers (by status, and the
503s that carry Retry-After). It never retransmits and never ACKs: a flood, not a caller.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import Counter
from types import TracebackType

_SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 16000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


class UdpFlood:
    """``with UdpFlood(("127.0.0.1", port)) as flood: flood.send(3000, rate=1000)``."""

    def __init__(
        self, target: tuple[str, int], *, first_number: int = 2125500000, malformed: bool = False
    ) -> None:
        """``malformed`` sends INVITEs with a broken CSeq instead (each answered 400)."""
        if not ipaddress.ip_address(target[0]).is_loopback:
            raise ValueError(f"a flood goes to loopback only, not {target[0]}")
        self.target = target
        self.first_number = first_number
        self.malformed = malformed
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.sent = 0
        self.statuses: Counter[int] = Counter()
        self.retry_after = 0
        """503 responses that carried a Retry-After header."""
        self.progress = threading.Condition()
        self._stop = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name="flood-rx", daemon=True)

    def invite(self, n: int) -> bytes:
        """The ``n``-th INVITE: its own Call-ID, branch, tag and dialled number."""
        number = self.first_number + n
        host, port = self.target
        body = _SDP.encode()
        head = (
            f"INVITE sip:{number}@{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK-flood-{self.port}-{n}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:3215550000@127.0.0.1>;tag=flood{n}\r\n"
            f"To: <sip:{number}@{host}>\r\n"
            f"Call-ID: flood-{self.port}-{n}@127.0.0.1\r\n"
            f"CSeq: {'x' if self.malformed else '1'} INVITE\r\n"
            f"Contact: <sip:3215550000@127.0.0.1:{self.port}>\r\n"
            "Content-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def send(self, count: int, *, rate: float) -> float:
        """Send ``count`` INVITEs at about ``rate`` a second; returns the seconds it took."""
        start = time.monotonic()
        n = 0
        while n < count:
            due = min(count, int((time.monotonic() - start) * rate) + 1)
            while n < due:
                try:
                    self.sock.sendto(self.invite(n), self.target)
                except BlockingIOError:
                    break
                n += 1
            with self.progress:
                self.sent = n
                self.progress.notify_all()
            time.sleep(0.001)  # pacing, not waiting for anything
        return time.monotonic() - start

    def wait_sent(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until at least ``count`` INVITEs have gone out."""
        with self.progress:
            return self.progress.wait_for(lambda: self.sent >= count, timeout)

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data.startswith(b"SIP/2.0 "):
                continue
            try:
                status = int(data[8:11])
            except ValueError:
                continue
            self.statuses[status] += 1
            if status == 503 and b"\r\nretry-after:" in data.lower():
                self.retry_after += 1

    def __enter__(self) -> UdpFlood:
        self._receiver.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._receiver.join(timeout=5)
        self.sock.close()
