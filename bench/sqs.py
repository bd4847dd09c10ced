"""SQS: the local SQS server (moto) answers only a few dozen requests/s, so the rate says little;
what the daemon controls is how many requests a burst costs. A counting proxy in front of the
server counts every request the daemon makes, by API action: a burst to one queue, or spread
over a queue per instance (``BENCH_SQS_INSTANCES``)."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from aiobotocore.session import get_session
from aiohttp import web
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from bench.common import CONCURRENCY, daemon, ingest_all
from tests.conftest import free_port

SQS_EVENTS = int(os.environ.get("BENCH_SQS_EVENTS", "600"))


class CountingProxy:
    """Forwards every request to the SQS server and counts them by API action.

    The daemon is its own process, so the requests it makes are counted here, on the wire.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.actions: dict[str, int] = {}
        self.entries = 0
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        action = request.headers.get("X-Amz-Target", "").rpartition(".")[2] or "other"
        self.actions[action] = self.actions.get(action, 0) + 1
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=request.headers
        ) as answer:
            payload = await answer.read()
            if answer.status == 200 and action in ("SendMessageBatch", "SendMessage"):
                self.entries += len(orjson.loads(payload).get("Successful", [None]))
            framing = {"content-length", "transfer-encoding"}
            headers = {k: v for k, v in answer.headers.items() if k.lower() not in framing}
            return web.Response(status=answer.status, body=payload, headers=headers)


SQS_INSTANCES = int(os.environ.get("BENCH_SQS_INSTANCES", "20"))
SQS_ENV = {
    "SQS_ENABLED": "true",
    "SQS_ACCESS_KEY_ID": "bench",
    "SQS_SECRET_ACCESS_KEY": "bench",
    "SQS_ACCOUNT_ID": "123456789012",
    "SQS_REGION": "us-east-1",
    "ROUTER_QUEUE_CONCURRENCY": str(CONCURRENCY),
}


async def sqs_burst(server: str, instances: int) -> dict[str, object]:
    """SQS_EVENTS through the daemon: to the global queue (``instances`` 0), or spread over
    ``instances`` instances, each subscribing its own queue. Requests counted by action."""
    proxy = CountingProxy(server)
    prefix = f"bench{os.getpid()}n{instances}"
    names = [f"{prefix}i{n}" for n in range(instances)] or ["bench"]
    queues = (
        [f"{name}-messages-upsert.fifo" for name in names]
        if instances
        else [f"{prefix}-messages-upsert.fifo"]
    )
    env = {**SQS_ENV, "SQS_ENDPOINT_URL": await proxy.start()}
    if not instances:
        env.update(
            SQS_GLOBAL_ENABLED="true", SQS_GLOBAL_PREFIX_NAME=prefix, SQS_GLOBAL_MESSAGES_UPSERT="true"
        )
    try:
        with tempfile.TemporaryDirectory() as directory:
            for name in names if instances else []:
                Path(directory, f"{name}.yaml").write_text(
                    "sqs: {enabled: true, events: [MESSAGES_UPSERT]}\n"
                )
            async with (
                daemon(**env, ROUTER_INSTANCES_DIR=directory) as (port, _),
                aiohttp.ClientSession() as session,
            ):
                # The daemon checks SQS at start; count only what the burst costs.
                before = dict(proxy.actions)
                started = time.perf_counter()
                await ingest_all(
                    session, port, SQS_EVENTS, posters=1, instance_of=lambda n: names[n % len(names)]
                )
                deadline = time.monotonic() + 600
                while proxy.entries < SQS_EVENTS:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"only {proxy.entries} of {SQS_EVENTS} messages were sent")
                    await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - started
        stored = await stored_in(server, queues)
    finally:
        await proxy.stop()
    burst = {
        action: n - before.get(action, 0) for action, n in proxy.actions.items() if n > before.get(action, 0)
    }
    sends = burst.get("SendMessageBatch", 0) + burst.get("SendMessage", 0)
    return {
        "queues": len(queues),
        "events": SQS_EVENTS,
        "stored": stored,
        "requests": burst,
        "send_requests_per_message": sends / SQS_EVENTS,
        "all_requests_per_message": sum(burst.values()) / SQS_EVENTS,
        "events_per_s": SQS_EVENTS / elapsed,
    }


async def stored_in(server: str, queues: list[str]) -> int:
    """Messages in ``queues``, asked of the server directly."""
    total = 0
    async with get_session().create_client(
        "sqs",
        region_name="us-east-1",
        endpoint_url=server,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ) as client:
        for queue in queues:
            url = (await client.get_queue_url(QueueName=queue))["QueueUrl"]
            depth = "ApproximateNumberOfMessages"
            attributes = await client.get_queue_attributes(QueueUrl=url, AttributeNames=[depth])
            total += int(attributes["Attributes"][depth])
    return total


async def sqs_section() -> dict[str, object]:
    """A burst to one queue, and one spread over a queue per instance: requests per message."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, moto_port = server.get_host_and_port()
    try:
        runs = {
            "one queue": await sqs_burst(f"http://{host}:{moto_port}", 0),
            f"{SQS_INSTANCES} instances, a queue each": await sqs_burst(
                f"http://{host}:{moto_port}", SQS_INSTANCES
            ),
        }
    finally:
        server.stop()
    print(f"\nsqs, a burst of {SQS_EVENTS} events of ~1 KB to FIFO queues on a local SQS server (moto)")
    print(f"{'':<34}{'stored':>8}{'sends/msg':>11}{'all/msg':>9}{'events/s':>10}   requests")
    for name, run in runs.items():
        print(
            f"{name:<34}{run['stored']:>8}{run['send_requests_per_message']:>11.3f}"
            f"{run['all_requests_per_message']:>9.3f}{run['events_per_s']:>10.0f}   {run['requests']}"
        )
    print("(target: at most 0.15 send requests per message; events/s is bounded by the local server)")
    return {
        **runs["one queue"],
        "per_instance": runs[f"{SQS_INSTANCES} instances, a queue each"],
        "target": 0.15,
    }
