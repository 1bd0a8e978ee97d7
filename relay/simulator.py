"""A real sFOX-compatible server: the feed and, on the same port, the REST users route.

It is the test double of every feed test, the source of the demo, and the load generator of
the benchmarks, so it speaks the protocol of ``sfox/FEED.md`` exactly (authenticate, success
and error replies, subscribe, data messages with 19-digit nanosecond timestamps) and can
misbehave on request (:class:`Faults`): drop connections, stall, send garbage, reject the key,
lose what is sent while nobody listens, answer REST with an error status.

Users follow a realistic lifecycle: each appears ``PENDING`` with its requirements ``true``,
may make partial progress, and ends ``VERIFIED`` (about 10% ``UNSUPPORTED``) with them
``false``; every message carries a fresh user token. Everything random comes from one seeded
generator, so a seed replays the same users and the same messages.

Messages are rendered from per-user string templates (not a dict per message) so one core
produces well over 20,000 messages/s; ``bench/simulator_speed.py`` measures it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from relay.codec import compact_json, loads
from relay.events import KNOWN_FEEDS, USERS_FEED  # only the users feed is generated
from relay.feed import WebSocketLogAdapter

__all__ = [
    "FAKE_TOKEN",
    "Faults",
    "Simulator",
    "max_per_window",
    "run_from_args",
]

log = logging.getLogger("relay.simulator")


_BATCH = 256  # messages generated per step at full speed
_CLIENT_QUEUE = 4  # batches buffered per client before the generator waits for it
_STALL_LIMIT = 300.0  # a stalled connection is aborted after this long if nobody closed it
_USERS_PATH = "/v1/enterprise/users"

_FIRST_NAMES = (
    "Brando",
    "Ada",
    "Grace",
    "Alan",
    "Linus",
    "Barbara",
    "Ken",
    "Margaret",
    "Dennis",
    "Frances",
    "Edsger",
    "Radia",
    "Donald",
    "Hedy",
    "John",
    "Katherine",
    "Tim",
    "Sophie",
    "Guido",
    "Anita",
    "Niklaus",
    "Shafi",
    "Leslie",
    "Joan",
    "Vint",
    "Lynn",
    "Bjarne",
    "Adele",
    "Whitfield",
    "Mary",
)
_LAST_NAMES = (
    "Marks",
    "Lovelace",
    "Hopper",
    "Turing",
    "Torvalds",
    "Liskov",
    "Thompson",
    "Hamilton",
    "Ritchie",
    "Allen",
    "Dijkstra",
    "Perlman",
    "Knuth",
    "Lamarr",
    "McCarthy",
    "Johnson",
    "Berners-Lee",
    "Wilson",
    "Rossum",
    "Borg",
    "Wirth",
    "Goldwasser",
    "Lamport",
    "Clarke",
    "Cerf",
    "Conway",
    "Stroustrup",
    "Goldberg",
    "Diffie",
    "Shaw",
)
_REQ = {
    (True, True): '{"sms":true,"email":true}',
    (False, True): '{"sms":false,"email":true}',
    (False, False): '{"sms":false,"email":false}',
}


@dataclass
class Faults:
    """Misbehaviour on request. Read live: a test may change a field while the server runs."""

    #: Abort the connection (no close frame) after every N data messages sent on it.
    drop_every: int | None = None
    #: After N data messages on a connection, stop sending and stop reading (so pings go
    #: unanswered) until the client gives up.
    stall_after: int | None = None
    #: After every N data messages, also send one malformed frame (cycling through kinds).
    bad_every: int | None = None
    #: Reject the first K authenticate requests with sFOX's error reply, then accept.
    reject_auth: int = 0
    #: Seconds to wait before each success reply.
    handshake_delay: float = 0.0
    #: Like sFOX: while nobody is subscribed, keep generating (REST state advances) and lose
    #: those messages. Without it the generator waits for a subscriber.
    lose_while_disconnected: bool = False
    #: Answer every REST call with this HTTP status (e.g. 429, 503) instead of data.
    rest_status: int | None = None


def _uuid4(bits: int) -> str:
    """A version-4 UUID from 128 random bits (what uuid.UUID(int=..., version=4) gives)."""
    bits = (bits & ~(0xC000 << 48)) | (0x8000 << 48)  # variant RFC 4122
    bits = (bits & ~(0xF000 << 64)) | (4 << 76)  # version 4
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _User:
    """One end user in play: static fields pre-rendered, a planned list of states."""

    __slots__ = ("fields", "plan", "requirements", "status", "step", "template", "user_id")

    def __init__(self, rng: random.Random) -> None:
        draw = rng.random  # rng.random() and getrandbits() are the cheap draws
        self.user_id = f"client_{_uuid4(rng.getrandbits(128))}"
        first = _FIRST_NAMES[int(draw() * len(_FIRST_NAMES))]
        last = _LAST_NAMES[int(draw() * len(_LAST_NAMES))]
        role = "Advisor" if draw() < 0.1 else "Client"
        kind = "corporation" if draw() < 0.2 else "individual"
        email = f"{first.lower()}.{last.lower()}.{int(draw() * 10_000)}@example.com"
        phone = f"+1{200 + int(draw() * 800)}{int(draw() * 10_000_000):07d}"
        self.fields: dict[str, Any] = {
            "user_id": self.user_id,
            "first_name": first,
            "last_name": last,
            "email": email,
            "phone_number": phone,
            "account_role": role,
            "account_type": kind,
        }
        static = orjson.dumps(self.fields).decode()[1:-1]
        # %-template: sequence, timestamp, status, token, expires, requirements.
        self.template = (
            '{"sequence":%d,"recipient":"'
            + USERS_FEED
            + '","timestamp":%d,"payload":{'
            + static.replace("%", "%%")
            + ',"status":"%s","user_token":{"token":"%s","expires":"%s","partner_user_id":"'
            + self.user_id
            + '"},"requirements":%s}}'
        )
        plan: list[tuple[str, tuple[bool, bool]]] = [("PENDING", (True, True))]
        if draw() < 0.4:
            plan.append(("PENDING", (False, True)))
        plan.append(("UNSUPPORTED" if draw() < 0.1 else "VERIFIED", (False, False)))
        self.plan = plan
        self.step = 0
        self.status = ""
        self.requirements = (True, True)

    def rest(self) -> dict[str, Any]:
        sms, email = self.requirements
        return {
            **self.fields,
            "status": self.status,
            "requirements": {"sms": sms, "email": email},
            "advisor_user_id": None,
        }


class _Client:
    """Server-side state of one WebSocket connection."""

    __slots__ = (
        "authenticated",
        "conn",
        "data_sent",
        "enterprise",
        "feeds",
        "gone",
        "queue",
        "replies",
        "sender",
        "stalled",
    )

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.authenticated = False
        self.enterprise = False
        self.feeds: set[str] = set()
        self.data_sent = 0
        self.replies = 0
        self.stalled = False
        self.gone = False
        self.queue: asyncio.Queue[Sequence[tuple[int | None, str]]] = asyncio.Queue(_CLIENT_QUEUE)
        self.sender: asyncio.Task[None] | None = None


class _Expires:
    """ISO-8601 with milliseconds and ``Z``; the seconds part is cached (it rarely changes)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, t: float) -> str:
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


