"""Hostile and broken input: a clear 4xx naming what is wrong, never a 500, the daemon still up."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
import unicodedata
import zlib

import orjson
import pytest

from router.errors import ConfigError
from router.yamlfile import load_yaml
from tests.conftest import (
    API_KEY,
    ROOT,
    admin,
    hook_env,
    post_ingest,
    run_router,
    running,
    wait_idle,
    write_instance,
)


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes, bool]:
    """One HTTP/1.1 request written byte for byte; (status, body, whether the server closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    answer = await reader.readexactly(int(headers.get("content-length", "0")))
    closed = headers.get("connection", "").lower() == "close" or await _closed(reader)
    writer.close()
    return int(status_line.split()[1]), answer, closed


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.5) == b""
    except TimeoutError:
        return False  # still open, waiting for the next request


async def test_an_apikey_that_is_not_utf8_is_refused_not_a_500(make_settings):
    async with running(
        make_settings(WEBSOCKET_ENABLED="true", WEBSOCKET_GLOBAL_EVENTS="true", WEBSOCKET_ALLOWED_HOSTS="")
    ) as app:
        head = b"POST /ingest HTTP/1.1\r\nHost: x\r\napikey: \xff\xfe\xc3(\r\n"
        status, body, _ = await raw_request(app.port, head, b'{"event": "call", "instance": "a"}')
        assert (status, orjson.loads(body)["error"]) == (401, "invalid apikey")
        status, body, _ = await raw_request(
            app.port, b"GET /instance/fetchInstances HTTP/1.1\r\nHost: x\r\napikey: \xff\r\n"
        )
        assert status == 401 and orjson.loads(body)["response"]["message"] == "Unauthorized"
        # WebSocket: refused with a close frame (1008) saying why, not a dropped connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        writer.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"apikey: \xff\xfe\r\n\r\n"
        )
        assert (await asyncio.wait_for(reader.readline(), 5)).split()[1] == b"101"
        while await reader.readline() != b"\r\n":
            pass
        frame = await asyncio.wait_for(reader.read(64), 5)
        writer.close()
        assert frame[0] == 0x88 and int.from_bytes(frame[2:4], "big") == 1008, frame
        assert b"invalid apikey" in frame
        assert (await post_ingest(app, {"event": "call", "instance": "a"}))[0] == 202


async def test_compressed_bodies_corrupt_or_bombs_are_4xx(receiver, make_settings):
    settings = make_settings(**hook_env(receiver, "CALL"), ROUTER_INGEST_MAX_BYTES="1000000")
    call = orjson.dumps({"event": "call", "instance": "a", "data": {}})
    async with running(settings) as app:
        for encoding in ("gzip", "deflate"):
            head = (
                f"POST /ingest HTTP/1.1\r\nHost: x\r\napikey: {API_KEY}\r\nContent-Encoding: {encoding}\r\n"
            ).encode()
            status, body, _ = await raw_request(app.port, head, b"this is not compressed at all")
            assert status == 400 and f"body is not a valid {encoding} stream" in orjson.loads(body)["error"]
            head_admin = head.replace(b"POST /ingest", b"POST /instance/create")
            status, body, _ = await raw_request(app.port, head_admin, b"\x1f\x8b broken")
            assert status == 400, body
        # 50 MB of zeros in a 50 KB gzip body: the limit counts what it unpacks to.
        bomb = gzip.compress(b"0" * 50_000_000)
        head = f"POST /ingest HTTP/1.1\r\nHost: x\r\napikey: {API_KEY}\r\nContent-Encoding: gzip\r\n".encode()
        status, body, closed = await raw_request(app.port, head, bomb)
        assert (status, orjson.loads(body)["error"]) == (
            413,
            "body is over the limit of 1000000 bytes (decompressed)",
        )
        # Without a key, the bomb is not unpacked at all: 401, and the connection is closed after it.
        status, body, closed = await raw_request(app.port, head.replace(API_KEY.encode(), b"wrong"), bomb)
        assert (status, closed) == (401, True)
        gz_call = f"POST /ingest HTTP/1.1\r\nHost: x\r\napikey: {API_KEY}\r\nContent-Encoding: deflate\r\n"
        status, _, _ = await raw_request(app.port, gz_call.encode(), zlib.compress(call))
        assert status == 202
        await receiver.wait_for(1, "/hook")


