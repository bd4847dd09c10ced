"""A stand-in for neonize's compiled Go core (goneonize), at the library's own ctypes boundary.

neonize's asyncio client calls the Go core through one object, ``neonize.aioze.client.gocode``
(each call run in a thread); the Go core calls back through ctypes function pointers with
serialized protobuf events. ``FakeGoCore`` takes the Go core's place there and nowhere else, so
the library's own client, threads, callbacks, protobuf decoding and event dispatch all run as in
production; only the network side (whatsmeow talking to WhatsApp) is replaced.

Like the Go core, ``Neonize(...)`` blocks for as long as the session runs: until ``Stop``, or
until the test ends it with an error. Events reach the client only if it subscribed to them.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from neonize.events import EVENT_TO_INT
from neonize.proto import Neonize_pb2 as proto


@dataclass
class GoSession:
    database: str
    qr_cb: Any
    event_cb: Any
    subscribed: frozenset[int]
    ended: threading.Event = field(default_factory=threading.Event)
    error: bytes = b""


class FakeGoCore:
    def __init__(self) -> None:
        self.sessions: dict[bytes, GoSession] = {}
        self.connects: dict[bytes, int] = {}  # Neonize() calls per uuid
        self.paired: list[tuple[bytes, str]] = []  # (uuid, phone) of PairPhone calls
        self.pairing_code = "ABCD-1234"
        self._lock = threading.Lock()

    # --- the Go core's functions, as neonize's _binder declares them ---------------------

    def Neonize(
        self,
        database: bytes,
        uuid: bytes,
        jid: bytes,
        jid_size: int,
        new_device: int,
        log_level: bytes,
        qr_cb: Any,
        login_cb: Any,
        event_cb: Any,
        log_cb: Any,
        subscribers: Any,
        subscribers_size: int,
        device_props: bytes,
        device_props_size: int,
        pairing: bytes,
        pairing_size: int,
        proxy: Any,
    ) -> bytes:
        session = GoSession(
            database.decode(), qr_cb, event_cb, frozenset(bytes(subscribers[:subscribers_size]))
        )
        with self._lock:
            self.sessions[uuid] = session
            self.connects[uuid] = self.connects.get(uuid, 0) + 1
        session.ended.wait()
        return session.error

    def Stop(self, uuid: bytes) -> bytes:
        session = self.sessions.get(uuid)
        if session is not None:
            session.ended.set()
        return b""

    def PairPhone(self, uuid: bytes, payload: bytes, size: int) -> bytes:
        params = proto.PairPhoneParams.FromString(payload[:size])
        self.paired.append((uuid, params.phone))
        return proto.PairPhoneReturnFunction(Code=self.pairing_code).SerializeToString()

    # --- what the network would do -------------------------------------------------------

    def emit(self, uuid: bytes, event: Any) -> None:
        """whatsmeow produced ``event`` for the session ``uuid``."""
        session = self.sessions[uuid]
        code = EVENT_TO_INT[type(event)]
        if code != 0 and code not in session.subscribed:
            return  # the Go core sends only what the client subscribed to
        data = event.SerializePartialToString()
        buffer = ctypes.create_string_buffer(data, len(data))
        session.event_cb(uuid, ctypes.addressof(buffer), len(data), code)

    def qr(self, uuid: bytes, code: str) -> None:
        buffer = ctypes.create_string_buffer(code.encode())
        self.sessions[uuid].qr_cb(None, ctypes.addressof(buffer))

    def fail(self, uuid: bytes, error: str) -> None:
        """The session's client ends with an error (what a fatal Go-side failure looks like)."""
        session = self.sessions[uuid]
        session.error = error.encode()
        session.ended.set()

    async def wait_connects(self, uuid: bytes, count: int, timeout: float = 15.0) -> None:
        await wait_until(lambda: self.connects.get(uuid, 0) >= count, timeout)
        await wait_until(lambda: not self.sessions[uuid].ended.is_set(), timeout)


async def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
