"""The append-only audit trail of line location changes (RAY BAUM's Act).

Every change of a line's effective location is recorded: when (UTC), who (the API token's
name), which entity the change acted on, the line, the old and new ``provider_endpoint``
and the new address on one line. Entries are only ever appended; nothing here trims or
rewrites them (retention is an operator decision: the regulation asks for years).

Backends:

- :class:`MemoryAuditLog`: tests and throwaway runs;
- :class:`JsonlAuditLog`: one JSON object a line, appended and fsynced, for the embedded mode;
- :class:`RedisAuditLog`: a Redis stream (``XADD``), plus one stream per line so that reading
  one line's history does not scan everybody's.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from e911_sip.provisioning.model import AuditEntry, ModelError
from e911_sip.store.redis import connect

__all__ = [
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "JsonlAuditLog",
    "MemoryAuditLog",
    "RedisAuditLog",
]

DEFAULT_STREAM = "e911:audit"
MAX_READ = 10_000
"""Most entries one read returns."""


class AuditError(Exception):
    """The audit log could not be written or read."""


class AuditLog(Protocol):
    """An append-only log of :class:`AuditEntry`."""

    async def append(self, entries: Sequence[AuditEntry]) -> None:
        """Append ``entries`` in order, all or (as far as the backend allows) none.

        Raises:
            AuditError: the entries were not recorded.
        """
        ...

    async def read(self, *, line: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest ``limit`` entries (of ``line`` only, when given), oldest first.

        Raises:
            AuditError: the log could not be read.
        """
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


def _limit(limit: int) -> int:
    return max(0, min(limit, MAX_READ))


class MemoryAuditLog:
    """Audit entries in a list. Implements AuditLog."""

    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []
        self.available = True
        """Tests set this False to play a log that is down."""

    async def append(self, entries: Sequence[AuditEntry]) -> None:
        if not self.available:
            raise AuditError("audit log marked unavailable")
        self.entries.extend(entries)

    async def read(self, *, line: str | None = None, limit: int = 100) -> list[AuditEntry]:
        if not self.available:
            raise AuditError("audit log marked unavailable")
        matching = [e for e in self.entries if line is None or e.line == line]
        n = _limit(limit)
        return matching[-n:] if n else []

    async def close(self) -> None:
        return None


def append_durably(path: Path, text: str) -> None:
    """Append whole lines to ``path`` and fsync them before returning (the JSON-lines files
    of the embedded box: audit trail, call records)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write of whole lines in append mode: concurrent readers see whole entries.
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class JsonlAuditLog:
    """Audit entries as JSON lines in one file, appended and fsynced. Implements AuditLog."""

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self._path

    def _append(self, text: str) -> None:
        append_durably(self._path, text)

    def _read(self) -> list[str]:
        try:
            with self._path.open(encoding="utf-8") as handle:
                return handle.readlines()
        except FileNotFoundError:
            return []

    async def append(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        text = "".join(
            json.dumps(e.to_dict(), separators=(",", ":"), sort_keys=True) + "\n" for e in entries
        )
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, text)
            except OSError as exc:
                raise AuditError(f"{self._path}: cannot append: {exc}") from exc

    async def read(self, *, line: str | None = None, limit: int = 100) -> list[AuditEntry]:
        async with self._lock:
            try:
                lines = await asyncio.to_thread(self._read)
            except OSError as exc:
                raise AuditError(f"{self._path}: cannot read: {exc}") from exc
        out: list[AuditEntry] = []
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                entry = AuditEntry.from_dict(json.loads(text))
            except (ValueError, ModelError) as exc:
                raise AuditError(f"{self._path}:{number}: corrupt entry: {exc}") from exc
            if line is None or entry.line == line:
                out.append(entry)
        n = _limit(limit)
        return out[-n:] if n else []

    async def close(self) -> None:
        return None


class RedisAuditLog:
    """Audit entries in Redis streams. Implements AuditLog.

    Keys: ``{stream}`` holds every entry; ``{stream}:line:{number}`` holds one line's. Both
    are written in one MULTI/EXEC, so they never disagree. Stream fields are the entry's
    JSON fields, with an empty string for a missing endpoint.
    """

    def __init__(
        self, *, url: str, stream: str = DEFAULT_STREAM, socket_timeout: float = 5.0
    ) -> None:
        self._stream = stream
        self._client = connect(url, socket_timeout=socket_timeout)

    @property
    def stream(self) -> str:
        return self._stream

    def line_stream(self, line: str) -> str:
        """Key of one line's stream."""
        return f"{self._stream}:line:{line}"

    async def append(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for entry in entries:
                    fields: dict[FieldT, EncodableT] = {
                        k: v or "" for k, v in entry.to_dict().items()
                    }
                    pipe.xadd(self._stream, fields)
                    pipe.xadd(self.line_stream(entry.line), fields)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise AuditError(f"redis audit append failed: {exc}") from exc

    async def read(self, *, line: str | None = None, limit: int = 100) -> list[AuditEntry]:
        n = _limit(limit)
        if n == 0:
            return []
        key = self.line_stream(line) if line is not None else self._stream
        try:
            rows = await self._client.xrevrange(key, count=n)
        except (RedisError, OSError) as exc:
            raise AuditError(f"redis audit read of {key} failed: {exc}") from exc
        out: list[AuditEntry] = []
        for entry_id, fields in reversed(rows or []):
            try:
                out.append(
                    AuditEntry.from_dict({str(k): str(v) for k, v in (fields or {}).items()})
                )
            except ModelError as exc:
                raise AuditError(f"{key} {entry_id!r}: corrupt entry: {exc}") from exc
        return out

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass
