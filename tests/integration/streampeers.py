"""Stream (TCP/TLS) SIP peers for the integration tests: SIPp here speaks no TLS.

:class:`TlsTrunk` is a trunk that accepts TLS connections, answers each INVITE with 200 OK
and each BYE with 200, and records every message; :func:`sip_exchange` is the caller's side:
it sends one request on a stream and reads responses until a final one.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
from types import TracebackType

LOOPBACK = "127.0.0.1"
_CONTENT_LENGTH = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\d+)", re.I)


def read_message(stream: socket.socket, buffer: bytearray) -> bytes | None:
    """One SIP message framed by Content-Length from ``stream``; None at end of stream."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            match = _CONTENT_LENGTH.search(buffer, 0, end + 2)
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(buffer) >= total:
                message = bytes(buffer[:total])
                del buffer[:total]
                return message
        data = stream.recv(65536)
        if not data:
            return None
        buffer += data


def header_lines(message: bytes, name: str) -> list[str]:
    """Every value of header ``name`` (full name only), in order."""
    out = []
    for line in message.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            out.append(value.strip())
    return out


def response_to(request: bytes, status: str, *, contact: str, to_tag: str = "trunk1") -> bytes:
    """A response copying Via, Record-Route, From, To (tagged), Call-ID and CSeq."""
    lines = [f"SIP/2.0 {status}"]
    head = request.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
    for line in head:
        key = line.partition(":")[0].strip().lower()
        if key in ("via", "v", "record-route", "from", "f", "call-id", "i", "cseq"):
            lines.append(line)
        elif key in ("to", "t"):
            lines.append(line if ";tag=" in line else f"{line};tag={to_tag}")
    lines += [f"Contact: <{contact}>", "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


class TlsTrunk:
    """A TLS trunk on 127.0.0.1: 200 to every INVITE and BYE, every message recorded."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.handshake_errors: list[str] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._streams: list[socket.socket] = []

    @property
    def uri(self) -> str:
        return f"sip:{LOOPBACK}:{self.port};transport=tls"

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> bool:
        """True once ``count`` messages arrived, False after ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.received) >= count, timeout=timeout)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10.0)
        try:
            stream = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            with self._changed:
                self.handshake_errors.append(str(exc))
                self._changed.notify_all()
            raw.close()
            return
        self._streams.append(stream)
        buffer = bytearray()
        with stream:
            while not self._stop.is_set():
                try:
                    message = read_message(stream, buffer)
                except (OSError, ssl.SSLError):
                    return
                if message is None:
                    return
                with self._changed:
                    self.received.append(message)
                    self._changed.notify_all()
                if message.startswith((b"INVITE ", b"BYE ")):
                    contact = f"sip:trunk@{LOOPBACK}:{self.port};transport=tls"
                    stream.sendall(response_to(message, "200 OK", contact=contact))

    def __enter__(self) -> TlsTrunk:
        thread = threading.Thread(target=self._accept, daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self.sock.close()
        for stream in self._streams:
            with contextlib.suppress(OSError):
                stream.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)


def sip_exchange(stream: socket.socket, request: bytes, timeout: float = 10.0) -> list[bytes]:
    """Send ``request`` and return every response up to and including the first final one."""
    stream.settimeout(timeout)
    stream.sendall(request)
    buffer = bytearray()
    responses: list[bytes] = []
    while True:
        message = read_message(stream, buffer)
        if message is None:
            return responses
        responses.append(message)
        if message.startswith(b"SIP/2.0 ") and not message.startswith(b"SIP/2.0 1"):
            return responses


def invite(target_port: int, transport: str, *, call_id: str, number: str = "911") -> bytes:
    """An emergency INVITE from the softswitch's line, as PortaSIP sends it."""
    via = f"SIP/2.0/{transport.upper()} {LOOPBACK}:5999;branch=z9hG4bK{call_id}"
    return (
        f"INVITE sip:{number}@{LOOPBACK}:{target_port};transport={transport} SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:1321551234@{LOOPBACK}>;tag=caller1\r\n"
        f"To: <sip:{number}@{LOOPBACK}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:1321551234@{LOOPBACK}:5999;transport={transport}>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def in_dialog(method: str, cseq: int, invite: bytes, ok: bytes, *, call_id: str) -> bytes:
    """ACK or BYE of the caller's dialog: to the 200's Contact, through its Record-Route."""
    contact = header_lines(ok, "contact")[0].strip("<>")
    routes = ", ".join(reversed(header_lines(ok, "record-route")))
    via = header_lines(invite, "via")[0].split(";branch=")[0]
    return (
        f"{method} {contact} SIP/2.0\r\n"
        f"Via: {via};branch=z9hG4bK{call_id}-{method.lower()}\r\n"
        f"Route: {routes}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: {header_lines(ok, 'from')[0]}\r\n"
        f"To: {header_lines(ok, 'to')[0]}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def options(target_port: int, transport: str, *, call_id: str, host: str = LOOPBACK) -> bytes:
    """An OPTIONS addressed to the edge itself (answered by the edge) on ``host``."""
    return (
        f"OPTIONS sip:{host}:{target_port};transport={transport} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} {LOOPBACK}:5999;branch=z9hG4bK{call_id}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:portasip@{LOOPBACK}>;tag=o1\r\n"
        f"To: <sip:{host}:{target_port}>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()
