"""How finished call records travel from the edge to provisioning, off the call path.

- :class:`RedisStreamSink` / :class:`RedisStreamSource`: a Redis stream (``XADD`` with an
  approximate ``MAXLEN`` as a safety bound; read with a consumer group and acknowledged only
  once provisioning has stored the records durably, so a crash in between redelivers them,
  and storing one record twice is harmless: its id is derived from the call).
- :class:`LocalHandoff`: the embedded single box (``memory://`` store), where the edge and
  provisioning share one process: a bounded in-memory queue.

Every Redis failure becomes :class:`TransferError` here. The edge's sink writes through a
pipelined connection of :mod:`e911_sip.store.resp` (a call's record is written on every
emergency call); provisioning's source reads through redis-py.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from redis.exceptions import RedisError, ResponseError

from e911_sip.batching import StreamWriter, WriteError
from e911_sip.callrecords.book import CallRecord, RecordError
from e911_sip.store.redis import connect
from e911_sip.store.resp import RespStreamWriter
from e911_sip.timefmt import utc_millis

DEFAULT_STREAM = "e911:calls"
DEFAULT_GROUP = "provisioning"


class TransferError(Exception):
    """Records could not be handed on, or read."""


class RecordSink(Protocol):
    """Where the edge hands finished records."""

    async def write(self, records: Sequence[CallRecord]) -> None:
        """Hand ``records`` on, all of them or (raising) possibly some.

        Raises:
            TransferError: they were not (all) handed on.
        """
        ...

    async def close(self) -> None: ...


class Delivery(Protocol):
    """A batch read by provisioning, to be acknowledged once stored."""

    records: list[CallRecord]
    invalid: int
    """Entries that were not call records (acknowledged and skipped)."""

    async def ack(self) -> None:
        """The records are stored: never deliver them again.

        Raises:
            TransferError: not acknowledged (they come again: storing twice is harmless).
        """
        ...

    def release(self) -> None:
        """The records were not stored: deliver them again."""
        ...


class RecordSource(Protocol):
    """Where provisioning reads finished records."""

    async def read(self, *, count: int, block: float) -> Delivery | None:
        """The next batch, waiting up to ``block`` seconds; None when nothing came.

        Raises:
            TransferError: the source could not be read.
        """
        ...

    async def backlog(self) -> int:
        """Records waiting to be read (the stream's length: bounded by its ``MAXLEN``).

        Raises:
            TransferError: the source could not be asked.
        """
        ...

    async def close(self) -> None: ...


# One encoder for every record: ``json.dumps`` with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _not_serializable(value: object) -> object:
    # What JSONEncoder.default raises: a record holds only JSON types.
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
# The C encoder that ``_encode`` builds for every record (with the Python of ``encode`` and
# ``iterencode`` around it), built once. Without the circular-reference check, whose memo
# would be shared by every record: a record's to_dict() is fresh lists and dicts of text,
# numbers and None, never a cycle.
_encode_chunks: Any = (
    None
    if _c_encoder is None
    else _c_encoder(
        None,
        _not_serializable,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        True,
        False,
        True,
    )
)


def encode(record: CallRecord) -> str:
    """The record's stream entry: its :meth:`~CallRecord.to_dict`, keys sorted, compact."""
    try:
        text = _written_out(record)
    except TypeError:
        text = None
    if text is not None:
        return text
    if _encode_chunks is None:
        return _encode(record.to_dict())
    return "".join(_encode_chunks(record.to_dict(), 0))


_string = json.encoder.encode_basestring_ascii


def _written_out(record: CallRecord) -> str | None:
    """What the encoder writes for the record's :meth:`~CallRecord.to_dict` with its keys
    sorted, written out field by field: the keys are constants here and only the values are
    encoded, with no dict built and sorted per record (a record is written for every
    emergency call). None for a record with a number of another type than the fields
    declare (the encoder then writes it); TypeError for text that is not a str."""
    # Each value written out in place (``null``, or the encoded text), not by a helper:
    # nine calls a record. utc_millis writes digits, dashes, colons, a dot, T and Z:
    # nothing JSON escapes.
    # ``object``: a compiled build would take a bool in an int field for an int and write
    # it as one, where the encoder writes ``true``.
    status: object = record.status
    if status is not None and type(status) is not int:
        return None
    trunks = []
    for t in record.trunks:
        attempt: object = t.attempt
        if type(attempt) is not int or type(t.enriched) is not bool:
            return None
        result = t.result
        trunks.append(
            f'{{"attempt":{attempt},"enriched":{"true" if t.enriched else "false"},'
            f'"result":{"null" if result is None else _string(result)},'
            f'"trunk":{_string(t.trunk)}}}'
        )
    answered_at = record.answered_at
    answered = "null" if answered_at is None else f'"{utc_millis(answered_at)}"'
    bye_at = record.bye_at
    bye = "null" if bye_at is None else f'"{utc_millis(bye_at)}"'
    callback = record.callback
    caller = record.caller
    end = record.end
    level = record.level
    outcome = record.outcome
    endpoint = record.provider_endpoint
    return (
        f'{{"answered_at":{answered},"bye_at":{bye},'
        f'"call_id":{_string(record.call_id)},'
        f'"callback":{"null" if callback is None else _string(callback)},'
        f'"caller":{"null" if caller is None else _string(caller)},'
        f'"end":{"null" if end is None else _string(end)},'
        f'"id":{_string(record.id)},"invite_at":"{utc_millis(record.invite_at)}",'
        f'"level":{"null" if level is None else _string(level)},'
        f'"number":{_string(record.number)},'
        f'"outcome":{"null" if outcome is None else _string(outcome)},'
        f'"provider_endpoint":{"null" if endpoint is None else _string(endpoint)},'
        f'"status":{"null" if status is None else status},"trunks":[{",".join(trunks)}]}}'
    )


def decode(text: str) -> CallRecord:
    """Raises RecordError."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RecordError("not a JSON object")
    return CallRecord.from_dict(data)


# -- in one process ----------------------------------------------------------------------------


class LocalHandoff:
    """A bounded queue between the edge and provisioning in one process. Implements both
    RecordSink and RecordSource."""

    def __init__(self, *, max_records: int = 10_000) -> None:
        self._queue: deque[CallRecord] = deque()
        self._max = max_records
        self._ready = asyncio.Event()

    async def write(self, records: Sequence[CallRecord]) -> None:
        if len(self._queue) + len(records) > self._max:
            raise TransferError(f"in-process record queue full ({self._max})")
        self._queue.extend(records)
        self._ready.set()

    async def read(self, *, count: int, block: float) -> Delivery | None:
        if not self._queue:
            self._ready.clear()
            try:
                async with asyncio.timeout(block):
                    await self._ready.wait()
            except TimeoutError:
                return None
        batch = [self._queue.popleft() for _ in range(min(count, len(self._queue)))]
        # Not acknowledged means not stored: a failed store puts the batch back in front.
        return _LocalDelivery(self, batch)

    async def backlog(self) -> int:
        return len(self._queue)

    def _requeue(self, records: list[CallRecord]) -> None:
        self._queue.extendleft(reversed(records))
        self._ready.set()

    async def close(self) -> None:
        return None


class _LocalDelivery:
    def __init__(self, owner: LocalHandoff, records: list[CallRecord]) -> None:
        self.records = records
        self.invalid = 0
        self._owner = owner
        self._acked = False

    async def ack(self) -> None:
        self._acked = True

    def release(self) -> None:
        """Give the batch back (it was not stored)."""
        if not self._acked:
            self._owner._requeue(self.records)


# -- through Redis ------------------------------------------------------------------------------


class RedisStreamSink:
    """XADD each record's JSON to a stream (a batch in one command, each write bounded by
    ``timeout`` seconds). Implements RecordSink."""

    def __init__(
        self, *, url: str, stream: str = DEFAULT_STREAM, maxlen: int = 1_000_000, timeout: float
    ) -> None:
        self._stream = stream
        self._maxlen = maxlen
        self._writer: StreamWriter = RespStreamWriter.open(url, timeout=timeout)

    async def write(self, records: Sequence[CallRecord]) -> None:
        if not records:
            return
        try:
            await self._writer.xadd_all(
                self._stream,
                "record",
                [encode(record) for record in records],
                maxlen=self._maxlen,
            )
        except WriteError as exc:
            raise TransferError(f"XADD to {self._stream} failed: {exc}") from exc

    async def close(self) -> None:
        await self._writer.close()


class _StreamDelivery:
    def __init__(
        self, source: RedisStreamSource, ids: list[str], records: list[CallRecord], invalid: int
    ) -> None:
        self.records = records
        self.invalid = invalid
        self._source = source
        self._ids = ids

    async def ack(self) -> None:
        await self._source.ack(self._ids)

    def release(self) -> None:
        self._source.redeliver()


class RedisStreamSource:
    """Read a stream with a consumer group. Implements RecordSource.

    Entries delivered to this consumer and never acknowledged (the process stopped before
    storing them) are read again first, then new ones.
    """

    def __init__(
        self,
        *,
        url: str,
        stream: str = DEFAULT_STREAM,
        group: str = DEFAULT_GROUP,
        consumer: str,
        timeout: float = 5.0,
    ) -> None:
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._timeout = timeout
        self._client = connect(url, socket_timeout=timeout, max_connections=2)
        self._group_ready = False
        self._pending = True

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._client.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def read(self, *, count: int, block: float) -> Delivery | None:
        # The block must end well before the socket timeout, or a quiet stream reads as an
        # error.
        block_ms = max(1, int(min(block, self._timeout / 2) * 1000))
        try:
            await self._ensure_group()
            entries = await self._read_entries("0", count, None) if self._pending else []
            if not entries:
                self._pending = False
                entries = await self._read_entries(">", count, block_ms)
        except (RedisError, OSError) as exc:
            self._group_ready = False
            raise TransferError(f"XREADGROUP on {self._stream} failed: {exc}") from exc
        if not entries:
            return None
        ids: list[str] = []
        records: list[CallRecord] = []
        invalid = 0
        for entry_id, fields in entries:
            ids.append(entry_id)
            try:
                records.append(decode((fields or {}).get("record", "")))
            except RecordError:
                invalid += 1
        return _StreamDelivery(self, ids, records, invalid)

    async def _read_entries(
        self, start: str, count: int, block_ms: int | None
    ) -> list[tuple[str, dict[str, str] | None]]:
        reply: Any = await self._client.xreadgroup(
            self._group, self._consumer, {self._stream: start}, count=count, block=block_ms
        )
        # Replies are decoded text: [[stream, [(id, fields), ...]]] (fields None once deleted).
        return list(reply[0][1]) if reply else []

    async def backlog(self) -> int:
        try:
            return int(await self._client.xlen(self._stream))
        except (RedisError, OSError) as exc:
            raise TransferError(f"XLEN of {self._stream} failed: {exc}") from exc

    def redeliver(self) -> None:
        """Read this consumer's unacknowledged entries again before new ones."""
        self._pending = True

    async def ack(self, ids: list[str]) -> None:
        """Acknowledge and delete ``ids``: they are stored, the stream need not keep them.

        Raises:
            TransferError: not acknowledged (they are read again later: harmless).
        """
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.xack(self._stream, self._group, *ids)
                pipe.xdel(self._stream, *ids)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise TransferError(f"XACK on {self._stream} failed: {exc}") from exc

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass
