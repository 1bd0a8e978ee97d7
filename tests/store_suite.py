"""The contract every outbox implementation keeps, as tests (see the README).

Not collected by itself. A test module subclasses :class:`StoreContract` and provides two
fixtures:

- ``store``: a fresh, empty store, opened with ``open(daemon=True)`` and closed afterwards;
- ``reopen``: an async callable that closes the current store, opens a new store object on the
  same data with ``open(daemon=True)`` (what a restarted daemon does) and returns it.

The tests use only the ``Store`` Protocol, never SQL, so SQLite and PostgreSQL are held to the
same guarantees. Events are built the way the relay builds them: realistic sFOX users-feed
frames through ``parse_frame`` and ``prepare``, REST users through ``reconcile_event``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import pytest

from relay.codec import loads
from relay.events import (
    USERS_FEED,
    BadFrame,
    Message,
    NewEvent,
    parse_frame,
    prepare,
    reconcile_event,
)
from relay.store.base import (
    Attempt,
    Claim,
    DeliveryDetail,
    DeliveryInfo,
    EndpointStats,
    HealthRow,
    Outcome,
    Store,
    Target,
    UserState,
    parse_delivery_id,
)
from relay.tokens import unseal

__all__ = [
    "CRM",
    "SEAL_KEY",
    "TOKEN",
    "USER_A",
    "VAULT",
    "Reopen",
    "StoreContract",
    "bad_frame",
    "token_event",
    "user_event",
    "user_frame",
]

Reopen = Callable[[], Awaitable[Store]]

BALANCES_FEED = "private.enterprise.users.balances"
T0_NS = 1_717_005_327_995_988_841  # 19 digits, beyond 2**53: must survive exactly
USER_A = "client_09e487c9-9b75-4ef5-be06-b3e5661f68e5"
USER_B = "client_5b1f0c2e-7d3a-4a8e-9c61-2f4e8d9b0a17"
USER_C = "client_c3d2e1f0-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
USER_D = "client_d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70"
TOKEN = "2000611e8c3f4a9b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a3979"
SEAL_KEY = bytes(range(32))

CRM = Target("crm")  # every feed, every status, token stripped
VAULT = Target("vault", wants_token=True)  # needs the user token (forward / encrypt)

PENDING_REQ = {"sms": True, "email": True}
VERIFIED_REQ = {"sms": False, "email": False}


# -- building events --------------------------------------------------------------------------


def user_frame(
    user_id: str,
    n: int,
    *,
    status: str = "PENDING",
    requirements: dict[str, bool] | None = None,
    token: bool = False,
) -> str:
    """A users-feed frame as sFOX sends it; ``n`` makes its sequence and timestamp unique."""
    payload: dict[str, Any] = {
        "user_id": user_id,
        "first_name": "Brando",
        "last_name": "Marks",
        "email": "brando@example.com",
        "phone_number": "+12223334444",
        "account_role": "Client",
        "account_type": "individual",
        "status": status,
    }
    if token:
        payload["user_token"] = {
            "token": TOKEN,
            "expires": "2024-05-30T17:55:27.981Z",
            "partner_user_id": user_id,
        }
    if requirements is None:
        requirements = PENDING_REQ if status == "PENDING" else VERIFIED_REQ
    payload["requirements"] = requirements
    message = {"sequence": n, "recipient": USERS_FEED, "timestamp": T0_NS + n, "payload": payload}
    return json.dumps(message)


def balance_frame(n: int) -> str:
    """A frame of another enterprise feed: no user_id as far as ordering goes."""
    payload = {"user_id": USER_A, "currency": "btc", "available": "0.5", "balance": "1.25"}
    message = {
        "sequence": n,
        "recipient": BALANCES_FEED,
        "timestamp": T0_NS + n,
        "payload": payload,
    }
    return json.dumps(message)


def feed_event(frame: str, *, seal_key: bytes | None = None) -> NewEvent:
    message = parse_frame(frame)
    assert isinstance(message, Message), message
    return prepare(message, seal_key=seal_key)


def user_event(user_id: str, n: int, *, status: str = "PENDING") -> NewEvent:
    return feed_event(user_frame(user_id, n, status=status))


def token_event(user_id: str, n: int, *, seal_key: bytes | None) -> NewEvent:
    return feed_event(user_frame(user_id, n, token=True), seal_key=seal_key)


def balance_event(n: int) -> NewEvent:
    return feed_event(balance_frame(n))


def rest_user(user_id: str, status: str, requirements: dict[str, bool]) -> dict[str, Any]:
    """A user as ``GET /v1/enterprise/users`` lists it (no user_token, with advisor_user_id)."""
    return {
        "account_type": "individual",
        "account_role": "Client",
        "user_id": user_id,
        "advisor_user_id": None,
        "email": "brando@example.com",
        "first_name": "Brando",
        "last_name": "Marks",
        "phone_number": "+12223334444",
        "status": status,
        "requirements": requirements,
    }


def bad_frame() -> BadFrame:
    """A users-feed frame without user_id that carries a token: quarantined, token redacted."""
    frame = json.loads(user_frame(USER_A, 99, token=True))
    del frame["payload"]["user_id"]
    bad = parse_frame(json.dumps(frame))
    assert isinstance(bad, BadFrame), bad
    return bad


# -- verdicts ---------------------------------------------------------------------------------


def delivered(claim: Claim, at: float) -> Outcome:
    return Outcome(claim.delivery_id, "delivered", at, Attempt(at, 200, 0.05))


def retry(claim: Claim, at: float, next_at: float, status: int = 503) -> Outcome:
    return Outcome(claim.delivery_id, "pending", next_at, Attempt(at, status, 0.05))


def dead(claim: Claim, at: float, status: int = 410) -> Outcome:
    return Outcome(claim.delivery_id, "dead", at, Attempt(at, status, 0.05, None, "gone"))


def released(claim: Claim, at: float) -> Outcome:
    return Outcome(claim.delivery_id, "released", at, None)


# -- reading back -----------------------------------------------------------------------------


def key(info: DeliveryInfo) -> int:
    number = parse_delivery_id(info.id)
    assert number is not None, info.id
    return number


def event_ids(items: Iterable[Claim | DeliveryInfo]) -> set[str]:
    return {item.event_id for item in items}


async def everything(store: Store, **filters: Any) -> list[DeliveryInfo]:
    return await store.list_deliveries(limit=10_000, **filters)


async def delivery_of(store: Store, endpoint: str, event: NewEvent) -> DeliveryInfo:
    """The one delivery of ``event`` to ``endpoint``."""
    found = [d for d in await everything(store, endpoint=endpoint) if d.event_id == event.event_id]
    assert len(found) == 1, found
    return found[0]


async def detail(store: Store, delivery_id: int) -> DeliveryDetail:
    found = await store.get_delivery(delivery_id)
    assert found is not None, delivery_id
    return found


async def claim_one(store: Store, endpoint: str, now: float) -> Claim:
    claims = await store.claim(endpoint, now, 100)
    assert len(claims) == 1, claims
    return claims[0]


def stats_of(stats: Sequence[EndpointStats], endpoint: str) -> EndpointStats:
    found = [s for s in stats if s.endpoint == endpoint]
    assert len(found) == 1, stats
    return found[0]


class StoreContract:
    """Mix into a ``Test...`` class next to ``store`` and ``reopen`` fixtures."""

    #: How long after a daemon re-open the previous daemon's claims may be taken again
    #: (SQLite: at once; a lease-based store overrides it with its lease).
    crash_recovery_after: float = 0.0

    @pytest.fixture
    def now(self) -> float:
        return 1_717_005_400.0

    # -- append -------------------------------------------------------------------------------

    async def test_append_stores_new_events_with_their_exact_body(
        self, store: Store, now: float
    ) -> None:
        first, second = user_event(USER_A, 1), user_event(USER_B, 2)
        result = await store.append([first, second], [CRM], now)

        assert result.stored == [first, second]
        assert (result.duplicates, result.stale, result.superseded) == (0, 0, {})
        info = await delivery_of(store, "crm", first)
        assert (info.endpoint, info.user_id, info.state) == ("crm", USER_A, "pending")
        assert (info.source, info.status, info.attempts) == ("feed", "PENDING", 0)
        assert info.created_at == now
        body = (await detail(store, key(info))).body
        assert body == first.body.decode()  # key order, unknown fields, exact integers
        assert loads(body)["timestamp"] == T0_NS + 1

    async def test_append_counts_a_repeated_event_as_duplicate(
        self, store: Store, now: float
    ) -> None:
        event = user_event(USER_A, 1)
        await store.append([event], [CRM], now)

        again = await store.append([user_event(USER_A, 1)], [CRM], now + 1)

        assert again.stored == []
        assert again.duplicates == 1
        assert len(await everything(store)) == 1

    async def test_append_counts_duplicates_within_one_batch(
        self, store: Store, now: float
    ) -> None:
        event = user_event(USER_A, 1)
        other = user_event(USER_B, 2)

        result = await store.append([event, other, user_event(USER_A, 1)], [CRM], now)

        assert result.stored == [event, other]
        assert result.duplicates == 1
        assert event_ids(await everything(store)) == {event.event_id, other.event_id}
        assert len(await everything(store)) == 2

    async def test_an_event_without_a_user_twice_in_one_batch_is_stored_once(
        self, store: Store, now: float
    ) -> None:
        # Regression: PostgreSQL inserts a run set-wise, and runs split only per user, so a
        # repeated user-less frame in one batch once got a second delivery (sent twice).
        event = balance_event(1)

        result = await store.append([event, balance_event(1)], [CRM], now)

        assert result.stored == [event]
        assert result.duplicates == 1
        assert len(await everything(store)) == 1

    async def test_append_with_the_same_sequence_and_timestamp_but_new_status_is_new(
        self, store: Store, now: float
    ) -> None:
        pending = feed_event(user_frame(USER_A, 1, status="PENDING"))
        verified = feed_event(user_frame(USER_A, 1, status="VERIFIED"))

        result = await store.append([pending, verified], [CRM], now)

        assert result.stored == [pending, verified]
        assert result.duplicates == 0

    async def test_append_fans_out_one_delivery_per_matching_target(
        self, store: Store, now: float
    ) -> None:
        targets = [
            Target("all"),
            Target("users", feeds=frozenset({USERS_FEED})),
            Target("verified", statuses=frozenset({"VERIFIED"})),
            Target("balances", feeds=frozenset({BALANCES_FEED})),
        ]
        pending = user_event(USER_A, 1, status="PENDING")
        verified = user_event(USER_B, 2, status="VERIFIED")
        balance = balance_event(3)

        await store.append([pending, verified, balance], targets, now)

        expected = {
            "all": {pending.event_id, verified.event_id, balance.event_id},
            "users": {pending.event_id, verified.event_id},
            "verified": {verified.event_id},
            "balances": {balance.event_id},
        }
        for name, wanted in expected.items():
            deliveries = await everything(store, endpoint=name)
            assert event_ids(deliveries) == wanted, name
            assert len(deliveries) == len(wanted), name  # one per (event, endpoint)

    async def test_first_delay_postpones_the_first_claim(self, store: Store, now: float) -> None:
        event = user_event(USER_A, 1)
        await store.append([event], [Target("slow", first_delay=30.0), CRM], now)

        assert await store.claim("slow", now, 10) == []
        assert await store.claim("slow", now + 29.9, 10) == []
        assert [c.event_id for c in await store.claim("slow", now + 30.0, 10)] == [event.event_id]
        assert [c.event_id for c in await store.claim("crm", now, 10)] == [event.event_id]

    # -- claim --------------------------------------------------------------------------------

    async def test_claim_returns_due_deliveries_of_that_endpoint_up_to_limit(
        self, store: Store, now: float
    ) -> None:
        events = [balance_event(n) for n in range(1, 6)]
        await store.append(events[:3], [CRM, VAULT], now)
        await store.append(events[3:], [CRM, VAULT], now + 1)

        claims = await store.claim("crm", now + 1, 2)

        assert len(claims) == 2
        assert {c.endpoint for c in claims} == {"crm"}
        assert event_ids(claims) == {events[0].event_id, events[1].event_id}  # oldest first
        assert await store.claim("nowhere", now + 1, 10) == []

    async def test_claim_skips_deliveries_not_yet_due(self, store: Store, now: float) -> None:
        early, late = balance_event(1), balance_event(2)
        await store.append([early], [CRM], now)
        await store.append([late], [CRM], now + 10)

        first = await store.claim("crm", now + 5, 10)
        assert (event_ids(first), first.next_due) == ({early.event_id}, now + 10)
        assert event_ids(await store.claim("crm", now + 10, 10)) == {late.event_id}

    async def test_what_a_commit_takes_is_in_flight_and_only_where_the_store_takes(
        self, store: Store, now: float
    ) -> None:
        """``take`` is a may: a store that takes (``takes``) marks due lane heads in flight
        and says whether it left any; one that does not takes nothing and leaves them all."""
        a1, a2, b1 = user_event(USER_A, 1), user_event(USER_A, 2), user_event(USER_B, 3)
        result = await store.append([a1, a2, b1], [CRM], now, take={"crm": 10})
        left = await store.claim("crm", now, 10)
        if store.takes:
            assert event_ids(result.taken) == {a1.event_id, b1.event_id}
            assert (left, result.claimable) == ([], False)
        else:
            assert (result.taken, result.claimable) == ([], True)
            assert event_ids(left) == {a1.event_id, b1.event_id}

    async def test_a_claim_says_when_more_comes_due_unless_it_took_all_it_could(
        self, store: Store, now: float
    ) -> None:
        assert (await store.claim("crm", now, 10)).next_due is None  # nothing at all
        events = [balance_event(n) for n in range(1, 4)]
        await store.append(events[:2], [CRM], now)
        await store.append(events[2:], [CRM], now + 60)

        full = await store.claim("crm", now, 1)
        assert (len(full), full.next_due) == (1, None)  # more may be due right now
        rest = await store.claim("crm", now, 10)
        assert (len(rest), rest.next_due) == (1, now + 60)

    async def test_claim_marks_deliveries_in_flight(self, store: Store, now: float) -> None:
        events = [balance_event(n) for n in range(1, 4)]
        await store.append(events, [CRM], now)

        first = await store.claim("crm", now, 2)
        second = await store.claim("crm", now, 10)
        third = await store.claim("crm", now + 3600, 10)

        assert len(first) == 2
        assert event_ids(second) == {events[2].event_id}
        assert {c.delivery_id for c in first}.isdisjoint({c.delivery_id for c in second})
        assert third == []
        infos = await everything(store)
        assert {i.state for i in infos} == {"pending"}  # in flight is shown as pending

    async def test_claim_carries_what_the_dispatcher_needs(self, store: Store, now: float) -> None:
        sealed = token_event(USER_A, 1, seal_key=SEAL_KEY)
        reconciled = reconcile_event(
            rest_user(USER_B, "VERIFIED", VERIFIED_REQ), after=None, now_ns=T0_NS + 50
        )
        await store.append([sealed, reconciled], [VAULT], now)

        claims = {c.event_id: c for c in await store.claim("vault", now, 10)}

        feed = claims[sealed.event_id]
        assert (feed.endpoint, feed.user_id, feed.source) == ("vault", USER_A, "feed")
        assert (feed.body, feed.has_token, feed.attempts) == (sealed.body, True, 0)
        assert feed.created_at == now
        info = await delivery_of(store, "vault", sealed)
        assert feed.delivery_id == key(info)
        rest = claims[reconciled.event_id]
        assert (rest.source, rest.user_id, rest.has_token) == ("reconcile", USER_B, False)
        assert rest.body == reconciled.body

    # -- per-lane order -----------------------------------------------------------------------

    async def _three_for_a_one_for_b(self, store: Store, now: float) -> list[NewEvent]:
        events = [
            user_event(USER_A, 1),
            user_event(USER_A, 2, status="VERIFIED"),
            user_event(USER_B, 3),
            user_event(USER_A, 4, status="UNSUPPORTED"),
        ]
        await store.append(events[:2], [CRM], now)
        await store.append(events[2:], [CRM], now)
        return [events[0], events[1], events[3], events[2]]  # A1, A2, A3, B1

    async def test_lane_lets_only_the_oldest_of_each_user_go(
        self, store: Store, now: float
    ) -> None:
        a1, _a2, _a3, b1 = await self._three_for_a_one_for_b(store, now)

        claims = await store.claim("crm", now, 10)

        assert event_ids(claims) == {a1.event_id, b1.event_id}
        assert len(claims) == 2
        assert len(await everything(store, state="pending")) == 4

    async def test_delivered_promotes_the_next_of_the_lane(self, store: Store, now: float) -> None:
        a1, a2, _a3, _b1 = await self._three_for_a_one_for_b(store, now)
        claims = {c.event_id: c for c in await store.claim("crm", now, 10)}

        await store.record([delivered(claims[a1.event_id], now + 1)], now + 1)

        assert event_ids(await store.claim("crm", now + 1, 10)) == {a2.event_id}

    async def test_retry_keeps_the_rest_of_the_lane_waiting(self, store: Store, now: float) -> None:
        a1, a2, a3, _b1 = await self._three_for_a_one_for_b(store, now)
        claims = {c.event_id: c for c in await store.claim("crm", now, 10)}
        await store.record([delivered(claims[a1.event_id], now + 1)], now + 1)
        second = await claim_one(store, "crm", now + 1)
        assert second.event_id == a2.event_id

        await store.record([retry(second, now + 2, next_at=now + 60)], now + 2)

        assert await store.claim("crm", now + 30, 10) == []  # A3 waits behind A2
        again = await claim_one(store, "crm", now + 60)
        assert (again.event_id, again.attempts) == (a2.event_id, 1)
        await store.record([delivered(again, now + 61)], now + 61)
        assert (await claim_one(store, "crm", now + 61)).event_id == a3.event_id

    async def test_dead_promotes_the_next_of_the_lane(self, store: Store, now: float) -> None:
        a1, a2, _a3, _b1 = await self._three_for_a_one_for_b(store, now)
        claims = {c.event_id: c for c in await store.claim("crm", now, 10)}

        await store.record([dead(claims[a1.event_id], now + 1)], now + 1)

        assert event_ids(await store.claim("crm", now + 1, 10)) == {a2.event_id}
        assert (await delivery_of(store, "crm", a1)).state == "dead"

    async def test_users_never_block_each_other(self, store: Store, now: float) -> None:
        a1, b1, a2, b2 = (
            user_event(USER_A, 1),
            user_event(USER_B, 2),
            user_event(USER_A, 3, status="VERIFIED"),
            user_event(USER_B, 4, status="VERIFIED"),
        )
        await store.append([a1, b1, a2, b2], [CRM], now)
        claims = {c.event_id: c for c in await store.claim("crm", now, 10)}
        assert set(claims) == {a1.event_id, b1.event_id}

        await store.record(
            [
                retry(claims[a1.event_id], now + 1, next_at=now + 600),
                delivered(claims[b1.event_id], now + 1),
            ],
            now + 1,
        )

        b_next = await claim_one(store, "crm", now + 2)
        assert b_next.event_id == b2.event_id
        await store.record([delivered(b_next, now + 3)], now + 3)
        assert await store.claim("crm", now + 3, 10) == []
        assert (await claim_one(store, "crm", now + 600)).event_id == a1.event_id

    async def test_endpoints_never_block_each_other(self, store: Store, now: float) -> None:
        a1, a2 = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([a1, a2], [CRM, VAULT], now)
        stuck = await claim_one(store, "crm", now)
        await store.record([retry(stuck, now + 1, next_at=now + 600)], now + 1)

        first = await claim_one(store, "vault", now + 1)
        assert first.event_id == a1.event_id
        await store.record([delivered(first, now + 2)], now + 2)
        assert (await claim_one(store, "vault", now + 2)).event_id == a2.event_id
        assert await store.claim("crm", now + 2, 10) == []

    async def test_events_without_user_never_wait(self, store: Store, now: float) -> None:
        events = [balance_event(n) for n in range(1, 4)]
        await store.append(events, [CRM], now)

        first = await store.claim("crm", now, 1)
        rest = await store.claim("crm", now, 10)

        assert len(first) == 1
        assert first[0].user_id is None
        assert event_ids(first) | event_ids(rest) == {e.event_id for e in events}
        assert len(rest) == 2

    async def test_lane_order_holds_within_one_batch(self, store: Store, now: float) -> None:
        events = [user_event(USER_A, n, status=s) for n, s in ((1, "PENDING"), (2, "VERIFIED"))]
        await store.append(events, [CRM], now)

        seen: list[str] = []
        for step in range(2):
            claim = await claim_one(store, "crm", now + step)
            seen.append(claim.event_id)
            await store.record([delivered(claim, now + step)], now + step)

        assert seen == [e.event_id for e in events]

    # -- record -------------------------------------------------------------------------------

    async def test_record_counts_and_keeps_every_attempt(self, store: Store, now: float) -> None:
        await store.append([user_event(USER_A, 1)], [CRM], now)
        claim = await claim_one(store, "crm", now)
        busy = Attempt(now + 1, 503, 0.25, None, '{"error":"busy"}')
        timeout = Attempt(now + 61, None, 10.0, "timed out after 10 s", None)
        ok = Attempt(now + 181, 204, 0.04, None, "")

        await store.record([Outcome(claim.delivery_id, "pending", now + 60, busy)], now + 1)
        first = await detail(store, claim.delivery_id)
        assert (first.info.state, first.info.attempts, first.attempts) == ("pending", 1, [busy])
        assert (first.info.next_attempt_at, first.info.last_status) == (now + 60, 503)
        assert await store.claim("crm", now + 59, 10) == []

        claim = await claim_one(store, "crm", now + 60)
        assert claim.attempts == 1
        await store.record([Outcome(claim.delivery_id, "pending", now + 180, timeout)], now + 61)
        claim = await claim_one(store, "crm", now + 180)
        await store.record([Outcome(claim.delivery_id, "delivered", now + 181, ok)], now + 181)

        final = await detail(store, claim.delivery_id)
        assert final.attempts == [busy, timeout, ok]
        assert (final.info.state, final.info.attempts) == ("delivered", 3)
        assert (final.info.last_status, final.info.next_attempt_at) == (204, None)
        assert final.info.updated_at == now + 181

    async def test_record_keeps_the_error_of_a_failed_attempt(
        self, store: Store, now: float
    ) -> None:
        await store.append([user_event(USER_A, 1)], [CRM], now)
        claim = await claim_one(store, "crm", now)
        refused = Attempt(now + 1, None, 0.01, "connection refused", None)

        await store.record([Outcome(claim.delivery_id, "dead", now + 1, refused)], now + 1)

        info = (await detail(store, claim.delivery_id)).info
        assert (info.state, info.attempts, info.last_status) == ("dead", 1, None)
        assert info.last_error == "connection refused"

    async def test_released_returns_to_pending_without_using_an_attempt(
        self, store: Store, now: float
    ) -> None:
        a1, a2 = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([a1, a2], [CRM], now)
        claim = await claim_one(store, "crm", now)

        await store.record([released(claim, now + 1)], now + 1)

        info = await detail(store, claim.delivery_id)
        assert (info.info.state, info.info.attempts, info.attempts) == ("pending", 0, [])
        again = await claim_one(store, "crm", now + 1)  # A2 still waits behind A1
        assert (again.delivery_id, again.event_id, again.attempts) == (
            claim.delivery_id,
            a1.event_id,
            0,
        )

    # -- crash recovery -----------------------------------------------------------------------

    async def test_daemon_reopen_makes_in_flight_deliveries_claimable_again(
        self, store: Store, reopen: Reopen, now: float
    ) -> None:
        a1, b1 = user_event(USER_A, 1), user_event(USER_B, 2)
        a2 = user_event(USER_A, 3, status="VERIFIED")
        await store.append([a1, b1, a2], [CRM], now)
        before = await store.claim("crm", now, 10)
        assert event_ids(before) == {a1.event_id, b1.event_id}

        store = await reopen()

        after = await store.claim("crm", now + self.crash_recovery_after, 10)
        assert {c.delivery_id for c in after} == {c.delivery_id for c in before}
        assert {c.attempts for c in after} == {0}  # a crash uses no attempt
        assert len(await everything(store, state="pending")) == 3  # A2 still waits

    # -- listing ------------------------------------------------------------------------------

    async def _one_of_each_state(self, store: Store, now: float) -> dict[str, NewEvent]:
        """On ``crm``: delivered, dead, in flight, waiting and pending deliveries."""
        events = {
            "delivered": user_event(USER_A, 1),
            "dead": user_event(USER_B, 2),
            "inflight": user_event(USER_C, 3),
            "waiting": user_event(USER_C, 4, status="VERIFIED"),
            "pending": user_event(USER_D, 5),
        }
        await store.append(list(events.values())[:4], [CRM], now)
        claims = {c.event_id: c for c in await store.claim("crm", now, 10)}
        await store.record(
            [
                delivered(claims[events["delivered"].event_id], now + 1),
                dead(claims[events["dead"].event_id], now + 1),
            ],
            now + 1,
        )
        await store.append([events["pending"]], [CRM, VAULT], now + 2)
        return events

    async def test_list_filters_by_state(self, store: Store, now: float) -> None:
        events = await self._one_of_each_state(store, now)

        pending = await everything(store, state="pending", endpoint="crm")
        assert event_ids(pending) == {
            events[s].event_id for s in ("inflight", "waiting", "pending")
        }
        assert {d.state for d in pending} == {"pending"}
        dead_ones = await everything(store, state="dead")
        assert event_ids(dead_ones) == {events["dead"].event_id}
        assert dead_ones[0].next_attempt_at is None
        done = await everything(store, state="delivered")
        assert event_ids(done) == {events["delivered"].event_id}
        assert await everything(store, state="superseded") == []

    async def test_list_filters_by_endpoint_and_user(self, store: Store, now: float) -> None:
        events = await self._one_of_each_state(store, now)

        assert event_ids(await everything(store, endpoint="vault")) == {events["pending"].event_id}
        assert len(await everything(store, endpoint="crm")) == 5
        by_user = await everything(store, user_id=USER_C)
        assert event_ids(by_user) == {events["inflight"].event_id, events["waiting"].event_id}
        assert {d.user_id for d in by_user} == {USER_C}
        assert len(await everything(store, user_id=USER_D)) == 2
        assert len(await everything(store, user_id=USER_D, endpoint="vault")) == 1
        assert await everything(store, user_id="client_nobody") == []

    async def test_list_is_newest_first_and_pages_with_before(
        self, store: Store, now: float
    ) -> None:
        for n in range(1, 6):
            await store.append([balance_event(n)], [CRM], now + n)

        whole = await everything(store)
        keys = [key(d) for d in whole]
        assert keys == sorted(keys, reverse=True)
        assert [d.created_at for d in whole] == [now + n for n in range(5, 0, -1)]

        pages: list[list[int]] = []
        before: int | None = None
        while True:
            page = await store.list_deliveries(limit=2, before=before)
            if not page:
                break
            pages.append([key(d) for d in page])
            before = key(page[-1])
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [k for page in pages for k in page] == keys

    async def test_delivery_ids_are_opaque_strings(self, store: Store, now: float) -> None:
        await store.append([user_event(USER_A, 1)], [CRM], now)
        [info] = await everything(store)

        assert re.fullmatch(r"dlv_[0-9]+", info.id)
        number = key(info)
        assert (await detail(store, number)).info == info
        assert (await claim_one(store, "crm", now)).delivery_id == number
        assert await store.get_delivery(number + 1_000_000) is None
        assert parse_delivery_id(info.event_id) is None

    # -- replay -------------------------------------------------------------------------------

    async def _dead_after_two_attempts(self, store: Store, now: float) -> Claim:
        claim = await claim_one(store, "crm", now)
        await store.record([retry(claim, now + 1, next_at=now + 10)], now + 1)
        claim = await claim_one(store, "crm", now + 10)
        await store.record([dead(claim, now + 11)], now + 11)
        return claim

    async def test_replay_requeues_a_dead_delivery_with_a_fresh_schedule(
        self, store: Store, now: float
    ) -> None:
        event = user_event(USER_A, 1)
        await store.append([event], [CRM], now)
        claim = await self._dead_after_two_attempts(store, now)
        assert (await detail(store, claim.delivery_id)).info.attempts == 2

        count = await store.replay(ids=[claim.delivery_id], now=now + 100)

        assert count == 1
        replayed = await detail(store, claim.delivery_id)
        info = replayed.info
        # attempts counts the attempt records, which the replay keeps; the fresh schedule
        # shows in the claim's own position (0 below).
        assert (info.state, info.attempts, info.next_attempt_at) == ("pending", 2, now + 100)
        assert len(replayed.attempts) == info.attempts
        assert info.event_id == event.event_id
        assert await store.claim("crm", now + 99, 10) == []
        again = await claim_one(store, "crm", now + 100)
        assert (again.delivery_id, again.event_id, again.attempts) == (
            claim.delivery_id,
            event.event_id,
            0,
        )
        assert again.body == event.body

    async def test_replay_requeues_a_delivered_delivery(self, store: Store, now: float) -> None:
        event = user_event(USER_A, 1)
        await store.append([event], [CRM], now)
        claim = await claim_one(store, "crm", now)
        await store.record([delivered(claim, now + 1)], now + 1)

        assert await store.replay(ids=[claim.delivery_id], now=now + 50) == 1

        info = (await detail(store, claim.delivery_id)).info
        assert (info.state, info.attempts, info.next_attempt_at) == ("pending", 1, now + 50)
        assert (await claim_one(store, "crm", now + 50)).event_id == event.event_id

    async def test_filter_by_event_id(self, store: Store, now: float) -> None:
        a1, b1 = user_event(USER_A, 1), user_event(USER_B, 2)
        await store.append([a1, b1], [CRM, VAULT], now)
        found = await everything(store, event_id=a1.event_id)
        assert {(d.endpoint, d.event_id) for d in found} == {
            ("crm", a1.event_id),
            ("vault", a1.event_id),
        }
        assert await everything(store, event_id="evt_" + "0" * 64) == []
        claim, other = await store.claim("crm", now, 1), await store.claim("crm", now, 1)
        await store.record([dead(claim[0], now + 1), delivered(other[0], now + 1)], now + 1)
        assert await store.replay(event_id="evt_" + "0" * 64, now=now + 2) == 0
        assert await store.replay(state="dead", event_id=other[0].event_id, now=now + 2) == 0
        assert await store.replay(event_id=claim[0].event_id, now=now + 2) == 1

    async def test_retry_now_makes_a_waiting_retry_due_without_an_attempt(
        self, store: Store, now: float
    ) -> None:
        a1, b1 = user_event(USER_A, 1), user_event(USER_B, 2)
        await store.append([a1, b1], [CRM], now)
        [first], [second] = await store.claim("crm", now, 1), await store.claim("crm", now, 1)
        await store.record([retry(first, now + 1, next_at=now + 3600)], now + 1)
        await store.record([retry(second, now + 1, next_at=now + 3600)], now + 1)
        assert await store.claim("crm", now + 2, 10) == []

        count = await store.retry_now(user_id=first.user_id, now=now + 2)

        assert count == 1
        again = await claim_one(store, "crm", now + 2)
        assert (again.delivery_id, again.attempts) == (first.delivery_id, 1)
        assert await store.claim("crm", now + 2, 10) == []  # the other one still waits
        assert await store.retry_now(now=now + 3) == 1  # everything: the second
        assert await store.retry_now(now=now + 3) == 0  # nothing is waiting any more

    async def test_replay_leaves_pending_deliveries_alone(self, store: Store, now: float) -> None:
        a1, a2, b1 = (
            user_event(USER_A, 1),
            user_event(USER_A, 2, status="VERIFIED"),
            user_event(USER_B, 3),
        )
        await store.append([a1, a2, b1], [CRM], now)
        inflight = await store.claim("crm", now, 1)
        assert event_ids(inflight) == {a1.event_id}
        ids = [key(d) for d in await everything(store)]

        assert await store.replay(ids=ids, now=now + 5) == 0
        assert await store.replay(state="pending", now=now + 5) == 0
        assert await store.replay(endpoint="crm", now=now + 5) == 0

        assert event_ids(await store.claim("crm", now + 5, 10)) == {b1.event_id}  # A1 in flight
        assert (await detail(store, inflight[0].delivery_id)).info.next_attempt_at != now + 5

    async def test_replay_by_filter_counts_what_it_requeued(self, store: Store, now: float) -> None:
        events = [user_event(u, n) for n, u in enumerate((USER_A, USER_B, USER_C), start=1)]
        await store.append(events, [CRM, VAULT], now)
        for endpoint in ("crm", "vault"):
            claims = {c.event_id: c for c in await store.claim(endpoint, now, 10)}
            a, b, c = (claims[e.event_id] for e in events)
            await store.record([dead(a, now + 1), dead(b, now + 1), delivered(c, now + 1)], now + 1)

        assert await store.replay(state="dead", endpoint="crm", now=now + 5) == 2

        assert len(await everything(store, endpoint="crm", state="pending")) == 2
        assert len(await everything(store, endpoint="crm", state="delivered")) == 1
        assert len(await everything(store, endpoint="vault", state="dead")) == 2
        assert len(await store.claim("crm", now + 5, 10)) == 2
        assert await store.replay(state="dead", endpoint="crm", now=now + 6) == 0
        assert await store.replay(state="dead", user_id=USER_A, now=now + 6) == 1  # vault's

    async def test_replayed_delivery_waits_while_its_lane_is_busy(
        self, store: Store, now: float
    ) -> None:
        a1, a2 = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([a1, a2], [CRM], now)
        first = await claim_one(store, "crm", now)
        await store.record([dead(first, now + 1)], now + 1)
        second = await claim_one(store, "crm", now + 1)
        assert second.event_id == a2.event_id

        assert await store.replay(ids=[first.delivery_id], now=now + 2) == 1

        assert await store.claim("crm", now + 2, 10) == []  # A2 is in flight
        assert (await detail(store, first.delivery_id)).info.state == "pending"
        await store.record([delivered(second, now + 3)], now + 3)
        assert (await claim_one(store, "crm", now + 3)).event_id == a1.event_id

    async def test_replayed_delivery_goes_after_later_deliveries_of_its_lane(
        self, store: Store, now: float
    ) -> None:
        a1, a2, a3 = (
            user_event(USER_A, 1),
            user_event(USER_A, 2, status="VERIFIED"),
            user_event(USER_A, 3, status="UNSUPPORTED"),
        )
        await store.append([a1, a2, a3], [CRM], now)
        first = await claim_one(store, "crm", now)
        await store.record([dead(first, now + 1)], now + 1)
        second = await claim_one(store, "crm", now + 1)
        await store.replay(ids=[first.delivery_id], now=now + 2)

        seen: list[str] = []
        await store.record([delivered(second, now + 3)], now + 3)
        for step in (4, 5):
            claim = await claim_one(store, "crm", now + step)
            seen.append(claim.event_id)
            await store.record([delivered(claim, now + step)], now + step)

        assert seen == [a3.event_id, a1.event_id]

    async def test_attempts_after_a_replay_are_listed_after_the_earlier_ones(
        self, store: Store, now: float
    ) -> None:
        await store.append([user_event(USER_A, 1)], [CRM], now)
        claim = await self._dead_after_two_attempts(store, now)
        await store.replay(ids=[claim.delivery_id], now=now + 100)
        claim = await claim_one(store, "crm", now + 100)
        ok = Attempt(now + 101, 200, 0.03)

        await store.record([Outcome(claim.delivery_id, "delivered", now + 101, ok)], now + 101)

        found = await detail(store, claim.delivery_id)
        # The count is honest: every attempt record, the replayed ones included.
        assert found.info.attempts == len(found.attempts) == 3
        assert found.attempts[-1] == ok
        assert found.attempts.count(ok) == 1

    # -- reconciliation -----------------------------------------------------------------------

    async def test_user_states_follow_stored_events(self, store: Store, now: float) -> None:
        pending, verified = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([pending, balance_event(3)], [CRM], now)
        assert await store.user_states() == {
            USER_A: UserState(USER_A, "PENDING", pending.requirements, pending.event_id, "feed")
        }

        await store.append([verified], [CRM], now + 1)

        state = (await store.user_states())[USER_A]
        assert (state.status, state.event_id, state.source) == (
            "VERIFIED",
            verified.event_id,
            "feed",
        )
        assert state.requirements == '{"email":false,"sms":false}'  # canonical JSON

    async def test_record_baseline_stores_states_without_events(
        self, store: Store, now: float
    ) -> None:
        states = [
            UserState(USER_A, "VERIFIED", '{"email":false,"sms":false}', None, "baseline"),
            UserState(USER_B, "PENDING", '{"email":true,"sms":true}', None, "baseline"),
        ]

        assert await store.record_baseline(states, now) == 2

        assert await store.user_states() == {s.user_id: s for s in states}
        assert await everything(store) == []

    async def test_record_baseline_keeps_existing_states(self, store: Store, now: float) -> None:
        event = user_event(USER_A, 1)
        await store.append([event], [CRM], now)
        known = (await store.user_states())[USER_A]

        count = await store.record_baseline(
            [
                UserState(USER_A, "VERIFIED", '{"email":false,"sms":false}', None, "baseline"),
                UserState(USER_B, "PENDING", '{"email":true,"sms":true}', None, "baseline"),
            ],
            now + 1,
        )

        assert count == 1
        states = await store.user_states()
        assert states[USER_A] == known
        assert states[USER_B].status == "PENDING"

    async def test_reconcile_event_is_stored_while_its_base_state_holds(
        self, store: Store, now: float
    ) -> None:
        feed = user_event(USER_A, 1)
        await store.append([feed], [CRM], now)
        after = (await store.user_states())[USER_A].event_id
        assert after == feed.event_id
        change = reconcile_event(
            rest_user(USER_A, "VERIFIED", VERIFIED_REQ), after=after, now_ns=T0_NS + 100
        )
        unknown = reconcile_event(
            rest_user(USER_B, "PENDING", PENDING_REQ), after=None, now_ns=T0_NS + 100
        )

        result = await store.append([change, unknown], [CRM], now + 1)

        assert result.stored == [change, unknown]
        assert result.stale == 0
        states = await store.user_states()
        assert (states[USER_A].event_id, states[USER_A].source) == (change.event_id, "reconcile")
        assert states[USER_A].status == "VERIFIED"
        info = await delivery_of(store, "crm", change)
        assert (info.source, info.state) == ("reconcile", "pending")

    async def test_stale_reconcile_event_is_counted_and_not_stored(
        self, store: Store, now: float
    ) -> None:
        first, second = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([first, second], [CRM], now)
        outdated = reconcile_event(
            rest_user(USER_A, "UNSUPPORTED", VERIFIED_REQ), after=first.event_id, now_ns=T0_NS
        )
        blind = reconcile_event(
            rest_user(USER_A, "UNSUPPORTED", VERIFIED_REQ), after=None, now_ns=T0_NS
        )

        result = await store.append([outdated, blind], [CRM], now + 1)

        assert (result.stored, result.stale, result.duplicates) == ([], 2, 0)
        assert (await store.user_states())[USER_A].event_id == second.event_id
        assert len(await everything(store)) == 2

    async def _reconciled_then_feed(self, store: Store, now: float) -> tuple[NewEvent, ...]:
        """U goes PENDING (feed), VERIFIED (reconcile), then the feed's VERIFIED arrives."""
        first = feed_event(user_frame(USER_A, 1, token=True), seal_key=SEAL_KEY)
        await store.append([first], [CRM, VAULT], now)
        after = (await store.user_states())[USER_A].event_id
        change = reconcile_event(
            rest_user(USER_A, "VERIFIED", VERIFIED_REQ), after=after, now_ns=T0_NS + 100
        )
        result = await store.append([change], [CRM, VAULT], now + 1)
        assert result.stored == [change]
        late = feed_event(user_frame(USER_A, 2, status="VERIFIED", token=True), seal_key=SEAL_KEY)
        return first, change, late

    async def test_feed_event_already_reconciled_is_superseded_for_strip_endpoints(
        self, store: Store, now: float
    ) -> None:
        _first, _change, late = await self._reconciled_then_feed(store, now)

        result = await store.append([late], [CRM, VAULT], now + 2)

        assert result.stored == [late]
        assert result.superseded == {"crm": 1}
        crm = await delivery_of(store, "crm", late)
        assert crm.state == "superseded"
        assert crm.next_attempt_at is None
        assert (await delivery_of(store, "vault", late)).state == "pending"
        assert event_ids(await everything(store, state="superseded")) == {late.event_id}

    async def test_superseded_counts_per_endpoint(self, store: Store, now: float) -> None:
        _first, _change, late = await self._reconciled_then_feed(store, now)
        targets = [CRM, Target("erp"), Target("verified", statuses=frozenset({"VERIFIED"})), VAULT]

        result = await store.append([late], targets, now + 2)

        assert result.superseded == {"crm": 1, "erp": 1, "verified": 1}

    async def test_feed_event_with_another_state_is_not_superseded(
        self, store: Store, now: float
    ) -> None:
        _first, _change, _late = await self._reconciled_then_feed(store, now)
        other = feed_event(user_frame(USER_A, 2, status="VERIFIED", requirements={"sms": True}))

        result = await store.append([other], [CRM], now + 2)

        assert result.superseded == {}
        assert (await delivery_of(store, "crm", other)).state == "pending"

    async def test_superseded_delivery_does_not_hold_its_lane(
        self, store: Store, now: float
    ) -> None:
        first, change, late = await self._reconciled_then_feed(store, now)
        await store.append([late], [CRM], now + 2)
        for expected in (first, change):
            claim = await claim_one(store, "crm", now + 3)
            assert claim.event_id == expected.event_id
            await store.record([delivered(claim, now + 3)], now + 3)

        newer = user_event(USER_A, 3, status="UNSUPPORTED")
        await store.append([newer], [CRM], now + 4)

        assert (await claim_one(store, "crm", now + 4)).event_id == newer.event_id

    # -- order by sFOX timestamp (sections 5 and 7) -------------------------------------------

    async def test_lane_orders_feed_events_by_sfox_timestamp_not_by_store_order(
        self, store: Store, now: float
    ) -> None:
        older, newer = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([newer], [CRM], now)
        await store.append([older], [CRM], now + 0.1)  # another replica, a reconnect

        first = await claim_one(store, "crm", now + 1)
        assert first.event_id == older.event_id
        await store.record([delivered(first, now + 1)], now + 1)
        assert (await claim_one(store, "crm", now + 1)).event_id == newer.event_id

    async def test_equal_timestamps_go_in_store_order(self, store: Store, now: float) -> None:
        pending, verified = user_event(USER_A, 1), user_event(USER_A, 1, status="VERIFIED")
        await store.append([verified], [CRM], now)
        await store.append([pending], [CRM], now)

        first = await claim_one(store, "crm", now)
        assert first.event_id == verified.event_id
        await store.record([delivered(first, now)], now)
        assert (await claim_one(store, "crm", now)).event_id == pending.event_id

    async def test_feed_event_older_than_a_delivered_one_is_superseded_listed_replayable(
        self, store: Store, now: float
    ) -> None:
        older, newer = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([newer], [CRM, VAULT], now)
        await store.record([delivered(await claim_one(store, "crm", now), now)], now)

        result = await store.append([older], [CRM, VAULT], now + 1)

        assert result.stored == [older]
        assert result.superseded == {"crm": 1}
        crm = await delivery_of(store, "crm", older)
        assert (crm.state, crm.attempts) == ("superseded", 0)
        assert event_ids(await everything(store, state="superseded")) == {older.event_id}
        # vault has not sent the newer one yet: the older goes first there
        assert (await claim_one(store, "vault", now + 1)).event_id == older.event_id
        # a replay is never superseded
        assert await store.replay(ids=[key(crm)], now=now + 2) == 1
        again = await claim_one(store, "crm", now + 2)
        assert again.event_id == older.event_id
        assert await store.record([delivered(again, now + 2)], now + 2) == {}

    async def test_older_event_waits_for_a_newer_one_in_flight_then_is_superseded(
        self, store: Store, now: float
    ) -> None:
        older, newer = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([newer], [CRM], now)
        in_flight = await claim_one(store, "crm", now)

        result = await store.append([older], [CRM], now + 1)

        assert result.superseded == {}
        assert (await delivery_of(store, "crm", older)).state == "pending"
        assert await store.claim("crm", now + 1, 10) == []
        superseded = await store.record([delivered(in_flight, now + 2)], now + 2)
        assert superseded == {"crm": 1}
        assert (await delivery_of(store, "crm", older)).state == "superseded"
        assert await store.claim("crm", now + 3, 10) == []

    async def test_older_event_is_sent_when_the_newer_one_goes_dead(
        self, store: Store, now: float
    ) -> None:
        older, newer = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([newer], [CRM], now)
        in_flight = await claim_one(store, "crm", now)
        await store.append([older], [CRM], now + 1)

        assert await store.record([dead(in_flight, now + 2)], now + 2) == {}

        assert (await claim_one(store, "crm", now + 2)).event_id == older.event_id

    async def test_older_event_waits_while_the_newer_one_is_retrying(
        self, store: Store, now: float
    ) -> None:
        older, newer = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([newer], [CRM], now)
        await store.record([retry(await claim_one(store, "crm", now), now, now + 60)], now)

        await store.append([older], [CRM], now + 1)

        assert await store.claim("crm", now + 30, 10) == []
        assert (await claim_one(store, "crm", now + 60)).event_id == newer.event_id

    async def test_reconciled_event_goes_after_its_users_events_and_makes_none_stale(
        self, store: Store, now: float
    ) -> None:
        feed = user_event(USER_A, 5)
        await store.append([feed], [CRM], now)
        # relay time far after any sFOX timestamp still to come
        change = reconcile_event(
            rest_user(USER_A, "VERIFIED", VERIFIED_REQ), after=feed.event_id, now_ns=T0_NS + 10**12
        )
        await store.append([change], [CRM], now + 1)
        for expected in (feed, change):
            claim = await claim_one(store, "crm", now + 2)
            assert claim.event_id == expected.event_id
            await store.record([delivered(claim, now + 2)], now + 2)

        late = user_event(USER_A, 7, status="UNSUPPORTED")
        result = await store.append([late], [CRM], now + 3)

        assert result.superseded == {}
        assert (await claim_one(store, "crm", now + 3)).event_id == late.event_id

    async def test_user_state_stays_the_newest_when_an_older_event_arrives_late(
        self, store: Store, now: float
    ) -> None:
        older, newer = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        await store.append([newer], [CRM], now)
        await store.append([older], [CRM], now + 1)

        state = (await store.user_states())[USER_A]
        assert (state.status, state.event_id) == ("VERIFIED", newer.event_id)

    async def test_every_rule_gives_the_same_result_on_every_store(
        self, store: Store, now: float
    ) -> None:
        """One run through every core rule; both backends must end in this exact state."""
        targets = [CRM, VAULT]
        a1, a2 = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
        b1, b2 = user_event(USER_B, 3), user_event(USER_B, 4, status="VERIFIED")
        c1 = user_event(USER_C, 5)
        results = [
            await store.append([a2, b2, balance_event(6)], targets, now),  # newer ones first
            await store.append([a1, c1, a1], targets, now + 1),  # a1 goes first; a duplicate
        ]
        claims = {(c.endpoint, c.event_id): c for c in await store.claim("crm", now + 1, 10)}
        superseded = [
            await store.record(
                [
                    delivered(claims["crm", b2.event_id], now + 2),
                    retry(claims["crm", c1.event_id], now + 3, next_at=now + 60),
                    dead(claims["crm", a1.event_id], now + 3, status=410),
                ],
                now + 3,
            )
        ]
        results.append(await store.append([b1], targets, now + 4))  # older than delivered b2
        reconciled = reconcile_event(
            rest_user(USER_C, "VERIFIED", VERIFIED_REQ), after=c1.event_id, now_ns=T0_NS
        )
        stale = reconcile_event(
            rest_user(USER_A, "UNSUPPORTED", VERIFIED_REQ), after=a1.event_id, now_ns=T0_NS
        )
        results.append(await store.append([reconciled, stale], targets, now + 5))
        results.append(
            await store.append([user_event(USER_C, 9, status="VERIFIED")], targets, now + 6)
        )

        label = {e.event_id: n for n, e in enumerate((a1, a2, b1, b2, c1, reconciled), 1)}
        final = sorted(
            (d.endpoint, label.get(d.event_id, 0), d.state, d.attempts, d.user_id == USER_C)
            for d in await everything(store)
            if d.user_id is not None
        )
        crm = stats_of(await store.endpoint_stats(), "crm")
        assert [(len(r.stored), r.duplicates, r.stale, r.superseded) for r in results] == [
            (3, 0, 0, {}),
            (2, 1, 0, {}),
            (1, 0, 0, {"crm": 1}),
            (1, 0, 1, {}),
            (1, 0, 0, {"crm": 1}),
        ]
        assert superseded == [{}]
        assert final == [
            ("crm", 0, "superseded", 0, True),  # the feed's VERIFIED after reconciliation's
            ("crm", 1, "dead", 1, False),
            ("crm", 2, "pending", 0, False),  # a1 dead: a2 goes on
            ("crm", 3, "superseded", 0, False),  # older than the delivered b2
            ("crm", 4, "delivered", 1, False),
            ("crm", 5, "pending", 1, True),  # retrying
            ("crm", 6, "pending", 0, True),  # waits for c1
            ("vault", 0, "pending", 0, True),
            ("vault", 1, "pending", 0, False),
            ("vault", 2, "pending", 0, False),
            ("vault", 3, "pending", 0, False),
            ("vault", 4, "pending", 0, False),
            ("vault", 5, "pending", 0, True),
            ("vault", 6, "pending", 0, True),
        ]
        assert (crm.pending, crm.dead, crm.delivered) == (4, 1, 1)  # the balance event too
        assert (crm.last_success_at, crm.last_failure_at, crm.last_error) == (
            now + 2,
            now + 3,
            "HTTP 410",  # the dead one: same time as the retry, later in the call
        )
        claimable = {c.event_id for c in await store.claim("vault", now + 6, 10) if c.user_id}
        assert claimable == {a1.event_id, b1.event_id, c1.event_id}  # the oldest of each lane

    # -- several outcomes in one call -----------------------------------------------------------

    async def _failures(self, store: Store, now: float) -> list[Claim]:
        """Three users' deliveries in flight to crm, in delivery-id order."""
        events = [user_event(u, n) for n, u in enumerate((USER_A, USER_B, USER_C), 1)]
        await store.append(events, [CRM], now)
        claims = sorted(await store.claim("crm", now, 10), key=lambda c: c.delivery_id)
        assert len(claims) == 3
        return claims

    async def test_record_folds_several_outcomes_by_the_newest_attempt(
        self, store: Store, now: float
    ) -> None:
        c1, c2, c3 = await self._failures(store, now)
        reset = Attempt(now + 3, None, 0.01, "connection reset")

        await store.record(
            [
                retry(c1, now + 5, next_at=now + 60, status=503),
                Outcome(c2.delivery_id, "dead", now + 3, reset),  # older, listed later
                delivered(c3, now + 4),
            ],
            now + 6,
        )

        crm = stats_of(await store.endpoint_stats(), "crm")
        assert (crm.last_failure_at, crm.last_error) == (now + 5, "HTTP 503")
        assert (crm.last_success_at, crm.delivered) == (now + 4, 1)

    async def test_record_folds_equal_times_by_the_order_of_the_batch(
        self, store: Store, now: float
    ) -> None:
        c1, c2, c3 = await self._failures(store, now)
        reset = Attempt(now + 5, None, 0.01, "connection reset")

        await store.record(
            [
                retry(c3, now + 5, next_at=now + 60, status=503),
                Outcome(c1.delivery_id, "dead", now + 5, reset),  # same time, later in the call
            ],
            now + 6,
        )
        # an older failure recorded afterwards does not win either
        await store.record([retry(c2, now + 4, next_at=now + 60, status=502)], now + 7)

        crm = stats_of(await store.endpoint_stats(), "crm")
        assert (crm.last_failure_at, crm.last_error) == (now + 5, "connection reset")

    # -- endpoint stats -----------------------------------------------------------------------

    async def test_endpoint_stats_count_and_name_the_last_error(
        self, store: Store, now: float
    ) -> None:
        events = [user_event(u, n) for n, u in enumerate((USER_A, USER_B, USER_C, USER_D), 1)]
        await store.append(events, [CRM], now)
        await store.append([user_event(USER_D, 5, status="VERIFIED")], [CRM], now + 0.5)
        await store.append([balance_event(6)], [VAULT], now + 0.5)
        claims = {c.event_id: c for c in await store.claim("crm", now, 10)}
        ok, gone, busy, _inflight = (claims[e.event_id] for e in events)
        await store.record([delivered(ok, now + 1)], now + 1)
        await store.record([retry(busy, now + 2, next_at=now + 60)], now + 2)
        refused = Attempt(now + 3, None, 0.01, "connection refused")
        await store.record([Outcome(gone.delivery_id, "dead", now + 3, refused)], now + 3)

        stats = await store.endpoint_stats()

        crm = stats_of(stats, "crm")
        assert (crm.pending, crm.dead, crm.delivered) == (3, 1, 1)  # retrying, in flight, waiting
        assert crm.oldest_pending_at == now
        assert crm.last_success_at == now + 1
        assert crm.last_failure_at == now + 3
        assert crm.last_error == "connection refused"
        vault = stats_of(stats, "vault")
        assert (vault.pending, vault.dead, vault.delivered) == (1, 0, 0)
        assert vault.oldest_pending_at == now + 0.5
        assert (vault.last_success_at, vault.last_error) == (None, None)

    async def test_endpoint_stats_time_the_last_failure_when_it_happened(
        self, store: Store, now: float
    ) -> None:
        await store.append([user_event(USER_A, 1)], [CRM], now)
        claim = await claim_one(store, "crm", now)
        await store.record([retry(claim, now + 1, next_at=now + 60)], now + 1)

        await claim_one(store, "crm", now + 60)  # the retry is in flight: no new failure yet

        crm = stats_of(await store.endpoint_stats(), "crm")
        assert crm.last_failure_at == now + 1
        assert crm.last_error is not None

    # -- quarantine ---------------------------------------------------------------------------

    async def test_quarantine_keeps_a_bad_frame_without_touching_the_outbox(
        self, store: Store, now: float
    ) -> None:
        frame = bad_frame()
        assert TOKEN not in frame.text

        await store.quarantine(frame, now)

        assert await everything(store) == []
        await store.check_writable()

    # -- purge --------------------------------------------------------------------------------

    async def test_purge_deletes_old_delivered_deliveries_and_their_events(
        self, store: Store, now: float
    ) -> None:
        done, waiting = user_event(USER_A, 1), user_event(USER_B, 2)
        await store.append([done, waiting], [CRM], now)
        claim = next(c for c in await store.claim("crm", now, 10) if c.event_id == done.event_id)
        await store.record([delivered(claim, now + 1)], now + 1)

        assert await store.purge(delivered_before=now + 1, dead_before=now + 1, batch=100) == 0
        # One delivery and the event it was the last reference to.
        assert await store.purge(delivered_before=now + 2, dead_before=now - 1, batch=100) == 2

        assert await store.get_delivery(claim.delivery_id) is None
        assert event_ids(await everything(store)) == {waiting.event_id}
        again = await store.append([user_event(USER_A, 1)], [CRM], now + 3)
        assert (again.stored, again.duplicates) == ([done], 0)  # the event went too

    async def test_purge_deletes_dead_deliveries_by_their_own_cutoff(
        self, store: Store, now: float
    ) -> None:
        ok_event, dead_event = user_event(USER_A, 1), user_event(USER_B, 2)
        await store.append([ok_event, dead_event], [CRM], now)
        claims = {c.event_id: c for c in await store.claim("crm", now, 10)}
        await store.record(
            [
                delivered(claims[ok_event.event_id], now + 1),
                dead(claims[dead_event.event_id], now + 1),
            ],
            now + 1,
        )

        assert await store.purge(delivered_before=now, dead_before=now + 2, batch=100) == 1

        assert event_ids(await everything(store)) == {ok_event.event_id}
        assert await store.get_delivery(claims[dead_event.event_id].delivery_id) is None

    async def test_purge_works_in_batches(self, store: Store, now: float) -> None:
        await store.append([balance_event(n) for n in range(1, 4)], [CRM], now)
        claims = await store.claim("crm", now, 10)
        await store.record([delivered(c, now + 1) for c in claims], now + 1)

        counts = [
            await store.purge(delivered_before=now + 2, dead_before=now + 2, batch=2)
            for _ in range(3)
        ]

        assert counts == [4, 2, 0]  # deliveries and the events they were the last users of
        assert await everything(store) == []

    async def test_purge_keeps_unfinished_deliveries(self, store: Store, now: float) -> None:
        a1, a2, b1 = (
            user_event(USER_A, 1),
            user_event(USER_A, 2, status="VERIFIED"),
            user_event(USER_B, 3),
        )
        await store.append([a1, a2, b1], [CRM], now)
        await store.claim("crm", now, 1)  # in flight, waiting, pending

        far = now + 10 * 365 * 86400
        assert await store.purge(delivered_before=far, dead_before=far, batch=100) == 0

        assert len(await everything(store, state="pending")) == 3

    async def test_purge_keeps_an_event_another_endpoint_still_needs(
        self, store: Store, now: float
    ) -> None:
        event = user_event(USER_A, 1)
        await store.append([event], [CRM, VAULT], now)
        await store.record([delivered(await claim_one(store, "crm", now), now + 1)], now + 1)

        assert await store.purge(delivered_before=now + 2, dead_before=now + 2, batch=100) == 1

        assert (await store.append([user_event(USER_A, 1)], [CRM], now + 3)).duplicates == 1
        claim = await claim_one(store, "vault", now + 3)
        assert (claim.event_id, claim.body) == (event.event_id, event.body)

    # -- user tokens --------------------------------------------------------------------------

    async def test_user_token_is_stripped_without_a_seal_key(
        self, store: Store, now: float
    ) -> None:
        event = token_event(USER_A, 1, seal_key=None)
        assert not event.has_token
        await store.append([event], [CRM, VAULT], now)

        info = await delivery_of(store, "vault", event)
        body = (await detail(store, key(info))).body
        assert "user_token" not in loads(body)["payload"]
        assert TOKEN not in body
        claim = await claim_one(store, "vault", now)
        assert not claim.has_token
        assert b"user_token" not in claim.body

    async def test_user_token_is_sealed_with_a_seal_key(self, store: Store, now: float) -> None:
        event = token_event(USER_A, 1, seal_key=SEAL_KEY)
        assert event.has_token
        await store.append([event], [CRM, VAULT], now)

        info = await delivery_of(store, "vault", event)
        body = (await detail(store, key(info))).body
        assert loads(body)["payload"]["user_token"] == "[sealed]"
        assert TOKEN not in body
        claim = await claim_one(store, "vault", now)
        assert claim.has_token
        assert TOKEN.encode() not in claim.body
        token = unseal(loads(claim.body)["payload"]["user_token"], SEAL_KEY)
        assert token["token"] == TOKEN

    # -- health -------------------------------------------------------------------------------

    async def test_check_writable_passes_on_an_open_store(self, store: Store, now: float) -> None:
        await store.check_writable()
        await store.check_writable()

    # -- endpoint health state (CONTRACT.md 5b, 5c) -------------------------------------------

    async def test_health_rows_are_compare_and_set(self, store: Store, now: float) -> None:
        assert await store.health_rows("endpoint") == {}
        assert await store.health_write("endpoint", "crm", HealthRow("open", 0, "{}"), now)
        assert not await store.health_write("endpoint", "crm", HealthRow("paused", 0, "{}"), now)
        assert await store.health_rows("endpoint") == {"crm": HealthRow("open", 1, "{}")}
        assert await store.health_write("endpoint", "crm", HealthRow("active", 1, '{"a":1}'), now)
        assert not await store.health_write("endpoint", "crm", HealthRow("open", 1, "{}"), now)
        assert await store.health_rows("endpoint") == {"crm": HealthRow("active", 2, '{"a":1}')}
        assert await store.health_rows("feed") == {}

    async def test_a_transition_stores_its_alert_once(self, store: Store, now: float) -> None:
        alert = NewEvent("evt_alert1", "relay", "relay.alerts", None, None, None, b"{}", False)
        for version in (0, 1):  # a second writer with the same alert id adds nothing
            assert await store.health_write(
                "endpoint",
                "crm",
                HealthRow("open", version, "{}"),
                now,
                alert=alert,
                alert_endpoint="alerts",
            )
        (claim,) = await store.claim("alerts", now, 10)
        assert (claim.event_id, claim.source, claim.body, claim.user_id) == (
            "evt_alert1",
            "relay",
            b"{}",
            None,
        )
        assert await store.claim("crm", now, 10) == []

    async def test_release_makes_waiting_deliveries_due_now(self, store: Store, now: float) -> None:
        await store.append([user_event(USER_A, 1)], [CRM, VAULT], now)
        for endpoint in ("crm", "vault"):
            claim = await claim_one(store, endpoint, now)
            busy = Attempt(now, 503, 0.1)
            await store.record([Outcome(claim.delivery_id, "pending", now + 3600, busy)], now)
        assert await store.health_write(
            "endpoint", "crm", HealthRow("active", 0, "{}"), now + 5, release=True
        )
        assert len(await store.claim("crm", now + 5, 10)) == 1
        assert await store.claim("vault", now + 5, 10) == []  # other endpoints untouched

    async def test_a_probe_rotates_over_users_and_uses_no_attempt(
        self, store: Store, now: float
    ) -> None:
        events = [user_event(user, n) for n, user in enumerate((USER_B, USER_A, USER_C), 1)]
        await store.append(events, [CRM], now)
        await store.health_write("endpoint", "crm", HealthRow("open", 0, "{}"), now)
        seen = []
        cursor = None
        for version in (1, 2, 3, 4):
            row = HealthRow("open", version, "{}")
            claim = await store.claim_probe("crm", now, row, cursor)
            assert claim is not None
            seen.append(claim.user_id)
            cursor = claim.user_id
            failed = Attempt(now, 503, 0.1)
            await store.record(
                [Outcome(claim.delivery_id, "pending", now, failed, probe=True)], now
            )
            assert claim.attempts == 0
        assert seen == sorted([USER_A, USER_B, USER_C]) + [min(USER_A, USER_B, USER_C)]
        info = await detail(store, claim.delivery_id)
        # Both probes are recorded and shown (the count is honest); neither used one up: the
        # claim above still had its first attempt ahead of it (claim.attempts == 0).
        assert (info.info.attempts, len(info.attempts)) == (2, 2)

    async def test_an_endpoint_renamed_keeps_its_work_and_state(
        self, store: Store, now: float
    ) -> None:
        old, new = "crm.example/hook", "crm.example-hook"
        await store.append([user_event(USER_A, 1), user_event(USER_B, 2)], [Target(old)], now)
        (claim,) = await store.claim(old, now, 1)
        await store.record(
            [Outcome(claim.delivery_id, "delivered", now, Attempt(now, 204, 0.01))], now
        )
        await store.health_write("endpoint", old, HealthRow("paused", 0, "{}"), now)

        assert await store.rename_endpoint(old, new) == 2
        stats = {s.endpoint: s for s in await store.endpoint_stats()}
        assert old not in stats and stats[new].delivered == 1 and stats[new].pending == 1
        assert (await store.health_rows("endpoint"))[new].state == "paused"
        assert old not in await store.health_rows("endpoint")
        assert len(await store.claim(new, now, 10)) == 1
        assert await store.rename_endpoint(old, new) == 0  # once: nothing left under it

    async def test_a_probe_claims_nothing_when_the_row_moved(
        self, store: Store, now: float
    ) -> None:
        await store.append([user_event(USER_A, 1)], [CRM], now)
        await store.health_write("endpoint", "crm", HealthRow("open", 0, "{}"), now)
        assert await store.claim_probe("crm", now, HealthRow("open", 7, "{}"), None) is None
        assert await store.claim_probe("crm", now - 10, HealthRow("open", 1, "{}"), None) is None
        assert (await store.health_rows("endpoint"))["crm"].version == 1
        assert len(await store.claim("crm", now, 10)) == 1  # nothing was left in flight

    async def test_dead_summary_counts_recent_dead(self, store: Store, now: float) -> None:
        assert await store.dead_summary("crm", now - 60) is None
        await store.append([user_event(USER_A, 1), user_event(USER_B, 2)], [CRM], now)
        claims = await store.claim("crm", now, 10)
        gone = Attempt(now, 410, 0.1)
        await store.record([Outcome(c.delivery_id, "dead", now, gone) for c in claims], now)
        summary = await store.dead_summary("crm", now - 60)
        assert summary is not None
        assert summary.count == 2
        assert summary.delivery_id == min(c.delivery_id for c in claims)
        assert await store.dead_summary("crm", now + 1) is None

    async def test_heartbeats_count_live_replicas(self, store: Store, now: float) -> None:
        assert await store.beat("r1", now, 10.0) == 1
        assert await store.beat("r2", now + 1, 10.0) == 2
        assert await store.beat("r1", now + 12, 10.0) == 1  # r2 went quiet
