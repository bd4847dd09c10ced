"""``evolution-router dlq``: run as subprocesses against the database of a running daemon."""

from __future__ import annotations

import asyncio
import subprocess

import orjson
import pytest

from tests.conftest import post_ingest, run_router, write_instance

pytestmark = pytest.mark.usefixtures("backend")  # each test runs on SQLite and on PostgreSQL


def dlq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_router(env, "dlq", *args, timeout=60)


def listed_ids(env: dict[str, str], *filters: str) -> list[int]:
    result = dlq(env, "list", *filters)
    assert result.returncode == 0, result.stderr
    return [int(line.split()[0]) for line in result.stdout.splitlines()[1:]]


async def wait_dead(env: dict[str, str], count: int, timeout: float = 15) -> list[int]:
    async with asyncio.timeout(timeout):
        while len(ids := listed_ids(env)) < count:
            await asyncio.sleep(0.1)
    return ids


async def test_list_show_replay_and_purge_while_the_daemon_runs(receiver, daemon, tmp_path):
    for name in ("bot", "shop"):
        write_instance(
            tmp_path / "instances",
            name,
            f"webhook: {{enabled: true, url: '{receiver.url}/{name}', events: [MESSAGES_UPSERT, CALL]}}\n",
        )
    receiver.script("/bot", [404, 404, 404])
    receiver.script("/shop", [404])
    proc = daemon()
    proc.start()
    await proc.wait_ready()
    try:
        events = [
            {"event": "messages.upsert", "instance": "bot", "data": {"n": 1}},
            {"event": "call", "instance": "bot", "data": {"n": 2}},
            {"event": "messages.upsert", "instance": "bot", "data": {"n": 3}},
            {"event": "messages.upsert", "instance": "shop", "data": {"n": 4}},
        ]
        for event in events:  # one at a time, so the scripted 404s meet them in this order
            assert (await post_ingest(proc.port, [event]))[0] == 202
            await receiver.wait_for(sum(1 for e in events[: events.index(event) + 1]))
        env = proc.env
        all_ids = await wait_dead(env, 4)

        listing = dlq(env, "list", "--instance", "bot", "--event", "messages.upsert")
        lines = listing.stdout.splitlines()
        assert lines[0].split()[:4] == ["ID", "DIED", "(UTC)", "INSTANCE"]
        assert len(lines) == 3 and all(
            " bot " in line and "webhook:instance:bot" in line for line in lines[1:]
        )
        assert "HTTP 404" in lines[1] and listing.stderr.strip() == "2 dead letter(s)"
        assert listed_ids(env, "--sink", "rabbitmq") == []
        assert listed_ids(env, "--since", "2000-01-01T00:00:00Z") == all_ids
        assert listed_ids(env, "--until", "2000-01-01") == []

        shown = dlq(env, "show", str(all_ids[0]))
        assert shown.returncode == 0, shown.stderr
        detail = orjson.loads(shown.stdout)
        assert orjson.loads(detail["envelope"])["data"] == {"n": 1}
        assert detail["target"] == "webhook:instance:bot" and detail["attempts"] == 1
        assert [e["error"] for e in detail["errors"]] == ["HTTP 404 (non-retryable)"]

        refused = dlq(env, "replay")
        assert refused.returncode == 1 and "pass --all" in refused.stderr

        # Replay bot's dead letters: the receiver answers 200 now; they arrive without a restart.
        before = len(receiver.on("/bot"))
        replayed = dlq(env, "replay", "--all", "--instance", "bot")
        assert replayed.returncode == 0 and replayed.stdout.strip().startswith("replayed 3 ")
        arrived = await receiver.wait_for(before + 3, path="/bot")
        assert sorted(orjson.loads(r.body)["data"]["n"] for r in arrived[before:]) == [1, 2, 3]
        assert listed_ids(env) == [all_ids[3]]

        purged = dlq(env, "purge", str(all_ids[3]))
        assert purged.returncode == 0 and purged.stdout.strip() == "purged 1 dead letter(s)"
        assert listed_ids(env) == []
        missing = dlq(env, "show", str(all_ids[3]))
        assert missing.returncode == 1 and f"no dead letter with id {all_ids[3]}" in missing.stderr
    finally:
        assert await proc.terminate() == 0
