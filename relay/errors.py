"""One exception tree, rooted at :class:`RelayError`.

Messages never carry secret values: configuration errors name the variable and the reason,
store errors name the store by its redacted URL.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FeedAuthError",
    "FeedError",
    "RelayError",
    "StoreError",
    "StoreLockedError",
    "StoreSchemaError",
    "StoreUnavailableError",
    "TaskFailedError",
]


class RelayError(Exception):
    """Root of every error sfox-relay raises on purpose."""


class ConfigError(RelayError):
    """Invalid configuration: exit code 2, one line per error naming the variable and reason.

    ``variable`` and ``reason`` are the first error's; ``errors`` holds every one, so that an
    operator fixes them all in one round instead of one per restart.
    """

    def __init__(
        self, variable: str, reason: str, *, more: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.errors = ((variable, reason), *more)
        super().__init__("\n".join(f"{name}: {why}" for name, why in self.errors))
        self.variable = variable
        self.reason = reason


class FeedError(RelayError):
    """The sFOX feed misbehaved (bad handshake reply, timeout); the client reconnects."""


class FeedAuthError(FeedError):
    """sFOX rejected the API key; the client waits at least 60 s before trying again."""


class StoreError(RelayError):
    """The store failed in a way the caller cannot retry."""


class StoreUnavailableError(StoreError):
    """The store cannot be written right now (disk full, read-only, database down)."""


class StoreLockedError(StoreError):
    """Another `relay run` already holds this SQLite store."""


class StoreSchemaError(StoreError):
    """The store's schema is newer than this version of sfox-relay knows."""


class TaskFailedError(RelayError):
    """A supervised task kept failing: restarting it does not help, so the daemon exits 1."""

    def __init__(self, task: str, failures: int, window: float) -> None:
        super().__init__(f"task {task} failed {failures} times within {window:g}s")
        self.task = task
        self.failures = failures
