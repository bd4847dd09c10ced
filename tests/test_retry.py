"""Retries, backoff, Retry-After, timeouts, dead letters and isolation between targets."""

from __future__ import annotations

import asyncio
import itertools
import random
from urllib.parse import urlsplit

import pytest

from router.app import database_path
from router.deadletters import dead_letters
from router.retry import RetryPolicy
from tests.conftest import free_port, hook_env, post_ingest, running, wait_idle, write_instance

pytestmark = pytest.mark.usefixtures("backend")  # each test runs on SQLite and on PostgreSQL

EVENT = {"event": "messages.upsert", "instance": "bot", "data": {"key": {"id": "A"}}}


def gaps(requests) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(requests)]


async def test_retries_with_exponential_backoff_then_delivers(receiver, make_settings):
    receiver.script("/hook", [500, 502, 503])
    settings = make_settings(
        **hook_env(
            receiver,
            WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.2",
            WEBHOOK_RETRY_MAX_DELAY_SECONDS="10",
        )
    )
    async with running(settings) as app:
        await post_ingest(app, EVENT)
        got = await receiver.wait_for(4, "/hook")
        await wait_idle(app)
        assert len(receiver.on("/hook")) == 4, "delivered once it succeeded, no more"
    assert {r.json()["id"] for r in got} == {got[0].json()["id"]}, "same event id on every retry"
    for gap, expected in zip(gaps(got), [0.2, 0.4, 0.8], strict=True):
        assert expected - 0.02 <= gap < expected + 0.6


async def test_delay_is_capped_and_constant_without_exponential(receiver, make_settings):
    receiver.script("/hook", [500, 500, 500])
    settings = make_settings(
        **hook_env(
            receiver,
            WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.3",
            WEBHOOK_RETRY_USE_EXPONENTIAL_BACKOFF="false",
        )
    )
    async with running(settings) as app:
        await post_ingest(app, EVENT)
        got = await receiver.wait_for(4, "/hook")
    for gap in gaps(got):
        assert 0.28 <= gap < 0.9