async def test_date_times_out_of_range_and_deep_data_are_400(receiver, make_settings):
    async with running(make_settings(**hook_env(receiver, "CALL"))) as app:
        for moment in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
            status, body = await post_ingest(app, {"event": "call", "instance": "a", "date_time": moment})
            assert status == 400 and f"field 'date_time' is not an ISO-8601 time: {moment!r}" in body["error"]
        deep = b'{"x":' * 300 + b"{}" + b"}" * 300  # more than orjson writes back
        raw = b'{"event": "call", "instance": "a", "data": ' + deep + b"}"
        status, body = await post_ingest(app, None, raw=raw)
        assert (status, body["error"]) == (400, "field 'data' is nested deeper than 254 levels")
        old = {"event": "call", "instance": "a", "date_time": "0999-06-01T12:00:00Z", "data": {"n": 1}}
        assert (await post_ingest(app, old))[0] == 202
        [got] = await receiver.wait_for(1, "/hook")
    assert got.json()["date_time"] == "0999-06-01T12:00:00.000Z"


async def test_a_jsonl_line_with_a_bad_date_time_is_skipped(receiver, make_settings, tmp_path, capsys):
    feed = tmp_path / "events.jsonl"
    lines = [
        {"event": "call", "instance": "a", "data": {"n": 1}},
        {"event": "call", "instance": "a", "date_time": "0001-01-01T00:00:00+01:00", "data": {"n": 2}},
        {"event": "call", "instance": "a", "data": {"n": 3}},
    ]
    feed.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    async with running(make_settings(**hook_env(receiver, "CALL"), ROUTER_JSONL_PATH=str(feed))) as app:
        got = await receiver.wait_for(2, "/hook")
        await wait_idle(app)
    assert [r.json()["data"]["n"] for r in got] == [1, 3]
    logged = capsys.readouterr().out
    assert "jsonl.bad_line" in logged and "line=2" in logged and "jsonl.failed" not in logged


async def test_admin_names_and_values_the_file_system_cannot_take_are_400(make_settings, tmp_path):
    async with running(make_settings()) as app:
        status, answer = await admin(app, "POST", "/instance/create", {"instanceName": "漢" * 84})
        assert status == 400
        assert answer["response"]["message"] == [
            "instanceName: must be 1-100 characters and at most 200 bytes of UTF-8 (this one: 84 characters,"
            " 252 bytes)"
        ]
        deep = b"[" * 330 + b'"x"' + b"]" * 330
        raw = b'{"instanceName": "d", "chatwootLogo": ' + deep + b"}"
        status, answer = await admin(app, "POST", "/instance/create", raw=raw)
        assert (status, answer["response"]["message"]) == (400, ["the body is nested deeper than 32 levels"])
        assert (await admin(app, "POST", "/instance/create", {"instanceName": "ok"}))[0] == 201
    assert sorted(p.name for p in (tmp_path / "instances").iterdir()) == ["ok.yaml"]


async def test_confusable_instance_names_are_refused_or_made_one(receiver, make_settings, tmp_path):
    async with running(make_settings()) as app:
        assert (await admin(app, "POST", "/instance/create", {"instanceName": "CaseTest"}))[0] == 201
        status, answer = await admin(app, "POST", "/instance/create", {"instanceName": "casetest"})
        assert status == 403 and "CaseTest" in answer["response"]["message"][0]
        for name, why in (
            ("\u202eevil", "must not contain control or format characters (U+202E)"),
            ("\ufeffbom", "must not contain control or format characters (U+FEFF)"),
            (" ", "must not start or end with white space"),
            ("tab\tname", "must not contain control or format characters (U+0009)"),
        ):
            status, answer = await admin(app, "POST", "/instance/create", {"instanceName": name})
            assert (status, answer["response"]["message"]) == (400, [f"instanceName: {why}"]), name
        # café typed with a combining accent is the same instance as café typed with é.
        nfd = unicodedata.normalize("NFD", "café")
        hook = {"url": f"{receiver.url}/cafe", "events": ["CALL"]}
        status, answer = await admin(app, "POST", "/instance/create", {"instanceName": nfd, "webhook": hook})
        assert status == 201 and answer["instance"]["instanceName"] == "café"
        status, _ = await admin(app, "POST", "/instance/create", {"instanceName": "café"})
        assert status == 403
        assert (await post_ingest(app, {"event": "call", "instance": nfd, "data": {}}))[0] == 202
        [got] = await receiver.wait_for(1, "/cafe")
    assert got.json()["instance"] == "café"
    assert sorted(p.name for p in (tmp_path / "instances").iterdir()) == ["CaseTest.yaml", "café.yaml"]


