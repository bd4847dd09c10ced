"""Several router processes on one PostgreSQL database (``ROUTER_DATABASE_URL``): they share
the queue, each delivery goes out once, and a router killed mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter

import aiohttp
import asyncpg
import orjson

from tests.conftest import API_KEY, _pg_admin, free_port, post_ingest, run_router, write_instance


def hook(receiver, pg_url: str, **extra: str) -> dict[str, str]:
    return {
        "ROUTER_DATABASE_URL": pg_url,
        "WEBHOOK_GLOBAL_ENABLED": "true",
        "WEBHOOK_GLOBAL_URL": f"{receiver.url}/hook",
        "WEBHOOK_EVENTS_MESSAGES_UPSERT": "true",
        "LOG_LEVEL": "ERROR,WARN",
        **extra,
    }


def message(n: int, chats: int = 7) -> dict[str, object]:
    return {
        "event": "messages.upsert",
        "instance": "bot",
        "data": {"key": {"remoteJid": f"55{n % chats}@s.whatsapp.net", "id": f"M{n:05d}"}, "n": n},
    }


def arrived_ids(receiver) -> list[str]:
    return [r.json()["data"]["key"]["id"] for r in receiver.on("/hook")]


async def start_all(routers) -> None:
    for router in routers:
        router.start()
    for router in routers:
        await router.wait_ready()


async def test_events_posted_to_three_routers_arrive_once_each_in_order_per_chat(receiver, daemon, pg_url):
    routers = [daemon(**hook(receiver, pg_url)) for _ in range(3)]
    await start_all(routers)
    try:
        for start in range(0, 300, 20):  # round-robin, 20 events a request
            batch = [message(n) for n in range(start, start + 20)]
            assert (await post_ingest(routers[start // 20 % 3].port, batch))[0] == 202
        await receiver.wait_for(300, "/hook", timeout=60)
        metrics = await metrics_of(routers[1].port)
        assert (
            f'router_info{{node="{socket.gethostname()}:{routers[1].port}",store="postgresql"}} 1.0'
            in metrics
        )
        assert 'router_queue_depth{sink="webhook"}' in metrics  # the shared queue's
    finally:
        for router in routers:
            await router.terminate()
    ids = arrived_ids(receiver)
    assert Counter(ids) == Counter(f"M{n:05d}" for n in range(300))  # each once
    for chat in range(7):  # one chat's events arrive in the order they were accepted
        sent = [f"M{n:05d}" for n in range(300) if n % 7 == chat]
        assert [i for i in ids if i in set(sent)] == sent


async def test_a_router_killed_mid_stream_has_its_deliveries_completed_by_the_other(receiver, daemon, pg_url):
    env = hook(receiver, pg_url, ROUTER_LEASE_TIMEOUT_S="2", ROUTER_WEBHOOK_ORDERING="none")
    # The same target on both (its key is the same); each router posts to a path of its own,
    # so the receiver can tell who delivered what.
    victim = daemon(**{**env, "WEBHOOK_GLOBAL_URL": f"{receiver.url}/victim"})
    survivor = daemon(**{**env, "WEBHOOK_GLOBAL_URL": f"{receiver.url}/survivor"})
    receiver.script("/victim", [("sleep", 0.3)] * 40)  # its first attempts are slow: some under way
    everything = {f"M{n:05d}" for n in range(200)}

    def ids(path: str) -> list[str]:
        return [r.json()["data"]["key"]["id"] for r in receiver.on(path)]

    victim.start()
    await victim.wait_ready()
    try:
        assert (await post_ingest(victim.port, [message(n) for n in range(200)]))[0] == 202
        await receiver.wait_arrived(10)  # its attempts are under way, the rest leased behind them
        victim.kill()  # SIGKILL: its leases are not given back; they run out
        survivor.start()
        await survivor.wait_ready()
        async with asyncio.timeout(60):
            while set(ids("/victim")) | set(ids("/survivor")) != everything:
                await asyncio.sleep(0.1)
    finally:
        await survivor.terminate()
    by_victim, by_survivor = Counter(ids("/victim")), Counter(ids("/survivor"))
    assert by_survivor, "the survivor completed nothing"
    # At least once: an event arrives twice only when the killed router had sent it (its
    # delivery not yet written as done) and the survivor sent it again; never twice by one.
    assert max(by_victim.values(), default=1) == 1 and max(by_survivor.values()) == 1
    assert set(by_victim) | set(by_survivor) == everything


HEADERS = {"apikey": API_KEY}


async def metrics_of(port: int) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


async def admin_call(port: int, method: str, path: str, body: object = None) -> tuple[int, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://127.0.0.1:{port}{path}", json=body, headers={"apikey": API_KEY}
        ) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_an_instance_made_through_one_routers_admin_api_serves_events_taken_by_another(
    receiver, daemon, pg_url, tmp_path
):
    routers = [
        daemon(
            ROUTER_DATABASE_URL=pg_url,
            ROUTER_INSTANCES_DIR=str(tmp_path / f"instances-{n}"),
            ROUTER_STATE_DIR=str(tmp_path / f"state-{n}"),
        )
        for n in range(2)
    ]
    await start_all(routers)
    try:
        created = {"instanceName": "shop", "webhook": {"enabled": True, "url": f"{receiver.url}/shop"}}
        status, answer = await admin_call(routers[0].port, "POST", "/instance/create", created)
        assert status == 201, answer
        async with asyncio.timeout(5):  # the other router has it within the notification's time
            while (await admin_call(routers[1].port, "GET", "/webhook/find/shop"))[0] != 200:
                await asyncio.sleep(0.05)
        event = {"event": "messages.upsert", "instance": "shop", "data": {"key": {"id": "S1"}}}
        assert (await post_ingest(routers[1].port, event))[0] == 202
        async with asyncio.timeout(10):
            while not any(r.json()["event"] == "messages.upsert" for r in receiver.on("/shop")):
                await receiver.wait_for(len(receiver.on("/shop")) + 1, "/shop")
        [got] = [r for r in receiver.on("/shop") if r.json()["event"] == "messages.upsert"]
        assert got.json()["data"]["key"]["id"] == "S1"
        # Deleted through the second: gone from the first too.
        assert (await admin_call(routers[1].port, "DELETE", "/instance/delete/shop"))[0] == 200
        async with asyncio.timeout(5):
            while (tmp_path / "instances-0" / "shop.yaml").exists():
                await asyncio.sleep(0.05)
    finally:
        for router in routers:
            await router.terminate()


def test_instances_import_export_and_check_against_the_database(base_env, pg_url, tmp_path):
    source, broken = tmp_path / "source", tmp_path / "broken"
    source.mkdir()
    broken.mkdir()
    write_instance(source, "bot", "webhook: {enabled: true, url: 'http://127.0.0.1:9/bot'}\n")
    write_instance(source, "shop", "token: shop-token\n")
    env = {**os.environ, **base_env, "ROUTER_DATABASE_URL": pg_url}
    done = run_router(env, "instances", "import", str(source))
    assert done.returncode == 0 and "imported 2 instances" in done.stdout, done.stderr
    checked = run_router(env, "check")
    assert "instances: 2 valid in the database" in checked.stdout, checked.stdout + checked.stderr
    assert "queue: postgresql://***@127.0.0.1:5432/" in checked.stdout
    exported = run_router(env, "instances", "export", str(tmp_path / "copy"))
    assert exported.returncode == 0 and "exported 2 instances" in exported.stdout
    assert (tmp_path / "copy" / "bot.yaml").read_text() == (source / "bot.yaml").read_text()
    write_instance(broken, "bad", "webhook: {enabled: maybe}\n")
    refused = run_router(env, "instances", "import", str(broken))
    assert refused.returncode == 1 and "bad.yaml" in refused.stderr
    without = run_router({**env, "ROUTER_DATABASE_URL": ""}, "instances", "export", str(tmp_path / "x"))
    assert without.returncode == 1 and "ROUTER_DATABASE_URL is not set" in without.stderr


async def test_a_websocket_client_of_one_router_sees_events_posted_to_another(daemon, pg_url):
    env = {"ROUTER_DATABASE_URL": pg_url, "WEBSOCKET_ENABLED": "true", "WEBSOCKET_GLOBAL_EVENTS": "true"}
    watched, posted = daemon(**env), daemon(**env)
    await start_all([watched, posted])
    big = "x" * 20_000  # larger than one NOTIFY can carry: relayed through the table
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{watched.port}/") as ws,
        ):
            events = [message(1), {**message(2), "data": {"key": {"id": "M00002"}, "text": big}}, message(3)]
            for event in events:
                assert (await post_ingest(posted.port, event))[0] == 202
            got = []
            async with asyncio.timeout(10):
                while len(got) < 3:
                    got.append(orjson.loads((await ws.receive()).data))
    finally:
        await watched.terminate()
        await posted.terminate()
    assert [m["data"]["key"]["id"] for m in got] == ["M00001", "M00002", "M00003"]
    assert got[1]["data"]["text"] == big and got[0]["event"] == "messages.upsert"


async def test_a_router_that_was_down_takes_the_databases_instances_and_edits_travel_both_ways(
    daemon, pg_url, tmp_path
):
    """At start the database wins over a router's stale files (a deleted instance stays deleted);
    an operator's edit of a file on one router reaches the other."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    write_instance(one, "shop", "token: shop-token\n")
    write_instance(two, "stale", "token: deleted-meanwhile\n")  # the second router's old file
    env = {"ROUTER_DATABASE_URL": pg_url}
    first = daemon(**env, ROUTER_INSTANCES_DIR=str(one), ROUTER_STATE_DIR=str(tmp_path / "s1"))
    first.start()
    await first.wait_ready()  # the table was empty: the first router's files are its content
    second = daemon(**env, ROUTER_INSTANCES_DIR=str(two), ROUTER_STATE_DIR=str(tmp_path / "s2"))
    second.start()
    try:
        await second.wait_ready()
        assert sorted(p.name for p in two.iterdir() if not p.name.startswith(".")) == ["shop.yaml"]
        (two / "shop.yaml").write_text(
            "token: shop-token\nwebhook: {enabled: true, url: 'http://127.0.0.1:9/x'}\n"
        )
        async with asyncio.timeout(10):
            while "127.0.0.1:9/x" not in (one / "shop.yaml").read_text():
                await asyncio.sleep(0.05)
        status, found = await admin_call(first.port, "GET", "/webhook/find/shop")
        assert status == 200 and found["url"] == "http://127.0.0.1:9/x"
    finally:
        await first.terminate()
        await second.terminate()


