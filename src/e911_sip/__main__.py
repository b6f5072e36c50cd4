"""``python -m e911_sip``: the same as the ``e911-sip`` command."""

from __future__ import annotations

import sys

from e911_sip.cli import main

sys.exit(main())
