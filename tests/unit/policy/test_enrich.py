"""The enrichment rules, one test each."""

from __future__ import annotations

from pathlib import Path

from e911_sip.policy.enrich import EnrichOptions, ExistingGeolocation, enrich
from e911_sip.sip.message import Request, parse

DATA = Path(__file__).resolve().parents[2] / "data" / "valid"
BASE = "https://emergency.bandwidth.com/locations/"
OPTIONS = EnrichOptions(geolocation_base_url=BASE)


def portasip_invite(*extra: str) -> Request:
    data = (DATA / "portasip_911.sip").read_bytes()
    if extra:
        head, body = data.split(b"\r\n\r\n", 1)
        head += b"\r\n" + "\r\n".join(extra).encode()
        data = head + b"\r\n\r\n" + body
    message = parse(data)
    assert isinstance(message, Request)
    return message


def test_adds_the_headers_of_use_scenario_1_6b() -> None:
    original = portasip_invite()
    result = enrich(
        original, line="3215551234", provider_endpoint="555555/202369122819078578", options=OPTIONS
    )
    out = result.request
    assert out.get_all("priority") == ["emergency"]
    assert out.get_all("geolocation") == [f"<{BASE}555555/202369122819078578>"]
    assert out.get_all("geolocation-routing") == ["no"]
    assert out.get_all("p-asserted-identity") == ["<sip:3215551234@192.0.2.10>"]
    assert result.geolocation == f"<{BASE}555555/202369122819078578>"
    assert result.callback == "3215551234"


def test_everything_else_passes_byte_for_byte() -> None:
    original = portasip_invite()
    out = enrich(original, line="3215551234", provider_endpoint="5/e", options=OPTIONS).request
    added = {"priority", "geolocation", "geolocation-routing", "p-asserted-identity"}
    kept = [h.raw for h in out.headers if h.key not in added]
    assert kept == [h.raw for h in original.headers]
    assert out.body == original.body
    assert out.uri == original.uri
    assert out.get("identity") == original.get("identity")


def test_priority_replaces_any_other_value() -> None:
    original = portasip_invite("Priority: psap-callback", "Priority: urgent")
    out = enrich(original, line="3215551234", provider_endpoint="5/e", options=OPTIONS).request
    assert out.get_all("priority") == ["emergency"]


def test_existing_geolocation_routing_is_never_changed_or_duplicated() -> None:
    original = portasip_invite("Geolocation-Routing: yes")
    out = enrich(original, line="3215551234", provider_endpoint="5/e", options=OPTIONS).request
    assert out.get_all("geolocation-routing") == ["yes"]


def test_existing_geolocation_is_replaced_and_reported_by_default() -> None:
    theirs = "<cid:caller-location@192.0.2.10>"
    original = portasip_invite(f"Geolocation: {theirs}")
    result = enrich(original, line="3215551234", provider_endpoint="5/e", options=OPTIONS)
    assert result.request.get_all("geolocation") == [f"<{BASE}5/e>"]
    assert result.removed_geolocation == (theirs,)


def test_existing_geolocation_can_be_kept() -> None:
    theirs = "<cid:caller-location@192.0.2.10>"
    original = portasip_invite(f"Geolocation: {theirs}")
    options = EnrichOptions(
        geolocation_base_url=BASE, existing_geolocation=ExistingGeolocation.KEEP
    )
    result = enrich(original, line="3215551234", provider_endpoint="5/e", options=options)
    assert result.request.get_all("geolocation") == [theirs]
    assert result.geolocation is None
    assert not result.request.has("geolocation-routing")


def test_existing_geolocation_can_be_appended_to() -> None:
    theirs = "<cid:caller-location@192.0.2.10>"
    original = portasip_invite(f"Geolocation: {theirs}")
    options = EnrichOptions(
        geolocation_base_url=BASE, existing_geolocation=ExistingGeolocation.APPEND
    )
    out = enrich(original, line="3215551234", provider_endpoint="5/e", options=options).request
    assert out.get_all("geolocation") == [theirs, f"<{BASE}5/e>"]  # RFC 6442: ours goes last


def test_exactly_one_pai_with_the_callback_number() -> None:
    original = portasip_invite(
        "P-Asserted-Identity: <tel:+13215551234>",
        'P-Asserted-Identity: "Desk" <sip:+13215551234@pbx.example.com>',
        "P-Preferred-Identity: <sip:someone@else>",
    )
    out = enrich(
        original,
        line="3215551234",
        provider_endpoint="5/e",
        callback="3215550100",
        options=OPTIONS,
    ).request
    assert out.get_all("p-asserted-identity") == ["<sip:3215550100@192.0.2.10>"]
    assert not out.has("p-preferred-identity")


def test_pai_domain_is_configurable() -> None:
    options = EnrichOptions(geolocation_base_url=BASE, pai_domain="edge.carrier.example")
    out = enrich(portasip_invite(), line="3215551234", provider_endpoint=None, options=options)
    assert out.request.get("p-asserted-identity") == "<sip:3215551234@edge.carrier.example>"


def test_no_location_still_gets_priority_and_pai_but_no_geolocation() -> None:
    result = enrich(portasip_invite(), line="3215551234", provider_endpoint=None, options=OPTIONS)
    out = result.request
    assert out.get("priority") == "emergency"
    assert out.get("p-asserted-identity") == "<sip:3215551234@192.0.2.10>"
    assert not out.has("geolocation") and not out.has("geolocation-routing")
    assert result.geolocation is None


def test_unknown_caller_keeps_its_pai() -> None:
    original = portasip_invite("P-Asserted-Identity: <sip:anonymous@x>")
    out = enrich(original, line=None, provider_endpoint=None, options=OPTIONS).request
    assert out.get_all("p-asserted-identity") == ["<sip:anonymous@x>"]
    assert out.get("priority") == "emergency"


def test_original_is_not_modified() -> None:
    original = portasip_invite()
    before = original.to_bytes()
    enrich(original, line="3215551234", provider_endpoint="5/e", options=OPTIONS)
    assert original.to_bytes() == before
