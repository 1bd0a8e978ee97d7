"""Configuration (see the README): one test per rule, each with an explicit environment."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from pydantic import SecretBytes, SecretStr

from relay.config import (
    EndpointConfig,
    Settings,
    describe,
    endpoint_renames,
    load_settings,
    parse_duration,
    secret_values,
    warnings,
)
from relay.errors import ConfigError

SIGNING_KEY = bytes(range(1, 33))
SIGNING_SECRET = "whsec_" + base64.b64encode(SIGNING_KEY).decode()
NEXT_SIGNING_KEY = bytes(range(101, 125))
NEXT_SIGNING_SECRET = "whsec_" + base64.b64encode(NEXT_SIGNING_KEY).decode()
ENDPOINT_SIGNING_SECRET = "whsec_" + base64.b64encode(bytes(range(60, 90))).decode()
TOKEN_KEY_BYTES = bytes(range(200, 232))
TOKEN_KEY = base64.b64encode(TOKEN_KEY_BYTES).decode()
RECEIVER_KEY_BYTES = bytes(range(150, 182))
RECEIVER_KEY = base64.b64encode(RECEIVER_KEY_BYTES).decode()
API_KEY = "5f1c9e0a7b3d4c2e8f6a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e"
ADMIN_TOKEN = "adm_Zq3vN8wLr2Xk7Pj4"
HEADER_VALUE = "Bearer hdr_Gk2Lm9Qp4Rs7Tv1W"
URL_PASSWORD = "urlpass_H7k2M9q4"
STORE_PASSWORD = "pgpass_Y3n8B1v6"
QUERY_TOKEN = "qtok_R5t8Y2u4"

SIGNED = {"RELAY_SIGNING_SECRET": SIGNING_SECRET}


def fail(environ: Mapping[str, str], *, for_run: bool = False) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(environ, for_run=for_run)
    return info.value


def endpoints_json(*objects: Mapping[str, object]) -> str:
    return json.dumps(list(objects))


# -- defaults ------------------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    settings = load_settings({})
    assert settings.api_key is None
    assert settings.ws_url == "wss://ws.sfox.com/ws"
    assert settings.api_url == "https://api.sfox.com"
    assert settings.feeds == ("private.enterprise.users",)
    assert settings.endpoints == ()
    assert settings.signing_secrets == ()
    assert settings.allow_unsigned is False
    assert settings.user_token == "strip"
    assert settings.token_key is None
    assert settings.store.get_secret_value() == "sqlite:///relay.db"
    assert settings.retention == 7 * 86400
    assert (settings.admin_host, settings.admin_port) == ("127.0.0.1", 8080)
    assert settings.admin_token is None
    assert settings.retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert settings.delivery_timeout == 15
    assert settings.shutdown_grace == 20
    assert settings.lease == 60
    assert settings.reorder_window == 1
    assert settings.replicas == 1
    assert settings.reconcile_interval == 15 * 60
    assert settings.log_level == "INFO"
    assert settings.log_format == "json"
    assert settings.needs_token_storage is False


def test_an_empty_variable_counts_as_unset() -> None:
    settings = load_settings({"RELAY_DELIVERY_TIMEOUT": "", "RELAY_API_KEY": ""})
    assert settings.delivery_timeout == 15
    assert settings.api_key is None


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(ValueError):
        settings.replicas = 2


# -- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5),
        ("5m", 300),
        ("2h", 7200),
        ("7d", 604800),
        ("0s", 0),
        ("1.5s", 1.5),
        (" 10s ", 10),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "s", "-5s", "5 s", "5S", "1w", "5sec", "1h30m", "abc"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    "variable",
    [
        "RELAY_RETENTION",
        "RELAY_DELIVERY_TIMEOUT",
        "RELAY_SHUTDOWN_GRACE",
        "RELAY_LEASE",
        "RELAY_REORDER_WINDOW",
    ],
)
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("15", "not a duration: expected e.g. 250ms, 5s, 5m, 2h, 7d"),
        ("soon", "not a duration: expected e.g. 250ms, 5s, 5m, 2h, 7d"),
        ("0s", "must be more than 0s"),
    ],
)
def test_durations_are_positive_and_need_a_unit(variable: str, value: str, reason: str) -> None:
    error = fail({variable: value})
    assert (error.variable, error.reason) == (variable, reason)


def test_retry_schedule_allows_zero_and_its_length_is_the_attempt_limit() -> None:
    settings = load_settings({"RELAY_RETRY_SCHEDULE": "0s, 250ms,1m"})
    assert settings.retry_schedule == (0, 0.25, 60)


@pytest.mark.parametrize(("value", "reason"), [("0s,,5s", "step 2"), (",", "step 1"), (" ", "")])
def test_retry_schedule_refuses_bad_steps(value: str, reason: str) -> None:
    error = fail({"RELAY_RETRY_SCHEDULE": value})
    assert error.variable == "RELAY_RETRY_SCHEDULE"
    assert reason in error.reason


def test_reconcile_interval_off_disables_it() -> None:
    assert load_settings({"RELAY_RECONCILE_INTERVAL": "off"}).reconcile_interval is None
    assert load_settings({"RELAY_RECONCILE_INTERVAL": "OFF"}).reconcile_interval is None
    assert load_settings({"RELAY_RECONCILE_INTERVAL": "1h"}).reconcile_interval == 3600
    assert fail({"RELAY_RECONCILE_INTERVAL": "never"}).variable == "RELAY_RECONCILE_INTERVAL"


@pytest.mark.parametrize("value", ["3s", "9999ms", "1ms"])
def test_a_reconcile_interval_below_10s_is_refused(value: str) -> None:
    error = fail({"RELAY_RECONCILE_INTERVAL": value})
    assert error.variable == "RELAY_RECONCILE_INTERVAL"
    assert "10s" in error.reason
    assert load_settings({"RELAY_RECONCILE_INTERVAL": "10s"}).reconcile_interval == 10.0


# -- scalars -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True)]
    + [("false", False), ("0", False), ("no", False)],
)
def test_booleans(value: str, expected: bool) -> None:
    assert load_settings({"RELAY_ALLOW_UNSIGNED": value}).allow_unsigned is expected


def test_a_bad_boolean_is_an_error() -> None:
    assert fail({"RELAY_ALLOW_UNSIGNED": "maybe"}).variable == "RELAY_ALLOW_UNSIGNED"


@pytest.mark.parametrize(("value", "ok"), [("1", True), ("3", True), ("0", False), ("x", False)])
def test_replicas_are_at_least_one(value: str, ok: bool) -> None:
    if ok:
        assert load_settings({"RELAY_REPLICAS": value}).replicas == int(value)
    else:
        assert fail({"RELAY_REPLICAS": value}).variable == "RELAY_REPLICAS"


@pytest.mark.parametrize(("value", "level"), [("debug", "DEBUG"), ("Warning", "WARNING")])
def test_log_level_is_case_insensitive(value: str, level: str) -> None:
    assert load_settings({"RELAY_LOG_LEVEL": value}).log_level == level


def test_log_level_and_format_refuse_others() -> None:
    assert fail({"RELAY_LOG_LEVEL": "TRACE"}).variable == "RELAY_LOG_LEVEL"
    assert fail({"RELAY_LOG_FORMAT": "xml"}).variable == "RELAY_LOG_FORMAT"
    assert load_settings({"RELAY_LOG_FORMAT": "console"}).log_format == "console"


def test_feeds_are_comma_separated() -> None:
    settings = load_settings(
        {"RELAY_FEEDS": "private.enterprise.users, private.enterprise.users.trades,"}
    )
    assert settings.feeds == ("private.enterprise.users", "private.enterprise.users.trades")
    assert fail({"RELAY_FEEDS": " , "}).variable == "RELAY_FEEDS"


@pytest.mark.parametrize("name", ["nope", "private.enterprise.user", "private.enterprise.users.x"])
def test_a_feed_sfox_does_not_document_is_refused(name: str) -> None:
    # sFOX would refuse it at subscribe time, and the relay would reconnect in a loop.
    error = fail({"RELAY_FEEDS": f"private.enterprise.users,{name}"})
    assert error.variable == "RELAY_FEEDS"
    assert repr(name) in str(error) and "private.enterprise.users.balances" in str(error)
    endpoint = [{"url": "http://127.0.0.1:9/h", "feeds": [name]}]
    assert fail({"RELAY_ENDPOINTS": json.dumps(endpoint)}).variable == "RELAY_ENDPOINTS[0].feeds"


# -- URLs and addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "ok"),
    [
        ("RELAY_WS_URL", "ws://127.0.0.1:9000/ws", True),
        ("RELAY_WS_URL", "wss://ws.sfox.com/ws", True),
        ("RELAY_WS_URL", "https://ws.sfox.com/ws", False),
        ("RELAY_WS_URL", "ws://", False),
        ("RELAY_API_URL", "http://127.0.0.1:9000", True),
        ("RELAY_API_URL", "wss://api.sfox.com", False),
        ("RELAY_API_URL", "http://host:port", False),
        ("RELAY_STORE", "sqlite:////data/relay.db", True),
        ("RELAY_STORE", "postgresql://relay:pw@db:5432/relay", True),
        ("RELAY_STORE", "postgres://db/relay", True),
        ("RELAY_STORE", "sqlite:///", False),
        ("RELAY_STORE", "mysql://db/relay", False),
        ("RELAY_STORE", "relay.db", False),
    ],
)
def test_url_schemes(variable: str, value: str, ok: bool) -> None:
    if ok:
        load_settings({variable: value})
    else:
        assert fail({variable: value}).variable == variable


def test_api_url_loses_its_trailing_slash() -> None:
    assert load_settings({"RELAY_API_URL": "https://api.sfox.com/"}).api_url == (
        "https://api.sfox.com"
    )


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("0.0.0.0:8080", "0.0.0.0", 8080),
        ("localhost:0", "localhost", 0),
        ("[::1]:8080", "::1", 8080),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
    ],
)
def test_admin_addr(value: str, host: str, port: int) -> None:
    settings = load_settings({"RELAY_ADMIN_ADDR": value})
    assert (settings.admin_host, settings.admin_port) == (host, port)


@pytest.mark.parametrize(
    "value", ["8080", ":8080", "host:", "host:65536", "::1:8080", "[nope]:80", "host:80a", "a b:1"]
)
def test_admin_addr_refuses(value: str) -> None:
    assert fail({"RELAY_ADMIN_ADDR": value}).variable == "RELAY_ADMIN_ADDR"


# -- endpoints -----------------------------------------------------------------------------------


def test_endpoints_as_comma_separated_urls_take_the_global_defaults() -> None:
    settings = load_settings(
        {
            **SIGNED,
            "RELAY_ENDPOINTS": "https://Hooks.Example.com/sfox/, http://127.0.0.1:9001/a,",
            "RELAY_DELIVERY_TIMEOUT": "5s",
            "RELAY_RETRY_SCHEDULE": "0s,1s",
        }
    )
    first, second = settings.endpoints
    # Default names: a slug of host, port and path (CONTRACT 3).
    assert (first.name, second.name) == ("hooks.example.com-sfox", "127.0.0.1:9001-a")
    assert first.url.get_secret_value() == "https://Hooks.Example.com/sfox/"
    assert first.signing_keys == (SIGNING_KEY,)
    assert (first.user_token, first.token_key, first.feeds, first.statuses) == (
        "strip",
        None,
        None,
        None,
    )
    assert (first.timeout, first.retry_schedule, first.max_in_flight) == (5, (0, 1), 64)
    assert first.headers == {}


def test_endpoints_as_json_objects() -> None:
    settings = load_settings(
        {
            **SIGNED,
            "RELAY_TOKEN_KEY": TOKEN_KEY,
            "RELAY_ENDPOINTS": endpoints_json(
                {
                    "name": "crm",
                    "url": "https://crm.example.com/hook",
                    "secret": f"{ENDPOINT_SIGNING_SECRET} {NEXT_SIGNING_SECRET}",
                    "user_token": "encrypt",
                    "token_key": RECEIVER_KEY,
                    "feeds": ["private.enterprise.users"],
                    "statuses": ["VERIFIED"],
                    "headers": {"Authorization": HEADER_VALUE},
                    "timeout": "2s",
                    "retry_schedule": ["0s", "30s"],
                    "max_in_flight": 8,
                },
                {"url": "https://other.example.com/", "user_token": "forward"},
            ),
        }
    )
    crm, other = settings.endpoints
    assert crm.name == "crm"
    assert crm.signing_keys[1] == NEXT_SIGNING_KEY
    assert len(crm.secrets) == 2
    assert crm.user_token == "encrypt"
    assert crm.token_key == SecretBytes(RECEIVER_KEY_BYTES)
    assert crm.feeds == frozenset({"private.enterprise.users"})
    assert crm.statuses == frozenset({"VERIFIED"})
    assert crm.headers["Authorization"].get_secret_value() == HEADER_VALUE
    assert (crm.timeout, crm.retry_schedule, crm.max_in_flight) == (2, (0, 30), 8)
    assert other.name == "other.example.com"
    assert other.signing_keys == (SIGNING_KEY,)
    assert settings.needs_token_storage is True


def test_the_signing_secret_rotates_with_several_secrets() -> None:
    settings = load_settings(
        {
            "RELAY_SIGNING_SECRET": f"{SIGNING_SECRET} {NEXT_SIGNING_SECRET}",
            "RELAY_ENDPOINTS": "https://a.example.com/",
        }
    )
    assert settings.endpoints[0].signing_keys == (SIGNING_KEY, NEXT_SIGNING_KEY)


@pytest.mark.parametrize(
    ("endpoint", "variable", "reason"),
    [
        ({"url": "ftp://a.example.com/"}, "RELAY_ENDPOINTS[0].url", "not an http(s) URL"),
        ({"url": "a.example.com/hook"}, "RELAY_ENDPOINTS[0].url", "not an http(s) URL"),
        ({"url": "http://[::1/hook"}, "RELAY_ENDPOINTS[0].url", "not an http(s) URL"),
        ({"name": "x"}, "RELAY_ENDPOINTS[0].url", "required"),
        ({"url": "http://a/", "nme": "x"}, "RELAY_ENDPOINTS[0]", "unknown key 'nme'"),
        ({"url": "http://a/", "name": " "}, "RELAY_ENDPOINTS[0].name", "empty"),
        ({"url": "http://a/", "secret": "nope"}, "RELAY_ENDPOINTS[0].secret", "not whsec_"),
        ({"url": "http://a/", "user_token": "keep"}, "RELAY_ENDPOINTS[0].user_token", "expected"),
        ({"url": "http://a/", "user_token": "encrypt"}, "RELAY_ENDPOINTS[0].token_key", "required"),
        (
            {"url": "http://a/", "user_token": "encrypt", "token_key": "c2hvcnQ="},
            "RELAY_ENDPOINTS[0].token_key",
            "32 bytes",
        ),
        ({"url": "http://a/", "feeds": "x"}, "RELAY_ENDPOINTS[0].feeds", "list of strings"),
        ({"url": "http://a/", "statuses": []}, "RELAY_ENDPOINTS[0].statuses", "list of strings"),
        ({"url": "http://a/", "headers": ["x"]}, "RELAY_ENDPOINTS[0].headers", "object"),
        ({"url": "http://a/", "headers": {"a b": "x"}}, "RELAY_ENDPOINTS[0].headers", "name"),
        (
            {"url": "http://a/", "headers": {"Webhook-Signature": "x"}},
            "RELAY_ENDPOINTS[0].headers",
            "set by the relay",
        ),
        ({"url": "http://a/", "headers": {"X": "a\nb"}}, "RELAY_ENDPOINTS[0].headers", "line"),
        ({"url": "http://a/", "timeout": "5"}, "RELAY_ENDPOINTS[0].timeout", "not a duration"),
        ({"url": "http://a/", "timeout": "0s"}, "RELAY_ENDPOINTS[0].timeout", "more than 0s"),
        ({"url": "http://a/", "retry_schedule": []}, "RELAY_ENDPOINTS[0].retry_schedule", "empty"),
        (
            {"url": "http://a/", "retry_schedule": "0s,x"},
            "RELAY_ENDPOINTS[0].retry_schedule",
            "step 2",
        ),
        ({"url": "http://a/", "max_in_flight": 0}, "RELAY_ENDPOINTS[0].max_in_flight", "least 1"),
        ({"url": "http://a/", "max_in_flight": 1.5}, "RELAY_ENDPOINTS[0].max_in_flight", "whole"),
    ],
)
def test_endpoint_errors_name_the_field(
    endpoint: Mapping[str, object], variable: str, reason: str
) -> None:
    error = fail({**SIGNED, "RELAY_ENDPOINTS": endpoints_json(endpoint)})
    assert error.variable == variable
    assert reason in error.reason


def test_endpoint_errors_name_the_index() -> None:
    environ = {
        **SIGNED,
        "RELAY_ENDPOINTS": endpoints_json({"url": "http://a/"}, {"url": "http://b/", "timeout": 1}),
    }
    # A bare number is no duration in JSON either (as in the environment and TOML).
    assert fail(environ).variable == "RELAY_ENDPOINTS[1].timeout"
    environ["RELAY_ENDPOINTS"] = endpoints_json({"url": "http://a/"}, {"url": "http://b/x y"})
    assert fail(environ).variable == "RELAY_ENDPOINTS[1].url"


@pytest.mark.parametrize(
    ("value", "variable", "reason"),
    [
        ("[{", "RELAY_ENDPOINTS", "not valid JSON"),
        ('["https://a/"]', "RELAY_ENDPOINTS[0]", "expected an object"),
        (
            endpoints_json({"url": "http://a/x"}, {"url": "https://a/x/"}),
            "RELAY_ENDPOINTS[1].name",
            "same name as RELAY_ENDPOINTS[0]",
        ),
        ("https://a/x,https://a/x", "RELAY_ENDPOINTS[1].name", "unique"),
    ],
)
def test_endpoint_list_errors(value: str, variable: str, reason: str) -> None:
    error = fail({**SIGNED, "RELAY_ENDPOINTS": value})
    assert error.variable == variable
    assert reason in error.reason


def test_duplicate_default_names_are_resolved_with_explicit_names() -> None:
    value = endpoints_json({"url": "http://a/x"}, {"url": "http://a/x", "name": "copy"})
    settings = load_settings({**SIGNED, "RELAY_ENDPOINTS": value})
    assert [endpoint.name for endpoint in settings.endpoints] == ["a-x", "copy"]


def test_an_endpoint_without_any_secret_needs_allow_unsigned() -> None:
    environ = {"RELAY_ENDPOINTS": "https://a.example.com/"}
    error = fail(environ)
    assert error.variable == "RELAY_SIGNING_SECRET"
    assert "RELAY_ALLOW_UNSIGNED" in error.reason
    settings = load_settings({**environ, "RELAY_ALLOW_UNSIGNED": "true"})
    assert settings.endpoints[0].signing_keys == ()


def test_an_endpoint_secret_suffices_without_a_global_one() -> None:
    value = endpoints_json({"url": "https://a/", "secret": ENDPOINT_SIGNING_SECRET})
    assert load_settings({"RELAY_ENDPOINTS": value}).endpoints[0].secrets


@pytest.mark.parametrize("policy", ["forward", "encrypt"])
def test_token_key_is_required_when_tokens_are_kept(policy: str) -> None:
    environ = {
        **SIGNED,
        "RELAY_USER_TOKEN": policy,
        "RELAY_ENDPOINTS": endpoints_json({"url": "https://a/", "token_key": RECEIVER_KEY}),
    }
    error = fail(environ)
    assert error.variable == "RELAY_TOKEN_KEY"
    settings = load_settings({**environ, "RELAY_TOKEN_KEY": TOKEN_KEY})
    assert settings.token_key == SecretBytes(TOKEN_KEY_BYTES)
    assert settings.endpoints[0].user_token == policy
    assert settings.needs_token_storage is True


@pytest.mark.parametrize(
    "value",
    [
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        "not base64!",
        TOKEN_KEY[:-1],
    ],
)
def test_token_key_is_base64_of_32_bytes(value: str) -> None:
    error = fail({"RELAY_TOKEN_KEY": value})
    assert error.variable == "RELAY_TOKEN_KEY"
    assert "32 bytes" in error.reason


def test_token_key_accepts_the_url_safe_alphabet() -> None:
    key = bytes([0xFB, 0xFF] * 16)
    value = base64.urlsafe_b64encode(key).decode()
    assert load_settings({"RELAY_TOKEN_KEY": value}).token_key == SecretBytes(key)


@pytest.mark.parametrize(
    "value",
    ["secret", "whsec_", "whsec_!!!!", f"{SIGNING_SECRET} whsec_nope!", SIGNING_SECRET[6:]],
)
def test_signing_secrets_are_whsec_base64(value: str) -> None:
    error = fail({"RELAY_SIGNING_SECRET": value})
    assert error.variable == "RELAY_SIGNING_SECRET"


# -- PostgreSQL lease ----------------------------------------------------------------------------

POSTGRES = {**SIGNED, "RELAY_STORE": "postgresql://relay@db/relay", "RELAY_LEASE": "60s"}


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"RELAY_DELIVERY_TIMEOUT": "30s"}, "RELAY_DELIVERY_TIMEOUT"),
        (
            {"RELAY_ENDPOINTS": endpoints_json({"url": "http://a/"}, {"url": "http://b/"})}
            | {"RELAY_DELIVERY_TIMEOUT": "31s"},
            "RELAY_DELIVERY_TIMEOUT",
        ),
        (
            {"RELAY_ENDPOINTS": endpoints_json({"url": "http://a/"}, {"url": "http://b/"})}
            | {"RELAY_ENDPOINTS": endpoints_json({"url": "http://a/", "timeout": "30s"})},
            "RELAY_ENDPOINTS[0].timeout",
        ),
    ],
)
def test_postgres_timeouts_stay_below_half_the_lease(
    environ: Mapping[str, str], variable: str
) -> None:
    error = fail({**POSTGRES, **environ})
    assert error.variable == variable
    assert "RELAY_LEASE" in error.reason


def test_postgres_lease_rule_passes_below_half_and_ignores_sqlite() -> None:
    endpoints = endpoints_json({"url": "http://a/", "timeout": "29s"})
    load_settings({**POSTGRES, "RELAY_ENDPOINTS": endpoints, "RELAY_DELIVERY_TIMEOUT": "29s"})
    load_settings({**SIGNED, "RELAY_DELIVERY_TIMEOUT": "5m", "RELAY_LEASE": "60s"})


# -- sources: TOML, _FILE, API key ---------------------------------------------------------------


def test_toml_file_is_read_when_relay_config_names_it(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        f"""
signing_secret = "{SIGNING_SECRET}"
delivery_timeout = "7s"
replicas = 2
allow_unsigned = true
admin_addr = "[::1]:9090"
feeds = ["private.enterprise.users", "private.enterprise.users.trades"]
retry_schedule = ["0s", "1m"]
reconcile_interval = "off"

