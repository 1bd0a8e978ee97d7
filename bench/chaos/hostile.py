"""Chaos, hostile input: generated feed frames (malformed, oversized, control characters,
deep nesting, other feeds) played through a bare feed server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.audit import audit, expected_event_id, find_leaks
from bench.chaos.harness import (
    Outcome,
    RawFeed,
    _dumps,
    _endpoint,
    _is_control,
    fast_feed,
    open_view,
    relay_env,
    settle,
)
from bench.procs import eventually, in_process, new_whsec
from relay.events import USERS_FEED
from relay.simulator import FAKE_TOKEN


@dataclass
class Frame:
    """One generated frame and what the relay must do with it."""

    data: str | bytes
    kind: str  # good, bad, either (the contract leaves it open), control
    why: str
    event_id: str | None = None
    token: str | None = None


def _good_message(
    uid: str, seq: Any, ts: int, status: Any, extra: dict[str, Any]
) -> dict[str, Any]:
    payload = {"user_id": uid, **extra, "status": status, "requirements": {"sms": False}}
    return {"sequence": seq, "recipient": USERS_FEED, "timestamp": ts, "payload": payload}


#: Values of the wrong type for each field a message must have right.
WRONG_TYPES: dict[str, list[Any]] = {
    "recipient": [7, "", None, ["x"]],
    "payload": [[1], "payload", 3, None],
    "timestamp": ["soon", 1.5e18, True, None, "1717005327995988841"],
    "sequence": ["5", 5.5, False, {}],
    "user_id": [7, "", None, ["client_x"]],
    "status": [3, ["VERIFIED"], {"s": 1}],
    "requirements": [["sms"], "none", 1, None],
    "user_token": ["tok", [1], 5],
}


#: The fields the boundary checks for control characters and length, and the characters.
HOSTILE_FIELDS = ["user_id", "status", "recipient"]
HOSTILE_CHARS = ["\x00", "\x1b", "\x7f", "\x85", "\t", "\n"]


def frame_specs() -> Any:
    """Hypothesis strategy of frame specs (the content; tokens and sizes are added after, from
    a seeded generator, so the 1 MB frames stay few)."""
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**90), max_value=2**90)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=10,
    )
    extra = st.dictionaries(
        st.text(min_size=1, max_size=10).filter(
            lambda k: k not in ("user_id", "status", "requirements", "user_token")
        ),
        values,
        max_size=3,
    )
    good = st.fixed_dictionaries(
        {
            "kind": st.just("good"),
            "seq": st.none() | st.integers(min_value=-(2**70), max_value=2**70),
            "ts": st.integers(min_value=0, max_value=2**72),
            "status": st.sampled_from(["PENDING", "VERIFIED", "UNSUPPORTED"]) | st.text(max_size=6),
            "extra": extra,
            "ascii": st.booleans(),
            "other_feed": st.integers(0, 9).map(lambda n: n == 0),
        }
    )
    bad = st.one_of(
        st.fixed_dictionaries(
            {
                "kind": st.just("wrong-type"),
                "field": st.sampled_from(sorted(WRONG_TYPES)),
                "pick": st.integers(0, 4),
            }
        ),
        st.fixed_dictionaries(
            {
                "kind": st.just("missing"),
                "field": st.sampled_from(["recipient", "payload", "timestamp", "user_id"]),
            }
        ),
        st.fixed_dictionaries(
            {"kind": st.just("not-json"), "text": st.text(max_size=40), "cut": st.integers(1, 30)}
        ),
        st.fixed_dictionaries({"kind": st.just("not-object"), "value": values}),
        st.fixed_dictionaries(
            {"kind": st.just("deep"), "depth": st.sampled_from([50, 62, 63, 400, 3000, 200_000])}
        ),
        # Bytes PostgreSQL refuses or cannot index (CONTRACT.md section 5's boundary).
        st.fixed_dictionaries(
            {
                "kind": st.just("hostile-bytes"),
                "field": st.sampled_from(HOSTILE_FIELDS),
                "char": st.sampled_from(HOSTILE_CHARS),
            }
        ),
        st.fixed_dictionaries(
            {
                "kind": st.just("long-field"),
                "field": st.sampled_from(HOSTILE_FIELDS),
                "length": st.sampled_from([257, 2_000, 5_000]),
            }
        ),
        st.fixed_dictionaries({"kind": st.just("nul-text"), "text": st.text(max_size=20)}),
        st.fixed_dictionaries({"kind": st.just("binary"), "junk": st.binary(max_size=40)}),
        st.fixed_dictionaries({"kind": st.just("binary-json"), "ts": st.integers(0, 2**64)}),
        st.fixed_dictionaries({"kind": st.just("surrogate"), "ts": st.integers(0, 2**64)}),
        st.fixed_dictionaries({"kind": st.just("nan")}),
        st.fixed_dictionaries({"kind": st.just("control"), "text": st.text(max_size=20)}),
    )
    return st.one_of(good, bad)


def generate_specs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` frame specs drawn by Hypothesis (generation only: nothing to shrink here)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    drawn: list[dict[str, Any]] = []

    @hseed(seed)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(frame_specs())
    def collect(spec: dict[str, Any]) -> None:
        drawn.append(spec)

    collect()
    return drawn


def build_frame(spec: dict[str, Any], rng: random.Random, *, big: bool = False) -> Frame:
    """The frame a spec describes, with a fresh user and token; ``big`` adds a 1 MB string
    (1,000,000 bytes: a webhook body stays under aiohttp's 1 MiB large-body warning, which
    :func:`large_event` is about)."""
    uid = f"client_{uuid.UUID(int=rng.getrandbits(128), version=4)}"
    token = f"{rng.getrandbits(256):064x}"
    user_token = {"token": token, "expires": "2099-01-01T00:00:00.000Z", "partner_user_id": uid}
    kind = spec["kind"]
    if kind == "good":
        extra = dict(spec["extra"])
        if big:
            # 1 MB, within the 1 MiB frame limit whether sent as UTF-8 or as \u escapes.
            extra["blob"] = "é" * (170_000 if spec["ascii"] else 500_000)
        message = _good_message(uid, spec["seq"], spec["ts"], spec["status"], extra)
        if spec["other_feed"]:
            message["recipient"] = f"{USERS_FEED}.balances"
            del message["payload"]["user_id"]
        message["payload"]["user_token"] = user_token
        text = _dumps(message, spec["ascii"])
        if any(_is_control(c) for c in spec["status"]) and not spec["other_feed"]:
            return Frame(text, "bad", "a status with a control character", token=token)
        return Frame(text, "good", "valid message", expected_event_id(message), token)
    base = _good_message(uid, rng.randrange(1, 10**6), rng.randrange(10**18, 2 * 10**18), "X", {})
    base["payload"]["user_token"] = user_token
    if big:
        base["payload"]["blob"] = "x" * 1_000_000
    if kind == "wrong-type":
        name = spec["field"]
        options = WRONG_TYPES[name]
        if name == "user_token":  # a malformed token must be redacted all the same
            options = ["tok" + token, [token], 5]
        value = options[spec["pick"] % len(options)]
        if name in base:
            base[name] = value
        else:
            base["payload"][name] = value
        return Frame(_dumps(base), "bad", f"{name} = {value!r:.20}", token=token)
    if kind == "missing":
        name = spec["field"]
        if name in base:
            del base[name]
        else:
            del base["payload"][name]
        return Frame(_dumps(base), "bad", f"no {name}", token=token)
    if kind == "not-json":
        text = _dumps(base)
        cut = text[: -spec["cut"]] + spec["text"]
        with contextlib.suppress(ValueError):
            json.loads(cut)
            cut = "{" + cut  # it parsed after all: make sure it does not
        return Frame(cut, "bad", "not JSON", token=token)
    if kind == "not-object":
        return Frame(_dumps(spec["value"]), "bad", "JSON, not an object")
    if kind == "deep":
        depth = spec["depth"]
        base["payload"]["nested"] = "@@"
        text = _dumps(base).replace('"@@"', "[" * depth + "]" * depth)
        # The message is level 1 and its payload level 2: over 64 levels is a bad frame.
        expected = "bad" if depth + 2 > 64 else "good"
        return Frame(text, expected, f"nested {depth} deep", _deep_id(base, depth), token)
    if kind in ("hostile-bytes", "long-field"):
        name = spec["field"]
        if kind == "hostile-bytes":
            char = spec["char"]
            value = {"user_id": uid, "status": "PENDING", "recipient": USERS_FEED}[name] + char
        else:
            value = name[0] * spec["length"]
        if name == "recipient":
            base["recipient"] = value
        else:
            base["payload"][name] = value
        return Frame(_dumps(base), "bad", f"{name} = {value!r:.20}", token=token)
    if kind == "nul-text":
        text = _dumps(base)[:-9] + "\x00" + spec["text"]
        return Frame(text, "bad", "not JSON, with a NUL", token=token)
    if kind == "binary":
        data = b'{"recipient":"\xff\xfe' + spec["junk"] + b"\xc3"
        return Frame(data, "bad", "binary, not UTF-8")
    if kind == "binary-json":
        message = _good_message(uid, 1, spec["ts"], "PENDING", {})
        return Frame(
            _dumps(message).encode(),
            "either",
            "valid JSON in a binary frame",
            expected_event_id(message),
        )
    if kind == "surrogate":
        message = _good_message(uid, 1, spec["ts"], "PENDING", {"note": "@@"})
        text = _dumps(message).replace('"@@"', '"\\ud800"')
        return Frame(text, "either", "a lone surrogate", None, None)
    if kind == "nan":
        base["timestamp"] = "@@"
        return Frame(_dumps(base).replace('"@@"', "NaN"), "bad", "NaN timestamp", token=token)
    reply = {"type": "error", "sequence": 1, "payload": {"message": spec["text"]}}
    return Frame(_dumps(reply), "control", "an error reply")


def _deep_id(message: dict[str, Any], depth: int) -> str | None:
    nested: Any = []
    for _ in range(depth - 1):
        nested = [nested]
    try:
        return expected_event_id({**message, "payload": {**message["payload"], "nested": nested}})
    except RecursionError:
        return None


async def hostile_frames(
    workdir: Path, *, frames: int, seed: int = 5, store: str = "sqlite"
) -> Outcome:
    """Hypothesis-generated frames, text and binary, good and hostile (control characters,
    NUL, fields too long to index, nesting past the limits), through a relay in this loop on
    ``store`` (``sqlite`` or ``postgres``): it must not crash, must store every good one, count
    and quarantine (redacted, without control characters) every bad one, and (full run) not
    grow without bound."""
    import psutil

    view = await open_view(workdir, store, "hostile")

    rng = random.Random(seed)
    specs = generate_specs(frames, seed)
    secret = new_whsec()
    facts: dict[str, Any] = {"generated": len(specs)}
    expected: dict[str, set[str]] = {"good": set(), "either": set()}
    n_bad = n_either_no_id = n_control = 0
    tokens: list[str] = []
    kinds: dict[str, int] = {}
    rss: list[int] = []
    me = psutil.Process()
    quiet = logging.getLogger("relay.feed")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a warning per bad frame is the relay's job, not the bench's
    try:
        async with contextlib.AsyncExitStack() as stack:
            feed = RawFeed()
            await feed.start()
            stack.push_async_callback(feed.close)
            sink = await _endpoint(stack, "sink", [secret])
            stack.push_async_callback(view.close)
            env = relay_env(feed, [sink], secret, view.url)
            # Keepalive is not what this is about: with PostgreSQL each bad frame is its own
            # durable commit, so a batch rich in them holds reading longer than fast_feed's
            # 1.2 s dead connection.
            options = fast_feed(feed, ping_interval=2.0, dead_after=10.0)
            async with in_process(env, feed_options=options) as running:
                await asyncio.wait_for(feed.subscribed.wait(), 10)

                async def marker() -> None:
                    """A good frame, then wait until stored: everything before it is handled."""
                    uid = f"client_{uuid.UUID(int=rng.getrandbits(128), version=4)}"
                    message = _good_message(uid, 1, time.time_ns(), "PENDING", {"marker": True})
                    expected["good"].add(expected_event_id(message))
                    await feed.send(_dumps(message))
                    want = expected_event_id(message)

                    async def stored() -> bool:
                        return await view.has_event(want)

                    await eventually(stored, 30, "a marker frame stored", interval=0.01)

                every = max(100, frames // 10)
                for i, spec in enumerate(specs):
                    # Two frames in three hundred carry a 1 MB string, good or bad alike.
                    frame = build_frame(spec, rng, big=i % 150 == 75)
                    kinds[frame.kind] = kinds.get(frame.kind, 0) + 1
                    if frame.token:
                        tokens.append(frame.token)
                    if frame.kind == "bad":
                        n_bad += 1
                    elif frame.kind == "control":
                        n_control += 1
                    elif frame.event_id is None:
                        n_either_no_id += 1
                    else:
                        expected[frame.kind].add(frame.event_id)
                    await feed.send(frame.data)
                    if (i + 1) % every == 0:
                        await marker()
                        if not running.alive():
                            break
                        rss.append(me.memory_info().rss)
                await marker()
                rss.append(me.memory_info().rss)
                facts["alive"] = running.alive()
                facts["bad_frames_counted"] = int(running.metric("relay_feed_bad_frames_total"))
                facts["connections"] = feed.connections
                await settle(view.counts, timeout=60)
            quarantined = await view.quarantined()
            deliveries, events = await view.deliveries()
            files = await view.files()
    finally:
        quiet.setLevel(level)

    leaks = find_leaks(
        {f"user token {t[:8]}": t for t in tokens} | {"FAKE_TOKEN": FAKE_TOKEN}, files
    ) + find_leaks({f"user token {t[:8]} (raw)": bytes.fromhex(t) for t in tokens}, files)
    report = audit(
        f"hostile input ({view.name}): {len(specs)} generated frames",
        deliveries,
        sink.arrivals,
        endpoints=[sink.name],
        stored_events=events,
        leaks=leaks,
    )
    report.sent = len(specs)
    either_stored = expected["either"] & events
    either_not_stored = len(expected["either"] - events) + n_either_no_id
    must_count = n_bad + either_not_stored
    missing_good = expected["good"] - events
    unexpected = events - expected["good"] - expected["either"]
    facts.update(
        kinds=kinds,
        must_count=must_count,
        quarantined=len(quarantined),
        either_stored=len(either_stored),
        rss_mb=[round(r / 2**20) for r in rss],
    )
    if missing_good:
        report.lost += len(missing_good)
        report.problem(f"{len(missing_good)} good frames not stored, e.g. {min(missing_good)}")
    if unexpected:
        report.problem(f"{len(unexpected)} stored events no good frame carried")
    if not facts["alive"]:
        report.problem("the relay stopped running")
    if facts["connections"] != 1:
        report.problem(f"the relay reconnected: {facts['connections']} connections")
    if facts["bad_frames_counted"] != must_count:
        report.problem(f"{facts['bad_frames_counted']} bad frames counted, expected {must_count}")
    if len(quarantined) != must_count:
        report.problem(f"{len(quarantined)} bad frames quarantined, expected {must_count}")
    controls = sum(any(_is_control(c) for c in reason + text) for reason, text in quarantined)
    if controls:
        report.problem(f"{controls} quarantined records hold a control character")
    if len(rss) >= 4:
        growth = (rss[-1] - rss[len(rss) // 3]) / 2**20
        facts["rss_growth_mb"] = round(growth)
        if growth > 200:
            report.problem(f"RSS grew {growth:.0f} MB over the last two thirds of the frames")
    report.notes.append(
        f"frames by expectation {kinds}; {len(either_stored)} of the open cases stored, "
        f"{must_count} counted bad and quarantined; RSS samples (MB) {facts['rss_mb']}"
    )
    return Outcome(report, facts)
