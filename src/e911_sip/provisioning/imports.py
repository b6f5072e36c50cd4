"""Bulk import: a file of customers, sites and accounts, applied as an asynchronous job.

Theory of operation. A CSP moving thousands of lines onto the product sends one file
(CSV or JSON lines, see docs/provisioning.md). Each row is the PUT of one entity through
the provisioning API, so a row means exactly what the same PUT would; the file is parsed
and checked when it is posted, and the job it becomes is saved before the answer (202)
goes out. A job then runs in the provisioning process:

1. its pending rows are grouped by customer; a customer's rows become batches: the first
   holds the customer row and its site rows, and every batch up to ``import_batch_size``
   accounts. A batch is one change (:meth:`ProvisioningService.apply_batch`): one state
   save and one atomic write of all its line records, so lines that inherit an address
   never wait for Bandwidth one by one, and each entity with an address is ordered at
   Bandwidth once, however many lines use it;
2. customers run side by side, and Bandwidth steps from every batch of every job share one
   bound (``import_concurrency``); the Bandwidth client's shared gate makes every worker
   wait out a 429's back-off;
3. each batch's outcome is recorded per row (done, or failed with the API's error code and
   message) before the next batch of that customer starts.

A job is state in the provisioning store (memory, a directory beside the state file, or
Redis), so a restart resumes every unfinished job at its first pending row. Re-running
rows that took effect before a crash is harmless: endpoint ids are a pure function of the
entity, and a row whose entity already says what the row says changes nothing.

Several provisioning processes may share one Redis. A job runs only in the process that
holds its lease (``{key_prefix}lease:import:{id}``, see :mod:`.lease`); every other process
that knows the job (it resumed it at start) looks again every ``watch_interval`` seconds and
takes the job over once the lease is free and the job unfinished, so a job whose process
died goes on within the lease's time to live. A runner that finds its lease lost stops the
job before the next batch and goes back to watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, cast

from redis.exceptions import RedisError

from e911_sip.metrics import Metrics
from e911_sip.provisioning.api import account_fields, customer_fields, site_fields
from e911_sip.provisioning.lease import (
    Held,
    LeaseBusy,
    LeaseError,
    LeaseOptions,
    LocalLease,
    RedisLeases,
)
from e911_sip.provisioning.model import EntityRef, ModelError, check_entity_id, check_number
from e911_sip.provisioning.service import (
    AccountFields,
    Batch,
    CustomerFields,
    ProvisioningService,
    ServiceError,
    SiteFields,
)
from e911_sip.store.redis import connect

_LOG = logging.getLogger("e911_sip.provisioning.imports")

CSV_COLUMNS = (
    "kind",
    "customer_id",
    "site_id",
    "number",
    "name",
    "callback_number",
    "line1",
    "line2",
    "city",
    "state",
    "postal_code",
    "country",
    "emails",
    "sms",
    "webhooks",
)
"""Columns of the CSV form; only ``kind`` and the ids a kind needs are required."""
_ADDRESS_COLUMNS = ("line1", "line2", "city", "state", "postal_code", "country")
_CONTACT_COLUMNS = ("emails", "sms", "webhooks")
KINDS = ("customer", "site", "account")
_PASSING = frozenset(
    {
        "provider_rate_limited",
        "provider_unavailable",
        "state_unavailable",
        "line_store_unavailable",
        "audit_unavailable",
        "concurrent_change",
        "customer_busy",
        "lease_lost",
        "import_incomplete",
    }
)
"""Error codes of failures that may pass: such rows are tried again."""
_RESTART_DELAY = 5.0
"""Seconds before a job that stopped on an unexpected error is resumed."""
WATCH_INTERVAL = 5.0
"""Seconds between two looks at a job another process runs (is it finished, or free?)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportOptions:
    """How bulk imports run (keys of ``[provisioning]``)."""

    import_concurrency: int = 8
    """Bandwidth steps (address, then endpoint order) in flight at once, across all jobs;
    customers are worked on side by side up to the same number."""
    import_batch_size: int = 500
    """Accounts of one customer applied in one change (one state save, one line write)."""
    import_max_rows: int = 200_000
    """Rows one file may hold; a longer file is refused with 413."""
    import_max_bytes: int = 64 * 1024 * 1024
    """Bytes one file may hold; a larger body is refused with 413."""
    import_keep_jobs: int = 100
    """Finished jobs kept for ``GET /v1/imports/{id}``; older ones are forgotten."""
    import_retries: int = 3
    """Times a row that failed for a passing reason (Bandwidth rate-limiting or down, a
    store unavailable) is tried again before it is reported failed."""
    import_retry_delay: float = 1.0
    """Seconds before such a retry, or longer when Bandwidth's Retry-After says so."""


