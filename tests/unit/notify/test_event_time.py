"""The notification's time text: what datetime writes, to the millisecond."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from e911_sip.notify.event import rfc3339


def test_rfc3339_is_what_datetime_writes_to_the_millisecond() -> None:
    def reference(epoch: float) -> str:
        moment = datetime.fromtimestamp(epoch, UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

    base = 1_796_000_000.0
    spread = random.Random(933)
    epochs = [spread.uniform(0, 4e9) for _ in range(5000)]
    epochs += [base + n / 7 for n in range(2000)]
    # Rounding edges: half a microsecond, the last microsecond of a second, before 1970.
    epochs += [base + 0.0005, base + 0.9995, base + 0.9999995, base + 0.0000005, 0.0, -1.5]
    epochs += [-0.0004, 1e9 + 0.9999994, 1e9 + 0.9999996]
    for epoch in epochs:
        assert rfc3339(epoch) == reference(epoch), epoch
    assert rfc3339(1_796_000_000.123456) == "2026-11-30T00:53:20.123Z"
