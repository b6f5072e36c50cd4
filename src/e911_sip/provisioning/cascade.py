"""The address cascade and the plan for a change, as pure functions (no I/O, no clock).

A line's effective location is its account's own address, else its site's, else its
customer's (seed 002: account → customer site → customer). Each entity that holds an address
gets at most one Bandwidth emergency endpoint, and a line's record points at the endpoint of
the entity its location comes from.

A change is worked out in four pure steps, with the service doing the I/O in between:

1. the service builds the *proposed* state (the request applied to the entities, addresses
   changed but not yet validated) and :func:`check` refuses what must not happen;
2. :func:`plan` says which endpoints must be created or re-pointed and which addresses
   validated, so that every line that uses an entity finds its endpoint there;
3. the service runs the plan against Bandwidth and :func:`settle` folds the outcomes in;
4. :func:`line_changes`, :func:`released_endpoints` and :func:`released_addresses` compare
   the old and the settled state: which line records change, which endpoints and Bandwidth
   addresses nothing uses any more, and the audit entries for every line whose effective
   location moved.

``resync`` is one more pure step: :func:`reconcile` compares every customer's state with
the line records the store holds (and, when listed, the endpoints Bandwidth holds) and
returns the writes, deletions and audit entries that make the records right, with what it
found wrong; the service only reads the inputs and carries the result out.

When an endpoint is needed (decisions the seed leaves open or implies):

- an account with its own address always has one (1.7);
- a customer with an address has one as soon as it has a number to carry: its
  ``callback_number``, else the lowest line that uses it (1.1). With neither, the address is
  only validated, and the endpoint follows when the first line arrives. A terminated line's
  number is not left on an endpoint (see :func:`endpoint_number`);
- a site gets one only when a line first uses it (1.3, 1.4: the seed validates a site's
  address when an account is assigned, not when the site is created);
- an endpoint, once created, lives as long as its entity has an address. Lines leaving it
  do not delete it (1.5, 1.7); deleting the entity or clearing its address does.

Changing the address of an entity that has an endpoint *re-points* that endpoint (same id,
new Bandwidth address) instead of creating another: the lines' records keep the same
Geolocation URL, so there is no moment in which a line points at a deleted endpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

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
    Site,
    StandardizedAddress,
)
from e911_sip.store.base import LocationRecord

E = TypeVar("E", Customer, Site, Account)


class NoLocation(StrEnum):
    """Why a line has no endpoint."""

    NO_ADDRESS = "no_address"
    """Neither the account, its site nor its customer has an address."""
    NOT_PROVISIONED = "not_provisioned"
    """The entity whose address applies has no endpoint at Bandwidth."""


@dataclass(frozen=True, slots=True)
class Effective:
    """Where a line's location comes from and what its record should point at."""

    source: EntityRef | None
    """The entity whose address applies, or None when no level has one."""
    provider_endpoint: str | None
    """That entity's ``{bw_account_id}/{endpoint_id}``, or None when it has no endpoint."""
    address: str
    """The standardised address on one line, or empty when none is validated."""

    @property
    def level(self) -> Level | None:
        return self.source.level if self.source is not None else None

    @property
    def missing(self) -> NoLocation | None:
        """Why the line has no endpoint, or None when it has one."""
        if self.source is None:
            return NoLocation.NO_ADDRESS
        if self.provider_endpoint is None:
            return NoLocation.NOT_PROVISIONED
        return None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A change the cascade will not make, with the HTTP status it implies."""

    status: int
    code: str
    message: str


class StepKind(StrEnum):
    """What one Bandwidth step does."""

    VALIDATE = "validate"
    """Create (validate) the address at Bandwidth; no endpoint is needed yet."""
    CREATE = "create"
    """Create the address if not yet validated, then create the entity's endpoint."""
    REPOINT = "repoint"
    """Create the address if it changed, then point the entity's existing endpoint at it
    (and give it the number it should carry, if that changed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One Bandwidth step of a plan."""

    kind: StepKind
    ref: EntityRef
    address: Address
    """The address as entered, to send to Bandwidth."""
    address_id: str | None = None
    """An address Bandwidth already validated for this entity, to reuse; None: create one."""
    phone_number: str | None = None
    """For CREATE and REPOINT: the 10-digit number the endpoint carries."""
    endpoint: EndpointRef | None = None
    """For REPOINT: the endpoint that exists."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The Bandwidth steps a change needs before it can be saved, in order."""

    steps: tuple[Step, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What Bandwidth returned for one step."""

    standardized: StandardizedAddress
    endpoint: EndpointRef | None = None
    """The endpoint after a CREATE or REPOINT; None after VALIDATE."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LineChanges:
    """The line-record writes and audit entries a change implies."""

    records: Mapping[str, LocationRecord]
    deletions: frozenset[str]
    audit: tuple[AuditEntry, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LineProblem:
    """A line that has no valid endpoint, and why."""

    line: str
    customer_id: str
    reason: str
    """``no_address``, ``not_provisioned`` or ``missing_at_provider``."""
    provider_endpoint: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "line": self.line,
            "customer_id": self.customer_id,
            "reason": self.reason,
            "provider_endpoint": self.provider_endpoint,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconciliation:
    """What makes the stored line records match the state (:func:`reconcile`)."""

    records: Mapping[str, LocationRecord]
    """Line records to write: missing, or saying something else than the state."""
    removals: frozenset[str]
    """Line records to delete: the line has no endpoint, or (pruning) no account holds it."""
    audit: tuple[AuditEntry, ...]
    """One ``resync`` entry per record written or deleted."""
    lines: int
    """Lines the states hold."""
    orphan_lines: tuple[str, ...]
    """Stored line records no account holds, in order."""
    without_endpoint: tuple[LineProblem, ...]
    """Lines with no valid endpoint (none at all, or one Bandwidth does not hold)."""
    orphan_endpoints: tuple[str, ...]
    """Endpoint ids Bandwidth holds that no entity references (empty when not listed)."""


# --- the cascade ------------------------------------------------------------------------


def effective_entity(state: CustomerState, account: Account) -> Entity | None:
    """The entity whose address applies to ``account``: its own, its site's, its customer's."""
    if account.address is not None:
        return account
    if account.site_id is not None:
        site = state.sites.get(account.site_id)
        if site is not None and site.address is not None:
            return site
    if state.customer.address is not None:
        return state.customer
    return None


def effective(state: CustomerState, account: Account) -> Effective:
    """The effective location of ``account`` in ``state``."""
    entity = effective_entity(state, account)
    if entity is None:
        return Effective(None, None, "")
    endpoint = entity.endpoint.provider_endpoint if entity.endpoint is not None else None
    address = entity.standardized.one_line if entity.standardized is not None else ""
    return Effective(entity.ref, endpoint, address)


def effective_contacts(state: CustomerState, account: Account) -> tuple[Level | None, Contacts]:
    """The Kari's Law contacts of ``account`` and the level they come from: its own, its
    site's, its customer's (the first level that has a list, even an empty one); none
    anywhere gives ``(None, Contacts())`` and the global ``[notify]`` fallback applies."""
    if account.contacts is not None:
        return Level.ACCOUNT, account.contacts
    if account.site_id is not None:
        site = state.sites.get(account.site_id)
        if site is not None and site.contacts is not None:
            return Level.SITE, site.contacts
    if state.customer.contacts is not None:
        return Level.CUSTOMER, state.customer.contacts
    return None, Contacts()


def users(state: CustomerState, ref: EntityRef) -> list[str]:
    """The lines whose effective location comes from ``ref``, in number order."""
    out = []
    for number in sorted(state.accounts):
        entity = effective_entity(state, state.accounts[number])
        if entity is not None and entity.ref == ref:
            out.append(number)
    return out


def desired_record(state: CustomerState, account: Account, *, now: str) -> LocationRecord | None:
    """The line record ``account`` should have, or None when it has no endpoint.

    ``callback`` is set only from the account's own ``callback_number`` and only when it
    differs from the line: the PSAP should call back the line that dialled, which is what
    the edge sends when the record has no callback.
    """
    endpoint = effective(state, account).provider_endpoint
    if endpoint is None:
        return None
    callback = account.callback_number
    if callback == account.number:
        callback = None
    return LocationRecord(endpoint, callback, now)


def desired_records(state: CustomerState, *, now: str) -> dict[str, LocationRecord | None]:
    """Every line of ``state`` with the record it should have (None: no record)."""
    return {
        number: desired_record(state, state.accounts[number], now=now)
        for number in sorted(state.accounts)
    }


def endpoint_number(state: CustomerState, entity: Entity) -> str | None:
    """The number an endpoint for ``entity`` carries at Bandwidth.

    An account's endpoint carries the account's number. A customer or site endpoint carries
    the entity's ``callback_number`` when set; else the lowest-numbered line that uses it
    (Bandwidth endpoints hold exactly one phone number). Once it carries a line, it keeps it
    while that line is still one of the customer's, even one that moved to another endpoint:
    renumbering deletes and recreates the endpoint at Bandwidth, so lines joining or moving
    do not renumber it. A terminated line's number is not kept: the endpoint then carries
    the lowest-numbered line still using it, else the customer's lowest-numbered line, else
    (the customer has no line left) the number it carries. None: no number to carry yet.
    """
    if isinstance(entity, Account):
        return entity.number
    if entity.callback_number:
        return entity.callback_number
    carried = entity.endpoint.phone_number if entity.endpoint is not None else None
    if carried is not None and carried in state.accounts:
        return carried
    lines = users(state, entity.ref) or sorted(state.accounts)
    return lines[0] if lines else carried


# --- edits --------------------------------------------------------------------------------


def with_address(entity: E, address: Address | None) -> E:
    """``entity`` with ``address``; a different address drops the old standardised form.

    The endpoint is kept: the plan re-points it (or, when the address is cleared,
    :func:`settle` drops it and the change releases it).
    """
    if address == entity.address:
        return entity
    return dataclasses.replace(entity, address=address, standardized=None)


def touch(old: E | None, new: E, *, now: str) -> E:
    """``new`` with ``created_at``/``updated_at`` set: unchanged entities keep theirs."""
    if old is None:
        return dataclasses.replace(new, created_at=now, updated_at=now)
    if dataclasses.replace(new, created_at=old.created_at, updated_at=old.updated_at) == old:
        return old
    return dataclasses.replace(new, created_at=old.created_at, updated_at=now)


# --- refusals -----------------------------------------------------------------------------


def check(proposed: CustomerState) -> Refusal | None:
    """Refuse a proposed state that breaks the model's rules."""
    for number in sorted(proposed.accounts):
        account = proposed.accounts[number]
        if account.site_id is not None and account.site_id not in proposed.sites:
            return Refusal(
                422,
                "unknown_site",
                f"customer {proposed.customer_id} has no site {account.site_id!r}",
            )
    return None


def refuse_site_removal(state: CustomerState, site_id: str) -> Refusal | None:
    """Refuse to delete a site that accounts are still assigned to.

    Deleting it would silently move those lines to another location; the safe answer is to
    make the customer move them first (the seed's 1.5 moves the account, then deletes).
    """
    assigned = sorted(n for n, a in state.accounts.items() if a.site_id == site_id)
    if not assigned:
        return None
    shown = ", ".join(assigned[:5]) + (" ..." if len(assigned) > 5 else "")
    return Refusal(
        409,
        "site_in_use",
        f"site {site_id!r} still has {len(assigned)} account(s) assigned ({shown}); "
        "unassign or move them first",
    )


def refuse_customer_removal(state: CustomerState) -> Refusal | None:
    """Refuse to delete a customer that still has sites or accounts."""
    if state.accounts or state.sites:
        return Refusal(
            409,
            "customer_in_use",
            f"customer {state.customer_id} still has {len(state.accounts)} account(s) and "
            f"{len(state.sites)} site(s); terminate and delete them first",
        )
    return None


# --- the plan -----------------------------------------------------------------------------


def needs_endpoint(state: CustomerState, entity: Entity) -> bool:
    """True when ``entity`` (which has an address) must have an endpoint in ``state``."""
    if isinstance(entity, Account):
        # An account with an address is its own line; skipping the scan of every line keeps
        # planning a customer with thousands of lines linear.
        return True
    if entity.endpoint is not None or users(state, entity.ref):
        return True
    return isinstance(entity, Customer) and entity.callback_number is not None


def plan(proposed: CustomerState) -> Plan:
    """The Bandwidth steps that make ``proposed`` consistent.

    Every entity that is needed (see :func:`needs_endpoint`) and has no endpoint gets one;
    every endpoint whose entity's address (or ``callback_number``) changed is re-pointed (the
    client recreates an endpoint whose number changes: the API cannot renumber one); a
    customer or account
    address that needs no endpoint yet is still validated, so a bad address is refused when
    it is entered. A site address that no line uses is stored as entered (the seed checks
    it when an account is assigned).
    """
    steps: list[Step] = []
    for entity in proposed.entities():
        address = entity.address
        if address is None:
            continue
        reuse = entity.standardized.address_id if entity.standardized is not None else None
        if needs_endpoint(proposed, entity):
            number = endpoint_number(proposed, entity)
            if entity.endpoint is None:
                kind = StepKind.CREATE
            elif reuse is None or number != entity.endpoint.phone_number:
                kind = StepKind.REPOINT
            else:
                continue
            steps.append(
                Step(
                    kind=kind,
                    ref=entity.ref,
                    address=address,
                    address_id=reuse,
                    phone_number=number,
                    endpoint=entity.endpoint,
                )
            )
        elif reuse is None and not isinstance(entity, Site):
            steps.append(Step(kind=StepKind.VALIDATE, ref=entity.ref, address=address))
    return Plan(steps=tuple(steps))


def settle(proposed: CustomerState, outcomes: Mapping[EntityRef, Outcome]) -> CustomerState:
    """``proposed`` with Bandwidth's outcomes folded in and cleared addresses' endpoints gone."""

    def fold(entity: E) -> E:
        if entity.address is None:
            if entity.standardized is None and entity.endpoint is None:
                return entity
            return dataclasses.replace(entity, standardized=None, endpoint=None)
        outcome = outcomes.get(entity.ref)
        if outcome is None:
            return entity
        return dataclasses.replace(
            entity,
            standardized=outcome.standardized,
            endpoint=outcome.endpoint if outcome.endpoint is not None else entity.endpoint,
        )

    return dataclasses.replace(
        proposed,
        customer=fold(proposed.customer),
        sites={k: fold(v) for k, v in proposed.sites.items()},
        accounts={k: fold(v) for k, v in proposed.accounts.items()},
    )


def _endpoints(state: CustomerState | None) -> set[str]:
    if state is None:
        return set()
    return {e.endpoint.endpoint_id for e in state.entities() if e.endpoint is not None}


def _address_ids(state: CustomerState | None) -> set[str]:
    if state is None:
        return set()
    ids: set[str] = set()
    for entity in state.entities():
        if entity.standardized is not None:
            ids.add(entity.standardized.address_id)
        if entity.endpoint is not None:
            ids.add(entity.endpoint.address_id)
    return ids


def released_endpoints(old: CustomerState | None, new: CustomerState | None) -> tuple[str, ...]:
    """Endpoint ids ``old`` has and ``new`` no longer uses: to delete at Bandwidth."""
    return tuple(sorted(_endpoints(old) - _endpoints(new)))


def released_addresses(old: CustomerState | None, new: CustomerState | None) -> tuple[str, ...]:
    """Bandwidth address ids ``old`` references and ``new`` does not: to delete there."""
    return tuple(sorted(_address_ids(old) - _address_ids(new)))


# --- line records and audit ---------------------------------------------------------------


def line_changes(
    old: CustomerState | None,
    new: CustomerState | None,
    *,
    now: str,
    who: str,
    action: str,
    entity: EntityRef,
) -> LineChanges:
    """Records to write, records to delete and audit entries when ``old`` becomes ``new``.

    A record is written only when what it says changes (endpoint or callback). An audit
    entry is made whenever a line's effective location changes: a new endpoint, or the same
    endpoint re-pointed at a different address, or the line gaining or losing a location.
    """
    records: dict[str, LocationRecord] = {}
    deletions: set[str] = set()
    audit: list[AuditEntry] = []
    numbers: set[str] = set()
    for state in (old, new):
        if state is not None:
            numbers.update(state.accounts)
    for number in sorted(numbers):
        before = _line_view(old, number, now)
        after = _line_view(new, number, now)
        old_record, old_eff = before
        new_record, new_eff = after
        if new_record is None:
            if old_record is not None or new is None or number not in new.accounts:
                deletions.add(number)
        elif old_record is None or _content(old_record) != _content(new_record):
            records[number] = new_record
        old_key = (old_eff.provider_endpoint, old_eff.address)
        new_key = (new_eff.provider_endpoint, new_eff.address)
        if old_key != new_key:
            audit.append(
                AuditEntry(
                    at=now,
                    who=who,
                    action=action,
                    entity=str(entity),
                    line=number,
                    old_provider_endpoint=old_eff.provider_endpoint,
                    new_provider_endpoint=new_eff.provider_endpoint,
                    source=str(new_eff.source) if new_eff.provider_endpoint else None,
                    address=new_eff.address if new_eff.provider_endpoint else "",
                )
            )
    return LineChanges(records=records, deletions=frozenset(deletions), audit=tuple(audit))


def _line_view(
    state: CustomerState | None, number: str, now: str
) -> tuple[LocationRecord | None, Effective]:
    if state is None or number not in state.accounts:
        return None, Effective(None, None, "")
    account = state.accounts[number]
    eff = effective(state, account)
    if eff.provider_endpoint is None:
        # A line without an endpoint has no location as far as the edge is concerned.
        eff = Effective(eff.source, None, "")
    return desired_record(state, account, now=now), eff


def _content(record: LocationRecord) -> tuple[str, str | None]:
    return record.provider_endpoint, record.callback


def unprovisioned(state: CustomerState) -> list[tuple[str, NoLocation]]:
    """Lines of ``state`` with no endpoint, and why."""
    out = []
    for number in sorted(state.accounts):
        missing = effective(state, state.accounts[number]).missing
        if missing is not None:
            out.append((number, missing))
    return out


def referenced_endpoints(states: Iterable[CustomerState]) -> dict[str, EntityRef]:
    """Every endpoint id the states hold, with the entity that holds it."""
    out: dict[str, EntityRef] = {}
    for state in states:
        for entity in state.entities():
            if entity.endpoint is not None:
                out[entity.endpoint.endpoint_id] = entity.ref
    return out


# --- resync -------------------------------------------------------------------------------


def reconcile(
    states: Sequence[CustomerState],
    stored: Mapping[str, LocationRecord],
    provider_ids: Set[str] | None,
    *,
    now: str,
    who: str,
    prune_orphan_lines: bool,
) -> Reconciliation:
    """The writes and deletions that bring the line records ``stored`` in line with ``states``.

    A record that already says the right thing (endpoint and callback) is left alone. A
    stored record no account holds is reported, and deleted when ``prune_orphan_lines``.
    ``provider_ids`` are the endpoint ids Bandwidth listed, or None when it was not asked:
    then no line is reported missing there and no endpoint as orphaned.
    """
    records: dict[str, LocationRecord] = {}
    removals: set[str] = set()
    problems: list[LineProblem] = []
    audit: list[AuditEntry] = []
    owned: set[str] = set()
    for state in states:
        for number, want in desired_records(state, now=now).items():
            owned.add(number)
            have = stored.get(number)
            eff = effective(state, state.accounts[number])
            missing = eff.missing
            if missing is not None:
                problems.append(
                    LineProblem(line=number, customer_id=state.customer_id, reason=missing.value)
                )
            elif provider_ids is not None and want is not None:
                endpoint_id = want.provider_endpoint.split("/", 1)[1]
                if endpoint_id not in provider_ids:
                    problems.append(
                        LineProblem(
                            line=number,
                            customer_id=state.customer_id,
                            reason="missing_at_provider",
                            provider_endpoint=want.provider_endpoint,
                        )
                    )
            if want is None:
                if have is None:
                    continue
                removals.add(number)
            elif have is None or _content(have) != _content(want):
                records[number] = want
            else:
                continue
            audit.append(
                AuditEntry(
                    at=now,
                    who=who,
                    action="resync",
                    entity=str(state.accounts[number].ref),
                    line=number,
                    old_provider_endpoint=have.provider_endpoint if have else None,
                    new_provider_endpoint=want.provider_endpoint if want else None,
                    source=str(eff.source) if want is not None else None,
                    address=eff.address if want is not None else "",
                )
            )
    orphan_lines = sorted(set(stored) - owned)
    if prune_orphan_lines:
        for number in orphan_lines:
            removals.add(number)
            audit.append(
                AuditEntry(
                    at=now,
                    who=who,
                    action="resync",
                    entity=f"line:{number}",
                    line=number,
                    old_provider_endpoint=stored[number].provider_endpoint,
                    new_provider_endpoint=None,
                    source=None,
                    address="",
                )
            )
    orphan_endpoints: tuple[str, ...] = ()
    if provider_ids is not None:
        orphan_endpoints = tuple(sorted(set(provider_ids) - set(referenced_endpoints(states))))
    return Reconciliation(
        records=records,
        removals=frozenset(removals),
        audit=tuple(audit),
        lines=len(owned),
        orphan_lines=tuple(orphan_lines),
        without_endpoint=tuple(problems),
        orphan_endpoints=orphan_endpoints,
    )
