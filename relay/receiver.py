"""A fast local HTTP/1.1 webhook receiver: for ``relay demo``, end-to-end tests, chaos and bench.

Built on a raw :class:`asyncio.Protocol` rather than a web framework so that it is never the
bottleneck of a measurement: a request answered with the default 204 costs one header parse and
one ``transport.write``. It speaks just enough HTTP/1.1 for webhooks: keep-alive, pipelining,
``Content-Length`` bodies and ``Expect: 100-continue``; chunked bodies are refused with 411.

Answers are programmable with a *behaviour* (status, headers, body, delay, or a connection
reset), which is how tests and the chaos suite make an endpoint fail on purpose.

Run it alone with ``python -m relay.receiver --port 8099`` (prints its URL, then counts);
``--cert``/``--key`` serve HTTPS, and ``--client-ca`` demands client certificates (mutual TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from ssl import SSLContext
from types import TracebackType
from typing import Any

from relay.signing import SignatureError, decode_secret, verify

__all__ = ["Behaviour", "Received", "Receiver", "Response", "main", "server_tls"]

log = logging.getLogger(__name__)

_MAX_HEAD = 64 * 1024  # request line + headers
_DEFAULT_MAX_BODY = 16 * 1024 * 1024
_PAUSE_AT = 1024 * 1024  # stop reading from a peer whose unprocessed input exceeds this
_TOLERANCE = 300.0


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it arrived (a webhook delivery, normally)."""

    webhook_id: str
    """``webhook-id`` header, ``""`` when absent."""
    timestamp: int
    """``webhook-timestamp`` header, 0 when absent or not an integer."""
    signature: str
    """``webhook-signature`` header, ``""`` when absent."""
    source: str | None
    """``relay-source`` header (``feed`` or ``reconcile``)."""
    headers: dict[str, str]
    """All headers, names lower-cased; repeated headers joined with ``", "``."""
    body: bytes
    path: str
    arrived_ns: int
    """``time.time_ns()`` when the request was complete."""
    verified: bool | None
    """Signature check result; ``None`` when the receiver holds no keys."""
    method: str = "POST"

    @property
    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class Response:
    """What the receiver answers. ``close=True`` resets the connection without answering."""

    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    close: bool = False


Behaviour = Callable[[Received], Awaitable[Response] | Response]

