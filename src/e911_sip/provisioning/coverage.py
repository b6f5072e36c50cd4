"""Location coverage: how many lines would reach the PSAP with a location, and why not.

A pure function of three inputs, so the API, the CLI (through the API) and the gauges agree:

- the provisioning state (every customer aggregate): which entity's address applies to each
  line (:func:`~e911_sip.provisioning.cascade.effective`) and whether it has an endpoint;
- the edge's line records (``e911:line:*``), which are what a 911 call actually carries;
- the endpoint orders this process has seen at Bandwidth that are still running or failed
  (:class:`OrderAttempt`; see :mod:`e911_sip.provisioning.coverage_monitor`).

A line is *covered* only when both sides agree: the state gives it an endpoint **and** its
line record exists, is valid and names that same endpoint. A line the state thinks covered
whose record is missing or malformed is ``record_missing`` (a malformed record is skipped by
the edge exactly like a missing one, so the two are one state); one whose record names
another endpoint is ``record_mismatch`` (the PSAP would get an address provisioning no
longer stands behind). Both are what ``resync`` repairs. A line with no endpoint in the
state is ``no_address`` or ``not_provisioned`` whatever its record says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from e911_sip.provisioning import cascade
from e911_sip.provisioning.bandwidth import make_endpoint_id
from e911_sip.provisioning.cascade import NoLocation
from e911_sip.provisioning.model import CustomerState, Entity, EntityRef, Level
from e911_sip.store.base import LocationRecord


class LineState(StrEnum):
    """Where one line stands; the label of ``e911_sip_coverage_lines``."""

    ACCOUNT = "account"
    """Covered by its own account's endpoint."""
    SITE = "site"
    """Covered by its site's endpoint."""
    CUSTOMER = "customer"
    """Covered by its customer's endpoint."""
    NO_ADDRESS = "no_address"
    """Neither the account, its site nor its customer has an address."""
    NOT_PROVISIONED = "not_provisioned"
    """The entity whose address applies has no endpoint at Bandwidth."""
    RECORD_MISSING = "record_missing"
    """The state has an endpoint, but the edge's record is missing or malformed."""
    RECORD_MISMATCH = "record_mismatch"
    """The state has an endpoint, but the edge's record names another one."""


COVERED_STATES = (LineState.ACCOUNT, LineState.SITE, LineState.CUSTOMER)
UNCOVERED_STATES = (
    LineState.NO_ADDRESS,
    LineState.NOT_PROVISIONED,
    LineState.RECORD_MISSING,
    LineState.RECORD_MISMATCH,
)
LINE_STATES = COVERED_STATES + UNCOVERED_STATES

_BY_LEVEL = {
    Level.ACCOUNT: LineState.ACCOUNT,
    Level.SITE: LineState.SITE,
    Level.CUSTOMER: LineState.CUSTOMER,
}
_BY_MISSING = {
    NoLocation.NO_ADDRESS: LineState.NO_ADDRESS,
    NoLocation.NOT_PROVISIONED: LineState.NOT_PROVISIONED,
}


