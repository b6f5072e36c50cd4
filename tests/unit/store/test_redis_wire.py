"""The Redis store's own wire handling: commands, the store URL, and replies decoded record by
record (the parts that need no server; the rest is in tests/integration)."""

from __future__ import annotations

import pytest

from e911_sip.store.base import InvalidRecord, LocationRecord, StoreError
from e911_sip.store.redis import _Address, _pack, _record, _reply_error


def test_commands_are_resp_arrays_of_bulk_strings() -> None:
    assert _pack("HGETALL", "e911:line:3215551234") == (
        b"*2\r\n$7\r\nHGETALL\r\n$20\r\ne911:line:3215551234\r\n"
    )
    assert _pack("AUTH", None, "pw") == b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"


def test_store_url_gives_address_credentials_and_database() -> None:
    address = _Address("redis://reader:p%40ss@10.0.0.5:6380/3")
    assert (address.host, address.port, address.db, address.tls) == ("10.0.0.5", 6380, 3, None)
    assert address.setup() == [_pack("AUTH", "reader", "p@ss"), _pack("SELECT", "3")]
    assert _Address("redis://127.0.0.1:6379/0").setup() == []
    assert _Address("rediss://:secret@10.0.0.5/0").setup() == [_pack("AUTH", "secret")]
    assert _Address("rediss://10.0.0.5/0").tls is not None
    unix = _Address("unix:///run/redis.sock?db=2")
    assert (unix.unix_path, unix.db) == ("/run/redis.sock", 2)


def test_replies_are_decoded_record_by_record() -> None:
    fields = [b"provider_endpoint", b"555/abc", b"callback", b"3215550100"]
    assert _record(fields) == LocationRecord("555/abc", "3215550100")
    assert _record(dict(zip(fields[::2], fields[1::2], strict=True))) == LocationRecord(
        "555/abc", "3215550100"
    )
    assert _record([]) is None
    with pytest.raises(InvalidRecord, match="not UTF-8"):
        _record([b"provider_endpoint", b"555/\xff\xfe"])
    with pytest.raises(InvalidRecord, match="not UTF-8"):
        _record([b"\xc3(", b"x", b"provider_endpoint", b"555/abc"])
    with pytest.raises(InvalidRecord, match="account/endpoint"):
        _record([b"provider_endpoint", b"no-slash"])
    with pytest.raises(InvalidRecord, match="unexpected reply"):
        _record(b"a string")


def test_wrongtype_is_the_records_problem_other_errors_the_stores() -> None:
    wrongtype = _reply_error("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert isinstance(wrongtype, InvalidRecord)
    other = _reply_error("NOPERM this user has no permissions to run the 'hgetall' command")
    assert type(other) is StoreError and other.kind == "error"