async def test_ready_says_so_when_the_database_is_gone(receiver, daemon, pg_url):
    router = daemon(**hook(receiver, pg_url))
    router.start()
    try:
        await router.wait_ready()
        status, body = await admin_call(router.port, "GET", "/ready")
        assert status == 200 and body["checks"]["store"] == {"ok": True}
        name = pg_url.rsplit("/", 1)[1]
        await asyncio.to_thread(_pg_admin, f"DROP DATABASE {name} WITH (FORCE)")
        status, body = await admin_call(router.port, "GET", "/ready")
        assert status == 503 and body["checks"]["store"]["ok"] is False
        assert body["checks"]["store"]["error"]
        assert (await admin_call(router.port, "GET", "/health"))[0] == 200  # alive all the same
        status, answer = await post_ingest(router.port, message(1))  # nothing taken: the sender retries
        assert status == 503 and "cannot be reached" in str(answer) and name in str(answer)
    finally:
        await router.terminate()


async def test_at_concurrency_one_a_target_gets_one_delivery_at_a_time_in_order_from_all_routers(
    receiver, daemon, pg_url
):
    env = hook(receiver, pg_url, ROUTER_WEBHOOK_CONCURRENCY="1")
    routers = [daemon(**env) for _ in range(2)]
    await start_all(routers)
    in_flight, overlapped = 0, False
    answer = receiver.handle

    async def counting(request):
        nonlocal in_flight, overlapped
        in_flight += 1
        overlapped |= in_flight > 1
        try:
            await asyncio.sleep(0.005)
            return await answer(request)
        finally:
            in_flight -= 1

    receiver.handle = counting
    try:
        for n in range(60):  # one at a time, to alternate routers: acceptance order is n's order
            assert (await post_ingest(routers[n % 2].port, message(n)))[0] == 202
        await receiver.wait_for(60, "/hook", timeout=60)
    finally:
        for router in routers:
            await router.terminate()
    assert arrived_ids(receiver) == [f"M{n:05d}" for n in range(60)]
    assert not overlapped, "two deliveries to the target were under way at once"


