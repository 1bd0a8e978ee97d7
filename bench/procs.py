"""Child processes of the benchmark: started on loopback, watched, bounded in time, stopped.

Every participant (simulator, receiver, relay, naive baseline, wrk) runs in its own OS process
so that none shares an event loop, or a core's time slice, with another by construction.

Also the helpers ``tests/`` and ``bench/`` both need, written once: a child's environment
(:func:`child_env`), polling (:func:`eventually`), fresh secrets (:func:`new_whsec`,
:func:`new_key`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import http.client
import inspect
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.app import Relay

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

__all__ = [
    "LOOPBACK",
    "PG_URL",
    "RELAY",
    "ROOT",
    "Done",
    "HarnessError",
    "Proc",
    "Procs",
    "RssSampler",
    "Running",
    "child_env",
    "eventually",
    "free_port",
    "http_get",
    "in_process",
    "metric",
    "new_key",
    "new_whsec",
    "parse_metrics",
    "relay_cli",
    "start_relay_run",
    "wait_until",
]


class HarnessError(RuntimeError):
    """The harness itself failed: a process crashed or hung, or nothing arrived."""


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (nothing listens on it now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


_DROPPED_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "enterprise_api_key")


def new_whsec() -> str:
    """A fresh Standard Webhooks secret."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def new_key() -> str:
    """A fresh 32-byte AES key, base64 (``RELAY_TOKEN_KEY``, an endpoint's ``token_key``)."""
    return base64.b64encode(os.urandom(32)).decode()


