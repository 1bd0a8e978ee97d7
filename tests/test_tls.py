"""How each endpoint is reached: custom CA, mutual TLS and per-endpoint proxy (CONTRACT.md 3).

Real TLS throughout: certificates are made per test (``bench/certs.py``), the project's receiver
serves HTTPS (demanding a client certificate where the test says so), and a small CONNECT proxy
runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import query, store_path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # pytest puts tests/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))

from bench.certs import TLSFiles, make_certs  # noqa: E402
from relay.config import EndpointConfig, describe, load_settings, secret_values  # noqa: E402
from relay.errors import ConfigError  # noqa: E402
from relay.receiver import Receiver  # noqa: E402
from relay.signing import decode_secret  # noqa: E402
from relay.transport import AiohttpSender, Senders, sender_for  # noqa: E402

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
PROXY_PASSWORD = "prx_Q7w2E9r4T1y6"
BODY = b'{"sequence":1,"recipient":"r","timestamp":1,"payload":{"user_id":"u"}}'
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY")


@pytest.fixture
def pki(tmp_path: Path) -> TLSFiles:
    return make_certs(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path: Path) -> TLSFiles:
    """A second CA the endpoint does not know, with its own server and client certificates."""
    return make_certs(tmp_path / "other", name="other")


@pytest.fixture
def no_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@contextlib.asynccontextmanager
async def https_receiver(
    pki: TLSFiles, *, require_client_cert: bool = False
) -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start(ssl=pki.server_context(require_client_cert=require_client_cert))
    try:
        yield receiver
    finally:
        await receiver.close()


def endpoint(url: str, **options: Any) -> EndpointConfig:
    """One endpoint as `relay run` would load it (files checked, secrets wrapped)."""
    item = {"url": url, **{k: str(v) if isinstance(v, Path) else v for k, v in options.items()}}
    environ = {"RELAY_SIGNING_SECRET": SECRET, "RELAY_ENDPOINTS": json.dumps([item])}
    (loaded,) = load_settings(environ).endpoints
    return loaded


async def post(sender: Any, url: str) -> Any:
    try:
        return await sender.post(url, BODY, {"content-type": "application/json"}, 5.0)
    finally:
        await sender.close()


class ConnectProxy:
    """A forwarding HTTP proxy that tunnels CONNECT and records what it was asked.

    With ``password``, a CONNECT without the matching ``Proxy-Authorization`` answers 407.
    """

    def __init__(self, *, password: str | None = None) -> None:
        self.password = password
        self.seen: list[tuple[str, str, str | None]] = []  # method, target, proxy auth
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def url_with(self, user: str, password: str) -> str:
        return self.url.replace("http://", f"http://{user}:{password}@")

    @property
    def connects(self) -> list[str]:
        return [target for method, target, _ in self.seen if method == "CONNECT"]

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # ends every pipe (cancelling the handlers logs errors)
            writer.close()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            method, target, _ = request_line.split(" ")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)
            }
            auth = headers.get("proxy-authorization")
            self.seen.append((method, target, auth))
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            if self.password is not None:
                wanted = "Basic " + base64.b64encode(f"relay:{self.password}".encode()).decode()
                if auth != wanted:
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                    return
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            self._writers.add(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


# -- configuration ------------------------------------------------------------------------------


def config_error(item: Mapping[str, object]) -> ConfigError:
    items = [{k: str(v) if isinstance(v, Path) else v for k, v in item.items()}]
    environ = {"RELAY_SIGNING_SECRET": SECRET, "RELAY_ENDPOINTS": json.dumps(items)}
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    return info.value


def test_a_ca_bundle_with_utf8_comments_and_several_cas_is_accepted(
    pki: TLSFiles, other_pki: TLSFiles, tmp_path: Path
) -> None:
    """Regression: certifi's bundle has comments like this one; decoding as ASCII refused it."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        "# Issuer: CN=NetLock Arany (Class Gold) Főtanúsítvány\n".encode()
        + pki.ca.read_bytes()
        + other_pki.ca.read_bytes()
    )
    assert endpoint("https://a.example.com/", ca_file=bundle).ca_file == str(bundle)


