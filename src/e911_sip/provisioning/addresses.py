"""US civic address standardisation, as Bandwidth's validation applies it.

The Bandwidth emulator needs to turn what a customer typed ("900 Main Campus Drive",
"Suite 500") into the upper-case USPS Publication 28 form Bandwidth hands back
(``900 MAIN CAMPUS DR``, ``STE 500``) and to refuse the addresses Bandwidth refuses, with a
reason a customer can act on. This module is that logic, kept pure (no I/O, no clock) so it
can be tested on its own.

usaddress (through usaddress-scourgify's tables) labels the parts of line 1; scourgify's
USPS suffix, unit and directional tables do the abbreviating. Its top-level
``normalize_address_record`` is not used directly because it leaves subaddress types long
("BUILDING 4"), does not split the street into Bandwidth's houseNumber / predirectional /
streetName / streetSuffix / postdirectional parts, and reports every failure as one opaque
"unparseable" error. The ZIP+4 table is deliberately tiny: the real service consults USPS
data that cannot ship with the product; the table holds the addresses the use cases and
tests rely on. The 3-digit ZIP prefix table follows the USPS prefix allocation, coarsely:
unassigned prefixes inside a state's range count as that state's.

:class:`StandardizedAddress` here is the emulator's, on Bandwidth's side of the wire, and is
deliberately not the product's ``model.StandardizedAddress``: a test double that shared our
types would share our assumptions and could not catch a mismatch with Bandwidth's shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import usaddress
from scourgify.address_constants import (
    DIRECTIONAL_REPLACEMENTS,
    OCCUPANCY_TYPE_ABBREVIATIONS,
    STATE_ABBREVIATIONS,
    STREET_TYPE_ABBREVIATIONS,
)

MAX_LINE2 = 60
"""Bandwidth's limit on address line 2, in characters."""

DEFAULT_ZIP_PLUS4: Mapping[tuple[str, str], str] = {
    ("900 MAIN CAMPUS DR", "27606"): "5177",
}
"""(street line, 5-digit ZIP) → the 4-digit add-on the emulator appends."""

# USPS 3-digit ZIP prefixes, as inclusive ranges per state or territory.
_ZIP_PREFIXES: dict[str, tuple[tuple[int, int], ...]] = {
    "AL": ((350, 369),),
    "AK": ((995, 999),),
    "AZ": ((850, 865),),
    "AR": ((716, 729),),
    "CA": ((900, 961),),
    "CO": ((800, 816),),
    "CT": ((60, 69),),
    "DE": ((197, 199),),
    "DC": ((200, 200), (202, 205), (569, 569)),
    "FL": ((320, 349),),
    "GA": ((300, 319), (398, 399)),
    "HI": ((967, 968),),
    "ID": ((832, 838),),
    "IL": ((600, 629),),
    "IN": ((460, 479),),
    "IA": ((500, 528),),
    "KS": ((660, 679),),
    "KY": ((400, 427),),
    "LA": ((700, 714),),
    "ME": ((39, 49),),
    "MD": ((206, 219),),
    "MA": ((10, 27), (55, 55)),
    "MI": ((480, 499),),
    "MN": ((550, 567),),
    "MS": ((386, 397),),
    "MO": ((630, 658),),
    "MT": ((590, 599),),
    "NE": ((680, 693),),
    "NV": ((889, 898),),
    "NH": ((30, 38),),
    "NJ": ((70, 89),),
    "NM": ((870, 884),),
    "NY": ((5, 5), (100, 149)),
    "NC": ((270, 289),),
    "ND": ((580, 588),),
    "OH": ((430, 459),),
    "OK": ((730, 731), (734, 749)),
    "OR": ((970, 979),),
    "PA": ((150, 196),),
    "RI": ((28, 29),),
    "SC": ((290, 299),),
    "SD": ((570, 577),),
    "TN": ((370, 385),),
    "TX": ((733, 733), (750, 799), (885, 885)),
    "UT": ((840, 847),),
    "VT": ((50, 54), (56, 59)),
    "VA": ((201, 201), (220, 246)),
    "WA": ((980, 994),),
    "WV": ((247, 268),),
    "WI": ((530, 549),),
    "WY": ((820, 831),),
    "PR": ((6, 7), (9, 9)),
    "VI": ((8, 8),),
    "GU": ((969, 969),),
    "MP": ((969, 969),),
    "AS": ((967, 967),),
}

