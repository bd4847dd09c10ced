"""What every bench section shares: the events, the daemon as its own process, timing, and the
pairing of a bare client's runs with the router's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import free_port

N_EVENTS = int(os.environ.get("BENCH_EVENTS", "20000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))  # bare and router alternate; medians reported
CONCURRENCY = 64
BATCH = 500
API_KEY = "bench-key"
RESULTS = Path(__file__).parent / "results"
# The daemon on its embedded defaults plus the environment each section gives it.
SETTING_PREFIXES = ("WEBHOOK_", "ROUTER_", "RABBITMQ_", "SQS_", "PUSHER_", "WEBSOCKET_", "NATS_")
DAEMON = [sys.executable, "-m", "router", "--config", "/nonexistent", "--env-file", "/nonexistent", "run"]


CHATS = int(os.environ.get("BENCH_CHATS", "1000"))  # conversations the events are spread over


def make_event(n: int, sent_at: float, chats: int = CHATS) -> dict[str, object]:
    """An event whose envelope is about 1 KB, of chat ``n % chats``."""
    return {
        "event": "messages.upsert",
        "instance": "bench",
        "data": {
            "key": {
                "remoteJid": f"5511{n % chats:09d}@s.whatsapp.net",
                "fromMe": False,
                "id": f"BENCH{n:012d}",
            },
            "pushName": "Bench",
            "message": {"conversation": "x" * 700},
            "messageTimestamp": 1700000000 + n,
            "sent_at": sent_at,
        },
    }


async def wait_http(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)


async def stats(session: aiohttp.ClientSession, base: str) -> dict[str, object]:
    async with session.get(f"{base}/stats") as response:
        return dict(await response.json())


async def wait_count(session: aiohttp.ClientSession, base: str, count: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        async with session.get(f"{base}/count") as response:
            if (await response.json())["count"] >= count:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"receiver did not get {count} events")
        await asyncio.sleep(0.02)


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by ``pid``, or by this process."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median events/s (its latencies belong to it)."""
    return sorted(runs, key=lambda run: run["events_per_s"])[len(runs) // 2]


def rate_and_latency(count: int, elapsed: float, received: dict[str, object]) -> dict[str, float]:
    """events/s over ``elapsed``, and p50/p99 of the latencies the receiver recorded."""
    lat: list[float] = received["latencies_ms"]  # type: ignore[assignment]
    return {"events_per_s": count / elapsed, "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99)}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


@contextlib.asynccontextmanager
async def daemon(**sink_env: str) -> AsyncIterator[tuple[int, int]]:
    """The daemon as its own process, with a fresh state directory: yields (port, pid)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as state_dir:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)},
            "AUTHENTICATION_API_KEY": API_KEY,
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "ROUTER_STATE_DIR": state_dir,
            # Apart, as deployed: the database's writes are no changes to watch for.
            "ROUTER_INSTANCES_DIR": str(Path(state_dir, "instances")),
            "LOG_LEVEL": "ERROR,WARN",
            **sink_env,
        }
        process = subprocess.Popen(DAEMON, env=env)
        try:
            await wait_http(f"http://127.0.0.1:{port}/health", timeout_s=300)  # 100,000 instances: long
            yield port, process.pid
        finally:
            process.terminate()
            process.wait(30)


async def ingest_all(
    session: aiohttp.ClientSession,
    port: int | list[int],
    count: int,
    posters: int = 4,
    chats: int = CHATS,
    instance_of: Callable[[int], str] | None = None,
) -> None:
    """POST events 0..count-1 to the daemon in batches of BATCH, ``posters`` requests at a time
    (to several daemons: batches round-robin over ``port``); event n is of instance
    ``instance_of(n)`` when given."""
    batches = list(range(0, count, BATCH))
    ports = port if isinstance(port, list) else [port]

    def event(n: int, now: float) -> dict[str, object]:
        made = make_event(n, now, chats)
        if instance_of is not None:
            made["instance"] = instance_of(n)
        return made

    async def post_batches(mine: list[int]) -> None:
        for start in mine:
            now = time.time()
            batch = [event(n, now) for n in range(start, min(start + BATCH, count))]
            async with session.post(
                f"http://127.0.0.1:{ports[start // BATCH % len(ports)]}/ingest",
                data=orjson.dumps(batch),
                headers={"apikey": API_KEY, "Content-Type": "application/json"},
            ) as response:
                assert response.status == 202, await response.text()

    await asyncio.gather(*(post_batches(batches[i::posters]) for i in range(posters)))


async def timed_burst(
    session: aiohttp.ClientSession, port: int, pid: int, count: int, arrived: Awaitable[object]
) -> tuple[float, float]:
    """Post ``count`` events and wait for ``arrived``: (seconds, daemon CPU seconds)."""
    cpu0 = cpu_s(pid)
    started = time.perf_counter()
    await ingest_all(session, port, count)
    await arrived
    return time.perf_counter() - started, cpu_s(pid) - cpu0


def burst_rate(elapsed: float, cpu: float, count: int = N_EVENTS) -> dict[str, float]:
    """events/s and CPU µs per event of ``count`` events that took ``elapsed`` and ``cpu`` seconds."""
    return {"events_per_s": count / elapsed, "cpu_us_per_event": cpu / count * 1e6}


async def router_burst(env: dict[str, str], arrived: Awaitable[object]) -> dict[str, float]:
    """The daemon with ``env`` takes N_EVENTS through /ingest until ``arrived``: its rate and CPU."""
    async with daemon(**env) as (port, pid), aiohttp.ClientSession() as session:
        elapsed, cpu = await timed_burst(session, port, pid, N_EVENTS, arrived)
    return burst_rate(elapsed, cpu)


async def timed_publishers(publisher: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """CONCURRENCY of ``publisher`` at once (a bare client's): (seconds, this process's CPU seconds)."""
    cpu0 = cpu_s()
    started = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started, cpu_s() - cpu0


class Paired:
    """Bare and router runs of one section, alternated round by round.

    Each round runs bare then router back to back: their ratio is paired, so a machine that
    speeds up or slows down during the run does not skew it. The median of those is reported,
    and the median run of each side is shown (its latencies belong to it).
    """

    def __init__(self, bare_runs: list[dict[str, float]], router_runs: list[dict[str, float]]) -> None:
        self.bare_runs, self.router_runs = bare_runs, router_runs
        self.ratios = [
            r["events_per_s"] / b["events_per_s"] for b, r in zip(bare_runs, router_runs, strict=True)
        ]
        self.bare, self.router = median_run(bare_runs), median_run(router_runs)

    def report(self, target: float) -> dict[str, object]:
        ratio = statistics.median(self.ratios)
        print(f"{'router / bare (median of rounds)':<40} {ratio:>10.2f}   (target >= {target:.2f})")
        print(f"{'ratio in each round':<40} {', '.join(f'{r:.2f}' for r in self.ratios)}")
        return {
            "bare": self.bare,
            "router": self.router,
            "ratio": ratio,
            "target": target,
            "rounds": {"bare": self.bare_runs, "router": self.router_runs, "ratios": self.ratios},
        }


Run = Callable[[str], Awaitable[dict[str, float]]]


async def broker_section(
    title: str, bare: tuple[str, Run], router: tuple[str, Run], target: float
) -> dict[str, object]:
    """Bare client and router alternating ROUNDS times, each run with names of its own."""
    bare_runs, router_runs = [], []
    for round_no in range(ROUNDS):
        tag = f"{os.getpid()}r{round_no}"
        bare_runs.append(await bare[1](tag + "b"))
        router_runs.append(await router[1](tag + "d"))
    paired = Paired(bare_runs, router_runs)
    print(f"\n{title}")
    print(f"{'path':<40} {'events/s':>10} {'CPU us/event':>13}")
    for (name, _), row in ((bare, paired.bare), (router, paired.router)):
        print(f"{name:<40} {row['events_per_s']:>10.0f} {row['cpu_us_per_event']:>13.0f}")
    return paired.report(target=target)