class OrderStatus(StrEnum):
    """Where an endpoint's order at Bandwidth stands."""

    PENDING = "pending"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderAttempt:
    """An endpoint order seen at Bandwidth that is still running or that failed."""

    endpoint_id: str
    phone_number: str
    status: OrderStatus
    at: str
    """When it was sent (pending) or failed (ISO 8601, UTC)."""
    error: str = ""
    """Bandwidth's description of the failure; empty while pending."""
    order_id: str | None = None
    """Bandwidth's order id, for a support ticket, when the failure carried one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UncoveredLine:
    """One line a 911 call from which would reach the PSAP without a location."""

    line: str
    customer_id: str
    state: LineState
    source: EntityRef | None
    """The entity whose address applies, or None when no level has one."""
    provider_endpoint: str | None
    """The endpoint the state gives the line, or None."""
    record_endpoint: str | None
    """The endpoint the edge's record names, or None (missing or malformed)."""
    order: OrderStatus | None
    """A pending or failed order for one of the line's entities' endpoints, if any."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "customer_id": self.customer_id,
            "reason": self.state.value,
            "source": str(self.source) if self.source is not None else None,
            "provider_endpoint": self.provider_endpoint,
            "record_endpoint": self.record_endpoint,
            "order": self.order.value if self.order is not None else None,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointProblem:
    """An endpoint whose order at Bandwidth is pending or failed."""

    endpoint_id: str
    status: OrderStatus
    entity: EntityRef | None
    """The entity the endpoint is for, when the state still has it (a refused creation
    leaves none)."""
    phone_number: str
    lines: int
    """Lines whose location comes, or would come once it exists, from this endpoint."""
    reason: str
    """``order_in_progress``, ``not_provisioned`` (an entity with an address and lines but
    no endpoint) or Bandwidth's description of the failure."""
    order_id: str | None = None
    at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint_id": self.endpoint_id,
            "status": self.status.value,
            "entity": str(self.entity) if self.entity is not None else None,
            "phone_number": self.phone_number,
            "lines": self.lines,
            "reason": self.reason,
            "order_id": self.order_id,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Coverage:
    """The coverage figures at one moment."""

    by_state: Mapping[LineState, int]
    """Lines in each state; every state is present (0 when none)."""
    uncovered: tuple[UncoveredLine, ...]
    """Every line not covered, in number order."""
    pending: tuple[EndpointProblem, ...]
    failed: tuple[EndpointProblem, ...]
    orphan_records: int
    """Line records no account holds (left by a crash; ``resync`` prunes them)."""

    @property
    def lines(self) -> int:
        return sum(self.by_state.values())

    @property
    def covered(self) -> int:
        return sum(self.by_state[s] for s in COVERED_STATES)

    @property
    def share(self) -> float:
        """Covered lines over all lines; 1.0 with no lines (none lacks a location)."""
        return self.covered / self.lines if self.lines else 1.0

    def to_dict(self, *, limit: int, offset: int = 0) -> dict[str, Any]:
        """The API's view: every count exact, the lists cut to ``limit`` from ``offset``."""
        return {
            "lines": self.lines,
            "covered": self.covered,
            "share": self.share,
            "by_level": {s.value: self.by_state[s] for s in COVERED_STATES},
            "uncovered_by_reason": {s.value: self.by_state[s] for s in UNCOVERED_STATES},
            "uncovered": {
                "total": len(self.uncovered),
                "offset": offset,
                "limit": limit,
                "lines": [u.to_dict() for u in self.uncovered[offset : offset + limit]],
            },
            "endpoints": {
                "pending_total": len(self.pending),
                "failed_total": len(self.failed),
                "pending": [p.to_dict() for p in self.pending[:limit]],
                "failed": [p.to_dict() for p in self.failed[:limit]],
            },
            "orphan_records": self.orphan_records,
        }


def endpoint_id_of(ref: EntityRef) -> str:
    """The endpoint id the service gives ``ref``'s endpoint (stable, see make_endpoint_id)."""
    return make_endpoint_id(ref.level.value, ref.endpoint_key)


def compute(
    states: Iterable[CustomerState],
    records: Mapping[str, LocationRecord],
    attempts: Iterable[OrderAttempt] = (),
) -> Coverage:
    """The coverage of ``states`` against the edge's ``records`` and the open ``attempts``.

    Cost: one pass over the lines and one SHA-256 per entity that has a pending or failed
    order to match (none in the usual case).
    """
    states = list(states)
    by_customer = {s.customer_id: s for s in states}
    by_state = dict.fromkeys(LINE_STATES, 0)
    uncovered: list[UncoveredLine] = []
    open_orders = {a.endpoint_id: a for a in attempts}
    numbers: set[str] = set()
    # Entity → lines that use it, for the endpoint problems and the uncovered lines' orders.
    users: dict[EntityRef, int] = {}
    refs: dict[str, EntityRef] = {}
    if open_orders:
        for state in states:
            for entity in state.entities():
                refs[endpoint_id_of(entity.ref)] = entity.ref
    order_of = {refs[eid]: a.status for eid, a in open_orders.items() if eid in refs}
    missing_endpoint: dict[EntityRef, str] = {}
    for state in states:
        for number in sorted(state.accounts):
            numbers.add(number)
            account = state.accounts[number]
            eff = cascade.effective(state, account)
            if eff.source is not None:
                users[eff.source] = users.get(eff.source, 0) + 1
            record = records.get(number)
            record_endpoint = record.provider_endpoint if record is not None else None
            missing = eff.missing
            if missing is not None:
                line_state = _BY_MISSING[missing]
                if missing is NoLocation.NOT_PROVISIONED and eff.source is not None:
                    source = state.entity(eff.source)
                    if source is not None:
                        missing_endpoint[eff.source] = _phone(state, source)
            elif record_endpoint is None:
                line_state = LineState.RECORD_MISSING
            elif record_endpoint != eff.provider_endpoint:
                line_state = LineState.RECORD_MISMATCH
            elif eff.level is None:
                # An endpoint with no level is not one the cascade gave: not covered.
                line_state = LineState.NOT_PROVISIONED
            else:
                by_state[_BY_LEVEL[eff.level]] += 1
                continue
            by_state[line_state] += 1
            order = None
            if order_of:
                for candidate in _candidates(state, number):
                    order = order_of.get(candidate) or order
            uncovered.append(
                UncoveredLine(
                    line=number,
                    customer_id=state.customer_id,
                    state=line_state,
                    source=eff.source,
                    provider_endpoint=eff.provider_endpoint,
                    record_endpoint=record_endpoint,
                    order=order,
                )
            )
    pending: list[EndpointProblem] = []
    failed: list[EndpointProblem] = []
    for eid in sorted(open_orders):
        attempt = open_orders[eid]
        held_by = refs.get(eid)
        problem = EndpointProblem(
            endpoint_id=eid,
            status=attempt.status,
            entity=held_by,
            phone_number=attempt.phone_number,
            lines=_would_use(by_customer[held_by.customer_id], held_by) if held_by else 0,
            reason=attempt.error or "order_in_progress",
            order_id=attempt.order_id,
            at=attempt.at,
        )
        (failed if attempt.status is OrderStatus.FAILED else pending).append(problem)
    for lacking in sorted(missing_endpoint, key=str):
        eid = endpoint_id_of(lacking)
        if eid in open_orders:
            continue
        pending.append(
            EndpointProblem(
                endpoint_id=eid,
                status=OrderStatus.PENDING,
                entity=lacking,
                phone_number=missing_endpoint[lacking],
                lines=users.get(lacking, 0),
                reason="not_provisioned",
            )
        )
    uncovered.sort(key=lambda u: u.line)
    return Coverage(
        by_state=by_state,
        uncovered=tuple(uncovered),
        pending=tuple(pending),
        failed=tuple(failed),
        orphan_records=sum(1 for number in records if number not in numbers),
    )