STATES: frozenset[str] = frozenset(_ZIP_PREFIXES)
"""The state and territory codes an emergency address may use."""

_MILITARY = frozenset({"AA", "AE", "AP"})
_COUNTRY_NAMES = frozenset({"US", "USA", "UNITED STATES", "UNITED STATES OF AMERICA"})
_ZIP = re.compile(r"(\d{5})(?:-(\d{4}))?")
_NOT_WORD = re.compile(r"[^A-Z0-9#/\- ]+")
_SPACES = re.compile(r"\s+")

# Unit designators scourgify does not list but customers type.
_EXTRA_UNITS = {"FLR": "FL", "BLD": "BLDG", "APPT": "APT", "SUIT": "STE", "STES": "STE"}
_UNIT_ABBREVIATIONS: dict[str, str] = {
    **{v: v for v in OCCUPANCY_TYPE_ABBREVIATIONS.values()},
    **OCCUPANCY_TYPE_ABBREVIATIONS,
    **_EXTRA_UNITS,
}

_ORDINALS = {1: "ST", 2: "ND", 3: "RD"}
_UNIT_LABELS = ("OccupancyType", "OccupancyIdentifier", "SubaddressType", "SubaddressIdentifier")
_BOX_LABELS = ("USPSBoxType", "USPSBoxID", "USPSBoxGroupType", "USPSBoxGroupID")
_INTERSECTION_LABELS = ("IntersectionSeparator", "SecondStreetName", "CornerOf")
_LAST_LINE_LABELS = ("PlaceName", "StateName", "ZipCode", "CountryName")


@dataclass(frozen=True, slots=True)
class AddressProblem:
    """One reason an address was refused."""

    field: str
    """The request field at fault, named as in Bandwidth's API (``postalCode``, ...)."""
    reason: str
    """What is wrong, in words a customer can act on."""


