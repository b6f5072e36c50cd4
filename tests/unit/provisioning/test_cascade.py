"""The address cascade, the change plan and the stored model, as pure functions."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip.provisioning import cascade
from e911_sip.provisioning.cascade import NoLocation, StepKind
from e911_sip.provisioning.model import (
    Account,
    Address,
    AuditEntry,
    Customer,
    CustomerState,
    EndpointRef,
    EntityRef,
    Level,
    ModelError,
    Outbox,
    Site,
    StandardizedAddress,
)
from e911_sip.store.base import LocationRecord

NOW = "2025-01-02T03:04:05Z"
LATER = "2025-01-02T04:00:00Z"
RALEIGH = Address(
    line1="900 Main Campus Drive",
    line2="Suite 500",
    city="Raleigh",
    state="NC",
    postal_code="27606",
)
CARY = Address(line1="600 Chatham Street", city="Cary", state="NC", postal_code="27513")
DURHAM = Address(line1="1 Main Street", city="Durham", state="NC", postal_code="27701")


def std(
    address_id: str, text: str = "900 MAIN CAMPUS DR, RALEIGH, NC 27606, US"
) -> StandardizedAddress:
    return StandardizedAddress(address_id=address_id, validation_status="VALID", one_line=text)


def ep(endpoint_id: str, phone: str, address_id: str) -> EndpointRef:
    return EndpointRef(
        endpoint_id=endpoint_id,
        provider_endpoint=f"5555555/{endpoint_id}",
        phone_number=phone,
        address_id=address_id,
    )


def make(
    customer: Customer | None = None,
    sites: Sequence[Site] = (),
    accounts: Sequence[Account] = (),
) -> CustomerState:
    return CustomerState(
        customer=customer or Customer(customer_id="hd365"),
        sites={s.site_id: s for s in sites},
        accounts={a.number: a for a in accounts},
    )


PROVISIONED_CUSTOMER = Customer(
    customer_id="hd365",
    name="Helpdesk 365",
    address=RALEIGH,
    standardized=std("a-cust"),
    endpoint=ep("custep0000", "1321551234", "a-cust"),
)
CARY_SITE = Site(customer_id="hd365", site_id="cary", name="CarryOffice", address=CARY)
PROVISIONED_SITE = dataclasses.replace(
    CARY_SITE,
    standardized=std("a-site", "600 CHATHAM ST, CARY, NC 27513, US"),
    endpoint=ep("siteep0000", "1321551234", "a-site"),
)


# --- the cascade ------------------------------------------------------------------------------


def test_account_address_wins_over_site_and_customer() -> None:
    own = Account(
        number="1321551234",
        customer_id="hd365",
        site_id="cary",
        address=DURHAM,
        standardized=std("a-acct", "1 MAIN ST, DURHAM, NC 27701, US"),
        endpoint=ep("acctep0000", "1321551234", "a-acct"),
    )
    state = make(PROVISIONED_CUSTOMER, [PROVISIONED_SITE], [own])
    eff = cascade.effective(state, own)
    assert eff.level is Level.ACCOUNT
    assert eff.provider_endpoint == "5555555/acctep0000"
    assert eff.address == "1 MAIN ST, DURHAM, NC 27701, US"


def test_site_address_wins_over_customer() -> None:
    account = Account(number="1321551234", customer_id="hd365", site_id="cary")
    state = make(PROVISIONED_CUSTOMER, [PROVISIONED_SITE], [account])
    eff = cascade.effective(state, account)
    assert eff.source == EntityRef.site("hd365", "cary")
    assert eff.provider_endpoint == "5555555/siteep0000"


def test_site_without_address_falls_through_to_customer() -> None:
    bare = Site(customer_id="hd365", site_id="cary")
    account = Account(number="1321551234", customer_id="hd365", site_id="cary")
    state = make(PROVISIONED_CUSTOMER, [bare], [account])
    assert cascade.effective(state, account).source == EntityRef.customer("hd365")


def test_no_address_anywhere_means_no_location() -> None:
    account = Account(number="1321551234", customer_id="hd365")
    eff = cascade.effective(make(accounts=[account]), account)
    assert eff.source is None and eff.provider_endpoint is None
    assert eff.missing is NoLocation.NO_ADDRESS


def test_address_without_endpoint_is_not_provisioned() -> None:
    account = Account(number="1321551234", customer_id="hd365", site_id="cary")
    state = make(PROVISIONED_CUSTOMER, [CARY_SITE], [account])
    eff = cascade.effective(state, account)
    assert eff.level is Level.SITE
    assert eff.missing is NoLocation.NOT_PROVISIONED
    assert cascade.unprovisioned(state) == [("1321551234", NoLocation.NOT_PROVISIONED)]


def test_users_lists_the_lines_of_an_entity_in_number_order() -> None:
    accounts = [
        Account(number="3000000000", customer_id="hd365"),
        Account(number="1000000000", customer_id="hd365"),
        Account(number="2000000000", customer_id="hd365", site_id="cary"),
    ]
    state = make(PROVISIONED_CUSTOMER, [PROVISIONED_SITE], accounts)
    assert cascade.users(state, EntityRef.customer("hd365")) == ["1000000000", "3000000000"]
    assert cascade.users(state, EntityRef.site("hd365", "cary")) == ["2000000000"]


def test_record_points_at_the_effective_endpoint_and_callback_only_when_different() -> None:
    plain = Account(number="1321551234", customer_id="hd365", callback_number="1321551234")
    other = Account(number="1321551235", customer_id="hd365", callback_number="9195550000")
    state = make(PROVISIONED_CUSTOMER, accounts=[plain, other])
    assert cascade.desired_record(state, plain, now=NOW) == LocationRecord(
        "5555555/custep0000", None, NOW
    )
    assert cascade.desired_record(state, other, now=NOW) == LocationRecord(
        "5555555/custep0000", "9195550000", NOW
    )


def test_no_record_without_endpoint() -> None:
    account = Account(number="1321551234", customer_id="hd365")
    assert cascade.desired_record(make(accounts=[account]), account, now=NOW) is None


def test_endpoint_number_rules() -> None:
    lines = [
        Account(number="1321551239", customer_id="hd365"),
        Account(number="1321551234", customer_id="hd365"),
    ]
    customer = Customer(customer_id="hd365", address=RALEIGH)
    state = make(customer, accounts=lines)
    assert cascade.endpoint_number(state, customer) == "1321551234"  # lowest line using it
    with_callback = dataclasses.replace(customer, callback_number="9195550100")
    assert cascade.endpoint_number(state, with_callback) == "9195550100"
    carried = dataclasses.replace(customer, endpoint=ep("custep0000", "1321551239", "a"))
    assert cascade.endpoint_number(state, carried) == "1321551239"  # not renumbered
    assert cascade.endpoint_number(state, lines[0]) == "1321551239"  # an account: its own
    assert cascade.endpoint_number(make(customer), customer) is None


def test_a_terminated_line_is_not_left_on_a_shared_endpoint() -> None:
    site = Site(customer_id="hd365", site_id="cary", address=CARY, standardized=std("a-site"))
    site = dataclasses.replace(site, endpoint=ep("siteep0000", "3215550001", "a-site"))
    on_site = [
        Account(number=n, customer_id="hd365", site_id="cary")
        for n in ("3215550001", "3215550007", "3215550003")
    ]
    elsewhere = Account(number="3215550002", customer_id="hd365")
    state = make(sites=[site], accounts=[*on_site, elsewhere])
    assert cascade.endpoint_number(state, site) == "3215550001"  # carried while it is a line
    terminated = make(sites=[site], accounts=[*on_site[1:], elsewhere])
    # the lowest-numbered line still using the endpoint, not the customer's lowest line
    assert cascade.endpoint_number(terminated, site) == "3215550003"
    (step,) = cascade.plan(terminated).steps
    assert (step.kind, step.ref, step.phone_number) == (
        StepKind.REPOINT,
        site.ref,
        "3215550003",
    )
    assert step.address_id == "a-site"  # the same address: only the number changes
    # nobody uses it any more: the customer's lowest line, else the number it carries
    unused = make(sites=[site], accounts=[elsewhere])
    assert cascade.endpoint_number(unused, site) == "3215550002"
    assert cascade.endpoint_number(make(sites=[site]), site) == "3215550001"
    # a line that only moved elsewhere is still the customer's: no renumbering
    moved = dataclasses.replace(on_site[0], site_id=None)
    assert cascade.endpoint_number(make(sites=[site], accounts=[moved, *on_site[1:]]), site) == (
        "3215550001"
    )


# --- edits ------------------------------------------------------------------------------------


def test_with_address_keeps_standardised_form_when_unchanged() -> None:
    assert cascade.with_address(PROVISIONED_CUSTOMER, RALEIGH) is PROVISIONED_CUSTOMER


def test_with_address_drops_standardised_form_but_keeps_endpoint_on_change() -> None:
    moved = cascade.with_address(PROVISIONED_CUSTOMER, CARY)
    assert moved.address == CARY
    assert moved.standardized is None
    assert moved.endpoint == PROVISIONED_CUSTOMER.endpoint


def test_touch_sets_timestamps_only_on_change() -> None:
    new = cascade.touch(None, Customer(customer_id="x"), now=NOW)
    assert (new.created_at, new.updated_at) == (NOW, NOW)
    assert cascade.touch(new, dataclasses.replace(new), now=LATER) is new
    changed = cascade.touch(new, dataclasses.replace(new, name="X"), now=LATER)
    assert (changed.created_at, changed.updated_at) == (NOW, LATER)


# --- refusals ---------------------------------------------------------------------------------


def test_account_on_unknown_site_is_refused() -> None:
    state = make(accounts=[Account(number="1321551234", customer_id="hd365", site_id="nope")])
    refusal = cascade.check(state)
    assert refusal is not None and (refusal.status, refusal.code) == (422, "unknown_site")


def test_site_with_accounts_cannot_be_removed() -> None:
    account = Account(number="1321551234", customer_id="hd365", site_id="cary")
    state = make(PROVISIONED_CUSTOMER, [PROVISIONED_SITE], [account])
    refusal = cascade.refuse_site_removal(state, "cary")
    assert refusal is not None
    assert (refusal.status, refusal.code) == (409, "site_in_use")
    assert "1321551234" in refusal.message
    assert cascade.refuse_site_removal(make(sites=[CARY_SITE]), "cary") is None


def test_customer_with_sites_or_accounts_cannot_be_removed() -> None:
    refusal = cascade.refuse_customer_removal(make(sites=[CARY_SITE]))
    assert refusal is not None and refusal.status == 409
    assert cascade.refuse_customer_removal(make()) is None


# --- the plan ---------------------------------------------------------------------------------


def test_customer_address_with_a_line_creates_the_customer_endpoint() -> None:
    customer = Customer(customer_id="hd365", address=RALEIGH)
    lines = [
        Account(number="1321551239", customer_id="hd365"),
        Account(number="1321551234", customer_id="hd365"),
    ]
    (step,) = cascade.plan(make(customer, accounts=lines)).steps
    assert step.kind is StepKind.CREATE
    assert step.ref == EntityRef.customer("hd365")
    assert step.phone_number == "1321551234"
    assert step.address == RALEIGH and step.address_id is None


def test_customer_address_without_any_number_is_only_validated() -> None:
    (step,) = cascade.plan(make(Customer(customer_id="hd365", address=RALEIGH))).steps
    assert step.kind is StepKind.VALIDATE


def test_customer_callback_number_is_enough_for_an_endpoint() -> None:
    customer = Customer(customer_id="hd365", address=RALEIGH, callback_number="9195550100")
    (step,) = cascade.plan(make(customer)).steps
    assert (step.kind, step.phone_number) == (StepKind.CREATE, "9195550100")


def test_validated_customer_address_is_reused_when_the_first_line_arrives() -> None:
    customer = Customer(customer_id="hd365", address=RALEIGH, standardized=std("a-cust"))
    assert cascade.plan(make(customer)).steps == ()
    line = Account(number="1321551234", customer_id="hd365")
    (step,) = cascade.plan(make(customer, accounts=[line])).steps
    assert (step.kind, step.address_id) == (StepKind.CREATE, "a-cust")


def test_site_address_nobody_uses_is_not_validated() -> None:
    assert cascade.plan(make(PROVISIONED_CUSTOMER, [CARY_SITE])).steps == ()


def test_assigning_an_account_creates_the_site_endpoint_with_its_number() -> None:
    account = Account(number="1321551234", customer_id="hd365", site_id="cary")
    (step,) = cascade.plan(make(PROVISIONED_CUSTOMER, [CARY_SITE], [account])).steps
    assert step.kind is StepKind.CREATE
    assert step.ref == EntityRef.site("hd365", "cary")
    assert step.phone_number == "1321551234"


def test_address_change_repoints_the_existing_endpoint() -> None:
    moved = cascade.with_address(PROVISIONED_CUSTOMER, DURHAM)
    line = Account(number="1321551234", customer_id="hd365")
    (step,) = cascade.plan(make(moved, accounts=[line])).steps
    assert step.kind is StepKind.REPOINT
    assert step.endpoint == PROVISIONED_CUSTOMER.endpoint
    assert step.address == DURHAM and step.address_id is None
    assert step.phone_number == "1321551234"


def test_callback_change_repoints_with_the_same_address_and_the_new_number() -> None:
    renumbered = dataclasses.replace(PROVISIONED_CUSTOMER, callback_number="9195550100")
    (step,) = cascade.plan(make(renumbered)).steps
    assert step.kind is StepKind.REPOINT
    assert (step.address_id, step.phone_number) == ("a-cust", "9195550100")


def test_unused_endpoint_is_kept_and_nothing_is_planned() -> None:
    # 1.5 / 1.7: lines leaving an endpoint do not delete it.
    own = Account(
        number="1321551234",
        customer_id="hd365",
        address=CARY,
        standardized=std("a-acct"),
        endpoint=ep("acctep0000", "1321551234", "a-acct"),
    )
    state = make(PROVISIONED_CUSTOMER, [PROVISIONED_SITE], [own])
    assert cascade.plan(state).steps == ()


def test_own_account_address_creates_an_account_endpoint() -> None:
    own = Account(number="1321551234", customer_id="hd365", address=CARY)
    (step,) = cascade.plan(make(PROVISIONED_CUSTOMER, accounts=[own])).steps
    assert (step.kind, step.ref.level, step.phone_number) == (
        StepKind.CREATE,
        Level.ACCOUNT,
        "1321551234",
    )


# --- settling and releasing -------------------------------------------------------------------


def test_settle_folds_outcomes_and_drops_endpoints_of_cleared_addresses() -> None:
    account = Account(number="1321551234", customer_id="hd365", site_id="cary")
    cleared = dataclasses.replace(PROVISIONED_CUSTOMER, address=None)
    proposed = make(cleared, [CARY_SITE], [account])
    outcome = cascade.Outcome(
        standardized=std("a-new", "600 CHATHAM ST, CARY, NC 27513, US"),
        endpoint=ep("siteep0000", "1321551234", "a-new"),
    )
    final = cascade.settle(proposed, {EntityRef.site("hd365", "cary"): outcome})
    assert final.customer.endpoint is None and final.customer.standardized is None
    assert final.sites["cary"].endpoint == outcome.endpoint
    assert final.sites["cary"].standardized == outcome.standardized
    old = make(PROVISIONED_CUSTOMER, [CARY_SITE], [account])
    assert cascade.released_endpoints(old, final) == ("custep0000",)
    assert cascade.released_addresses(old, final) == ("a-cust",)


def test_removed_entities_release_their_endpoint_and_address() -> None:
    old = make(PROVISIONED_CUSTOMER, [PROVISIONED_SITE])
    new = make(PROVISIONED_CUSTOMER)
    assert cascade.released_endpoints(old, new) == ("siteep0000",)
    assert cascade.released_addresses(old, new) == ("a-site",)
    assert cascade.released_endpoints(old, None) == ("custep0000", "siteep0000")


def test_repointed_endpoint_releases_only_the_old_address() -> None:
    old = make(PROVISIONED_CUSTOMER)
    new = make(
        dataclasses.replace(
            PROVISIONED_CUSTOMER,
            standardized=std("a-new"),
            endpoint=ep("custep0000", "1321551234", "a-new"),
        )
    )
    assert cascade.released_endpoints(old, new) == ()
    assert cascade.released_addresses(old, new) == ("a-cust",)


# --- line changes and audit -------------------------------------------------------------------


def _changes(old: CustomerState | None, new: CustomerState | None) -> cascade.LineChanges:
    return cascade.line_changes(
        old, new, now=NOW, who="portal", action="test", entity=EntityRef.customer("hd365")
    )


def test_moving_a_line_to_a_site_writes_its_record_and_audits_it() -> None:
    line = Account(number="1321551234", customer_id="hd365")
    other = Account(number="1321551235", customer_id="hd365")
    old = make(PROVISIONED_CUSTOMER, [PROVISIONED_SITE], [line, other])
    new = make(
        PROVISIONED_CUSTOMER,
        [PROVISIONED_SITE],
        [dataclasses.replace(line, site_id="cary"), other],
    )
    changes = _changes(old, new)
    assert changes.records == {"1321551234": LocationRecord("5555555/siteep0000", None, NOW)}
    assert changes.deletions == frozenset()
    (entry,) = changes.audit
    assert entry == AuditEntry(
        at=NOW,
        who="portal",
        action="test",
        entity="customer:hd365",
        line="1321551234",
        old_provider_endpoint="5555555/custep0000",
        new_provider_endpoint="5555555/siteep0000",
        source="site:hd365/cary",
        address="600 CHATHAM ST, CARY, NC 27513, US",
    )


def test_repointing_keeps_records_but_audits_every_user() -> None:
    lines = [Account(number=n, customer_id="hd365") for n in ("1321551234", "1321551235")]
    old = make(PROVISIONED_CUSTOMER, accounts=lines)
    moved = dataclasses.replace(
        PROVISIONED_CUSTOMER,
        address=DURHAM,
        standardized=std("a-new", "1 MAIN ST, DURHAM, NC 27701, US"),
        endpoint=ep("custep0000", "1321551234", "a-new"),
    )
    changes = _changes(old, make(moved, accounts=lines))
    assert changes.records == {} and changes.deletions == frozenset()
    assert [
        (e.line, e.old_provider_endpoint, e.new_provider_endpoint, e.address) for e in changes.audit
    ] == [
        (
            "1321551234",
            "5555555/custep0000",
            "5555555/custep0000",
            "1 MAIN ST, DURHAM, NC 27701, US",
        ),
        (
            "1321551235",
            "5555555/custep0000",
            "5555555/custep0000",
            "1 MAIN ST, DURHAM, NC 27701, US",
        ),
    ]


def test_termination_deletes_the_record_and_audits_it() -> None:
    line = Account(number="1321551234", customer_id="hd365")
    changes = _changes(make(PROVISIONED_CUSTOMER, accounts=[line]), make(PROVISIONED_CUSTOMER))
    assert changes.records == {}
    assert changes.deletions == frozenset({"1321551234"})
    (entry,) = changes.audit
    assert (entry.old_provider_endpoint, entry.new_provider_endpoint, entry.source) == (
        "5555555/custep0000",
        None,
        None,
    )
    assert entry.address == ""


def test_callback_change_rewrites_the_record_without_an_audit_entry() -> None:
    line = Account(number="1321551234", customer_id="hd365")
    old = make(PROVISIONED_CUSTOMER, accounts=[line])
    new = make(
        PROVISIONED_CUSTOMER, accounts=[dataclasses.replace(line, callback_number="9195550100")]
    )
    changes = _changes(old, new)
    assert changes.records["1321551234"].callback == "9195550100"
    assert changes.audit == ()


def test_nothing_changes_nothing_is_written() -> None:
    state = make(PROVISIONED_CUSTOMER, accounts=[Account(number="1321551234", customer_id="hd365")])
    changes = _changes(state, state)
    assert (changes.records, changes.deletions, changes.audit) == ({}, frozenset(), ())


def test_referenced_endpoints_names_the_holder() -> None:
    state = make(PROVISIONED_CUSTOMER, [PROVISIONED_SITE])
    assert cascade.referenced_endpoints([state]) == {
        "custep0000": EntityRef.customer("hd365"),
        "siteep0000": EntityRef.site("hd365", "cary"),
    }


# --- property: applying line_changes to the old records gives the new desired records ---------

_numbers = st.sampled_from(["1000000001", "1000000002", "1000000003", "1000000004"])
_addresses = st.sampled_from([RALEIGH, CARY, DURHAM])


@st.composite
def _entity_location(draw: st.DrawFn, key: str) -> dict[str, object]:
    address = draw(st.none() | _addresses)
    if address is None:
        return {}
    provisioned = draw(st.booleans())
    if not provisioned:
        return {"address": address}
    aid = f"a{key}{draw(st.integers(0, 2))}"
    return {
        "address": address,
        "standardized": std(aid, f"{address.line1.upper()} {aid}"),
        "endpoint": ep(f"ep{key}00000000"[:12], "1000000001", aid),
    }


@st.composite
def _states(draw: st.DrawFn) -> CustomerState:
    customer = Customer(customer_id="hd365", **draw(_entity_location("c")))  # type: ignore[arg-type]
    sites = [
        Site(customer_id="hd365", site_id=s, **draw(_entity_location(s)))  # type: ignore[arg-type]
        for s in draw(st.sets(st.sampled_from(["s1", "s2"])))
    ]
    site_ids = [s.site_id for s in sites]
    accounts = [
        Account(
            number=n,
            customer_id="hd365",
            site_id=draw(st.none() | st.sampled_from(site_ids)) if site_ids else None,
            callback_number=draw(st.none() | st.just("9195550100")),
            **draw(_entity_location(n[-1])),  # type: ignore[arg-type]
        )
        for n in draw(st.sets(_numbers))
    ]
    return make(customer, sites, accounts)


def _content(records: dict[str, LocationRecord | None]) -> dict[str, tuple[str, str | None]]:
    return {n: (r.provider_endpoint, r.callback) for n, r in records.items() if r is not None}


@settings(max_examples=200, deadline=None)
@given(old=_states(), new=_states())
def test_line_changes_turn_old_records_into_new_records(
    old: CustomerState, new: CustomerState
) -> None:
    records = _content(dict(cascade.desired_records(old, now=NOW)))
    changes = _changes(old, new)
    for number in changes.deletions:
        records.pop(number, None)
    records.update(_content(dict(changes.records)))
    assert records == _content(dict(cascade.desired_records(new, now=LATER)))
    changed = {e.line for e in changes.audit}
    for number in set(old.accounts) | set(new.accounts):
        before = cascade.effective(old, old.accounts[number]) if number in old.accounts else None
        after = cascade.effective(new, new.accounts[number]) if number in new.accounts else None
        before_pe = before.provider_endpoint if before else None
        after_pe = after.provider_endpoint if after else None
        if before_pe != after_pe:
            assert number in changed


# --- the stored model -------------------------------------------------------------------------


def test_customer_state_round_trips_through_json() -> None:
    own = Account(
        number="1321551234",
        customer_id="hd365",
        site_id="cary",
        name="ext 1000",
        callback_number="9195550100",
        address=CARY,
        standardized=std("a-acct"),
        endpoint=ep("acctep0000", "1321551234", "a-acct"),
        created_at=NOW,
        updated_at=LATER,
    )
    entry = AuditEntry(
        at=NOW,
        who="portal",
        action="patch_account",
        entity="account:1321551234",
        line="1321551234",
        old_provider_endpoint=None,
        new_provider_endpoint="5555555/acctep0000",
        source="account:1321551234",
        address="600 CHATHAM ST",
    )
    state = CustomerState(
        customer=PROVISIONED_CUSTOMER,
        sites={"cary": PROVISIONED_SITE},
        accounts={own.number: own},
        version=7,
        outbox=Outbox(
            records={"1321551234": LocationRecord("5555555/acctep0000", None, NOW)},
            deletions=frozenset({"1321551299"}),
            endpoint_deletions=("oldep00000",),
            address_deletions=("a-old",),
            audit=(entry,),
        ),
    )
    assert CustomerState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema=99), "schema"),
        (lambda d: d["accounts"]["1321551234"].update(site_id="nope"), "unknown site"),
        (lambda d: d["sites"]["cary"].update(customer_id="other"), "wrong key or customer"),
        (lambda d: d["accounts"]["1321551234"].update(number="12"), "10-digit"),
        (lambda d: d.update(version=-1), "version"),
    ],
)
def test_corrupt_documents_are_refused(mutate: object, message: str) -> None:
    state = make(
        PROVISIONED_CUSTOMER,
        [PROVISIONED_SITE],
        [Account(number="1321551234", customer_id="hd365", site_id="cary")],
    )
    doc = json.loads(json.dumps(state.to_dict()))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(ModelError, match=message):
        CustomerState.from_dict(doc)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"city": "Cary", "state": "NC", "postal_code": "27513"}, "address.line1"),
        ({"line1": "1 Main St", "state": "NC", "postal_code": "27513"}, "address.city"),
        (
            {"line1": "1 Main St", "city": "Cary", "state": "NC", "postal_code": 27513},
            "address.postal_code",
        ),
        (
            {
                "line1": "1 Main St",
                "line2": "x" * 61,
                "city": "Cary",
                "state": "NC",
                "postal_code": "27513",
            },
            "address.line2",
        ),
        (
            {
                "line1": "1 Main St",
                "city": "Cary",
                "state": "NC",
                "postal_code": "27513",
                "country": "USA",
            },
            "address.country",
        ),
        (
            {
                "line1": "1 Main St",
                "city": "Cary",
                "state": "NC",
                "postal_code": "27513",
                "zip": "x",
            },
            "address.zip",
        ),
    ],
)
def test_address_shape_is_checked(data: dict[str, object], field: str) -> None:
    with pytest.raises(ModelError) as info:
        Address.from_dict(data)
    assert info.value.field == field


def test_address_defaults_country_and_collapses_spaces() -> None:
    address = Address.from_dict(
        {"line1": " 600  Chatham Street ", "city": "Cary", "state": "NC", "postal_code": "27513"},
        default_country="us",
    )
    assert address == CARY


# --- resync: reconcile the stored line records with the state ---------------------------------

LINE_OK = "1321551234"
LINE_STALE = "1321551235"
LINE_NEW = "1321551236"
LINE_CALLBACK = "1321551237"
LINE_BARE = "1321551240"
STRAY = "1888888888"


def _resync_world() -> tuple[CustomerState, CustomerState, dict[str, LocationRecord]]:
    """Two customers: one provisioned with four lines, one whose two lines have no endpoint."""
    provisioned = make(
        PROVISIONED_CUSTOMER,
        accounts=[
            Account(number=LINE_OK, customer_id="hd365"),
            Account(number=LINE_STALE, customer_id="hd365"),
            Account(number=LINE_NEW, customer_id="hd365"),
            Account(number=LINE_CALLBACK, customer_id="hd365", callback_number="9195550100"),
        ],
    )
    bare = CustomerState(
        customer=Customer(customer_id="bare"),
        accounts={
            LINE_BARE: Account(number=LINE_BARE, customer_id="bare"),
            "1321551241": Account(number="1321551241", customer_id="bare"),
        },
    )
    stored = {
        LINE_OK: LocationRecord("5555555/custep0000", None, "2024-01-01T00:00:00Z"),
        LINE_STALE: LocationRecord("5555555/oldep00000", None, "2024-01-01T00:00:00Z"),
        LINE_CALLBACK: LocationRecord("5555555/custep0000", None, "2024-01-01T00:00:00Z"),
        LINE_BARE: LocationRecord("5555555/goneep0000", None, "2024-01-01T00:00:00Z"),
        STRAY: LocationRecord("5555555/strayep000", None, "2024-01-01T00:00:00Z"),
    }
    return provisioned, bare, stored


def test_reconcile_writes_only_what_differs_and_removes_lines_without_endpoint() -> None:
    provisioned, bare, stored = _resync_world()
    plan = cascade.reconcile(
        [provisioned, bare], stored, None, now=NOW, who="ops", prune_orphan_lines=False
    )
    # Right already: left alone. Missing, wrong endpoint or wrong callback: written.
    assert plan.records == {
        LINE_STALE: LocationRecord("5555555/custep0000", None, NOW),
        LINE_NEW: LocationRecord("5555555/custep0000", None, NOW),
        LINE_CALLBACK: LocationRecord("5555555/custep0000", "9195550100", NOW),
    }
    # A line with no endpoint loses its record; one with no record has nothing to remove.
    assert plan.removals == frozenset({LINE_BARE})
    assert plan.lines == 6
    assert [(p.line, p.customer_id, p.reason) for p in plan.without_endpoint] == [
        (LINE_BARE, "bare", "no_address"),
        ("1321551241", "bare", "no_address"),
    ]
    # Not pruning: the stray record is reported and kept.
    assert plan.orphan_lines == (STRAY,)
    assert STRAY not in plan.removals
    # Bandwidth was not asked: nothing is judged against it.
    assert plan.orphan_endpoints == ()
    assert [(e.line, e.old_provider_endpoint, e.new_provider_endpoint) for e in plan.audit] == [
        (LINE_STALE, "5555555/oldep00000", "5555555/custep0000"),
        (LINE_NEW, None, "5555555/custep0000"),
        (LINE_CALLBACK, "5555555/custep0000", "5555555/custep0000"),
        (LINE_BARE, "5555555/goneep0000", None),
    ]
    stale = plan.audit[0]
    assert (stale.at, stale.who, stale.action, stale.entity) == (
        NOW,
        "ops",
        "resync",
        f"account:{LINE_STALE}",
    )
    assert (stale.source, stale.address) == (
        "customer:hd365",
        "900 MAIN CAMPUS DR, RALEIGH, NC 27606, US",
    )
    removed = plan.audit[3]
    assert (removed.source, removed.address) == (None, "")


def test_reconcile_prunes_orphan_lines_with_an_audit_entry() -> None:
    provisioned, bare, stored = _resync_world()
    plan = cascade.reconcile(
        [provisioned, bare], stored, None, now=NOW, who="ops", prune_orphan_lines=True
    )
    assert plan.orphan_lines == (STRAY,)
    assert plan.removals == frozenset({LINE_BARE, STRAY})
    last = plan.audit[-1]
    assert (last.entity, last.line, last.old_provider_endpoint, last.new_provider_endpoint) == (
        f"line:{STRAY}",
        STRAY,
        "5555555/strayep000",
        None,
    )


def test_reconcile_checks_endpoints_bandwidth_listed() -> None:
    site_line = Account(number=LINE_NEW, customer_id="hd365", site_id="cary")
    state = make(
        PROVISIONED_CUSTOMER,
        [PROVISIONED_SITE],
        [Account(number=LINE_OK, customer_id="hd365"), site_line],
    )
    stored = {
        LINE_OK: LocationRecord("5555555/custep0000", None, NOW),
        LINE_NEW: LocationRecord("5555555/siteep0000", None, NOW),
    }
    # The site's endpoint is gone at Bandwidth; another nothing references is there.
    listed = {"custep0000", "strayendpoint1"}
    plan = cascade.reconcile([state], stored, listed, now=NOW, who="ops", prune_orphan_lines=True)
    assert plan.without_endpoint == (
        cascade.LineProblem(
            line=LINE_NEW,
            customer_id="hd365",
            reason="missing_at_provider",
            provider_endpoint="5555555/siteep0000",
        ),
    )
    assert plan.orphan_endpoints == ("strayendpoint1",)
    # What Bandwidth lacks is reported, not repaired by rewriting records.
    assert plan.records == {} and plan.removals == frozenset() and plan.audit == ()


def test_reconcile_of_matching_records_is_empty() -> None:
    state = make(PROVISIONED_CUSTOMER, accounts=[Account(number=LINE_OK, customer_id="hd365")])
    stored = {LINE_OK: LocationRecord("5555555/custep0000", None, "2020-01-01T00:00:00Z")}
    plan = cascade.reconcile(
        [state], stored, {"custep0000"}, now=NOW, who="ops", prune_orphan_lines=True
    )
    assert plan == cascade.Reconciliation(
        records={},
        removals=frozenset(),
        audit=(),
        lines=1,
        orphan_lines=(),
        without_endpoint=(),
        orphan_endpoints=(),
    )
