"""Coverage as a pure function of provisioning state, line records and open orders."""

from __future__ import annotations

import dataclasses

from e911_sip.metrics import COVERAGE_STATES
from e911_sip.provisioning.coverage import (
    LINE_STATES,
    Coverage,
    LineState,
    OrderAttempt,
    OrderStatus,
    compute,
    endpoint_id_of,
    summary,
)
from e911_sip.provisioning.model import (
    Account,
    Address,
    Customer,
    CustomerState,
    EndpointRef,
    EntityRef,
    Site,
    StandardizedAddress,
)
from e911_sip.store.base import LocationRecord

RALEIGH = Address(line1="900 Main Campus Drive", city="Raleigh", state="NC", postal_code="27606")
CARY = Address(line1="600 Chatham Street", city="Cary", state="NC", postal_code="27513")
DURHAM = Address(line1="1 Main Street", city="Durham", state="NC", postal_code="27701")


def std(address_id: str) -> StandardizedAddress:
    return StandardizedAddress(address_id=address_id, validation_status="VALID", one_line="X")


def ep(ref: EntityRef, phone: str) -> EndpointRef:
    eid = endpoint_id_of(ref)
    return EndpointRef(
        endpoint_id=eid, provider_endpoint=f"5555555/{eid}", phone_number=phone, address_id="a"
    )


def customer(cid: str, *, address: bool) -> Customer:
    ref = EntityRef.customer(cid)
    if not address:
        return Customer(customer_id=cid)
    return Customer(
        customer_id=cid, address=RALEIGH, standardized=std("a"), endpoint=ep(ref, "2025550100")
    )


def line(cid: str, number: str, *, site: str | None = None, own: bool = False) -> Account:
    account = Account(number=number, customer_id=cid, site_id=site)
    if own:
        account = dataclasses.replace(
            account,
            address=DURHAM,
            standardized=std("b"),
            endpoint=ep(EntityRef.account(cid, number), number),
        )
    return account


def state(cust: Customer, sites: list[Site], accounts: list[Account]) -> CustomerState:
    return CustomerState(
        customer=cust,
        sites={s.site_id: s for s in sites},
        accounts={a.number: a for a in accounts},
    )


def records_for(*states: CustomerState) -> dict[str, LocationRecord]:
    """The records provisioning would have written: what the cascade says."""
    from e911_sip.provisioning import cascade

    out: dict[str, LocationRecord] = {}
    for s in states:
        for number, record in cascade.desired_records(s, now="2026-01-01T00:00:00Z").items():
            if record is not None:
                out[number] = record
    return out


CARY_SITE = Site(
    customer_id="hd365",
    site_id="cary",
    address=CARY,
    standardized=std("c"),
    endpoint=ep(EntityRef.site("hd365", "cary"), "2025550101"),
)


def three_levels() -> CustomerState:
    return state(
        customer("hd365", address=True),
        [CARY_SITE],
        [
            line("hd365", "2025550001"),
            line("hd365", "2025550002", site="cary"),
            line("hd365", "2025550003", site="cary"),
            line("hd365", "2025550004", own=True),
        ],
    )


def test_metric_labels_are_the_line_states() -> None:
    assert tuple(s.value for s in LINE_STATES) == COVERAGE_STATES


def test_empty_state_is_fully_covered_with_no_lines() -> None:
    result = compute([], {})
    assert (result.lines, result.covered, result.share) == (0, 0, 1.0)
    assert set(result.by_state) == set(LINE_STATES)
    assert result.uncovered == result.pending == result.failed == ()
    view = result.to_dict(limit=10)
    assert view["uncovered"] == {"total": 0, "offset": 0, "limit": 10, "lines": []}


def test_lines_are_counted_at_the_level_their_location_comes_from() -> None:
    s = three_levels()
    result = compute([s], records_for(s))
    assert result.by_state[LineState.CUSTOMER] == 1
    assert result.by_state[LineState.SITE] == 2
    assert result.by_state[LineState.ACCOUNT] == 1
    assert (result.lines, result.covered, result.share) == (4, 4, 1.0)
    assert result.uncovered == ()
    assert result.to_dict(limit=5)["by_level"] == {"account": 1, "site": 2, "customer": 1}


def test_a_line_with_no_address_anywhere_is_uncovered_and_listed() -> None:
    covered = three_levels()
    bare = state(customer("acme", address=False), [], [line("acme", "3035550009")])
    result = compute([covered, bare], records_for(covered, bare))
    assert (result.lines, result.covered) == (5, 4)
    assert result.share == 0.8
    [u] = result.uncovered
    assert (u.line, u.customer_id, u.state, u.source) == (
        "3035550009",
        "acme",
        LineState.NO_ADDRESS,
        None,
    )
    assert result.by_state[LineState.NO_ADDRESS] == 1


def test_an_entity_with_an_address_but_no_endpoint_is_pending() -> None:
    site = Site(customer_id="hd365", site_id="dur", address=DURHAM)
    s = state(customer("hd365", address=True), [site], [line("hd365", "2025550007", site="dur")])
    result = compute([s], records_for(s))
    [u] = result.uncovered
    assert u.state is LineState.NOT_PROVISIONED
    assert u.source == EntityRef.site("hd365", "dur")
    [p] = result.pending
    assert (p.status, p.entity, p.lines, p.reason) == (
        OrderStatus.PENDING,
        EntityRef.site("hd365", "dur"),
        1,
        "not_provisioned",
    )
    assert p.phone_number == "2025550007"
    assert result.failed == ()


