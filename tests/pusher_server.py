"""A loopback server that speaks the Pusher Channels HTTP API for publishing, and checks every
request's authentication exactly as Pusher documents it (independently of the router's code):

- ``auth_key`` is the app's key, ``auth_version`` is ``1.0``;
- ``auth_timestamp`` is within 600 seconds of now;
- ``body_md5`` is the hex MD5 of the body;
- ``auth_signature`` is the hex HMAC-SHA256, keyed by the app secret, of
  ``METHOD\\nPATH\\n`` + every other query parameter sorted by name, as ``name=value`` joined by ``&``.

A request that fails any check gets 401 with the reason, as Pusher answers. ``data`` over 10240
bytes gets 413. Published events are kept in ``events`` as (app_id, channel, name, data).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.conftest import free_port


@dataclass
class App:
    app_id: str
    key: str
    secret: str


@dataclass
class PusherServer:
    apps: dict[str, App] = field(default_factory=dict)
    events: list[tuple[str, str, str, str]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # paths of accepted requests
    refused: list[str] = field(default_factory=list)  # reasons of 401 answers
    statuses: deque[int] = field(default_factory=deque)  # scripted answers to the next requests
    port: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None

    def add_app(self, app_id: str, key: str, secret: str) -> App:
        self.apps[app_id] = App(app_id, key, secret)
        return self.apps[app_id]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/apps/{app_id}/events", self.handle)
        app.router.add_post("/apps/{app_id}/batch_events", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def check_auth(self, request: web.Request, body: bytes) -> str | None:
        """None when the request is authentic, else the reason."""
        app = self.apps.get(request.match_info["app_id"])
        if app is None:
            return "unknown app"
        query = dict(request.query)
        signature = query.pop("auth_signature", None)
        if query.get("auth_key") != app.key:
            return "wrong auth_key"
        if query.get("auth_version") != "1.0":
            return "auth_version must be 1.0"
        if abs(time.time() - int(query.get("auth_timestamp", "0"))) > 600:
            return "auth_timestamp too far from now"
        if query.get("body_md5") != hashlib.md5(body).hexdigest():
            return "body_md5 does not match the body"
        to_sign = "\n".join(["POST", request.path, "&".join(f"{k}={v}" for k, v in sorted(query.items()))])
        expected = hmac.new(app.secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if signature is None or not hmac.compare_digest(signature, expected):
            return "invalid auth_signature"
        return None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        reason = self.check_auth(request, body)
        if reason is not None:
            self.refused.append(reason)
            return web.Response(status=401, text=reason)
        if self.statuses:
            return web.Response(status=self.statuses.popleft(), text="scripted")
        doc: dict[str, Any] = orjson.loads(body)
        if request.path.endswith("/batch_events"):
            items = doc["batch"]
            if len(items) > 10:
                return web.Response(status=400, text="batch of more than 10 events")
            published = [(item["channel"], item["name"], item["data"]) for item in items]
        else:
            published = [(channel, doc["name"], doc["data"]) for channel in doc["channels"]]
        for _, _, data in published:
            if len(data.encode()) > 10240:
                return web.Response(status=413, text="event data too large")
        async with self.changed:
            self.requests.append(request.path)
            app_id = request.match_info["app_id"]
            self.events += [(app_id, channel, name, data) for channel, name, data in published]
            self.changed.notify_all()
        return web.json_response({})

    async def wait_for(self, count: int, timeout: float = 15) -> list[tuple[str, str, str, str]]:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: len(self.events) >= count)
        return self.events