async def test_gives_up_after_max_attempts_into_a_dead_letter(receiver, make_settings):
    receiver.script("/hook", [500] * 10)
    settings = make_settings(
        **hook_env(
            receiver,
            WEBHOOK_RETRY_MAX_ATTEMPTS="3",
            WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05",
        )
    )
    async with running(settings) as app:
        await post_ingest(app, EVENT)
        await receiver.wait_for(3, "/hook")
        await wait_idle(app)
        assert len(receiver.on("/hook")) == 3
    [dead] = dead_letters(database_path(settings))
    assert dead["target"] == "webhook:global" and dead["attempts"] == 3
    assert dead["event"] == "messages.upsert" and dead["instance"] == "bot"
    assert dead["last_error"] == "HTTP 500 (gave up after 3 attempts)"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_non_retryable_status_stops_at_once(receiver, make_settings, status):
    receiver.script("/hook", [status, 200])
    settings = make_settings(**hook_env(receiver, WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05"))
    async with running(settings) as app:
        await post_ingest(app, EVENT)
        await receiver.wait_for(1, "/hook")
        await wait_idle(app)
        assert len(receiver.on("/hook")) == 1
    [dead] = dead_letters(database_path(settings))
    assert dead["last_error"] == f"HTTP {status} (non-retryable)" and dead["attempts"] == 1


async def test_non_retryable_codes_are_configurable(receiver, make_settings):
    receiver.script("/hook", [404, 418])
    settings = make_settings(
        **hook_env(
            receiver,
            WEBHOOK_RETRY_NON_RETRYABLE_STATUS_CODES="418",
            WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05",
        )
    )
    async with running(settings) as app:
        await post_ingest(app, EVENT)
        await receiver.wait_for(2, "/hook")
        await wait_idle(app)
        assert len(receiver.on("/hook")) == 2  # 404 retried, 418 final
    [dead] = dead_letters(database_path(settings))
    assert dead["last_error"].startswith("HTTP 418")


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(receiver, make_settings, status):
    receiver.script("/hook", [(status, {"Retry-After": "1"})])
    settings = make_settings(**hook_env(receiver, WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05"))
    async with running(settings) as app:
        await post_ingest(app, EVENT)
        got = await receiver.wait_for(2, "/hook")
    assert 1.0 <= gaps(got)[0] < 2.0


async def test_timeout_is_retried(receiver, make_settings, tmp_path):
    receiver.script("/hook", [("sleep", 1.0)])
    settings = make_settings(
        **hook_env(
            receiver,
            WEBHOOK_REQUEST_TIMEOUT_MS="200",
            WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05",
        )
    )
    async with running(settings) as app:
        await post_ingest(app, EVENT)
        got = await receiver.wait_for(2, "/hook")
    assert got[0].json()["id"] == got[1].json()["id"]


async def test_connection_refused_is_retried_then_dead(make_settings, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/nobody"
    settings = make_settings(
        WEBHOOK_GLOBAL_ENABLED="true",
        WEBHOOK_GLOBAL_URL=url,
        WEBHOOK_EVENTS_MESSAGES_UPSERT="true",
        WEBHOOK_RETRY_MAX_ATTEMPTS="2",
        WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05",
    )
    async with running(settings) as app:
        await post_ingest(app, EVENT)
        async with asyncio.timeout(10):
            while not dead_letters(database_path(settings)):
                await asyncio.sleep(0.05)
    [dead] = dead_letters(database_path(settings))
    assert f"cannot connect to 127.0.0.1:{urlsplit(url).port}" in dead["last_error"] and dead["attempts"] == 2


async def test_slow_or_dead_target_never_delays_another(receiver, make_settings, tmp_path):
    instances = tmp_path / "instances"
    write_instance(instances, "slow", f"webhook: {{enabled: true, url: '{receiver.url}/slow'}}\n")
    write_instance(
        instances, "dead", f"webhook: {{enabled: true, url: 'http://127.0.0.1:{free_port()}/x'}}\n"
    )
    write_instance(instances, "fast", f"webhook: {{enabled: true, url: '{receiver.url}/fast'}}\n")
    receiver.script("/slow", [("sleep", 3.0)] * 100)
    settings = make_settings(WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05", ROUTER_WEBHOOK_CONCURRENCY="4")
    async with running(settings) as app:
        batch = [
            {"event": "messages.upsert", "instance": name, "data": {"n": n}}
            for n in range(30)
            for name in ("slow", "dead", "fast")
        ]
        await post_ingest(app, batch)
        fast = await receiver.wait_for(30, "/fast", timeout=2.5)
        assert receiver.on("/slow") == [], "slow target answered before the fast one finished"
    assert sorted(r.json()["data"]["n"] for r in fast if r.json()["event"] == "messages.upsert") == list(
        range(30)
    )


def test_policy_follows_the_documented_formula():
    policy = RetryPolicy(initial_delay_s=5, max_delay_s=300, jitter=0.2)
    rng = random.Random(7)
    for failed, base in [(1, 5), (2, 10), (3, 20), (4, 40), (7, 300), (9, 300)]:
        for _ in range(50):
            delay = policy.delay_s(failed, rng)
            assert max(5, base * 0.8) <= delay <= base * 1.2
    assert RetryPolicy(initial_delay_s=5, exponential=False).delay_s(6) == 5
    assert RetryPolicy(initial_delay_s=1, jitter=0).delay_s(3) == 4


async def test_slow_targets_holding_the_whole_lease_buffer_never_delay_a_healthy_one(
    receiver, make_settings, tmp_path
):
    """Slow targets with a backlog fill the shared buffer; a healthy target still gets its free
    attempt slots, so its events arrive while every slow request is still unanswered."""
    slow = [f"slow{n}" for n in range(6)]
    for name in [*slow, "fast"]:
        write_instance(
            tmp_path / "instances", name, f"webhook: {{enabled: true, url: '{receiver.url}/{name}'}}\n"
        )
    release = asyncio.Event()
    original = receiver.handle
    held = 0

    async def holding(request):
        nonlocal held
        if request.path.startswith("/slow"):
            held += 1
            await release.wait()
        return await original(request)

    receiver.handle = holding  # type: ignore[method-assign]
    settings = make_settings(
        ROUTER_LEASE_BUFFER="20", ROUTER_WEBHOOK_CONCURRENCY="4", ROUTER_WEBHOOK_ORDERING="none"
    )
    async with running(settings) as app:
        assert app.dispatcher is not None
        try:
            backlog = [
                {"event": "call", "instance": name, "data": {"n": n}} for n in range(200) for name in slow
            ]
            assert (await post_ingest(app, backlog))[0] == 202
            async with asyncio.timeout(10):
                # Every slow slot is taken, and their backlog holds the whole buffer.
                while held < len(slow) * 4 or app.dispatcher.buffered < 20:
                    await asyncio.sleep(0.01)
            fast = [{"event": "call", "instance": "fast", "data": {"n": n}} for n in range(50)]
            assert (await post_ingest(app, fast))[0] == 202
            got = await receiver.wait_for(50, "/fast")
            assert not any(r.path.startswith("/slow") for r in receiver.requests), "no slow request answered"
        finally:
            release.set()
    assert sorted(r.json()["data"]["n"] for r in got) == list(range(50))


async def test_leased_events_in_memory_stay_within_the_buffer(receiver, make_settings, tmp_path):
    instances = tmp_path / "instances"
    for name in ("a", "b", "c"):
        write_instance(instances, name, f"webhook: {{enabled: true, url: '{receiver.url}/{name}'}}\n")
    settings = make_settings(ROUTER_LEASE_BUFFER="5", ROUTER_WEBHOOK_CONCURRENCY="2")
    seen: list[int] = []
    async with running(settings) as app:
        original = receiver.handle

        async def watching(request):
            assert app.dispatcher is not None
            seen.append(app.dispatcher.buffered)
            return await original(request)

        receiver.handle = watching  # type: ignore[method-assign]
        batch = [
            {"event": "call", "instance": name, "data": {"n": n}}
            for n in range(40)
            for name in ("a", "b", "c")
        ]
        await post_ingest(app, batch)
        for name in ("a", "b", "c"):
            await receiver.wait_for(40, f"/{name}")
    # The buffer, plus at most each target's free attempt slots (2 each), which no other
    # target's backlog can take from it.
    assert seen and max(seen) <= 5 + 3 * 2


async def test_redirects_are_not_followed_and_name_the_location(receiver, make_settings):
    receiver.script("/hook", [(302, {"Location": f"{receiver.url}/moved"})])
    settings = make_settings(
        **hook_env(receiver, WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05", WEBHOOK_RETRY_MAX_ATTEMPTS="1")
    )
    async with running(settings) as app:
        await post_ingest(app, EVENT)
        await receiver.wait_for(1, "/hook")
        async with asyncio.timeout(10):
            while not dead_letters(database_path(settings)):
                await asyncio.sleep(0.02)
    assert receiver.on("/moved") == [], "followed as a GET without the event"
    [dead] = dead_letters(database_path(settings))
    assert (
        dead["last_error"]
        == f"HTTP 302 redirect to '{receiver.url}/moved' (not followed) (gave up after 1 attempts)"
    )