async def eventually(
    cond: Callable[[], Any],
    timeout: float = 5.0,
    message: str | Callable[[], str] = "",
    *,
    interval: float = 0.02,
) -> Any:
    """Poll ``cond`` (sync or async) until it returns something truthy; return that value.

    Raises AssertionError after ``timeout`` seconds, with ``message`` (or a callable giving
    one, evaluated at the time of failure so it can show the latest state).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"not true within {timeout:g}s: {text or cond}")
        await asyncio.sleep(interval)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment minus any relay configuration and proxies, plus ``extra``.

    Proxies are dropped and loopback is excluded from them, so that every request stays on
    127.0.0.1 whatever the caller's shell exports.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("RELAY_") and name.lower() not in _DROPPED_VARIABLES
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    python_path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + python_path if python_path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook so children get SIGTERM if the harness is killed outright."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return hook


_PRE_EXEC = _parent_death_signal()


class Proc:
    """One child process whose output goes to a log file (shown when it fails)."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_PRE_EXEC,  # only a prctl call, resolved before any fork
        )
        self.stopped_rc: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        """Raise :class:`HarnessError` if the process has exited."""
        rc = self.popen.poll()
        if rc is not None:
            raise HarnessError(f"{self.name} exited with code {rc}:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
            text = self.log_path.read_text(errors="replace")
            return "\n".join("    " + line for line in text.splitlines()[-lines:])
        return "    (no log)"

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        rc = self.popen.returncode
        self.stopped_rc = rc
        return rc

    def wait(self, timeout: float) -> int | None:
        """The exit code if the process ends within ``timeout`` seconds, else None."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class Procs:
    """Every process a scenario starts; all are stopped (newest first) when the block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Proc:
        proc = Proc(name, argv, env, self.log_dir)
        self._procs.append(proc)
        return proc

    def check(self) -> None:
        for proc in self._procs:
            if proc.stopped_rc is None:
                proc.check()

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            if proc.stopped_rc is None:
                proc.stop()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``http://127.0.0.1:port/path``; status 0 when nothing answers."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    procs: Procs | None = None,
    interval: float = 0.05,
) -> float:
    """Poll ``condition`` until true; seconds waited. HarnessError on timeout or a crash."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if condition():
            return time.monotonic() - start
        if procs is not None:
            procs.check()
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (enough of the format for our metrics)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, brace, rest = head.partition("{")
        labels: dict[str, str] = {}
        if brace:
            for pair in rest.rstrip("}").split('",'):
                key, _, raw = pair.partition("=")
                if key:
                    labels[key.strip()] = raw.strip().strip('"')
        with contextlib.suppress(ValueError):
            samples.append(Sample(name, labels, float(value)))
    return samples


def metric(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _rss_reader(pid: int) -> Callable[[], int]:
    try:
        import psutil
    except ImportError:
        psutil = None  # type: ignore[assignment]
    if psutil is not None:
        process = psutil.Process(pid)

        def read_psutil() -> int:
            return int(process.memory_info().rss)

        return read_psutil
    page = os.sysconf("SC_PAGE_SIZE")

    def read_proc() -> int:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * page

    return read_proc


class RssSampler:
    """Samples a process's resident set size every ``interval`` seconds, tagged by phase."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.phase = "start"
        self.samples: list[tuple[float, str, int]] = []
        self._read = _rss_reader(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._read()
            except Exception:  # the process is gone: nothing more to sample
                return
            self.samples.append((time.monotonic(), self.phase, rss))
            self._stop.wait(self.interval)

    def mark(self, phase: str) -> None:
        """Tag the following samples with ``phase`` and take one now."""
        self.phase = phase
        with contextlib.suppress(Exception):
            self.samples.append((time.monotonic(), phase, self._read()))

    def peak(self, *phases: str) -> int | None:
        values = [rss for _, phase, rss in self.samples if not phases or phase in phases]
        return max(values) if values else None

    def last(self, phase: str) -> int | None:
        values = [rss for _, p, rss in self.samples if p == phase]
        return values[-1] if values else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


@contextlib.contextmanager
def sampling(pid: int, interval: float = 0.1) -> Iterator[RssSampler]:
    sampler = RssSampler(pid, interval)
    try:
        yield sampler
    finally:
        sampler.stop()


def json_safe(value: Any) -> Any:
    """``value`` with floats rounded for a readable JSON file."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# -- the relay as a process, or in this event loop (tests and bench/chaos/ alike) --------

#: ``relay`` as a subprocess, from this checkout.
RELAY = (sys.executable, "-m", "relay")
#: The PostgreSQL server tests and chaos scenarios create schemas and databases in.
PG_URL = os.environ.get("SFOX_RELAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True, slots=True)
class Done:
    """A finished ``relay`` command."""

    code: int
    stdout: str
    stderr: str


async def relay_cli(*args: str, env: Mapping[str, str], timeout: float = 20.0) -> Done:
    """Run one ``relay`` command to completion (the event loop keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        *RELAY,
        *args,
        env=child_env(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise AssertionError(f"relay {' '.join(args)} still running after {timeout:g}s") from None
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def start_relay_run(env: Mapping[str, str], log: Path) -> asyncio.subprocess.Process:
    """``relay run`` as a subprocess, its stdout and stderr in the file ``log``."""
    with log.open("wb") as sink:
        return await asyncio.create_subprocess_exec(
            *RELAY,
            "run",
            env=child_env(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )


@dataclass
class Running:
    """A relay running in this event loop."""

    relay: Relay
    task: asyncio.Task[None]

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.relay.admin.port}"

    def alive(self) -> bool:
        return not self.task.done()

    def metric(self, name: str, **labels: str) -> float:
        return self.relay.metrics.registry.get_sample_value(name, labels or None) or 0.0


@contextlib.asynccontextmanager
async def in_process(
    env: Mapping[str, str], *, timeout: float = 15.0, **parts: Any
) -> AsyncIterator[Running]:
    """``Relay(load_settings(env, for_run=True), **parts)`` in this loop, yielded once it
    started (store open, admin port bound); on exit the phased stop, re-raising whatever the
    run raised (a crashed relay fails the test or scenario)."""
    from relay.app import Relay
    from relay.config import load_settings

    relay = Relay(load_settings(dict(env), for_run=True), **parts)
    task = asyncio.create_task(relay.run(), name="relay-under-test")
    started = asyncio.create_task(relay.started.wait())
    try:
        await asyncio.wait({task, started}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        started.cancel()
    if task.done():
        task.result()  # raises what made the start-up fail
        raise AssertionError("relay.run() returned during start-up")
    if not relay.started.is_set():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise AssertionError(f"relay did not start within {timeout:g}s")
    try:
        yield Running(relay, task)
    finally:
        relay.request_stop()
        try:
            async with asyncio.timeout(timeout):
                await task
        except TimeoutError as exc:
            stacks = io.StringIO()
            for stuck in asyncio.all_tasks():
                stuck.print_stack(file=stacks)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise AssertionError(
                f"relay did not stop within {timeout:g}s; its tasks:\n{stacks.getvalue()}"
            ) from exc  # whatever the test raised shows as the timeout's context