async def test_the_database_password_never_reaches_output(receiver, daemon, pg_url, tmp_path):
    secret = "db-pass-Zq81xV"
    with_password = pg_url.replace("postgres@", f"postgres:{secret}@")  # trust auth takes any
    unreachable = f"postgresql://postgres:{secret}@127.0.0.1:{free_port()}/router"
    outputs = []
    env = {**os.environ, "AUTHENTICATION_API_KEY": API_KEY, "ROUTER_INSTANCES_DIR": str(tmp_path)}
    for url in (with_password, unreachable):
        for args in (("check",), ("dlq", "list"), ("instances", "export", str(tmp_path / "out"))):
            done = run_router({**env, "ROUTER_DATABASE_URL": url}, *args)
            outputs += [done.stdout, done.stderr]
    refused = daemon(
        **hook(receiver, unreachable, LOG_LEVEL="ERROR,WARN,DEBUG,INFO,LOG,VERBOSE,DARK,WEBHOOKS")
    )
    refused.start()
    assert await asyncio.to_thread(refused.proc.wait, 30) == 1  # it cannot start, and says why
    working = daemon(
        **hook(receiver, with_password, LOG_LEVEL="ERROR,WARN,DEBUG,INFO,LOG,VERBOSE,DARK,WEBHOOKS")
    )
    working.start()
    try:
        await working.wait_ready()
        assert (await post_ingest(working.port, message(1)))[0] == 202
        await receiver.wait_for(1, "/hook")
        outputs.append(str(await admin_call(working.port, "GET", "/ready")))
    finally:
        await working.terminate()
    outputs += [refused.logs(), working.logs()]
    text = "\n".join(outputs)
    assert "ROUTER_DATABASE_URL: cannot use postgresql://postgres:***@127.0.0.1:" in refused.logs()
    assert secret not in text


