"""The SQS sink against a local SQS server (moto, started here), checked by an independent client."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiobotocore.session import get_session
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from router.app import database_path
from router.deadletters import dead_letters
from router.sinks.sqs import queue_name
from tests.conftest import free_port, post_ingest, run_router, running, write_instance

REGION = "us-east-1"


def wait_for_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def sqs_server() -> Iterator[ThreadedMotoServer]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    yield server
    server.stop()


def endpoint(server: ThreadedMotoServer) -> str:
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


@pytest.fixture
async def sqs_client(sqs_server: ThreadedMotoServer) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "sqs",
        region_name=REGION,
        endpoint_url=endpoint(sqs_server),
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ) as client:
        yield client


def sqs_env(server: ThreadedMotoServer, **extra: str) -> dict[str, str]:
    return {
        "SQS_ENABLED": "true",
        "SQS_ACCESS_KEY_ID": "test",
        "SQS_SECRET_ACCESS_KEY": "test",
        "SQS_ACCOUNT_ID": "123456789012",
        "SQS_REGION": REGION,
        "SQS_ENDPOINT_URL": endpoint(server),
        "ROUTER_QUEUE_RETRY_INITIAL_DELAY_S": "0.2",
        "ROUTER_QUEUE_RETRY_MAX_DELAY_S": "1",
        **extra,
    }


async def receive_all(client: Any, queue: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """Receive and delete ``count`` messages from ``queue`` (waiting for it to be created)."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                url = (await client.get_queue_url(QueueName=queue))["QueueUrl"]
                break
            except client.exceptions.QueueDoesNotExist:
                await asyncio.sleep(0.05)
        while len(got) < count:
            answer = await client.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                AttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
            )
            for message in answer.get("Messages", []):
                got.append(message)
                await client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return got


def upsert(instance: str, n: int, chat: str | None = None) -> dict[str, object]:
    data: dict[str, object] = {"n": n} if chat is None else {"n": n, "key": {"remoteJid": chat}}
    return {"event": "messages.upsert", "instance": instance, "data": data}


async def test_instance_queue_is_fifo_with_the_envelope(sqs_server, sqs_client, make_settings, tmp_path):
    instance = f"bot{uuid.uuid4().hex[:6]}"
    write_instance(tmp_path / "instances", instance, "sqs: {enabled: true, events: [MESSAGES_UPSERT]}\n")
    settings = make_settings(**sqs_env(sqs_server, SERVER_NAME="evo-1"))
    async with running(settings) as app:
        payloads = [
            {**upsert(instance, n, f"c{n % 5}"), "id": f"id-{n}", "date_time": "2023-12-01T10:30:00.000Z"}
            for n in range(25)
        ]
        assert (await post_ingest(app, payloads))[0] == 202
        got = await receive_all(sqs_client, f"{instance}-messages-upsert.fifo", 25)
        assert app.dispatcher is not None
        requests = app.dispatcher.sinks["sqs"].requests  # type: ignore[attr-defined]
    by_chat: dict[str, list[int]] = {}
    for message in got:
        data = orjson.loads(message["Body"])["data"]
        by_chat.setdefault(message["Attributes"]["MessageGroupId"], []).append(data["n"])
    # MessageGroupId is the conversation, and each conversation is in order.
    assert by_chat == {f"{instance}/c{k}": list(range(k, 25, 5)) for k in range(5)}
    first = next(m for m in got if m["Attributes"]["MessageDeduplicationId"] == "id-0")
    assert first["Body"] == (
        '{"event":"messages.upsert","instance":"' + instance + '","data":{"n":0,"key":{"remoteJid":"c0"}},'
        '"date_time":"2023-12-01T10:30:00.000Z","apikey":null,"dataType":"json","server":"evo-1","id":"id-0"}'
    )
    assert sorted(m["Attributes"]["MessageDeduplicationId"] for m in got) == sorted(
        f"id-{n}" for n in range(25)
    )
    assert requests < 25, f"sends are batched ({requests} requests for 25 messages)"


async def test_global_queues_and_the_single_queue(sqs_server, sqs_client, make_settings):
    prefix = f"g{uuid.uuid4().hex[:6]}"
    env = sqs_env(
        sqs_server,
        SQS_GLOBAL_ENABLED="true",
        SQS_GLOBAL_PREFIX_NAME=prefix,
        SQS_GLOBAL_MESSAGES_UPSERT="true",
        SQS_GLOBAL_CALL="true",
    )
    async with running(make_settings(**env)) as app:
        await post_ingest(app, [upsert("a", 1), {"event": "call", "instance": "b", "data": {}}])
        assert len(await receive_all(sqs_client, f"{prefix}-messages-upsert.fifo", 1)) == 1
        assert len(await receive_all(sqs_client, f"{prefix}-call.fifo", 1)) == 1
    async with running(make_settings(**env, SQS_GLOBAL_FORCE_SINGLE_QUEUE="true", SQS_FIFO="false")) as app:
        await post_ingest(app, [upsert("a", 2), {"event": "call", "instance": "b", "data": {}}])
        got = await receive_all(sqs_client, f"{prefix}-singlequeue", 2)
    assert sorted(orjson.loads(m["Body"])["event"] for m in got) == ["call", "messages.upsert"]


