"""Client libraries of sinks that are off are not imported: each costs start-up time (a tenth
of a second or more) and memory for nothing."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import free_port

LIBRARIES = ("botocore", "aiobotocore", "nats", "jwt", "pusher", "socketio", "engineio")
SCRIPT = """
import asyncio, sys
from router.app import App
from router.settings import load_settings

async def main():
    app = App(load_settings(config_file=None, env_file=None))
    task = asyncio.create_task(app.run())
    await asyncio.wait_for(app.started.wait(), 60)
    print("imported:" + ",".join(name for name in %r if name in sys.modules))
    app.stop()
    await asyncio.wait_for(task, 15)

asyncio.run(main())
"""


def imported_by_a_started_daemon(tmp_path, **settings: str) -> list[str]:
    """Which of LIBRARIES a daemon started with ``settings`` (and no sink otherwise) imported."""
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                ("WEBHOOK_", "ROUTER_", "RABBITMQ_", "SQS_", "PUSHER_", "WEBSOCKET_", "NATS_")
            )
        },
        "AUTHENTICATION_API_KEY": "lazy-imports-key",
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": str(free_port()),
        "ROUTER_STATE_DIR": str(tmp_path / "state"),
        "ROUTER_INSTANCES_DIR": str(tmp_path / "instances"),
        "LOG_LEVEL": "ERROR",
        **settings,
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT % (LIBRARIES,)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("imported:")]
    return [name for name in line.removeprefix("imported:").split(",") if name]


def test_a_daemon_without_those_sinks_imports_none_of_their_libraries(tmp_path):
    assert imported_by_a_started_daemon(tmp_path) == []


def test_the_websocket_sink_imports_socketio_once_it_is_on(tmp_path):
    assert "socketio" in imported_by_a_started_daemon(tmp_path, WEBSOCKET_ENABLED="true")