def _candidates(state: CustomerState, number: str) -> list[EntityRef]:
    """The entities whose endpoint could serve ``number``, least specific first."""
    account = state.accounts[number]
    out = [state.customer.ref]
    if account.site_id is not None:
        out.append(EntityRef.site(state.customer_id, account.site_id))
    out.append(account.ref)
    return out


def _would_use(state: CustomerState, ref: EntityRef) -> int:
    """Lines whose location comes from ``ref`` once it has an address and an endpoint."""
    count = 0
    for account in state.accounts.values():
        if ref.level is Level.ACCOUNT:
            count += account.number == ref.key
        elif account.address is not None:
            continue
        elif ref.level is Level.SITE:
            count += account.site_id == ref.key
        else:
            site = state.sites.get(account.site_id) if account.site_id is not None else None
            count += site is None or site.address is None
    return count


def _phone(state: CustomerState, entity: Entity) -> str:
    return cascade.endpoint_number(state, entity) or ""


def summary(view: Mapping[str, Any]) -> str:
    """A readable summary of ``GET /v1/coverage``'s answer (what ``e911-sip coverage``
    prints)."""
    lines: int = view["lines"]
    share: float = view["share"]
    out = [
        f"Lines:            {lines}",
        f"With a location:  {view['covered']} ({share:.2%})",
    ]
    out += [f"  {level + ' level:':<16}{n}" for level, n in view["by_level"].items()]
    uncovered = view["uncovered"]
    out.append(f"Without one:      {uncovered['total']}")
    out += [f"  {reason + ':':<16}{n}" for reason, n in view["uncovered_by_reason"].items() if n]
    below = view.get("alert_below")
    if below is not None and share < below:
        out.append(f"BELOW the alert threshold of {below:.2%}")
    endpoints = view["endpoints"]
    out.append(
        f"Endpoints at Bandwidth: {endpoints['pending_total']} pending, "
        f"{endpoints['failed_total']} failed"
    )
    for problem in [*endpoints["failed"], *endpoints["pending"]]:
        out.append(
            f"  {problem['status']:<8}{problem['endpoint_id']}  "
            f"{problem['entity'] or '(no entity)'}  +1{problem['phone_number']}  "
            f"{problem['lines']} line(s)  {problem['reason']}"
            + (f"  order {problem['order_id']}" if problem.get("order_id") else "")
        )
    if view.get("orphan_records"):
        out.append(f"Line records no account holds: {view['orphan_records']} (resync prunes them)")
    shown = uncovered["lines"]
    if shown:
        first = uncovered["offset"] + 1
        out.append(
            f"Lines without a location ({first}-{first + len(shown) - 1} of {uncovered['total']}):"
        )
        for entry in shown:
            detail = [entry["source"] or ""]
            if entry["reason"] == LineState.RECORD_MISMATCH.value:
                detail.append(f"record names {entry['record_endpoint']}")
            if entry["order"]:
                detail.append(f"order {entry['order']}")
            row = f"  {entry['line']}  {entry['customer_id']:<20} {entry['reason']:<16} "
            out.append((row + "  ".join(d for d in detail if d)).rstrip())
    return "\n".join(out) + "\n"