async def test_routers_recover_when_the_database_drops_their_connections(receiver, daemon, pg_url, tmp_path):
    """Every connection the routers hold is cut (a database restart, a proxy's timeout): they
    open new ones, and instance changes, WebSocket relays and deliveries flow again."""
    env = {"ROUTER_DATABASE_URL": pg_url, "WEBSOCKET_ENABLED": "true", "WEBSOCKET_GLOBAL_EVENTS": "true"}
    routers = [
        daemon(**env, ROUTER_INSTANCES_DIR=str(tmp_path / f"i{n}"), ROUTER_STATE_DIR=str(tmp_path / f"s{n}"))
        for n in range(2)
    ]
    for n in range(2):
        (tmp_path / f"i{n}").mkdir()
    await start_all(routers)
    try:
        name = pg_url.rsplit("/", 1)[1]
        await asyncio.to_thread(
            _pg_admin,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{name}' AND pid <> pg_backend_pid()",
        )
        created = {"instanceName": "shop", "webhook": {"enabled": True, "url": f"{receiver.url}/shop"}}
        async with asyncio.timeout(20):
            while (await admin_call(routers[0].port, "POST", "/instance/create", created))[0] != 201:
                await asyncio.sleep(0.2)  # the first attempts may meet a connection being replaced
            while (await admin_call(routers[1].port, "GET", "/webhook/find/shop"))[0] != 200:
                await asyncio.sleep(0.1)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{routers[1].port}/") as ws,
        ):
            event = {"event": "messages.upsert", "instance": "shop", "data": {"key": {"id": "AFTER"}}}
            async with asyncio.timeout(20):
                while True:  # the relay's listening comes back within its check interval
                    assert (await post_ingest(routers[0].port, event))[0] == 202
                    try:
                        async with asyncio.timeout(1):
                            message = orjson.loads((await ws.receive()).data)
                    except TimeoutError:
                        continue
                    if message["event"] == "messages.upsert":
                        break
        assert message["data"]["key"]["id"] == "AFTER"
        await receiver.wait_for(1, "/shop")
    finally:
        for router in routers:
            await router.terminate()


