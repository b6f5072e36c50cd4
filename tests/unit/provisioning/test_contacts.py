"""Kari's Law contacts: stored on customers, sites and accounts, cascading like addresses."""

from __future__ import annotations

import pytest

from e911_sip.provisioning import cascade
from e911_sip.provisioning.model import (
    Account,
    Contacts,
    Customer,
    CustomerState,
    Level,
    ModelError,
    Site,
)
from tests.unit.provisioning.test_api import CARY, Api, api, bw, helpdesk  # noqa: F401
from tests.unit.provisioning.test_service import CARY_STD, LINE, LINE2, RALEIGH_STD

DESK = Contacts(emails=("desk@example.com",), webhooks=("https://pbx.example.com/kari",))
SECURITY = Contacts(sms=("+19195550111",))


def state(**contacts: Contacts | None) -> CustomerState:
    return CustomerState(
        customer=Customer(customer_id="hd365", contacts=contacts.get("customer")),
        sites={"cary": Site(customer_id="hd365", site_id="cary", contacts=contacts.get("site"))},
        accounts={
            LINE: Account(
                number=LINE, customer_id="hd365", site_id="cary", contacts=contacts.get("account")
            ),
            LINE2: Account(number=LINE2, customer_id="hd365"),
        },
    )


def test_the_highest_level_with_a_list_wins() -> None:
    s = state(customer=DESK, site=SECURITY)
    assert cascade.effective_contacts(s, s.accounts[LINE]) == (Level.SITE, SECURITY)
    assert cascade.effective_contacts(s, s.accounts[LINE2]) == (Level.CUSTOMER, DESK)
    s = state(customer=DESK, site=SECURITY, account=Contacts())
    assert cascade.effective_contacts(s, s.accounts[LINE]) == (Level.ACCOUNT, Contacts())
    s = state()
    assert cascade.effective_contacts(s, s.accounts[LINE]) == (None, Contacts())


def test_contacts_survive_the_stored_form_and_old_documents_still_load() -> None:
    s = state(customer=DESK, account=SECURITY)
    again = CustomerState.from_dict(s.to_dict())
    assert again.customer.contacts == DESK and again.accounts[LINE].contacts == SECURITY
    assert again.sites["cary"].contacts is None
    # A document written before contacts existed has no key at all.
    assert "contacts" not in state().to_dict()["customer"]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"emails": ["not-an-address"]}, "contacts.emails"),
        ({"sms": ["555-1234"]}, "contacts.sms"),
        ({"webhooks": ["ftp://example.com/x"]}, "contacts.webhooks"),
        ({"webhooks": "https://example.com"}, "contacts.webhooks"),
        ({"pager": []}, "contacts.pager"),
        ({"emails": [f"a{n}@example.com" for n in range(21)]}, "contacts.emails"),
    ],
)
def test_invalid_contacts_name_the_field(raw: object, field: str) -> None:
    with pytest.raises(ModelError) as caught:
        Contacts.from_dict(raw)
    assert caught.value.field == field


async def test_contacts_through_the_api_and_the_notification_context(api: Api) -> None:  # noqa: F811
    await helpdesk(api)
    status, body, _ = await api.call(
        "PATCH", "/v1/customers/hd365", {"contacts": {"emails": ["desk@example.com"]}}
    )
    assert status == 200 and body["contacts"]["emails"] == ["desk@example.com"]
    status, site, _ = await api.call(
        "PUT",
        "/v1/customers/hd365/sites/cary",
        {"name": "CarryOffice", "address": CARY, "contacts": {"sms": ["9195550111"]}},
    )
    assert status == 201, site
    status, account, _ = await api.call("PATCH", f"/v1/accounts/{LINE}", {"site_id": "cary"})
    assert status == 200
    assert account["effective_contacts"] == {
        "emails": [],
        "sms": ["9195550111"],
        "webhooks": [],
        "level": "site",
    }
    resolution = await api.world.service.notification_context(LINE)
    assert resolution.level == "site" and resolution.address == CARY_STD
    assert resolution.targets.sms == ("9195550111",)
    assert resolution.name == f"Helpdesk 365 / CarryOffice / {LINE} ext 1000"

    status, body, _ = await api.call(
        "PATCH", f"/v1/accounts/{LINE}", {"site_id": None, "contacts": None}
    )
    assert status == 200
    resolution = await api.world.service.notification_context(LINE)
    assert resolution.level == "customer" and resolution.address == RALEIGH_STD
    assert resolution.targets.emails == ("desk@example.com",)

    status, body, _ = await api.call(
        "PATCH", "/v1/customers/hd365", {"contacts": {"emails": ["nope"]}}
    )
    assert status == 422 and body["error"]["field"] == "contacts.emails"
    # Unknown lines and no line at all: nothing known, the [notify] fallback applies.
    assert (await api.world.service.notification_context("9999999999")).targets.empty
    assert (await api.world.service.notification_context(None)).level is None
