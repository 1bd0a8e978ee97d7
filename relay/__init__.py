"""sfox-relay: the sFOX enterprise users feed, relayed durably and in order as signed webhooks."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