def test_a_database_url_that_is_not_postgresql_is_refused_naming_the_setting(base_env):
    env = {**os.environ, **base_env, "ROUTER_DATABASE_URL": "mysql://router:hunter2-db@db/router"}
    done = run_router(env, "check")
    assert done.returncode == 1
    assert "ROUTER_DATABASE_URL" in done.stderr and "must be a postgresql:// URL" in done.stderr
    assert "hunter2-db" not in done.stdout + done.stderr


async def test_commands_on_a_database_no_router_has_used_yet_say_so_and_change_nothing(
    base_env, pg_url, tmp_path
):
    env = {**os.environ, **base_env, "ROUTER_DATABASE_URL": pg_url}
    listed = run_router(env, "dlq", "list")
    assert listed.returncode == 1 and "no queue in the database postgresql://***@" in listed.stderr
    assert "Traceback" not in listed.stderr
    checked = run_router(env, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "instances: 0 valid in the database" in checked.stdout
    exported = run_router(env, "instances", "export", str(tmp_path / "out"))
    assert exported.returncode == 0 and "exported 0 instances" in exported.stdout
    conn = await asyncpg.connect(pg_url)
    try:  # reading made no tables: the first router to start makes them
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await conn.close()


async def test_an_instance_edit_made_while_the_database_refuses_reaches_the_others_once_it_is_back(
    daemon, pg_url, tmp_path
):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    env = {"ROUTER_DATABASE_URL": pg_url}
    routers = [
        daemon(**env, ROUTER_INSTANCES_DIR=str(d), ROUTER_STATE_DIR=str(tmp_path / f"s{n}"))
        for n, d in enumerate((one, two))
    ]
    await start_all(routers)
    name = pg_url.rsplit("/", 1)[1]
    try:
        await asyncio.to_thread(_pg_admin, f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        await asyncio.to_thread(
            _pg_admin,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
        )
        write_instance(one, "shop", "token: edited-while-down\n")  # the first router reloads it
        async with asyncio.timeout(20):  # and tries to write it to the database, which refuses
            while "router_reloads_total 1.0" not in await metrics_of(routers[0].port):
                await asyncio.sleep(0.1)
        assert (await admin_call(routers[0].port, "GET", "/health"))[0] == 200  # up all along
        await asyncio.to_thread(_pg_admin, f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        async with asyncio.timeout(20):
            while not (two / "shop.yaml").exists():
                await asyncio.sleep(0.1)
        assert (two / "shop.yaml").read_text() == "token: edited-while-down\n"
        assert (one / "shop.yaml").exists()  # not undone by the table it could not write to
    finally:
        await asyncio.to_thread(_pg_admin, f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        for router in routers:
            await router.terminate()
