"""Chaos, configuration: invalid values from a table and from hypothesis, each refused with
exit 2 and a message naming the variable."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from pathlib import Path

from bench.audit import AuditReport
from bench.chaos.harness import Outcome, cli
from bench.procs import new_whsec
from relay.config import load_settings
from relay.errors import ConfigError

#: Values every variable of the README must refuse (exit 2, naming it).
INVALID_CONFIG: dict[str, list[str]] = {
    "RELAY_API_KEY": [" "],
    "RELAY_WS_URL": ["http://feed.example/ws", "ftp://x", "not a url", "wss://[::1"],
    "RELAY_API_URL": ["ws://api.example", "not a url", "https://"],
    "RELAY_FEEDS": [",", " , "],
    "RELAY_ENDPOINTS": [
        "ftp://hook.example/x",
        "[{]",
        '[{"url": "http://a.example/x", "bogus": 1}]',
        '[{"name": "a", "url": "http://a.example/x"}, {"name": "a", "url": "http://b/x"}]',
        '[{"url": "http://a.example/x", "user_token": "encrypt"}]',
        "{}",
        "[]",
    ],
    "RELAY_SIGNING_SECRET": ["nope-not-whsec", "whsec_", "whsec_!!!"],
    "RELAY_ALLOW_UNSIGNED": ["maybe", "2"],
    "RELAY_USER_TOKEN": ["keep", "plaintext"],
    "RELAY_TOKEN_KEY": ["short", base64.b64encode(b"x" * 16).decode(), "!!!!"],
    "RELAY_STORE": ["mysql://db.example/x", "sqlite://relative.db", "postgresql:/x"],
    "RELAY_RETENTION": ["7 days", "-1d", "0s", "1e999d", "5"],
    "RELAY_ADMIN_ADDR": ["localhost", ":99999", "1.2.3.4:-1", "[::1:80"],
    "RELAY_ADMIN_TOKEN": [" "],
    "RELAY_RETRY_SCHEDULE": ["5s,,5m", "x", "-1s", "5s, soon"],
    "RELAY_DELIVERY_TIMEOUT": ["0s", "soon", "-1s"],
    "RELAY_SHUTDOWN_GRACE": ["soon", "-5s"],
    "RELAY_LEASE": ["soon", "0s"],
    "RELAY_REPLICAS": ["0", "-1", "two", "1.5"],
    "RELAY_RECONCILE_INTERVAL": ["never", "0s", "-1m"],
    "RELAY_LOG_LEVEL": ["LOUD", "trace"],
    "RELAY_LOG_FORMAT": ["xml", "yaml"],
}


def config_base(workdir: Path) -> dict[str, str]:
    return {
        "RELAY_API_KEY": "chaos-api-key-123456",
        "RELAY_ENDPOINTS": "http://127.0.0.1:9/hook",
        "RELAY_SIGNING_SECRET": new_whsec(),
        "RELAY_STORE": f"sqlite:///{workdir}/config.db",
        "RELAY_ADMIN_ADDR": "127.0.0.1:0",
    }


def config_verdict(base: Mapping[str, str], variable: str, value: str) -> str | None:
    """None when ``variable=value`` is accepted or refused properly; else what went wrong."""
    env = {**base, variable: value}
    try:
        load_settings(env, for_run=True)
    except ConfigError as exc:
        text = str(exc)
        if not (exc.variable == variable or exc.variable.startswith((variable + "[", variable))):
            return f"{variable}={value!r}: the error names {exc.variable}"
        if "\n" in text:
            return f"{variable}={value!r}: a multi-line error"
        return None
    except Exception as exc:
        return f"{variable}={value!r}: {type(exc).__name__} instead of a configuration error"
    return None


def config_table_failures(base: Mapping[str, str]) -> list[str]:
    """Every table value must be refused, naming its variable, without echoing the value."""
    failures = []
    for variable, values in INVALID_CONFIG.items():
        for value in values:
            env = {**base, variable: value}
            try:
                load_settings(env, for_run=True)
            except ConfigError as exc:
                wrong = config_verdict(base, variable, value)
                if wrong:
                    failures.append(wrong)
                if len(value) >= 8 and value in str(exc):
                    failures.append(f"{variable}: the error echoes the value")
                continue
            except Exception as exc:
                failures.append(f"{variable}={value!r}: {type(exc).__name__}")
                continue
            failures.append(f"{variable}={value!r} was accepted")
    return failures


def config_fuzz_failures(base: Mapping[str, str], examples: int, seed: int = 7) -> list[str]:
    """Hypothesis text for every variable: accepted, or refused naming that variable; never
    any other exception."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    failures: list[str] = []
    texts = (
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
        | st.from_regex(r"-?[0-9]{1,25}(\.[0-9]+)?(ms|s|m|h|d|)", fullmatch=True)
        | st.sampled_from(
            ['[{"url": 1}]', '[{"url": "http://a", "timeout": -1}]', "[1]", "null", '"x"']
            + ['[{"url": "http://a", "headers": {"Host": "x"}}]', "http://[::1", "9" * 400 + "d"]
        )
    )

    @hseed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(sorted(INVALID_CONFIG)), texts)
    def check(variable: str, value: str) -> None:
        wrong = config_verdict(base, variable, value)
        if wrong:
            failures.append(wrong)

    check()
    return failures


async def config_fuzz(workdir: Path, *, examples: int) -> Outcome:
    """Configuration: a table of invalid values per variable, hypothesis text, and a few real
    `relay check` / `relay run` processes (exit 2, one stderr line naming the variable)."""
    base = config_base(workdir)
    failures = config_table_failures(base) + config_fuzz_failures(base, examples)
    cases = (
        (("check",), "RELAY_DELIVERY_TIMEOUT", "soon-ish-42"),
        (("check",), "RELAY_ENDPOINTS", '[{"url": "http://a.example/x", "bogus": 1}]'),
        (("run",), "RELAY_TOKEN_KEY", "c2hvcnQta2V5LXZhbHVlLTQy"),
        (("check",), "RELAY_ADMIN_TOKEN_FILE", str(workdir / "missing-token-file")),
        (("run",), "RELAY_REPLICAS", "zero-replicas"),
    )
    processes = len(cases)
    done = await asyncio.gather(
        *(cli(*args, env={**base, variable: value}) for args, variable, value in cases)
    )
    for (args, variable, value), (code, out, err) in zip(cases, done, strict=True):
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or variable not in lines[0] or "Traceback" in err:
            failures.append(f"relay {args[0]} with bad {variable}: exit {code}, stderr {err!r}")
        elif value in lines[0] and not variable.endswith("_FILE"):
            failures.append(f"relay {args[0]} echoed the bad {variable}")
        if out.strip():
            failures.append(f"relay {args[0]} with bad {variable} printed to stdout")
    report = AuditReport(
        "config fuzz: every RELAY_* variable",
        sent=sum(map(len, INVALID_CONFIG.values())) + examples + processes,
        stored=0,
    )
    for failure in failures:
        report.problem(failure)
    report.notes.append(
        f"{sum(map(len, INVALID_CONFIG.values()))} table values, {examples} hypothesis values, "
        f"{processes} real processes (the 'events sent' column counts these cases)"
    )
    return Outcome(report, {"failures": failures})
