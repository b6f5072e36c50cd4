"""A client of a running provisioning API, for the command line (``e911-sip resync``).

The line records an edge reads may live only inside the process that serves them (the
``memory://`` store of the single box). A command that rebuilt them in a store of its own
would report repairs no edge ever sees, so the command line asks the running service to do
the work, over the same API and with the same bearer tokens as any other client.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for the service to accept the connection before calling it unreachable."""


class RemoteError(Exception):
    """The service answered, but not with what was asked for; the message says why."""


class Unreachable(RemoteError):
    """Nothing accepted a connection at the service's address."""


def pinned_context(cert_file: Path) -> ssl.SSLContext:
    """A client TLS context that trusts the certificate file the local service presents (the
    leaf and any chain in it).

    The command line reaches the listener by its address, which the certificate need not
    name, so the host name is not checked; the configured certificate is the trust anchor.
    """
    context = ssl.create_default_context(cafile=str(cert_file))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


async def post(
    base_url: str,
    path: str,
    *,
    token: str,
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """POST ``path`` (no body) to the service at ``base_url``; the JSON object it returns.

    Only connecting is bounded (:data:`CONNECT_TIMEOUT`): the operation itself (a resync of
    every line) takes as long as it takes, and its own calls to Bandwidth are bounded.

    Raises:
        Unreachable: no connection could be made.
        RemoteError: an error status, or a body that is not a JSON object.
    """
    limits = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
    url = base_url.rstrip("/") + path
    try:
        async with (
            aiohttp.ClientSession(timeout=limits) as session,
            session.post(
                url, headers={"Authorization": f"Bearer {token}"}, ssl=tls or True
            ) as response,
        ):
            raw = await response.read()
            status = response.status
    except aiohttp.ClientSSLError as exc:
        raise RemoteError(f"TLS with {url} failed: {exc}") from exc
    except aiohttp.ClientConnectorError as exc:
        raise Unreachable(f"nothing answers at {base_url} ({exc.os_error})") from exc
    except TimeoutError as exc:
        raise Unreachable(
            f"nothing accepted a connection at {base_url} within {CONNECT_TIMEOUT:g} s"
        ) from exc
    except aiohttp.ClientError as exc:
        raise RemoteError(f"{url}: {exc}") from exc
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    if status >= 400:
        message = ""
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message", ""))
        raise RemoteError(f"{url} answered {status}{': ' + message if message else ''}")
    if not isinstance(body, dict):
        raise RemoteError(f"{url} answered {status} without a JSON object")
    return body
