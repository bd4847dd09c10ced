"""What an operator tails: one WEBHOOKS line per attempt, no payloads, no secrets."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from tests.conftest import API_KEY, wait_idle_at, write_instance

SECRET_DATA = "very-private-message-text"


async def send(port: int, events: list[dict[str, object]]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/ingest",
            data=orjson.dumps(events),
            headers={"apikey": API_KEY, "Content-Type": "application/json"},
        ) as response,
    ):
        assert response.status == 202


def log_lines(proc) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in proc.logs().splitlines() if line.startswith("{")]


async def test_webhooks_level_logs_every_attempt_without_payload_or_secrets(receiver, daemon, tmp_path):
    write_instance(
        tmp_path / "instances",
        "bot",
        f"token: instance-secret-token\nwebhook:\n  enabled: true\n  url: {receiver.url}/i\n"
        "  headers: {Authorization: Bearer header-secret, jwt_key: jwt-secret-value}\n"
        "  events: [MESSAGES_UPSERT]\n",
    )
    receiver.script("/i", [503])
    proc = daemon(
        LOG_LEVEL="ERROR,WARN,INFO,WEBHOOKS",
        WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05",
        WEBHOOK_RETRY_JITTER_FACTOR="0",
    )
    proc.start()
    await proc.wait_ready()
    await send(proc.port, [{"event": "messages.upsert", "instance": "bot", "data": {"text": SECRET_DATA}}])
    await receiver.wait_for(2)
    assert await proc.terminate() == 0

    attempts = [line for line in log_lines(proc) if line.get("msg") == "delivery.attempt"]
    assert [(a["attempt"], a["status"], a["outcome"]) for a in attempts] == [
        (1, 503, "retry in 0.05s"),
        (2, 200, "delivered"),
    ]
    first = attempts[0]
    assert first["instance"] == "bot" and first["event"] == "messages.upsert"
    assert first["sink"] == "webhook" and first["target"] == "webhook:instance:bot"
    assert first["url"] == f"{receiver.url}/i" and first["kind"] == "WEBHOOKS"
    assert isinstance(first["elapsed_ms"], float) and first["error"] == "HTTP 503"
    assert first["event_id"] == orjson.loads(receiver.requests[0].body)["id"]
    text = proc.logs()
    for secret in (SECRET_DATA, "instance-secret-token", "header-secret", "jwt-secret-value", API_KEY):
        assert secret not in text


async def test_without_webhooks_level_there_are_no_attempt_lines(receiver, daemon):
    proc = daemon(
        LOG_LEVEL="ERROR,WARN,INFO",
        WEBHOOK_GLOBAL_ENABLED="true",
        WEBHOOK_GLOBAL_URL=receiver.url,
        WEBHOOK_EVENTS_CALL="true",
    )
    proc.start()
    await proc.wait_ready()
    await send(proc.port, [{"event": "call", "instance": "bot", "data": {}}])
    await receiver.wait_for(1)
    await wait_idle_at(proc.port)
    assert await proc.terminate() == 0
    messages = [line["msg"] for line in log_lines(proc)]
    assert "router.started" in messages and "router.stopped" in messages
    assert "delivery.attempt" not in messages


async def test_dead_letters_are_logged_as_errors_and_bad_jsonl_lines_named(receiver, daemon, tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text(
        '{"event": "call", "instance": "bot"}\nnot json at all\n{"event": "nope", "instance": "b"}\n'
    )
    receiver.script("/", [404])
    proc = daemon(
        LOG_LEVEL="ERROR",
        WEBHOOK_GLOBAL_ENABLED="true",
        WEBHOOK_GLOBAL_URL=receiver.url,
        WEBHOOK_EVENTS_CALL="true",
        ROUTER_JSONL_PATH=str(feed),
    )
    proc.start()
    await proc.wait_ready()
    await receiver.wait_for(1)
    async with asyncio.timeout(10):
        while "delivery.dead_letter" not in proc.logs():
            await asyncio.sleep(0.05)
    assert await proc.terminate() == 0
    lines = log_lines(proc)
    [dead] = [line for line in lines if line["msg"] == "delivery.dead_letter"]
    assert dead["level"] == "error" and dead["error"] == "HTTP 404 (non-retryable)"
    bad = [(line["line"], line["error"]) for line in lines if line["msg"] == "jsonl.bad_line"]
    assert bad[0][0] == 2 and bad[0][1].startswith("malformed JSON: ")
    assert bad[1] == (3, "unknown event 'nope'")
    assert all(line["level"] == "error" for line in lines), "LOG_LEVEL=ERROR shows errors only"