_DEFAULT = Response()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _render(response: Response, *, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {_reason(response.status)}"]
    names = set()
    for name, value in response.headers.items():
        names.add(name.lower())
        lines.append(f"{name}: {value}")
    body = response.body
    if response.status < 200 or response.status in (204, 304):
        body = b""  # these never carry a body, nor a Content-Length (RFC 9110 8.6)
    elif "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    if not keep_alive:
        lines.append("Connection: close")
    head = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
    return head + body


_CANNED_204 = _render(_DEFAULT, keep_alive=True)
_CANNED_204_CLOSE = _render(_DEFAULT, keep_alive=False)


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _Connection(asyncio.Protocol):
    """One client connection: parses requests in order and answers them in order."""

    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._busy = False  # a request is being answered asynchronously
        self._paused = False
        self._closing = False
        self._continued = False  # 100 Continue already sent for the pending request

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._receiver._connections.add(self)
        self._receiver.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._transport = None
        self._receiver._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._busy:
            if len(self._buffer) > _PAUSE_AT and self._transport is not None:
                self._transport.pause_reading()
                self._paused = True
            return
        self._process()

    # parsing and answering --------------------------------------------------------------

    def _process(self) -> None:
        while not self._closing and not self._busy:
            try:
                request = self._parse()
            except _BadRequest as bad:
                self._send(_render(Response(bad.status), keep_alive=False))
                self._close()
                return
            if request is None:
                break
            self._answer(request)
        if self._paused and not self._busy and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _parse(self) -> _Request | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _MAX_HEAD:
                raise _BadRequest(431)
            return None
        try:
            head = buffer[:end].decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raise _BadRequest(400) from None
        request_line, _, header_block = head.partition("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400)
        method, path, version = parts
        headers: dict[str, str] = {}
        if header_block:
            for line in header_block.split("\r\n"):
                name, sep, value = line.partition(":")
                if not sep or not name or name[-1] in " \t":
                    raise _BadRequest(400)
                name = name.lower()
                value = value.strip()
                if name in headers:
                    headers[name] = f"{headers[name]}, {value}"
                else:
                    headers[name] = value
        if "transfer-encoding" in headers:
            raise _BadRequest(411)  # chunked bodies are not supported: ask for a length
        length_text = headers.get("content-length")
        if length_text is None:
            length = 0
        elif length_text.isdigit():
            length = int(length_text)
        else:
            raise _BadRequest(400)
        if length > self._receiver.max_body:
            raise _BadRequest(413)
        body_start = end + 4
        if len(buffer) - body_start < length:
            if (
                not self._continued
                and headers.get("expect", "").lower() == "100-continue"
                and self._transport is not None
            ):
                self._continued = True
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        body = bytes(buffer[body_start : body_start + length])
        del buffer[: body_start + length]
        self._continued = False
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in connection
        else:
            keep_alive = "close" not in connection
        return _Request(method, path, headers, body, keep_alive)

    def _answer(self, request: _Request) -> None:
        receiver = self._receiver
        outcome = receiver._handle(request)
        if isinstance(outcome, Response):
            if outcome.delay <= 0:
                self._respond(outcome, request.keep_alive)
                return
        elif outcome is None:  # fast path: counted, nothing to record, default answer
            self._send(_CANNED_204 if request.keep_alive else _CANNED_204_CLOSE)
            if not request.keep_alive:
                self._close()
            return
        self._busy = True
        task = asyncio.ensure_future(self._answer_later(outcome, request.keep_alive))
        receiver._tasks.add(task)
        task.add_done_callback(receiver._tasks.discard)

    async def _answer_later(
        self, outcome: Awaitable[Response] | Response, keep_alive: bool
    ) -> None:
        try:
            if isinstance(outcome, Response):
                response = outcome
            else:
                try:
                    response = await outcome
                except Exception:
                    self._receiver.errors += 1
                    log.exception("receiver behaviour failed")
                    response = Response(500)
            if response.delay > 0:
                await asyncio.sleep(response.delay)
            self._respond(response, keep_alive)
        finally:
            self._busy = False
        self._process()

    def _respond(self, response: Response, keep_alive: bool) -> None:
        if response.close:
            self._reset()
            return
        if response is _DEFAULT:
            self._send(_CANNED_204 if keep_alive else _CANNED_204_CLOSE)
        else:
            self._send(_render(response, keep_alive=keep_alive))
        if not keep_alive:
            self._close()

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._closing:
            self._transport.write(data)

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _reset(self) -> None:
        """Drop the connection with a TCP RST, as a crashing endpoint would."""
        self._closing = True
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


class Receiver:
    """A local webhook endpoint that records (and optionally verifies) what it receives.

    Args:
        keys: signing keys (``decode_secret`` output); when given, every request is verified
            with a 5-minute tolerance and a bad signature answers 401 (still recorded).
        behaviour: called with each :class:`Received`, returns the :class:`Response` (or an
            awaitable of one); default answers 204.
        record: keep every :class:`Received` in :attr:`received`; off for benchmarks, where
            only :attr:`count` moves.
        clock: seconds since the epoch, used as "now" for signature tolerance.
        max_body: larger bodies are refused with 413.
    """

    def __init__(
        self,
        *,
        keys: Sequence[bytes] = (),
        behaviour: Behaviour | None = None,
        record: bool = True,
        clock: Callable[[], float] = time.time,
        max_body: int = _DEFAULT_MAX_BODY,
    ) -> None:
        self.keys: tuple[bytes, ...] = tuple(keys)
        self.behaviour = behaviour
        self.record = record
        self.clock = clock
        self.max_body = max_body
        self.received: list[Received] = []
        self.count = 0
        self.errors = 0  # behaviours that raised (answered 500)
        self.connections = 0  # accepted so far: tells keep-alive from a connection per request
        self._scheme = "http"
        self._host = "127.0.0.1"
        self._port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def port(self) -> int:
        """The bound port (a real one after :meth:`start` with ``port=0``)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` (or ``https://``) of the running receiver."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{self._scheme}://{host}:{self._port}"

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl: SSLContext | None = None
    ) -> None:
        """Listen on ``host:port`` (port 0 picks a free one); HTTPS when given ``ssl``."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=1024, ssl=ssl
        )
        self._scheme = "http" if ssl is None else "https"
        self._host = host
        self._port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, drop open connections and cancel pending answers."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for connection in list(self._connections):
            connection._close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Receiver:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_for(self, n: int, timeout: float) -> None:
        """Return once :attr:`count` reaches ``n``, else raise :class:`TimeoutError`."""
        if self.count >= n:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (n, future)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise TimeoutError(f"received {self.count} of {n} within {timeout}s") from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    # called by _Connection ----------------------------------------------------------------

    def _handle(self, request: _Request) -> Awaitable[Response] | Response | None:
        """Count, verify and record one request; ``None`` means "answer the canned 204"."""
        self.count += 1
        if self._waiters:
            self._wake()
        if not (self.record or self.keys or self.behaviour):
            return None
        headers = request.headers
        timestamp_text = headers.get("webhook-timestamp", "")
        try:
            timestamp = int(timestamp_text)
        except ValueError:
            timestamp = 0
        webhook_id = headers.get("webhook-id", "")
        signature = headers.get("webhook-signature", "")
        verified: bool | None = None
        if self.keys:
            try:
                verify(
                    self.keys,
                    webhook_id,
                    timestamp,
                    request.body,
                    signature,
                    now=self.clock(),
                    tolerance=_TOLERANCE,
                )
                verified = True
            except SignatureError:
                verified = False
        received = Received(
            webhook_id=webhook_id,
            timestamp=timestamp,
            signature=signature,
            source=headers.get("relay-source"),
            headers=headers,
            body=request.body,
            path=request.path,
            arrived_ns=time.time_ns(),
            verified=verified,
            method=request.method,
        )
        if self.record:
            self.received.append(received)
        if verified is False:
            return Response(401)
        if self.behaviour is None:
            return _DEFAULT
        try:
            outcome = self.behaviour(received)
        except Exception:
            self.errors += 1
            log.exception("receiver behaviour failed")
            return Response(500)
        if isinstance(outcome, Response) or inspect.isawaitable(outcome):
            return outcome
        self.errors += 1
        log.error("receiver behaviour returned %r, not a Response", type(outcome).__name__)
        return Response(500)

    def _wake(self) -> None:
        count = self.count
        for n, future in self._waiters:
            if count >= n and not future.done():
                future.set_result(None)


def server_tls(cert: str, key: str, client_ca: str | None = None) -> SSLContext:
    """An HTTPS receiver's context: its certificate and key, and with ``client_ca`` a demand
    for a client certificate signed by it (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


async def _serve(args: argparse.Namespace) -> None:
    keys = [decode_secret(secret) for secret in args.secret]
    receiver = Receiver(keys=keys, record=False)
    tls = server_tls(args.cert, args.key, args.client_ca) if args.cert else None
    await receiver.start(args.host, args.port, ssl=tls)
    print(receiver.url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    last = 0
    try:
        if args.interval <= 0:
            await stop.wait()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.interval):
                    await stop.wait()
            if receiver.count != last:
                print(
                    f"count={receiver.count} rate={(receiver.count - last) / args.interval:.0f}/s",
                    file=sys.stderr,
                    flush=True,
                )
                last = receiver.count
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await receiver.close()
        print(f"count={receiver.count}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m relay.receiver``: a standalone receiver that answers 204 and counts."""
    parser = argparse.ArgumentParser(prog="python -m relay.receiver", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        help="whsec_ secret to verify with (repeatable); bad signatures answer 401",
    )
    parser.add_argument(
        "--interval", type=float, default=5.0, help="seconds between rate lines on stderr"
    )
    parser.add_argument("--cert", help="PEM certificate: serve HTTPS (with --key)")
    parser.add_argument("--key", help="PEM private key of --cert")
    parser.add_argument(
        "--client-ca", help="PEM CA bundle: require client certificates it signed (mutual TLS)"
    )
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key) or (args.client_ca and not args.cert):
        parser.error("--cert and --key go together; --client-ca needs them")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
