"""The provisioning orchestrator: one method per API operation, and ``resync``.

Theory of operation. Every change acts on one customer and runs under that customer's
lock, so two changes to one customer never interleave (changes to different customers run
in parallel). The lock is two-fold: an in-process lock, then the state store's lease on the
customer (a Redis key with a token and a time to live, see :mod:`.lease`), so that a change
in another provisioning process on the same Redis waits too (up to ``LeaseOptions.wait``,
then 503 ``customer_busy``). A lease rather than a retry loop because Bandwidth is called
inside a change: a change that lost an optimistic race would have ordered its address for
nothing, and its retry would order it again. The version check of each save stays as the
fence against a holder that lost its lease (a stall longer than its time to live): such a
change stops before Bandwidth or before its save, undoes what it did there, and answers 503
``lease_lost`` (or 409 ``concurrent_change`` if the save itself was refused).
A change goes through these steps, in this order, for crash safety:

1. load the customer; if the previous change left an *outbox* (side effects not known to
   be done), finish it first;
2. apply the request to the entities (pure), let the cascade refuse what must not happen;
3. **Bandwidth first**: validate addresses, create or re-point endpoints. Endpoint ids are
   a pure function of the entity, and ``provision_endpoint`` re-points an existing id, so
   repeating a step after a crash never duplicates an endpoint. If Bandwidth refuses or is
   unavailable, what this change did there is undone (best effort) and *nothing* changes
   locally: entity, ``provider_endpoint`` and line records stay as they were;
4. **entity state**: save the customer with the new endpoints and an outbox that lists the
   line records to write, the endpoints and addresses nothing uses any more, and the
   audit entries (optimistic: a concurrent writer elsewhere makes the save fail, not
   overwrite);
5. **line records**: one ``put_records`` call (MULTI/EXEC in Redis), so the edge never
   sees half a change;
6. **cleanup at Bandwidth**: delete the endpoints no entity uses. This runs after the lines
   moved off them, so a 911 call never references an endpoint that is already gone;
7. **audit**: append the entries; then clear the outbox.

A crash (or an outage) after step 4 leaves the outbox in the saved state: the next change
to that customer, a retry of the same request, or ``resync`` completes it. A crash between
steps 3 and 4 leaves at most an endpoint at Bandwidth that no entity references: a retry of
the request reuses it (same id) and ``resync`` lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol, TypeVar

from e911_sip.metrics import Metrics
from e911_sip.notify.event import Resolution, Targets
from e911_sip.provisioning import cascade
from e911_sip.provisioning.audit import AuditError, AuditLog
from e911_sip.provisioning.bandwidth import (
    AddressRejected,
    AuthenticationFailed,
    BandwidthError,
    Endpoint,
    OrderFailed,
    ProviderUnavailable,
    RateLimited,
    make_endpoint_id,
)
from e911_sip.provisioning.cascade import LineProblem
from e911_sip.provisioning.lease import Held
from e911_sip.provisioning.model import (
    Account,
    Address,
    AuditEntry,
    Contacts,
    Customer,
    CustomerState,
    EndpointRef,
    Entity,
    EntityRef,
    Level,
    ModelError,
    Outbox,
    Site,
    StandardizedAddress,
    check_entity_id,
    check_number,
)
from e911_sip.provisioning.state import (
    CustomerBusy,
    NumberInUse,
    StateConflict,
    StateError,
    StateStore,
)
from e911_sip.store.base import LineRecordWriter, LocationRecord, StoreError

_LOG = logging.getLogger("e911_sip.provisioning")

_T = TypeVar("_T")
_C = TypeVar("_C", Customer, Site)


# --- the seams --------------------------------------------------------------------------


class EmergencyProvider(Protocol):
    """What the service needs from Bandwidth (``BandwidthClient`` has this shape)."""

    @property
    def account_id(self) -> str: ...

    async def create_address(
        self, address: Address, *, description: str
    ) -> StandardizedAddress: ...

    async def delete_address(self, address_id: str) -> None: ...

    async def provision_endpoint(
        self, *, endpoint_id: str, phone_number: str, name: str, address_id: str
    ) -> Endpoint: ...

    async def delete_endpoint(self, endpoint_id: str) -> None: ...

    async def list_endpoints(self, *, address_id: str | None = None) -> list[Endpoint]: ...


# --- options, inputs, results -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceOptions:
    """How the provisioning service behaves."""

    default_country: str = "US"
    """Country given to an address that names none."""
    endpoint_name_max_length: int = 64
    """Endpoint names (``Helpdesk 365 / CarryOffice``) are cut to this many characters."""
    resync_checks_provider: bool = True
    """``resync`` lists the endpoints at Bandwidth to find lines whose endpoint is missing
    there and endpoints nothing references. Off: resync works from local state only."""
    resync_prunes_orphan_lines: bool = True
    """``resync`` deletes line records of numbers no account holds (left by a crash during
    a termination). Off: they are only reported."""


class Unset(Enum):
    """Marks a field a request did not give (PATCH leaves it; PUT resets it)."""

    UNSET = "unset"


UNSET = Unset.UNSET

_E = TypeVar("_E")
_F = TypeVar("_F")

Merge = Callable[[_E], _F]
"""A merge patch bound to its request: the entity as stored → the complete fields of the
result, to apply as a PUT would (RFC 7386; the API builds it from the request body)."""


def _resolve(fields: _F | Callable[[_E], _F], current: _E) -> tuple[_F, bool]:
    """The fields a PATCH applies to ``current`` and whether they replace (a merge patch)
    or only set what they give."""
    if callable(fields):
        return fields(current), True
    return fields, False


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerFields:
    """Customer attributes a request gives."""

    name: str | Unset = UNSET
    callback_number: str | None | Unset = UNSET
    address: Address | None | Unset = UNSET
    contacts: Contacts | None | Unset = UNSET


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteFields:
    """Site attributes a request gives."""

    name: str | Unset = UNSET
    callback_number: str | None | Unset = UNSET
    address: Address | None | Unset = UNSET
    contacts: Contacts | None | Unset = UNSET


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountFields:
    """Account attributes a request gives."""

    customer_id: str | Unset = UNSET
    site_id: str | None | Unset = UNSET
    name: str | Unset = UNSET
    callback_number: str | None | Unset = UNSET
    address: Address | None | Unset = UNSET
    contacts: Contacts | None | Unset = UNSET


@dataclass(frozen=True, slots=True)
class Saved:
    """The customer after a PUT, and whether the PUT created the entity."""

    state: CustomerState
    created: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class BandwidthDetail:
    """Bandwidth's own words for a failure, passed through to the API client."""

    type: str
    code: int | None
    description: str
    field: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "code": self.code,
            "description": self.description,
            "field": self.field,
        }


