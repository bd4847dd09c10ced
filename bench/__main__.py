"""Run with `make bench`. Prints a table and writes bench/results/latest.json.

(a) bare: one aiohttp client posts N 1 KB envelopes to the receiver, CONCURRENCY at a time,
    on the same event loop as the daemon (uvloop).
(b) router: the daemon (its own process, durable SQLite queue on) takes the same events in
    through POST /ingest in batches and delivers them to the same receiver with the same
    concurrency. Its rate is measured from the first POST to the last event received.
Both use the same receiver process, in the same run, on this machine.

rabbitmq: the same pairing, a bare aiormq publisher with confirms against the daemon, both
    publishing to a quorum queue on the local broker (``bench/rabbitmq.py``).
rabbitmq_instances: the same events spread over a quorum queue per instance
    (BENCH_RABBITMQ_INSTANCES, 200), the queues existing or new, against one queue.
sqs: requests per message of a burst, to one queue and over a queue per instance
    (``bench/sqs.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import nats
import orjson
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    API_KEY,
    BATCH,
    CHATS,
    CONCURRENCY,
    N_EVENTS,
    RESULTS,
    ROUNDS,
    Paired,
    broker_section,
    burst_rate,
    cpu_s,
    daemon,
    ingest_all,
    make_event,
    median_run,
    percentile,
    rate_and_latency,
    router_burst,
    stats,
    timed_burst,
    timed_publishers,
    wait_count,
    wait_http,
)
from bench.rabbitmq import rabbitmq_instances_section, rabbitmq_section
from bench.sqs import sqs_section
from router.sinks.webhook.http import HttpClient
from tests.conftest import free_port
from tests.pusher_server import PusherServer


async def bench_bare(base: str, receiver_pid: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        await session.post(f"{base}/reset")
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(N_EVENTS):
            queue.put_nowait(n)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as client:

            async def worker() -> None:
                while not queue.empty():
                    n = queue.get_nowait()
                    body = orjson.dumps({**make_event(n, time.time()), "date_time": "", "id": str(n)})
                    async with client.post(
                        f"{base}/hook", data=body, headers={"Content-Type": "application/json"}
                    ) as response:
                        await response.read()

            rcpu0 = cpu_s(receiver_pid)
            elapsed, cpu = await timed_publishers(worker)
            rcpu = cpu_s(receiver_pid) - rcpu0
        result = await stats(session, base)
    return {
        **rate_and_latency(N_EVENTS, elapsed, result),
        "cpu_us_per_event": cpu / N_EVENTS * 1e6,
        "receiver_cpu_us_per_event": rcpu / N_EVENTS * 1e6,
    }


def hook_env(base: str, **extra: str) -> dict[str, str]:
    """The daemon's settings for a global webhook at the benchmark receiver."""
    return {
        "WEBHOOK_GLOBAL_ENABLED": "true",
        "WEBHOOK_GLOBAL_URL": f"{base}/hook",
        "WEBHOOK_EVENTS_MESSAGES_UPSERT": "true",
        "ROUTER_WEBHOOK_CONCURRENCY": str(CONCURRENCY),
        **extra,
    }


async def bench_router(base: str, receiver_pid: int) -> dict[str, float]:
    hook = hook_env(base)
    async with daemon(**hook) as (port, pid), aiohttp.ClientSession() as session:
        await session.post(f"{base}/reset")
        cpu0, rcpu0 = cpu_s(pid), cpu_s(receiver_pid)
        started = time.perf_counter()
        await ingest_all(session, port, N_EVENTS)
        ingest_done = time.perf_counter() - started
        await wait_count(session, base, N_EVENTS)
        elapsed = time.perf_counter() - started
        cpu, rcpu = cpu_s(pid) - cpu0, cpu_s(receiver_pid) - rcpu0
        result = await stats(session, base)
    return {
        **rate_and_latency(N_EVENTS, elapsed, result),
        "ingest_events_per_s": N_EVENTS / ingest_done,
        "cpu_us_per_event": cpu / N_EVENTS * 1e6,
        "receiver_cpu_us_per_event": rcpu / N_EVENTS * 1e6,
    }


NATS_URI = os.environ.get("BENCH_NATS_URI", "nats://127.0.0.1:4222")


