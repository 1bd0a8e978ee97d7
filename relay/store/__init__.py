"""The outbox: a small Protocol with SQLite (embedded) and PostgreSQL (replicas) behind it."""

from __future__ import annotations

from relay.errors import ConfigError
from relay.store.base import Store

__all__ = ["Store", "open_store"]


def open_store(
    url: str, *, lease: float = 60.0, schema: str | None = None, read_only: bool = False
) -> Store:
    """The store a ``RELAY_STORE`` URL names (not yet opened).

    ``lease`` (``RELAY_LEASE``) is how long a PostgreSQL replica's claim lasts; SQLite has a
    single daemon and no leases. ``schema`` (``RELAY_PG_SCHEMA``) is the PostgreSQL schema
    that holds the tables; SQLite ignores it. ``read_only``: open an existing
    store without writing anything (`relay check`); PostgreSQL: read-only transactions.
    """
    if url.startswith("sqlite:///"):
        from relay.store.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///") or "relay.db", read_only=read_only)
    if url.startswith(("postgresql://", "postgres://")):
        from relay.store.postgres import PostgresStore

        return PostgresStore(url, lease=lease, schema=schema, read_only=read_only)
    raise ConfigError("RELAY_STORE", "expected sqlite:///path or postgresql://...")
