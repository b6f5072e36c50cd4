"""Fuzz bench for the SIP parser, the stream framer and the proxy core (run by hand, not in CI).

Every generated input goes through three targets:

- the parser: ``parse`` as a datagram and as a framed stream message; the lazily read values
  (Vias, From, To, tags, CSeq, Request-URI, Max-Forwards) are read too, and what the parser
  accepts, and every error reply it builds, must parse again once serialised;
- the stream framer: the input (sometimes twice, sometimes after a keep-alive ping) cut into
  random chunks, each framed message parsed as a stream message;
- the whole ``ProxyCore`` (receive, data_to_send, next_event, handle_timer, with injected
  time, built as tests/unit/proxy/test_core.py builds it), in one of three scenarios: the
  input arrives on its own (UDP, or TCP through the framer); a mutated response comes back
  from a trunk to a request the core really sent (a quarter of them a 2xx after its
  transaction has gone, relayed statelessly when it is still ours); a mutated CANCEL, ACK
  or retransmission arrives for an INVITE in progress. Every message the core sends must
  parse again, and once time has run on by an hour no transaction or response context may be
  left.

Inputs are mutations of the messages in tests/data/ and a few built here (byte flips,
truncation, duplication, header splicing, huge numbers, non-UTF-8 bytes, CRLF games, compact
forms, multi-value Via, folding, value swaps, cross-over) or messages generated from a small
SIP grammar. The only exceptions allowed out of the parser are ``RemoteSipError`` and its
subclasses (``ParseFailure``, ``MalformedMessage``, ``MessageTooLarge``,
``VersionNotSupported``, ``UnsupportedUriScheme``); out of the framer, ``MalformedMessage``
and ``MessageTooLarge``; out of the core, nothing.

Input ``i`` of seed ``s`` depends on nothing but ``(s, i)``, so a run is repeatable and any
input can be produced again. A failure is reduced to a small reproducer (the failing bytes
cut down while the failure stays the same) and saved to the crash directory as
``<target>-<signature>.json`` (replay with ``--replay``), ``.bin`` (the failing bytes) and
``.txt`` (the traceback).

    python bench/fuzz.py                          # 1,000,000 inputs, seed 1
    python bench/fuzz.py --count 50000 --seed 7 --jobs 2
    python bench/fuzz.py --duration 3600          # stop after an hour, whatever the count
    python bench/fuzz.py --replay fuzz-crashes/core-1a2b3c4d.json
    python bench/fuzz.py --atheris -- -runs=200000 -max_total_time=600

``--atheris`` runs the same checks under atheris (``pip install -e '.[fuzz]'``), libFuzzer's
coverage-guided loop, seeded with the corpus; extra libFuzzer flags follow ``--``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import ipaddress
import json
import multiprocessing
import os
import random
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e911_sip.build import describe as describe_build
from e911_sip.policy.emergency import emergency_number
from e911_sip.proxy.core import EmergencyCall, Outgoing, ProxyCore, ProxyOptions
from e911_sip.proxy.routing import LocalAddress
from e911_sip.sip.errors import MalformedMessage, MessageTooLarge, RemoteSipError, SipError
from e911_sip.sip.framing import StreamFramer
from e911_sip.sip.message import (
    COMPACT_FORMS,
    ParseFailure,
    Request,
    Response,
    error_response,
    make_response,
    parse,
)
from e911_sip.sip.peer import Peer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

EDGE_UDP = LocalAddress("udp", "192.0.2.1", 5070)
EDGE_TCP = LocalAddress("tcp", "192.0.2.1", 5070)
SOFTSWITCH = Peer("udp", "192.0.2.10", 5060)
SOFTSWITCH_TCP = Peer("tcp", "192.0.2.10", 40001, 7)
TRUNK1 = Peer("udp", "198.51.100.1", 5060)
TRUNK2 = Peer("udp", "198.51.100.2", 5060)
DEFAULT = Peer("udp", "203.0.113.5", 5060)
STRANGER = Peer("udp", "203.0.113.66", 5099)
SOURCES = (SOFTSWITCH, SOFTSWITCH, SOFTSWITCH_TCP, TRUNK1, DEFAULT, STRANGER)
PEERS = {
    "softswitch": SOFTSWITCH,
    "softswitch-tcp": SOFTSWITCH_TCP,
    "trunk1": TRUNK1,
    "trunk2": TRUNK2,
    "default": DEFAULT,
    "stranger": STRANGER,
}

SDP = b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
DRAIN_SECONDS = 3600.0
MAX_TIMER_STEPS = 20000


class BenchFailure(AssertionError):
    """An invariant the bench checks was broken (as opposed to an exception escaping)."""


# -- seeds ---------------------------------------------------------------------------------


def _msg(*lines: str, body: bytes = b"") -> bytes:
    head = "\r\n".join((*lines, f"Content-Length: {len(body)}"))
    return (head + "\r\n\r\n").encode("latin-1") + body


def invite(
    ruri: str = "sip:911@192.0.2.1:5070;user=phone",
    *,
    branch: str = "z9hG4bKuac1",
    call_id: str = "call-1@192.0.2.10",
    transport: str = "UDP",
    extra: tuple[str, ...] = (),
) -> bytes:
    return _msg(
        f"INVITE {ruri} SIP/2.0",
        f"Via: SIP/2.0/{transport} 192.0.2.10:5060;branch={branch};rport",
        "Max-Forwards: 70",
        "From: <sip:3215551234@192.0.2.10>;tag=uac-tag",
        f"To: <{ruri.split(';')[0]}>",
        f"Call-ID: {call_id}",
        "CSeq: 1 INVITE",
        "Contact: <sip:3215551234@192.0.2.10:5060>",
        "P-Asserted-Identity: <sip:3215551234@192.0.2.10>",
        *extra,
        "Content-Type: application/sdp",
        body=SDP,
    )


BUILTIN = [
    invite(),
    invite("sip:5551234@192.0.2.1:5070", call_id="plain@x"),
    invite("urn:service:sos", call_id="sos@x"),
    invite("tel:911", call_id="tel@x", transport="TCP"),
    invite(
        "sip:911@192.0.2.1:5070",
        extra=("Route: <sip:192.0.2.1:5070;lr>, <sip:198.51.100.9;lr>",),
        call_id="rt@x",
    ),
    _msg(
        "SIP/2.0 180 Ringing",
        "Via: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKt1.1;rport=5070",
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKuac1;rport=5060;received=192.0.2.10",
        "Record-Route: <sip:192.0.2.1:5070;lr>",
        "From: <sip:3215551234@192.0.2.10>;tag=uac-tag",
        "To: <sip:911@192.0.2.1:5070>;tag=uas",
        "Call-ID: call-1@192.0.2.10",
        "CSeq: 1 INVITE",
    ),
    _msg(
        "CANCEL sip:911@192.0.2.1:5070;user=phone SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKuac1",
        "Max-Forwards: 70",
        "From: <sip:3215551234@192.0.2.10>;tag=uac-tag",
        "To: <sip:911@192.0.2.1:5070>",
        "Call-ID: call-1@192.0.2.10",
        "CSeq: 1 CANCEL",
    ),
    _msg(
        "BYE sip:911@198.51.100.1:5060 SIP/2.0",
        "Via: SIP/2.0/UDP [2001:db8::10]:5060;branch=z9hG4bKbye",
        "Max-Forwards: 70",
        "Route: <sip:192.0.2.1:5070;lr>",
        'From: "Caller, A" <sip:3215551234@[2001:db8::10]>;tag=uac-tag',
        "To: <sip:911@198.51.100.1>;tag=uas",
        "i: bye@x",
        "CSeq: 2 BYE",
    ),
    _msg(
        "OPTIONS sip:192.0.2.1:5070 SIP/2.0",
        "v: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKopt, SIP/2.0/TCP 10.0.0.1;branch=z9hG4bKx",
        "Max-Forwards: 70",
        "f: <sip:ping@192.0.2.10>;tag=p1",
        "t: <sip:192.0.2.1:5070>",
        "i: ping@x",
        "CSeq: 7 OPTIONS",
    ),
    _msg(
        "REGISTER sip:192.0.2.1 SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKreg;rport",
        "Max-Forwards: 70",
        "From: <sip:a@192.0.2.1>;tag=r",
        "To: <sip:a@192.0.2.1>",
        "Call-ID: reg@x",
        "CSeq: 3 REGISTER",
        "Contact: <sip:a@192.0.2.10>;expires=3600",
        "Expires: 3600",
        "Retry-After: 120 (later);duration=60",
    ),
]


def load_corpus() -> list[bytes]:
    files = sorted(DATA.glob("*/*.sip"))
    return [p.read_bytes() for p in files] + BUILTIN


# -- mutations -----------------------------------------------------------------------------

HUGE = [
    b"9" * 4400,
    b"0" * 4400 + b"5",
    b"1" * 60000,
    b"4294967296",
    b"4294967295",
    b"2147483648",
    b"18446744073709551617",
    b"65536",
    b"65535",
    b"0",
    b"00",
    b"-1",
    b"+5",
    b"1e3",
    b"0x10",
    b"\xc2\xb2",
    b"\xb2",
    b"\xd9\xa3",
    b"",
    b" ",
    b"1 2",
    b"999",
    b"700",
    b"099",
]
ODD_BYTES = [
    b"\xff",
    b"\xfe\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xc0\x80",
    b"\x00",
    b"\x7f",
    b"\xe2\x80\xa8",
    b"\xef\xbb\xbf",
    b"\x1b[31m",
    "é".encode(),
    "☎".encode(),
    b"%00",
    b"\t",
    b"\x0b\x0c",
]
ODD_VALUES = [
    b"",
    b" ",
    b"<",
    b">",
    b'"',
    b'"\\',
    b";",
    b";;;,,,",
    b",",
    b"sip:",
    b"sip:@",
    b"sip:a@",
    b"sip:[::1",
    b"sip:[::1]x",
    b"sip:host:",
    b"sip:host:99999",
    b"sip:host:" + b"9" * 5000,
    b"tel:",
    b"urn:",
    b"urn:service:sos",
    b"mailto:a@b",
    b"<sip:a@b>;tag",
    b"<sip:a@b>;tag=",
    b"<sip:a@b>;tag=;tag=2",
    b'"unterminated <sip:a@b>',
    b"<sip:a@b> trailing",
    b"<>",
    b"<sip:a@b",
    b"SIP/2.0/UDP",
    b"SIP/2.0/UDP host:",
    b"SIP/2.0/UDP host:0;rport=0",
    b"SIP/2.0/UDP host;rport=99999",
    b"SIP/2.0/UDP host;rport=" + b"1" * 5000,
    b"SIP/2.0/UDP host;received=",
    b"SIP/2.0/UDP host;received=bad host name",
    b"SIP/2.0/UDP [::1];branch=z9hG4bK",
    b"SIP/2.0/UDP [::1]:5060;branch",
    b"SIP/2.0/UDP host;branch=z9hG4bKt1.1",
    b"SIP/2.0/UDP host;branch=z9hG4bKt1s0000",
    b"SIP/3.0/UDP host",
    b"1",
    b"1 INVITE",
    b"1 ACK",
    b"1 CANCEL",
    b"4294967295 INVITE",
    b"2147483647 BYE",
    b"x" * 5000,
    b"a" * 70000,
]
METHODS = [
    "INVITE",
    "ACK",
    "CANCEL",
    "BYE",
    "OPTIONS",
    "REGISTER",
    "PRACK",
    "UPDATE",
    "INFO",
    "MESSAGE",
    "NOTIFY",
    "SUBSCRIBE",
    "REFER",
    "PUBLISH",
    "FOO",
]
LONG_TO_COMPACT = {v: k for k, v in COMPACT_FORMS.items()}
_LINE_START = re.compile(rb"(?<=\r\n)")
_DIGITS = re.compile(rb"\d+")
_HEADER_NAME = re.compile(rb"(?<=\r\n)([A-Za-z][A-Za-z0-9-]*)[ \t]*:")


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def m_flip(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] = buf[i] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(buf)


def m_truncate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    cut = rng.randrange(len(data) + 1)
    if rng.random() < 0.3:
        return data[:cut] + b"\r\n\r\n"
    if rng.random() < 0.2:
        return data[cut:]
    return data[:cut]


def m_duplicate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    lines = _lines(data)
    if rng.random() < 0.6 and len(lines) > 1:
        i = rng.randrange(1, len(lines))
        lines.insert(rng.randrange(1, len(lines) + 1), lines[i])
        return b"\r\n".join(lines)
    a = rng.randrange(len(data) + 1)
    b = rng.randrange(a, min(len(data), a + 200) + 1)
    return data[:b] + data[a:b] * rng.randint(1, 4) + data[b:]


def m_splice(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    other = _lines(rng.choice(corpus))
    lines = _lines(data)
    donor = other[rng.randrange(len(other))] if other else b""
    lines.insert(rng.randrange(len(lines) + 1), donor)
    return b"\r\n".join(lines)


def m_crossover(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    other = rng.choice(corpus)
    return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]


def m_huge_number(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    runs = list(_DIGITS.finditer(data))
    if not runs:
        return data + rng.choice(HUGE)
    m = rng.choice(runs)
    return data[: m.start()] + rng.choice(HUGE) + data[m.end() :]


def m_odd_bytes(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    i = rng.randrange(len(data) + 1)
    skip = rng.choice((0, 0, 1))
    return data[:i] + rng.choice(ODD_BYTES) + data[i + skip :]


def m_crlf(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return data.replace(b"\r\n", b"\n")
    if choice == 1:
        return data.replace(b"\r\n", b"\r")
    if choice == 2:
        return b"\r\n" * rng.randint(1, 4) + data
    if choice == 3:
        i = rng.randrange(len(data) + 1)
        return data[:i] + rng.choice((b"\r\n", b"\r\n\r\n", b"\r", b"\n", b"\r\r\n")) + data[i:]
    if choice == 4:
        return data.replace(b"\r\n\r\n", b"\r\n", 1)
    if choice == 5:
        return data + rng.choice((b"\r\n", b"\r\n\r\n", b"garbage", b"\r\n\r\nINVITE"))
    if choice == 6:
        positions = [m.start() for m in re.finditer(rb"\r\n", data)]
        if positions:
            i = rng.choice(positions)
            return data[:i] + rng.choice((b"\n", b"\r", b"\r\n\r\n", b"")) + data[i + 2 :]
        return data
    if choice == 7:
        return data.replace(b"\r\n\r\n", b"\r\n \r\n\r\n", 1)
    return data.replace(b"\r\n", b"\n\r", 1)


def m_compact(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    def swap(m: re.Match[bytes]) -> bytes:
        name = m.group(1).decode("latin-1")
        key = name.lower()
        roll = rng.random()
        if roll < 0.35 and key in LONG_TO_COMPACT:
            name = LONG_TO_COMPACT[key]
        elif roll < 0.55 and key in COMPACT_FORMS:
            name = COMPACT_FORMS[key]
        elif roll < 0.75:
            name = "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)
        space = rng.choice(("", "", " ", "\t", "  \t"))
        return f"{name}{space}:".encode("latin-1")

    return _HEADER_NAME.sub(swap, data)


def m_multi_via(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    lines = _lines(data)
    vias = [i for i, ln in enumerate(lines) if ln[:2].lower() in (b"vi", b"v:", b"v ")]
    extra = rng.choice(
        (
            b"SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bKm1",
            b"SIP/2.0/TCP [2001:db8::1]:5061;branch=z9hG4bKm2;received=192.0.2.9",
            b"SIP / 2.0 / UDP  host.example ; branch = z9hG4bKm3",
            rng.choice(ODD_VALUES),
        )
    )
    choice = rng.randrange(4)
    if choice == 0 and vias:
        i = rng.choice(vias)
        lines[i] = lines[i] + b", " + extra
    elif choice == 1 and len(vias) > 1:
        first = vias[0]
        values = [lines[i].partition(b":")[2].strip() for i in vias]
        lines[first] = b"Via: " + b",".join(values)
        for i in reversed(vias[1:]):
            del lines[i]
    elif choice == 2:
        lines.insert(rng.randrange(1, len(lines) + 1) if len(lines) > 1 else 1, b"Via: " + extra)
    elif vias:
        del lines[rng.choice(vias)]
    return b"\r\n".join(lines)


def m_fold(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    positions = [m.start() for m in re.finditer(rb"[ :;,]", data)]
    if not positions:
        return data
    out = data
    for _ in range(rng.randint(1, 3)):
        positions = [m.start() for m in re.finditer(rb"[ :;,]", out)]
        i = rng.choice(positions) + 1
        out = out[:i] + rng.choice((b"\r\n ", b"\r\n\t", b"\r\n  \t", b"\r\n")) + out[i:]
    return out


def m_value(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    lines = _lines(data)
    candidates = [i for i, ln in enumerate(lines) if i and b":" in ln]
    if not candidates:
        return data
    i = rng.choice(candidates)
    name = lines[i].partition(b":")[0]
    lines[i] = name + b": " + rng.choice(ODD_VALUES)
    return b"\r\n".join(lines)


def m_start_line(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    head, sep, rest = data.partition(b"\r\n")
    choice = rng.randrange(6)
    if choice == 0:
        code = rng.choice(("000", "099", "100", "199", "200", "487", "699", "700", "999", "2000"))
        head = f"SIP/2.0 {code} Reason".encode()
    elif choice == 1:
        head = f"{rng.choice(METHODS)} {rng.choice(('sip:911@x', 'tel:911', '*'))} SIP/2.0".encode()
    elif choice == 2:
        head = head.replace(b"SIP/2.0", rng.choice((b"SIP/3.0", b"sip/2.0", b"SIP/2.0 ", b"")))
    elif choice == 3:
        head = head.replace(b" ", rng.choice((b"  ", b"\t", b"")), 1)
    elif choice == 4:
        parts = head.split(b" ")
        if len(parts) > 1:
            parts[1] = rng.choice(ODD_VALUES)
        head = b" ".join(parts)
    else:
        head = rng.choice(ODD_VALUES) + head
    return head + sep + rest


def m_body(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        return data + rng.choice((SDP, b"x" * rng.randrange(1, 3000), b"\r\n\r\n"))
    if choice == 1:
        return re.sub(rb"(?im)^(content-length|l)[ \t]*:[^\r\n]*\r\n", b"", data, count=1)
    if choice == 2:
        n = rng.choice((0, 1, 5, 65535, 65536, 2**31, 10**30))
        return re.sub(rb"(?im)^((?:content-length|l)[ \t]*:[ \t]*)\d+", rb"\g<1>%d" % n, data)
    return data.replace(b"Content-Length:", b"Content-Length: 5\r\nContent-Length:", 1)


MUTATORS: list[Callable[[random.Random, bytes, list[bytes]], bytes]] = [
    m_flip,
    m_truncate,
    m_duplicate,
    m_splice,
    m_crossover,
    m_huge_number,
    m_odd_bytes,
    m_crlf,
    m_compact,
    m_multi_via,
    m_fold,
    m_value,
    m_start_line,
    m_body,
]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        data = rng.choice(MUTATORS)(rng, data, corpus)
    return data


# -- grammar -------------------------------------------------------------------------------


def _token(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.!%*_+`'~-"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))


def _host(rng: random.Random) -> str:
    return rng.choice(
        (
            "192.0.2.1",
            "192.0.2.10",
            "198.51.100.1",
            "example.com",
            "[2001:db8::1]",
            "[::1]",
            _token(rng).lower(),
            "a.b.c.d.e",
        )
    )


def _port(rng: random.Random) -> str:
    return rng.choice(("", "", ":5060", ":5070", ":0", ":65535", ":65536", ":" + "9" * 30))


def _params(rng: random.Random) -> str:
    out = ""
    for _ in range(rng.choice((0, 0, 1, 2, 3))):
        name = rng.choice(("lr", "transport", "user", "maddr", "ttl", "method", _token(rng)))
        value = rng.choice(("", "=udp", "=tcp", "=tls", "=phone", "=" + _token(rng), "="))
        out += f";{name}{value}"
    return out


def _uri(rng: random.Random) -> str:
    scheme = rng.choice(("sip", "sip", "sips", "tel", "urn", "http", "SIP"))
    if scheme == "tel":
        return f"tel:{rng.choice(('911', '933', '+13215551234', ''))}{_params(rng)}"
    if scheme == "urn":
        return rng.choice(("urn:service:sos", "urn:service:sos.fire", "urn:", "urn:x y"))
    user = rng.choice(("", "911@", "933@", "3215551234@", "a:pw@", "@", _token(rng) + "@"))
    return f"{scheme}:{user}{_host(rng)}{_port(rng)}{_params(rng)}"


def _name_addr(rng: random.Random, tag: bool) -> str:
    display = rng.choice(("", '"Caller" ', '"Q \\" d" ', "Plain ", '"unterminated '))
    suffix = f";tag={_token(rng)}" if tag else ""
    if rng.random() < 0.2:
        return f"{_uri(rng)}{suffix}"
    return f"{display}<{_uri(rng)}>{suffix}"


def _via(rng: random.Random) -> str:
    transport = rng.choice(("UDP", "TCP", "TLS", "SCTP", "udp", "X"))
    params = rng.choice(("", ";rport", ";rport=5060", ";rport=0", ";rport=70000"))
    params += rng.choice(("", ";received=192.0.2.99", ";received="))
    branch = rng.choice(("z9hG4bK" + _token(rng), _token(rng), "z9hG4bKt1.1", ""))
    params += f";branch={branch}" if branch else ""
    return f"SIP/2.0/{transport} {_host(rng)}{_port(rng)}{params}"


def generate(rng: random.Random) -> bytes:
    """A message from a small SIP grammar, mostly well formed, with chosen defects."""
    request = rng.random() < 0.7
    method = rng.choice(METHODS)
    lines: list[str] = []
    if request:
        lines.append(f"{method} {_uri(rng)} SIP/2.0")
    else:
        status = rng.choice((100, 180, 183, 200, 202, 302, 404, 408, 487, 500, 503, 603, 700))
        lines.append(f"SIP/2.0 {status} {rng.choice(('OK', '', 'Some Reason'))}")
    headers: list[str] = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        values = ", ".join(_via(rng) for _ in range(rng.choice((1, 1, 2, 3))))
        headers.append(f"{rng.choice(('Via', 'v', 'VIA'))}: {values}")
    if rng.random() < 0.9:
        headers.append(f"Max-Forwards: {rng.choice(('70', '0', '1', '255', '256', '00070'))}")
    headers.append(f"{rng.choice(('From', 'f'))}: {_name_addr(rng, rng.random() < 0.9)}")
    headers.append(f"{rng.choice(('To', 't'))}: {_name_addr(rng, rng.random() < 0.4)}")
    if rng.random() < 0.97:
        headers.append(f"{rng.choice(('Call-ID', 'i'))}: {_token(rng)}@{_host(rng)}")
    if rng.random() < 0.97:
        cseq_method = method if rng.random() < 0.9 else rng.choice(METHODS)
        number = rng.choice(("1", "2", "0", "2147483647", "2147483648", "007"))
        headers.append(f"CSeq: {number} {cseq_method}")
    for _ in range(rng.choice((0, 0, 1, 2))):
        name = rng.choice(("Route", "Record-Route"))
        headers.append(f"{name}: {', '.join(f'<{_uri(rng)}>' for _ in range(rng.randint(1, 3)))}")
    if rng.random() < 0.5:
        headers.append(f"{rng.choice(('Contact', 'm'))}: {_name_addr(rng, False)}")
    for _ in range(rng.choice((0, 0, 1, 2))):
        headers.append(
            rng.choice(
                (
                    f"Expires: {rng.choice(('3600', '0', '99999999999'))}",
                    f"Retry-After: {rng.choice(('120', '120 (x);duration=5', 'soon'))}",
                    "Priority: emergency",
                    "Geolocation: <cid:abc@x>",
                    "P-Asserted-Identity: <sip:3215551234@192.0.2.10>",
                    f"Session-Expires: {rng.choice(('1800', '1800;refresher=uac', 'x'))}",
                    f"RSeq: {rng.choice(('1', '4294967296'))}",
                    f"RAck: {rng.choice(('1 1 INVITE', '1 x'))}",
                    f"{_token(rng)}: {_token(rng)}",
                )
            )
        )
    rng.shuffle(headers)
    body = rng.choice((b"", b"", SDP, b"x" * rng.randrange(1, 100)))
    length = rng.choice((len(body),) * 6 + (0, len(body) + 1, max(len(body) - 1, 0)))
    if rng.random() < 0.95:
        headers.append(f"{rng.choice(('Content-Length', 'l'))}: {length}")
    text = "\r\n".join(lines + headers) + "\r\n\r\n"
    return text.encode("latin-1") + body


def make_input(rng: random.Random, corpus: list[bytes]) -> bytes:
    roll = rng.random()
    if roll < 0.25:
        return generate(rng)
    if roll < 0.35:
        return mutate(rng, generate(rng), corpus)
    return mutate(rng, rng.choice(corpus), corpus)


# -- targets -------------------------------------------------------------------------------


def must_parse(
    data: bytes, what: str, *, datagram: bool = True, echoes: Callable[[], set[str]] = set
) -> Request | Response | None:
    """Parse what was produced. A reply may fail only with the fault of the request it
    answers, echoed in the fields it must copy (RFC 4475 §3.1.2.7); ``echoes`` names those."""
    try:
        return parse(data, datagram=datagram)
    except RemoteSipError as exc:
        if data.startswith(b"SIP/2.0 ") and isinstance(exc, ParseFailure) and str(exc) in echoes():
            return None
        raise BenchFailure(f"{what} does not parse again: {exc}") from exc


def parse_errors(messages: list[tuple[bytes, bool]]) -> set[str]:
    errors: set[str] = set()
    for data, datagram in messages:
        try:
            parse(data, datagram=datagram)
        except RemoteSipError as exc:
            errors.add(str(exc))
    return errors


def _read_everything(message: Request | Response) -> None:
    """Read every lazily parsed value; each may fail only with a SipError."""
    readers: list[Callable[[], object]] = [
        lambda: message.headers,
        lambda: message.vias,
        lambda: message.top_via,
        lambda: message.call_id,
        lambda: message.cseq,
        lambda: message.from_addr(),
        lambda: message.from_tag,
        lambda: message.to_tag,
        lambda: message.values("route"),
        lambda: message.pop_top_via().to_bytes(),
    ]
    if isinstance(message, Request):
        readers += [lambda: message.request_uri, lambda: message.max_forwards]
    for read in readers:
        try:
            read()
        except SipError:
            pass


def check_parser(data: bytes, rng: random.Random, stats: Counter[str]) -> None:
    for datagram in (True, False):
        try:
            message = parse(data, datagram=datagram)
        except ParseFailure as exc:
            stats["parse.answered" if exc.method else "parse.refused"] += 1
            reply = error_response(exc, to_tag="fz")
            if reply is not None:
                must_parse(
                    reply.to_bytes(), "error reply", echoes=functools.partial(set, [str(exc)])
                )
            continue
        except RemoteSipError:
            stats["parse.dropped"] += 1
            continue
        stats["parse.ok"] += 1
        _read_everything(message)
        must_parse(message.to_bytes(), "parsed message")
        if isinstance(message, Request) and message.method != "ACK":
            reply = make_response(message, 400, to_tag="fz").to_bytes()
            must_parse(
                reply, "built reply", echoes=functools.partial(parse_errors, [(data, datagram)])
            )


def check_framer(data: bytes, rng: random.Random, stats: Counter[str]) -> None:
    stream = rng.choice((data, data + data, b"\r\n\r\n" + data, data + b"\r\n\r\n" + data))
    cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.choice((0, 1, 2, 5))))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    framer = StreamFramer()
    try:
        for chunk in chunks:
            for message in framer.feed(chunk).messages:
                stats["framer.message"] += 1
                try:
                    parse(message, datagram=False)
                except RemoteSipError:
                    pass
    except (MalformedMessage, MessageTooLarge):
        stats["framer.closed"] += 1


@dataclass
class Step:
    """One thing done to the core: bytes received from a peer, after time moved on."""

    peer: str
    data: bytes
    advance: float = 0.0
    fuzzed: bool = False


@dataclass
class CoreRun:
    """A fresh core, driven the way the edge drives it, checking what it sends."""

    owner: str = "forward"
    core: ProxyCore = field(init=False)
    now: float = 0.0
    sent: list[Outgoing] = field(default_factory=list)
    received: list[tuple[bytes, bool]] = field(default_factory=list)
    checked: set[bytes] = field(default_factory=set)
    """Outgoing bytes already parsed again: retransmissions repeat them exactly."""

    def __post_init__(self) -> None:
        numbers = frozenset({"911", "933"})
        options = ProxyOptions(
            local=(EDGE_UDP, EDGE_TCP),
            emergency_classifier=functools.partial(emergency_number, numbers=numbers),
            emergency_trunks=("sip:198.51.100.1:5060", "sip:198.51.100.2:5060"),
            default_trunks=("sip:203.0.113.5:5060",),
            provisional_timeout=2.0,
            fail_open_after=0.5,
            # The softswitch's network; STRANGER stays outside it, so the trust checks are
            # fuzzed too.
            trusted_sources=(ipaddress.ip_network("192.0.2.0/24"),),
        )
        # Deterministic randomness: input i of seed s replays exactly.
        self.core = ProxyCore(options=options, entropy=random.Random(0).randbytes)

    def step(self, step: Step) -> list[Outgoing]:
        out = self.advance(step.advance)
        peer = PEERS[step.peer]
        if peer.reliable:
            framer = StreamFramer()
            try:
                messages = framer.feed(step.data).messages
            except (MalformedMessage, MessageTooLarge):
                messages = []
        else:
            messages = [step.data]
        for message in messages:
            self.received.append((message, not peer.reliable))
            self.core.receive(message, peer, self.now)
            out += self.collect()
        return out

    def collect(self) -> list[Outgoing]:
        core = self.core
        out = core.data_to_send()
        while (event := core.next_event()) is not None:
            if isinstance(event, EmergencyCall) and self.owner != "ignore":
                request = event.request
                if self.owner == "enrich":
                    request = request.replace("Priority", "emergency").append(
                        "Geolocation", "<cid:fz@192.0.2.1>"
                    )
                core.forward_emergency(event.call, request, self.now)
                out += core.data_to_send()
        for item in out:
            self.check_outgoing(item)
        self.sent += out
        return out

    def check_outgoing(self, item: Outgoing) -> None:
        peer = item.peer
        if not (0 < peer.port <= 65535) or not peer.host:
            raise BenchFailure(f"core sends to an unusable address {peer!r}")
        if item.data in self.checked:
            return
        self.checked.add(item.data)
        must_parse(
            item.data,
            "outgoing message",
            datagram=not peer.reliable,
            echoes=lambda: parse_errors(self.received),
        )

    def advance(self, seconds: float) -> list[Outgoing]:
        target = self.now + seconds
        out: list[Outgoing] = []
        steps = 0
        while (deadline := self.core.get_timer()) is not None and deadline <= target:
            steps += 1
            if steps > MAX_TIMER_STEPS:
                raise BenchFailure("timers keep firing without end")
            self.now = max(self.now, deadline)
            self.core.handle_timer(self.now)
            out += self.collect()
        self.now = target
        return out

    def drain(self) -> None:
        self.advance(DRAIN_SECONDS)
        core = self.core
        if core.transactions_in_flight or core.contexts_in_flight:
            raise BenchFailure(
                f"state left after {DRAIN_SECONDS:.0f} s: {core.transactions_in_flight} "
                f"transactions, {core.contexts_in_flight} contexts"
            )


def response_to(request: Request, status: int, to_tag: str = "uas") -> bytes:
    lines = [f"SIP/2.0 {status} Reason"]
    for h in request.headers:
        if h.key in ("via", "from", "call-id", "cseq", "record-route"):
            lines.append(h.raw)
        elif h.key == "to":
            lines.append(h.raw if status == 100 or request.to_tag else f"{h.raw};tag={to_tag}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _peer_name(peer: Peer) -> str:
    for name, known in PEERS.items():
        if (known.host, known.port) == (peer.host, peer.port):
            return name
    return "stranger"


def core_case(data: bytes, rng: random.Random, corpus: list[bytes]) -> tuple[str, list[Step]]:
    """The steps of one core scenario; the fuzzed step's bytes derive from ``data`` or live
    traffic, so the steps alone replay the case."""
    owner = rng.choice(("forward", "forward", "enrich", "ignore"))
    scenario = rng.choice(("direct", "direct", "response", "in_txn"))
    if scenario == "direct":
        peer = rng.choice(("softswitch", "softswitch", "softswitch-tcp", "trunk1", "stranger"))
        return owner, [Step(peer, data, rng.random(), fuzzed=True)]
    ruri = rng.choice(("sip:911@192.0.2.1:5070;user=phone", "sip:5551234@192.0.2.1:5070"))
    first = invite(ruri, branch=f"z9hG4bK{rng.randrange(10**6)}")
    steps = [Step("softswitch", first)]
    run = CoreRun(owner)
    out = run.step(steps[0])
    if scenario == "response":
        sent = [o for o in out if _peer_name(o.peer) != "softswitch"]
        if not sent:
            out += run.advance(1.0)
            sent = [o for o in out if _peer_name(o.peer) != "softswitch"]
        if not sent:
            return owner, steps
        target = sent[0]
        request = parse(target.data)
        assert isinstance(request, Request)
        status = rng.choice((100, 180, 183, 200, 408, 486, 503, 603))
        base = response_to(request, status)
        advance = rng.random()
        if rng.random() < 0.25:
            # Late: the call was answered and the transaction is gone (Timer M) when the
            # mutated 2xx comes, so it meets the stateless relay of a 2xx to our INVITE,
            # as a worker without the dead worker's transaction does.
            steps.append(Step(_peer_name(target.peer), response_to(request, 200), 0.1))
            base, advance = response_to(request, 200), 40.0
        elif rng.random() < 0.3:
            steps.append(Step(_peer_name(target.peer), response_to(request, 180), 0.1))
        steps.append(Step(_peer_name(target.peer), mutate(rng, base, corpus), advance, fuzzed=True))
        if rng.random() < 0.5:
            steps.append(Step(_peer_name(target.peer), response_to(request, 200), 0.1))
        return owner, steps
    original = parse(first)
    assert isinstance(original, Request)
    kind = rng.choice(("CANCEL", "ACK", "retransmit"))
    if kind == "retransmit":
        base = first
    else:
        base = first.replace(b" INVITE\r\n", f" {kind}\r\n".encode(), 1)
        base = base.replace(b"INVITE ", f"{kind} ".encode(), 1)
    if rng.random() < 0.5:
        reply = [o for o in out if _peer_name(o.peer) != "softswitch"]
        if reply:
            target = parse(reply[0].data)
            assert isinstance(target, Request)
            steps.append(Step(_peer_name(reply[0].peer), response_to(target, 486), 0.2))
    steps.append(Step("softswitch", mutate(rng, base, corpus), rng.random(), fuzzed=True))
    return owner, steps


def run_core(owner: str, steps: list[Step], stats: Counter[str]) -> None:
    run = CoreRun(owner)
    for step in steps:
        run.step(step)
    run.drain()
    stats["core.sent"] += len(run.sent)


# -- running and recording failures --------------------------------------------------------


@dataclass
class Failure:
    target: str
    signature: str
    text: str
    case: dict[str, Any]
    index: int


def signature_of(target: str, exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = "?"
    for frame in reversed(frames):
        if "e911_sip" in frame.filename or frame.filename.endswith("fuzz.py"):
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            break
    kind = type(exc).__name__
    if isinstance(exc, BenchFailure):
        # Same invariant broken: same failure, wherever the data made it break.
        kind += ":" + re.sub(r"[:\d].*", "", str(exc))[:60]
    return f"{target}|{kind}|{where}"


def execute(case: dict[str, Any]) -> None:
    """Run one recorded case; raises what the target raised."""
    stats: Counter[str] = Counter()
    target = case["target"]
    rng = random.Random(case.get("rng", 0))
    if target == "parser":
        check_parser(_unb64(case["data"]), rng, stats)
    elif target == "framer":
        check_framer(_unb64(case["data"]), rng, stats)
    else:
        steps = [
            Step(s["peer"], _unb64(s["data"]), s["advance"], s["fuzzed"]) for s in case["steps"]
        ]
        run_core(case["owner"], steps, stats)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def failing_bytes(case: dict[str, Any]) -> bytes:
    if case["target"] == "core":
        fuzzed = [s for s in case["steps"] if s["fuzzed"]]
        return _unb64(fuzzed[0]["data"]) if fuzzed else b""
    return _unb64(case["data"])


def with_bytes(case: dict[str, Any], data: bytes) -> dict[str, Any]:
    case = json.loads(json.dumps(case))
    if case["target"] == "core":
        for s in case["steps"]:
            if s["fuzzed"]:
                s["data"] = _b64(data)
    else:
        case["data"] = _b64(data)
    return case


def signature_now(case: dict[str, Any]) -> str | None:
    try:
        execute(case)
    except Exception as exc:
        return signature_of(case["target"], exc)
    return None


def minimize(case: dict[str, Any], signature: str, budget_s: float = 20.0) -> dict[str, Any]:
    """Cut the failing bytes down while the failure keeps its signature (ddmin, bounded)."""
    data = failing_bytes(case)
    deadline = time.monotonic() + budget_s
    chunk = max(len(data) // 2, 1)
    while chunk >= 1 and time.monotonic() < deadline:
        i = 0
        progressed = False
        while i < len(data) and time.monotonic() < deadline:
            candidate = data[:i] + data[i + chunk :]
            if signature_now(with_bytes(case, candidate)) == signature:
                data = candidate
                progressed = True
            else:
                i += chunk
        if not progressed:
            chunk //= 2
    # Long runs of one byte (4,400 nines) shrink by halves where single cuts would crawl.
    for m in sorted(re.finditer(rb"(.)\1{15,}", data, re.S), key=lambda m: -len(m.group())):
        if time.monotonic() >= deadline:
            break
        run = m.group()
        while len(run) > 1:
            shorter = run[: len(run) // 2]
            candidate = data.replace(run, shorter, 1)
            if signature_now(with_bytes(case, candidate)) != signature:
                break
            data, run = candidate, shorter
    return with_bytes(case, data)


def run_one(index: int, seed: int, corpus: list[bytes], stats: Counter[str]) -> list[Failure]:
    rng = random.Random(f"{seed}:{index}")
    data = make_input(rng, corpus)
    failures: list[Failure] = []
    cases: list[tuple[str, Callable[[], None], Callable[[], dict[str, Any]]]] = []
    parser_rng = rng.random()
    cases.append(
        (
            "parser",
            lambda: check_parser(data, random.Random(parser_rng), stats),
            lambda: {"target": "parser", "data": _b64(data), "rng": parser_rng},
        )
    )
    framer_rng = rng.random()
    cases.append(
        (
            "framer",
            lambda: check_framer(data, random.Random(framer_rng), stats),
            lambda: {"target": "framer", "data": _b64(data), "rng": framer_rng},
        )
    )
    try:
        owner, steps = core_case(data, rng, corpus)
    except Exception as exc:  # a crash while setting up the scenario is a finding too
        steps = []
        owner = "forward"
        failures.append(
            Failure(
                "core",
                signature_of("core", exc),
                "".join(traceback.format_exception(exc)),
                {"target": "core", "owner": owner, "steps": [], "seed": seed, "index": index},
                index,
            )
        )
    if steps:

        def core_record() -> dict[str, Any]:
            return {
                "target": "core",
                "owner": owner,
                "steps": [
                    {"peer": s.peer, "data": _b64(s.data), "advance": s.advance, "fuzzed": s.fuzzed}
                    for s in steps
                ],
            }

        cases.append(("core", lambda: run_core(owner, steps, stats), core_record))
    for target, run, record in cases:
        stats[f"exec.{target}"] += 1
        try:
            run()
        except Exception as exc:
            case = record() | {"seed": seed, "index": index}
            text = "".join(traceback.format_exception(exc))
            failures.append(Failure(target, signature_of(target, exc), text, case, index))
    return failures


def save(failure: Failure, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(failure.signature.encode()).hexdigest()[:10]
    base = directory / f"{failure.target}-{digest}"
    base.with_suffix(".json").write_text(
        json.dumps(failure.case | {"signature": failure.signature}, indent=1) + "\n"
    )
    base.with_suffix(".bin").write_bytes(failing_bytes(failure.case))
    base.with_suffix(".txt").write_text(f"{failure.signature}\n\n{failure.text}")
    return base.with_suffix(".json")


@dataclass
class ChunkResult:
    start: int
    count: int
    stats: Counter[str]
    failures: list[Failure]
    seconds: float


_CORPUS: list[bytes] = []


def _init_worker() -> None:
    _CORPUS[:] = load_corpus()


def run_chunk(args: tuple[int, int, int, bool]) -> ChunkResult:
    start, count, seed, do_minimize = args
    if not _CORPUS:
        _init_worker()
    stats: Counter[str] = Counter()
    seen: dict[str, Failure] = {}
    began = time.perf_counter()
    for index in range(start, start + count):
        for failure in run_one(index, seed, _CORPUS, stats):
            if failure.signature in seen:
                stats["failures.repeat"] += 1
                continue
            if do_minimize and failure.case.get("steps", True):
                failure.case = minimize(failure.case, failure.signature)
            seen[failure.signature] = failure
    return ChunkResult(start, count, stats, list(seen.values()), time.perf_counter() - began)


def chunks(
    total: int, size: int, seed: int, do_minimize: bool
) -> Iterator[tuple[int, int, int, bool]]:
    for start in range(0, total, size):
        yield start, min(size, total - start), seed, do_minimize


def fuzz(args: argparse.Namespace) -> int:
    crash_dir = Path(args.crashes)
    began = time.monotonic()
    deadline = began + args.duration if args.duration else None
    stats: Counter[str] = Counter()
    unique: dict[str, Path] = {}
    done = 0
    last_report = began
    print(
        f"fuzz: seed={args.seed} count={args.count} jobs={args.jobs} chunk={args.chunk} "
        f"duration={args.duration or 'unbounded'} crashes={crash_dir}",
        flush=True,
    )

    def absorb(result: ChunkResult) -> None:
        nonlocal done, last_report
        done += result.count
        stats.update(result.stats)
        for failure in result.failures:
            if failure.signature not in unique:
                unique[failure.signature] = save(failure, crash_dir)
                print(
                    f"  NEW FAILURE {failure.signature} -> {unique[failure.signature]}", flush=True
                )
        now = time.monotonic()
        if now - last_report >= args.progress:
            last_report = now
            rate = done / (now - began)
            print(
                f"  {done:>9} inputs  {rate:8.0f} exec/s  {len(unique)} unique failures  "
                f"{now - began:7.0f} s",
                flush=True,
            )

    work = chunks(args.count, args.chunk, args.seed, not args.no_minimize)
    try:
        if args.jobs <= 1:
            for item in work:
                absorb(run_chunk(item))
                if deadline is not None and time.monotonic() >= deadline:
                    break
        else:
            with multiprocessing.Pool(args.jobs, initializer=_init_worker) as pool:
                for result in pool.imap(run_chunk, work):
                    absorb(result)
                    if deadline is not None and time.monotonic() >= deadline:
                        pool.terminate()
                        break
    except KeyboardInterrupt:
        # The summary still counts every work unit that completed.
        print("fuzz: interrupted", flush=True)
    elapsed = time.monotonic() - began
    summary = {
        "seed": args.seed,
        "inputs": done,
        "seconds": round(elapsed, 1),
        "exec_per_s": round(done / elapsed, 1) if elapsed else 0.0,
        "target_execs": {k[5:]: v for k, v in sorted(stats.items()) if k.startswith("exec.")},
        "outcomes": {k: v for k, v in sorted(stats.items()) if not k.startswith("exec.")},
        "unique_failures": len(unique),
        "reproducers": {sig: str(path) for sig, path in unique.items()},
        "python": sys.version.split()[0],
        "build": describe_build(),
        "nproc": os.cpu_count(),
    }
    print("summary: " + json.dumps(summary, indent=1), flush=True)
    if done < args.count:
        print(f"fuzz: stopped after {done} of {args.count} inputs", flush=True)
    return 1 if unique else 0


def replay(paths: list[str]) -> int:
    status = 0
    for path in paths:
        case = json.loads(Path(path).read_text())
        try:
            execute(case)
        except Exception:
            status = 1
            print(f"{path}: FAILS", flush=True)
            traceback.print_exc()
        else:
            print(f"{path}: passes", flush=True)
    return status


# -- atheris -------------------------------------------------------------------------------


def run_atheris(extra: list[str], crash_dir: Path) -> int:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        print("fuzz: atheris is not installed (pip install -e '.[fuzz]')", file=sys.stderr)
        return 2
    # The modules are imported already (this file needs them), so their bytecode is
    # instrumented in place rather than through an import hook.
    atheris.instrument_all()
    corpus = load_corpus()
    seed_dir = crash_dir / "atheris-seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    for data in corpus:
        (seed_dir / hashlib.sha1(data).hexdigest()[:12]).write_bytes(data)
    stats: Counter[str] = Counter()

    def one_input(data: bytes) -> None:
        rng = random.Random(data)
        check_parser(data, rng, stats)
        check_framer(data, rng, stats)
        peer = rng.choice(("softswitch", "softswitch-tcp", "trunk1"))
        run_core("forward", [Step(peer, data, 0.0, True)], stats)

    argv = [sys.argv[0], f"-artifact_prefix={crash_dir}/", *extra, str(seed_dir)]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs to run")
    parser.add_argument("--seed", type=int, default=1, help="seed; a run is repeatable")
    parser.add_argument("--duration", type=float, default=0, help="stop after SECONDS")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--chunk", type=int, default=2000, help="inputs per work unit")
    parser.add_argument("--progress", type=float, default=10.0, help="seconds between lines")
    parser.add_argument("--crashes", default="fuzz-crashes", help="reproducer directory")
    parser.add_argument("--no-minimize", action="store_true", help="save failures as found")
    parser.add_argument("--replay", nargs="+", metavar="JSON", help="rerun saved reproducers")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided, via atheris")
    parser.add_argument("extra", nargs="*", help="libFuzzer flags for --atheris (after --)")
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay)
    if args.atheris:
        return run_atheris(args.extra, Path(args.crashes))
    return fuzz(args)


if __name__ == "__main__":
    sys.exit(main())
