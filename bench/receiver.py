"""The benchmark's webhook receiver, in a process of its own.

POST anything: counted, and the latency from the event's ``data.sent_at`` recorded, and when
it arrived by its ``data.key.id``.
POST /slow?s=SECONDS answers after that long (a slow receiver), counted apart.
GET /count: ``{"count": n}`` (cheap, for polling); GET /stats adds ``latencies_ms`` and
``arrivals`` (key id -> unix time); POST /reset clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiohttp import web


def make_app() -> web.Application:
    state: dict[str, list[float]] = {"latencies": []}
    arrivals: dict[str, float] = {}
    counter = {"count": 0}

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        counter["count"] += 1
        data = orjson.loads(body).get("data", {})
        sent_at = data.get("sent_at")
        if sent_at is not None:
            state["latencies"].append((now - sent_at) * 1000)
        key_id = (data.get("key") or {}).get("id")
        if key_id is not None:
            arrivals[key_id] = now
        return web.Response(status=200)

    async def stats(_: web.Request) -> web.Response:
        body = {"count": counter["count"], "latencies_ms": state["latencies"], "arrivals": arrivals}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def count(_: web.Request) -> web.Response:
        return web.json_response({"count": counter["count"]})

    async def reset(_: web.Request) -> web.Response:
        counter["count"] = 0
        state["latencies"] = []
        arrivals.clear()
        return web.Response(status=204)

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(float(request.query.get("s", "20")))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/slow", slow)
    app.router.add_get("/stats", stats)
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    app.router.add_post("/hook", receive)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    web.run_app(make_app(), host="127.0.0.1", port=parser.parse_args().port, print=None, access_log=None)