def test_tls_files_and_proxy_are_loaded_and_shown_by_check(pki: TLSFiles) -> None:
    proxy = f"http://relay:{PROXY_PASSWORD}@proxy.internal:3128"
    environ = {
        "RELAY_SIGNING_SECRET": SECRET,
        "RELAY_ENDPOINTS": json.dumps(
            [
                {
                    "url": "https://a.example.com/hook",
                    "ca_file": str(pki.ca),
                    "client_cert": str(pki.client_cert),
                    "client_key": str(pki.client_key),
                    "proxy": proxy,
                },
                {"url": "https://b.example.com/hook", "proxy": "NONE"},
                {"url": "http://c.example.com/hook", "proxy": "http://proxy.internal:3128"},
            ]
        ),
    }
    settings = load_settings(environ)
    a, b, c = settings.endpoints
    assert (a.ca_file, a.client_cert, a.client_key) == tuple(
        map(str, (pki.ca, pki.client_cert, pki.client_key))
    )
    assert a.proxy is not None and a.proxy.get_secret_value() == proxy
    assert b.proxy is not None and b.proxy.get_secret_value() == "none"
    shown = describe(settings)["endpoints"]
    assert isinstance(shown, list)
    assert shown[0]["ca_file"] == str(pki.ca)
    assert shown[0]["client_cert"] == str(pki.client_cert)
    assert shown[0]["client_key"] == str(pki.client_key)  # the path, never the key
    assert shown[0]["proxy"] == "http://***@proxy.internal:3128"
    assert shown[1]["proxy"] == "none"
    assert shown[2]["proxy"] == "http://proxy.internal:3128"
    assert shown[1]["ca_file"] is shown[1]["client_cert"] is shown[1]["client_key"] is None
    text = json.dumps(shown) + repr(settings)
    assert PROXY_PASSWORD not in text
    assert "PRIVATE KEY" not in text
    assert PROXY_PASSWORD in secret_values(settings)


@pytest.mark.parametrize(
    ("key", "make", "reason"),
    [
        ("ca_file", lambda pki, other, tmp: tmp / "missing.pem", "no such file"),
        ("ca_file", lambda pki, other, tmp: tmp, "not a file"),
        ("ca_file", lambda pki, other, tmp: pki.client_key, "not a PEM bundle of CA certificates"),
        ("ca_file", lambda pki, other, tmp: _der(pki.ca, tmp), "not a PEM bundle"),
        ("client_cert", lambda pki, other, tmp: tmp / "missing.pem", "no such file"),
        ("client_cert", lambda pki, other, tmp: pki.client_key, "not a PEM certificate"),
    ],
)
def test_bad_tls_files_name_their_key(
    key: str, make: Any, reason: str, pki: TLSFiles, other_pki: TLSFiles, tmp_path: Path
) -> None:
    item: dict[str, object] = {
        "url": "https://a.example.com/",
        "client_cert": pki.client_cert,
        "client_key": pki.client_key,
    }
    item[key] = make(pki, other_pki, tmp_path)
    error = config_error(item)
    assert error.variable == f"RELAY_ENDPOINTS[0].{key}"
    assert reason in error.reason


def _der(pem: Path, tmp: Path) -> Path:
    der = tmp / "ca.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(pem.read_text()))
    return der