def max_per_window(times: Sequence[float], window: float = 60.0) -> int:
    """The largest number of ``times`` (sorted, seconds) inside any rolling ``window``."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


class Simulator:
    """An sFOX-compatible WebSocket feed plus the REST users route, on one port."""

    def __init__(
        self,
        *,
        api_key: str = "sim-key",
        users: int = 50,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        faults: Faults | None = None,
        token_ttl: float = 86400.0,
        record: bool = True,
    ) -> None:
        if users < 1:
            raise ValueError("users must be at least 1")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        if count is not None and count < 0:
            raise ValueError("count must not be negative")
        self.api_key = api_key
        self.rate = rate
        self.count = count
        self.faults = faults if faults is not None else Faults()
        self.token_ttl = token_ttl
        self.record = record
        self._rng = random.Random(seed)
        self._pool = [_User(self._rng) for _ in range(users)]
        self._expires = _Expires()
        # user_id -> a user in play, or the final REST view (compact JSON) of a retired one.
        self._known: dict[str, _User | dict[str, Any] | bytes] = {}
        # Counters and audit trails.
        self.sequence = 0  # last data sequence generated
        self.generated = 0
        self.connections = 0
        self.auth_attempts = 0
        self.subscribes = 0
        self.rest_calls = 0
        self.connection_times: list[float] = []  # time.monotonic() of each WebSocket opened
        self.request_times: list[float] = []  # time.monotonic() of each client request frame
        self.finished = asyncio.Event()
        self._sent_raw: list[str] = []
        self._sent: list[dict[str, Any]] = []
        self._sent_high = 0
        self._rejected = 0
        self._clients: set[_Client] = set()
        self._subscribers: list[_Client] = []
        self._sub_changed = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._server: Server | None = None
        self._generator: asyncio.Task[None] | None = None
        self._host = "127.0.0.1"
        self._ws_log = WebSocketLogAdapter(logging.getLogger("relay.simulator.ws"), [api_key])
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen (port 0 picks a free one) and start generating."""
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._http,
            compression=None,
            logger=self._ws_log,
            close_timeout=2,
            write_limit=2**17,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._host = host
        self._generator = asyncio.create_task(self._generate(), name="simulator-generator")

    async def close(self) -> None:
        """Stop generating, abort stalled connections, close the others and the listener."""
        if self._generator is not None:
            self._generator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._generator
            self._generator = None
        for client in list(self._clients):
            if client.stalled:
                client.conn.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def ws_url(self) -> str:
        return f"ws://{self._url_host}:{self.port}/ws"

    @property
    def api_url(self) -> str:
        return f"http://{self._url_host}:{self.port}"

    @property
    def _url_host(self) -> str:
        host = self._host
        if host in ("", "0.0.0.0"):
            return "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    # -- views for tests and audits ----------------------------------------------------------

    @property
    def sent(self) -> list[dict[str, Any]]:
        """Every data message written to at least one client, parsed (integers exact)."""
        while len(self._sent) < len(self._sent_raw):
            self._sent.append(loads(self._sent_raw[len(self._sent)]))
        return self._sent

    @property
    def users(self) -> dict[str, dict[str, Any]]:
        """The REST view of every user seen so far: latest state, no token."""
        return {uid: _rest(u) for uid, u in self._known.items()}

    @property
    def subscribed(self) -> int:
        """Connections currently subscribed to the users feed (stalled ones excluded)."""
        return len(self._subscribers)

    def max_requests_per_minute(self) -> int:
        """The most client requests seen in any rolling minute (sFOX allows 40 per IP)."""
        return max_per_window(self.request_times)

    def max_connections_per_minute(self) -> int:
        return max_per_window(self.connection_times)

    async def wait_subscribed(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``n`` connections are subscribed to the users feed."""
        async with asyncio.timeout(timeout):
            while len(self._subscribers) < n:
                await self._sub_changed.wait()

    def disconnect(self, index: int) -> bool:
        """Abort one subscribed connection (``index`` in subscription order, oldest first)
        as a network fault would; False if there is none. Its client reconnects and misses
        what is sent meanwhile, while the other subscribers receive it."""
        if not 0 <= index < len(self._subscribers):
            return False
        self._subscribers[index].conn.transport.abort()
        return True

    def pause(self) -> None:
        """Stop the generator (connections stay open)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    async def publish(self, message: dict[str, Any]) -> None:
        """Send one exact message to every client subscribed to its recipient (or to any feed).

        It goes through the same path as generated messages: ordered after them, counted by
        the fault knobs, recorded in :attr:`sent`; a users-feed payload updates the REST view.
        """
        text = compact_json(message).decode()
        recipient = message.get("recipient")
        payload = message.get("payload")
        if recipient == USERS_FEED and isinstance(payload, dict) and "user_id" in payload:
            rest = {k: v for k, v in payload.items() if k != "user_token"}
            rest.setdefault("advisor_user_id", None)
            self._known[str(payload["user_id"])] = rest
        targets = [
            c
            for c in self._clients
            if c.feeds and not c.stalled and not c.gone and (recipient in c.feeds or not recipient)
        ]
        if targets and self.record:
            self._sent_raw.append(text)
        for client in targets:
            await client.queue.put([(None, text)])

    # -- the generator ------------------------------------------------------------------

    def _next_message(self, now: float) -> tuple[int, str]:
        pool = self._pool
        index = int(self._rng.random() * len(pool))
        user = pool[index]
        status, req = user.plan[user.step]
        user.step += 1
        user.status = status
        user.requirements = req
        if user.step == len(user.plan):  # retired: keep only its final REST view, compactly
            pool[index] = _User(self._rng)
            self._known[user.user_id] = orjson.dumps(user.rest())
        else:
            self._known[user.user_id] = user
        self.sequence += 1
        self.generated += 1
        token = f"{self._rng.getrandbits(256):064x}"
        text = user.template % (
            self.sequence,
            time.time_ns(),
            status,
            token,
            self._expires(now + self.token_ttl),
            _REQ[req],
        )
        return self.sequence, text

    async def _generate(self) -> None:
        loop = asyncio.get_running_loop()
        rate = self.rate
        t0 = loop.time()
        emitted = 0  # since t0, for pacing
        while self.count is None or self.generated < self.count:
            if not self._running.is_set() or (
                not self._subscribers and not self.faults.lose_while_disconnected
            ):
                await self._running.wait()
                while not self._subscribers and not self.faults.lose_while_disconnected:
                    await self._sub_changed.wait()
                t0, emitted = loop.time(), 0
                continue
            n = _BATCH
            if rate is not None:
                elapsed = loop.time() - t0
                due = int(elapsed * rate) - emitted
                if due <= 0:
                    await asyncio.sleep((emitted + 1) / rate - elapsed)
                    continue
                n = min(due, _BATCH)
            if self.count is not None:
                n = min(n, self.count - self.generated)
            now = time.time()
            batch = [self._next_message(now) for _ in range(n)]
            emitted += n
            for client in list(self._subscribers):
                if not client.gone:
                    await client.queue.put(batch)
            await asyncio.sleep(0)
        self.finished.set()

    def _subscribers_changed(self) -> None:
        self._subscribers = [
            c for c in self._clients if USERS_FEED in c.feeds and not c.stalled and not c.gone
        ]
        event, self._sub_changed = self._sub_changed, asyncio.Event()
        event.set()

    # -- one connection -----------------------------------------------------------------

    async def _handle(self, conn: ServerConnection) -> None:
        self.connections += 1
        self.connection_times.append(time.monotonic())
        client = _Client(conn)
        self._clients.add(client)
        try:
            async for raw in conn:
                if client.stalled:
                    break
                await self._request(client, raw)
            if client.stalled:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_STALL_LIMIT):
                        await conn.wait_closed()
                conn.transport.abort()
        except ConnectionClosed:
            pass
        finally:
            client.gone = True
            self._clients.discard(client)
            self._subscribers_changed()
            if client.sender is not None:
                client.sender.cancel()
            while not client.queue.empty():  # unblock a generator waiting on this queue
                client.queue.get_nowait()

    def _reply(self, client: _Client, kind: str, action: Any, **payload: Any) -> str:
        client.replies += 1
        body: dict[str, Any] = {
            "type": kind,
            "sequence": client.replies,
            "timestamp": time.time_ns(),
            "payload": {"action": action, **payload},
        }
        if kind == "success":
            body["action"] = action
        return compact_json(body).decode()

    async def _request(self, client: _Client, raw: str | bytes) -> None:
        self.request_times.append(time.monotonic())
        conn = client.conn
        try:
            request = loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            await conn.send(self._reply(client, "error", None, message="invalid JSON"))
            return
        kind = request.get("type") if isinstance(request, dict) else None
        if kind == "authenticate":
            assert isinstance(request, dict)
            await self._authenticate(client, request)
        elif kind in ("subscribe", "unsubscribe"):
            assert isinstance(request, dict)
            await self._subscribe(client, kind, request.get("feeds"))
        else:
            await conn.send(
                self._reply(
                    client,
                    "error",
                    kind if isinstance(kind, str) else None,
                    message="unknown request type",
                )
            )

    async def _authenticate(self, client: _Client, request: dict[str, Any]) -> None:
        self.auth_attempts += 1
        if self._rejected < self.faults.reject_auth:
            self._rejected += 1
            ok = False
        else:
            ok = request.get("apiKey") == self.api_key
        if not ok:
            client.authenticated = False
            await client.conn.send(
                self._reply(client, "error", "authenticate", message="invalid api key")
            )
            return
        client.authenticated = True
        client.enterprise = request.get("enterprise") in ("true", True)
        if self.faults.handshake_delay > 0:
            await asyncio.sleep(self.faults.handshake_delay)
        await client.conn.send(self._reply(client, "success", "authenticate"))

    async def _subscribe(self, client: _Client, kind: str, feeds: Any) -> None:
        conn = client.conn
        reason = None
        if not client.authenticated:
            reason = "not authenticated"
        elif not isinstance(feeds, list) or not feeds or not all(isinstance(f, str) for f in feeds):
            reason = "feeds must be a non-empty list of strings"
        elif unknown := [f for f in feeds if f not in KNOWN_FEEDS]:
            reason = f"unknown feed {unknown[0]}"
        elif not client.enterprise:
            reason = "enterprise authentication required"
        if reason is not None:
            await conn.send(self._reply(client, "error", kind, message=reason))
            return
        if self.faults.handshake_delay > 0:
            await asyncio.sleep(self.faults.handshake_delay)
        await conn.send(self._reply(client, "success", kind, feeds=feeds))
        if kind == "subscribe":
            self.subscribes += 1
            client.feeds.update(feeds)
            if client.sender is None:
                client.sender = asyncio.create_task(self._send_loop(client))
            if self.faults.stall_after == 0:
                self._stall(client)
        else:
            client.feeds.difference_update(feeds)
        self._subscribers_changed()

    def _stall(self, client: _Client) -> None:
        client.stalled = True
        client.conn.transport.pause_reading()  # pings go unanswered from now on
        self._subscribers_changed()

    async def _send_loop(self, client: _Client) -> None:
        """Write queued messages to one client, applying the per-connection faults.

        Messages go out in chunks, one write each, split where a fault is due.
        """
        conn = client.conn
        try:
            while True:
                batch = await client.queue.get()
                i = 0
                while i < len(batch) and not client.stalled:
                    faults = self.faults
                    sent = client.data_sent
                    n = len(batch) - i
                    for every in (faults.drop_every, faults.bad_every):
                        if every:
                            n = min(n, every - sent % every)
                    if faults.stall_after is not None:
                        n = min(n, faults.stall_after - sent)
                        if n <= 0:
                            self._stall(client)
                            break
                    chunk = batch[i : i + n]
                    await _send_texts(conn, [text for _, text in chunk])
                    i += n
                    self._record(chunk)
                    sent = client.data_sent = sent + n
                    if faults.bad_every and sent % faults.bad_every == 0:
                        await conn.send(_garbage(sent // faults.bad_every - 1, self.sequence))
                    if faults.drop_every and sent % faults.drop_every == 0:
                        await _flush(conn)  # what is in `sent` reaches the client's kernel
                        conn.transport.abort()  # abrupt: no close frame
                        return
                    if faults.stall_after is not None and sent >= faults.stall_after:
                        self._stall(client)
        except ConnectionClosed:
            return

    def _record(self, chunk: Sequence[tuple[int | None, str]]) -> None:
        """Note generated messages the first time any client was sent them."""
        high = self._sent_high
        if chunk[-1][0] is None or chunk[-1][0] <= high:
            return
        for seq, text in chunk:
            if seq is not None and seq > high:
                high = seq
                if self.record:
                    self._sent_raw.append(text)
        self._sent_high = high

    # -- the REST route -------------------------------------------------------------------

    def _http(self, conn: ServerConnection, request: Request) -> Response | None:
        split = urllib.parse.urlsplit(request.path)
        if split.path in ("/ws", "/") and "Upgrade" in request.headers:
            return None
        if not split.path.startswith("/v1/"):
            return _json(conn, 404, {"error": "not found"})
        self.rest_calls += 1
        status = self.faults.rest_status
        if status is not None:
            response = _json(conn, status, {"error": f"simulated status {status}"})
            if status == 429:
                response.headers["Retry-After"] = "60"
            return response
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _json(conn, 401, {"error": "unauthorized"})
        if split.path == _USERS_PATH:
            query = urllib.parse.parse_qs(split.query)
            role = query.get("accountRole", [None])[0]
            if role is not None and role.lower() not in ("client", "advisor"):
                return _json(conn, 400, {"error": "accountRole must be client or advisor"})
            data = [
                user
                for user in self.users.values()
                if role is None or str(user.get("account_role", "")).lower() == role.lower()
            ]
            return _json(conn, 200, {"data": data})
        if split.path.startswith(_USERS_PATH + "/"):
            user_id = urllib.parse.unquote(split.path[len(_USERS_PATH) + 1 :])
            found = self._known.get(user_id)
            if found is None:
                return _json(conn, 404, {"error": "user not found"})
            return _json(conn, 200, {"data": _rest(found)})
        return _json(conn, 404, {"error": "not found"})


async def _send_texts(conn: ServerConnection, texts: list[str]) -> None:
    """Send several text messages with one write, one system call and one drain.

    ``send()`` costs a system call per message; coalescing is what lets one core exceed 20,000
    messages/s. ``send_context`` is what ``send()`` itself uses; ``data_to_send`` is the
    sans-I/O protocol's public output.
    """
    if len(texts) == 1:
        await conn.send(texts[0])
        return
    async with conn.send_context():
        protocol = conn.protocol
        for text in texts:
            protocol.send_text(text.encode())
        pending = protocol.data_to_send()
        if all(pending):
            conn.transport.write(b"".join(pending))
        else:  # an end-of-stream marker (b""): keep websockets' own handling of it
            for data in pending:
                if data:
                    conn.transport.write(data)
                elif conn.transport.can_write_eof():
                    conn.transport.write_eof()


async def _flush(conn: ServerConnection, limit: float = 1.0) -> None:
    """Wait (briefly) until the transport has handed everything written to the kernel."""
    transport = conn.transport
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            while transport.get_write_buffer_size() > 0 and not transport.is_closing():
                await asyncio.sleep(0.001)


def _rest(user: _User | dict[str, Any] | bytes) -> dict[str, Any]:
    if isinstance(user, _User):
        return user.rest()
    if isinstance(user, bytes):
        view: dict[str, Any] = orjson.loads(user)
        return view
    return dict(user)


def _json(conn: ServerConnection, status: int, body: Any) -> Response:
    response = conn.respond(status, compact_json(body).decode())
    headers: Headers = response.headers
    del headers["Content-Type"]
    headers["Content-Type"] = "application/json"
    return response


_GARBAGE_KINDS = 6
#: The user token inside the last kind of garbage frame (tests check it never leaks).
FAKE_TOKEN = "f" * 8 + "0123456789abcdef" * 3 + "e" * 8


def _garbage(index: int, sequence: int) -> str:
    """One malformed frame; ``index`` cycles through the kinds."""
    kind = index % _GARBAGE_KINDS
    head = {"sequence": sequence, "recipient": USERS_FEED}
    if kind == 0:  # truncated: not JSON
        return compact_json({**head, "payload": {}}).decode()[:-3]
    if kind == 1:  # JSON, but not an object
        return "[1,2,3]"
    if kind == 2:  # no payload
        return compact_json({**head, "timestamp": time.time_ns()}).decode()
    if kind == 3:  # wrong types
        wrong = {"sequence": str(sequence), "recipient": USERS_FEED, "timestamp": "soon"}
        return compact_json({**wrong, "payload": {"user_id": 7}}).decode()
    if kind == 4:  # nested far beyond any parser's recursion limit
        depth = 100_000
        return "[" * depth + "]" * depth
    # A token where it should never be, in a frame that is otherwise invalid (no user_id).
    fake = {"token": FAKE_TOKEN, "expires": "2030-01-01T00:00:00.000Z"}
    payload = {"status": "VERIFIED", "user_token": fake}
    return compact_json({**head, "timestamp": time.time_ns(), "payload": payload}).decode()


# -- the CLI (`relay simulate`) -------------------------------------------------------------


async def run_from_args(args: argparse.Namespace) -> int:
    """Serve until cancelled."""
    faults = Faults(
        drop_every=args.drop_every,
        stall_after=args.stall_after,
        bad_every=args.bad_every,
        reject_auth=args.reject_auth,
        handshake_delay=args.handshake_delay,
        lose_while_disconnected=args.lose_while_disconnected,
        rest_status=getattr(args, "rest_status", None),
    )
    simulator = Simulator(
        api_key=args.api_key,
        users=args.users,
        rate=args.rate,
        count=args.count,
        seed=args.seed,
        faults=faults,
        record=False,
    )
    await simulator.start(args.host, args.port)
    print(f"sFOX simulator: feed {simulator.ws_url}  REST {simulator.api_url}", flush=True)
    log.info(
        "sFOX simulator listening on %s (REST %s)",
        simulator.ws_url,
        simulator.api_url,
        extra={
            "event": "simulator.listening",
            "ws_url": simulator.ws_url,
            "api_url": simulator.api_url,
        },
    )
    try:
        await asyncio.Event().wait()
    finally:
        await simulator.close()
    return 0
