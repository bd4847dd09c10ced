"""systemd's notify protocol (``sd_notify(3)``), spoken directly: one datagram per state change.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``; the daemon says ``READY=1`` once it
serves, ``RELOADING=1`` and ``READY=1`` around a reload, ``STOPPING=1`` when it begins to stop,
and, when the unit sets ``WatchdogSec=``, ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` from the
event loop, so a wedged loop gets the service restarted. Without ``NOTIFY_SOCKET`` (not under
systemd) every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from router import logs
from router.settings import Settings

log = logs.get_logger("router.systemd")


class Notifier:
    def __init__(self, settings: Settings) -> None:
        path = settings.notify_socket
        # "@name" is a socket in the abstract namespace (no file): a leading NUL byte.
        self.address = ("\0" + path[1:] if path.startswith("@") else path) if path else None
        watchdog_usec, pid = settings.watchdog_usec, settings.watchdog_pid
        meant_for_us = pid is None or pid == os.getpid()
        self.watchdog_interval_s = watchdog_usec / 2e6 if watchdog_usec and meant_for_us else None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(fields).encode())
        except OSError as exc:  # systemd gone or socket misconfigured: the daemon runs on
            log.warning("systemd.notify_failed", error=str(exc), fields=fields[0])

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # systemd wants the monotonic time with RELOADING=1, to tell this reload from an older one.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: intake closed, finishing attempts under way")

    async def keep_watchdog_fed(self) -> None:
        """Ping the watchdog until cancelled (a timer is what the protocol asks for)."""
        if self.watchdog_interval_s is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval_s)
