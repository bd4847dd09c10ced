"""At-least-once across kill -9 and restarts, with the daemon as a real process."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import API_KEY, hook_env, post_ingest, running, wait_idle_at

ONE_EVENT = {"event": "messages.upsert", "instance": "bot", "data": {}}


def env_dir(proc) -> str:
    return proc.env["ROUTER_STATE_DIR"]


def stored_attempts(db: Path) -> int | None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT attempts FROM deliveries").fetchone()
        return None if row is None else int(row[0])
    finally:
        conn.close()


async def ingest_until_killed(port: int, batches: int, kill_after: int, kill) -> list[str]:
    """Post batches; SIGKILL the daemon after ``kill_after`` of them were accepted."""
    accepted: list[str] = []
    async with aiohttp.ClientSession() as session:
        for b in range(batches):
            batch = [
                {"event": "messages.upsert", "instance": f"bot{n % 3}", "data": {"n": b * 100 + n}}
                for n in range(100)
            ]
            try:
                async with session.post(
                    f"http://127.0.0.1:{port}/ingest",
                    data=orjson.dumps(batch),
                    headers={"apikey": API_KEY, "Content-Type": "application/json"},
                ) as response:
                    if response.status == 202:
                        accepted += (await response.json())["ids"]
            except aiohttp.ClientError:
                break  # the daemon is gone: this batch was never acknowledged
            if b + 1 == kill_after:
                kill()
    return accepted


async def test_kill_9_mid_stream_loses_no_accepted_event(receiver, daemon):
    receiver.script("/hook", [("sleep", 0.002)] * 100_000)  # a receiver slower than intake
    proc = daemon(**hook_env(receiver))
    proc.start()
    await proc.wait_ready()
    accepted = await ingest_until_killed(proc.port, batches=30, kill_after=12, kill=proc.kill)
    assert len(accepted) >= 1200
    delivered_before = {r.json()["id"] for r in receiver.requests}
    assert len(delivered_before) < len(accepted), "the kill should land mid-stream"

    restarted = daemon(**hook_env(receiver))
    restarted.env["SERVER_PORT"] = str(proc.port)
    restarted.port = proc.port
    restarted.start()
    await restarted.wait_ready()
    async with asyncio.timeout(60):
        while not set(accepted) <= {r.json()["id"] for r in receiver.requests}:
            await receiver.wait_for(len(receiver.requests) + 1, timeout=60)
    assert await restarted.terminate() == 0


async def test_retry_schedule_survives_a_restart(receiver, daemon):
    receiver.script("/hook", [500])
    env = hook_env(receiver, WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="3")
    first = daemon(**env)
    first.start()
    await first.wait_ready()
    assert (await post_ingest(first.port, ONE_EVENT))[0] == 202
    [failed] = await receiver.wait_for(1)
    # Kill only once the failure and its due time are stored (before that, redelivering at
    # once is the right at-least-once outcome).
    db = Path(env_dir(first)) / "router.db"
    async with asyncio.timeout(10):
        while stored_attempts(db) != 1:
            await asyncio.sleep(0.02)
    first.kill()

    second = daemon(**env)
    second.start()
    await second.wait_ready()
    [_, retried] = await receiver.wait_for(2, timeout=15)
    assert retried.json()["id"] == failed.json()["id"]
    assert retried.at - failed.at >= 2.9, "the retry waited for its stored due time"
    assert await second.terminate() == 0


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_sigterm_lets_an_attempt_under_way_finish(receiver, daemon, loop):
    receiver.script("/hook", [("sleep", 1.0)])
    proc = daemon(**hook_env(receiver), ROUTER_SHUTDOWN_GRACE_S="5", ROUTER_EVENT_LOOP=loop)
    proc.start()
    await proc.wait_ready()
    assert (await post_ingest(proc.port, ONE_EVENT))[0] == 202
    await receiver.wait_arrived(1)
    assert await proc.terminate() == 0
    assert len(receiver.requests) == 1, "the attempt under way finished before exit"

    again = daemon(**hook_env(receiver))
    again.start()
    await again.wait_ready()
    await wait_idle_at(again.port)
    assert len(receiver.requests) == 1, "it was acknowledged, so it is not delivered again"
    assert await again.terminate() == 0


async def test_delivered_events_are_pruned_from_the_database(receiver, make_settings):
    settings = make_settings(**hook_env(receiver))
    async with running(settings) as app:
        batch = [{"event": "messages.upsert", "instance": "bot", "data": {"n": n}} for n in range(300)]
        assert (await post_ingest(app, batch))[0] == 202
        await receiver.wait_for(300)
        db = Path(settings.router_state_dir) / "router.db"
        async with asyncio.timeout(10):
            while table_sizes(db) != (0, 0):
                await asyncio.sleep(0.02)


def table_sizes(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        deliveries = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
        return int(events), int(deliveries)
    finally:
        conn.close()
