"""The outbox: a small Protocol with SQLite (embedded) and PostgreSQL (replicas) behind it."""

from __future__ import annotations

from relay.errors import ConfigError
from relay.store.base import Store

__all__ = ["Store", "open_store"]


def open_store(url: str) -> Store:
    """The store a ``RELAY_STORE`` URL names (not yet opened)."""
    if url.startswith("sqlite:///"):
        from relay.store.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///") or "relay.db")
    raise ConfigError("RELAY_STORE", "expected sqlite:///path or postgresql://...")