def test_covered_in_state_but_record_missing_or_malformed_is_not_covered() -> None:
    s = three_levels()
    records = records_for(s)
    # all_lines() skips a malformed record, so it arrives here exactly as a missing one.
    del records["2025550002"]
    result = compute([s], records)
    [u] = result.uncovered
    assert (u.line, u.state, u.record_endpoint) == ("2025550002", LineState.RECORD_MISSING, None)
    assert u.provider_endpoint == CARY_SITE.endpoint.provider_endpoint  # type: ignore[union-attr]
    assert result.by_state[LineState.SITE] == 1
    assert result.share == 0.75


def test_a_record_naming_another_endpoint_is_a_mismatch() -> None:
    s = three_levels()
    records = records_for(s)
    records["2025550004"] = LocationRecord("5555555/someotherendpoint")
    result = compute([s], records)
    [u] = result.uncovered
    assert (u.state, u.record_endpoint) == (
        LineState.RECORD_MISMATCH,
        "5555555/someotherendpoint",
    )


def test_records_no_account_holds_are_counted_as_orphans_not_lines() -> None:
    s = three_levels()
    records = records_for(s) | {"9995550000": LocationRecord("5555555/x")}
    result = compute([s], records)
    assert (result.lines, result.orphan_records) == (4, 1)


def test_failed_and_running_orders_are_listed_with_their_entity() -> None:
    bare = state(customer("acme", address=False), [], [line("acme", "3035550009")])
    covered = three_levels()
    failed_id = endpoint_id_of(EntityRef.account("acme", "3035550009"))
    running_id = endpoint_id_of(EntityRef.site("hd365", "cary"))
    attempts = [
        OrderAttempt(
            endpoint_id=failed_id,
            phone_number="3035550009",
            status=OrderStatus.FAILED,
            at="2026-01-01T00:00:00Z",
            error="order-failed: PSAP lookup failed",
            order_id="ord-1",
        ),
        OrderAttempt(
            endpoint_id=running_id,
            phone_number="2025550101",
            status=OrderStatus.PENDING,
            at="2026-01-01T00:00:01Z",
        ),
        # A refused creation leaves no entity: still listed, with none.
        OrderAttempt(
            endpoint_id="accogone",
            phone_number="4045550000",
            status=OrderStatus.FAILED,
            at="2026-01-01T00:00:02Z",
            error="order-failed: x",
        ),
    ]
    result = compute([bare, covered], records_for(bare, covered), attempts)
    # In endpoint id order.
    assert [(f.endpoint_id, f.entity) for f in result.failed] == sorted(
        [("accogone", None), (failed_id, EntityRef.account("acme", "3035550009"))],
        key=lambda pair: pair[0],
    )
    [mine] = [f for f in result.failed if f.endpoint_id == failed_id]
    assert (mine.order_id, mine.lines) == ("ord-1", 1)
    assert mine.reason == "order-failed: PSAP lookup failed"
    [running] = result.pending
    assert (running.entity, running.lines, running.reason) == (
        EntityRef.site("hd365", "cary"),
        2,
        "order_in_progress",
    )
    # The uncovered line says its own endpoint's order failed.
    [u] = result.uncovered
    assert (u.line, u.order) == ("3035550009", OrderStatus.FAILED)
    view = result.to_dict(limit=1)
    assert view["endpoints"]["failed_total"] == 2
    assert len(view["endpoints"]["failed"]) == 1


def test_the_uncovered_list_pages_but_counts_stay_exact() -> None:
    accounts = [line("acme", f"30355500{i:02d}") for i in range(25)]
    bare = state(customer("acme", address=False), [], accounts)
    result = compute([bare], {})
    assert isinstance(result, Coverage)
    first = result.to_dict(limit=10)
    third = result.to_dict(limit=10, offset=20)
    assert first["uncovered"]["total"] == third["uncovered"]["total"] == 25
    assert [u["line"] for u in first["uncovered"]["lines"]] == [
        f"30355500{i:02d}" for i in range(10)
    ]
    assert [u["line"] for u in third["uncovered"]["lines"]] == [
        f"30355500{i:02d}" for i in range(20, 25)
    ]
    assert first["share"] == 0.0
    assert first["uncovered_by_reason"]["no_address"] == 25


def test_the_summary_names_the_figures_and_the_uncovered_lines() -> None:
    bare = state(customer("acme", address=False), [], [line("acme", "3035550009")])
    covered = three_levels()
    records = records_for(bare, covered)
    records["2025550004"] = LocationRecord("5555555/elsewhere")
    view = compute([covered, bare], records).to_dict(limit=10) | {"alert_below": 0.99}
    text = summary(view)
    assert "Lines:            5" in text
    assert "With a location:  3 (60.00%)" in text
    assert "BELOW the alert threshold of 99.00%" in text
    assert "  3035550009  acme                 no_address" in text
    assert "record names 5555555/elsewhere" in text
    assert "2025550001" not in text
