"""A full disk under the state directory: 503s and a failing /ready while it lasts, no exit, and
everything resumes by itself once there is room. The daemon runs on a small tmpfs of its own."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import hook_env, post_ingest


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB file system, mounted for this test (root only) and removed after it."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk``."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    try:  # the last few bytes
        while True:
            os.write(fd, b"\0")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    os.close(fd)
    return filler


def event(n: int) -> dict[str, object]:
    return {"event": "call", "instance": "bot", "data": {"n": n, "pad": "x" * 50_000}}


async def ready(port: int) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/ready") as r:
        return r.status, await r.json()


async def test_a_full_disk_is_503_until_there_is_room_and_nothing_accepted_is_lost(
    receiver, daemon, small_disk
):
    proc = daemon(
        **hook_env(receiver, "CALL"), ROUTER_STATE_DIR=str(small_disk / "state"), LOG_LEVEL="ERROR,WARN,INFO"
    )
    proc.start()
    await proc.wait_ready()
    accepted: list[str] = []
    status, answer = await post_ingest(proc.port, event(0))
    assert status == 202
    accepted += answer["ids"]
    await receiver.wait_for(1, "/hook")
    # Three deliveries under way when the disk fills up: their acks are written once it can be.
    receiver.script("/hook", [("sleep", 2.0)] * 3)
    status, answer = await post_ingest(proc.port, [event(-1), event(-2), event(-3)])
    accepted += answer["ids"]
    await receiver.wait_arrived(4)
    filler = fill(small_disk)

    refusals = 0
    for n in range(1, 400):  # until the store can take no more (the WAL may hold a little)
        status, answer = await post_ingest(proc.port, event(n))
        if status == 202:
            accepted += answer["ids"]
            continue
        assert status == 503, answer
        assert "is full: nothing new can be stored until there is room" in answer["error"]
        refusals += 1
        if refusals == 5:
            break
    assert refusals == 5, "the disk never filled up"
    status, body = await ready(proc.port)
    assert status == 503 and "is full" in str(body["checks"]["store"]), body
    assert proc.proc is not None and proc.proc.poll() is None, proc.logs()

    filler.unlink()  # room again: it resumes by itself
    async with asyncio.timeout(30):
        while (await post_ingest(proc.port, event(1000)))[0] != 202:
            await asyncio.sleep(0.2)
        while (await ready(proc.port))[0] != 200:
            await asyncio.sleep(0.2)
    got = await receiver.wait_for(len(accepted) + 1, "/hook", timeout=30)
    ids = [request.json()["id"] for request in got]
    assert set(accepted) <= set(ids), "an event answered 202 was lost"
    assert len(ids) == len(set(ids)), "an ack was lost: delivered twice"
    assert await proc.terminate() == 0
    logs = proc.logs()
    assert "store.disk_full" in logs and "store.writable" in logs
    assert "Traceback" not in logs
