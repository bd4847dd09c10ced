"""Shared test fixtures: a real HTTP receiver on loopback, settings, and a running daemon."""

from __future__ import annotations

import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from router.app import App
from router.settings import Settings, load_settings

# neonize's import runs `uname -a` through os.popen and never closes nor reaps it
# (neonize/utils/platform.py); the next subprocess started then reports an unclosed file. The
# tests import it once, here, with that one command answered in memory.
_popen = os.popen
os.popen = lambda cmd, *args, **kwargs: (  # type: ignore[assignment]
    io.StringIO(" ".join(platform.uname())) if cmd == "uname -a" else _popen(cmd, *args, **kwargs)
)
try:
    import neonize.aioze.client  # noqa: F401
finally:
    os.popen = _popen

API_KEY = "test-global-key"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and answers as scripted.

    ``script(path, [500, 500, 200])`` answers the next requests to ``path`` with those statuses
    (then 200); an entry may be ``(status, headers)`` or ``("sleep", seconds)``.
    """

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    arrived: int = 0  # requests whose handling has begun (``requests`` holds finished ones)
    scripts: dict[str, deque[Any]] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def script(self, path: str, answers: list[Any]) -> None:
        self.scripts[path] = deque(answers)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self.changed:
            self.arrived += 1
            self.changed.notify_all()
        answer: Any = 200
        queue = self.scripts.get(request.path)
        if queue:
            answer = queue.popleft()
        if isinstance(answer, tuple) and answer[0] == "sleep":
            await asyncio.sleep(answer[1])
            answer = 200
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        async with self.changed:
            self.requests.append(
                Received(request.method, request.path, dict(request.headers), body, time.time())
            )
            self.changed.notify_all()
        return web.Response(status=status, headers=headers)

    async def wait_arrived(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            async with self.changed:
                await self.changed.wait_for(lambda: self.arrived >= count)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, count: int, path: str | None = None, timeout: float = 10.0) -> list[Received]:
        """Wait until ``count`` requests (to ``path``, if given) have arrived."""

        def matching() -> list[Received]:
            return self.requests if path is None else self.on(path)

        async with asyncio.timeout(timeout):
            async with self.changed:
                await self.changed.wait_for(lambda: len(matching()) >= count)
        return matching()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await recv.handle(request)  # late-bound, so a test can wrap ``recv.handle``

    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    recv.url = f"http://127.0.0.1:{port}"
    yield recv
    await runner.cleanup()


PG_SERVER = os.environ.get("TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def _pg_admin(sql: str) -> None:
    """One statement on the machine's PostgreSQL (from a thread: callers may run in a loop)."""
    import asyncpg  # noqa: PLC0415

    async def run() -> None:
        conn = await asyncpg.connect(f"{PG_SERVER}/postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database of its own on the machine's PostgreSQL, dropped afterwards."""
    name = f"router_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f"CREATE DATABASE {name}")
    yield f"{PG_SERVER}/{name}"
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """Tests that use this (or ``pytestmark = pytest.mark.usefixtures("backend")``) run on both
    queue stores; ``base_env`` then points the daemon at a fresh PostgreSQL database."""
    return str(request.param)


@pytest.fixture
def base_env(tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    (tmp_path / "instances").mkdir()
    env = {
        "AUTHENTICATION_API_KEY": API_KEY,
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": "0",
        "ROUTER_STATE_DIR": str(tmp_path / "state"),
        "ROUTER_INSTANCES_DIR": str(tmp_path / "instances"),
        "ROUTER_SHUTDOWN_GRACE_S": "2",
        "LOG_LEVEL": "ERROR,WARN,WEBHOOKS",
    }
    if "backend" in request.fixturenames and request.getfixturevalue("backend") == "postgres":
        env["ROUTER_DATABASE_URL"] = request.getfixturevalue("pg_url")
    return env


@pytest.fixture
def make_settings(monkeypatch: pytest.MonkeyPatch, base_env: dict[str, str]) -> Callable[..., Settings]:
    """Settings from ``base_env`` plus keyword overrides, read through the real loader."""

    def make(**overrides: Any) -> Settings:
        for key, value in {**base_env, **overrides}.items():
            monkeypatch.setenv(key, str(value))
        return load_settings(config_file=None, env_file=None)

    return make


def hook_env(receiver: Receiver, *events: str, **extra: str) -> dict[str, str]:
    """Settings for a global webhook at ``<receiver>/hook`` (messages.upsert unless ``events``)."""
    flags = {f"WEBHOOK_EVENTS_{name}": "true" for name in (events or ("MESSAGES_UPSERT",))}
    return {
        "WEBHOOK_GLOBAL_ENABLED": "true",
        "WEBHOOK_GLOBAL_URL": f"{receiver.url}/hook",
        "WEBHOOK_RETRY_JITTER_FACTOR": "0",
        **flags,
        **extra,
    }


def router_command(*args: str) -> list[str]:
    """``evolution-router ARGS`` from this checkout, ignoring any config/ and .env around it."""
    return [sys.executable, "-m", "router", "--config", "/nonexistent", "--env-file", "/nonexistent", *args]


def run_router(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``evolution-router ARGS`` to completion, with exactly ``env``; its output as text."""
    return subprocess.run(
        router_command(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def write_instance(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


@asynccontextmanager
async def running(settings: Settings, start_timeout: float = 10) -> AsyncIterator[App]:
    """Run the daemon in this event loop until the block ends."""
    app = App(settings)
    task = asyncio.create_task(app.run())
    started = asyncio.create_task(app.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=start_timeout, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises what stopped it
    assert started in done, f"daemon did not start within {start_timeout} s"
    try:
        yield app
    finally:
        app.stop()
        stopped, _ = await asyncio.wait({task}, timeout=15)
        if not stopped:
            waiting = "\n".join(where_tasks_wait())
            task.cancel()
            raise AssertionError(f"the daemon did not stop within 15 s; its tasks wait at:\n{waiting}")
        task.result()


def where_tasks_wait() -> list[str]:
    """Each task of this event loop and the line it waits at (for a daemon that does not stop)."""
    lines = []
    for task in asyncio.all_tasks():
        frames = task.get_stack()
        place = f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "-"
        lines.append(f"{task.get_name()}: {place}")
    return sorted(lines)


async def wait_idle(app: App, timeout: float = 10.0) -> None:
    """Until the daemon reports itself idle: every due delivery attempted, nothing in flight.
    What has not arrived by then will not (retries due later excepted)."""
    assert app.dispatcher is not None
    async with asyncio.timeout(timeout):
        while not await app.dispatcher.idle():
            await asyncio.sleep(0.02)


async def wait_idle_at(port: int, timeout: float = 10.0) -> None:
    """``wait_idle`` for a daemon in its own process: until its /metrics says ``router_idle 1``."""
    async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as answer:
                if "\nrouter_idle 1.0" in await answer.text():
                    return
            await asyncio.sleep(0.02)


async def post_ingest(
    app_or_port: App | int,
    payload: Any,
    apikey: str | None = API_KEY,
    path: str = "/ingest",
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    port = app_or_port if isinstance(app_or_port, int) else app_or_port.port
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if apikey is not None:
        all_headers["apikey"] = apikey
    body = raw if raw is not None else orjson.dumps(payload)
    url = f"http://127.0.0.1:{port}{path}"
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=all_headers) as r:
        text = await r.read()
        return r.status, (orjson.loads(text) if text else None)


async def admin(app, method: str, path: str, body: Any = None, apikey: str | None = API_KEY, raw=None):
    """One admin API request to the daemon; (status, the answer's JSON)."""
    headers = {"Content-Type": "application/json"}
    if apikey is not None:
        headers["apikey"] = apikey
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    url = f"http://127.0.0.1:{app.port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, headers=headers) as r,
    ):
        return r.status, orjson.loads(await r.read())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DaemonProcess:
    """``evolution-router run`` as a real process, for kill -9 and log tests."""

    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, stdin: Any = subprocess.DEVNULL) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            router_command("run", *args),
            env=self.env,
            stdin=stdin,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        log.close()

    async def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.proc is not None and self.proc.poll() is None, self.logs()
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"daemon not ready\n{self.logs()}"
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    async def terminate(self) -> int:
        """SIGTERM, then wait without blocking the loop (the receiver may live in it)."""
        assert self.proc is not None
        self.proc.terminate()
        return await asyncio.to_thread(self.proc.wait, 30)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def daemon(tmp_path: Path, base_env: dict[str, str]) -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(**overrides: str) -> DaemonProcess:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "ROUTER_"))}
        env.update(base_env)
        env.update({"SERVER_PORT": str(port), "LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
        env.update(overrides)
        proc = DaemonProcess(env=env, port=port, log_path=tmp_path / f"daemon-{len(made)}.log")
        made.append(proc)
        return proc

    yield make
    for proc in made:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signed for 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    run = lambda *args: subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=router test CA")  # fmt: skip
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return d / "ca.pem", d / "server.pem", d / "server.key"