def _encrypted_key(pki: TLSFiles, tmp: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    path = tmp / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return path


@pytest.mark.parametrize(
    ("make_key", "reason"),
    [
        (lambda pki, other, tmp: other.client_key, "does not match the certificate in client_cert"),
        (lambda pki, other, tmp: pki.server_key, "does not match"),
        (lambda pki, other, tmp: tmp / "missing.key", "no such file"),
        (lambda pki, other, tmp: pki.client_cert, "not a PEM private key"),
        (lambda pki, other, tmp: _encrypted_key(pki, tmp), "encrypted"),
        (lambda pki, other, tmp: None, "required with client_cert"),
    ],
)
def test_a_client_key_must_match_its_certificate(
    make_key: Any, reason: str, pki: TLSFiles, other_pki: TLSFiles, tmp_path: Path
) -> None:
    item: dict[str, object] = {"url": "https://a.example.com/", "client_cert": pki.client_cert}
    key = make_key(pki, other_pki, tmp_path)
    if key is not None:
        item["client_key"] = key
    error = config_error(item)
    assert error.variable == "RELAY_ENDPOINTS[0].client_key"
    assert reason in error.reason
    assert "PRIVATE KEY" not in error.reason


@pytest.mark.parametrize(
    ("item", "key", "reason"),
    [
        ({"ca_file": "CA"}, "ca_file", "http:// has no TLS"),
        ({"client_cert": "CERT", "client_key": "KEY"}, "client_cert", "http:// has no TLS"),
        ({"client_key": "KEY"}, "client_key", "given without client_cert"),
    ],
)
def test_tls_files_on_a_scheme_without_tls(
    item: dict[str, str], key: str, reason: str, pki: TLSFiles
) -> None:
    files = {"CA": pki.ca, "CERT": pki.client_cert, "KEY": pki.client_key}
    url = "https://a.example.com/" if key == "client_key" else "http://a.example.com/"
    error = config_error({"url": url, **{k: files[v] for k, v in item.items()}})
    assert error.variable == f"RELAY_ENDPOINTS[0].{key}"
    assert reason in error.reason


@pytest.mark.parametrize(
    "proxy",
    [
        f"socks5://relay:{PROXY_PASSWORD}@proxy:1080",
        f"relay:{PROXY_PASSWORD}@proxy:3128",
        f"http://relay:{PROXY_PASSWORD}@proxy:port",
        "",
        5,
    ],
)
def test_a_bad_proxy_is_named_and_never_echoed(proxy: object) -> None:
    error = config_error({"url": "https://a.example.com/", "proxy": proxy})
    assert error.variable == "RELAY_ENDPOINTS[0].proxy"
    assert PROXY_PASSWORD not in str(error)


def test_relay_check_exits_2_naming_the_key(pki: TLSFiles, other_pki: TLSFiles) -> None:
    items = [
        {
            "url": "https://a.example.com/",
            "client_cert": str(pki.client_cert),
            "client_key": str(other_pki.client_key),
        }
    ]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != "SSL_CERT_FILE"
    }
    env |= {"RELAY_SIGNING_SECRET": SECRET, "RELAY_ENDPOINTS": json.dumps(items)}
    done = subprocess.run(
        [sys.executable, "-m", "relay", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "RELAY_ENDPOINTS[0].client_key" in done.stderr
    assert "does not match" in done.stderr
    assert "Traceback" not in done.stderr
    assert "PRIVATE KEY" not in done.stderr + done.stdout


# -- the sender each endpoint gets ---------------------------------------------------------------


async def test_only_endpoints_with_their_own_tls_or_proxy_get_their_own_sender(
    pki: TLSFiles,
) -> None:
    shared = AiohttpSender()
    plain = endpoint("https://a.example.com/")
    own_ca = endpoint("https://b.example.com/", ca_file=pki.ca)
    own_proxy = endpoint("HTTPS://c.example.com/", proxy="none")
    assert sender_for(plain, shared) is shared
    for ep in (own_ca, own_proxy):
        sender = sender_for(ep, shared)
        assert isinstance(sender, AiohttpSender) and sender is not shared
        await sender.close()
    senders = Senders.for_endpoints([plain, own_ca], http=shared)
    assert senders[plain.name] is shared and senders[own_ca.name] is not shared
    await senders.close()


async def test_mutual_tls_with_the_right_certificate(pki: TLSFiles, no_env_proxy: None) -> None:
    async with https_receiver(pki, require_client_cert=True) as receiver:
        ep = endpoint(
            receiver.url,
            ca_file=pki.ca,
            client_cert=pki.client_cert,
            client_key=pki.client_key,
        )
        result = await post(sender_for(ep, AiohttpSender()), receiver.url)
    assert (result.status, result.error) == (204, None)
    assert receiver.count == 1


async def test_a_ca_file_replaces_the_default_trust(
    pki: TLSFiles, other_pki: TLSFiles, no_env_proxy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))  # trusted by default, but not by ca_file
    async with https_receiver(pki) as receiver:
        trusting_default = await post(AiohttpSender(), receiver.url)
        ep = endpoint(receiver.url, ca_file=other_pki.ca)
        result = await post(sender_for(ep, AiohttpSender()), receiver.url)
    assert trusting_default.status == 204
    assert result.status is None
    assert result.error == (
        "TLS: the endpoint's certificate is not trusted (unable to get local issuer certificate)"
    )


async def test_the_host_name_is_always_verified(tmp_path: Path, no_env_proxy: None) -> None:
    pki = make_certs(tmp_path / "named", hosts=("relay.example.com",))
    async with https_receiver(pki) as receiver:
        ep = endpoint(receiver.url, ca_file=pki.ca)
        result = await post(sender_for(ep, AiohttpSender()), receiver.url)
    assert result.status is None
    assert result.error is not None
    assert result.error == (
        "TLS: the endpoint's certificate is not trusted "
        "(IP address mismatch, certificate is not valid for '127.0.0.1'.)"
    )


async def test_a_refused_client_certificate_is_named(
    pki: TLSFiles, tmp_path: Path, no_env_proxy: None
) -> None:
    """A server that closes gracefully (as nginx does) sends TLS's alert; the error names it."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    server_ctx = pki.server_context(require_client_cert=True)

    def serve_one() -> None:
        conn, _ = listener.accept()
        # Not wrap_socket's own handshake: when that fails it closes the socket at once,
        # and the reset for the unread request could overtake the alert.
        tls = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with contextlib.suppress(ssl.SSLError, OSError):
            tls.do_handshake()  # fails, sending the alert
        raw = socket.socket(fileno=tls.detach())
        # A lingering close, as nginx does: what the client sent after its handshake is read
        # before the socket closes, or the kernel would answer it with a reset that can
        # overtake the alert.
        with contextlib.suppress(OSError):
            raw.settimeout(5)
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(65536):
                pass
        raw.close()

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/"
    try:
        result = await post(sender_for(endpoint(url, ca_file=pki.ca), AiohttpSender()), url)
    finally:
        await asyncio.to_thread(thread.join, 10)
        listener.close()
    assert result.status is None
    assert result.error == "TLS failed: tlsv13 alert certificate required"


# -- end to end: a relay delivering over mutual TLS --------------------------------------------


@pytest.mark.parametrize("sim", [{"count": 12, "users": 4}], indirect=True)
async def test_deliveries_over_mutual_tls_succeed_only_with_the_right_certificate(
    sim: Any,
    relay_env: Any,
    run_relay: Any,
    eventually: Any,
    pki: TLSFiles,
    other_pki: TLSFiles,
    signing_secret: str,
    no_env_proxy: None,
) -> None:
    receiver = Receiver(keys=[decode_secret(signing_secret)])
    await receiver.start(ssl=pki.server_context(require_client_cert=True))
    mine = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    theirs = {"client_cert": str(other_pki.client_cert), "client_key": str(other_pki.client_key)}
    endpoints = [
        {"name": "good", "url": receiver.url + "/good", "ca_file": str(pki.ca), **mine},
        {"name": "no-cert", "url": receiver.url + "/no-cert", "ca_file": str(pki.ca)},
        {"name": "unknown-ca", "url": receiver.url + "/x", "ca_file": str(other_pki.ca), **mine},
        {"name": "other-cert", "url": receiver.url + "/y", "ca_file": str(pki.ca), **theirs},
    ]
    env = relay_env(RELAY_ENDPOINTS=json.dumps(endpoints), RELAY_RETRY_SCHEDULE="0s,1h")
    db = store_path(env)

    def failed() -> dict[str, set[str]]:
        rows = query(
            db,
            "SELECT endpoint, last_error FROM deliveries "
            "WHERE endpoint != 'good' AND state = 'pending' AND attempts = 1",
        )
        errors: dict[str, set[str]] = {}
        for row in rows:
            errors.setdefault(row["endpoint"], set()).add(row["last_error"])
        return errors

    try:
        async with run_relay(env):
            await receiver.wait_for(12, timeout=10)
            # Every user's first event failed once and waits for its retry (the rest queue).
            await eventually(lambda: len(failed()) == 3 and sum(map(len, failed().values())), 10)
            errors = failed()
    finally:
        await receiver.close()
    assert {r.path for r in receiver.received} == {"/good"}
    assert all(r.verified for r in receiver.received)
    # (This server sends its CA along, having it in its own trust store.)
    assert errors["unknown-ca"] == {
        "TLS: the endpoint's certificate is not trusted "
        "(self-signed certificate in certificate chain)"
    }
    # asyncio's TLS server resets the connection rather than send the alert.
    for name in ("no-cert", "other-cert"):
        (error,) = errors[name]
        assert "reset by the endpoint" in error, error
    stored = repr(errors)
    for secret in (signing_secret, pki.client_key.read_text(), other_pki.client_key.read_text()):
        assert secret not in stored


# -- proxies ------------------------------------------------------------------------------------


async def test_a_proxied_endpoint_tunnels_through_its_proxy_and_none_goes_direct(
    pki: TLSFiles, no_env_proxy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        https_receiver(pki) as receiver,
        ConnectProxy() as env_proxy,
        ConnectProxy(password=PROXY_PASSWORD) as own_proxy,
    ):
        monkeypatch.setenv("HTTPS_PROXY", env_proxy.url)
        target = receiver.url.removeprefix("https://")
        own = endpoint(
            receiver.url, ca_file=pki.ca, proxy=own_proxy.url_with("relay", PROXY_PASSWORD)
        )
        direct = endpoint(receiver.url, ca_file=pki.ca, proxy="none")
        from_env = endpoint(receiver.url, ca_file=pki.ca)

        result = await post(sender_for(own, AiohttpSender()), receiver.url)
        assert result.status == 204, result.error
        assert own_proxy.connects == [target] and env_proxy.seen == []
        assert (
            own_proxy.seen[0][2]
            == "Basic " + base64.b64encode(f"relay:{PROXY_PASSWORD}".encode()).decode()
        )

        result = await post(sender_for(direct, AiohttpSender()), receiver.url)
        assert result.status == 204, result.error
        assert env_proxy.seen == [] and len(own_proxy.seen) == 1

        result = await post(sender_for(from_env, AiohttpSender()), receiver.url)
        assert result.status == 204, result.error
        assert env_proxy.connects == [target]
    assert receiver.count == 3


async def test_proxy_credentials_from_the_environment_go_in_the_url(
    pki: TLSFiles, no_env_proxy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: aiohttp's ``proxy_auth`` argument is deprecated; passing it warned (an error
    under pytest) on every request through an ``HTTPS_PROXY`` with credentials."""
    async with (
        https_receiver(pki) as receiver,
        ConnectProxy(password=PROXY_PASSWORD) as proxy,
    ):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url_with("relay", PROXY_PASSWORD))
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
        result = await post(AiohttpSender(), receiver.url)
    assert result.status == 204, result.error
    assert len(proxy.connects) == 1


async def test_proxy_failures_say_why_without_the_credentials(
    pki: TLSFiles, no_env_proxy: None
) -> None:
    async with https_receiver(pki) as receiver, ConnectProxy(password="other") as proxy:
        refused = endpoint(
            receiver.url, ca_file=pki.ca, proxy=proxy.url_with("relay", PROXY_PASSWORD)
        )
        result = await post(sender_for(refused, AiohttpSender()), receiver.url)
        assert result.error == "proxy refused the connection: 407"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed = f"http://relay:{PROXY_PASSWORD}@127.0.0.1:{sock.getsockname()[1]}"
        down = endpoint(receiver.url, ca_file=pki.ca, proxy=closed)
        result = await post(sender_for(down, AiohttpSender()), receiver.url)
    assert result.error is not None and result.error.startswith("proxy connection failed: ")
    assert PROXY_PASSWORD not in result.error
    assert receiver.count == 0