class Format(StrEnum):
    """The file formats an import accepts."""

    CSV = "csv"
    JSONL = "jsonl"


class JobState(StrEnum):
    """Where a job is: QUEUED (saved, not started), RUNNING, COMPLETED (every row is done
    or failed)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"


class FileRefused(Exception):
    """The file as a whole cannot be imported (the API answers ``status``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class JobStoreError(Exception):
    """The job store could not do what was asked."""


# --- rows ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the file: the PUT body of one entity, as the API takes it."""

    line: int
    """Line of the file the row came from (1-based; a CSV header is line 1)."""
    kind: str
    """``customer``, ``site`` or ``account``."""
    body: Mapping[str, Any]
    """The JSON object, ids included (``customer_id``, ``site_id``, ``number``)."""

    @property
    def customer_id(self) -> str:
        return str(self.body.get("customer_id") or "")

    def ref(self) -> EntityRef:
        """The entity the row names (the ids are checked by :func:`check_row`)."""
        cid = self.customer_id
        if self.kind == "customer":
            return EntityRef.customer(cid)
        if self.kind == "site":
            return EntityRef.site(cid, str(self.body["site_id"]))
        return EntityRef.account(cid, str(self.body["number"]))

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "kind": self.kind, "body": dict(self.body)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Row:
        return cls(int(data["line"]), str(data["kind"]), dict(data["body"]))


@dataclass(frozen=True, slots=True)
class RowResult:
    """What became of one row."""

    ok: bool
    code: str = ""
    message: str = ""
    entity: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "code": self.code, "message": self.message, "entity": self.entity}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RowResult:
        return cls(
            bool(data["ok"]),
            str(data.get("code", "")),
            str(data.get("message", "")),
            str(data.get("entity", "")),
        )


def sniff_format(data: bytes, content_type: str = "") -> Format:
    """CSV or JSON lines, from the content type, else from the first character."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in ("text/csv", "application/csv"):
        return Format.CSV
    if kind in ("application/x-ndjson", "application/jsonl", "application/x-jsonlines"):
        return Format.JSONL
    return Format.JSONL if data.lstrip()[:1] == b"{" else Format.CSV


def parse_file(
    data: bytes, fmt: Format, *, max_rows: int
) -> tuple[list[Row], dict[int, RowResult]]:
    """The rows of a file, and the results of rows already known to fail (unreadable, an
    unknown kind, a bad id, a field the API would refuse, an entity named twice).

    Raises:
        FileRefused: the file as a whole is unreadable, empty or too long.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileRefused(400, "invalid_file", f"the file is not UTF-8: {exc}") from exc
    rows: list[Row] = []
    failed: dict[int, RowResult] = {}
    raw = _csv_rows(text) if fmt is Format.CSV else _jsonl_rows(text)
    seen: dict[EntityRef, int] = {}
    for line, body in raw:
        if len(rows) + len(failed) >= max_rows:
            raise FileRefused(
                413, "too_many_rows", f"the file has more than {max_rows} rows; split it"
            )
        if isinstance(body, str):
            failed[line] = RowResult(False, "invalid_row", body)
            continue
        row = Row(line, str(body.get("kind", "")), {k: v for k, v in body.items() if k != "kind"})
        problem = check_row(row)
        if problem is not None:
            failed[line] = problem
            continue
        ref = row.ref()
        if ref in seen:
            failed[line] = RowResult(
                False, "duplicate_row", f"{ref} is already on line {seen[ref]}", str(ref)
            )
            continue
        seen[ref] = line
        rows.append(row)
    if not rows and not failed:
        raise FileRefused(422, "empty_file", "the file has no rows")
    return rows, failed


def _csv_rows(text: str) -> Iterable[tuple[int, dict[str, Any] | str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        return
    except csv.Error as exc:
        raise FileRefused(400, "invalid_file", f"line 1: {exc}") from exc
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if "kind" not in header or unknown:
        raise FileRefused(
            400,
            "invalid_header",
            "the first line must name the columns: kind and any of "
            f"{', '.join(CSV_COLUMNS[1:])}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
        )
    try:
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                yield line, f"expected {len(header)} columns, found {len(values)}"
                continue
            yield line, _csv_body(dict(zip(header, values, strict=True)))
    except csv.Error as exc:
        yield reader.line_num, f"unreadable CSV: {exc}"


def _csv_body(cells: Mapping[str, str]) -> dict[str, Any]:
    """A CSV row as the API's JSON body: empty cells are fields left out; the address
    columns make one address object; contacts are space-separated lists."""
    body: dict[str, Any] = {}
    for key in ("kind", "customer_id", "site_id", "number", "name", "callback_number"):
        value = cells.get(key, "").strip()
        if value:
            body[key] = value
    address = {k: cells.get(k, "").strip() for k in _ADDRESS_COLUMNS}
    if any(address.values()):
        body["address"] = {k: v for k, v in address.items() if v}
    contacts = {k: cells.get(k, "").split() for k in _CONTACT_COLUMNS}
    if any(contacts.values()):
        body["contacts"] = contacts
    return body


def _jsonl_rows(text: str) -> Iterable[tuple[int, dict[str, Any] | str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            yield number, f"not valid JSON: {exc}"
            continue
        if not isinstance(value, dict):
            yield number, "each line must be a JSON object"
            continue
        yield number, value


def check_row(row: Row) -> RowResult | None:
    """Why the row would be refused (the API's error code and message), or None."""
    if row.kind not in KINDS:
        return RowResult(False, "invalid_row", f"kind must be one of {', '.join(KINDS)}")
    try:
        check_entity_id(_id(row.body, "customer_id"), what="customer_id")
        if row.kind == "site":
            check_entity_id(_id(row.body, "site_id"), what="site_id")
        if row.kind == "account":
            check_number(_id(row.body, "number"), what="number")
        row_fields(row)
    except ModelError as exc:
        return RowResult(False, "invalid_request", str(exc))
    except ServiceError as exc:
        return RowResult(False, exc.code, exc.message, str(row.ref()))
    return None


def _id(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ModelError(f"{key} is required", field=key)
    return value


def row_fields(row: Row, country: str = "US") -> CustomerFields | SiteFields | AccountFields:
    """The service's fields for the row. Raises ServiceError 422 as the API would."""
    body = dict(row.body)
    cid = str(body.pop("customer_id"))
    if row.kind == "customer":
        return customer_fields(body, customer_id=cid, country=country)
    if row.kind == "site":
        sid = str(body.pop("site_id"))
        return site_fields(body, customer_id=cid, site_id=sid, country=country)
    number = str(body.pop("number"))
    return account_fields({**body, "customer_id": cid}, number=number, country=country)


# --- jobs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JobInfo:
    """A job's summary: what ``GET /v1/imports/{id}`` shows while it runs."""

    job_id: str
    who: str
    created_at: str
    state: JobState
    total: int
    done: int = 0
    failed: int = 0
    finished_at: str = ""

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.job_id,
            "who": self.who,
            "created_at": self.created_at,
            "state": self.state.value,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "finished_at": self.finished_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobInfo:
        return cls(
            job_id=str(data["id"]),
            who=str(data["who"]),
            created_at=str(data["created_at"]),
            state=JobState(str(data["state"])),
            total=int(data["total"]),
            done=int(data.get("done", 0)),
            failed=int(data.get("failed", 0)),
            finished_at=str(data.get("finished_at", "")),
        )


class JobStore(Protocol):
    """Persistence of import jobs: the rows, each row's result, the summary."""

    async def create(self, info: JobInfo, rows: Sequence[Row]) -> None:
        """Save a new job; forget finished jobs beyond ``keep`` (oldest first)."""
        ...

    async def info(self, job_id: str) -> JobInfo | None: ...

    async def rows(self, job_id: str) -> list[Row]: ...

    async def results(self, job_id: str) -> dict[int, RowResult]: ...

    async def record(self, job_id: str, results: Mapping[int, RowResult]) -> None:
        """Add row results and the counts they change, in one step."""
        ...

    async def set_state(self, job_id: str, state: JobState, finished_at: str = "") -> None: ...

    async def job_ids(self) -> list[str]:
        """Every kept job, oldest first."""
        ...

    def lease(self, job_id: str) -> contextlib.AbstractAsyncContextManager[Held | None]:
        """The job's lease while the block runs, or None when another process holds it
        (never waits).

        Raises (on entering):
            JobStoreError: the store could not be asked.
        """
        ...

    async def close(self) -> None: ...


class MemoryJobStore:
    """Jobs in dicts: the unit-test double and the ``memory://`` mode. Implements JobStore."""

    def __init__(self, *, keep: int = 100) -> None:
        self._keep = keep
        self._info: dict[str, JobInfo] = {}
        self._rows: dict[str, list[Row]] = {}
        self._results: dict[str, dict[int, RowResult]] = {}

    async def create(self, info: JobInfo, rows: Sequence[Row]) -> None:
        self._info[info.job_id] = info
        self._rows[info.job_id] = list(rows)
        self._results[info.job_id] = {}
        await self._prune()

    async def _prune(self) -> None:
        finished = [j for j, i in self._info.items() if i.state is JobState.COMPLETED]
        for job_id in finished[: max(0, len(finished) - self._keep)]:
            await self._forget(job_id)

    async def _forget(self, job_id: str) -> None:
        self._info.pop(job_id, None)
        self._rows.pop(job_id, None)
        self._results.pop(job_id, None)

    async def info(self, job_id: str) -> JobInfo | None:
        return self._info.get(job_id)

    async def rows(self, job_id: str) -> list[Row]:
        return list(self._rows.get(job_id, []))

    async def results(self, job_id: str) -> dict[int, RowResult]:
        return dict(self._results.get(job_id, {}))

    async def record(self, job_id: str, results: Mapping[int, RowResult]) -> None:
        info = self._info[job_id]
        stored = self._results[job_id]
        fresh = {k: v for k, v in results.items() if k not in stored}
        stored.update(fresh)
        self._info[job_id] = dataclasses.replace(
            info,
            done=info.done + sum(1 for r in fresh.values() if r.ok),
            failed=info.failed + sum(1 for r in fresh.values() if not r.ok),
        )

    async def set_state(self, job_id: str, state: JobState, finished_at: str = "") -> None:
        info = self._info[job_id]
        self._info[job_id] = dataclasses.replace(info, state=state, finished_at=finished_at)

    async def job_ids(self) -> list[str]:
        return list(self._info)

    @contextlib.asynccontextmanager
    async def lease(self, job_id: str) -> AsyncIterator[Held | None]:
        """Always free: one process owns this store, and its runner starts a job once."""
        yield LocalLease()

    async def close(self) -> None:
        return None


class FileJobStore(MemoryJobStore):
    """Jobs in a directory (beside the embedded mode's state file); one process owns it.

    ``{id}.rows.json`` is written once; ``{id}.json`` (the summary) is replaced atomically;
    ``{id}.results.jsonl`` is appended and fsynced per batch, so a crash loses at most the
    batch in flight, which the resumed job applies again harmlessly.
    """

    def __init__(self, directory: Path | str, *, keep: int = 100) -> None:
        super().__init__(keep=keep)
        self._dir = Path(directory)
        self._loaded = False
        self._io = asyncio.Lock()

    async def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            await asyncio.to_thread(self._read_all)
        except (OSError, ValueError, KeyError) as exc:
            raise JobStoreError(f"{self._dir}: cannot read import jobs: {exc}") from exc

    def _read_all(self) -> None:
        if not self._dir.is_dir():
            return
        infos = []
        for path in self._dir.glob("*.json"):
            if path.name.endswith(".rows.json"):
                continue
            infos.append(JobInfo.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        for info in sorted(infos, key=lambda i: (i.created_at, i.job_id)):
            job = info.job_id
            rows = json.loads((self._dir / f"{job}.rows.json").read_text(encoding="utf-8"))
            self._rows[job] = [Row.from_dict(r) for r in rows]
            results: dict[int, RowResult] = {}
            results_path = self._dir / f"{job}.results.jsonl"
            if results_path.exists():
                for text in results_path.read_text(encoding="utf-8").splitlines():
                    try:
                        item = json.loads(text)
                    except ValueError:
                        continue  # a line cut by a crash: its batch runs again
                    results[int(item["line"])] = RowResult.from_dict(item)
            self._results[job] = results
            self._info[job] = dataclasses.replace(
                info,
                done=sum(1 for r in results.values() if r.ok),
                failed=sum(1 for r in results.values() if not r.ok),
            )

    def _replace(self, path: Path, text: str) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self._dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _append(self, path: Path, text: str) -> None:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    async def _io_call(self, func: Any, *args: Any) -> None:
        try:
            await asyncio.to_thread(func, *args)
        except OSError as exc:
            raise JobStoreError(f"{self._dir}: cannot write import jobs: {exc}") from exc

    async def create(self, info: JobInfo, rows: Sequence[Row]) -> None:
        async with self._io:
            await self._load()
            text = json.dumps([r.to_dict() for r in rows], separators=(",", ":"))
            await self._io_call(self._replace, self._dir / f"{info.job_id}.rows.json", text)
            await self._io_call(
                self._replace, self._dir / f"{info.job_id}.json", json.dumps(info.to_dict())
            )
            await super().create(info, rows)

    async def _forget(self, job_id: str) -> None:
        await super()._forget(job_id)
        for suffix in (".json", ".rows.json", ".results.jsonl"):
            try:
                (self._dir / f"{job_id}{suffix}").unlink()
            except FileNotFoundError:
                pass

    async def info(self, job_id: str) -> JobInfo | None:
        async with self._io:
            await self._load()
            return await super().info(job_id)

    async def rows(self, job_id: str) -> list[Row]:
        async with self._io:
            await self._load()
            return await super().rows(job_id)

    async def results(self, job_id: str) -> dict[int, RowResult]:
        async with self._io:
            await self._load()
            return await super().results(job_id)

    async def record(self, job_id: str, results: Mapping[int, RowResult]) -> None:
        async with self._io:
            await self._load()
            text = "".join(
                json.dumps({"line": line, **r.to_dict()}, separators=(",", ":")) + "\n"
                for line, r in results.items()
            )
            await self._io_call(self._append, self._dir / f"{job_id}.results.jsonl", text)
            await super().record(job_id, results)

    async def set_state(self, job_id: str, state: JobState, finished_at: str = "") -> None:
        async with self._io:
            await self._load()
            await super().set_state(job_id, state, finished_at)
            info = self._info[job_id]
            await self._io_call(
                self._replace, self._dir / f"{job_id}.json", json.dumps(info.to_dict())
            )

    async def job_ids(self) -> list[str]:
        async with self._io:
            await self._load()
            return await super().job_ids()


class RedisJobStore:
    """Jobs in Redis beside the provisioning state. Implements JobStore.

    ``{prefix}import:{id}`` is a hash (the summary; ``done``/``failed`` counted with
    HINCRBY in the same MULTI as the results), ``{prefix}import:{id}:rows`` the rows as
    one JSON string, ``{prefix}import:{id}:results`` a hash of line → result, and
    ``{prefix}imports`` a sorted set of job ids by creation time;
    ``{prefix}lease:import:{id}`` the lease of the process running the job.
    """

    def __init__(
        self,
        *,
        url: str,
        key_prefix: str,
        keep: int = 100,
        socket_timeout: float = 5.0,
        leases: LeaseOptions | None = None,
    ) -> None:
        self._client = connect(url, socket_timeout=socket_timeout)
        self._prefix = key_prefix
        self._keep = keep
        self._leases = RedisLeases(
            self._client, prefix=key_prefix, options=leases or LeaseOptions()
        )

    def lease_key(self, job_id: str) -> str:
        """Key of the lease of the process that runs the job."""
        return self._leases.key(f"import:{job_id}")

    @contextlib.asynccontextmanager
    async def lease(self, job_id: str) -> AsyncIterator[Held | None]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                held: Held | None = await stack.enter_async_context(
                    self._leases.hold(f"import:{job_id}", wait=0.0)
                )
            except LeaseBusy:
                held = None
            except LeaseError as exc:
                raise JobStoreError(f"redis: cannot take the import job's lease: {exc}") from exc
            yield held

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{self._prefix}import:{job_id}{part}"

    @property
    def _index(self) -> str:
        return f"{self._prefix}imports"

    async def create(self, info: JobInfo, rows: Sequence[Row]) -> None:
        text = json.dumps([r.to_dict() for r in rows], separators=(",", ":"))
        fields: dict[str | bytes, str] = {k: str(v) for k, v in info.to_dict().items()}
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._key(info.job_id, ":rows"), text)
                pipe.hset(self._key(info.job_id), mapping=cast(Any, fields))
                pipe.zadd(self._index, {info.job_id: datetime.now(UTC).timestamp()})
                await pipe.execute()
            await self._prune()
        except (RedisError, OSError) as exc:
            raise JobStoreError(f"redis: cannot save the import job: {exc}") from exc

    async def _prune(self) -> None:
        ids = [_text(j) for j in cast(list[bytes], await self._client.zrange(self._index, 0, -1))]
        finished = []
        for job_id in ids:
            state = await self._client.hget(self._key(job_id), "state")
            if state is not None and _text(state) == JobState.COMPLETED.value:
                finished.append(job_id)
        for job_id in finished[: max(0, len(finished) - self._keep)]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(job_id), self._key(job_id, ":rows"))
                pipe.delete(self._key(job_id, ":results"))
                pipe.zrem(self._index, job_id)
                await pipe.execute()

    async def info(self, job_id: str) -> JobInfo | None:
        try:
            raw = await self._client.hgetall(self._key(job_id))
        except (RedisError, OSError) as exc:
            raise JobStoreError(f"redis: cannot read the import job: {exc}") from exc
        if not raw:
            return None
        return JobInfo.from_dict({_text(k): _text(v) for k, v in raw.items()})

    async def rows(self, job_id: str) -> list[Row]:
        try:
            text = await self._client.get(self._key(job_id, ":rows"))
        except (RedisError, OSError) as exc:
            raise JobStoreError(f"redis: cannot read the import rows: {exc}") from exc
        return [Row.from_dict(r) for r in json.loads(text)] if text is not None else []

    async def results(self, job_id: str) -> dict[int, RowResult]:
        try:
            raw = await self._client.hgetall(self._key(job_id, ":results"))
        except (RedisError, OSError) as exc:
            raise JobStoreError(f"redis: cannot read the import results: {exc}") from exc
        return {int(_text(k)): RowResult.from_dict(json.loads(v)) for k, v in raw.items()}

    async def record(self, job_id: str, results: Mapping[int, RowResult]) -> None:
        if not results:
            return
        key = self._key(job_id, ":results")
        try:
            # Only results not yet recorded are counted (a resumed batch may repeat rows).
            async with self._client.pipeline(transaction=False) as pipe:
                for line in results:
                    pipe.hexists(key, str(line))
                known = await pipe.execute()
            fresh = {
                line: r for (line, r), seen in zip(results.items(), known, strict=True) if not seen
            }
            if not fresh:
                return
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(
                    key,
                    mapping={str(line): json.dumps(r.to_dict()) for line, r in fresh.items()},
                )
                done = sum(1 for r in fresh.values() if r.ok)
                pipe.hincrby(self._key(job_id), "done", done)
                pipe.hincrby(self._key(job_id), "failed", len(fresh) - done)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise JobStoreError(f"redis: cannot record import results: {exc}") from exc

    async def set_state(self, job_id: str, state: JobState, finished_at: str = "") -> None:
        try:
            await self._client.hset(
                self._key(job_id), mapping={"state": state.value, "finished_at": finished_at}
            )
        except (RedisError, OSError) as exc:
            raise JobStoreError(f"redis: cannot save the import job state: {exc}") from exc

    async def job_ids(self) -> list[str]:
        try:
            ids = cast(list[bytes], await self._client.zrange(self._index, 0, -1))
            return [_text(j) for j in ids]
        except (RedisError, OSError) as exc:
            raise JobStoreError(f"redis: cannot list import jobs: {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- the runner ------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _LeaseLost(Exception):
    """The runner's lease on a job turned out lost: another process may run it now."""


class ImportRunner:
    """Accepts import files, runs their jobs, answers for their progress.

    Implements the API's ``ImportJobs`` seam. One runner per provisioning process; its
    ``import_concurrency`` bound is shared by every job it runs.
    """

    def __init__(
        self,
        *,
        service: ProvisioningService,
        store: JobStore,
        options: ImportOptions,
        metrics: Metrics | None = None,
        watch_interval: float = WATCH_INTERVAL,
    ) -> None:
        self._service = service
        self._store = store
        self._options = options
        self._metrics = metrics
        self._watch_interval = watch_interval
        self._scanner: asyncio.Task[None] | None = None
        self._limit = asyncio.Semaphore(options.import_concurrency)
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def max_bytes(self) -> int:
        return self._options.import_max_bytes

    async def submit(self, data: bytes, *, content_type: str, who: str) -> dict[str, Any]:
        """Parse ``data``, save the job and start it; the job's status view.

        Raises:
            ServiceError: the file is unreadable (400), empty (422) or too long (413), or
                the job could not be saved (503).
        """
        fmt = sniff_format(data, content_type)
        try:
            rows, failed = parse_file(data, fmt, max_rows=self._options.import_max_rows)
        except FileRefused as exc:
            raise ServiceError(exc.status, exc.code, exc.message) from exc
        job_id = secrets.token_hex(8)
        info = JobInfo(
            job_id=job_id,
            who=who,
            created_at=_now(),
            state=JobState.QUEUED,
            total=len(rows) + len(failed),
        )
        try:
            await self._store.create(info, rows)
            await self._store.record(job_id, failed)
        except JobStoreError as exc:
            raise ServiceError(503, "state_unavailable", str(exc)) from exc
        self._count(failed.values())
        _LOG.info(
            "import %s accepted: %d rows (%d refused as read)",
            job_id,
            info.total,
            len(failed),
            extra={"job": job_id, "who": who},
        )
        self._start(job_id)
        status = await self.status(job_id)
        if status is None:
            raise ServiceError(503, "unavailable", f"import {job_id} was saved but cannot be read")
        return status

    async def status(self, job_id: str) -> dict[str, Any] | None:
        """The job's counts and state; once completed, also every failed row and why."""
        try:
            info = await self._store.info(job_id)
            if info is None:
                return None
            view: dict[str, Any] = {**info.to_dict(), "pending": info.pending}
            if info.state is JobState.COMPLETED:
                results = await self._store.results(job_id)
                view["failures"] = [
                    {"line": line, "entity": r.entity, "code": r.code, "message": r.message}
                    for line, r in sorted(results.items())
                    if not r.ok
                ]
        except JobStoreError as exc:
            raise ServiceError(503, "state_unavailable", str(exc)) from exc
        return view

    async def list_jobs(self) -> list[dict[str, Any]]:
        """Every kept job's summary, newest first."""
        try:
            out = []
            for job_id in reversed(await self._store.job_ids()):
                info = await self._store.info(job_id)
                if info is not None:
                    out.append({**info.to_dict(), "pending": info.pending})
        except JobStoreError as exc:
            raise ServiceError(503, "state_unavailable", str(exc)) from exc
        return out

    async def resume(self) -> int:
        """Start every job a previous process left unfinished; how many. From then on,
        every ``watch_interval`` seconds, also the unfinished jobs another process
        submitted since (each runs only where its lease is, see the module docstring)."""
        started = await self._resume_unknown()
        if self._scanner is None:
            self._scanner = asyncio.create_task(self._scan(), name="import-scan")
        return started

    async def _resume_unknown(self) -> int:
        started = 0
        for job_id in await self._store.job_ids():
            if job_id in self._tasks:
                continue
            info = await self._store.info(job_id)
            if info is not None and info.state is not JobState.COMPLETED:
                _LOG.info("resuming import %s: %d rows pending", job_id, info.pending)
                self._start(job_id)
                started += 1
        return started

    async def _scan(self) -> None:
        while True:
            await asyncio.sleep(self._watch_interval)
            try:
                await self._resume_unknown()
            except JobStoreError as exc:
                _LOG.warning("could not look for unfinished import jobs: %s", exc)
            except Exception:
                # The scan must outlive any one failure: it is how a job whose process
                # died finds a new one.
                _LOG.exception("looking for unfinished import jobs failed")

    async def wait(self, job_id: str) -> None:
        """Until the job's task in this process ends (tests and the CLI's embedded use)."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        """Stop the jobs in flight; their unfinished rows resume at the next start."""
        tasks = list(self._tasks.values())
        if self._scanner is not None:
            tasks.append(self._scanner)
            self._scanner = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, job_id: str) -> None:
        if job_id in self._tasks:
            return
        task = asyncio.create_task(self._run(job_id), name=f"import-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))

    async def _run(self, job_id: str) -> None:
        # A job that stops on an unexpected error (the job store unreachable, say) starts
        # again from its first row without a result: re-applying rows is harmless, and a
        # client following the job must not wait for a restart that may never come.
        watching = False
        while True:
            delay = _RESTART_DELAY
            try:
                async with self._store.lease(job_id) as lease:
                    if lease is not None:
                        self._count_lease("free")
                        if watching:
                            _LOG.info("import %s taken over", job_id, extra={"job": job_id})
                        await self._run_job(job_id, lease)
                        return
                    # Another process runs it: look again later, in case that one dies.
                    info = await self._store.info(job_id)
                    if info is None or info.state is JobState.COMPLETED:
                        return
                    if not watching:
                        self._count_lease("busy")
                        _LOG.info(
                            "import %s is run by another provisioning process; watching it",
                            job_id,
                            extra={"job": job_id},
                        )
                    watching = True
                    delay = self._watch_interval
            except _LeaseLost:
                self._count_lease("lost")
                _LOG.warning(
                    "import %s: lease lost to another process; watching it",
                    job_id,
                    extra={"job": job_id},
                )
                watching = True
                delay = self._watch_interval
            except Exception:
                _LOG.exception(
                    "import %s stopped; resuming in %.0fs",
                    job_id,
                    _RESTART_DELAY,
                    extra={"job": job_id},
                )
            await asyncio.sleep(delay)

    def _count_lease(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.provisioning_leases.labels("import_job", outcome).inc()

    async def _run_job(self, job_id: str, lease: Held) -> None:
        info = await self._store.info(job_id)
        if info is None or info.state is JobState.COMPLETED:
            return
        await self._store.set_state(job_id, JobState.RUNNING)
        info = dataclasses.replace(info, state=JobState.RUNNING)
        who = f"{info.who} (import {job_id})"
        done = await self._store.results(job_id)
        pending = [row for row in await self._store.rows(job_id) if row.line not in done]
        by_customer: dict[str, list[Row]] = {}
        for row in pending:
            by_customer.setdefault(row.customer_id, []).append(row)
        # Customers are worked on side by side; each customer's batches run in order.
        customers = asyncio.Semaphore(self._options.import_concurrency)

        async def one_customer(rows: list[Row]) -> None:
            async with customers:
                for batch_rows in self._batches(rows):
                    if lease.lost:
                        raise _LeaseLost(job_id)
                    await self._apply(job_id, batch_rows, who)

        try:
            async with asyncio.TaskGroup() as group:
                for rows in by_customer.values():
                    group.create_task(one_customer(rows))
        except* _LeaseLost as lost:
            raise _LeaseLost(job_id) from lost
        if lease.lost:
            raise _LeaseLost(job_id)
        await self._store.set_state(job_id, JobState.COMPLETED, _now())
        final = await self._store.info(job_id)
        _LOG.info(
            "import %s completed",
            job_id,
            extra={"job": job_id, **(final.to_dict() if final is not None else {})},
        )

    def _batches(self, rows: list[Row]) -> Iterable[list[Row]]:
        """One customer's rows in the order they are applied: the customer and its sites
        with the first accounts, then ``import_batch_size`` accounts at a time."""
        head = [r for r in rows if r.kind != "account"]
        accounts = [r for r in rows if r.kind == "account"]
        size = self._options.import_batch_size
        yield head + accounts[:size]
        for start in range(size, len(accounts), size):
            yield accounts[start : start + size]

    def _batch(self, rows: list[Row]) -> Batch:
        country = self._service.options.default_country
        customer: CustomerFields | None = None
        sites: dict[str, SiteFields] = {}
        lines: dict[str, AccountFields] = {}
        for row in rows:
            fields = row_fields(row, country)
            if isinstance(fields, CustomerFields):
                customer = fields
            elif isinstance(fields, SiteFields):
                sites[str(row.body["site_id"])] = fields
            else:
                lines[str(row.body["number"])] = fields
        return Batch(
            customer_id=rows[0].customer_id, customer=customer, sites=sites, accounts=lines
        )

    async def _apply(self, job_id: str, rows: list[Row], who: str) -> None:
        """Apply one batch; rows that failed for a passing reason (Bandwidth rate-limiting
        or down, a store unavailable, a concurrent change) are tried again, after the wait
        Bandwidth asked for, up to ``import_retries`` times."""
        for attempt in range(self._options.import_retries + 1):
            results, wait = await self._apply_once(rows, who)
            last = attempt == self._options.import_retries
            retry = [] if last else [r for r in rows if results[r.line].code in _PASSING]
            final = {line: r for line, r in results.items() if r.code not in _PASSING or last}
            await self._store.record(job_id, final)
            self._count(final.values())
            if not retry:
                return
            _LOG.info(
                "import %s: %d row(s) of customer %s failed for a passing reason; "
                "retrying in %.1fs",
                job_id,
                len(retry),
                rows[0].customer_id,
                wait,
                extra={"job": job_id},
            )
            await asyncio.sleep(wait)
            rows = retry

    async def _apply_once(self, rows: list[Row], who: str) -> tuple[dict[int, RowResult], float]:
        results: dict[int, RowResult] = {}
        wait = self._options.import_retry_delay
        try:
            failed = await self._service.apply_batch(self._batch(rows), who=who, limit=self._limit)
        except ServiceError as exc:
            failed = {row.ref(): exc for row in rows}
        for row in rows:
            ref = row.ref()
            error = failed.get(ref)
            if error is None:
                results[row.line] = RowResult(True, entity=str(ref))
                continue
            results[row.line] = RowResult(False, error.code, error.message, str(ref))
            if error.retry_after is not None:
                wait = max(wait, error.retry_after)
        return results, wait

    def _count(self, results: Iterable[RowResult]) -> None:
        if self._metrics is None:
            return
        for result in results:
            self._metrics.import_rows.labels("done" if result.ok else "failed").inc()


__all__ = [
    "CSV_COLUMNS",
    "FileJobStore",
    "Format",
    "ImportOptions",
    "ImportRunner",
    "JobInfo",
    "JobState",
    "JobStore",
    "JobStoreError",
    "MemoryJobStore",
    "RedisJobStore",
    "Row",
    "RowResult",
    "parse_file",
    "sniff_format",
]
