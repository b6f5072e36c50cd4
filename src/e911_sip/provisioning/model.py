"""The provisioning entities (customer, site, account) and the shape they are stored in.

A customer is stored as one aggregate (:class:`CustomerState`): the customer, its sites and
its accounts, a version for optimistic concurrency, and an *outbox*. Every change touches
exactly one customer, so one aggregate written in one atomic step is the unit of
consistency; the outbox holds the side effects of the last change (line records, endpoint
deletions, audit entries) until they are known to have happened, so a crash half-way is
finished by the next change to that customer or by ``resync``.

Everything here is a frozen value with ``to_dict``/``from_dict``; the JSON form is what the
file and Redis state backends store, and ``from_dict`` refuses anything malformed with
:class:`ModelError` rather than letting a corrupt document reach the cascade.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from e911_sip.store.base import LocationRecord, StoreError

SCHEMA_VERSION = 1
"""Version of the stored JSON document; bumped on incompatible changes."""

_ENTITY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NUMBER = re.compile(r"\d{10}")
_COUNTRY = re.compile(r"[A-Z]{2}")

MAX_LINE2 = 60
"""Bandwidth's limit on address line 2, in characters."""
MAX_FIELD = 100
"""Upper bound on any other address field, to keep junk out of Bandwidth requests."""


