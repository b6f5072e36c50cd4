"""``apply_batch``: many entities of one customer in one change, failures kept per entity.

Runs against the Bandwidth emulator over real HTTP, with the fixtures of test_service.
"""

from __future__ import annotations

import asyncio

from e911_sip.provisioning.bandwidth import make_endpoint_id
from e911_sip.provisioning.model import Address, EntityRef
from e911_sip.provisioning.service import (
    AccountFields,
    Batch,
    CustomerFields,
    SiteFields,
)
from tests.unit.provisioning.test_service import CARY, DURHAM, NOWHERE, RALEIGH, World

LINES = [f"13215520{i:02d}" for i in range(20)]


def onboarding(*, site_address: Address = CARY, own: Address = DURHAM) -> Batch:
    """A customer with an address, a site, 10 lines on the site, 8 on the customer and two
    with their own address."""
    accounts = {n: AccountFields(customer_id="hd365", site_id="cary") for n in LINES[:10]}
    accounts |= {n: AccountFields(customer_id="hd365") for n in LINES[10:18]}
    accounts |= {n: AccountFields(customer_id="hd365", address=own) for n in LINES[18:]}
    return Batch(
        customer_id="hd365",
        customer=CustomerFields(name="Helpdesk 365", address=RALEIGH),
        sites={"cary": SiteFields(name="Cary", address=site_address)},
        accounts=accounts,
    )


async def test_a_batch_provisions_each_address_once_and_every_line(world: World) -> None:
    limit = asyncio.Semaphore(4)
    failed = await world.service.apply_batch(onboarding(), who="import", limit=limit)
    assert failed == {}
    endpoints = await world.bw.endpoints()
    # One endpoint per entity with an address: customer, site, two own-address lines.
    assert set(endpoints) == {
        make_endpoint_id("customer", "hd365"),
        make_endpoint_id("site", "hd365/cary"),
        make_endpoint_id("account", f"hd365/{LINES[18]}"),
        make_endpoint_id("account", f"hd365/{LINES[19]}"),
    }
    assert len(await world.bw.requests("POST", "/addresses")) == 4
    for number in LINES:
        record = await world.record(number)
        assert record is not None
    site = await world.record(LINES[0])
    customer = await world.record(LINES[10])
    own = await world.record(LINES[19])
    assert site is not None and site.provider_endpoint.endswith(
        make_endpoint_id("site", "hd365/cary")
    )
    assert customer is not None and customer.provider_endpoint.endswith(
        make_endpoint_id("customer", "hd365")
    )
    assert own is not None and own.provider_endpoint.endswith(
        make_endpoint_id("account", f"hd365/{LINES[19]}")
    )
    state = await world.customer()
    assert state.outbox is None and len(state.accounts) == 20
    assert len(world.audit.entries) == 20
    assert {e.action for e in world.audit.entries} == {"import"}


async def test_the_same_batch_again_changes_nothing_and_asks_bandwidth_nothing(
    world: World,
) -> None:
    assert await world.service.apply_batch(onboarding(), who="import") == {}
    before = await world.customer()
    posts = len((await world.bw.state())["requests"])
    assert await world.service.apply_batch(onboarding(), who="import") == {}
    assert await world.customer() == before
    assert len((await world.bw.state())["requests"]) == posts


async def test_a_refused_site_address_fails_the_site_and_its_lines_only(world: World) -> None:
    failed = await world.service.apply_batch(onboarding(site_address=NOWHERE), who="import")
    site_ref = EntityRef.site("hd365", "cary")
    assert set(failed) == {site_ref} | {EntityRef.account("hd365", n) for n in LINES[:10]}
    assert failed[site_ref].code == "address_rejected"
    line_error = failed[EntityRef.account("hd365", LINES[0])]
    assert line_error.code == "address_rejected" and "site:hd365/cary" in line_error.message
    state = await world.customer()
    assert "cary" not in state.sites
    assert sorted(state.accounts) == LINES[10:]
    for number in LINES[:10]:
        assert await world.record(number) is None
    for number in LINES[10:]:
        assert await world.record(number) is not None
    assert make_endpoint_id("site", "hd365/cary") not in await world.bw.endpoints()


async def test_a_refused_own_address_fails_that_line_only(world: World) -> None:
    failed = await world.service.apply_batch(onboarding(own=NOWHERE), who="import")
    assert set(failed) == {EntityRef.account("hd365", n) for n in LINES[18:]}
    assert all(e.code == "address_rejected" for e in failed.values())
    state = await world.customer()
    assert sorted(state.accounts) == LINES[:18]
    assert len(await world.bw.endpoints()) == 2


async def test_a_refused_new_customer_fails_the_whole_batch_and_saves_nothing(
    world: World,
) -> None:
    batch = onboarding()
    batch = Batch(
        customer_id="hd365",
        customer=CustomerFields(address=NOWHERE),
        sites=batch.sites,
        accounts=batch.accounts,
    )
    failed = await world.service.apply_batch(batch, who="import")
    assert len(failed) == 1 + 1 + 20
    assert await world.state.get("hd365") is None
    # What the other steps created at Bandwidth was undone.
    assert await world.bw.endpoints() == {}


async def test_a_number_of_another_customer_and_an_unknown_site_fail_their_lines(
    world: World,
) -> None:
    other = Batch(
        customer_id="other",
        customer=CustomerFields(address=RALEIGH),
        accounts={LINES[0]: AccountFields(customer_id="other")},
    )
    assert await world.service.apply_batch(other, who="import") == {}
    batch = Batch(
        customer_id="hd365",
        customer=CustomerFields(address=CARY),
        accounts={
            LINES[0]: AccountFields(customer_id="hd365"),
            LINES[1]: AccountFields(customer_id="hd365", site_id="nosuchsite"),
            LINES[2]: AccountFields(customer_id="hd365"),
        },
    )
    failed = await world.service.apply_batch(batch, who="import")
    assert {ref.key: e.code for ref, e in failed.items()} == {
        LINES[0]: "number_in_use",
        LINES[1]: "unknown_site",
    }
    assert sorted((await world.customer()).accounts) == [LINES[2]]
    assert sorted((await world.customer("other")).accounts) == [LINES[0]]


async def test_lines_for_a_customer_that_does_not_exist_fail(world: World) -> None:
    batch = Batch(customer_id="ghost", accounts={LINES[0]: AccountFields(customer_id="ghost")})
    failed = await world.service.apply_batch(batch, who="import")
    assert [e.code for e in failed.values()] == ["unknown_customer"]
    assert await world.state.get("ghost") is None
