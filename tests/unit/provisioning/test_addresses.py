"""Address standardisation: USPS Publication 28 forms and every refusal reason."""

from __future__ import annotations

import pytest

from e911_sip.provisioning.addresses import (
    MAX_LINE2,
    STATES,
    InvalidAddress,
    StandardizedAddress,
    standardize,
    zip_states,
)


def std(line1: str, line2: str = "", **kw: str) -> StandardizedAddress:
    fields = {"city": "Cary", "state": "NC", "postal_code": "27513", **kw}
    return standardize(line1=line1, line2=line2, **fields)


def problems(**kw: str) -> list[tuple[str, str]]:
    fields = {
        "line1": "600 Chatham Street",
        "city": "Cary",
        "state": "NC",
        "postal_code": "27513",
        **kw,
    }
    with pytest.raises(InvalidAddress) as caught:
        standardize(**fields)
    return [(p.field, p.reason) for p in caught.value.problems]


def test_use_case_1_1_reads_as_bandwidth_shows_it() -> None:
    address = standardize(
        line1="900 Main Campus Drive",
        line2="Suite 500",
        city="Raleigh",
        state="NC",
        postal_code="27606",
        country="US",
    )
    assert address.one_line() == "900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US"
    assert (
        address.house_number,
        address.predirectional,
        address.street_name,
        address.street_suffix,
        address.postdirectional,
        address.address_line2,
    ) == ("900", "", "MAIN CAMPUS", "DR", "", "STE 500")


def test_use_case_1_3_keeps_a_zip_the_table_does_not_know() -> None:
    assert std("600 Chatham Street").one_line() == "600 CHATHAM ST, CARY, NC 27513, US"


@pytest.mark.parametrize(
    ("line1", "street_line"),
    [
        ("600 chatham street", "600 CHATHAM ST"),
        ("12 Elm Avenue", "12 ELM AVE"),
        ("55 Oak Boulevard", "55 OAK BLVD"),
        ("7 Pine Lane", "7 PINE LN"),
        ("9 Birch Court", "9 BIRCH CT"),
        ("100 Harbor Parkway", "100 HARBOR PKWY"),
        ("100 W 5 Street", "100 W 5TH ST"),
        ("123 north main street southwest", "123 N MAIN ST SW"),
        ("55 N.E. Elm Rd.", "55 NE ELM RD"),
        ("1600 Pennsylvania Ave NW", "1600 PENNSYLVANIA AVE NW"),
    ],
)
def test_street_suffixes_and_directionals_follow_publication_28(
    line1: str, street_line: str
) -> None:
    assert std(line1).street_line == street_line


def test_directionals_are_split_out() -> None:
    address = std("123 north main street southwest")
    assert (address.predirectional, address.street_name, address.postdirectional) == (
        "N",
        "MAIN",
        "SW",
    )


@pytest.mark.parametrize(
    ("line2", "unit"),
    [
        ("Suite 500", "STE 500"),
        ("Floor 3", "FL 3"),
        ("Building 4, Room 12", "BLDG 4 RM 12"),
        ("apartment 2b", "APT 2B"),
        ("Ste. 500", "STE 500"),
        ("#5", "#5"),
    ],
)
def test_unit_designators_are_abbreviated(line2: str, unit: str) -> None:
    assert std("600 Chatham Street", line2).address_line2 == unit


def test_a_unit_written_in_line_1_moves_to_line_2() -> None:
    address = std("12 Elm Ave Apartment 3")
    assert (address.street_line, address.address_line2) == ("12 ELM AVE", "APT 3")


def test_everything_comes_back_upper_case_and_unpunctuated() -> None:
    address = std("600 chatham st.", city="winston-salem", state="north carolina")
    assert (address.city, address.state) == ("WINSTON SALEM", "NC")


def test_zip_plus_4_given_is_kept() -> None:
    assert std("600 Chatham St", postal_code="27513-1234").postal_code == "27513-1234"


def test_zip_plus_4_table_can_be_replaced() -> None:
    address = standardize(
        line1="600 Chatham St",
        city="Cary",
        state="NC",
        postal_code="27513",
        zip_plus4={("600 CHATHAM ST", "27513"): "2005"},
    )
    assert address.postal_code == "27513-2005"


def test_country_names_for_the_us_are_accepted() -> None:
    assert std("600 Chatham St", country="usa").country == "US"


def test_unknown_state() -> None:
    assert problems(state="ZZ", postal_code="27513") == [("state", "state ZZ is unknown")]


def test_military_codes_are_refused_with_their_own_reason() -> None:
    [(field, reason)] = problems(state="AE")
    assert field == "state" and "military" in reason


@pytest.mark.parametrize("zip_code", ["2751", "275130", "27513-12", "ABCDE"])
def test_zip_must_be_5_digits_or_zip_plus_4(zip_code: str) -> None:
    [(field, reason)] = problems(postal_code=zip_code)
    assert field == "postalCode"
    assert reason == f"ZIP {zip_code} is not a 5-digit ZIP or ZIP+4 (12345-6789)"


def test_zip_in_another_state() -> None:
    assert problems(postal_code="99999") == [("postalCode", "ZIP 99999 is not in NC")]


def test_every_state_has_zip_prefixes_and_the_table_agrees_on_samples() -> None:
    assert {"NC", "CA", "NY", "TX", "DC", "PR", "AK", "HI"} <= STATES
    assert len(STATES - {"PR", "VI", "GU", "MP", "AS", "DC"}) == 50
    assert zip_states("27606") == {"NC"}
    assert zip_states("10118") == {"NY"}
    assert zip_states("90210") == {"CA"}
    assert zip_states("20500") == {"DC"}
    assert zip_states("00100") == frozenset()


def test_non_us_country() -> None:
    [(field, reason)] = problems(country="CA", state="ON", postal_code="M5V 2T6")
    assert field == "country"
    assert "only US addresses" in reason


def test_line_2_over_60_characters() -> None:
    [(field, reason)] = problems(line2="x" * (MAX_LINE2 + 1))
    assert field == "addressLine2"
    assert reason == "address line 2 is 61 characters; at most 60 are allowed"


def test_line_2_of_exactly_60_characters_is_accepted() -> None:
    assert std("600 Chatham St", "A" * MAX_LINE2).address_line2 == "A" * MAX_LINE2


@pytest.mark.parametrize(
    ("line1", "words"),
    [
        ("asdf", "could not be read as a street address"),
        ("Main Street", "has no house number"),
        ("PO Box 12", "PO box"),
        ("Main St & Elm St", "intersection"),
        ("900 Main St Raleigh NC 27606", "put the city, state and ZIP in their own fields"),
        ("", "address line 1 is missing"),
    ],
)
def test_unparseable_line_1(line1: str, words: str) -> None:
    [(field, reason)] = problems(line1=line1)
    assert field == "addressLine1"
    assert words in reason


def test_all_problems_are_reported_together() -> None:
    found = problems(city="", state="ZZ", line2="y" * 61)
    assert [field for field, _ in found] == ["addressLine2", "city", "state"]
