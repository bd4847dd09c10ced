"""Instance files changed under a running daemon: watched, reloaded, and no event lost."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from router.app import App, database_path
from router.deadletters import dead_letters
from tests.conftest import post_ingest, running, write_instance


async def wait_until(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def shop(receiver_url: str, path: str) -> str:
    return f"webhook: {{enabled: true, url: '{receiver_url}{path}', events: [CALL]}}\n"


async def test_edited_files_take_effect_without_sighup_while_events_flow(receiver, make_settings, tmp_path):
    instances = tmp_path / "instances"
    write_instance(instances, "shop", shop(receiver.url, "/v1"))
    accepted: list[str] = []
    async with running(make_settings()) as app:
        stop = asyncio.Event()

        async def send() -> None:
            for n in itertools.count():
                if stop.is_set():
                    return
                batch = [{"event": "call", "instance": "shop", "data": {"n": n * 5 + k}} for k in range(5)]
                status, body = await post_ingest(app, batch)
                assert status == 202, body
                accepted.extend(body["ids"])
                await asyncio.sleep(0.005)

        async def reloaded_after(change) -> None:
            before = app.reloads
            change()
            await wait_until(lambda: app.reloads > before)

        sender = asyncio.create_task(send())
        await receiver.wait_for(5, "/v1")
        # A new URL: the watcher reloads and events go there.
        await reloaded_after(lambda: write_instance(instances, "shop", shop(receiver.url, "/v2")))
        await receiver.wait_for(5, "/v2")
        # A broken file: reported, and the instance keeps its last good configuration.
        await reloaded_after(
            lambda: write_instance(instances, "shop", "webhook: {enabled: true, url: nope\n")
        )
        on_v2 = len(receiver.on("/v2"))
        await receiver.wait_for(on_v2 + 5, "/v2")
        # A new file with a mistake in it is left out; the good one keeps working.
        await reloaded_after(lambda: write_instance(instances, "cafe", "webhook: {enabled: true, urll: x}\n"))
        assert "cafe" not in app.instances
        await reloaded_after(lambda: write_instance(instances, "shop", shop(receiver.url, "/v3")))
        await receiver.wait_for(5, "/v3")
        stop.set()
        await sender

        def all_arrived() -> bool:
            ids = {r.json()["id"] for r in receiver.requests}
            return ids >= set(accepted)

        await wait_until(all_arrived, timeout=20)
    assert len(accepted) >= 20
    assert {r.path for r in receiver.requests} == {"/v1", "/v2", "/v3"}


async def test_a_removed_instance_still_receives_what_was_stored_for_it(receiver, make_settings, tmp_path):
    instances = tmp_path / "instances"
    path = write_instance(instances, "gone", shop(receiver.url, "/gone"))
    receiver.script("/gone", [503])
    settings = make_settings(WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.5", WEBHOOK_RETRY_JITTER_FACTOR="0")
    async with running(settings) as app:
        assert (await post_ingest(app, {"event": "call", "instance": "gone", "data": {}}))[0] == 202
        await receiver.wait_for(1, "/gone")  # the first attempt failed; the retry is stored
        before = app.reloads
        path.unlink()
        await wait_until(lambda: app.reloads > before)
        assert "gone" not in app.instances
        # The retry still goes to the webhook the event was accepted for, then the worker stops.
        [_, retried] = await receiver.wait_for(2, "/gone")
        assert retried.json()["instance"] == "gone"
        assert app.dispatcher is not None
        dispatcher = app.dispatcher
        await wait_until(lambda: "webhook:instance:gone" not in dispatcher.workers)
        # New events of the removed instance go nowhere (no global webhook).
        assert (await post_ingest(app, {"event": "call", "instance": "gone", "data": {}}))[0] == 202
    assert dead_letters(database_path(settings)) == []
    assert len(receiver.on("/gone")) == 2


async def test_a_removed_instance_with_a_retry_keeps_its_worker_until_done(receiver, make_settings, tmp_path):
    """Every configured target has a worker from the start. Removing an instance that never had
    an event drops its worker with the reload (no leaser task is left for it); one with a retry
    stored keeps its worker until that retry is delivered."""
    instances = tmp_path / "instances"
    idle = write_instance(instances, "idle", shop(receiver.url, "/idle"))
    busy = write_instance(instances, "busy", shop(receiver.url, "/busy"))
    receiver.script("/busy", [503])
    settings = make_settings(WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="1", WEBHOOK_RETRY_JITTER_FACTOR="0")
    async with running(settings) as app:
        assert app.dispatcher is not None
        dispatcher = app.dispatcher
        await wait_until(lambda: dispatcher.started)
        assert {"webhook:instance:idle", "webhook:instance:busy"} <= set(dispatcher.workers)
        assert (await post_ingest(app, {"event": "call", "instance": "busy", "data": {}}))[0] == 202
        await receiver.wait_for(1, "/busy")  # failed: its retry is stored, due in a second
        before = app.reloads
        idle.unlink()
        busy.unlink()
        await wait_until(lambda: app.reloads > before)
        assert "webhook:instance:idle" not in dispatcher.workers
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "worker webhook:instance:idle"]
        assert "webhook:instance:busy" in dispatcher.workers, "its retry is still to be delivered"
        await receiver.wait_for(2, "/busy")
        await wait_until(lambda: "webhook:instance:busy" not in dispatcher.workers)
    assert receiver.on("/idle") == []


def test_app_creates_a_missing_instances_directory(make_settings, tmp_path: Path):
    settings = make_settings(ROUTER_INSTANCES_DIR=str(tmp_path / "new" / "instances"))
    App(settings)
    assert (tmp_path / "new" / "instances").is_dir()


async def test_a_reload_reads_only_the_files_that_changed(make_settings, tmp_path, monkeypatch):
    import router.instances  # noqa: PLC0415

    instances = tmp_path / "instances"
    for n in range(50):
        write_instance(instances, f"i{n}", "webhook: {enabled: false}\n")
    read: list[str] = []
    parse = router.instances._parse_file
    monkeypatch.setattr(router.instances, "_parse_file", lambda path: read.append(path.name) or parse(path))
    async with running(make_settings()) as app:
        read.clear()
        write_instance(instances, "i7", "webhook: {enabled: true, url: 'http://127.0.0.1:9/x'}\n")
        await app.reload()
        assert read == ["i7.yaml"]
        assert app.routes.targets_for("i7", "call") == ("webhook:instance:i7",)
        read.clear()
        await app.reload(every_file=True)  # SIGHUP reads everything again
        assert len(read) == 50
