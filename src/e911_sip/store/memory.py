"""In-memory location store: the embedded default and the unit-test double."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from mypy_extensions import mypyc_attr

from e911_sip.store.base import LocationRecord, StoreError, check_line


# Compiled, a native class; the tests' store doubles subclass it in Python, which a native
# class allows only when told.
@mypyc_attr(allow_interpreted_subclasses=True)
class MemoryStore:
    """Location records in a dict. Implements LocationStore and LineRecordWriter."""

    def __init__(self, records: Mapping[str, LocationRecord] | None = None) -> None:
        self._records: dict[str, LocationRecord] = dict(records or {})
        self.available = True
        """Tests set this False to play a store that is down."""

    @classmethod
    def from_file(cls, path: Path) -> MemoryStore:
        """Seed from a JSON object ``{"3215551234": {"provider_endpoint": ...}, ...}``.

        Raises:
            ValueError: the file is not such an object; the message names the bad entry.
        """
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of line -> record")
        records: dict[str, LocationRecord] = {}
        for line, fields in data.items():
            if str(line).startswith("_"):
                continue  # "_comment" keys document the file
            try:
                check_line(str(line))
                if not isinstance(fields, dict):
                    raise ValueError("record must be an object")
                records[str(line)] = LocationRecord.from_fields(
                    {str(k): str(v) for k, v in fields.items()}
                )
            except (ValueError, StoreError) as exc:
                raise ValueError(f"{path}: entry {line!r}: {exc}") from exc
        return cls(records)

    async def lookup(self, line: str) -> LocationRecord | None:
        return self.lookup_now(line)

    def lookup_now(self, line: str) -> LocationRecord | None:
        """The same answer as :meth:`lookup`, without a round trip through the event loop."""
        if not self.available:
            raise StoreError("memory store marked unavailable")
        return self._records.get(line)

    async def ping(self) -> bool:
        return self.available

    async def close(self) -> None:
        return None

    async def put_records(
        self, records: Mapping[str, LocationRecord], deletions: frozenset[str] = frozenset()
    ) -> None:
        if not self.available:
            raise StoreError("memory store marked unavailable")
        for line in deletions:
            self._records.pop(line, None)
        self._records.update(records)

    async def all_lines(self) -> dict[str, LocationRecord]:
        return dict(self._records)

    async def delete_unchanged(self, records: Mapping[str, LocationRecord]) -> frozenset[str]:
        if not self.available:
            raise StoreError("memory store marked unavailable")
        deleted = frozenset(
            line for line, record in records.items() if self._records.get(line) == record
        )
        for line in deleted:
            del self._records[line]
        return deleted
