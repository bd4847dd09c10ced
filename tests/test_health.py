"""``GET /health`` and ``GET /ready``: the store takes a write, every enabled sink is reachable."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from router import __version__
from tests.conftest import free_port, hook_env, running


async def get(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, orjson.loads(await r.read())


async def test_ready_when_store_and_every_sink_answer(receiver, make_settings):
    env = hook_env(receiver, RABBITMQ_ENABLED="true", RABBITMQ_URI="amqp://guest:guest@127.0.0.1:5672/")
    async with running(make_settings(**env)) as app:
        every_check = {"store": {"ok": True}, "webhook": {"ok": True}, "rabbitmq": {"ok": True}}
        assert await get(app.port, "/ready") == (200, {"status": "ready", "checks": every_check})


async def test_not_ready_names_each_unreachable_sink_while_health_stays_ok(make_settings):
    closed = free_port()  # nothing listens there
    env = {
        "WEBHOOK_GLOBAL_ENABLED": "true",
        "WEBHOOK_GLOBAL_URL": f"http://127.0.0.1:{closed}/hook",
        "WEBHOOK_EVENTS_CALL": "true",
        "RABBITMQ_ENABLED": "true",
        "RABBITMQ_URI": f"amqp://guest:guest@127.0.0.1:{closed}/",
        "PUSHER_ENABLED": "true",
        "PUSHER_GLOBAL_ENABLED": "true",
        "PUSHER_GLOBAL_APP_ID": "1",
        "PUSHER_GLOBAL_KEY": "k",
        "PUSHER_GLOBAL_SECRET": "s",
        "PUSHER_GLOBAL_USE_TLS": "false",
        "PUSHER_HOST": "127.0.0.1",
        "PUSHER_PORT": str(closed),
    }
    async with running(make_settings(**env)) as app:
        status, body = await get(app.port, "/ready")
        assert status == 503 and body["status"] == "not ready"
        checks = body["checks"]
        assert checks["store"] == {"ok": True}
        assert checks["webhook"]["ok"] is False
        assert checks["webhook"]["error"].startswith(f"127.0.0.1:{closed} unreachable")
        assert checks["pusher"]["error"].startswith(f"127.0.0.1:{closed} unreachable")
        assert checks["rabbitmq"]["error"].startswith("broker unreachable")
        assert await get(app.port, "/health") == (200, {"status": "ok", "version": __version__})


async def test_not_ready_when_the_store_cannot_write(make_settings):
    async with running(make_settings()) as app:
        assert app.store is not None
        assert (await get(app.port, "/ready"))[0] == 200

        async def refuse() -> None:
            raise OSError("database or disk is full")

        app.store.probe = refuse  # type: ignore[method-assign]
        status, body = await get(app.port, "/ready")
        assert (status, body["checks"]["store"]) == (503, {"ok": False, "error": "database or disk is full"})
