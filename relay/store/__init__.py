"""The outbox: its rules in :mod:`relay.store.core`, one Protocol per role in
:mod:`relay.store.base`, SQLite (embedded) and PostgreSQL (replicas) behind them."""

from __future__ import annotations

from relay.errors import ConfigError
from relay.store.base import (
    AdminStore,
    DispatchStore,
    HealthStore,
    IngestStore,
    ReconcileStore,
    Store,
)

__all__ = [
    "AdminStore",
    "DispatchStore",
    "HealthStore",
    "IngestStore",
    "ReconcileStore",
    "Store",
    "open_store",
]


def open_store(
    url: str,
    *,
    lease: float = 60.0,
    reorder_window: float = 1.0,
    schema: str | None = None,
    read_only: bool = False,
) -> Store:
    """The store a ``RELAY_STORE`` URL names (not yet opened).

    ``lease`` (``RELAY_LEASE``) is how long a PostgreSQL replica's claim lasts, and
    ``reorder_window`` (``RELAY_REORDER_WINDOW``) how long it holds what it stores after a
    (re)subscription; SQLite has a single daemon, one feed, and neither. ``schema``
    (``RELAY_PG_SCHEMA``) is the PostgreSQL schema that holds the tables; SQLite ignores it.
    ``read_only``: open an existing store without writing anything (`relay check`);
    PostgreSQL: read-only transactions.
    """
    if url.startswith("sqlite:///"):
        from relay.store.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///") or "relay.db", read_only=read_only)
    if url.startswith(("postgresql://", "postgres://")):
        from relay.store.postgres import PostgresStore

        return PostgresStore(
            url,
            lease=lease,
            reorder_window=reorder_window,
            schema=schema,
            read_only=read_only,
        )
    raise ConfigError("RELAY_STORE", "expected sqlite:///path or postgresql://...")
