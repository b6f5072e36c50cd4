"""A store connection on a transport double: made ready as if connected, never opened."""

from __future__ import annotations

from e911_sip.store.resp import Connection


class Transport:
    """Enough of an asyncio transport for a connection that is never really opened."""

    def __init__(self) -> None:
        self.aborted = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


def made_ready(connection: Connection, address: tuple[str, int] | None = None) -> Transport:
    """Give ``connection`` a transport double and mark it ready, connected to ``address``
    (the master the sentinels named, behind Sentinel); the double."""
    transport = Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.ready = True
    if address is not None:
        connection.address = address
    return transport
