"""Where provisioning state lives: memory, a JSON file, or Redis.

The unit of storage is one customer aggregate (:class:`~e911_sip.provisioning.model.
CustomerState`). A save is optimistic: it carries the version it was built from plus one,
and fails with :class:`StateConflict` if somebody else saved in between, so two processes
cannot overwrite each other's changes. Each store also keeps the index *number → customer*
so that a line belongs to exactly one customer; claiming a number another customer holds
fails with :class:`NumberInUse`, atomically with the save.

Backends:

- :class:`MemoryStateStore`: the unit-test double (documents are still round-tripped through
  JSON, so a field that does not survive storage fails in unit tests too);
- :class:`FileStateStore`: one JSON file, rewritten whole through a temporary file,
  ``fsync`` and ``os.replace``, for the embedded single-box mode (one process);
- :class:`RedisStateStore`: production. ``WATCH`` + ``MULTI``/``EXEC`` give the version check
  and the number claims in one transaction; durability is the server's (enable AOF).

Several provisioning processes may share one Redis. A change holds the customer's
:meth:`StateStore.lease` from before it reads the customer until after its outbox is carried
out, so changes to one customer from any process run one after another, and Bandwidth is
never asked twice for the same address by two processes racing (see
:mod:`e911_sip.provisioning.lease`); the version check stays as the fence against a holder
that lost its lease. The memory and file backends are single-process by nature: their lease
is a no-op, and the service's in-process lock is what serialises.

Every redis-py and file-system exception becomes :class:`StateError` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Protocol

from redis.exceptions import RedisError, WatchError

from e911_sip.provisioning.lease import (
    Held,
    LeaseBusy,
    LeaseError,
    LeaseOptions,
    LocalLease,
    RedisLeases,
)
from e911_sip.provisioning.model import CustomerState, ModelError
from e911_sip.store.redis import connect

DEFAULT_STATE_PREFIX = "e911:prov:"


class StateError(Exception):
    """The state store could not do what was asked (down, corrupt, refused)."""


class StateConflict(StateError):
    """The customer changed since it was read (another writer saved first)."""


class CustomerBusy(StateError):
    """Another process kept the customer's lease for longer than a change waits."""

    def __init__(self, customer_id: str, waited: float) -> None:
        super().__init__(
            f"customer {customer_id} is being changed by another provisioning process "
            f"(waited {waited:.1f}s); retry"
        )
        self.customer_id = customer_id
        self.waited = waited


class NumberInUse(StateConflict):
    """A number the save claims already belongs to another customer."""

    def __init__(self, number: str, owner: str) -> None:
        super().__init__(f"number {number} already belongs to customer {owner}")
        self.number = number
        self.owner = owner


