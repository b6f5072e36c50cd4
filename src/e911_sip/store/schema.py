"""The version of the product's data layout in Redis, and whether this release may use it.

One key, :data:`SCHEMA_KEY` (``e911:schema``), holds ``MAJOR.MINOR``. A minor release only
adds (new keys, new optional fields that older readers ignore), so any release of the same
major reads and writes the data; a new major changes what is there, and a release of another
major must not touch it. Provisioning writes the key when it is absent and raises the minor
when the stored one is older within the same major (it never lowers it); edges only read it.
An absent key is a deployment from before the key existed: it is taken as this release's
version.

:func:`decide` is the pure rule (unit-tested); :func:`check` reads (and, for a writer,
compare-and-sets) the key on one Redis database.

Versions:

- 1.0: line records ``e911:line:{number}`` (hashes), provisioning state
  ``e911:prov:customer:*``, ``e911:prov:customers``, ``e911:prov:owner:*``, import jobs
  ``e911:prov:import:*``, the audit, call-record and notification streams;
- 1.1: adds ``e911:prov:lease:*`` (leases of customers and import jobs) and this key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from redis.exceptions import RedisError, WatchError

from e911_sip.store.base import StoreError
from e911_sip.store.redis import connect

SCHEMA_KEY = "e911:schema"
"""The Redis key that holds the data layout's ``MAJOR.MINOR``."""

_VERSION = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")


@dataclass(frozen=True, slots=True, order=True)
class SchemaVersion:
    """A data layout version: ``major`` changes break readers, ``minor`` ones only add."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> SchemaVersion:
        """``"1.1"`` → SchemaVersion(1, 1).

        Raises:
            ValueError: ``text`` is not ``MAJOR.MINOR`` in decimal digits.
        """
        match = _VERSION.match(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not MAJOR.MINOR")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


CURRENT = SchemaVersion(1, 1)
"""The layout this release writes and reads."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaCheck:
    """What :func:`decide` concluded about one database."""

    stored: str | None
    """The key's value as found (None: absent)."""
    current: SchemaVersion
    """This release's version."""
    ok: bool
    """True: this release may run against the data."""
    write: SchemaVersion | None
    """What a writer (provisioning) sets the key to; None: leave it as it is."""
    message: str
    """One line for the log (and, when not ``ok``, what the operator must do)."""


class SchemaRefused(Exception):
    """The data in Redis has a layout this release must not use; the message says what to do."""


def decide(stored: str | None, current: SchemaVersion = CURRENT) -> SchemaCheck:
    """Whether a release of ``current`` may use data whose key holds ``stored``."""
    if stored is None:
        return SchemaCheck(
            stored=None,
            current=current,
            ok=True,
            write=current,
            message=f"{SCHEMA_KEY} is absent: the data is taken as schema {current}",
        )
    try:
        found = SchemaVersion.parse(stored)
    except ValueError:
        return SchemaCheck(
            stored=stored,
            current=current,
            ok=False,
            write=None,
            message=f"{SCHEMA_KEY} holds {stored!r}, which is not MAJOR.MINOR; it was not "
            f"written by e911-sip: correct it (this release writes {current}) or point the "
            "configuration at the right Redis database",
        )
    if found.major > current.major:
        return SchemaCheck(
            stored=stored,
            current=current,
            ok=False,
            write=None,
            message=f"the data is schema {found} ({SCHEMA_KEY}), written by a newer e911-sip; "
            f"this release reads schema {current.major}.x only: upgrade this host to a "
            f"{found.major}.x-schema release (docs/operations.md, Upgrading)",
        )
    if found.major < current.major:
        return SchemaCheck(
            stored=stored,
            current=current,
            ok=False,
            write=None,
            message=f"the data is schema {found} ({SCHEMA_KEY}), older than this release's "
            f"major {current.major}: migrate it as the release notes of schema "
            f"{current.major}.0 say, or run a release of schema {found.major}.x "
            "(docs/operations.md, Upgrading)",
        )
    if found.minor < current.minor:
        return SchemaCheck(
            stored=stored,
            current=current,
            ok=True,
            write=current,
            message=f"the data is schema {found}: this release ({current}) adds to it only",
        )
    if found.minor > current.minor:
        return SchemaCheck(
            stored=stored,
            current=current,
            ok=True,
            write=None,
            message=f"the data is schema {found}, newer within major {found.major}: this "
            f"release ({current}) ignores what it does not know",
        )
    return SchemaCheck(
        stored=stored, current=current, ok=True, write=None, message=f"schema {found}"
    )


async def check(
    url: str,
    *,
    writer: bool,
    socket_timeout: float,
    current: SchemaVersion = CURRENT,
) -> SchemaCheck:
    """Read the key on ``url`` and :func:`decide`; a ``writer`` also sets it as decided,
    atomically against another writer starting at the same time (WATCH/MULTI).

    Raises:
        SchemaRefused: the data's layout must not be used by this release.
        StoreError: Redis could not be read or written.
    """
    client = connect(url, socket_timeout=socket_timeout, max_connections=2)
    try:
        for _attempt in range(5):
            async with client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(SCHEMA_KEY)
                    value = await pipe.get(SCHEMA_KEY)
                    verdict = decide(None if value is None else str(value), current)
                    if not verdict.ok:
                        raise SchemaRefused(verdict.message)
                    if not writer or verdict.write is None:
                        return verdict
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(SCHEMA_KEY, str(verdict.write))
                    await pipe.execute()
                    return verdict
                except WatchError:
                    continue
        raise StoreError(f"{SCHEMA_KEY} kept changing while it was being written")
    except (RedisError, OSError) as exc:
        raise StoreError(f"redis read of {SCHEMA_KEY} failed: {exc}") from exc
    finally:
        try:
            await client.aclose()
        except (RedisError, OSError):
            pass


__all__ = [
    "CURRENT",
    "SCHEMA_KEY",
    "SchemaCheck",
    "SchemaRefused",
    "SchemaVersion",
    "check",
    "decide",
]