class ServiceError(Exception):
    """A refused or failed operation, carrying the HTTP answer it implies."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        bandwidth: BandwidthDetail | None = None,
        retry_after: float | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.bandwidth = bandwidth
        self.retry_after = retry_after
        self.field = field


@dataclass(frozen=True, slots=True, kw_only=True)
class ResyncReport:
    """What ``resync`` found and did."""

    customers: int
    lines: int
    written: tuple[str, ...]
    """Lines whose record was (re)written because it differed from the state."""
    removed: tuple[str, ...]
    """Line records deleted: the line has no endpoint, or no account holds the number."""
    orphan_lines: tuple[str, ...]
    """Stored line records no account holds (removed when pruning is on)."""
    without_endpoint: tuple[LineProblem, ...]
    """Lines with no valid endpoint: their 911 calls reach Bandwidth's national call center."""
    provider_checked: bool
    provider_error: str | None
    orphan_endpoints: tuple[str, ...]
    """Endpoint ids at Bandwidth that no entity references."""
    errors: tuple[str, ...]
    """Customers that could not be processed."""

    @property
    def ok(self) -> bool:
        """True when every line has a valid endpoint and nothing failed."""
        return not self.without_endpoint and not self.errors and self.provider_error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "customers": self.customers,
            "lines": self.lines,
            "written": list(self.written),
            "removed": list(self.removed),
            "orphan_lines": list(self.orphan_lines),
            "without_endpoint": [p.to_dict() for p in self.without_endpoint],
            "provider_checked": self.provider_checked,
            "provider_error": self.provider_error,
            "orphan_endpoints": list(self.orphan_endpoints),
            "errors": list(self.errors),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    """Entities of one customer to create or replace (PUT semantics) in one change: what a
    bulk import applies at a time."""

    customer_id: str
    customer: CustomerFields | None = None
    """The customer's own fields; None: the customer must already exist and is kept."""
    sites: Mapping[str, SiteFields] = dataclasses.field(default_factory=dict)
    accounts: Mapping[str, AccountFields] = dataclasses.field(default_factory=dict)


# --- concurrency helpers -----------------------------------------------------------------