class StateStore(Protocol):
    """Persistence of customer aggregates and the number → customer index."""

    async def get(self, customer_id: str) -> CustomerState | None:
        """The stored customer, or None.

        Raises:
            StateError: the store is unreachable or the document is corrupt.
        """
        ...

    async def put(self, state: CustomerState) -> None:
        """Save ``state``; its ``version`` must be the stored version plus one (1 for new).

        Numbers of accounts new to the customer are claimed, numbers of accounts it no
        longer has are released, atomically with the document.

        Raises:
            StateConflict: the stored version is not ``state.version - 1``.
            NumberInUse: a claimed number belongs to another customer.
            StateError: nothing was saved.
        """
        ...

    async def delete(self, customer_id: str, *, version: int) -> None:
        """Remove the customer stored at ``version`` (and release its numbers).

        Raises:
            StateConflict: the stored version differs.
            StateError: nothing was removed.
        """
        ...

    def lease(self, customer_id: str) -> contextlib.AbstractAsyncContextManager[Held]:
        """Hold the customer against changes from other processes while the block runs.

        Raises (on entering):
            CustomerBusy: another process kept it for the whole wait.
            StateError: the store could not be asked.
        """
        ...

    async def customer_ids(self) -> list[str]:
        """Every stored customer id, sorted."""
        ...

    async def owner(self, number: str) -> str | None:
        """The customer that holds ``number``, or None."""
        ...

    async def ping(self) -> bool:
        """True when the store answers; never raises."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


def encode(state: CustomerState) -> str:
    """The stored JSON text of a customer aggregate."""
    return json.dumps(state.to_dict(), separators=(",", ":"), sort_keys=True)


def decode(text: str | bytes, *, where: str) -> CustomerState:
    """Parse a stored document; a corrupt one raises StateError naming ``where``."""
    try:
        return CustomerState.from_dict(json.loads(text))
    except (ValueError, ModelError) as exc:
        raise StateError(f"{where}: corrupt customer document: {exc}") from exc


def _check_version(stored: CustomerState | None, state: CustomerState) -> None:
    current = stored.version if stored is not None else 0
    if state.version != current + 1:
        raise StateConflict(
            f"customer {state.customer_id} is at version {current}, "
            f"the change was built on version {state.version - 1}"
        )


class MemoryStateStore:
    """Customer documents in a dict. Implements StateStore."""

    def __init__(self) -> None:
        self._docs: dict[str, str] = {}
        self._owners: dict[str, str] = {}
        self.available = True
        """Tests set this False to play a store that is down."""

    def _check_up(self) -> None:
        if not self.available:
            raise StateError("state store marked unavailable")

    async def get(self, customer_id: str) -> CustomerState | None:
        self._check_up()
        text = self._docs.get(customer_id)
        return decode(text, where=f"memory:{customer_id}") if text is not None else None

    async def put(self, state: CustomerState) -> None:
        self._check_up()
        self._apply_put(state)

    def _apply_put(self, state: CustomerState) -> None:
        cid = state.customer_id
        stored = self._stored(cid)
        _check_version(stored, state)
        before = set(stored.accounts) if stored is not None else set()
        after = set(state.accounts)
        for number in sorted(after - before):
            owner = self._owners.get(number)
            if owner is not None and owner != cid:
                raise NumberInUse(number, owner)
        self._docs[cid] = encode(state)
        for number in after - before:
            self._owners[number] = cid
        for number in before - after:
            self._owners.pop(number, None)

    async def delete(self, customer_id: str, *, version: int) -> None:
        self._check_up()
        self._apply_delete(customer_id, version)

    @contextlib.asynccontextmanager
    async def lease(self, customer_id: str) -> AsyncIterator[Held]:
        """No-op: one process owns this store, and the service serialises its changes."""
        self._check_up()
        yield LocalLease()

    def _apply_delete(self, customer_id: str, version: int) -> None:
        stored = self._stored(customer_id)
        if stored is None or stored.version != version:
            raise StateConflict(f"customer {customer_id} changed before it could be deleted")
        del self._docs[customer_id]
        for number in stored.accounts:
            self._owners.pop(number, None)

    def _stored(self, customer_id: str) -> CustomerState | None:
        text = self._docs.get(customer_id)
        return decode(text, where=f"memory:{customer_id}") if text is not None else None

    async def customer_ids(self) -> list[str]:
        self._check_up()
        return sorted(self._docs)

    async def all_customers(self) -> list[CustomerState]:
        """Every stored customer, in id order (one read, for figures over all of them)."""
        self._check_up()
        return [decode(self._docs[cid], where=f"memory:{cid}") for cid in sorted(self._docs)]

    async def owner(self, number: str) -> str | None:
        self._check_up()
        return self._owners.get(number)

    async def ping(self) -> bool:
        return self.available

    async def close(self) -> None:
        return None

    def _load_docs(self, docs: Iterable[CustomerState]) -> None:
        self._docs.clear()
        self._owners.clear()
        for state in docs:
            self._docs[state.customer_id] = encode(state)
            for number in state.accounts:
                owner = self._owners.setdefault(number, state.customer_id)
                if owner != state.customer_id:
                    raise StateError(
                        f"number {number} is held by customers {owner} and {state.customer_id}"
                    )


class FileStateStore(MemoryStateStore):
    """All customers in one JSON file, replaced atomically on every write.

    For the embedded single-box mode: one process owns the file. Writes go to a temporary
    file in the same directory, are fsynced, then renamed over the old file, so a crash
    leaves either the old or the new content, never half of one.
    """

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self._path = Path(path)
        self._loaded = False
        self._io = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self._path

    async def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        try:
            text = await asyncio.to_thread(self._read)
        except OSError as exc:
            raise StateError(f"{self._path}: cannot read state: {exc}") from exc
        if text is not None:
            try:
                data = json.loads(text)
                if not isinstance(data, dict) or not isinstance(data.get("customers"), dict):
                    raise ValueError('expected {"customers": {...}}')
                states = [
                    CustomerState.from_dict(doc) for _, doc in sorted(data["customers"].items())
                ]
            except (ValueError, ModelError) as exc:
                raise StateError(f"{self._path}: corrupt state file: {exc}") from exc
            self._load_docs(states)
        self._loaded = True

    def _read(self) -> str | None:
        try:
            return self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def _snapshot(self) -> str:
        customers: dict[str, Any] = {cid: json.loads(doc) for cid, doc in self._docs.items()}
        return json.dumps({"customers": customers}, indent=1, sort_keys=True) + "\n"

    def _write(self, text: str) -> None:
        directory = self._path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self._path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        # The rename is durable only once the directory entry is on disk.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def _commit(self, before_docs: dict[str, str], before_owners: dict[str, str]) -> None:
        try:
            await asyncio.to_thread(self._write, self._snapshot())
        except OSError as exc:
            self._docs, self._owners = before_docs, before_owners
            raise StateError(f"{self._path}: cannot write state: {exc}") from exc

    async def get(self, customer_id: str) -> CustomerState | None:
        async with self._io:
            await self._ensure_loaded()
            return await super().get(customer_id)

    async def put(self, state: CustomerState) -> None:
        self._check_up()
        async with self._io:
            await self._ensure_loaded()
            before = (dict(self._docs), dict(self._owners))
            self._apply_put(state)
            await self._commit(*before)

    async def delete(self, customer_id: str, *, version: int) -> None:
        self._check_up()
        async with self._io:
            await self._ensure_loaded()
            before = (dict(self._docs), dict(self._owners))
            self._apply_delete(customer_id, version)
            await self._commit(*before)

    async def customer_ids(self) -> list[str]:
        async with self._io:
            await self._ensure_loaded()
            return await super().customer_ids()

    async def all_customers(self) -> list[CustomerState]:
        async with self._io:
            await self._ensure_loaded()
            return await super().all_customers()

    async def owner(self, number: str) -> str | None:
        async with self._io:
            await self._ensure_loaded()
            return await super().owner(number)

    async def ping(self) -> bool:
        try:
            async with self._io:
                await self._ensure_loaded()
        except StateError:
            return False
        return self.available


class RedisStateStore:
    """Customer documents in Redis. Implements StateStore.

    Keys (``key_prefix`` defaults to ``e911:prov:``):

    - ``{prefix}customer:{customer_id}``: string, the customer aggregate as JSON;
    - ``{prefix}customers``: set of customer ids;
    - ``{prefix}owner:{number}``: string, the customer id that holds a 10-digit line;
    - ``{prefix}lease:customer:{customer_id}``: string, the token of the process changing
      the customer, with a time to live (schema 1.1).
    """

    def __init__(
        self,
        *,
        url: str,
        key_prefix: str = DEFAULT_STATE_PREFIX,
        socket_timeout: float = 5.0,
        leases: LeaseOptions | None = None,
    ) -> None:
        self._prefix = key_prefix
        # No client retries: the service retries whole operations instead.
        self._client = connect(url, socket_timeout=socket_timeout)
        self._leases = RedisLeases(
            self._client, prefix=key_prefix, options=leases or LeaseOptions()
        )

    def lease_key(self, customer_id: str) -> str:
        """Key of the lease a change to the customer holds."""
        return self._leases.key(f"customer:{customer_id}")

    @contextlib.asynccontextmanager
    async def lease(self, customer_id: str) -> AsyncIterator[Held]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                held = await stack.enter_async_context(self._leases.hold(f"customer:{customer_id}"))
            except LeaseBusy as exc:
                raise CustomerBusy(customer_id, exc.waited) from exc
            except LeaseError as exc:
                raise StateError(str(exc)) from exc
            yield held

    def customer_key(self, customer_id: str) -> str:
        """Key of one customer's document."""
        return f"{self._prefix}customer:{customer_id}"

    def owner_key(self, number: str) -> str:
        """Key of the number → customer index entry."""
        return f"{self._prefix}owner:{number}"

    @property
    def customers_key(self) -> str:
        """Key of the set of customer ids."""
        return f"{self._prefix}customers"

    async def get(self, customer_id: str) -> CustomerState | None:
        key = self.customer_key(customer_id)
        try:
            text = await self._client.get(key)
        except (RedisError, OSError) as exc:
            raise StateError(f"redis read of {key} failed: {exc}") from exc
        return decode(text, where=key) if text is not None else None

    async def put(self, state: CustomerState) -> None:
        cid = state.customer_id
        key = self.customer_key(cid)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                text = await pipe.get(key)
                stored = decode(text, where=key) if text is not None else None
                _check_version(stored, state)
                before = set(stored.accounts) if stored is not None else set()
                after = set(state.accounts)
                claims = sorted(after - before)
                if claims:
                    owner_keys = [self.owner_key(n) for n in claims]
                    await pipe.watch(*owner_keys)
                    owners = await pipe.mget(owner_keys)
                    for number, owner in zip(claims, owners, strict=True):
                        if owner is not None and owner != cid:
                            raise NumberInUse(number, str(owner))
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(key, encode(state))
                pipe.sadd(self.customers_key, cid)
                for number in claims:
                    pipe.set(self.owner_key(number), cid)
                for number in sorted(before - after):
                    pipe.delete(self.owner_key(number))
                await pipe.execute()
        except WatchError as exc:
            raise StateConflict(f"customer {cid} changed during the save") from exc
        except (RedisError, OSError) as exc:
            raise StateError(f"redis save of {key} failed: {exc}") from exc

    async def delete(self, customer_id: str, *, version: int) -> None:
        key = self.customer_key(customer_id)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                text = await pipe.get(key)
                stored = decode(text, where=key) if text is not None else None
                if stored is None or stored.version != version:
                    raise StateConflict(
                        f"customer {customer_id} changed before it could be deleted"
                    )
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.delete(key)
                pipe.srem(self.customers_key, customer_id)
                for number in sorted(stored.accounts):
                    pipe.delete(self.owner_key(number))
                await pipe.execute()
        except WatchError as exc:
            raise StateConflict(f"customer {customer_id} changed during the delete") from exc
        except (RedisError, OSError) as exc:
            raise StateError(f"redis delete of {key} failed: {exc}") from exc

    async def customer_ids(self) -> list[str]:
        try:
            members = await self._client.smembers(self.customers_key)
        except (RedisError, OSError) as exc:
            raise StateError(f"redis read of {self.customers_key} failed: {exc}") from exc
        return sorted(str(m) for m in members)

    async def all_customers(self, *, batch: int = 500) -> list[CustomerState]:
        """Every stored customer, in id order: MGET ``batch`` documents a round trip, so
        10,000 customers cost 20 round trips instead of 10,000."""
        ids = await self.customer_ids()
        out: list[CustomerState] = []
        for start in range(0, len(ids), batch):
            keys = [self.customer_key(cid) for cid in ids[start : start + batch]]
            try:
                texts = await self._client.mget(keys)
            except (RedisError, OSError) as exc:
                raise StateError(f"redis read of {len(keys)} customers failed: {exc}") from exc
            out += [decode(t, where=k) for k, t in zip(keys, texts, strict=True) if t is not None]
        return out

    async def owner(self, number: str) -> str | None:
        try:
            value = await self._client.get(self.owner_key(number))
        except (RedisError, OSError) as exc:
            raise StateError(f"redis read of {self.owner_key(number)} failed: {exc}") from exc
        return str(value) if value is not None else None

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass
