"""The outbox's rules as tables (relay/store/core.py): no database, plain values in and out.

The same rules run through both backends in tests/store_suite.py; here each rule is checked
case by case, including the cases a store can only reach through a race.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from relay.events import NewEvent
from relay.store import core
from relay.store.core import Change, DeliveryState, LaneRow, StateRow, Verdict
from relay.store.records import Target

W, P, I, D, X, S = (  # noqa: E741 - one letter per state keeps the tables readable
    DeliveryState.WAITING,
    DeliveryState.PENDING,
    DeliveryState.INFLIGHT,
    DeliveryState.DELIVERED,
    DeliveryState.DEAD,
    DeliveryState.SUPERSEDED,
)
NOW = 1000.0


def row(
    id: int,
    state: DeliveryState,
    ts: int,
    *,
    attempts: int = 0,
    ord: int | None = None,
    feed: bool = True,
    replayed: bool = False,
    next_at: float = 0.0,
    endpoint: str = "crm",
    user: str = "u1",
) -> LaneRow:
    return LaneRow(
        id=id,
        endpoint=endpoint,
        user_id=user,
        state=state.value,
        attempts=attempts,
        ts=ts,
        ord=id if ord is None else ord,
        feed_ts=ts if feed else None,
        replayed=replayed,
        next_at=next_at,
    )


def split(rows: list[LaneRow]) -> tuple[list[LaneRow], dict[core.Lane, int]]:
    """Active rows, and the newest delivered feed timestamp per lane, as a store reads them."""
    delivered: dict[core.Lane, int] = {}
    for r in rows:
        if r.state == D and r.feed_ts is not None:
            lane = (r.endpoint, r.user_id)
            delivered[lane] = max(delivered.get(lane, r.feed_ts), r.feed_ts)
    return [r for r in rows if r.state in ("waiting", "pending", "inflight")], delivered


def moves(rows: list[LaneRow]) -> dict[int, DeliveryState]:
    active, delivered = split(rows)
    return {c.id: c.state for c in core.settle(active, NOW, delivered)}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        pytest.param([row(1, W, 10)], {1: P}, id="a lone waiting delivery goes"),
        pytest.param([row(1, W, 20), row(2, W, 10)], {2: P}, id="the oldest timestamp goes first"),
        pytest.param(
            [row(1, W, 10, ord=2), row(2, W, 10, ord=1)],
            {2: P},
            id="equal timestamps: store order",
        ),
        pytest.param(
            [row(1, P, 20), row(2, W, 10)],
            {1: W, 2: P},
            id="an older event takes an untouched pending one's place",
        ),
        pytest.param(
            [row(1, P, 20, attempts=1), row(2, W, 10)],
            {},
            id="an older event waits while the newer is retrying",
        ),
        pytest.param(
            [row(1, I, 20), row(2, W, 10)],
            {},
            id="an older event waits while the newer is in flight",
        ),
        pytest.param([row(1, P, 10), row(2, W, 20)], {}, id="the active one is already the oldest"),
        pytest.param(
            [row(1, D, 20), row(2, W, 10)],
            {2: S},
            id="older than a delivered feed event: superseded",
        ),
        pytest.param(
            [row(1, D, 20), row(2, W, 10), row(3, W, 30)],
            {2: S, 3: P},
            id="superseded ones never hold the lane",
        ),
        pytest.param(
            [row(1, X, 20), row(2, W, 10)], {2: P}, id="the newer went dead: the older is sent"
        ),
        pytest.param(
            [row(1, D, 20), row(2, W, 10, replayed=True)],
            {2: P},
            id="a replay is never superseded",
        ),
        pytest.param(
            [row(1, D, 20, feed=False), row(2, W, 10)],
            {2: P},
            id="a delivered reconciled event makes nothing stale",
        ),
        pytest.param(
            [row(1, D, 20), row(2, W, 10, feed=False)],
            {2: P},
            id="a reconciled event is never stale",
        ),
        pytest.param(
            [row(1, D, 10), row(2, W, 10, ord=5)],
            {2: P},
            id="an equal timestamp is not older",
        ),
        pytest.param(
            [row(1, W, 10), row(2, W, 5, user="u2"), row(3, W, 1, endpoint="vault")],
            {1: P, 2: P, 3: P},
            id="lanes are per endpoint and user",
        ),
    ],
)
def test_settle(rows: list[LaneRow], expected: dict[int, DeliveryState]) -> None:
    assert moves(rows) == expected


def test_settle_is_idempotent() -> None:
    rows = [row(1, D, 20), row(2, P, 40), row(3, W, 10), row(4, W, 30), row(5, W, 50)]
    active, delivered = split(rows)
    changes = core.settle(active, NOW, delivered)
    by_id = {c.id: c for c in changes}
    after = [
        replace(r, state=by_id[r.id].state.value, next_at=by_id[r.id].next_at)
        if r.id in by_id
        else r
        for r in rows
    ]
    assert core.settle(split(after)[0], NOW, delivered) == []
    assert {c.id: c.state for c in changes} == {3: S, 2: W, 4: P}


def test_settle_keeps_a_later_schedule_and_names_what_it_saw() -> None:
    changes = core.settle([row(1, W, 10, next_at=NOW + 5), row(2, W, 20, next_at=NOW - 5)], NOW)
    assert changes == [Change(1, "crm", "waiting", P, NOW + 5)]
    promoted = core.settle([row(2, W, 20, next_at=NOW - 5)], NOW)
    assert promoted[0].next_at == NOW  # never due in the past


def test_place_decides_new_deliveries_before_they_are_written() -> None:
    plan = core.fan_out(
        [(7, event(ts=10)), (8, event("u2", ts=5)), (9, event(None, ts=1))], [CRM], {}, NOW
    )
    active = [row(1, P, 20), row(2, I, 9, user="u2")]
    placed, changes, superseded = core.place(plan.deliveries, active, {}, NOW)
    assert [(d.seq, d.state) for d in placed] == [(7, P), (8, W), (9, P)]
    assert changes == [Change(1, "crm", "pending", W, 0.0)]  # u1's newer one was untouched
    assert superseded == {}
    stale, _, counted = core.place(plan.deliveries[:1], [], {("crm", "u1"): 11}, NOW)
    assert stale[0].state == S
    assert counted == {"crm": 1}


def test_superseded_counts_per_endpoint() -> None:
    changes = [
        Change(1, "crm", "waiting", S, 0.0),
        Change(2, "crm", "waiting", S, 0.0),
        Change(3, "vault", "waiting", S, 0.0),
        Change(4, "crm", "waiting", P, 0.0),
    ]
    assert core.superseded(changes) == {"crm": 2, "vault": 1}


# -- fan-out ----------------------------------------------------------------------------------


def event(
    user: str | None = "u1",
    ts: int = 100,
    *,
    status: str = "PENDING",
    source: str = "feed",
    recipient: str = "private.enterprise.users",
    after: str | None = None,
    n: int = 0,
) -> NewEvent:
    return NewEvent(
        event_id=f"evt_{user}_{ts}_{status}_{n}",
        source=source,  # type: ignore[arg-type]
        recipient=recipient,
        user_id=user,
        status=status,
        requirements="{}",
        body=b"{}",
        has_token=False,
        after=after,
        timestamp=ts,
    )


CRM = Target("crm")
VAULT = Target("vault", wants_token=True)
SLOW = Target("slow", first_delay=30.0)
VERIFIED_ONLY = Target("verified", statuses=frozenset({"VERIFIED"}))


def test_fan_out_routes_each_event_to_matching_endpoints() -> None:
    plan = core.fan_out(
        [(1, event(status="PENDING")), (2, event("u2", status="VERIFIED"))],
        [CRM, VERIFIED_ONLY],
        {},
        NOW,
    )
    assert [(d.seq, d.endpoint, d.state) for d in plan.deliveries] == [
        (1, "crm", W),
        (2, "crm", W),
        (2, "verified", W),
    ]


def test_fan_out_without_a_user_is_pending_at_once_and_first_delay_postpones() -> None:
    plan = core.fan_out([(1, event(None))], [CRM, SLOW], {}, NOW)
    assert [(d.state, d.next_at) for d in plan.deliveries] == [(P, NOW), (P, NOW + 30.0)]
    assert plan.states == []


def test_fan_out_marks_an_already_reconciled_state_superseded_for_strip_endpoints() -> None:
    states = {"u1": StateRow("u1", "PENDING", "{}", "evt_r", "reconcile", 50)}
    plan = core.fan_out([(1, event())], [CRM, VAULT], states, NOW)
    assert [(d.endpoint, d.state) for d in plan.deliveries] == [("crm", S), ("vault", W)]
    assert plan.superseded == {"crm": 1}


def test_fan_out_puts_a_reconciled_event_after_everything_its_user_stored() -> None:
    states = {"u1": StateRow("u1", "PENDING", "{}", "evt_a", "feed", 500)}
    reconciled = event(ts=10**18, status="VERIFIED", source="reconcile", after="evt_a")
    plan = core.fan_out([(7, reconciled)], [CRM], states, NOW)
    (delivery,) = plan.deliveries
    assert (delivery.ts, delivery.feed_ts) == (500, None)  # its relay time does not count
    assert states["u1"].event_id == reconciled.event_id
    assert states["u1"].high_ts == 500


def test_fan_out_keeps_the_newest_state_when_an_older_event_arrives_late() -> None:
    states: dict[str, StateRow] = {}
    core.fan_out([(1, event(ts=200, status="VERIFIED"))], [CRM], states, NOW)
    plan = core.fan_out([(2, event(ts=100, status="PENDING"))], [CRM], states, NOW)
    assert states["u1"].status == "VERIFIED"
    assert states["u1"].high_ts == 200
    assert plan.states == []  # nothing to write
    assert [d.ts for d in plan.deliveries] == [100]


@pytest.mark.parametrize(
    ("timestamp", "key"),
    [
        (1_717_005_327_995_988_841, 1_717_005_327_995_988_841),
        (2**70, 2**63 - 1),
        (-(2**70), -(2**63)),
    ],
)
def test_lane_keys_fit_64_bits(timestamp: int, key: int) -> None:
    plan = core.fan_out([(1, event(ts=timestamp))], [CRM], {}, NOW)
    assert (plan.deliveries[0].ts, plan.deliveries[0].feed_ts) == (key, key)


def test_fan_out_holds_feed_events_of_users_until_the_window_ends() -> None:
    reconciled = event("u2", source="reconcile", status="VERIFIED")
    plan = core.fan_out(
        [(1, event()), (2, event(None)), (3, reconciled)], [CRM], {}, NOW, hold_until=NOW + 1
    )
    assert [d.next_at for d in plan.deliveries] == [NOW + 1, NOW, NOW]


# -- staleness, batches -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "state", "stale"),
    [
        (event(source="reconcile", after=None), None, False),
        (event(source="reconcile", after="evt_a"), None, True),
        (
            event(source="reconcile", after="evt_a"),
            StateRow("u1", "P", None, "evt_a", "feed"),
            False,
        ),
        (
            event(source="reconcile", after="evt_a"),
            StateRow("u1", "P", None, "evt_b", "feed"),
            True,
        ),
        (event(source="feed"), StateRow("u1", "P", None, "evt_b", "feed"), False),
    ],
)
def test_is_stale(new: NewEvent, state: StateRow | None, stale: bool) -> None:
    assert core.is_stale(new, state) is stale


def test_segments_put_each_user_once_per_run() -> None:
    batch = [event("a", n=1), event("b", n=2), event(None, n=3), event("a", n=4), event("b", n=5)]
    runs = core.segments(batch)
    assert [[e.event_id for e in run] for run in runs] == [
        [batch[0].event_id, batch[1].event_id, batch[2].event_id],
        [batch[3].event_id, batch[4].event_id],
    ]


# -- health -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        pytest.param(
            [Verdict("crm", "pending", 5.0, 503, None), Verdict("crm", "dead", 3.0, None, "reset")],
            [core.Health("crm", 0, None, 5.0, "HTTP 503")],
            id="the newest failure wins, whatever its place in the batch",
        ),
        pytest.param(
            [Verdict("crm", "pending", 5.0, 503, None), Verdict("crm", "dead", 5.0, 410, None)],
            [core.Health("crm", 0, None, 5.0, "HTTP 410")],
            id="equal times: the later in the batch",
        ),
        pytest.param(
            [
                Verdict("crm", "delivered", 2.0, 200, None),
                Verdict("crm", "delivered", 1.0, 200, None),
                Verdict("vault", "pending", 1.0, None, None),
            ],
            [core.Health("crm", 2, 2.0, None, None), core.Health("vault", 0, None, 1.0, "failed")],
            id="successes add up; endpoints apart",
        ),
    ],
)
def test_fold_health(verdicts: list[Verdict], expected: list[core.Health]) -> None:
    assert core.fold_health(verdicts) == expected


# -- states and ids ---------------------------------------------------------------------------


def test_states_generate_their_sql_lists() -> None:
    assert core.ACTIVE_SQL == "('waiting', 'pending', 'inflight')"
    assert core.FINISHED_SQL == "('delivered', 'dead', 'superseded')"
    assert {core.public_state(s) for s in DeliveryState} == {
        "pending",
        "delivered",
        "dead",
        "superseded",
    }
    with pytest.raises(ValueError):
        core.public_state("lost")


@pytest.mark.parametrize(
    ("text", "number"), [("dlv_12", 12), ("dlv_", None), ("dlv_1a", None), ("x_1", None)]
)
def test_delivery_ids(text: str, number: int | None) -> None:
    assert core.parse_delivery_id(text) == number
    if number is not None:
        assert core.format_delivery_id(number) == text


def test_only_finished_lanes_move_on_and_only_the_event_just_delivered_makes_others_stale() -> None:
    verdicts = [("crm", "u1", "delivered"), ("crm", "u2", "pending"), ("vault", None, "dead")]
    assert core.finished_lanes(verdicts) == {("crm", "u1")}
    delivered = core.just_delivered(
        [("crm", "u1", "delivered", 5), ("crm", "u1", "delivered", 9), ("crm", "u2", "dead", 20)]
    )
    assert delivered == {("crm", "u1"): 9}