async def test_oversize_message_is_a_dead_letter_with_its_size(sqs_server, make_settings, tmp_path):
    write_instance(tmp_path / "instances", "big", "sqs: {enabled: true}\n")
    settings = make_settings(**sqs_env(sqs_server, SQS_MAX_PAYLOAD_SIZE="1000"))
    async with running(settings) as app:
        await post_ingest(app, {"event": "call", "instance": "big", "data": {"blob": "x" * 2000}})
        async with asyncio.timeout(10):
            while not dead_letters(database_path(settings)):
                await asyncio.sleep(0.05)
    [dead] = dead_letters(database_path(settings))
    assert "is over SQS_MAX_PAYLOAD_SIZE (1000 bytes)" in dead["last_error"]
    assert int(dead["last_error"].split("message of ")[1].split(" bytes")[0]) > 2000


async def test_server_stopped_mid_stream_every_event_arrives(sqs_server, sqs_client, make_settings, tmp_path):
    instance = f"bot{uuid.uuid4().hex[:6]}"
    write_instance(tmp_path / "instances", instance, "sqs: {enabled: true, events: [MESSAGES_UPSERT]}\n")
    async with running(make_settings(**sqs_env(sqs_server))) as app:
        assert (await post_ingest(app, [upsert(instance, n) for n in range(20)]))[0] == 202
        first = await receive_all(sqs_client, f"{instance}-messages-upsert.fifo", 20)
        await asyncio.to_thread(sqs_server.stop)
        try:
            assert (await post_ingest(app, [upsert(instance, n) for n in range(20, 60)]))[0] == 202
            async with asyncio.timeout(10):
                while (await app.intake.store.counts())["pending"] < 40:  # type: ignore[union-attr]
                    await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(sqs_server.start)
        rest = await receive_all(sqs_client, f"{instance}-messages-upsert.fifo", 40, timeout=60)
    numbers = [orjson.loads(m["Body"])["data"]["n"] for m in first + rest]
    assert sorted(set(numbers)) == list(range(60))
    assert len(numbers) == 60, "FIFO deduplication kept retried sends single"


def test_queue_names_are_made_legal_and_short_enough():
    assert queue_name("my instance!", "messages.upsert", fifo=True) == "my-instance--messages-upsert.fifo"
    assert queue_name("shop", "group-participants.update", fifo=False) == "shop-group-participants-update"
    long = queue_name("x" * 90, "messages.upsert", fifo=True)
    assert len(long) == 80 and long.endswith(".fifo")
    assert long != queue_name("x" * 91, "messages.upsert", fifo=True), "a hash keeps them apart"


def check_sqs(tmp_path: Path, endpoint_url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """``evolution-router check`` with SQS on, against ``endpoint_url``."""
    env = {
        "AUTHENTICATION_API_KEY": "k",
        "SQS_ENABLED": "true",
        "SQS_ACCESS_KEY_ID": "a",
        "SQS_SECRET_ACCESS_KEY": "b",
        "SQS_ACCOUNT_ID": "123456789012",
        "SQS_REGION": REGION,
        "SQS_ENDPOINT_URL": endpoint_url,
        "ROUTER_INSTANCES_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        **extra,
    }
    return run_router(env, "check")


def test_check_reports_an_unreachable_sqs(tmp_path):
    result = check_sqs(tmp_path, f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "sqs: SQS unreachable: Could not connect to the endpoint URL" in result.stderr


def test_check_reports_refused_credentials(tmp_path):
    """A server that checks signatures (moto with authentication on) refuses unknown keys."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        result = check_sqs(tmp_path, f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(10)
    assert result.returncode == 1
    assert "SQS refused the credentials" in result.stderr
    assert "InvalidClientTokenId" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("account", "expected"),
    [
        ("", "SQS_ACCOUNT_ID not set"),
        ("12345", "SQS_ACCOUNT_ID must be a 12-digit AWS account id, got '12345'"),
    ],
)
def test_a_missing_or_malformed_account_is_a_configuration_error(tmp_path, account, expected):
    result = check_sqs(tmp_path, "http://127.0.0.1:1", SQS_ACCOUNT_ID=account)
    assert result.returncode == 1
    assert expected in result.stderr, result.stderr
