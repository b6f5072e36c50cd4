"""What one process runs (:class:`Role`) and what an edge worker inherits from its
supervisor (:class:`WorkerSetup`).

Apart from :mod:`e911_sip.app` so that the command line can build its parser from them
without importing the whole product: ``e911-sip --help`` and a mistyped option answer at
once instead of after every module the service needs has loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """What one process runs."""

    EDGE = "edge"
    PROVISIONING = "provisioning"
    ALL = "all"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSetup:
    """What an edge worker inherits from its supervisor (``serve --worker``)."""

    slot: int
    """The worker's slot number: it owns the Call-IDs the dispatcher hashes to it."""
    udp_fd: int
    """The shared UDP socket, bound by the supervisor: sent on, never read."""
    channel_fd: int
    """The AF_UNIX datagram socket the dispatcher hands this worker its datagrams on."""
    control_fd: int
    """The AF_UNIX stream socket of the control channel (readiness, metrics)."""
    listeners: dict[str, int] = dataclasses.field(default_factory=dict)
    """The supervisor's listening sockets this worker serves, by transport (tcp, tls):
    worker 0's; the others open outbound stream connections only."""

    @classmethod
    def parse(cls, text: str) -> WorkerSetup:
        """``SLOT:UDP_FD:CHANNEL_FD:CONTROL_FD`` followed by ``:TRANSPORT=FD`` for each
        stream listener this worker serves.

        Raises:
            ValueError: not in that form.
        """
        parts = text.split(":")
        numbers, extra = parts[:4], parts[4:]
        listeners: dict[str, int] = {}
        for item in extra:
            name, sep, fd = item.partition("=")
            if not sep or name not in ("tcp", "tls") or not fd.isdigit():
                break
            listeners[name] = int(fd)
        else:
            if len(numbers) == 4 and all(p.isdigit() for p in numbers):
                slot, udp_fd, channel_fd, control_fd = (int(p) for p in numbers)
                return cls(
                    slot=slot,
                    udp_fd=udp_fd,
                    channel_fd=channel_fd,
                    control_fd=control_fd,
                    listeners=listeners,
                )
        raise ValueError(
            f"--worker: expected SLOT:UDP_FD:CHANNEL_FD:CONTROL_FD[:tcp=FD][:tls=FD], got {text!r}"
        )
