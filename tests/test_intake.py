"""The http and jsonl adapters: formats, errors, and that bad input never costs accepted events."""

from __future__ import annotations

import asyncio
import select
import socket
import subprocess
import time

import orjson
import pytest

from tests.conftest import API_KEY, hook_env, post_ingest, running, wait_idle


def event(n: int, name: str = "messages.upsert", instance: str = "bot") -> dict[str, object]:
    return {"event": name, "instance": instance, "data": {"n": n}}


async def test_one_object_array_and_ndjson_are_accepted(receiver, make_settings):
    async with running(make_settings(**hook_env(receiver, "MESSAGES_UPSERT", "CONNECTION_UPDATE"))) as app:
        status, one = await post_ingest(app, event(0))
        assert status == 202 and one["accepted"] == 1 and len(one["ids"]) == 1
        status, many = await post_ingest(app, [event(1), event(2)])
        assert status == 202 and many["accepted"] == 2
        ndjson = b"\n".join(orjson.dumps(event(n)) for n in (3, 4, 5)) + b"\n"
        status, lines = await post_ingest(
            app, None, raw=ndjson, headers={"Content-Type": "application/x-ndjson"}
        )
        assert status == 202 and lines["accepted"] == 3
        got = await receiver.wait_for(6)
    assert sorted(r.json()["data"]["n"] for r in got) == [0, 1, 2, 3, 4, 5]
    ids = one["ids"] + many["ids"] + lines["ids"]
    assert {r.json()["id"] for r in got} == set(ids)
    assert ids == sorted(ids), "ids are time-ordered"


async def test_upstream_by_events_paths_and_config_names(receiver, make_settings):
    async with running(make_settings(**hook_env(receiver, "MESSAGES_UPSERT", "CONNECTION_UPDATE"))) as app:
        # Upstream with byEvents posts to <url>/<suffix>; the body may omit or repeat the event.
        status, _ = await post_ingest(app, {"instance": "bot", "data": {}}, path="/ingest/connection-update")
        assert status == 202
        status, _ = await post_ingest(app, event(1), path="/ingest/messages-upsert")
        assert status == 202
        status, _ = await post_ingest(app, {"event": "MESSAGES_UPSERT", "instance": "bot", "data": {}})
        assert status == 202
        status, body = await post_ingest(app, event(2), path="/ingest/connection-update")
        assert status == 400 and "does not match" in body["error"]
        status, body = await post_ingest(app, event(2), path="/ingest/no-such-event")
        assert status == 400 and "no-such-event" in body["error"]
        got = await receiver.wait_for(3)
    assert sorted(r.json()["event"] for r in got) == [
        "connection.update",
        "messages.upsert",
        "messages.upsert",
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"event": "messages.upsert", "instance": ', "malformed JSON"),
        (b"", "empty body"),
        (b"[]", "empty batch"),
        (b'"just a string"', "expected a JSON object"),
        (b'{"event": "messages.explode", "instance": "bot", "data": {}}', "unknown event 'messages.explode'"),
        (b'{"event": "messages.upsert", "data": {}}', "missing field 'instance'"),
        (b'{"instance": "bot", "data": {}}', "missing field 'event'"),
        (b'{"event": "call", "instance": "a/b", "data": {}}', "invalid instance name 'a/b'"),
        (b'{"event": "call", "instance": "bot", "date_time": "yesterday"}', "not an ISO-8601 time"),
        (
            b'[{"event": "call", "instance": "bot"}, {"event": "nope", "instance": "bot"}]',
            "item 1: unknown event 'nope'",
        ),
        (  # a batch parsed in slices: every bad item is named, whichever slice it is in
            orjson.dumps(
                [{"event": "nope" if n in (3, 150) else "call", "instance": "bot"} for n in range(200)]
            ),
            "item 3: unknown event 'nope'; item 150: unknown event 'nope'",
        ),
        (
            b'{"event": "call", "instance": "bot"}\n{"event": "call", "instance":\n',
            "malformed JSON on line 2",
        ),
    ],
)
async def test_bad_input_is_400_naming_the_problem_and_nothing_is_accepted(
    receiver, make_settings, raw, message
):
    async with running(
        make_settings(
            **hook_env(receiver, "MESSAGES_UPSERT", "CONNECTION_UPDATE"), WEBHOOK_EVENTS_CALL="true"
        )
    ) as app:
        status, body = await post_ingest(app, None, raw=raw)
        assert status == 400
        assert message in body["error"]
        # The daemon is still up and still delivers.
        assert (await post_ingest(app, event(9)))[0] == 202
        got = await receiver.wait_for(1)
        await wait_idle(app)
    assert [r.json()["data"] for r in receiver.requests] == [{"n": 9}]
    assert got[0].json()["event"] == "messages.upsert"