class InvalidAddress(ValueError):
    """The address cannot be standardised; ``problems`` lists every reason found."""

    def __init__(self, problems: list[AddressProblem]) -> None:
        super().__init__("; ".join(p.reason for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class StandardizedAddress:
    """An address in the upper-case USPS form, split the way Bandwidth returns it."""

    house_number: str
    """Primary number, with any prefix or fraction (``900``, ``123 1/2``)."""
    predirectional: str
    """``N``, ``SW``, ... before the street name, or empty."""
    street_name: str
    """Street name without its suffix (``MAIN CAMPUS``, ``5TH``)."""
    street_suffix: str
    """Publication 28 suffix abbreviation (``DR``, ``ST``), or empty."""
    postdirectional: str
    """Directional after the suffix, or empty."""
    address_line2: str
    """Unit designators abbreviated (``STE 500``, ``BLDG 4 RM 12``), or empty."""
    city: str
    """City, upper case, punctuation removed."""
    state: str
    """Two-letter state or territory code."""
    postal_code: str
    """5-digit ZIP, or ZIP+4 as ``27606-5177`` when known."""
    country: str = "US"
    """Always ``US``: only US addresses are accepted."""

    @property
    def street_line(self) -> str:
        """House number and street, e.g. ``900 MAIN CAMPUS DR``."""
        parts = (
            self.house_number,
            self.predirectional,
            self.street_name,
            self.street_suffix,
            self.postdirectional,
        )
        return " ".join(p for p in parts if p)

    def one_line(self) -> str:
        """``900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US``."""
        parts = [self.street_line]
        if self.address_line2:
            parts.append(self.address_line2)
        parts += [self.city, f"{self.state} {self.postal_code}", self.country]
        return ", ".join(parts)


def clean(text: str) -> str:
    """Upper-case ``text``, drop punctuation USPS does not print, collapse spaces."""
    text = _NOT_WORD.sub(" ", text.upper().replace(".", ""))
    return _SPACES.sub(" ", text).strip()


def normalize_street_line(text: str) -> str:
    """The form a configured street line is compared in (upper case, single spaces)."""
    return clean(text)


def standardize(
    *,
    line1: str,
    line2: str = "",
    city: str,
    state: str,
    postal_code: str,
    country: str = "US",
    zip_plus4: Mapping[tuple[str, str], str] = DEFAULT_ZIP_PLUS4,
) -> StandardizedAddress:
    """Standardise a US civic address.

    Raises:
        InvalidAddress: the address is malformed, not in the US, or its parts disagree
            (the ZIP is in another state). Every problem found is listed, not just the
            first, so a customer can fix them in one go.
    """
    country_code = clean(country or "US")
    if country_code not in _COUNTRY_NAMES:
        raise InvalidAddress(
            [
                AddressProblem(
                    "country",
                    f"country {country_code or country!r} is not supported; "
                    "only US addresses can be emergency locations",
                )
            ]
        )

    problems: list[AddressProblem] = []
    street: dict[str, str] = {}
    unit_from_line1 = ""
    try:
        street, unit_from_line1 = _parse_line1(line1)
    except InvalidAddress as exc:
        problems += exc.problems

    if len(line2) > MAX_LINE2:
        problems.append(
            AddressProblem(
                "addressLine2",
                f"address line 2 is {len(line2)} characters; at most {MAX_LINE2} are allowed",
            )
        )
    unit = " ".join(u for u in (unit_from_line1, _normalize_unit(line2)) if u)
    if len(unit) > MAX_LINE2 and len(line2) <= MAX_LINE2:
        problems.append(
            AddressProblem(
                "addressLine2",
                f"the unit {unit} is longer than {MAX_LINE2} characters",
            )
        )

    # USPS city names carry no punctuation: WINSTON-SALEM is WINSTON SALEM.
    city_clean = clean(city.replace("-", " "))
    if not city_clean:
        problems.append(AddressProblem("city", "city is missing"))

    state_code = _normalize_state(state)
    if state_code is None:
        shown = clean(state) or state.strip()
        if shown in _MILITARY:
            reason = f"state {shown} is a military mail code, not a place 911 can be sent to"
        elif not shown:
            reason = "state is missing"
        else:
            reason = f"state {shown} is unknown"
        problems.append(AddressProblem("state", reason))

    zip_text = postal_code.strip()
    zip_match = _ZIP.fullmatch(zip_text)
    if zip_match is None:
        reason = (
            "ZIP is missing"
            if not zip_text
            else f"ZIP {zip_text} is not a 5-digit ZIP or ZIP+4 (12345-6789)"
        )
        problems.append(AddressProblem("postalCode", reason))
    elif state_code is not None and state_code not in zip_states(zip_match.group(1)):
        problems.append(AddressProblem("postalCode", f"ZIP {zip_text} is not in {state_code}"))

    # zip_match and state_code are None only when a problem says why.
    if problems or zip_match is None or state_code is None:
        raise InvalidAddress(problems)

    zip5, plus4 = zip_match.group(1), zip_match.group(2)
    street_line = " ".join(
        p
        for p in (
            street["house_number"],
            street["predirectional"],
            street["street_name"],
            street["street_suffix"],
            street["postdirectional"],
        )
        if p
    )
    plus4 = plus4 or zip_plus4.get((street_line, zip5))
    return StandardizedAddress(
        house_number=street["house_number"],
        predirectional=street["predirectional"],
        street_name=street["street_name"],
        street_suffix=street["street_suffix"],
        postdirectional=street["postdirectional"],
        address_line2=unit,
        city=city_clean,
        state=state_code,
        postal_code=f"{zip5}-{plus4}" if plus4 else zip5,
        country="US",
    )


def zip_states(zip5: str) -> frozenset[str]:
    """The states whose 3-digit prefix ranges contain ``zip5`` (empty when unassigned)."""
    prefix = int(zip5[:3])
    return frozenset(
        state
        for state, ranges in _ZIP_PREFIXES.items()
        if any(low <= prefix <= high for low, high in ranges)
    )


def _normalize_state(state: str) -> str | None:
    text = clean(state)
    if text in STATES:
        return text
    code = STATE_ABBREVIATIONS.get(text)
    return code if isinstance(code, str) and code in STATES else None


def _normalize_unit(text: str) -> str:
    """Abbreviate unit designators word by word (SUITE 500 → STE 500)."""
    words = clean(text).split()
    return " ".join(_UNIT_ABBREVIATIONS.get(w, w) for w in words)


def _directional(text: str) -> str:
    word = re.sub(r"[^A-Z]", "", text.upper())
    replaced = DIRECTIONAL_REPLACEMENTS.get(word, word)
    return replaced if isinstance(replaced, str) else word


def _street_type(text: str) -> str:
    word = clean(text)
    abbreviation = STREET_TYPE_ABBREVIATIONS.get(word)
    return abbreviation if isinstance(abbreviation, str) else word


def _ordinal(number: int) -> str:
    suffix = "TH" if 10 <= number % 100 <= 20 else _ORDINALS.get(number % 10, "TH")
    return f"{number}{suffix}"


def _parse_line1(line1: str) -> tuple[dict[str, str], str]:
    """Split line 1 into Bandwidth's street parts, plus any unit found in it."""
    text = _SPACES.sub(" ", line1.replace(",", " ")).strip()
    if not text:
        raise InvalidAddress([AddressProblem("addressLine1", "address line 1 is missing")])

    def refuse(reason: str) -> InvalidAddress:
        return InvalidAddress([AddressProblem("addressLine1", reason)])

    try:
        tagged: tuple[dict[str, Any], str] = usaddress.tag(text)
    except usaddress.RepeatedLabelError as exc:
        raise refuse(f"address line 1 {clean(text)!r} could not be read as a street address") from (
            exc
        )
    parts, kind = tagged
    labels = set(parts)
    if labels & set(_BOX_LABELS) or kind == "PO Box":
        raise refuse("a PO box cannot be an emergency location; give the street address")
    if labels & set(_INTERSECTION_LABELS) or kind == "Intersection":
        raise refuse("an intersection cannot be an emergency location; give a street address")
    unreadable = f"address line 1 {clean(text)!r} could not be read as a street address"
    if not labels & {"AddressNumber", "StreetName"}:
        raise refuse(unreadable)
    if labels & set(_LAST_LINE_LABELS):
        raise refuse(
            "address line 1 should hold only the house number and street; "
            "put the city, state and ZIP in their own fields"
        )
    if "AddressNumber" not in parts:
        raise refuse(f"address line 1 {clean(text)!r} has no house number")
    if "StreetName" not in parts:
        raise refuse(f"address line 1 {clean(text)!r} has no street name")
    if kind != "Street Address" or "Recipient" in labels or "NotAddress" in labels:
        raise refuse(unreadable)

    def get(label: str) -> str:
        return clean(str(parts.get(label, "")))

    suffix = _street_type(str(parts.get("StreetNamePostType", "")))
    name = get("StreetName")
    if suffix and name.isdigit():
        # USPS writes numbered streets as ordinals: "5 Street" is "5TH ST".
        name = _ordinal(int(name))
    pre_type = _street_type(str(parts.get("StreetNamePreType", "")))
    street_name = " ".join(p for p in (get("StreetNamePreModifier"), pre_type, name) if p)
    house = " ".join(
        p
        for p in (get("AddressNumberPrefix"), get("AddressNumber"), get("AddressNumberSuffix"))
        if p
    )
    unit_words = [str(v) for k, v in parts.items() if k in _UNIT_LABELS or k == "BuildingName"]
    return (
        {
            "house_number": house,
            "predirectional": _directional(str(parts.get("StreetNamePreDirectional", ""))),
            "street_name": street_name,
            "street_suffix": suffix,
            "postdirectional": _directional(str(parts.get("StreetNamePostDirectional", ""))),
        },
        _normalize_unit(" ".join(unit_words)),
    )