async def nats_counter(subject: str) -> tuple[object, asyncio.Event, list[int]]:
    """A core subscriber counting what reaches ``subject``; set fires at N_EVENTS."""
    client = await nats.connect(NATS_URI)
    done, seen = asyncio.Event(), [0]

    async def count(_: object) -> None:
        seen[0] += 1
        if seen[0] >= N_EVENTS:
            done.set()

    await client.subscribe(subject, cb=count)
    await client.flush()
    return client, done, seen


async def bench_nats_bare(tag: str) -> dict[str, float]:
    """nats-py with the router's acknowledgement (publish, then flush: the server's answer),
    CONCURRENCY publishes in flight, the same 1 KB envelopes with the same header."""
    subject = f"bench{tag}.messages.upsert"
    counter, done, _ = await nats_counter(subject)
    client = await nats.connect(NATS_URI)
    try:
        next_n = iter(range(N_EVENTS))

        async def worker() -> None:
            for n in next_n:
                body = orjson.dumps({**make_event(n, time.time()), "id": str(n)})
                await client.publish(subject, body, headers={"Nats-Msg-Id": str(n)})
                await client.flush()

        elapsed, cpu = await timed_publishers(worker)
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await client.close()
        await counter.close()  # type: ignore[attr-defined]
    return burst_rate(elapsed, cpu)


async def bench_nats_router(tag: str) -> dict[str, float]:
    counter, done, _ = await nats_counter(f"bench{tag}.messages.upsert")
    env = {
        "NATS_ENABLED": "true",
        "NATS_URI": NATS_URI,
        "NATS_GLOBAL_ENABLED": "true",
        "NATS_PREFIX_KEY": f"bench{tag}",
        "NATS_EVENTS_MESSAGES_UPSERT": "true",
        "ROUTER_QUEUE_CONCURRENCY": str(CONCURRENCY),
    }
    try:
        return await router_burst(env, done.wait())
    finally:
        await counter.close()  # type: ignore[attr-defined]


async def nats_section() -> dict[str, object]:
    return await broker_section(
        f"nats, {N_EVENTS} events of ~1 KB, each acknowledged by the server, concurrency {CONCURRENCY}",
        ("bare nats-py publisher (publish + flush)", bench_nats_bare),
        ("router: /ingest -> SQLite -> NATS", bench_nats_router),
        target=0.6,
    )


async def webhook_section() -> dict[str, object]:
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "bench.receiver", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{base}/count")
        bare_runs, router_runs = [], []
        for _ in range(ROUNDS):
            bare_runs.append(await bench_bare(base, receiver.pid))
            router_runs.append(await bench_router(base, receiver.pid))
    finally:
        receiver.terminate()
        receiver.wait(10)
    paired = Paired(bare_runs, router_runs)
    print(
        f"\nwebhook, {N_EVENTS} events of ~1 KB, concurrency {CONCURRENCY}, {os.cpu_count()} cores,"
        f" median of {ROUNDS} alternating rounds"
    )
    print(f"{'path':<40} {'events/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'CPU us/event':>13}")
    for name, row in (
        ("bare aiohttp client -> receiver", paired.bare),
        ("router: /ingest -> SQLite -> webhook", paired.router),
    ):
        print(
            f"{name:<40} {row['events_per_s']:>10.0f} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f}"
            f" {row['cpu_us_per_event']:>13.0f}"
        )
    print(f"{'router intake alone (events/s)':<40} {paired.router['ingest_events_per_s']:>10.0f}")
    return paired.report(target=0.8)


WS_CLIENTS = int(os.environ.get("BENCH_WS_CLIENTS", "1000"))
WS_EVENTS = int(os.environ.get("BENCH_WS_EVENTS", "200"))


