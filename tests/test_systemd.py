"""The notify protocol, with a datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable

import aiohttp
import pytest

from router.settings import Settings
from router.systemd import Notifier


class FakeSystemd:
    """Receives what the daemon sends to NOTIFY_SOCKET, one datagram per message."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def next(self, wanted: Callable[[dict[str, str]], bool], timeout: float = 15.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                datagram = await loop.sock_recv(self.sock, 4096)
                message = dict(line.split("=", 1) for line in datagram.decode().splitlines())
                self.messages.append(message)
                if wanted(message):
                    return message


@pytest.fixture
def fake_systemd():
    made: list[FakeSystemd] = []

    def make(address: str) -> FakeSystemd:
        made.append(FakeSystemd(address))
        return made[-1]

    yield make
    for fake in made:
        fake.sock.close()


async def test_ready_watchdog_reload_and_stop_are_told_to_systemd(daemon, fake_systemd, tmp_path):
    systemd = fake_systemd(str(tmp_path / "notify.sock"))
    proc = daemon(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="200000")
    proc.start()
    ready = await systemd.next(lambda m: "READY" in m)
    assert ready["READY"] == "1"
    assert ready["STATUS"] == f"serving on port {proc.port}: 0 instances, 0 delivery targets"
    # READY=1 means it serves: /health answers at once.
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{proc.port}/health") as r:
        assert r.status == 200
    for _ in range(3):  # every WATCHDOG_USEC / 2 = 0.1 s
        await systemd.next(lambda m: m.get("WATCHDOG") == "1", timeout=2)

    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGHUP)
    reloading = await systemd.next(lambda m: "RELOADING" in m)
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    await systemd.next(lambda m: m.get("READY") == "1")

    proc.proc.terminate()
    stopping = await systemd.next(lambda m: "STOPPING" in m)
    assert stopping["STOPPING"] == "1"
    assert await asyncio.to_thread(proc.proc.wait, 30) == 0


async def test_abstract_socket_and_a_watchdog_meant_for_another_process(make_settings, fake_systemd):
    name = f"evolution-router-test-{os.getpid()}"
    systemd = fake_systemd("\0" + name)
    notifier = Notifier(make_settings(NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="1000000"))
    assert notifier.watchdog_interval_s == 0.5
    notifier.ready("up")
    assert await systemd.next(lambda m: True) == {"READY": "1", "STATUS": "up"}
    other = make_settings(
        NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="1000000", WATCHDOG_PID=str(os.getpid() + 1)
    )
    assert Notifier(other).watchdog_interval_s is None


def test_without_notify_socket_nothing_is_sent(make_settings):
    settings: Settings = make_settings()
    notifier = Notifier(settings)
    assert notifier.address is None and notifier.watchdog_interval_s is None
    notifier.ready("up")  # no socket, no error