[[endpoints]]
url = "https://a.example.com/hook"
statuses = ["VERIFIED"]

[[endpoints]]
url = "https://b.example.com/hook"
timeout = "3s"
"""
    )
    settings = load_settings({"RELAY_CONFIG": str(path)})
    assert settings.delivery_timeout == 7
    assert settings.replicas == 2
    assert settings.allow_unsigned is True
    assert (settings.admin_host, settings.admin_port) == ("::1", 9090)
    assert settings.feeds == ("private.enterprise.users", "private.enterprise.users.trades")
    assert settings.retry_schedule == (0, 60)
    assert settings.reconcile_interval is None
    first, second = settings.endpoints
    assert (first.statuses, first.timeout, second.timeout) == (frozenset({"VERIFIED"}), 7, 3)
    assert first.signing_keys == (SIGNING_KEY,)


def test_toml_is_not_read_without_relay_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "relay.toml").write_text("replicas = 5\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings({}).replicas == 1


def test_the_environment_wins_over_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('delivery_timeout = "7s"\nreplicas = 2\nendpoints = "https://toml/"\n')
    settings = load_settings(
        {
            **SIGNED,
            "RELAY_CONFIG": str(path),
            "RELAY_DELIVERY_TIMEOUT": "9s",
            "RELAY_ENDPOINTS": "https://env/",
        }
    )
    assert settings.delivery_timeout == 9
    assert settings.replicas == 2
    assert [endpoint.name for endpoint in settings.endpoints] == ["env"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("replicas = \n", "invalid TOML"),
        (b"\xff\xfe".decode("latin-1"), "not UTF-8 text"),
    ],
)
def test_toml_problems_name_relay_config(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(text, encoding="latin-1")
    error = fail({"RELAY_CONFIG": str(path)})
    assert error.variable == "RELAY_CONFIG"
    assert reason in error.reason


@pytest.mark.parametrize("key", ["bogus", "relay_replicas", "admin_tokn"])
def test_an_unknown_toml_key_is_named_in_its_file(tmp_path: Path, key: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"{key} = 1\n")
    error = fail({"RELAY_CONFIG": str(path)})
    assert error.variable == f"{key} in relay.toml"
    assert "unknown key" in error.reason


def test_a_missing_toml_file_names_relay_config(tmp_path: Path) -> None:
    error = fail({"RELAY_CONFIG": str(tmp_path / "absent.toml")})
    assert error.variable == "RELAY_CONFIG"
    assert fail({"RELAY_CONFIG": str(tmp_path)}).variable == "RELAY_CONFIG"


def test_toml_values_are_validated_under_their_toml_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('replicas = "two"\n')
    assert fail({"RELAY_CONFIG": str(path)}).variable == "replicas in relay.toml"
    path.write_text("log_level = 3\n")
    assert fail({"RELAY_CONFIG": str(path)}).variable == "log_level in relay.toml"
    path.write_text('[[endpoints]]\nurl = "https://a/"\ntimeout = true\n')
    error = fail({**SIGNED, "RELAY_CONFIG": str(path)})
    assert error.variable == "endpoints[0].timeout in relay.toml"
    # The environment wins over the file, so its error names the variable.
    path.write_text('replicas = "two"\n')
    assert fail({"RELAY_CONFIG": str(path), "RELAY_REPLICAS": "x"}).variable == "RELAY_REPLICAS"


@pytest.mark.parametrize(
    "toml",
    ["shutdown_grace = 20\n", "retry_schedule = [0, 5]\n", "lease = 60.0\n"],
)
def test_a_toml_duration_needs_a_unit_like_the_environment(tmp_path: Path, toml: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    error = fail({"RELAY_CONFIG": str(path)})
    key = toml.partition(" ")[0]
    assert error.variable == f"{key} in relay.toml"
    assert "not a duration" in error.reason
    assert fail({f"RELAY_{key.upper()}": "20"}).variable == f"RELAY_{key.upper()}"
    path.write_text(
        toml.replace("20", '"20s"').replace("[0, 5]", '["0s", "5s"]').replace("60.0", '"60s"')
    )
    load_settings({"RELAY_CONFIG": str(path)})


@pytest.mark.parametrize(
    ("name", "value", "read"),
    [
        ("RELAY_API_KEY", API_KEY, lambda s: s.api_key.get_secret_value()),
        ("RELAY_ADMIN_TOKEN", ADMIN_TOKEN, lambda s: s.admin_token.get_secret_value()),
        ("RELAY_TOKEN_KEY", TOKEN_KEY, lambda s: base64.b64encode(s.token_key.get_secret_value())),
        ("RELAY_SIGNING_SECRET", SIGNING_SECRET, lambda s: s.signing_secrets[0].get_secret_value()),
        ("RELAY_STORE", "sqlite:///x.db", lambda s: s.store.get_secret_value()),
        ("RELAY_ENDPOINTS", "https://a.example.com/", lambda s: s.endpoints[0].name),
    ],
)
def test_every_secret_can_come_from_a_file_which_wins(
    tmp_path: Path, name: str, value: str, read: Callable[[Settings], object]
) -> None:
    path = tmp_path / "secret"
    path.write_text(value + "\n")
    environ = {"RELAY_ALLOW_UNSIGNED": "true", name + "_FILE": str(path), name: "ignored"}
    settings = load_settings(environ)
    expected = "a.example.com" if name == "RELAY_ENDPOINTS" else value
    got = read(settings)
    assert (got.decode() if isinstance(got, bytes) else got) == expected


@pytest.mark.parametrize(
    "name",
    [
        "RELAY_API_KEY_FILE",
        "RELAY_SIGNING_SECRET_FILE",
        "RELAY_TOKEN_KEY_FILE",
        "RELAY_ADMIN_TOKEN_FILE",
        "RELAY_ENDPOINTS_FILE",
        "RELAY_STORE_FILE",
    ],
)
def test_a_missing_or_empty_secret_file_names_the_file_variable(tmp_path: Path, name: str) -> None:
    assert fail({name: str(tmp_path / "absent")}).variable == name
    (tmp_path / "empty").write_text("\n")
    assert fail({name: str(tmp_path / "empty")}).variable == name
    (tmp_path / "binary").write_bytes(b"\xff\xfe\xfd")
    assert fail({name: str(tmp_path / "binary")}).variable == name
    assert "cannot read" in fail({name: str(tmp_path)}).reason


def test_a_bad_value_in_a_secret_file_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("short\n")
    assert fail({"RELAY_TOKEN_KEY_FILE": str(path)}).variable == "RELAY_TOKEN_KEY"


def test_toml_file_keys_read_secret_files(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    config = tmp_path / "relay.toml"
    config.write_text(f'admin_token = "plain"\nadmin_token_file = "{tmp_path / "admin"}"\n')
    settings = load_settings({"RELAY_CONFIG": str(config)})
    assert settings.admin_token == SecretStr(ADMIN_TOKEN)
    config.write_text(f'admin_token_file = "{tmp_path / "absent"}"\n')
    assert fail({"RELAY_CONFIG": str(config)}).variable == "admin_token_file in relay.toml"
    config.write_text("admin_token_file = 3\n")
    assert fail({"RELAY_CONFIG": str(config)}).variable == "admin_token_file in relay.toml"


def test_the_environment_wins_over_a_toml_file_key(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("from-toml-file")
    config = tmp_path / "relay.toml"
    config.write_text(f'admin_token_file = "{tmp_path / "admin"}"\n')
    settings = load_settings({"RELAY_CONFIG": str(config), "RELAY_ADMIN_TOKEN": ADMIN_TOKEN})
    assert settings.admin_token == SecretStr(ADMIN_TOKEN)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"ENTERPRISE_API_KEY": "enterprise"}, "enterprise"),
        ({"ENTERPRISE_API_KEY": "enterprise", "RELAY_API_KEY": "relay"}, "relay"),
        (
            {"ENTERPRISE_API_KEY": "enterprise", "RELAY_API_KEY": "relay"}
            | {"RELAY_API_KEY_FILE": "FILE"},
            "from-file",
        ),
    ],
)
def test_api_key_precedence(tmp_path: Path, environ: dict[str, str], expected: str) -> None:
    path = tmp_path / "key"
    path.write_text("from-file\n")
    environ = {k: (str(path) if v == "FILE" else v) for k, v in environ.items()}
    settings = load_settings(environ)
    assert settings.api_key == SecretStr(expected)


def test_run_needs_an_api_key_and_an_endpoint() -> None:
    assert fail({**SIGNED}, for_run=True).variable == "RELAY_API_KEY"
    assert fail({**SIGNED, "ENTERPRISE_API_KEY": API_KEY}, for_run=True).variable == (
        "RELAY_ENDPOINTS"
    )
    environ = {**SIGNED, "ENTERPRISE_API_KEY": API_KEY, "RELAY_ENDPOINTS": "https://a/"}
    assert load_settings(environ, for_run=True).api_key == SecretStr(API_KEY)
    load_settings({})  # `relay check` and the CLI tools need neither


# -- EndpointConfig built directly ---------------------------------------------------------------


def test_endpoint_config_defaults_when_built_directly() -> None:
    endpoint = EndpointConfig.model_validate(
        {"url": "https://user:pw@hooks.example.com/sfox?token=abc", "secrets": [SIGNING_SECRET]}
    )
    assert endpoint.name == "hooks.example.com-sfox"
    assert endpoint.signing_keys == (SIGNING_KEY,)
    assert endpoint.display_url == "https://***@hooks.example.com/sfox?token=***"
    assert (endpoint.user_token, endpoint.timeout, endpoint.max_in_flight) == ("strip", 15, 64)
    assert endpoint.retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    with pytest.raises(ValueError):
        endpoint.name = "other"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://a.example.com/x", "https://a.example.com/x"),
        ("https://tok@a.example.com:8443/x", "https://***@a.example.com:8443/x"),
        ("http://a/x?k=v&flag#frag", "http://a/x?k=***&***"),
    ],
)
def test_display_url_masks_credentials(url: str, shown: str) -> None:
    assert EndpointConfig.model_validate({"url": url}).display_url == shown


@pytest.mark.parametrize(
    ("store", "shown"),
    [
        ("sqlite:///relay.db", "sqlite:///relay.db"),
        ("postgresql://relay:pw@db:5432/relay", "postgresql://relay:***@db:5432/relay"),
        ("postgres://relay@db/relay?sslmode=require", "postgres://relay@db/relay?sslmode=require"),
        (
            "postgresql://db/relay?password=pw&sslmode=x",
            "postgresql://db/relay?password=***&sslmode=x",
        ),
    ],
)
def test_store_display_masks_the_password(store: str, shown: str) -> None:
    assert load_settings({"RELAY_STORE": store}).store_display == shown


# -- errors name the variable; secrets never leak ------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"RELAY_WS_URL": "http://x/"}, "RELAY_WS_URL"),
        ({"RELAY_API_URL": "ws://x/"}, "RELAY_API_URL"),
        ({"RELAY_FEEDS": ","}, "RELAY_FEEDS"),
        ({"RELAY_SIGNING_SECRET": "x"}, "RELAY_SIGNING_SECRET"),
        ({"RELAY_ALLOW_UNSIGNED": "2"}, "RELAY_ALLOW_UNSIGNED"),
        ({"RELAY_USER_TOKEN": "drop"}, "RELAY_USER_TOKEN"),
        ({"RELAY_TOKEN_KEY": "x"}, "RELAY_TOKEN_KEY"),
        ({"RELAY_STORE": "x"}, "RELAY_STORE"),
        ({"RELAY_RETENTION": "x"}, "RELAY_RETENTION"),
        ({"RELAY_ADMIN_ADDR": "x"}, "RELAY_ADMIN_ADDR"),
        ({"RELAY_RETRY_SCHEDULE": "x"}, "RELAY_RETRY_SCHEDULE"),
        ({"RELAY_DELIVERY_TIMEOUT": "x"}, "RELAY_DELIVERY_TIMEOUT"),
        ({"RELAY_SHUTDOWN_GRACE": "x"}, "RELAY_SHUTDOWN_GRACE"),
        ({"RELAY_LEASE": "x"}, "RELAY_LEASE"),
        ({"RELAY_REPLICAS": "x"}, "RELAY_REPLICAS"),
        ({"RELAY_RECONCILE_INTERVAL": "x"}, "RELAY_RECONCILE_INTERVAL"),
        ({"RELAY_LOG_LEVEL": "x"}, "RELAY_LOG_LEVEL"),
        ({"RELAY_LOG_FORMAT": "x"}, "RELAY_LOG_FORMAT"),
        ({"RELAY_ENDPOINTS": "x"}, "RELAY_ENDPOINTS[0].url"),
        ({"RELAY_ENDPOINTS": "{}"}, "RELAY_ENDPOINTS"),
        ({"RELAY_USER_TOKEN": "drop", "RELAY_ENDPOINTS": "http://a/"}, "RELAY_USER_TOKEN"),
    ],
)
def test_every_error_names_its_variable(environ: Mapping[str, str], variable: str) -> None:
    assert fail(environ).variable == variable
    assert str(fail(environ)).startswith(variable + ": ")


def _all_secrets_environ(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    return {
        "RELAY_API_KEY": API_KEY,
        "RELAY_SIGNING_SECRET": f"{SIGNING_SECRET} {NEXT_SIGNING_SECRET}",
        "RELAY_TOKEN_KEY": TOKEN_KEY,
        "RELAY_ADMIN_TOKEN_FILE": str(tmp_path / "admin"),
        "RELAY_STORE": f"postgresql://relay:{STORE_PASSWORD}@db/relay",
        "RELAY_DELIVERY_TIMEOUT": "5s",
        "RELAY_ENDPOINTS": endpoints_json(
            {
                "url": f"https://user:{URL_PASSWORD}@a.example.com/hook?token={QUERY_TOKEN}&v=2",
                "secret": ENDPOINT_SIGNING_SECRET,
                "user_token": "encrypt",
                "token_key": RECEIVER_KEY,
                "headers": {"Authorization": HEADER_VALUE},
            }
        ),
    }


SECRETS = [
    API_KEY,
    SIGNING_SECRET,
    SIGNING_SECRET.removeprefix("whsec_"),
    NEXT_SIGNING_SECRET.removeprefix("whsec_"),
    ENDPOINT_SIGNING_SECRET.removeprefix("whsec_"),
    TOKEN_KEY,
    RECEIVER_KEY,
    ADMIN_TOKEN,
    HEADER_VALUE,
    URL_PASSWORD,
    STORE_PASSWORD,
    QUERY_TOKEN,
]


def test_describe_masks_every_secret(tmp_path: Path) -> None:
    settings = load_settings(_all_secrets_environ(tmp_path))
    text = json.dumps(describe(settings))
    text += repr(settings) + str(settings)
    for secret in SECRETS:
        assert secret not in text
    shown = describe(settings)
    assert shown["api_key"] == shown["token_key"] == shown["admin_token"] == "***"
    assert shown["signing_secret"] == ["***", "***"]
    assert shown["store"] == "postgresql://relay:***@db/relay"
    endpoints = shown["endpoints"]
    assert isinstance(endpoints, list)
    (endpoint,) = endpoints
    assert endpoint["url"] == "https://***@a.example.com/hook?token=***&v=***"
    assert endpoint["headers"] == {"Authorization": "***"}
    assert endpoint["secret"] == ["***"]
    assert endpoint["token_key"] == "***"


def test_describe_shows_what_is_not_set() -> None:
    shown = describe(load_settings({"RELAY_RECONCILE_INTERVAL": "off"}))
    assert shown["api_key"] == shown["signing_secret"] == shown["admin_token"] == "(not set)"
    assert shown["reconcile_interval"] == "off"
    assert shown["retry_schedule"] == ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]
    assert shown["delivery_timeout"] == "15s"
    assert shown["admin_addr"] == "127.0.0.1:8080"
    assert describe(load_settings({"RELAY_ADMIN_ADDR": "[::]:80"}))["admin_addr"] == "[::]:80"
    assert describe(load_settings({"RELAY_LEASE": "250ms"}))["lease"] == "250ms"
    window = describe(load_settings({"RELAY_REORDER_WINDOW": "2500ms"}))["reorder_window"]
    assert window == "2500ms"


def test_secret_values_lists_every_secret(tmp_path: Path) -> None:
    values = secret_values(load_settings(_all_secrets_environ(tmp_path)))
    for secret in SECRETS:
        assert secret in values
    assert f"user:{URL_PASSWORD}" in values
    assert "relay" not in values  # a bare username is not a credential
    assert "2" not in values  # nor a short query parameter
    assert values == sorted(values, key=len, reverse=True)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("RELAY_SIGNING_SECRET", f"whsec_{API_KEY}!"),
        ("RELAY_SIGNING_SECRET", f"{SIGNING_SECRET} {API_KEY}"),
        ("RELAY_TOKEN_KEY", TOKEN_KEY[:-4]),
        ("RELAY_TOKEN_KEY", f"{API_KEY}=="),
        ("RELAY_STORE", f"mysql://relay:{STORE_PASSWORD}@db/relay"),
        ("RELAY_STORE", f"postgresql://relay:{STORE_PASSWORD}@db:port/relay"),
        ("RELAY_ENDPOINTS", f"ftp://user:{URL_PASSWORD}@a/"),
        ("RELAY_ENDPOINTS", f"https://user:{URL_PASSWORD}@a:port/"),
        ("RELAY_ENDPOINTS", f'[{{"url": "https://a/", "secret": "{API_KEY}"}}]'),
        ("RELAY_ENDPOINTS", f'[{{"url": "https://a/", "token_key": "{API_KEY}"}}]'),
        ("RELAY_ENDPOINTS", f'[{{"url": "https://a/", "headers": {{"X": "{HEADER_VALUE}\\n"}}}}]'),
        ("RELAY_ENDPOINTS", f'[{{"url": "https://a/", "secret": "{SIGNING_SECRET}"'),
        ("RELAY_API_URL", f"https://user:{URL_PASSWORD}@a:port/"),
    ],
)
def test_errors_about_secrets_never_contain_them(name: str, bad: str) -> None:
    error = fail({**SIGNED, name: bad})
    for secret in [*SECRETS, bad]:
        assert secret not in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_secret_values_include_credentials_outside_the_password_field() -> None:
    settings = load_settings(
        {
            "RELAY_ALLOW_UNSIGNED": "true",
            "RELAY_STORE": f"postgresql://db/relay?sslmode=require&password={STORE_PASSWORD}",
            "RELAY_ENDPOINTS": f"https://{URL_PASSWORD}@a.example.com/",
        }
    )
    values = secret_values(settings)
    assert STORE_PASSWORD in values
    assert URL_PASSWORD in values
    assert "require" not in values


def test_settings_alone_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    # Swaps the mapping the module sees rather than editing the process environment.
    monkeypatch.setattr(os, "environ", {"RELAY_REPLICAS": "3"})
    assert Settings().replicas == 3
    assert load_settings().replicas == 3


def test_endpoint_config_accepts_python_values() -> None:
    endpoint = EndpointConfig(
        url=SecretStr("https://a.example.com/x"),
        name="a",
        secrets=(SecretStr(SIGNING_SECRET),),
        user_token="encrypt",
        token_key=SecretBytes(RECEIVER_KEY_BYTES),
        feeds=frozenset({"private.enterprise.users"}),
        headers={"X-Key": SecretStr(HEADER_VALUE)},
        timeout=2.5,
        retry_schedule=(0.0, 1.0),
        max_in_flight=4,
    )
    assert endpoint.token_key == SecretBytes(RECEIVER_KEY_BYTES)
    assert endpoint.signing_keys == (SIGNING_KEY,)
    assert (endpoint.timeout, endpoint.retry_schedule) == (2.5, (0.0, 1.0))
    for token_key in (RECEIVER_KEY_BYTES, SecretStr(RECEIVER_KEY)):
        other = EndpointConfig.model_validate(
            {
                "url": "http://a/",
                "secrets": SecretStr(SIGNING_SECRET),
                "token_key": token_key,
                "statuses": None,
            }
        )
        assert other.token_key == SecretBytes(RECEIVER_KEY_BYTES)
        assert (other.name, other.statuses, other.signing_keys) == ("a", None, (SIGNING_KEY,))
    settings = Settings.model_validate(
        {"endpoints": [endpoint], "signing_secrets": [SIGNING_SECRET], "token_key": TOKEN_KEY}
    )
    assert settings.endpoints == (endpoint,)
    assert settings.needs_token_storage is True


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"url": 3}, "url"),
        ({"url": "http://a/", "secrets": "whsec_"}, "secrets"),
        ({"url": "http://a/", "secrets": [3]}, "secrets"),
        ({"url": "http://a/", "secrets": 3}, "secrets"),
        ({"url": "http://a/", "token_key": 3}, "token_key"),
        ({"url": "http://a/", "timeout": -1}, "timeout"),
        ({"url": "http://a/", "timeout": float("inf")}, "timeout"),
        ({"url": "http://a/", "retry_schedule": 5}, "retry_schedule"),
        ({"url": "http://a/", "headers": {"X": 3}}, "headers"),
    ],
)
def test_endpoint_config_refuses_bad_python_values(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError) as info:
        EndpointConfig.model_validate(data)
    assert field in str(info.value)


def test_an_overflowing_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("9" * 400 + "s")


@pytest.mark.parametrize(
    ("toml", "variable"),
    [
        ("feeds = 3\n", "feeds in relay.toml"),
        ("feeds = [3]\n", "feeds in relay.toml"),
        ("endpoints = 3\n", "endpoints in relay.toml"),
        ("api_key = 3\n", "api_key in relay.toml"),
        ("signing_secret = [3]\n", "signing_secret in relay.toml"),
        ('signing_secret = ""\n', "signing_secret in relay.toml"),
        ("retry_schedule = 5\n", "retry_schedule in relay.toml"),
        ("token_key = true\n", "token_key in relay.toml"),
    ],
)
def test_toml_values_of_the_wrong_type(tmp_path: Path, toml: str, variable: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    assert fail({"RELAY_CONFIG": str(path)}).variable == variable


# -- issue 20: typos, every error at once -------------------------------------------------------


@pytest.mark.parametrize("name", ["RELAY_ADMIN_TOKN", "RELAY_TEST_PG", "RELAY_STORE_FIEL"])
def test_an_unknown_relay_variable_is_an_error_naming_it(name: str) -> None:
    error = fail({name: "x"})
    assert error.variable == name
    assert "unknown variable" in error.reason


def test_an_empty_unknown_variable_counts_as_unset() -> None:
    load_settings({"RELAY_ADMIN_TOKN": ""})


def test_relay_config_and_file_variants_are_known(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(ADMIN_TOKEN)
    (tmp_path / "relay.toml").write_text("")
    environ = {
        "RELAY_CONFIG": str(tmp_path / "relay.toml"),
        "RELAY_ADMIN_TOKEN_FILE": str(tmp_path / "token"),
    }
    assert load_settings(environ).admin_token == SecretStr(ADMIN_TOKEN)
    # RELAY_REPLICAS may not be given as a file: its _FILE variant is unknown.
    assert fail({"RELAY_REPLICAS_FILE": "x"}).variable == "RELAY_REPLICAS_FILE"


def test_every_error_is_reported_at_once() -> None:
    environ = {
        "RELAY_REPLICAS": "many",
        "RELAY_SHUTDOWN_GRACE": "20",
        "RELAY_ADMIN_TOKN": "x",
        "RELAY_ENDPOINTS": endpoints_json({"url": "ftp://a/"}, {"url": "http://b/", "bogus": 1}),
    }
    error = fail(environ)
    names = [name for name, _ in error.errors]
    assert set(names) == {
        "RELAY_ADMIN_TOKN",
        "RELAY_REPLICAS",
        "RELAY_SHUTDOWN_GRACE",
        "RELAY_ENDPOINTS[0].url",
        "RELAY_ENDPOINTS[1]",
    }
    assert len(str(error).splitlines()) == len(names)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('{"url": "https://a.example.com/"}', "a JSON list"),
        ("https://a.example.com/ https://b.example.com/", "comma"),
    ],
)
def test_endpoints_given_in_the_wrong_shape_say_so(value: str, reason: str) -> None:
    error = fail({**SIGNED, "RELAY_ENDPOINTS": value})
    assert error.variable.startswith("RELAY_ENDPOINTS")
    assert reason in error.reason
    assert "not an http(s) URL" not in error.reason


def test_a_signing_secret_under_16_bytes_is_refused() -> None:
    short = "whsec_" + base64.b64encode(b"0123456789abcde").decode()
    error = fail({"RELAY_SIGNING_SECRET": short})
    assert error.variable == "RELAY_SIGNING_SECRET"
    assert "16 bytes" in error.reason
    ok = "whsec_" + base64.b64encode(b"0123456789abcdef").decode()
    load_settings({"RELAY_SIGNING_SECRET": ok})


def test_statuses_are_matched_without_regard_to_case_and_unknown_ones_warned() -> None:
    environ = {
        **SIGNED,
        "RELAY_ENDPOINTS": endpoints_json({"url": "https://a/", "statuses": ["verified", "Done"]}),
    }
    settings = load_settings(environ)
    assert settings.endpoints[0].statuses == frozenset({"VERIFIED", "DONE"})
    found = warnings(settings)
    assert any("RELAY_ENDPOINTS[0].statuses" in w and "DONE" in w for w in found)
    assert not any("'VERIFIED'" in w for w in found)
    assert describe(settings)["endpoints"][0]["statuses"] == ["DONE", "VERIFIED"]


def test_a_forwarded_token_to_a_plaintext_endpoint_is_warned() -> None:
    environ = {
        **SIGNED,
        "RELAY_TOKEN_KEY": TOKEN_KEY,
        "RELAY_ENDPOINTS": endpoints_json(
            {"url": "http://a/", "user_token": "forward"},
            {"url": "https://b/", "user_token": "forward"},
        ),
    }
    found = warnings(load_settings(environ))
    assert len(found) == 1
    assert "RELAY_ENDPOINTS[0]" in found[0] and "plaintext" in found[0]


def test_retry_statuses_per_endpoint() -> None:
    environ = {
        **SIGNED,
        "RELAY_ENDPOINTS": endpoints_json({"url": "https://a/", "retry_statuses": [401, 404]}),
    }
    assert load_settings(environ).endpoints[0].retry_statuses == frozenset({401, 404})
    for bad in ([200], [503], ["401"], []):
        environ["RELAY_ENDPOINTS"] = endpoints_json({"url": "https://a/", "retry_statuses": bad})
        assert fail(environ).variable == "RELAY_ENDPOINTS[0].retry_statuses"


def test_pg_schema() -> None:
    assert load_settings({}).pg_schema == "public"
    assert load_settings({"RELAY_PG_SCHEMA": "relay_1"}).pg_schema == "relay_1"
    # Unset, a search_path the store URL names is honoured (PostgreSQL's default: public).
    assert load_settings({}).store_schema is None
    assert load_settings({"RELAY_PG_SCHEMA": "public"}).store_schema == "public"
    assert fail({"RELAY_PG_SCHEMA": "a; drop"}).variable == "RELAY_PG_SCHEMA"


def test_credentials_in_the_sfox_urls_are_secrets() -> None:
    environ = {
        "RELAY_WS_URL": "wss://wsuser:wspass_Q8r4T6y2@ws.example.com/ws",
        "RELAY_API_URL": "https://apiuser:apipass_K3j5H7g9@api.example.com",
    }
    settings = load_settings(environ)
    shown = json.dumps(describe(settings))
    for secret in ("wspass_Q8r4T6y2", "apipass_K3j5H7g9", "wsuser", "apiuser"):
        assert secret not in shown
        assert any(secret in value for value in secret_values(settings))


@pytest.mark.parametrize("name", ["crm/prod", "crm prod", "crm\u00e9", "a" * 3 + "?"])
def test_an_endpoint_name_outside_the_allowed_characters_is_refused(name: str) -> None:
    env = {
        "RELAY_ENDPOINTS": json.dumps([{"url": "https://a.example/h", "name": name}]),
        "RELAY_ALLOW_UNSIGNED": "true",
    }
    with pytest.raises(ConfigError, match=r"RELAY_ENDPOINTS\[0\]\.name"):
        load_settings(env)


def test_renames_move_work_from_former_default_names_only() -> None:
    endpoints = [
        {"url": "https://hooks.example.com/sfox/v1"},  # default name now a slug
        {"url": "https://crm.example.com/in", "name": "crm"},  # named later
        {"url": "https://plain.example.com"},  # no path: the same name before and now
    ]
    settings = load_settings(
        {"RELAY_ENDPOINTS": json.dumps(endpoints), "RELAY_ALLOW_UNSIGNED": "true"}
    )
    assert [e.name for e in settings.endpoints] == [
        "hooks.example.com-sfox-v1",
        "crm",
        "plain.example.com",
    ]
    assert endpoint_renames(settings) == [
        ("hooks.example.com/sfox/v1", "hooks.example.com-sfox-v1"),
        ("crm.example.com/in", "crm"),
    ]
