"""``python -m bench.chaos``: every scenario at full size, or ``--quick`` / ``--only NAME``."""

from __future__ import annotations

import sys

from bench.chaos.runner import main

sys.exit(main())
