"""Is this an emergency call, and which line is calling? (RFC 6881 §5, RFC 5031)

Pure functions over a parsed request. The dialled number comes from the Request-URI; the
calling line from P-Asserted-Identity when present (Bandwidth gives PAI precedence over From),
else from From, normalised to the 10-digit NANP form the location store is keyed by.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from e911_sip.sip.errors import SipError
from e911_sip.sip.message import Request
from e911_sip.sip.uri import Uri, name_addr_uri_text, read_uri, split_values

DEFAULT_NUMBERS = frozenset({"911", "933"})
_VISUAL_SEPARATORS: Final = str.maketrans("", "", "-.() ")


def dialled_digits(uri: Uri) -> str | None:
    """The dialled string of a sip/sips/tel URI without visual separators, else None."""
    if uri.scheme in ("sip", "sips"):
        user = uri.user
        if user is None:
            return None
        # A sip user may carry tel parameters ("911;phone-context=...").
        if ";" in user:
            user = user.partition(";")[0]
    elif uri.scheme == "tel":
        user = uri.user
        if user is None:
            return None
    else:
        return None
    return _without_separators(user)


def _without_separators(text: str) -> str:
    """``text`` without visual separators. Digits, with or without a leading '+' (the usual
    cases: a line and its E.164 form), have none to take out: translate costs a lookup per
    character, and gives them back unchanged."""
    if text.isdigit() or (text[:1] == "+" and text[1:].isdigit()):
        return text
    return text.translate(_VISUAL_SEPARATORS)


def emergency_number(uri: Uri, numbers: Collection[str] = DEFAULT_NUMBERS) -> str | None:
    """The emergency number ``uri`` dials, or None when it is not an emergency call.

    ``sip:911@host;user=phone`` and ``tel:911`` dial 911. ``urn:service:sos`` and every
    ``urn:service:sos.*`` sub-service (RFC 5031) count as 911; the test service
    ``urn:service:test.sos*`` (RFC 6881 §15) counts as 933, the US test number.
    """
    if uri.scheme == "urn":
        service = uri.host
        if service == "service:sos" or service.startswith("service:sos."):
            return "911"
        if service == "service:test.sos" or service.startswith("service:test.sos."):
            return "933" if "933" in numbers else None
        return None
    digits = dialled_digits(uri)
    if digits is not None and digits in numbers:
        return digits
    return None


def normalize_nanp(number: str) -> str | None:
    """A line as the 10 digits the location store is keyed by, or None.

    ``+13215551234``, ``13215551234``, ``3215551234`` and ``(321) 555-1234`` are one line.
    The NPA/NXX digit rules are deliberately not enforced: lines are keyed by whatever
    provisioning stored (the acceptance story's own account, 1321551234, is outside them), and
    an unknown number only finds no record.
    """
    digits = _without_separators(number)
    if digits.startswith("+"):
        digits = digits[1:]
        if not digits.startswith("1") or len(digits) != 11:
            return None
    if len(digits) == 11 and digits.startswith("1"):
        digits = digits[1:]
    if len(digits) != 10 or not (digits.isascii() and digits.isdigit()):
        return None
    return digits


_NAME_ADDR_URIS: Final[dict[str, Uri]] = {}
_NAME_ADDR_URIS_SIZE: Final = 256


def name_addr_uri(value: str) -> Uri:
    """``parse_uri(parse_name_addr(value).uri)``, remembered for the next read of the same
    value: an emergency call reads its From twice (:func:`caller_line`, then the
    P-Asserted-Identity host of enrichment). The From carries the call's tag, so another
    call's From is another value; the table is cleared at its bound.

    Raises:
        SipError: as the parses do (nothing is remembered then).
    """
    uri = _NAME_ADDR_URIS.get(value)
    if uri is None:
        # Not through the parser's URI cache: this table keeps it for the call.
        uri = read_uri(name_addr_uri_text(value))
        if len(_NAME_ADDR_URIS) >= _NAME_ADDR_URIS_SIZE:
            _NAME_ADDR_URIS.clear()  # bounded, as the URI cache of the parser is
        _NAME_ADDR_URIS[value] = uri
    return uri


def _line_of(value: str) -> str | None:
    try:
        uri = name_addr_uri(value)
    except SipError:
        return None
    digits = dialled_digits(uri)
    return normalize_nanp(digits) if digits else None


def caller_line(request: Request) -> str | None:
    """The calling line as 10 NANP digits: the first usable PAI, else the From user."""
    for header in request.get_all("p-asserted-identity"):
        for value in split_values(header):
            line = _line_of(value)
            if line is not None:
                return line
    from_value = request.get("from")
    return _line_of(from_value) if from_value else None
