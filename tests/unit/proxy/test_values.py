"""The core's events and effects: dataclasses whose __init__ is written out.

dataclass keeps an __init__ the class defines, and compiled that one is native where the
generated one runs as Python (about 1,000 instructions more per object, and a call makes
some 25 of them). A field added to such a class must be added to its __init__ too.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from e911_sip.policy import enrich
from e911_sip.proxy import core
from e911_sip.sip import transaction

WRITTEN_OUT = [
    core.RequestRouted,
    core.EmergencyCall,
    core.EmergencyForwarded,
    core.FailOpen,
    core.Failover,
    core.CallCompleted,
    core.Shed,
    core.Evicted,
    core.Discarded,
    core.Recovered,
    core.TrunkProbed,
    core.TrunkStateChanged,
    core.Outgoing,
    transaction.Transmit,
    transaction.PassUp,
    transaction.Timeout,
    enrich.Enrichment,
]


@pytest.mark.parametrize("cls", WRITTEN_OUT, ids=lambda cls: cls.__name__)
def test_the_init_is_the_class_own_and_takes_every_field_in_order(cls: type) -> None:
    init = cls.__dict__["__init__"]
    code = getattr(init, "__code__", None)
    # The generated one is compiled from a string; the class's own is in its module (or,
    # compiled, native code with no __code__ at all).
    assert code is None or code.co_filename != "<string>"
    fields = dataclasses.fields(cls)
    if code is not None:
        parameters = list(inspect.signature(init).parameters.values())[1:]
        assert [p.name for p in parameters] == [f.name for f in fields]
        assert [p.default for p in parameters] == [
            inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
            for f in fields
        ]
        assert "self." + "\n        self.".join(f"{f.name} = {f.name}" for f in fields) in (
            inspect.getsource(init)
        )


def test_values_compare_and_print_as_dataclasses_do() -> None:
    peer = core.Peer("udp", "192.0.2.1", 5060)
    assert core.Outgoing(b"x", peer) == core.Outgoing(b"x", peer, None)
    assert core.Outgoing(b"x", peer, "z9hG4bK1") != core.Outgoing(b"x", peer)
    assert repr(core.Evicted(4, 0)) == "Evicted(transactions=4, contexts=0)"
    assert core.Discarded(reason="malformed", detail="", source=peer).source is peer
