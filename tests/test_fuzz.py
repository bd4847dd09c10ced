"""A bounded, seeded fuzz of /ingest and the admin API: thousands of hostile requests, none
answered 5xx, no connection dropped, and the daemon still delivers afterwards."""

from __future__ import annotations

import asyncio
import gzip
import random
import zlib
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from router.events import WIRE_NAMES
from tests.conftest import API_KEY, hook_env, post_ingest, running

REQUESTS = 3000
AT_ONCE = 16
TEXTS = ["", " ", "a", "é", "漢字", "\u202e", "\x00", "../x", "a.b", "%", "💥" * 3, "x" * 300, "CALL", "call"]


def value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 6 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**63 - 1, 1.5e308, float("-0")])
    if kind in (2, 3, 4):
        return rng.choice(TEXTS + list(WIRE_NAMES) + ["0001-01-01T00:00:00+01:00", "http://u:p@h/x?t=1"])
    if kind in (5, 6):
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice([*TEXTS, "event", "instance", "data", "webhook", "url"]): value(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def envelope(rng: random.Random) -> Any:
    body = {
        "event": rng.choice([*WIRE_NAMES, "MESSAGES_UPSERT", "nope", 7, None]),
        "instance": rng.choice(["bot", *TEXTS, 5]),
        "data": value(rng),
    }
    for key in ("date_time", "id", "sender", "server_url", "apikey", "destination"):
        if rng.random() < 0.3:
            body[key] = value(rng)
    return body if rng.random() < 0.8 else [body, value(rng)]


def request(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path, body, headers) of one hostile request."""
    headers = {"apikey": rng.choice([API_KEY, API_KEY, "wrong", "é", " " + API_KEY])}
    shape = rng.randrange(10)
    if shape < 4:
        method, path = "POST", "/ingest" + rng.choice(["", "/messages-upsert", "/nope", "/" + quote("漢")])
        body = orjson.dumps(envelope(rng))
    elif shape == 4:
        method, path, body = "POST", "/ingest", rng.randbytes(rng.randrange(64))
    elif shape == 5:
        method, path = "POST", "/instance/create"
        name = rng.choice(TEXTS) + (str(rng.randrange(40)) if rng.random() < 0.2 else "")
        body = orjson.dumps({"instanceName": name, "webhook": value(rng), rng.choice(TEXTS): value(rng)})
    elif shape == 6:
        sink = rng.choice(["webhook", "rabbitmq", "sqs", "pusher", "websocket", "nats"])
        method = rng.choice(["POST", "GET"])
        path = f"/{sink}/{'set' if method == 'POST' else 'find'}/{quote(rng.choice(TEXTS), safe='')}"
        body = orjson.dumps({sink: value(rng)}) if method == "POST" else b""
    elif shape == 7:
        method = rng.choice(["GET", "DELETE", "PUT"])
        path = rng.choice(
            [
                "/instance/fetchInstances?instanceName=" + quote(rng.choice(TEXTS)),
                "/instance/delete/" + quote(rng.choice(TEXTS), safe=""),
                "/nowhere",
                "/metrics",
                "/ready",
            ]
        )
        body = b""
    else:
        method, path = "POST", rng.choice(["/ingest", "/instance/create"])
        raw = orjson.dumps(envelope(rng))
        encoding = rng.choice(["gzip", "deflate", "br", "identity"])
        compressed = {"gzip": gzip.compress, "deflate": zlib.compress}.get(encoding, lambda b: b)(raw)
        body = compressed if rng.random() < 0.5 else rng.randbytes(len(compressed))
        headers["Content-Encoding"] = encoding
    if rng.random() < 0.1:
        headers["Content-Type"] = rng.choice(["text/plain", "application/json; charset=latin-1", "x/y"])
    return method, path, body, headers


async def test_fuzzing_never_gets_a_5xx_nor_a_dropped_connection(receiver, make_settings):
    rng = random.Random(20261125)
    answers: dict[int, int] = {}
    async with running(make_settings(**hook_env(receiver, "CALL"), WEBHOOK_RETRY_MAX_ATTEMPTS="1")) as app:
        base = f"http://127.0.0.1:{app.port}"
        async with aiohttp.ClientSession(auto_decompress=False) as session:

            async def one(method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
                async with session.request(method, base + path, data=body, headers=headers) as answer:
                    await answer.read()
                    answers[answer.status] = answers.get(answer.status, 0) + 1
                    assert answer.status < 500, (method, path, body[:200], headers, answer.status)

            for start in range(0, REQUESTS, AT_ONCE):
                batch = [request(rng) for _ in range(min(AT_ONCE, REQUESTS - start))]
                await asyncio.gather(*(one(*item) for item in batch))
        # Still delivering a valid event.
        status, answer = await post_ingest(app, {"event": "call", "instance": "after", "data": {"ok": 1}})
        assert status == 202
        await receiver.wait_for(1, "/hook")
    assert any(r.json()["id"] == answer["ids"][0] for r in receiver.on("/hook"))
    assert sum(answers.values()) == REQUESTS and {202, 400, 401, 404} <= set(answers)