async def test_api_key_is_required(receiver, make_settings):
    async with running(make_settings(**hook_env(receiver, "MESSAGES_UPSERT", "CONNECTION_UPDATE"))) as app:
        status, body = await post_ingest(app, event(1), apikey=None)
        assert status == 401 and body["error"].startswith("missing apikey: send an apikey header")
        status, body = await post_ingest(app, event(1), apikey="wrong")
        assert (status, body["error"]) == (401, "invalid apikey")
        assert (await post_ingest(app, event(2), apikey=API_KEY))[0] == 202
        got = await receiver.wait_for(1)
        await wait_idle(app)
    assert [r.json()["data"]["n"] for r in got] == [2]


async def test_oversize_body_is_413(receiver, make_settings):
    async with running(
        make_settings(
            **hook_env(receiver, "MESSAGES_UPSERT", "CONNECTION_UPDATE"), ROUTER_INGEST_MAX_BYTES="2000"
        )
    ) as app:
        big = {"event": "messages.upsert", "instance": "bot", "data": {"blob": "x" * 5000}}
        status, body = await post_ingest(app, big)
        assert status == 413 and "2000" in body["error"]
        assert (await post_ingest(app, event(1)))[0] == 202
        await receiver.wait_for(1)


async def test_an_id_sent_again_is_delivered_once(receiver, make_settings):
    async with running(make_settings(**hook_env(receiver, "MESSAGES_UPSERT", "CONNECTION_UPDATE"))) as app:
        payload = {**event(1), "id": "adapter-retry-1"}
        assert (await post_ingest(app, [payload, payload]))[0] == 202  # twice in one batch
        # The adapter's retry gets its id back, as for the first send.
        assert (await post_ingest(app, payload)) == (
            202,
            {"status": 202, "accepted": 1, "ids": ["adapter-retry-1"]},
        )  # while still queued, or just sent
        await receiver.wait_for(1)
        await wait_idle(app)  # delivered and pruned: only the dedup window remembers it
        assert (await post_ingest(app, payload))[0] == 202  # the adapter retried late
        await wait_idle(app)
    assert len(receiver.requests) == 1


async def test_the_dedup_window_can_be_turned_off(receiver, make_settings):
    async with running(
        make_settings(**hook_env(receiver, "MESSAGES_UPSERT", "CONNECTION_UPDATE"), ROUTER_DEDUP_WINDOW_S="0")
    ) as app:
        payload = {**event(1), "id": "no-dedup"}
        assert (await post_ingest(app, payload))[0] == 202
        await receiver.wait_for(1)
        await wait_idle(app)
        assert (await post_ingest(app, payload))[0] == 202
        await receiver.wait_for(2)


