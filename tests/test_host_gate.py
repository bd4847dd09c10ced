"""Targets on one host share its places (ROUTER_WEBHOOK_HOST_CONCURRENCY) in turn, and a slow
request stops holding its place: against real servers on loopback, and the gate on its own."""

from __future__ import annotations

import asyncio

from router.sinks.webhook.gate import HostGate
from router.sinks.webhook.http import HttpClient
from tests.test_http_client import ok, serve  # noqa: F401 - the fixture

HOST = ("http", "127.0.0.1", 1)


async def test_many_targets_posting_at_once_share_a_few_connections(serve):  # noqa: F811
    """300 targets with a request each, at once: the host sees a handful of connections, not 300,
    and every request is answered."""
    server, base = await serve(ok)
    client = HttpClient(host_limit=4)
    try:
        answers = await asyncio.gather(
            *(client.post(f"{base}/hook/{n}", b"{}", {}, 10, owner=f"webhook:i{n}") for n in range(300))
        )
    finally:
        await client.close()
    assert [answer.status for answer in answers] == [200] * 300
    assert len(server.requests) == 300
    assert server.connections <= 20  # 4, and a few more should some have stalled on a busy machine


async def test_a_target_on_a_slow_host_path_does_not_hold_up_another(serve):  # noqa: F811
    """Every place of the host is taken by requests that never end: the next target's request
    still goes out, and is answered."""
    server, base = await serve(lambda request: None if b"/slow" in request else ok(request))
    client = HttpClient(host_limit=2)
    slow = [asyncio.create_task(client.post(f"{base}/slow", b"{}", {}, 30, owner="slow")) for _ in range(6)]
    try:
        answer = await asyncio.wait_for(client.post(f"{base}/fast", b"{}", {}, 30, owner="fast"), 10)
        assert answer.status == 200
        assert not any(task.done() for task in slow)
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        await client.close()
    assert sum(b"/slow" in request for request in server.requests) >= 2  # both places were taken


async def test_waiting_targets_are_let_in_one_after_another():
    """With one place, a target with five requests waiting and another with one: the second goes
    after the first's next request, not after all five."""
    gate = HostGate(limit=1)
    first = await gate.enter(HOST, "a")
    order: list[str] = []

    async def request(owner: str, n: int) -> None:
        ticket = await gate.enter(HOST, owner)
        order.append(f"{owner}{n}")
        gate.leave(HOST, ticket)

    waiting = [asyncio.create_task(request("a", n)) for n in range(5)]
    await asyncio.sleep(0)
    waiting.append(asyncio.create_task(request("b", 0)))
    await asyncio.sleep(0)
    gate.leave(HOST, first)
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4"]


async def test_a_wait_given_up_leaves_the_line():
    """A request that stops waiting (its timeout) takes no place: once the host is free, the next
    request goes at once."""
    gate = HostGate(limit=1)
    held = await gate.enter(HOST, "a")
    gave_up = asyncio.create_task(gate.enter(HOST, "b"))
    await asyncio.sleep(0)
    gave_up.cancel()
    await asyncio.gather(gave_up, return_exceptions=True)
    gate.leave(HOST, held)
    ticket = await asyncio.wait_for(gate.enter(HOST, "c"), 1)
    gate.leave(HOST, ticket)
    assert gave_up.cancelled()


async def test_the_daemon_shares_one_host_among_its_instances_webhooks(receiver, make_settings, tmp_path):
    """300 instances, each with its own webhook on one host, an event each at once: all arrive,
    over far fewer requests at a time than 300 (ROUTER_WEBHOOK_HOST_CONCURRENCY=4)."""
    from tests.conftest import post_ingest, running, wait_idle  # noqa: PLC0415

    instances = tmp_path / "instances"
    for n in range(300):
        (instances / f"i{n}.yaml").write_text(f"webhook: {{enabled: true, url: '{receiver.url}/{n}'}}\n")
    at_once = {"now": 0, "most": 0}
    handle = receiver.handle

    async def counting(request):
        at_once["now"] += 1
        at_once["most"] = max(at_once["most"], at_once["now"])
        try:
            await asyncio.sleep(0)  # a turn of the loop, so requests under way overlap
            return await handle(request)
        finally:
            at_once["now"] -= 1

    receiver.handle = counting
    async with running(make_settings(ROUTER_WEBHOOK_HOST_CONCURRENCY="4"), start_timeout=60) as app:
        events = [{"event": "call", "instance": f"i{n}", "data": {"n": n}} for n in range(300)]
        assert (await post_ingest(app, events))[0] == 202
        got = await receiver.wait_for(300, timeout=60)
        await wait_idle(app, timeout=60)
    assert sorted(int(request.path[1:]) for request in got) == list(range(300))
    assert at_once["most"] < 100, at_once


async def test_a_wait_cancelled_just_as_its_place_comes_free_is_passed_over():
    """The place comes free after the wait was cancelled but before its task ran to leave the
    line: the place goes to the next in line, and nothing fails."""
    gate = HostGate(limit=1)
    held = await gate.enter(HOST, "a")
    cancelled = asyncio.create_task(gate.enter(HOST, "b"))
    await asyncio.sleep(0)
    cancelled.cancel()  # its wait is cancelled now; its task runs later
    gate.leave(HOST, held)
    await asyncio.gather(cancelled, return_exceptions=True)
    assert cancelled.cancelled()
    ticket = await asyncio.wait_for(gate.enter(HOST, "c"), 1)
    gate.leave(HOST, ticket)