async def websocket_section() -> dict[str, object]:
    """WS_EVENTS events broadcast by the daemon to WS_CLIENTS clients of the global stream."""
    received = 0
    everyone = WS_CLIENTS * WS_EVENTS
    all_in = asyncio.Event()

    async def listen(ws: aiohttp.ClientWebSocketResponse) -> None:
        nonlocal received
        async for _ in ws:
            received += 1
            if received == everyone:
                all_in.set()

    env = {
        "WEBSOCKET_ENABLED": "true",
        "WEBSOCKET_GLOBAL_EVENTS": "true",
        "ROUTER_WEBSOCKET_BUFFER": "100000",
    }
    async with daemon(**env) as (port, pid):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            sockets = []
            for start in range(0, WS_CLIENTS, 100):  # connect in waves, not all at once
                sockets += await asyncio.gather(
                    *(
                        session.ws_connect(f"http://127.0.0.1:{port}/", max_msg_size=0)
                        for _ in range(start, min(start + 100, WS_CLIENTS))
                    )
                )
            listeners = [asyncio.create_task(listen(ws)) for ws in sockets]
            cpu0 = cpu_s(pid)
            started = time.perf_counter()
            await ingest_all(session, port, WS_EVENTS, posters=1)
            await asyncio.wait_for(all_in.wait(), 300)
            elapsed = time.perf_counter() - started
            cpu = cpu_s(pid) - cpu0
            for ws in sockets:
                await ws.close()
            await asyncio.gather(*listeners, return_exceptions=True)
    row = {
        "clients": WS_CLIENTS,
        "events": WS_EVENTS,
        "events_per_s": WS_EVENTS / elapsed,
        "messages_per_s": everyone / elapsed,
        "daemon_cpu_us_per_message": cpu / everyone * 1e6,
    }
    print(f"\nwebsocket, {WS_EVENTS} events of ~1 KB broadcast to {WS_CLIENTS} clients of ws://host/")
    print(f"{'events/s broadcast':<40} {row['events_per_s']:>10.0f}")
    print(f"{'messages/s delivered':<40} {row['messages_per_s']:>10.0f}")
    print(f"{'daemon CPU us/message':<40} {row['daemon_cpu_us_per_message']:>10.1f}")
    print("(the clients run in this one bench process; its own receive loop is part of the limit)")
    return row


PUSHER_EVENTS = int(os.environ.get("BENCH_PUSHER_EVENTS", "5000"))


async def pusher_section() -> dict[str, object]:
    """PUSHER_EVENTS events through the daemon to a local Pusher-protocol server that checks
    every signature (the test suite's), counting events and requests."""
    server = PusherServer()
    server.add_app("1", "bench-key", "bench-secret")
    await server.start()
    env = {
        "PUSHER_ENABLED": "true",
        "PUSHER_GLOBAL_ENABLED": "true",
        "PUSHER_GLOBAL_APP_ID": "1",
        "PUSHER_GLOBAL_KEY": "bench-key",
        "PUSHER_GLOBAL_SECRET": "bench-secret",
        "PUSHER_GLOBAL_USE_TLS": "false",
        "PUSHER_HOST": "127.0.0.1",
        "PUSHER_PORT": str(server.port),
        "PUSHER_EVENTS_MESSAGES_UPSERT": "true",
        "ROUTER_QUEUE_CONCURRENCY": str(CONCURRENCY),
    }
    try:
        async with daemon(**env) as (port, pid), aiohttp.ClientSession() as session:
            arrived = server.wait_for(PUSHER_EVENTS, timeout=300)
            elapsed, cpu = await timed_burst(session, port, pid, PUSHER_EVENTS, arrived)
    finally:
        await server.stop()
    assert not server.refused, server.refused
    row = {
        "events": PUSHER_EVENTS,
        "events_per_s": PUSHER_EVENTS / elapsed,
        "requests": len(server.requests),
        "requests_per_event": len(server.requests) / PUSHER_EVENTS,
        "daemon_cpu_us_per_event": cpu / PUSHER_EVENTS * 1e6,
    }
    print(f"\npusher, {PUSHER_EVENTS} events of ~1 KB to a local Pusher-protocol server (signatures checked)")
    print(f"{'events/s':<40} {row['events_per_s']:>10.0f}")
    print(f"{'requests per event (batch_events)':<40} {row['requests_per_event']:>10.3f}")
    print(f"{'daemon CPU us/event':<40} {row['daemon_cpu_us_per_event']:>10.0f}")
    return row