class ModelError(ValueError):
    """A value breaks the model's rules; the message names the field and the rule."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Level(StrEnum):
    """Where in the cascade a location comes from (high → low: account, site, customer)."""

    ACCOUNT = "account"
    SITE = "site"
    CUSTOMER = "customer"


def check_entity_id(value: str, *, what: str) -> str:
    """Return ``value`` if it is a valid customer or site id, else raise ModelError."""
    if not _ENTITY_ID.fullmatch(value):
        raise ModelError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field=what,
        )
    return value


def check_number(value: str, *, what: str = "number") -> str:
    """Return ``value`` if it is a 10-digit NANP number, else raise ModelError."""
    if not _NUMBER.fullmatch(value):
        raise ModelError(f"{what} {value!r} must be a 10-digit NANP number", field=what)
    return value


@dataclass(frozen=True, slots=True)
class EntityRef:
    """Names one entity: ``customer:helpdesk365``, ``site:helpdesk365/cary``, ``account:...``."""

    level: Level
    customer_id: str
    key: str
    """customer id, site id or 10-digit number, depending on ``level``."""

    @classmethod
    def customer(cls, customer_id: str) -> EntityRef:
        return cls(Level.CUSTOMER, customer_id, customer_id)

    @classmethod
    def site(cls, customer_id: str, site_id: str) -> EntityRef:
        return cls(Level.SITE, customer_id, site_id)

    @classmethod
    def account(cls, customer_id: str, number: str) -> EntityRef:
        return cls(Level.ACCOUNT, customer_id, number)

    @property
    def entity_id(self) -> str:
        """Unique across the product within its level (sites are qualified by customer)."""
        if self.level is Level.SITE:
            return f"{self.customer_id}/{self.key}"
        return self.key

    @property
    def endpoint_key(self) -> str:
        """What the entity's endpoint id is derived from.

        Accounts are qualified by customer too, so a number that moves to another customer
        (terminated, then created there) never reuses, and a racing claim never touches,
        the other customer's endpoint.
        """
        if self.level is Level.CUSTOMER:
            return self.customer_id
        return f"{self.customer_id}/{self.key}"

    def __str__(self) -> str:
        return f"{self.level.value}:{self.entity_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    """A civic address as the customer entered it (before Bandwidth standardises it).

    The one type for it on our side: the API parses it, the cascade carries it and the
    Bandwidth client sends it (mapping it to Bandwidth's field names there).
    """

    line1: str
    """House number and street, e.g. ``900 Main Campus Drive``."""
    line2: str = ""
    """Unit, suite, floor (at most 60 characters), or empty."""
    city: str
    """City name."""
    state: str
    """Two-letter state code."""
    postal_code: str
    """ZIP or ZIP+4."""
    country: str = "US"
    """ISO 3166 two-letter country code."""

    def to_dict(self) -> dict[str, str]:
        """The JSON form (API and storage)."""
        return {
            "line1": self.line1,
            "line2": self.line2,
            "city": self.city,
            "state": self.state,
            "postal_code": self.postal_code,
            "country": self.country,
        }

    @classmethod
    def from_dict(cls, data: object, *, default_country: str = "US") -> Address:
        """Parse and check the shape of an address object.

        Only the shape is checked here (required fields present, lengths, a two-letter
        country); whether the place exists is Bandwidth's call.

        Raises:
            ModelError: naming the first bad field.
        """
        if not isinstance(data, Mapping):
            raise ModelError("address must be an object", field="address")
        allowed = {"line1", "line2", "city", "state", "postal_code", "country"}
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise ModelError(
                f"address has unknown field(s) {', '.join(unknown)}; "
                f"expected {', '.join(sorted(allowed))}",
                field=f"address.{unknown[0]}",
            )
        values: dict[str, str] = {}
        for name in allowed:
            raw = data.get(name)
            if raw is None:
                raw = ""
            if not isinstance(raw, str):
                raise ModelError(f"address.{name} must be a string", field=f"address.{name}")
            values[name] = " ".join(raw.split())
        for name in ("line1", "city", "state", "postal_code"):
            if not values[name]:
                raise ModelError(f"address.{name} is required", field=f"address.{name}")
        for name, value in values.items():
            limit = MAX_LINE2 if name == "line2" else MAX_FIELD
            if len(value) > limit:
                raise ModelError(
                    f"address.{name} is longer than {limit} characters", field=f"address.{name}"
                )
        country = (values["country"] or default_country).upper()
        if not _COUNTRY.fullmatch(country):
            raise ModelError(
                "address.country must be a two-letter code such as US", field="address.country"
            )
        return cls(
            line1=values["line1"],
            line2=values["line2"],
            city=values["city"],
            state=values["state"],
            postal_code=values["postal_code"],
            country=country,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StandardizedAddress:
    """The address as Bandwidth validated and standardised it (upper-case USPS form).

    The one type for it on our side: the Bandwidth client builds it from the wire form,
    the cascade and the API read it, the state backends store it.
    """

    address_id: str
    """Bandwidth's id of the address object."""
    validation_status: str
    """Bandwidth's ``validationStatus`` (``VALID`` once accepted)."""
    one_line: str
    """``900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US``."""
    house_number: str = ""
    """``900``."""
    predirectional: str = ""
    """``N``, ``SW``, ... or empty."""
    street_name: str = ""
    """``MAIN CAMPUS``."""
    street_suffix: str = ""
    """``DR``, or empty."""
    postdirectional: str = ""
    """Directional after the suffix, or empty."""
    address_line2: str = ""
    """``STE 500``, or empty."""
    city: str = ""
    """``RALEIGH``."""
    state: str = ""
    """``NC``."""
    postal_code: str = ""
    """``27606-5177``."""
    country: str = "US"
    """``US``."""

    @property
    def street_line(self) -> str:
        """House number and street: ``900 MAIN CAMPUS DR``."""
        parts = (
            self.house_number,
            self.predirectional,
            self.street_name,
            self.street_suffix,
            self.postdirectional,
        )
        return " ".join(p for p in parts if p)

    def to_dict(self) -> dict[str, str]:
        """The JSON form (API and storage)."""
        return {
            "address_id": self.address_id,
            "validation_status": self.validation_status,
            "one_line": self.one_line,
            "house_number": self.house_number,
            "predirectional": self.predirectional,
            "street_name": self.street_name,
            "street_suffix": self.street_suffix,
            "postdirectional": self.postdirectional,
            "address_line2": self.address_line2,
            "city": self.city,
            "state": self.state,
            "postal_code": self.postal_code,
            "country": self.country,
        }

    @classmethod
    def from_dict(cls, data: object) -> StandardizedAddress:
        """Parse the stored form. Raises ModelError."""
        d = _strings(data, "standardized")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ModelError(f"standardized address: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointRef:
    """The Bandwidth emergency endpoint that carries an entity's address."""

    endpoint_id: str
    """The id we chose for the endpoint (stable per entity)."""
    provider_endpoint: str
    """``{bw_account_id}/{endpoint_id}``: what line records point at."""
    phone_number: str
    """The 10-digit number the endpoint carries at Bandwidth."""
    address_id: str
    """Bandwidth address the endpoint currently points at."""

    def to_dict(self) -> dict[str, str]:
        """The JSON form (storage)."""
        return {
            "endpoint_id": self.endpoint_id,
            "provider_endpoint": self.provider_endpoint,
            "phone_number": self.phone_number,
            "address_id": self.address_id,
        }

    @classmethod
    def from_dict(cls, data: object) -> EndpointRef:
        """Parse the stored form. Raises ModelError."""
        d = _strings(data, "endpoint")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ModelError(f"endpoint: {exc}") from exc


_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_PHONE = re.compile(r"\+?\d{10,15}")
MAX_CONTACTS = 20
"""Targets per kind at one level (a front desk and security, not a mailing list)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Contacts:
    """Who is told of an emergency call (Kari's Law, 47 CFR 9.16): a level's own list.

    A level with contacts (even empty lists) overrides the levels below it, as an address
    does: account → site → customer.
    """

    emails: tuple[str, ...] = ()
    """Email addresses."""
    sms: tuple[str, ...] = ()
    """Phone numbers for text messages, 10 digits or E.164."""
    webhooks: tuple[str, ...] = ()
    """HTTP(S) URLs that receive a signed JSON POST."""

    def to_dict(self) -> dict[str, list[str]]:
        """The stored and API form."""
        return {"emails": list(self.emails), "sms": list(self.sms), "webhooks": list(self.webhooks)}

    @classmethod
    def from_dict(cls, data: object) -> Contacts:
        """Parse and check. Raises ModelError naming the field at fault."""
        d = _object(data, "contacts")
        unknown = sorted(set(d) - {"emails", "sms", "webhooks"})
        if unknown:
            raise ModelError(
                f"contacts.{unknown[0]}: unknown field", field=f"contacts.{unknown[0]}"
            )
        out: dict[str, tuple[str, ...]] = {}
        for name, pattern in (
            ("emails", _EMAIL),
            ("sms", _PHONE),
            ("webhooks", re.compile(r"https?://\S+")),
        ):
            items = d.get(name) or []
            where = f"contacts.{name}"
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise ModelError(f"{where} must be a list of strings", field=where)
            if len(items) > MAX_CONTACTS:
                raise ModelError(f"{where}: at most {MAX_CONTACTS} entries", field=where)
            for item in items:
                if len(item) > 2048 or not pattern.fullmatch(item):
                    raise ModelError(f"{where}: {item!r} is not valid", field=where)
            out[name] = tuple(dict.fromkeys(items))
        return cls(**out)


def _contacts_from(d: Mapping[str, Any]) -> Contacts | None:
    raw = d.get("contacts")
    return Contacts.from_dict(raw) if raw is not None else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Customer:
    """A (sub)customer: the lowest level of the cascade."""

    customer_id: str
    name: str = ""
    callback_number: str | None = None
    """Number the customer-level endpoint carries; else its lowest line that uses it."""
    address: Address | None = None
    standardized: StandardizedAddress | None = None
    endpoint: EndpointRef | None = None
    created_at: str = ""
    updated_at: str = ""
    contacts: Contacts | None = None
    """Kari's Law notification targets; None: inherit from the level below."""

    @property
    def ref(self) -> EntityRef:
        return EntityRef.customer(self.customer_id)

    @property
    def display_name(self) -> str:
        return self.name or self.customer_id

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON form."""
        return {
            "customer_id": self.customer_id,
            "name": self.name,
            "callback_number": self.callback_number,
            **_location_dict(self.address, self.standardized, self.endpoint),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            **({"contacts": self.contacts.to_dict()} if self.contacts is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: object) -> Customer:
        """Parse the stored form. Raises ModelError."""
        d = _object(data, "customer")
        address, standardized, endpoint = _location_from(d)
        return cls(
            customer_id=check_entity_id(_str(d, "customer_id"), what="customer_id"),
            name=_str(d, "name", ""),
            callback_number=_opt_number(d, "callback_number"),
            address=address,
            standardized=standardized,
            endpoint=endpoint,
            created_at=_str(d, "created_at", ""),
            updated_at=_str(d, "updated_at", ""),
            contacts=_contacts_from(d),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Site:
    """A customer site (office): the middle level of the cascade."""

    customer_id: str
    site_id: str
    name: str = ""
    callback_number: str | None = None
    """Number the site-level endpoint carries; else its lowest line that uses it."""
    address: Address | None = None
    standardized: StandardizedAddress | None = None
    endpoint: EndpointRef | None = None
    created_at: str = ""
    updated_at: str = ""
    contacts: Contacts | None = None
    """Kari's Law notification targets; None: inherit from the level below."""

    @property
    def ref(self) -> EntityRef:
        return EntityRef.site(self.customer_id, self.site_id)

    @property
    def display_name(self) -> str:
        return self.name or self.site_id

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON form."""
        return {
            "customer_id": self.customer_id,
            "site_id": self.site_id,
            "name": self.name,
            "callback_number": self.callback_number,
            **_location_dict(self.address, self.standardized, self.endpoint),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            **({"contacts": self.contacts.to_dict()} if self.contacts is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: object) -> Site:
        """Parse the stored form. Raises ModelError."""
        d = _object(data, "site")
        address, standardized, endpoint = _location_from(d)
        return cls(
            customer_id=check_entity_id(_str(d, "customer_id"), what="customer_id"),
            site_id=check_entity_id(_str(d, "site_id"), what="site_id"),
            name=_str(d, "name", ""),
            callback_number=_opt_number(d, "callback_number"),
            address=address,
            standardized=standardized,
            endpoint=endpoint,
            created_at=_str(d, "created_at", ""),
            updated_at=_str(d, "updated_at", ""),
            contacts=_contacts_from(d),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """A line (account), keyed by its 10-digit number: the highest level of the cascade."""

    number: str
    customer_id: str
    site_id: str | None = None
    name: str = ""
    callback_number: str | None = None
    """Callback to put on the line's record when it differs from the line (rare)."""
    address: Address | None = None
    standardized: StandardizedAddress | None = None
    endpoint: EndpointRef | None = None
    created_at: str = ""
    updated_at: str = ""
    contacts: Contacts | None = None
    """Kari's Law notification targets; None: inherit from the level below."""

    @property
    def ref(self) -> EntityRef:
        return EntityRef.account(self.customer_id, self.number)

    @property
    def display_name(self) -> str:
        return f"{self.number} {self.name}" if self.name else self.number

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON form."""
        return {
            "number": self.number,
            "customer_id": self.customer_id,
            "site_id": self.site_id,
            "name": self.name,
            "callback_number": self.callback_number,
            **_location_dict(self.address, self.standardized, self.endpoint),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            **({"contacts": self.contacts.to_dict()} if self.contacts is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: object) -> Account:
        """Parse the stored form. Raises ModelError."""
        d = _object(data, "account")
        address, standardized, endpoint = _location_from(d)
        site_id = d.get("site_id")
        if site_id is not None:
            if not isinstance(site_id, str):
                raise ModelError("account.site_id must be a string or null")
            check_entity_id(site_id, what="site_id")
        return cls(
            number=check_number(_str(d, "number")),
            customer_id=check_entity_id(_str(d, "customer_id"), what="customer_id"),
            site_id=site_id,
            name=_str(d, "name", ""),
            callback_number=_opt_number(d, "callback_number"),
            address=address,
            standardized=standardized,
            endpoint=endpoint,
            created_at=_str(d, "created_at", ""),
            updated_at=_str(d, "updated_at", ""),
            contacts=_contacts_from(d),
        )


Entity = Customer | Site | Account
"""Any entity that can hold an address and an endpoint."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One change of a line's effective location (the RAY BAUM's Act trail)."""

    at: str
    """When, ISO 8601 UTC."""
    who: str
    """The API token's name (or ``resync``)."""
    action: str
    """The operation, e.g. ``put_customer``, ``patch_account``, ``terminate_account``."""
    entity: str
    """The entity the operation acted on, e.g. ``site:helpdesk365/cary``."""
    line: str
    """The 10-digit line whose effective location changed."""
    old_provider_endpoint: str | None
    new_provider_endpoint: str | None
    source: str | None
    """The entity the line's new location comes from, or None when it has none."""
    address: str
    """The new effective address on one line (standardised), or empty when none."""

    def to_dict(self) -> dict[str, str | None]:
        """The JSON form (API, JSON-lines file, outbox)."""
        return {
            "at": self.at,
            "who": self.who,
            "action": self.action,
            "entity": self.entity,
            "line": self.line,
            "old_provider_endpoint": self.old_provider_endpoint,
            "new_provider_endpoint": self.new_provider_endpoint,
            "source": self.source,
            "address": self.address,
        }

    @classmethod
    def from_dict(cls, data: object) -> AuditEntry:
        """Parse the stored form. Raises ModelError."""
        d = _object(data, "audit entry")

        def opt(name: str) -> str | None:
            value = d.get(name)
            if value is None or value == "":
                return None
            if not isinstance(value, str):
                raise ModelError(f"audit entry {name} must be a string")
            return value

        return cls(
            at=_str(d, "at"),
            who=_str(d, "who"),
            action=_str(d, "action"),
            entity=_str(d, "entity"),
            line=_str(d, "line"),
            old_provider_endpoint=opt("old_provider_endpoint"),
            new_provider_endpoint=opt("new_provider_endpoint"),
            source=opt("source"),
            address=_str(d, "address", ""),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Outbox:
    """Side effects of a change that was saved but is not yet known to be done."""

    records: Mapping[str, LocationRecord] = field(default_factory=dict)
    """Line records to write (whole hashes)."""
    deletions: frozenset[str] = frozenset()
    """Line records to delete."""
    endpoint_deletions: tuple[str, ...] = ()
    """Bandwidth endpoint ids no entity uses any more; deleted after the lines moved off."""
    address_deletions: tuple[str, ...] = ()
    """Bandwidth address ids no endpoint points at any more (best effort)."""
    audit: tuple[AuditEntry, ...] = ()
    """Audit entries, appended after the line records are written."""

    @property
    def empty(self) -> bool:
        return not (
            self.records
            or self.deletions
            or self.endpoint_deletions
            or self.address_deletions
            or self.audit
        )

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON form."""
        return {
            "records": {line: rec.to_fields() for line, rec in sorted(self.records.items())},
            "deletions": sorted(self.deletions),
            "endpoint_deletions": list(self.endpoint_deletions),
            "address_deletions": list(self.address_deletions),
            "audit": [entry.to_dict() for entry in self.audit],
        }

    @classmethod
    def from_dict(cls, data: object) -> Outbox:
        """Parse the stored form. Raises ModelError."""
        d = _object(data, "outbox")
        raw_records = d.get("records") or {}
        if not isinstance(raw_records, Mapping):
            raise ModelError("outbox.records must be an object")
        records: dict[str, LocationRecord] = {}
        for line, fields in raw_records.items():
            try:
                records[check_number(str(line))] = LocationRecord.from_fields(
                    _strings(fields, "outbox record")
                )
            except StoreError as exc:
                raise ModelError(f"outbox record {line}: {exc}") from exc
        audit = d.get("audit") or []
        if not isinstance(audit, list):
            raise ModelError("outbox.audit must be a list")
        return cls(
            records=records,
            deletions=frozenset(_str_list(d, "deletions")),
            endpoint_deletions=tuple(_str_list(d, "endpoint_deletions")),
            address_deletions=tuple(_str_list(d, "address_deletions")),
            audit=tuple(AuditEntry.from_dict(item) for item in audit),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerState:
    """One customer with its sites and accounts: the unit that is locked and stored."""

    customer: Customer
    sites: Mapping[str, Site] = field(default_factory=dict)
    accounts: Mapping[str, Account] = field(default_factory=dict)
    version: int = 0
    """Incremented on every save; a save that does not follow the stored version fails."""
    outbox: Outbox | None = None

    @property
    def customer_id(self) -> str:
        return self.customer.customer_id

    def entity(self, ref: EntityRef) -> Entity | None:
        """The entity ``ref`` names, or None when this state has none by that name."""
        if ref.customer_id != self.customer_id:
            return None
        if ref.level is Level.CUSTOMER:
            return self.customer
        if ref.level is Level.SITE:
            return self.sites.get(ref.key)
        return self.accounts.get(ref.key)

    def entities(self) -> list[Entity]:
        """Customer, then sites, then accounts, each group in key order."""
        out: list[Entity] = [self.customer]
        out += [self.sites[k] for k in sorted(self.sites)]
        out += [self.accounts[k] for k in sorted(self.accounts)]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON document."""
        return {
            "schema": SCHEMA_VERSION,
            "version": self.version,
            "customer": self.customer.to_dict(),
            "sites": {k: self.sites[k].to_dict() for k in sorted(self.sites)},
            "accounts": {k: self.accounts[k].to_dict() for k in sorted(self.accounts)},
            "outbox": self.outbox.to_dict() if self.outbox is not None else None,
        }

    @classmethod
    def from_dict(cls, data: object) -> CustomerState:
        """Parse a stored document and check its internal consistency.

        Raises:
            ModelError: malformed, from a newer schema, or inconsistent (an account on a
                site that does not exist, an entity filed under another customer).
        """
        d = _object(data, "customer state")
        schema = d.get("schema")
        if schema != SCHEMA_VERSION:
            raise ModelError(f"customer state schema {schema!r} is not {SCHEMA_VERSION}")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ModelError("customer state version must be a non-negative integer")
        customer = Customer.from_dict(d.get("customer"))
        raw_sites = _object(d.get("sites") or {}, "sites")
        raw_accounts = _object(d.get("accounts") or {}, "accounts")
        sites = {str(k): Site.from_dict(v) for k, v in raw_sites.items()}
        accounts = {str(k): Account.from_dict(v) for k, v in raw_accounts.items()}
        for key, site in sites.items():
            if site.site_id != key or site.customer_id != customer.customer_id:
                raise ModelError(f"site {key!r} is filed under the wrong key or customer")
        for key, account in accounts.items():
            if account.number != key or account.customer_id != customer.customer_id:
                raise ModelError(f"account {key!r} is filed under the wrong key or customer")
            if account.site_id is not None and account.site_id not in sites:
                raise ModelError(f"account {key} is on unknown site {account.site_id!r}")
        raw_outbox = d.get("outbox")
        return cls(
            customer=customer,
            sites=sites,
            accounts=accounts,
            version=version,
            outbox=Outbox.from_dict(raw_outbox) if raw_outbox is not None else None,
        )


def _location_dict(
    address: Address | None, standardized: StandardizedAddress | None, endpoint: EndpointRef | None
) -> dict[str, Any]:
    return {
        "address": address.to_dict() if address is not None else None,
        "standardized": standardized.to_dict() if standardized is not None else None,
        "endpoint": endpoint.to_dict() if endpoint is not None else None,
    }


def _location_from(
    d: Mapping[str, Any],
) -> tuple[Address | None, StandardizedAddress | None, EndpointRef | None]:
    raw_address = d.get("address")
    raw_std = d.get("standardized")
    raw_endpoint = d.get("endpoint")
    return (
        Address.from_dict(raw_address) if raw_address is not None else None,
        StandardizedAddress.from_dict(raw_std) if raw_std is not None else None,
        EndpointRef.from_dict(raw_endpoint) if raw_endpoint is not None else None,
    )


def _object(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ModelError(f"{what} must be an object")
    return data


def _strings(data: object, what: str) -> dict[str, str]:
    d = _object(data, what)
    out: dict[str, str] = {}
    for k, v in d.items():
        if not isinstance(v, str):
            raise ModelError(f"{what}.{k} must be a string")
        out[str(k)] = v
    return out


def _str(d: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = d.get(name, default)
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise ModelError(f"{name} must be a string")
    return value


def _opt_number(d: Mapping[str, Any], name: str) -> str | None:
    value = d.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ModelError(f"{name} must be a string or null")
    return check_number(value, what=name)


def _str_list(d: Mapping[str, Any], name: str) -> list[str]:
    value = d.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelError(f"{name} must be a list of strings")
    return list(value)