class _Gate:
    """Many shared holders (changes) or one exclusive holder (resync); resync waits its turn
    and, while it waits, no new change starts, so it cannot starve."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass(slots=True)
class _LockEntry:
    lock: asyncio.Lock
    users: int = 0


# --- the service ----------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


Edit = Callable[[CustomerState | None, str], CustomerState | None]
"""Applies a request to the stored customer (None: absent) at ``now``; None: remove it."""


class ProvisioningService:
    """Customers, sites and accounts → Bandwidth endpoints and the edge's line records."""

    def __init__(
        self,
        *,
        provider: EmergencyProvider,
        lines: LineRecordWriter,
        state: StateStore,
        audit: AuditLog,
        options: ServiceOptions,
        clock: Callable[[], datetime] = _utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self._provider = provider
        self._lines = lines
        self._state = state
        self._audit = audit
        self._options = options
        self._clock = clock
        self._metrics = metrics
        self._locks: dict[str, _LockEntry] = {}
        self._held: dict[str, Held] = {}
        self._gate = _Gate()

    @property
    def options(self) -> ServiceOptions:
        return self._options

    # -- customers -------------------------------------------------------------------------

    async def list_customers(self) -> list[CustomerState]:
        """Every customer, in id order."""
        out = []
        for cid in await self._guard_state(self._state.customer_ids()):
            state = await self._guard_state(self._state.get(cid))
            if state is not None:
                out.append(state)
        return out

    async def get_customer(self, customer_id: str) -> CustomerState:
        """The customer with its sites and accounts. Raises ServiceError 404."""
        _check(check_entity_id, customer_id, what="customer_id")
        state = await self._guard_state(self._state.get(customer_id))
        if state is None:
            raise _not_found(f"customer {customer_id} does not exist")
        return state

    async def put_customer(self, customer_id: str, fields: CustomerFields, *, who: str) -> Saved:
        """Create or replace a customer (fields not given are reset)."""
        _check(check_entity_id, customer_id, what="customer_id")
        self._check_common(fields.callback_number)
        created = False

        def edit(old: CustomerState | None, now: str) -> CustomerState:
            nonlocal created
            created = old is None
            current = old.customer if old is not None else Customer(customer_id=customer_id)
            new = self._apply_common(current, fields, replace=True)
            new = cascade.touch(old.customer if old else None, new, now=now)
            if old is None:
                return CustomerState(customer=new)
            return dataclasses.replace(old, customer=new)

        state = await self._change_kept(
            customer_id,
            edit,
            who=who,
            action="put_customer",
            entity=EntityRef.customer(customer_id),
        )
        return Saved(state, created)

    async def patch_customer(
        self,
        customer_id: str,
        fields: CustomerFields | Merge[Customer, CustomerFields],
        *,
        who: str,
    ) -> CustomerState:
        """Change the given customer fields (``address=None`` clears the address), or apply a
        merge patch to the customer as stored (checked like a PUT, under the customer's lock).
        """
        _check(check_entity_id, customer_id, what="customer_id")
        if not callable(fields):
            self._check_common(fields.callback_number)

        def edit(old: CustomerState | None, now: str) -> CustomerState:
            if old is None:
                raise _not_found(f"customer {customer_id} does not exist")
            given, replace = _resolve(fields, old.customer)
            self._check_common(given.callback_number)
            new = self._apply_common(old.customer, given, replace=replace)
            return dataclasses.replace(old, customer=cascade.touch(old.customer, new, now=now))

        state = await self._change_kept(
            customer_id,
            edit,
            who=who,
            action="patch_customer",
            entity=EntityRef.customer(customer_id),
        )
        return state

    async def delete_customer(self, customer_id: str, *, who: str) -> None:
        """Delete a customer with no sites and no accounts, and its endpoint at Bandwidth."""
        _check(check_entity_id, customer_id, what="customer_id")

        def edit(old: CustomerState | None, now: str) -> None:
            if old is None:
                raise _not_found(f"customer {customer_id} does not exist")
            _raise_refusal(cascade.refuse_customer_removal(old))
            return None

        await self._change(
            customer_id,
            edit,
            who=who,
            action="delete_customer",
            entity=EntityRef.customer(customer_id),
        )

    # -- sites -------------------------------------------------------------------------------

    async def get_site(self, customer_id: str, site_id: str) -> tuple[CustomerState, Site]:
        """The site and its customer. Raises ServiceError 404."""
        _check(check_entity_id, site_id, what="site_id")
        state = await self.get_customer(customer_id)
        site = state.sites.get(site_id)
        if site is None:
            raise _not_found(f"customer {customer_id} has no site {site_id}")
        return state, site

    async def put_site(
        self, customer_id: str, site_id: str, fields: SiteFields, *, who: str
    ) -> Saved:
        """Create or replace a site of an existing customer."""
        _check(check_entity_id, customer_id, what="customer_id")
        _check(check_entity_id, site_id, what="site_id")
        self._check_common(fields.callback_number)
        created = False

        def edit(old: CustomerState | None, now: str) -> CustomerState:
            nonlocal created
            if old is None:
                raise _not_found(f"customer {customer_id} does not exist")
            before = old.sites.get(site_id)
            created = before is None
            current = before or Site(customer_id=customer_id, site_id=site_id)
            new = cascade.touch(before, self._apply_common(current, fields, replace=True), now=now)
            return dataclasses.replace(old, sites={**old.sites, site_id: new})

        state = await self._change_kept(
            customer_id,
            edit,
            who=who,
            action="put_site",
            entity=EntityRef.site(customer_id, site_id),
        )
        return Saved(state, created)

    async def patch_site(
        self,
        customer_id: str,
        site_id: str,
        fields: SiteFields | Merge[Site, SiteFields],
        *,
        who: str,
    ) -> CustomerState:
        """Change the given site fields, or apply a merge patch to the site as stored."""
        _check(check_entity_id, customer_id, what="customer_id")
        _check(check_entity_id, site_id, what="site_id")
        if not callable(fields):
            self._check_common(fields.callback_number)

        def edit(old: CustomerState | None, now: str) -> CustomerState:
            if old is None:
                raise _not_found(f"customer {customer_id} does not exist")
            before = old.sites.get(site_id)
            if before is None:
                raise _not_found(f"customer {customer_id} has no site {site_id}")
            given, replace = _resolve(fields, before)
            self._check_common(given.callback_number)
            new = cascade.touch(before, self._apply_common(before, given, replace), now=now)
            return dataclasses.replace(old, sites={**old.sites, site_id: new})

        state = await self._change_kept(
            customer_id,
            edit,
            who=who,
            action="patch_site",
            entity=EntityRef.site(customer_id, site_id),
        )
        return state

    async def delete_site(self, customer_id: str, site_id: str, *, who: str) -> None:
        """Delete a site no account is assigned to, and its endpoint at Bandwidth (1.5)."""
        _check(check_entity_id, customer_id, what="customer_id")
        _check(check_entity_id, site_id, what="site_id")

        def edit(old: CustomerState | None, now: str) -> CustomerState:
            if old is None:
                raise _not_found(f"customer {customer_id} does not exist")
            if site_id not in old.sites:
                raise _not_found(f"customer {customer_id} has no site {site_id}")
            _raise_refusal(cascade.refuse_site_removal(old, site_id))
            sites = {k: v for k, v in old.sites.items() if k != site_id}
            return dataclasses.replace(old, sites=sites)

        await self._change(
            customer_id,
            edit,
            who=who,
            action="delete_site",
            entity=EntityRef.site(customer_id, site_id),
        )

    # -- accounts ----------------------------------------------------------------------------

    async def get_account(self, number: str) -> tuple[CustomerState, Account]:
        """The account and its customer. Raises ServiceError 404."""
        _check(check_number, number, what="number")
        owner = await self._guard_state(self._state.owner(number))
        state = await self._guard_state(self._state.get(owner)) if owner is not None else None
        account = state.accounts.get(number) if state is not None else None
        if state is None or account is None:
            raise _not_found(f"account {number} does not exist")
        return state, account

    async def notification_context(self, number: str | None) -> Resolution:
        """Kari's Law: who is told of an emergency call from ``number`` (the effective
        contacts), and the line's level and standardised address. An unknown line gets an
        empty resolution (the ``[notify]`` fallback targets apply)."""
        if number is None:
            return Resolution()
        try:
            state, account = await self.get_account(number)
        except ServiceError as exc:
            if exc.status in (404, 422):
                return Resolution()
            raise
        _level, contacts = cascade.effective_contacts(state, account)
        eff = cascade.effective(state, account)
        names = [state.customer.display_name]
        if account.site_id is not None and account.site_id in state.sites:
            names.append(state.sites[account.site_id].display_name)
        names.append(account.display_name)
        return Resolution(
            targets=Targets(webhooks=contacts.webhooks, emails=contacts.emails, sms=contacts.sms),
            level=eff.level.value if eff.level is not None else None,
            address=eff.address or None,
            name=" / ".join(names),
        )

    async def put_account(self, number: str, fields: AccountFields, *, who: str) -> Saved:
        """Create or replace an account (a line). ``customer_id`` is required to create one;
        an account cannot move to another customer."""
        _check(check_number, number, what="number")
        self._check_account_fields(fields)
        owner = await self._guard_state(self._state.owner(number))
        customer_id = fields.customer_id if not isinstance(fields.customer_id, Unset) else owner
        if customer_id is None:
            raise ServiceError(
                422,
                "invalid_request",
                "customer_id is required to create an account",
                field="customer_id",
            )
        if owner is not None and owner != customer_id:
            raise ServiceError(
                409,
                "number_in_use",
                f"number {number} belongs to customer {owner}; terminate it there first",
            )
        created = False

        def edit(old: CustomerState | None, now: str) -> CustomerState:
            nonlocal created
            if old is None:
                raise ServiceError(
                    422,
                    "unknown_customer",
                    f"customer {customer_id} does not exist",
                    field="customer_id",
                )
            before = old.accounts.get(number)
            created = before is None
            current = before or Account(number=number, customer_id=customer_id)
            new = cascade.touch(before, self._apply_account(current, fields, True), now=now)
            return dataclasses.replace(old, accounts={**old.accounts, number: new})

        state = await self._change_kept(
            customer_id,
            edit,
            who=who,
            action="put_account",
            entity=EntityRef.account(customer_id, number),
        )
        return Saved(state, created)

    async def patch_account(
        self, number: str, fields: AccountFields | Merge[Account, AccountFields], *, who: str
    ) -> CustomerState:
        """Change the given account fields: own address, site assignment (``site_id``; None
        unassigns), name, callback number; or apply a merge patch to the account as stored."""
        _check(check_number, number, what="number")
        customer_id = await self._account_owner(number)

        def check(given: AccountFields) -> None:
            self._check_account_fields(given)
            if not isinstance(given.customer_id, Unset) and given.customer_id != customer_id:
                raise ServiceError(
                    409,
                    "customer_change",
                    f"account {number} belongs to customer {customer_id}; an account cannot "
                    "move to another customer (terminate it and create it there)",
                    field="customer_id",
                )

        if not callable(fields):
            check(fields)

        def edit(old: CustomerState | None, now: str) -> CustomerState:
            before = old.accounts.get(number) if old is not None else None
            if old is None or before is None:
                raise _not_found(f"account {number} does not exist")
            given, replace = _resolve(fields, before)
            check(given)
            new = cascade.touch(before, self._apply_account(before, given, replace), now=now)
            return dataclasses.replace(old, accounts={**old.accounts, number: new})

        state = await self._change_kept(
            customer_id,
            edit,
            who=who,
            action="patch_account",
            entity=EntityRef.account(customer_id, number),
        )
        return state

    async def terminate_account(self, number: str, *, who: str) -> CustomerState:
        """Terminate an account: its line record goes, its own endpoint is deleted at
        Bandwidth (1.8); customer and site endpoints stay."""
        _check(check_number, number, what="number")
        customer_id = await self._account_owner(number)

        def edit(old: CustomerState | None, now: str) -> CustomerState:
            if old is None or number not in old.accounts:
                raise _not_found(f"account {number} does not exist")
            accounts = {k: v for k, v in old.accounts.items() if k != number}
            return dataclasses.replace(old, accounts=accounts)

        state = await self._change_kept(
            customer_id,
            edit,
            who=who,
            action="terminate_account",
            entity=EntityRef.account(customer_id, number),
        )
        return state

    # -- bulk import ---------------------------------------------------------------------------

    async def apply_batch(
        self,
        batch: Batch,
        *,
        who: str,
        limit: AbstractAsyncContextManager[object] | None = None,
    ) -> dict[EntityRef, ServiceError]:
        """Create or replace the batch's entities in one change; the entities that failed,
        and why (the others are in effect when this returns).

        Unlike a single PUT, one entity's failure does not refuse the rest: an entity
        Bandwidth refuses keeps its stored form (or is not created), and so do the batch's
        accounts whose location would have come from it. Bandwidth steps run concurrently,
        each inside ``limit`` (the importer's bound on requests in flight). Lines that
        inherit an address need no Bandwidth request at all, and all line records of the
        batch are written in one atomic ``put_records``.

        Raises:
            ServiceError: the whole batch failed (state or line store unavailable, a
                concurrent change); nothing of it was saved, or the outbox finishes it.
        """
        cid = batch.customer_id
        _check(check_entity_id, cid, what="customer_id")
        failed: dict[EntityRef, ServiceError] = {}
        accounts: dict[str, AccountFields] = {}
        for number, fields in batch.accounts.items():
            ref = EntityRef.account(cid, number)
            try:
                _check(check_number, number, what="number")
                self._check_account_fields(fields)
                owner = await self._guard_state(self._state.owner(number))
            except ServiceError as exc:
                failed[ref] = exc
                continue
            if owner is not None and owner != cid:
                failed[ref] = ServiceError(
                    409,
                    "number_in_use",
                    f"number {number} belongs to customer {owner}; terminate it there first",
                )
                continue
            accounts[number] = fields
        batch = dataclasses.replace(batch, accounts=accounts)
        result = "ok"
        try:
            async with self._gate.shared(), self._holding(cid):
                await self._apply_batch_locked(batch, failed, who=who, limit=limit)
        except ServiceError as exc:
            result = exc.code
            raise
        except BaseException:
            result = "error"
            raise
        finally:
            if self._metrics is not None:
                self._metrics.provisioning_operations.labels("import", result).inc()
        return failed

    async def _apply_batch_locked(
        self,
        batch: Batch,
        failed: dict[EntityRef, ServiceError],
        *,
        who: str,
        limit: AbstractAsyncContextManager[object] | None,
    ) -> None:
        cid = batch.customer_id
        old = await self._guard_state(self._state.get(cid))
        if old is not None and old.outbox is not None:
            old = await self._flush(old)
        if old is None and batch.customer is None:
            missing = ServiceError(
                422, "unknown_customer", f"customer {cid} does not exist", field="customer_id"
            )
            for sid in batch.sites:
                failed[EntityRef.site(cid, sid)] = missing
            for number in batch.accounts:
                failed[EntityRef.account(cid, number)] = missing
            return
        now = _iso(self._clock())
        proposed = self._batch_proposal(old, batch, failed, now)
        if old is not None and proposed == old:
            return
        done: list[tuple[str, Callable[[], Awaitable[None]]]] = []

        async def undo() -> None:
            await _undo(done)

        # Each round runs every step the plan still needs; a failure reverts its entity and
        # the batch's lines that depend on it, and the next plan works on what is left.
        # Reverted entities are back in their stored (consistent) form, so this ends.
        for _round in range(5):
            steps = cascade.plan(proposed).steps
            if not steps:
                break
            try:
                self._check_lease(cid)
            except ServiceError:
                await undo()
                raise
            results = await asyncio.gather(
                *(self._isolated_step(proposed, step, limit) for step in steps)
            )
            outcomes: dict[EntityRef, cascade.Outcome] = {}
            errors: dict[EntityRef, ServiceError] = {}
            for step, (outcome, actions, error) in zip(steps, results, strict=True):
                if error is not None:
                    errors[step.ref] = error
                elif outcome is None:
                    errors[step.ref] = _internal(f"step {step.ref} ended with no outcome")
                else:
                    outcomes[step.ref] = outcome
                    done.extend(actions)
            proposed = cascade.settle(proposed, outcomes)
            if not errors:
                break
            reverted = self._revert_failed(old, proposed, batch, errors, failed)
            if reverted is None:
                await undo()
                return
            proposed = reverted
        else:
            await undo()
            raise ServiceError(
                503, "import_incomplete", f"customer {cid}: Bandwidth steps kept failing; retry"
            )
        if old is not None and proposed == old:
            await undo()
            return
        await self._commit(
            cid,
            old,
            proposed,
            undo,
            who=who,
            action="import",
            entity=EntityRef.customer(cid),
            now=now,
        )

    def _batch_proposal(
        self,
        old: CustomerState | None,
        batch: Batch,
        failed: dict[EntityRef, ServiceError],
        now: str,
    ) -> CustomerState:
        cid = batch.customer_id
        customer = old.customer if old is not None else Customer(customer_id=cid)
        if batch.customer is not None:
            new = self._apply_common(customer, batch.customer, replace=True)
            customer = cascade.touch(old.customer if old is not None else None, new, now=now)
        sites: dict[str, Site] = dict(old.sites) if old is not None else {}
        for sid, site_fields in batch.sites.items():
            site_before = sites.get(sid)
            site = site_before or Site(customer_id=cid, site_id=sid)
            sites[sid] = cascade.touch(
                site_before, self._apply_common(site, site_fields, replace=True), now=now
            )
        accounts: dict[str, Account] = dict(old.accounts) if old is not None else {}
        for number, account_fields in batch.accounts.items():
            before = accounts.get(number)
            current = before or Account(number=number, customer_id=cid)
            new_account = cascade.touch(
                before, self._apply_account(current, account_fields, True), now=now
            )
            if new_account.site_id is not None and new_account.site_id not in sites:
                failed[new_account.ref] = ServiceError(
                    422,
                    "unknown_site",
                    f"customer {cid} has no site {new_account.site_id!r}",
                    field="site_id",
                )
                continue
            accounts[number] = new_account
        if old is None:
            return CustomerState(customer=customer, sites=sites, accounts=accounts)
        return dataclasses.replace(old, customer=customer, sites=sites, accounts=accounts)

    def _revert_failed(
        self,
        old: CustomerState | None,
        proposed: CustomerState,
        batch: Batch,
        errors: Mapping[EntityRef, ServiceError],
        failed: dict[EntityRef, ServiceError],
    ) -> CustomerState | None:
        """``proposed`` with each failed entity back in its stored form (or gone, if new),
        and with it the batch's accounts that depend on it; None when the customer itself
        cannot be created (nothing of the batch can be)."""
        cid = batch.customer_id
        customer = proposed.customer
        sites = dict(proposed.sites)
        accounts = dict(proposed.accounts)
        dropped_sites: set[str] = set()

        def revert_account(number: str, error: ServiceError) -> None:
            failed[EntityRef.account(cid, number)] = error
            before = old.accounts.get(number) if old is not None else None
            if before is None:
                accounts.pop(number, None)
            else:
                accounts[number] = before

        for ref, error in errors.items():
            if ref.level is Level.CUSTOMER and old is None:
                failed[ref] = error
                because = _because(error, ref)
                for sid in batch.sites:
                    failed[EntityRef.site(cid, sid)] = because
                for number in batch.accounts:
                    failed.setdefault(EntityRef.account(cid, number), because)
                return None
            because = _because(error, ref)
            for number in batch.accounts:
                account = accounts.get(number)
                if account is None or account.ref == ref:
                    continue
                source = cascade.effective_entity(proposed, account)
                if source is not None and source.ref == ref:
                    revert_account(number, because)
            if ref.level is Level.CUSTOMER:
                if old is None:
                    raise _internal(f"a batch failed on customer {ref} it did not start from")
                failed[ref] = error
                customer = old.customer
            elif ref.level is Level.SITE:
                if ref.key in batch.sites:
                    failed[ref] = error
                before_site = old.sites.get(ref.key) if old is not None else None
                if before_site is None:
                    sites.pop(ref.key, None)
                    dropped_sites.add(ref.key)
                else:
                    sites[ref.key] = before_site
            else:
                revert_account(ref.key, error)
        for number in batch.accounts:
            account = accounts.get(number)
            if account is not None and account.site_id in dropped_sites:
                revert_account(
                    number,
                    _because(
                        errors[EntityRef.site(cid, account.site_id)],
                        EntityRef.site(cid, account.site_id),
                    ),
                )
        return dataclasses.replace(proposed, customer=customer, sites=sites, accounts=accounts)

    async def _isolated_step(
        self,
        state: CustomerState,
        step: cascade.Step,
        limit: AbstractAsyncContextManager[object] | None,
    ) -> tuple[
        cascade.Outcome | None,
        list[tuple[str, Callable[[], Awaitable[None]]]],
        ServiceError | None,
    ]:
        """One step of a batch: its outcome and undo actions, or the error (its own partial
        work already undone)."""
        entity = state.entity(step.ref)
        if entity is None:
            return None, [], _internal(f"step {step.ref} names no entity of the batch")
        actions: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        try:
            async with limit if limit is not None else nullcontext():
                outcome = await self._run_step(state, entity, step, actions)
        except BandwidthError as exc:
            await _undo(actions)
            return None, [], _bandwidth_error(exc, step.ref)
        return outcome, actions, None

    # -- audit and health --------------------------------------------------------------------

    async def audit_trail(self, *, line: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest ``limit`` audit entries (of one line, when given), oldest first."""
        if line is not None:
            _check(check_number, line, what="line")
        try:
            return await self._audit.read(line=line, limit=limit)
        except AuditError as exc:
            raise ServiceError(503, "audit_unavailable", str(exc)) from exc

    async def healthy(self) -> bool:
        """True when the state store answers."""
        return await self._state.ping()

    # -- resync ------------------------------------------------------------------------------

    async def resync(self, *, who: str = "resync") -> ResyncReport:
        """Rebuild every line record from entity state; report lines with no valid endpoint.

        Pending outboxes are finished first. Records that already say the right thing are
        left alone; the others are rewritten (and audited as ``resync``), one atomic write
        per customer under its lease, skipping a customer another process changed since
        it was read (that change writes its own records). With ``resync_checks_provider``,
        endpoints are listed at Bandwidth to find lines whose endpoint is gone there and
        endpoints nothing references.

        Raises:
            ServiceError: the state or line store could not be read or written.
        """
        # Exclusive: changes in flight finish first and new ones wait, so neither the listing
        # at Bandwidth nor the state read can catch a change half-way.
        async with self._gate.exclusive():
            provider_ids: set[str] | None = None
            provider_error: str | None = None
            if self._options.resync_checks_provider:
                try:
                    endpoints = await self._bw("list_endpoints", self._provider.list_endpoints())
                    provider_ids = {e.id for e in endpoints}
                except BandwidthError as exc:
                    provider_error = f"could not list endpoints at Bandwidth: {exc.description}"
            return await self._resync(who, provider_ids, provider_error)

    async def _resync(
        self, who: str, provider_ids: set[str] | None, provider_error: str | None
    ) -> ResyncReport:
        now = _iso(self._clock())
        errors: list[str] = []
        states: list[CustomerState] = []
        for cid in await self._guard_state(self._state.customer_ids()):
            try:
                async with self._holding(cid):
                    state = await self._guard_state(self._state.get(cid))
                    if state is not None and state.outbox is not None:
                        state = await self._flush(state)
            except ServiceError as exc:
                errors.append(f"customer {cid}: {exc.message}")
                continue
            if state is not None:
                states.append(state)
        try:
            stored = await self._lines.all_lines()
        except StoreError as exc:
            raise ServiceError(503, "line_store_unavailable", str(exc)) from exc
        plan = cascade.reconcile(
            states,
            stored,
            provider_ids,
            now=now,
            who=who,
            prune_orphan_lines=self._options.resync_prunes_orphan_lines,
        )
        written, removed, skipped = await self._repair(states, plan, stored, errors)
        audit = tuple(e for e in plan.audit if e.line in written or e.line in removed)
        if skipped:
            _LOG.info(
                "resync left %d customer(s) to the change that was saving them meanwhile",
                len(skipped),
                extra={"customers": skipped},
            )
        if audit:
            try:
                await self._audit.append(audit)
            except AuditError as exc:
                # The records are right now; only the trail of the repair is missing.
                _LOG.error(
                    "resync could not write its audit entries: %s",
                    exc,
                    extra={"audit": [e.to_dict() for e in audit]},
                )
                errors.append(f"audit: {exc}")
        report = ResyncReport(
            customers=len(states),
            lines=plan.lines,
            written=tuple(sorted(written)),
            removed=tuple(sorted(removed)),
            orphan_lines=plan.orphan_lines,
            without_endpoint=plan.without_endpoint,
            provider_checked=provider_ids is not None,
            provider_error=provider_error,
            orphan_endpoints=plan.orphan_endpoints,
            errors=tuple(errors),
        )
        _LOG.info(
            "resync: %d customers, %d lines, %d written, %d removed, %d without endpoint",
            report.customers,
            report.lines,
            len(report.written),
            len(report.removed),
            len(report.without_endpoint),
        )
        return report

    async def _repair(
        self,
        states: Sequence[CustomerState],
        plan: cascade.Reconciliation,
        stored: Mapping[str, LocationRecord],
        errors: list[str],
    ) -> tuple[set[str], set[str], list[str]]:
        """Carry out ``plan``'s writes and deletions: each customer's under its lease, and
        only if the customer is still at the version the plan was made from (a change in
        another process that saved meanwhile writes its own records, which a stale repair
        must not overwrite); then the deletions of lines no account holds, each only if no
        customer claimed the number meanwhile and its record is still the one read. The
        lines written, the lines removed, and the customers left to a change; a customer
        that could not be held or read is added to ``errors``.
        """
        by_line = {number: state for state in states for number in state.accounts}
        groups: dict[str, tuple[dict[str, LocationRecord], set[str]]] = {}
        orphans: set[str] = set()
        for number, record in plan.records.items():
            groups.setdefault(by_line[number].customer_id, ({}, set()))[0][number] = record
        for number in plan.removals:
            if number in by_line:
                groups.setdefault(by_line[number].customer_id, ({}, set()))[1].add(number)
            else:
                orphans.add(number)
        versions = {state.customer_id: state.version for state in states}
        written: set[str] = set()
        removed: set[str] = set()
        skipped: list[str] = []
        try:
            for cid, (records, deletions) in sorted(groups.items()):
                try:
                    async with self._holding(cid):
                        now = await self._guard_state(self._state.get(cid))
                        if now is None or now.version != versions[cid]:
                            skipped.append(cid)
                            continue
                        await self._lines.put_records(records, frozenset(deletions))
                except ServiceError as exc:
                    errors.append(f"customer {cid}: {exc.message}")
                    continue
                written |= records.keys()
                removed |= deletions
            claimed = set()
            for number in orphans:
                if await self._guard_state(self._state.owner(number)) is not None:
                    claimed.add(number)
            if orphans - claimed:
                # A customer claiming a number saves its owner first and writes the record
                # after: one that did so since the owner check changed the record, and the
                # record it wrote stays.
                removed |= await self._lines.delete_unchanged(
                    {n: stored[n] for n in orphans - claimed if n in stored}
                )
        except StoreError as exc:
            raise ServiceError(503, "line_store_unavailable", str(exc)) from exc
        return written, removed, skipped

    # -- the change pipeline -------------------------------------------------------------------

    async def _change(
        self, customer_id: str, edit: Edit, *, who: str, action: str, entity: EntityRef
    ) -> CustomerState | None:
        result = "ok"
        try:
            async with self._gate.shared(), self._holding(customer_id):
                return await self._change_locked(
                    customer_id, edit, who=who, action=action, entity=entity
                )
        except ServiceError as exc:
            result = exc.code
            raise
        except BaseException:
            result = "error"
            raise
        finally:
            if self._metrics is not None:
                self._metrics.provisioning_operations.labels(action, result).inc()

    async def _change_kept(
        self, customer_id: str, edit: Edit, *, who: str, action: str, entity: EntityRef
    ) -> CustomerState:
        """:meth:`_change` for an edit that keeps the customer: the state it saved."""
        state = await self._change(customer_id, edit, who=who, action=action, entity=entity)
        if state is None:
            raise _internal(f"{action} of {entity} removed the customer")
        return state

    async def _change_locked(
        self, customer_id: str, edit: Edit, *, who: str, action: str, entity: EntityRef
    ) -> CustomerState | None:
        old = await self._guard_state(self._state.get(customer_id))
        if old is not None and old.outbox is not None:
            old = await self._flush(old)
        now = _iso(self._clock())
        proposed = edit(old, now)
        if proposed is None and old is None:
            return None
        if proposed is not None and old is not None and proposed == old:
            return old
        if proposed is not None:
            _raise_refusal(cascade.check(proposed))
        steps = cascade.plan(proposed).steps if proposed is not None else ()
        self._check_lease(customer_id)
        outcomes, undo = await self._provision(proposed, steps)
        final = cascade.settle(proposed, outcomes) if proposed is not None else None
        if final is None:
            if old is None:
                raise _internal(f"{action} of {entity} deleted a customer that does not exist")
            changes = cascade.line_changes(
                old, None, now=now, who=who, action=action, entity=entity
            )
            outbox = Outbox(
                records=changes.records,
                deletions=changes.deletions,
                endpoint_deletions=cascade.released_endpoints(old, None),
                address_deletions=cascade.released_addresses(old, None),
                audit=changes.audit,
            )
            # A customer is removed only when it has no lines, so no record points at its
            # endpoint: Bandwidth's copy can go before the state does.
            self._check_lease(customer_id)
            await self._clean_up(outbox)
            try:
                await self._state.delete(customer_id, version=old.version)
            except StateConflict as exc:
                raise ServiceError(409, "concurrent_change", f"{exc}; retry") from exc
            except StateError as exc:
                raise ServiceError(503, "state_unavailable", str(exc)) from exc
            _LOG.info("customer deleted", extra={"customer_id": customer_id, "who": who})
            return None
        return await self._commit(
            customer_id, old, final, undo, who=who, action=action, entity=entity, now=now
        )

    async def _commit(
        self,
        customer_id: str,
        old: CustomerState | None,
        final: CustomerState,
        undo: Callable[[], Awaitable[None]],
        *,
        who: str,
        action: str,
        entity: EntityRef,
        now: str,
    ) -> CustomerState:
        """Save ``final`` (steps 4-7 of the theory of operation) with the outbox that takes
        ``old`` to it; ``undo`` reverses the Bandwidth steps if the save is refused."""
        changes = cascade.line_changes(old, final, now=now, who=who, action=action, entity=entity)
        outbox = Outbox(
            records=changes.records,
            deletions=changes.deletions,
            endpoint_deletions=cascade.released_endpoints(old, final),
            address_deletions=cascade.released_addresses(old, final),
            audit=changes.audit,
        )
        final = dataclasses.replace(
            final,
            version=(old.version if old is not None else 0) + 1,
            outbox=None if outbox.empty else outbox,
        )
        try:
            self._check_lease(customer_id)
        except ServiceError:
            await undo()
            raise
        try:
            await self._state.put(final)
        except NumberInUse as exc:
            await undo()
            raise ServiceError(409, "number_in_use", str(exc)) from exc
        except StateConflict as exc:
            # Another writer saved first (only when a lease was lost): what this change did
            # at Bandwidth belongs to no saved state, so it goes.
            await undo()
            raise ServiceError(409, "concurrent_change", f"{exc}; retry") from exc
        except StateError as exc:
            raise ServiceError(503, "state_unavailable", str(exc)) from exc
        _LOG.info(
            "%s %s by %s: %d line record(s) written, %d removed, %d endpoint(s) released",
            action,
            entity,
            who,
            len(outbox.records),
            len(outbox.deletions),
            len(outbox.endpoint_deletions),
            extra={"customer_id": customer_id, "who": who, "action": action},
        )
        return await self._flush(final)

    async def _provision(
        self, proposed: CustomerState | None, steps: Iterable[cascade.Step]
    ) -> tuple[dict[EntityRef, cascade.Outcome], Callable[[], Awaitable[None]]]:
        """Run the plan at Bandwidth; on failure undo what it did and raise ServiceError.

        Returns the outcomes and an ``undo`` for the caller to use if the save then turns
        out to be refused.
        """
        outcomes: dict[EntityRef, cascade.Outcome] = {}
        undo_actions: list[tuple[str, Callable[[], Awaitable[None]]]] = []

        async def undo() -> None:
            for what, action in reversed(undo_actions):
                try:
                    await action()
                except BandwidthError as exc:
                    _LOG.warning("could not undo %s at Bandwidth: %s", what, exc.description)

        for step in steps:
            if proposed is None or (entity := proposed.entity(step.ref)) is None:
                raise _internal(f"the plan names {step.ref}, which the change does not hold")
            try:
                outcome = await self._run_step(proposed, entity, step, undo_actions)
            except BandwidthError as exc:
                await undo()
                raise _bandwidth_error(exc, step.ref) from exc
            outcomes[step.ref] = outcome
        return outcomes, undo

    async def _run_step(
        self,
        state: CustomerState,
        entity: Entity,
        step: cascade.Step,
        undo_actions: list[tuple[str, Callable[[], Awaitable[None]]]],
    ) -> cascade.Outcome:
        if step.address_id is not None and entity.standardized is not None:
            standardized = entity.standardized
        else:
            standardized = await self._bw(
                "create_address",
                self._provider.create_address(step.address, description=str(step.ref)),
            )
            address_id = standardized.address_id

            async def drop_address() -> None:
                await self._provider.delete_address(address_id)

            undo_actions.append((f"address {address_id}", drop_address))
        if step.kind is cascade.StepKind.VALIDATE:
            return cascade.Outcome(standardized=standardized)
        if step.phone_number is None:
            raise _internal(f"the plan gives {step.ref} an endpoint without a number")
        endpoint_id = make_endpoint_id(step.ref.level.value, step.ref.endpoint_key)
        endpoint = await self._bw(
            "provision_endpoint",
            self._provider.provision_endpoint(
                endpoint_id=endpoint_id,
                phone_number=step.phone_number,
                name=self._endpoint_name(state, entity),
                address_id=standardized.address_id,
            ),
        )
        previous = step.endpoint
        if previous is None:

            async def drop_endpoint() -> None:
                await self._provider.delete_endpoint(endpoint_id)

            undo_actions.append((f"endpoint {endpoint_id}", drop_endpoint))
        else:
            name = self._endpoint_name(state, entity)

            async def restore_endpoint() -> None:
                await self._provider.provision_endpoint(
                    endpoint_id=previous.endpoint_id,
                    phone_number=previous.phone_number,
                    name=name,
                    address_id=previous.address_id,
                )

            # Runs before the new address is dropped (undo runs in reverse order).
            undo_actions.append((f"endpoint {endpoint_id}", restore_endpoint))
        return cascade.Outcome(
            standardized=standardized,
            endpoint=EndpointRef(
                endpoint_id=endpoint.id,
                provider_endpoint=endpoint.provider_endpoint,
                phone_number=step.phone_number,
                address_id=endpoint.address_id or standardized.address_id,
            ),
        )

    async def _flush(self, state: CustomerState) -> CustomerState:
        """Carry out ``state``'s outbox and save the state without it.

        Raises:
            ServiceError: a side effect failed; the outbox stays saved for the next try.
        """
        outbox = state.outbox
        if outbox is None:
            return state
        try:
            await self._lines.put_records(outbox.records, outbox.deletions)
        except StoreError as exc:
            raise ServiceError(
                503,
                "line_store_unavailable",
                f"the change is saved but the line records could not be written ({exc}); "
                "retry the request or run resync",
                retry_after=1.0,
            ) from exc
        await self._clean_up(outbox)
        if outbox.audit:
            try:
                await self._audit.append(outbox.audit)
            except AuditError as exc:
                raise ServiceError(
                    503,
                    "audit_unavailable",
                    f"the change is in effect but its audit entries could not be written "
                    f"({exc}); retry the request or run resync",
                    retry_after=1.0,
                ) from exc
        cleared = dataclasses.replace(state, version=state.version + 1, outbox=None)
        try:
            await self._state.put(cleared)
        except StateError as exc:
            # Everything took effect; the outbox is replayed (harmlessly, but the audit
            # entries twice) by the next change to this customer.
            _LOG.warning("could not clear the outbox of customer %s: %s", state.customer_id, exc)
            return state
        return cleared

    async def _clean_up(self, outbox: Outbox) -> None:
        for endpoint_id in outbox.endpoint_deletions:
            try:
                await self._bw("delete_endpoint", self._provider.delete_endpoint(endpoint_id))
            except BandwidthError as exc:
                error = _bandwidth_error(exc, None)
                raise ServiceError(
                    error.status,
                    error.code,
                    f"the change is in effect but endpoint {endpoint_id} could not be deleted "
                    f"at Bandwidth yet ({exc.description}); retry the request or run resync",
                    bandwidth=error.bandwidth,
                    retry_after=error.retry_after,
                ) from exc
        for address_id in outbox.address_deletions:
            try:
                await self._bw("delete_address", self._provider.delete_address(address_id))
            except BandwidthError as exc:
                # Addresses no endpoint uses cost nothing and harm nobody: best effort.
                _LOG.warning("could not delete address %s: %s", address_id, exc.description)

    # -- helpers ------------------------------------------------------------------------------

    async def _bw(self, operation: str, call: Awaitable[_T]) -> _T:
        try:
            result = await call
        except BandwidthError as exc:
            if self._metrics is not None:
                self._metrics.bandwidth_requests.labels(operation, type(exc).__name__).inc()
            raise
        if self._metrics is not None:
            self._metrics.bandwidth_requests.labels(operation, "ok").inc()
        return result

    async def _guard_state(self, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except StateError as exc:
            raise ServiceError(503, "state_unavailable", str(exc)) from exc

    async def _account_owner(self, number: str) -> str:
        owner = await self._guard_state(self._state.owner(number))
        if owner is None:
            raise _not_found(f"account {number} does not exist")
        return str(owner)

    @asynccontextmanager
    async def _locked(self, customer_id: str) -> AsyncIterator[None]:
        entry = self._locks.get(customer_id)
        if entry is None:
            entry = self._locks[customer_id] = _LockEntry(asyncio.Lock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[customer_id]

    @asynccontextmanager
    async def _holding(self, customer_id: str) -> AsyncIterator[None]:
        """The customer's lock in this process, then its lease in the state store."""
        async with self._locked(customer_id), contextlib.AsyncExitStack() as stack:
            try:
                held = await stack.enter_async_context(self._state.lease(customer_id))
            except CustomerBusy as exc:
                self._count_lease("busy", exc.waited)
                raise ServiceError(503, "customer_busy", str(exc), retry_after=1.0) from exc
            except StateError as exc:
                raise ServiceError(503, "state_unavailable", str(exc)) from exc
            self._count_lease("waited" if held.contended else "free", held.waited)
            self._held[customer_id] = held
            try:
                yield
            finally:
                del self._held[customer_id]
                if held.lost:
                    self._count_lease("lost", None)

    def _count_lease(self, outcome: str, waited: float | None) -> None:
        if self._metrics is None:
            return
        self._metrics.provisioning_leases.labels("customer", outcome).inc()
        if waited is not None and outcome != "free":
            self._metrics.provisioning_lease_wait.observe(waited)

    def _check_lease(self, customer_id: str) -> None:
        """Raise unless this process still holds the customer's lease: a change that lost
        it must not go on to Bandwidth or to its save."""
        held = self._held.get(customer_id)
        if held is not None and held.lost:
            raise ServiceError(
                503,
                "lease_lost",
                f"customer {customer_id}: this process lost its lease on the customer "
                "(stalled longer than its time to live); nothing was changed, retry",
                retry_after=1.0,
            )

    def _endpoint_name(self, state: CustomerState, entity: Entity) -> str:
        customer = state.customer.display_name
        if isinstance(entity, Customer):
            name = customer
        else:
            name = f"{customer} / {entity.display_name}"
        return name[: self._options.endpoint_name_max_length]

    def _apply_common(self, entity: _C, fields: CustomerFields | SiteFields, replace: bool) -> _C:
        name = _pick(fields.name, entity.name, "", replace)
        callback = _pick(fields.callback_number, entity.callback_number, None, replace)
        contacts = _pick(fields.contacts, entity.contacts, None, replace)
        new = dataclasses.replace(entity, name=name, callback_number=callback, contacts=contacts)
        address = _pick(fields.address, entity.address, None, replace)
        return cascade.with_address(new, address)

    def _apply_account(self, account: Account, fields: AccountFields, replace: bool) -> Account:
        new = dataclasses.replace(
            account,
            name=_pick(fields.name, account.name, "", replace),
            callback_number=_pick(fields.callback_number, account.callback_number, None, replace),
            site_id=_pick(fields.site_id, account.site_id, None, replace),
            contacts=_pick(fields.contacts, account.contacts, None, replace),
        )
        address = _pick(fields.address, account.address, None, replace)
        return cascade.with_address(new, address)

    def _check_common(self, callback: str | None | Unset) -> None:
        if isinstance(callback, str):
            _check(check_number, callback, what="callback_number")

    def _check_account_fields(self, fields: AccountFields) -> None:
        self._check_common(fields.callback_number)
        if isinstance(fields.customer_id, str):
            _check(check_entity_id, fields.customer_id, what="customer_id")
        if isinstance(fields.site_id, str):
            _check(check_entity_id, fields.site_id, what="site_id")


# --- module helpers -------------------------------------------------------------------------


async def _undo(actions: list[tuple[str, Callable[[], Awaitable[None]]]]) -> None:
    for what, action in reversed(actions):
        try:
            await action()
        except BandwidthError as exc:
            _LOG.warning("could not undo %s at Bandwidth: %s", what, exc.description)


def _because(error: ServiceError, ref: EntityRef) -> ServiceError:
    """``error`` as the reason a line that takes its location from ``ref`` failed too."""
    return ServiceError(
        error.status,
        error.code,
        f"{ref}: {error.message}",
        bandwidth=error.bandwidth,
        retry_after=error.retry_after,
        field=error.field,
    )


def _pick(value: Any, current: Any, default: Any, replace: bool) -> Any:
    if isinstance(value, Unset):
        return default if replace else current
    return value


def _check(check: Callable[..., str], value: str, *, what: str) -> None:
    try:
        check(value, what=what)
    except ModelError as exc:
        raise ServiceError(422, "invalid_request", str(exc), field=exc.field) from exc


def _internal(message: str) -> ServiceError:
    """A broken rule of the service's own: a 500 that names it (never stripped by -O)."""
    return ServiceError(500, "internal_error", message)


def _not_found(message: str) -> ServiceError:
    return ServiceError(404, "not_found", message)


def _raise_refusal(refusal: cascade.Refusal | None) -> None:
    if refusal is not None:
        raise ServiceError(refusal.status, refusal.code, refusal.message)


def _detail(exc: BandwidthError) -> BandwidthDetail:
    return BandwidthDetail(
        type=exc.type, code=exc.code, description=exc.description, field=exc.field
    )


def _bandwidth_error(exc: BandwidthError, ref: EntityRef | None) -> ServiceError:
    """The API answer a Bandwidth failure implies."""
    about = f" for {ref}" if ref is not None else ""
    detail = _detail(exc)
    if isinstance(exc, AddressRejected):
        return ServiceError(
            422,
            "address_rejected",
            f"Bandwidth rejected the address{about}: {exc.description}",
            bandwidth=detail,
            field="address",
        )
    if isinstance(exc, OrderFailed):
        return ServiceError(
            422,
            "endpoint_rejected",
            f"Bandwidth refused the emergency endpoint{about}: {exc.description}",
            bandwidth=detail,
        )
    if isinstance(exc, RateLimited):
        return ServiceError(
            503,
            "provider_rate_limited",
            f"Bandwidth is rate-limiting requests; nothing was changed, retry later "
            f"({exc.description})",
            bandwidth=detail,
            retry_after=exc.retry_after,
        )
    if isinstance(exc, ProviderUnavailable):
        return ServiceError(
            503,
            "provider_unavailable",
            f"Bandwidth is unavailable; nothing was changed, retry later ({exc.description})",
            bandwidth=detail,
        )
    if isinstance(exc, AuthenticationFailed):
        return ServiceError(
            502,
            "provider_authentication_failed",
            "Bandwidth refused this service's API credentials; nothing was changed "
            f"(an operator must fix the configuration: {exc.description})",
            bandwidth=detail,
        )
    return ServiceError(
        502,
        "provider_error",
        f"Bandwidth answered unexpectedly{about}; nothing was changed ({exc.description})",
        bandwidth=detail,
    )


__all__ = [
    "UNSET",
    "AccountFields",
    "BandwidthDetail",
    "Batch",
    "CustomerFields",
    "EmergencyProvider",
    "LineProblem",
    "ProvisioningService",
    "ResyncReport",
    "Saved",
    "ServiceError",
    "ServiceOptions",
    "SiteFields",
    "Unset",
]
