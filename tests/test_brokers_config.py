"""Broker URLs in the configuration (CONTRACT 3 and 4b): what is accepted, the default
names, what is refused (exit 2 naming ``RELAY_ENDPOINTS[i].url``), and secrets kept out."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.__main__ import main
from relay.brokers.target import AmqpTarget, NatsTarget, RedisTarget, parse
from relay.config import describe, load_settings, secret_values, warnings
from relay.errors import ConfigError
from relay.transport import AiohttpSender, sender_for

SECRET = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()
TOKEN_KEY = base64.b64encode(bytes(range(32))).decode()
PASSWORD = "brokerpass_Q8w2E6r4"


def settings_for(*endpoints: object, **extra: str):  # type: ignore[no-untyped-def]
    environ = {"RELAY_SIGNING_SECRET": SECRET, "RELAY_ENDPOINTS": json.dumps(list(endpoints))}
    return load_settings({**environ, **extra})


def refused(*endpoints: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        settings_for(*endpoints)
    return info.value


@pytest.mark.parametrize(
    ("url", "target", "name"),
    [
        (
            "amqp://u:p@rabbit:5672/?exchange=sfox&routing_key=users",
            AmqpTarget("amqp://u:p@rabbit:5672", "rabbit", 5672, "sfox", "users", False),
            "rabbit:5672-sfox-users",
        ),
        (
            "amqps://rabbit/prod",
            AmqpTarget("amqps://rabbit/prod", "rabbit", 5671, "", None, True),
            "rabbit:5671",
        ),
        (
            "amqp://rabbit/%2F?routing_key=a/b",
            AmqpTarget("amqp://rabbit/%2F", "rabbit", 5672, "", "a/b", False),
            "rabbit:5672-a-b",
        ),
        (
            "nats://u:p@nats:4222/sfox.users",
            NatsTarget("nats://u:p@nats:4222", "nats", 4222, "sfox.users", False),
            "nats:4222-sfox.users",
        ),
        (
            "tls://nats/sfox.users",
            NatsTarget("tls://nats", "nats", 4222, "sfox.users", True),
            "nats:4222-sfox.users",
        ),
        (
            "redis://:p@redis:6380/2?stream=sfox:users&maxlen=1000",
            RedisTarget("redis://:p@redis:6380/2", "redis", 6380, 2, "sfox:users", 1000, False),
            "redis:6380-sfox:users",
        ),
        (
            "rediss://redis?stream=s",
            RedisTarget("rediss://redis/0", "redis", 6379, 0, "s", None, True),
            "redis:6379-s",
        ),
    ],
)
def test_broker_urls_and_their_default_names(url: str, target: object, name: str) -> None:
    assert parse(url) == target
    [endpoint] = settings_for({"url": url}).endpoints
    assert endpoint.name == name
    assert "p@" not in endpoint.name and "u:" not in endpoint.name


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://redis:6379/0", "stream is required"),
        ("redis://redis:6379/0?stream=", "stream is required"),
        ("redis://redis/x?stream=s", "database number"),
        ("redis://redis/0?stream=s&maxlen=0", "maxlen"),
        ("redis://redis/0?stream=s&cluster=true", "unknown query parameter 'cluster'"),
        ("redis://a:6379,b:6379/0?stream=s", "one broker host"),
        ("redis+sentinel://s:26379/mymaster?stream=s", "Sentinel and Cluster"),
        ("redis-sentinel://s:26379/0?stream=s", "Sentinel and Cluster"),
        ("nats://nats:4222", "a subject is required"),
        ("nats://nats:4222/", "a subject is required"),
        ("nats://nats:4222/sfox.*", "not a subject"),
        ("nats://nats:4222/sfox.>", "not a subject"),
        ("nats://nats:4222/sfox..users", "not a subject"),
        ("nats://nats:4222/s?x=1", "unknown query parameter 'x'"),
        ("amqp://rabbit/?queue=q", "unknown query parameter 'queue'"),
        ("amqp://rabbit/?routing_key=", "routing_key is empty"),
        ("amqp://rabbit/?exchange=a&exchange=b", "given twice"),
        ("amqp:///?routing_key=q", "one broker host"),
        ("kafka://k:9092/t", "http(s) URL or a broker URL"),
    ],
)
def test_a_broker_url_without_its_parts_is_refused_naming_the_url(url: str, reason: str) -> None:
    error = refused({"url": "https://ok.example/x"}, {"url": url})
    assert error.variable == "RELAY_ENDPOINTS[1].url"
    assert reason in error.reason


def test_proxy_on_a_broker_is_refused() -> None:
    error = refused({"url": "nats://nats/s", "proxy": "http://proxy:3128"})
    assert error.variable == "RELAY_ENDPOINTS[0].proxy"
    assert "only for http(s) endpoints" in error.reason


def test_broker_passwords_are_secrets_everywhere() -> None:
    urls = [
        f"amqp://relay:{PASSWORD}@rabbit/?routing_key=q",
        f"nats://relay:{PASSWORD}@nats/s",
        f"redis://:{PASSWORD}@redis/0?stream=s",
    ]
    settings = settings_for(*({"url": url} for url in urls))
    shown = json.dumps(describe(settings))
    assert PASSWORD not in shown
    assert all(PASSWORD not in endpoint.name for endpoint in settings.endpoints)
    assert all("***@" in endpoint.display_url for endpoint in settings.endpoints)
    assert PASSWORD in secret_values(settings)  # so the log redactor scrubs it
    with pytest.raises(ConfigError) as info:
        settings_for({"url": f"nats://relay:{PASSWORD}@nats/s.*"})
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://a/x", True),
        ("amqp://rabbit/?routing_key=q", True),
        ("nats://nats/s", True),
        ("redis://redis/0?stream=s", True),
        ("https://a/x", False),
        ("amqps://rabbit/?routing_key=q", False),
        ("tls://nats/s", False),
        ("rediss://redis/0?stream=s", False),
    ],
)
def test_forward_to_a_plaintext_destination_is_warned_about(url: str, warned: bool) -> None:
    settings = settings_for(
        {"url": url, "user_token": "forward", "name": "e"},
        {"url": url, "name": "stripped"},
        RELAY_TOKEN_KEY=TOKEN_KEY,
    )
    found = [line for line in warnings(settings) if "user_token" in line]
    assert found == (
        ["RELAY_ENDPOINTS[0].user_token: forward sends user tokens in plaintext "
         f"({url.split(':')[0]}://); use https or the encrypt policy"]
        if warned
        else []
    )  # fmt: skip


def test_sender_for_picks_the_broker_by_scheme_and_http_keeps_the_pool() -> None:
    settings = settings_for(
        {"url": "https://a/x"},
        {"url": "amqp://rabbit/?routing_key=q"},
        {"url": "nats://nats/s"},
        {"url": "redis://redis/0?stream=s"},
    )
    pool = AiohttpSender()
    kinds = [type(sender_for(ep, pool)).__name__ for ep in settings.endpoints]
    assert kinds == ["AiohttpSender", "AmqpSender", "JetStreamSender", "RedisStreamSender"]
    assert sender_for(settings.endpoints[0], pool) is pool


def test_an_http_only_relay_loads_no_client_it_does_not_use() -> None:
    """No broker client, no httpx (its senders and the reconciler are aiohttp), no simulator
    (the daemon's memory, bench: RSS idle), not even to build the command line."""
    unused = ("aio_pika", "aiormq", "nats", "redis", "httpx", "relay.simulator")
    code = (
        "import sys, relay.app, relay.__main__, relay.transport, relay.config, relay.reconcile;"
        "relay.__main__._parser();"
        f"print(sorted(m for m in {unused!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_relay_check_opens_no_broker_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    for name in [n for n in os.environ if n.startswith("RELAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RELAY_API_KEY", "k" * 32)
    monkeypatch.setenv("RELAY_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("RELAY_STORE", f"sqlite:///{tmp_path}/relay.db")
    monkeypatch.setenv(
        "RELAY_ENDPOINTS",
        json.dumps(
            [
                {"url": f"amqp://u:{PASSWORD}@127.0.0.1:{port}/?routing_key=q"},
                {"url": f"nats://u:{PASSWORD}@127.0.0.1:{port}/s"},
                {"url": f"redis://:{PASSWORD}@127.0.0.1:{port}/0?stream=s"},
            ]
        ),
    )
    try:
        main(["check"])
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err


def test_compose_has_an_optional_rabbitmq_profile() -> None:
    import yaml

    compose = yaml.safe_load(
        (Path(__file__).parent.parent / "config/docker-compose.yml").read_text()
    )
    services = compose["services"]
    assert services["rabbitmq"]["profiles"] == ["rabbitmq"]
    demo = services["demo-rabbitmq"]
    assert demo["profiles"] == ["rabbitmq"]
    assert demo["command"][0] == "demo"
    url = demo["command"][demo["command"].index("--to") + 1]
    target = parse(url)
    assert isinstance(target, AmqpTarget) and target.host == "rabbitmq"
    user = services["rabbitmq"]["environment"]
    assert f"{user['RABBITMQ_DEFAULT_USER']}:{user['RABBITMQ_DEFAULT_PASS']}@" in url
    for name in ("relay", "simulator", "receiver"):  # the default set is unchanged
        assert "profiles" not in services[name]


def test_the_readme_backlog_check_verifies_old_messages_that_standardwebhooks_refuses() -> None:
    import re
    import time

    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    from relay.signing import decode_secret, sign

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = re.search(r"\*\*Reading a backlog\.\*\*.*?```python\n(.*?)```", readme, re.S)
    assert snippet is not None
    namespace: dict[str, object] = {}
    exec(snippet[1], namespace)  # the README's code, as printed
    check = namespace["verified"]
    assert callable(check)

    def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
        return bool(check(headers, body, [secret]))

    body = b'{"sequence":1}'
    stamp = int(time.time()) - 3600  # an hour-old message in a backlog
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign([decode_secret(SECRET)], "evt_1", stamp, body),
    }
    assert verify(SECRET, headers, body) is True
    assert verify(SECRET, headers, body + b" ") is False
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, headers)  # the 5-minute tolerance
    assert "Reading a backlog" in readme[readme.index("**Verifying a backlog.**") :]


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--to", "nats://h:4222/a.*"], "not a subject"),
        (["--to", "redis://h/0"], "stream is required"),
        (["--to", "nats://h:4222/s", "--keep-running"], "no --keep-running"),
    ],
)
def test_demo_to_a_bad_broker_url_exits_2(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert "--to" in err and reason in err