@pytest.mark.usefixtures("backend")  # the checkpoint is exact on SQLite and on PostgreSQL
async def test_jsonl_file_is_followed_and_resumed_without_duplicates(receiver, make_settings, tmp_path):
    feed = tmp_path / "events.jsonl"
    feed.write_bytes(b"".join(orjson.dumps(event(n)) + b"\n" for n in range(3)))
    settings = make_settings(
        **hook_env(receiver, "MESSAGES_UPSERT", "CONNECTION_UPDATE"), ROUTER_JSONL_PATH=str(feed)
    )
    async with running(settings):
        await receiver.wait_for(3)
        with feed.open("ab") as f:  # the file grows while the daemon follows it
            f.write(orjson.dumps(event(3)) + b"\n")
            f.write(b"this line is not json\n")
            f.write(orjson.dumps(event(4)) + b"\n" + orjson.dumps(event(5))[:10])  # partial line
        await receiver.wait_for(5)
        with feed.open("ab") as f:
            f.write(orjson.dumps(event(5))[10:] + b"\n")
        await receiver.wait_for(6)
    # Restarted: it resumes after the last line it accepted; nothing is read twice.
    with feed.open("ab") as f:
        f.write(orjson.dumps(event(6)) + b"\n")
    async with running(settings) as app:
        await receiver.wait_for(7)
        await wait_idle(app)
    assert sorted(r.json()["data"]["n"] for r in receiver.requests) == list(range(7))


@pytest.mark.parametrize("kind", ["pipe", "file"])
async def test_jsonl_from_stdin(receiver, daemon, tmp_path, kind):
    proc = daemon(**hook_env(receiver, "MESSAGES_UPSERT", "CONNECTION_UPDATE"))
    lines = b"".join(orjson.dumps(event(n)) + b"\n" for n in range(20))
    feed = tmp_path / "stdin.jsonl"
    feed.write_bytes(lines)
    with feed.open("rb") as stdin:
        proc.start("--jsonl", "-", stdin=subprocess.PIPE if kind == "pipe" else stdin)
    assert proc.proc is not None
    if kind == "pipe":
        assert proc.proc.stdin is not None
        proc.proc.stdin.write(lines[: len(lines) // 2])
        proc.proc.stdin.flush()
        await receiver.wait_for(5, timeout=20)
        proc.proc.stdin.write(lines[len(lines) // 2 :])
        proc.proc.stdin.close()
    got = await receiver.wait_for(20, timeout=20)
    assert await proc.terminate() == 0
    assert sorted(r.json()["data"]["n"] for r in got) == list(range(20))


def connect_all(port: int, count: int, timeout_s: float) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections to ``port`` at once, without blocking (the caller's event loop
    stays busy, as a daemon's is in a burst): the sockets, and how many the kernel completed
    within ``timeout_s``. A server's listen queue holds the connections it has not accepted yet;
    once it is full, the kernel drops the clients' handshakes (they try again a second later)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    deadline = time.monotonic() + timeout_s
    waiting = set(sockets)
    while waiting and time.monotonic() < deadline:
        _, writable, _ = select.select([], list(waiting), [], max(0.0, deadline - time.monotonic()))
        waiting.difference_update(
            s for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        )
    return sockets, count - len(waiting)


async def test_a_burst_of_new_connections_waits_for_a_busy_daemon_instead_of_being_dropped(
    receiver, make_settings
):
    """Upstream posts each event as it happens, a connection per request under way. 500 arrive
    while the daemon's event loop is busy (here: held by this test, in the same loop): all are
    queued for it, none has to try again, and each gets its 202 once the daemon is back."""
    async with running(make_settings(**hook_env(receiver, "MESSAGES_UPSERT"))) as app:
        sockets, connected = connect_all(app.port, 500, timeout_s=0.5)  # the loop is held meanwhile
        try:
            assert connected == 500, f"{500 - connected} of 500 connections dropped by a full listen queue"

            async def post(n: int, sock: socket.socket) -> bytes:
                reader, writer = await asyncio.open_connection(sock=sock)
                body = orjson.dumps(event(n))
                writer.write(
                    b"POST /ingest HTTP/1.1\r\nHost: x\r\nConnection: close\r\napikey: "
                    + API_KEY.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                answer = await reader.read()
                writer.close()
                return answer.split(b"\r\n", 1)[0]

            statuses = await asyncio.gather(*(post(n, sock) for n, sock in enumerate(sockets)))
        finally:
            for sock in sockets:
                sock.close()
        assert statuses == [b"HTTP/1.1 202 Accepted"] * 500
        got = await receiver.wait_for(500)
    assert sorted(r.json()["data"]["n"] for r in got) == list(range(500))
