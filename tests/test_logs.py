"""Structured, redacted logs (relay/logs.py): the README, "Secrets"."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import PurePosixPath

import pytest

from relay.logs import ConsoleFormatter, JsonFormatter, Redactor, setup_logging

API_KEY = "sk_live_Qm9v3xT7pL2wR8zY"
ADMIN_TOKEN = "adm_Zq3vN8wLr2Xk7Pj4"
USER_TOKEN = "2000611ea497d8ae4832c52166e0a26162cbb74716ab2662c50f8b47cdad3979"
EVENT_ID = "evt_" + "9f" * 32
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THs"
NOISY = ("websockets", "aiohttp", "httpx", "httpcore", "uvicorn.access", "asyncio")

Capture = Callable[..., io.StringIO]


@pytest.fixture
def capture() -> Iterator[Capture]:
    """setup_logging into a StringIO; every handler and level is put back afterwards."""
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in NOISY}
    saved_root = root.level
    handlers: list[logging.Handler] = []

    def make(
        fmt: str = "json", secrets: Iterable[str] = (API_KEY, ADMIN_TOKEN), level: str = "debug"
    ) -> io.StringIO:
        stream = io.StringIO()
        handlers.append(setup_logging(level, fmt, Redactor(secrets), stream=stream))
        return stream

    yield make
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(saved_root)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


log = logging.getLogger("relay.test")


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


class Leaky:
    """An object whose repr and str carry a secret (e.g. a config object)."""

    def __repr__(self) -> str:
        return f"Leaky(api_key={API_KEY!r})"

    def __str__(self) -> str:
        return f"leaky {ADMIN_TOKEN}"


# --- JSON format -----------------------------------------------------------------------------


def test_json_line_has_ts_level_logger_msg_and_fields(capture: Capture) -> None:
    stream = capture()
    before = datetime.now(UTC).replace(microsecond=0)
    log.info(
        "delivered %s to %s",
        EVENT_ID,
        "crm",
        extra={"event": "dispatch.delivered", "attempt": 2, "latency": 0.25, "skipped": None},
    )
    [line] = _lines(stream)
    ts = line.pop("ts")
    assert line == {
        "level": "INFO",
        "logger": "relay.test",
        "msg": f"delivered {EVENT_ID} to crm",
        "event": "dispatch.delivered",
        "attempt": 2,
        "latency": 0.25,
    }
    assert isinstance(ts, str)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", ts)
    assert before <= datetime.fromisoformat(ts) <= datetime.now(UTC)


def test_json_one_object_per_line(capture: Capture) -> None:
    stream = capture()
    log.warning("first\nsecond line", extra={"event": "a"})
    log.error("third", extra={"nested": {"k": [1, 2], 3: "int key"}})
    log.debug("fourth", extra={"path": PurePosixPath("/data/relay.db"), "big": 2**63 - 1})
    assert _lines(stream) == [
        {"ts": _lines(stream)[0]["ts"], "level": "WARNING", "logger": "relay.test",
         "msg": "first\nsecond line", "event": "a"},
        {"ts": _lines(stream)[1]["ts"], "level": "ERROR", "logger": "relay.test", "msg": "third",
         "nested": {"k": [1, 2], "3": "int key"}},
        {"ts": _lines(stream)[2]["ts"], "level": "DEBUG", "logger": "relay.test",
         "msg": "fourth", "path": "/data/relay.db", "big": 2**63 - 1},
    ]  # fmt: skip
    assert len(stream.getvalue().splitlines()) == 3


def test_json_exception(capture: Capture) -> None:
    stream = capture()
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"event": "x"})
    [line] = _lines(stream)
    exc = line["exc"]
    assert isinstance(exc, str)
    assert exc.startswith("Traceback (most recent call last):\n")
    assert exc.endswith("ValueError: boom")
    assert (line["level"], line["msg"], line["event"]) == ("ERROR", "failed", "x")


def test_level_and_noisy_loggers(capture: Capture) -> None:
    stream = capture(level="info")
    log.debug("hidden")
    logging.getLogger("httpx").info("hidden too")
    logging.getLogger("httpx").warning("shown")
    log.info("shown too")
    assert [line["msg"] for line in _lines(stream)] == ["shown", "shown too"]
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("websockets").level == logging.WARNING


def test_setup_logging_replaces_its_previous_handler(capture: Capture) -> None:
    first = capture()
    second = capture()
    log.info("once")
    assert first.getvalue() == ""
    assert [line["msg"] for line in _lines(second)] == ["once"]
    relay_handlers = [h for h in logging.getLogger().handlers if getattr(h, "_relay", False)]
    assert len(relay_handlers) == 1


# --- Redactor ------------------------------------------------------------------------------------

REDACT = [
    ("configured secret", f"key={API_KEY}!", "key=***!"),
    ("each occurrence", f"{ADMIN_TOKEN}/{ADMIN_TOKEN}", "***/***"),
    ("user token, 64 hex", f"token {USER_TOKEN} end", "token *** end"),
    ("upper-case hex", f"t={USER_TOKEN.upper()}", "t=***"),
    ("40 hex", "x " + "a" * 40, "x ***"),
    ("32 hex", "x " + "a" * 32, "x ***"),
    ("31 hex kept", "x " + "a" * 31, "x " + "a" * 31),
    ("quoted hex", f'"token":"{USER_TOKEN}"', '"token":"***"'),
    ("event id kept", f"event {EVENT_ID} stored", f"event {EVENT_ID} stored"),
    ("event id in JSON kept", f'{{"event_id":"{EVENT_ID}"}}', f'{{"event_id":"{EVENT_ID}"}}'),
    ("hex glued to letters kept", f"x{USER_TOKEN}", f"x{USER_TOKEN}"),
    ("URL credentials", "POST https://user:pa55w0rd@hooks.example.com/x failed",
     "POST https://***@hooks.example.com/x failed"),
    ("store URL", "postgresql://relay:pgpass_Y3n8@db:5432/relay",
     "postgresql://***@db:5432/relay"),
    ("URL without credentials", "https://hooks.example.com:8443/x",
     "https://hooks.example.com:8443/x"),
    ("bearer", "Authorization: Bearer abc.DEF-123_xyz~+/=", "Authorization: Bearer ***"),
    ("bearer lower-case", "authorization: bearer abcdefgh", "authorization: bearer ***"),
    ("short bearer kept", "Bearer abc", "Bearer abc"),
    ("basic credentials", "> Authorization: Basic dXNlcjpwYXNzd29yZA==",
     "> Authorization: Basic ***"),
    ("JWT", f"jwt {JWT} end", "jwt *** end"),
    ("nothing secret", "user_id=client_09e4 status=VERIFIED",
     "user_id=client_09e4 status=VERIFIED"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [pytest.param(*r[1:], id=r[0]) for r in REDACT])
def test_redactor(text: str, expected: str) -> None:
    assert Redactor([API_KEY, ADMIN_TOKEN])(text) == expected


def test_redactor_longest_secret_first_and_short_ones_ignored() -> None:
    redact = Redactor(["abcd-efgh-ijkl", "abcd-efgh-ijkl-mnop", "abcd-efgh-ij", "abc", ""])
    assert redact("abcd-efgh-ijkl-mnop abcd-efgh-ijkl abc") == "*** *** abc"
    redact.add(["abc-later-0123"])
    assert redact("abc-later-0123") == "***"


def test_a_short_secret_never_blanks_a_word_out_of_log_lines(capture: Capture) -> None:
    """A header value `production` vanished from every line: `private.***.users`."""
    stream = capture(secrets=["production", "postgres", "relay"])
    log.info(
        "subscribed to private.enterprise.users; store postgresql://relay@db/relay_production.db",
        extra={"feed": "production", "authorization": "production"},
    )
    [line] = _lines(stream)
    # (A lone user info may be a token, so the URL masker hides it; the words stay.)
    assert line["msg"] == (
        "subscribed to private.enterprise.users; store postgresql://***@db/relay_production.db"
    )
    assert (line["feed"], line["authorization"]) == ("production", "***")


def test_secret_named_fields_are_masked_at_any_depth(capture: Capture) -> None:
    stream = capture(secrets=[])
    log.info("x", extra={"headers": {"Authorization": "Basic abc", "x-env": "prod"}, "token": 1})
    [line] = _lines(stream)
    assert line["headers"] == {"Authorization": "***", "x-env": "prod"}
    assert line["token"] == "***"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://relay@db/relay", "postgresql://***@db/relay"),
        ("postgresql://db/relay", "postgresql://db/relay"),
        ("https://h/x?token=abc&v=1 next", "https://h/x?token=***&v=*** next"),
    ],
)
def test_urls_are_masked_by_the_one_url_masker(text: str, expected: str) -> None:
    assert Redactor([])(text) == expected


# --- redaction through the formatters --------------------------------------------------------


def _emit_everywhere() -> None:
    """One record carrying secrets by every path: msg, args, fields, reprs, exception text."""
    try:
        raise RuntimeError(f"auth failed for {API_KEY} with token {USER_TOKEN}")
    except RuntimeError:
        log.error(
            f"literal {API_KEY} and %s and %r via https://u:p4ss@h/ Bearer {ADMIN_TOKEN}",
            ADMIN_TOKEN,
            Leaky(),
            exc_info=True,
            extra={
                "event": "feed.auth_failed",
                "api_key": API_KEY,
                "nested": {"token": USER_TOKEN, "list": [ADMIN_TOKEN]},
                "obj": Leaky(),
                "event_id": EVENT_ID,
            },
        )


def test_json_redacts_every_path(capture: Capture) -> None:
    stream = capture()
    _emit_everywhere()
    text = stream.getvalue()
    for secret in (API_KEY, ADMIN_TOKEN, USER_TOKEN, "p4ss"):
        assert secret not in text
    [line] = _lines(stream)
    assert (
        line["msg"] == "literal *** and *** and Leaky(api_key='***') via https://***@h/ Bearer ***"
    )
    assert line["api_key"] == "***"
    assert line["nested"] == {"token": "***", "list": ["***"]}
    assert line["obj"] == "leaky ***"
    assert line["event_id"] == EVENT_ID
    exc = line["exc"]
    assert isinstance(exc, str)
    assert exc.endswith("RuntimeError: auth failed for *** with token ***")


def test_console_format_and_redaction(capture: Capture) -> None:
    stream = capture(fmt="console")
    log.warning("feed gap after %d", 41, extra={"event": "feed.gap", "missing": 2, "user_id": "u1"})
    _emit_everywhere()
    text = stream.getvalue()
    first = text.splitlines()[0]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING relay\.test: feed gap after 41  "
        r"missing=2 user_id=u1",
        first,
    )
    for secret in (API_KEY, ADMIN_TOKEN, USER_TOKEN, "p4ss"):
        assert secret not in text
    assert "ERROR   relay.test: literal *** and *** and Leaky(api_key='***')" in text
    assert "api_key=*** nested={'token': '***', 'list': ['***']} obj=leaky ***" in text
    assert f"event_id={EVENT_ID}" in text
    assert "event=" not in text
    assert text.rstrip("\n").endswith("RuntimeError: auth failed for *** with token ***")


def test_formatters_directly() -> None:
    record = logging.LogRecord("relay.x", logging.INFO, __file__, 1, "k=%s", (API_KEY,), None)
    record.user_id = "u1"
    line = json.loads(JsonFormatter(Redactor([API_KEY])).format(record))
    assert (line["msg"], line["user_id"]) == ("k=***", "u1")
    console = ConsoleFormatter(Redactor([API_KEY])).format(record)
    assert console.endswith(" INFO    relay.x: k=***  user_id=u1")


# --- bugs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret", ['pa"ss_Wq9z_4kT', "pa\\ss_Wq9z_4kT"], ids=["quote", "backslash"]
)
def test_json_redacts_secrets_with_escaped_characters(capture: Capture, secret: str) -> None:
    stream = capture(secrets=[secret])
    log.info("password %s", secret, extra={"header": secret})
    [line] = _lines(stream)
    assert (line["msg"], line["header"]) == ("password ***", "***")


@pytest.mark.parametrize("sep", ["\n", "\t", "\r"], ids=["newline", "tab", "cr"])
def test_json_redacts_token_after_escaped_whitespace(capture: Capture, sep: str) -> None:
    stream = capture()
    log.info("frame:%s%s", sep, USER_TOKEN)
    assert USER_TOKEN not in stream.getvalue()


def test_json_field_with_big_int(capture: Capture) -> None:
    stream = capture()
    log.warning("feed sequence gap", extra={"sequence": 2**64})
    [line] = _lines(stream)
    assert line["sequence"] == 2**64


async def test_each_stored_event_is_logged_at_info(
    tmp_path: PurePosixPath, caplog: pytest.LogCaptureFixture
) -> None:
    from relay.app import Ingest
    from relay.events import Message, parse_frame
    from relay.metrics import Metrics
    from relay.store.base import Target
    from relay.store.sqlite import SQLiteStore

    frame = {
        "sequence": 7,
        "recipient": "private.enterprise.users",
        "timestamp": 1717005327981000001,
        "payload": {"user_id": "client_09e4", "status": "PENDING", "email": "a@example.com"},
    }
    message = parse_frame(json.dumps(frame))
    assert isinstance(message, Message)
    store = SQLiteStore(f"{tmp_path}/relay.db")
    await store.open(daemon=False)
    try:
        ingest = Ingest(store, [Target("crm")], Metrics(), None, on_stored=lambda: None)
        caplog.set_level(logging.INFO, logger="relay.app")
        await ingest.on_messages([message])
        await ingest.on_messages([message])  # a duplicate is not stored again
        await ingest.flush()
    finally:
        await store.close()
    [record] = [r for r in caplog.records if getattr(r, "event", "") == "event.stored"]
    assert record.levelno == logging.INFO
    assert (record.user_id, record.sequence, record.feed) == (
        "client_09e4",
        7,
        "private.enterprise.users",
    )
    assert record.event_id.startswith("evt_")
    assert "a@example.com" not in record.getMessage() + str(record.__dict__)


def test_credentials_in_the_sfox_urls_never_reach_a_log_line(capture: Capture) -> None:
    """websockets' DEBUG log printed RELAY_WS_URL's credentials."""
    from relay.config import load_settings, secret_values

    settings = load_settings(
        {
            "RELAY_WS_URL": "wss://feeduser:feedpass_Q8r4T6y2@ws.example.com/ws",
            "RELAY_API_URL": "https://apiuser:apipass_K3j5H7g9@api.example.com",
        }
    )
    stream = capture(secrets=secret_values(settings))
    logging.getLogger("websockets.client").warning(
        "connecting to wss://feeduser:feedpass_Q8r4T6y2@ws.example.com/ws; "
        "> Authorization: Basic ZmVlZHVzZXI6ZmVlZHBhc3NfUThyNFQ2eTI=; password feedpass_Q8r4T6y2"
    )
    text = stream.getvalue()
    for secret in ("feedpass_Q8r4T6y2", "feeduser", "ZmVlZHVzZXI6ZmVlZHBhc3NfUThyNFQ2eTI="):
        assert secret not in text


async def test_the_event_loops_lines_are_written_together_once_per_iteration(
    capture: Capture,
) -> None:
    stream = capture()
    for n in range(3):
        log.info("line %d", n)
    assert stream.getvalue() == ""  # queued: one write when this iteration's callbacks ran
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [line["msg"] for line in _lines(stream)] == ["line 0", "line 1", "line 2"]


async def test_a_line_from_another_thread_is_written_at_once_after_the_queued_ones(
    capture: Capture,
) -> None:
    stream = capture()
    log.info("from the loop")
    await asyncio.to_thread(log.info, "from the store's thread")
    assert [line["msg"] for line in _lines(stream)] == ["from the loop", "from the store's thread"]


def test_queued_lines_are_flushed_by_logging_shutdown(capture: Capture) -> None:
    stream = capture()

    async def main() -> None:
        log.info("the last line before the loop ended")

    asyncio.run(main())  # the loop closed before the write was due
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_relay", False)]
    logging.shutdown([weakref.ref(h) for h in ours])  # what the interpreter does at exit
    assert [line["msg"] for line in _lines(stream)] == ["the last line before the loop ended"]