async def test_headers_with_line_breaks_are_refused_and_impossible_requests_are_dead_letters(
    receiver, make_settings, tmp_path
):
    async with running(make_settings(WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05")) as app:
        assert (await admin(app, "POST", "/instance/create", {"instanceName": "h"}))[0] == 201
        bad = {"webhook": {"enabled": True, "url": f"{receiver.url}/h", "headers": {"X-A": "1\r\nX-B: 2"}}}
        status, answer = await admin(app, "POST", "/webhook/set/h", bad)
        assert (status, answer["response"]["message"]) == (
            400,
            ["webhook.headers: header 'X-A': its value must not contain CR, LF or NUL"],
        )
        # Credentials in the URL and an Authorization header: no HTTP client can send both.
        port = receiver.url.rsplit(":", 1)[1]
        both = {
            "webhook": {
                "enabled": True,
                "url": f"http://user:pw@127.0.0.1:{port}/h",
                "headers": {"Authorization": "Bearer t"},
                "events": ["CALL"],
            }
        }
        assert (await admin(app, "POST", "/webhook/set/h", both))[0] == 201
        assert (await post_ingest(app, {"event": "call", "instance": "h", "data": {}}))[0] == 202
        await wait_idle(app)
        assert (await app.store.counts())["dead"] == 1  # type: ignore[union-attr]
    assert receiver.requests == []


async def test_by_events_suffix_goes_on_the_path_not_into_the_query(receiver, make_settings, tmp_path):
    write_instance(
        tmp_path / "instances",
        "q",
        f"webhook: {{enabled: true, url: '{receiver.url}/dead?token=T', byEvents: true, events: [CALL]}}\n",
    )
    async with running(make_settings()) as app:
        assert (await post_ingest(app, {"event": "call", "instance": "q", "data": {}}))[0] == 202
        [got] = await receiver.wait_for(1)
    assert got.path == "/dead/call"
    assert got.json()["destination"] == f"{receiver.url}/dead?token=T"


def _nested_file(levels: int) -> str:
    return "webhook: " + "{a: " * levels + "1" + "}" * levels + "\n"


ALIAS_BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + n)}: &{chr(98 + n)} [{', '.join(['*' + chr(97 + n)] * 10)}]" for n in range(7)]
    + ["webhook: {enabled: false}", ""]
)


async def test_a_hostile_instance_file_is_one_bad_file(receiver, make_settings, tmp_path):
    instances = tmp_path / "instances"
    write_instance(
        instances, "good", f"webhook: {{enabled: true, url: '{receiver.url}/good', events: [CALL]}}\n"
    )
    async with running(make_settings()) as app:
        write_instance(instances, "deep", _nested_file(600))  # saved while the daemon runs
        write_instance(instances, "bomb", ALIAS_BOMB)
        await app.reload()
        assert set(app.instances) == {"good"}
        assert (await post_ingest(app, {"event": "call", "instance": "good", "data": {}}))[0] == 202
        await receiver.wait_for(1, "/good")
    env = {
        "AUTHENTICATION_API_KEY": API_KEY,
        "ROUTER_INSTANCES_DIR": str(instances),
        "ROUTER_STATE_DIR": str(tmp_path / "state"),
        "PATH": "/usr/bin:/bin",
    }
    done = run_router(env, "check", timeout=30)
    assert done.returncode == 1
    assert f"{instances / 'deep.yaml'}:1: nested deeper than 50 levels" in done.stderr
    assert f"{instances / 'bomb.yaml'}:" in done.stderr and "once aliases are expanded" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_error_handling_request_lines_carry_the_traceback():
    """aiohttp logs a failed request through logging; the line must say what failed."""
    script = (
        "import logging; from router import logs\n"
        "logs.configure(['ERROR'], 'json')\n"
        "try:\n    {}['missing']\n"
        "except KeyError:\n    logging.getLogger('aiohttp.server').exception('Error handling request')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    [line] = [orjson.loads(text) for text in done.stderr.splitlines()]
    assert line["msg"] == "Error handling request" and "KeyError: 'missing'" in line["exception"]


@pytest.mark.parametrize(
    "text",
    [
        "webhook:\n" + "- " * 60 + "x\n",  # compact sequences: sixty levels on one line
        "webhook: " + "[" * 60 + "]" * 60 + "\n",
        "".join("  " * depth + f"k{depth}:\n" for depth in range(60)) + "  " * 60 + "v\n",
    ],
)
def test_every_way_of_nesting_deep_is_refused_before_it_is_built(tmp_path, text):
    """Small files are read in one pass when their characters show they cannot be too deep;
    whatever notation nests them, a file past the bound is refused with its line."""
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"deep\.yaml:\d+: nested deeper than 50 levels"):
        load_yaml(path)
