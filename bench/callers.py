"""The provisioned lines the load benchmark calls from, and how the trunk checks each call.

A benchmark whose every call comes from one line measures a cache, not the store. So each
call of ``bench/run_load.py`` comes from the next of ``count`` distinct lines (10,000 by
default), each provisioned with its own location, in the Redis schema of the README:

    HSET e911:line:NNNNNNNNNN provider_endpoint 777777/probeNNNNNNNNNN

The caller (``bench/scenarios/uac_load_lines.xml``) takes its From and P-Asserted-Identity
users from a SIPp injection file (``-inf``, SEQUENTIAL), each in one of the three forms a
softswitch writes a NANP line in (``+1NXXNXXXXXX``, ``1NXXNXXXXXX``, ``NXXNXXXXXX``; all nine
combinations in turn), so the proxy must normalise them to the 10-digit key. The emergency
trunk (``bench/scenarios/uas_load_lines.xml``) takes the 10 digits out of the From user and
checks that the INVITE carries that line's own Geolocation and callback; an INVITE that does
not is a *mismatch*, counted by SIPp as a failed check (``MISMATCH_COLUMNS``).

``bench/reference/kamailio.py check`` places one call of each form combination through
Kamailio with the same scenarios.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
CALLER_SCENARIO = SCENARIOS / "uac_load_lines.xml"
EMERGENCY_TRUNK_SCENARIO = SCENARIOS / "uas_load_lines.xml"

FIRST_LINE = 3_215_550_000
"""The lines are FIRST_LINE, FIRST_LINE + 1, ...: area code 321, exchange 555 and up."""
DEFAULT_LINES = 10_000
ENDPOINT_ACCOUNT = "777777"
CALLER_FORMS = ("+1{}", "1{}", "{}")
"""The three forms of a NANP line in From and P-Asserted-Identity."""
LINE_ORDER_SEED = 911
PROVISION_BATCH = 1000

MISMATCH_COLUMNS = (
    "FailedRegexpDoesntMatch(C)",
    "FailedRegexpShouldntMatch(C)",
    "FailedRegexpHdrNotFound(C)",
    "FailedTestDoesntMatch(C)",
    "FailedTestShouldntMatch(C)",
    "FailedStrcmpDoesntMatch(C)",
    "FailedStrcmpShouldntMatch(C)",
)
"""SIPp -trace_stat counters of a failed check: at the emergency trunk, an INVITE without its
own caller's location or callback."""


def line_numbers(count: int) -> list[str]:
    """The ``count`` 10-digit lines in calling order: shuffled, the same on every run."""
    lines = [str(FIRST_LINE + i) for i in range(count)]
    random.Random(LINE_ORDER_SEED).shuffle(lines)
    return lines


def endpoint_of(line: str) -> str:
    """The provider_endpoint provisioned for ``line``; uas_load_lines.xml expects it."""
    return f"{ENDPOINT_ACCOUNT}/probe{line}"


def injection_file(lines: Sequence[str]) -> str:
    """SIPp ``-inf`` text: one row per call, ``from user;PAI user;10-digit line``, the From
    and P-Asserted-Identity forms going through the nine combinations in turn."""
    rows = ["SEQUENTIAL"]
    for i, line in enumerate(lines):
        from_user = CALLER_FORMS[i % 3].format(line)
        pai_user = CALLER_FORMS[(i // 3) % 3].format(line)
        rows.append(f"{from_user};{pai_user};{line}")
    return "\n".join(rows) + "\n"


def seed_records(lines: Sequence[str]) -> dict[str, dict[str, str]]:
    """The same records as a memory-store seed file (``[store] seed_file``, JSON)."""
    return {line: {"provider_endpoint": endpoint_of(line)} for line in lines}


def provision(client: Any, lines: Sequence[str]) -> None:
    """HSET every line's record through a redis-py client, pipelined in batches.

    Raises:
        RuntimeError: Redis holds fewer keys afterwards than there are lines.
    """
    for start in range(0, len(lines), PROVISION_BATCH):
        pipe = client.pipeline(transaction=False)
        for line in lines[start : start + PROVISION_BATCH]:
            pipe.hset(f"e911:line:{line}", "provider_endpoint", endpoint_of(line))
        pipe.execute()
    stored = int(client.dbsize())
    if stored < len(lines):
        raise RuntimeError(f"redis-server holds {stored} keys after provisioning {len(lines)}")