SCALE_INSTANCES = [int(n) for n in os.environ.get("BENCH_SCALE_INSTANCES", "1,1000,10000").split(",")]
SCALE_EVENTS = int(os.environ.get("BENCH_SCALE_EVENTS", "10000"))
SCALE_ROUNDS = int(os.environ.get("BENCH_SCALE_ROUNDS", "3"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def scale_run(instances: int, base: str) -> dict[str, float]:
    """``instances`` instance files, each with its own webhook; SCALE_EVENTS spread over them."""
    with tempfile.TemporaryDirectory() as directory:
        for n in range(instances):
            Path(directory, f"i{n}.yaml").write_text(f"webhook: {{enabled: true, url: '{base}/hook'}}\n")
        started = time.perf_counter()
        env = {"ROUTER_INSTANCES_DIR": directory, "ROUTER_WEBHOOK_CONCURRENCY": str(CONCURRENCY)}
        async with daemon(**env) as (port, pid), aiohttp.ClientSession() as session:
            listening_s = time.perf_counter() - started
            await session.post(f"{base}/reset")
            began = time.perf_counter()
            await ingest_all(
                session, port, SCALE_EVENTS, posters=1, instance_of=lambda n: f"i{n % instances}"
            )
            await wait_count(session, base, SCALE_EVENTS)
            elapsed = time.perf_counter() - began
            rss = rss_mib(pid)
            # One file of them edited: how long the reload takes, in all and on the event loop.
            Path(directory, "i0.yaml").write_text(f"webhook: {{enabled: true, url: '{base}/hook?v=2'}}\n")
            reload_s, reload_loop_s = await reloaded(session, port)
    return {
        "instances": instances,
        "listening_s": listening_s,
        "events_per_s": SCALE_EVENTS / elapsed,
        "rss_mib": rss,
        "reload_s": reload_s,
        "reload_loop_ms": reload_loop_s * 1000,
    }


async def reloaded(session: aiohttp.ClientSession, port: int, timeout_s: float = 120) -> tuple[float, float]:
    """Wait for the daemon's first reload: (its seconds in all, its seconds on the event loop)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as answer:
            found = {
                sample.name + str(sample.labels.get("part", "")): sample.value
                for family in text_string_to_metric_families(await answer.text())
                for sample in family.samples
            }
        if found.get("router_reloads_total", 0) >= 1:
            return found["router_last_reload_secondstotal"], found["router_last_reload_secondsloop"]
        await asyncio.sleep(0.1)
    raise TimeoutError("no reload")


async def scale_section() -> dict[str, object]:
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "bench.receiver", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    runs: dict[int, list[dict[str, float]]] = {instances: [] for instances in SCALE_INSTANCES}
    try:
        await wait_http(f"{base}/count")
        for _ in range(SCALE_ROUNDS):
            for instances in SCALE_INSTANCES:
                runs[instances].append(await scale_run(instances, base))
    finally:
        receiver.terminate()
        receiver.wait(10)
    rows = [median_run(found) for found in runs.values()]
    few, most = runs[SCALE_INSTANCES[0]], runs[SCALE_INSTANCES[-1]]
    ratios = [b["events_per_s"] / a["events_per_s"] for a, b in zip(few, most, strict=True)]
    print(
        f"\nscale, {SCALE_EVENTS} events of ~1 KB in batches of {BATCH},"
        f" spread over N instances, a webhook each, median of {SCALE_ROUNDS} rounds"
    )
    print(
        f"{'instances':>10} {'listening after s':>18} {'delivered events/s':>19} {'RSS MiB':>9}"
        f" {'reload s':>9} {'on loop ms':>11}"
    )
    for row in rows:
        print(
            f"{row['instances']:>10.0f} {row['listening_s']:>18.1f} {row['events_per_s']:>19.0f}"
            f" {row['rss_mib']:>9.0f} {row['reload_s']:>9.2f} {row['reload_loop_ms']:>11.1f}"
        )
    flat = statistics.median(ratios)
    print(f"{'rate at the most instances / at one (paired)':<49} {flat:>9.2f}   (target >= 0.80)")
    print(f"{'ratio in each round':<40} {', '.join(f'{r:.2f}' for r in ratios)}")
    return {
        "runs": rows,
        "rounds": {str(n): found for n, found in runs.items()},
        "flatness": flat,
        "ratios": ratios,
    }


ORDER_EVENTS = int(os.environ.get("BENCH_ORDER_EVENTS", "5000"))


async def ordering_run(base: str, ordering: str, chats: int) -> dict[str, float]:
    """ORDER_EVENTS to one webhook under ``ROUTER_WEBHOOK_ORDERING=ordering``, over ``chats``."""
    hook = hook_env(base, ROUTER_WEBHOOK_ORDERING=ordering)
    async with daemon(**hook) as (port, _), aiohttp.ClientSession() as session:
        await session.post(f"{base}/reset")
        started = time.perf_counter()
        await ingest_all(session, port, ORDER_EVENTS, chats=chats)
        await wait_count(session, base, ORDER_EVENTS)
        elapsed = time.perf_counter() - started
        result = await stats(session, base)
    return rate_and_latency(ORDER_EVENTS, elapsed, result)


async def ordering_section() -> dict[str, object]:
    """Ordering none / per chat / per instance side by side, rounds alternating."""
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "bench.receiver", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    cases = [
        ("none", CHATS, f"none, {CHATS} chats"),
        ("chat", CHATS, f"chat, {CHATS} chats"),
        ("instance", CHATS, f"instance, {CHATS} chats (one instance)"),
        ("chat", 1, "chat, all in one chat"),
    ]
    runs: dict[str, list[dict[str, float]]] = {label: [] for *_, label in cases}
    try:
        await wait_http(f"{base}/count")
        for _ in range(ROUNDS):
            for ordering, chats, label in cases:
                runs[label].append(await ordering_run(base, ordering, chats))
    finally:
        receiver.terminate()
        receiver.wait(10)
    rows = {label: median_run(found) for label, found in runs.items()}
    print(
        f"\nordering, {ORDER_EVENTS} events of ~1 KB to one webhook,"
        f" concurrency {CONCURRENCY}, median of {ROUNDS}"
    )
    print(f"{'ROUTER_WEBHOOK_ORDERING':<40} {'events/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for label, row in rows.items():
        print(f"{label:<40} {row['events_per_s']:>10.0f} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f}")
    ratios = [
        b["events_per_s"] / a["events_per_s"]
        for a, b in zip(runs[cases[0][2]], runs[cases[1][2]], strict=True)
    ]
    ratio = statistics.median(ratios)
    print(f"{'chat / none over many chats (paired median)':<49} {ratio:>9.2f}   (target >= 0.90)")
    return {"runs": rows, "chat_over_none": ratio}


LATENCY_RATES = [int(r) for r in os.environ.get("BENCH_LATENCY_RATES", "1000,2000").split(",")]
LATENCY_SECONDS = float(os.environ.get("BENCH_LATENCY_SECONDS", "5"))


LATENCY_GENERATOR = os.environ.get("BENCH_LATENCY_GENERATOR", "lean")  # or "aiohttp"


def machine_ticks() -> tuple[int, int]:
    """(all CPU ticks, ticks stolen by the hypervisor) of this machine so far, from /proc/stat."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7]


async def latency_run(base: str, port: int, rate: int, pid: int) -> dict[str, float]:
    """Single-event requests at ``rate`` per second (open loop) for LATENCY_SECONDS: the time
    from each 202 to the event's arrival at the receiver.

    The generator shares the machine's two cores with the daemon and the receiver, so it should
    cost little: by default it posts with the router's own lean HTTP/1.1 client (one kept-alive
    connection per request under way); ``BENCH_LATENCY_GENERATOR=aiohttp`` posts with aiohttp's
    client, which costs several times its CPU per request.

    With the latencies: the daemon's CPU per request (all its threads), and the share of the
    machine's CPU time the hypervisor took (steal): a slow phase of the machine shows in both."""
    total = int(rate * LATENCY_SECONDS)
    answered: dict[str, float] = {}
    url, headers = f"http://127.0.0.1:{port}/ingest", {"apikey": API_KEY, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=512)
    lean = HttpClient()
    async with aiohttp.ClientSession(connector=connector) as session:
        await session.post(f"{base}/reset")

        async def post(n: int) -> None:
            body = orjson.dumps(make_event(n, time.time()))
            if LATENCY_GENERATOR == "aiohttp":
                async with session.post(url, data=body, headers=headers) as r:
                    assert r.status == 202, await r.text()
            else:
                answer = await lean.post(url, body, headers, 60)
                assert answer.status == 202, answer
            answered[f"BENCH{n:012d}"] = time.time()

        tasks, late = [], 0
        cpu0, ticks0 = cpu_s(pid), machine_ticks()
        started = time.perf_counter()
        try:
            for n in range(total):
                delay = started + n / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -0.01:
                    late += 1  # the generator itself fell behind by over 10 ms
                tasks.append(asyncio.create_task(post(n)))
            await asyncio.gather(*tasks)
        finally:
            await lean.close()
        await wait_count(session, base, total)
        cpu, ticks = cpu_s(pid) - cpu0, machine_ticks()
        arrivals: dict[str, float] = (await stats(session, base))["arrivals"]  # type: ignore[assignment]
    waits = [(arrivals[key] - at) * 1000 for key, at in answered.items()]
    return {
        "rate": rate,
        "p50_ms": percentile(waits, 0.5),
        "p99_ms": percentile(waits, 0.99),
        "late_sends": late,
        "router_cpu_us_per_request": cpu / total * 1e6,
        "steal_pct": 100 * (ticks[1] - ticks0[1]) / max(1, ticks[0] - ticks0[0]),
    }


async def latency_section() -> dict[str, object]:
    """Fixed offered rates of single-event requests: p50/p99 from the 202 to the arrival."""
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "bench.receiver", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    hook = hook_env(base)
    runs: dict[int, list[dict[str, float]]] = {rate: [] for rate in LATENCY_RATES}
    try:
        await wait_http(f"{base}/count")
        for _ in range(ROUNDS):
            for rate in LATENCY_RATES:
                async with daemon(**hook) as (router_port, pid):
                    runs[rate].append(await latency_run(base, router_port, rate, pid))
    finally:
        receiver.terminate()
        receiver.wait(10)
    rows = [sorted(found, key=lambda run: run["p99_ms"])[len(found) // 2] for found in runs.values()]
    print(
        f"\nlatency, single-event requests at fixed rates for {LATENCY_SECONDS:g} s, from the 202 to"
        f" arrival, median p99 of {ROUNDS}, generator: {LATENCY_GENERATOR}"
    )
    print(
        f"{'requests/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'late sends':>11}"
        f" {'router µs/req':>14} {'steal %':>8}"
    )
    for row in rows:
        print(
            f"{row['rate']:>10.0f} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} {row['late_sends']:>11.0f}"
            f" {row['router_cpu_us_per_request']:>14.0f} {row['steal_pct']:>8.1f}"
        )
    rounds = {str(rate): found for rate, found in runs.items()}
    return {"runs": rows, "rounds": rounds, "generator": LATENCY_GENERATOR}


ISOLATION_SLOW = int(os.environ.get("BENCH_ISOLATION_SLOW", "40"))
ISOLATION_BACKLOG = int(os.environ.get("BENCH_ISOLATION_BACKLOG", "1100"))


async def isolation_section() -> dict[str, object]:
    """The slow-target case: ISOLATION_SLOW targets answering after 20 s, each with a backlog of
    ISOLATION_BACKLOG, and one healthy target offered 200 events/s: its latency."""
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "bench.receiver", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    rate, seconds = 200, 10
    with tempfile.TemporaryDirectory() as directory:
        for n in range(ISOLATION_SLOW):
            Path(directory, f"slow{n}.yaml").write_text(
                f"webhook: {{enabled: true, url: '{base}/slow?s=20'}}\n"
            )
        Path(directory, "fast.yaml").write_text(f"webhook: {{enabled: true, url: '{base}/hook'}}\n")
        env = {"ROUTER_INSTANCES_DIR": directory, "ROUTER_WEBHOOK_CONCURRENCY": str(CONCURRENCY)}
        try:
            await wait_http(f"{base}/count")
            async with daemon(**env) as (router_port, _), aiohttp.ClientSession() as session:
                url, headers = f"http://127.0.0.1:{router_port}/ingest", {"apikey": API_KEY}
                for n in range(ISOLATION_SLOW):
                    for first in range(0, ISOLATION_BACKLOG, BATCH):
                        batch = [
                            {**make_event(k, time.time()), "instance": f"slow{n}"}
                            for k in range(first, min(first + BATCH, ISOLATION_BACKLOG))
                        ]
                        async with session.post(url, data=orjson.dumps(batch), headers=headers) as answer:
                            assert answer.status == 202, await answer.text()
                await session.post(f"{base}/reset")
                started = time.perf_counter()
                for k in range(rate * seconds):
                    delay = started + k / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    event = {**make_event(k, time.time()), "instance": "fast"}
                    async with session.post(url, data=orjson.dumps(event), headers=headers) as answer:
                        assert answer.status == 202, await answer.text()
                await wait_count(session, base, rate * seconds, timeout_s=120)
                result = await stats(session, base)
        finally:
            receiver.terminate()
            receiver.wait(10)
    lat: list[float] = result["latencies_ms"]  # type: ignore[assignment]
    row = {"p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99)}
    print(
        f"\nisolation, {ISOLATION_SLOW} targets answering after 20 s with {ISOLATION_BACKLOG} events"
        f" waiting each; a healthy target offered {rate} events/s for {seconds} s"
    )
    print(
        f"{'healthy target, /ingest to arrival':<40} p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms"
    )
    return row


PG_SERVER = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
PG_EVENTS = int(os.environ.get("BENCH_PG_EVENTS", "10000"))


def postgres_cpu_s() -> float:
    """CPU seconds used so far by every PostgreSQL server process on this machine."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            if "(postgres)" in text:
                fields = text.rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def pg_database(name: str, create: bool) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if create:
            await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


async def postgres_run(base: str, routers: int, database: str | None) -> dict[str, float]:
    """PG_EVENTS events through ``routers`` daemons (on SQLite when ``database`` is None)."""
    env = hook_env(base)
    if database is not None:
        await pg_database(database, create=True)
        env["ROUTER_DATABASE_URL"] = f"{PG_SERVER}/{database}"
    async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
        started_daemons = [await stack.enter_async_context(daemon(**env)) for _ in range(routers)]
        await session.post(f"{base}/reset")
        pids = [pid for _, pid in started_daemons]
        cpu0, db0 = sum(cpu_s(pid) for pid in pids), postgres_cpu_s()
        started = time.perf_counter()
        await ingest_all(session, [port for port, _ in started_daemons], PG_EVENTS)
        await wait_count(session, base, PG_EVENTS)
        elapsed = time.perf_counter() - started
        cpu, db_cpu = sum(cpu_s(pid) for pid in pids) - cpu0, postgres_cpu_s() - db0
    if database is not None:
        await pg_database(database, create=False)
    return {
        "events_per_s": PG_EVENTS / elapsed,
        "router_cpu_us_per_event": cpu / PG_EVENTS * 1e6,
        "postgres_cpu_us_per_event": db_cpu / PG_EVENTS * 1e6,
    }


async def postgres_section() -> dict[str, object]:
    """One router on SQLite, one on PostgreSQL, two on PostgreSQL: the same events and receiver.
    On a 2-core machine two routers measure the cost of sharing, not scaling."""
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "bench.receiver", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    setups = {
        "1 router, SQLite": (1, None),
        "1 router, PostgreSQL": (1, "bench_pg"),
        "2 routers, PostgreSQL": (2, "bench_pg"),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    try:
        await wait_http(f"{base}/count")
        for _ in range(ROUNDS):
            for name, (routers, database) in setups.items():
                runs[name].append(await postgres_run(base, routers, database))
    finally:
        receiver.terminate()
        receiver.wait(10)
    print(f"\npostgres: {PG_EVENTS} events of ~1 KB, webhook, median of {ROUNDS} rounds")
    print(f"{'setup':<28}{'events/s':>10}{'router CPU us/ev':>18}{'PostgreSQL CPU us/ev':>22}")
    table = {}
    for name, rows in runs.items():
        row = median_run(rows)
        table[name] = {**row, "rounds": rows}
        print(
            f"{name:<28}{row['events_per_s']:>10.0f}{row['router_cpu_us_per_event']:>18.0f}"
            f"{row['postgres_cpu_us_per_event']:>22.0f}"
        )
    return table


SECTIONS = {
    "webhook": webhook_section,
    "rabbitmq": rabbitmq_section,
    "rabbitmq_instances": rabbitmq_instances_section,
    "sqs": sqs_section,
    "websocket": websocket_section,
    "pusher": pusher_section,
    "nats": nats_section,
    "scale": scale_section,
    "ordering": ordering_section,
    "latency": latency_section,
    "isolation": isolation_section,
    "postgres": postgres_section,
}


async def main() -> None:
    """Every section, or those named in BENCH_ONLY (comma-separated)."""
    wanted = [name for name in os.environ.get("BENCH_ONLY", ",".join(SECTIONS)).split(",") if name]
    report: dict[str, object] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "events": N_EVENTS,
        "concurrency": CONCURRENCY,
    }
    for name in wanted:
        report[name] = await SECTIONS[name]()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwritten: {RESULTS / 'latest.json'}")


if __name__ == "__main__":
    # What the imports made (the SQS server, boto's models: a large heap) is moved out of the
    # collector's way, as the daemon does with what its start made: else a full collection stops
    # this process for about 100 ms now and then. The bare clients would be slowed by it, and
    # the latency section's generator would fall behind and then send a burst, not a fixed rate.
    gc.freeze()
    # The bare client runs on the same event loop as the daemon (uvloop), so the ratio
    # measures the router's own overhead, not a difference of loops.
    uvloop.run(main())
