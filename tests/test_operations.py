"""Operating the daemon: SIGHUP reload, the `send` and `events` commands, the unit file."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson

from tests.conftest import API_KEY, ROOT, router_command, write_instance


async def wait_log(proc, message: str, count: int = 1, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while proc.logs().count(f'"msg":"{message}"') < count:
            await asyncio.sleep(0.05)


async def test_sighup_rereads_instances_and_keeps_a_valid_config_when_a_file_breaks(
    receiver, daemon, tmp_path
):
    instances = tmp_path / "instances"
    write_instance(
        instances, "shop", f"webhook: {{enabled: true, url: '{receiver.url}/v1', events: [CALL]}}\n"
    )
    proc = daemon(LOG_LEVEL="ERROR,WARN,INFO")
    proc.start()
    await proc.wait_ready()
    send = router_command(
        "send",
        "--url",
        f"http://127.0.0.1:{proc.port}",
        "--apikey",
        API_KEY,
        "--event",
        "CALL",
    )

    async def send_call(instance: str) -> None:
        result = await asyncio.to_thread(
            subprocess.run,
            [*send, "--instance", instance],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert orjson.loads(result.stdout)["accepted"] == 1

    await send_call("shop")
    await receiver.wait_for(1, "/v1")

    # A new URL and a new instance, then SIGHUP: both take effect without a restart.
    write_instance(
        instances, "shop", f"webhook: {{enabled: true, url: '{receiver.url}/v2', events: [CALL]}}\n"
    )
    write_instance(
        instances, "cafe", f"webhook: {{enabled: true, url: '{receiver.url}/cafe', events: [CALL]}}\n"
    )
    os.kill(proc.proc.pid, signal.SIGHUP)
    await wait_log(proc, "config.reloaded")
    await send_call("shop")
    await send_call("cafe")
    await receiver.wait_for(1, "/v2")
    await receiver.wait_for(1, "/cafe")

    # A broken file is reported and the instance keeps its previous configuration.
    write_instance(instances, "shop", "webhook: {enabled: true, url: nope\n")
    os.kill(proc.proc.pid, signal.SIGHUP)
    await wait_log(proc, "config.reloaded", count=2)
    await send_call("shop")
    await receiver.wait_for(2, "/v2")
    assert await proc.terminate() == 0
    assert "shop.yaml:2: invalid YAML" in proc.logs()
    assert receiver.on("/v1")[0].json()["event"] == "call"


def test_events_command_lists_every_event():
    result = subprocess.run(
        [sys.executable, "-m", "router", "events"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + 31 + 1
    assert "MESSAGES_UPSERT              messages.upsert              /messages-upsert" in lines
    assert any(line.startswith("GROUP_UPDATE") and "alias" in line for line in lines)


def test_send_reports_an_unreachable_daemon_clearly():
    result = subprocess.run(
        router_command(
            "send",
            "--url",
            "http://127.0.0.1:9",
            "--apikey",
            "k",
            "--instance",
            "x",
            "--event",
            "call",
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "AUTHENTICATION_API_KEY": "k"},
        check=False,
    )
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr


def test_unit_file_runs_the_daemon_with_reload_and_a_state_directory(tmp_path):
    unit = (ROOT / "evolution-router.service").read_text()
    # systemd's own checker, with the ExecStart binary pointed at this checkout's install.
    installed = tmp_path / "evolution-router.service"
    installed.write_text(
        unit.replace(
            "/opt/evolution-router/bin/evolution-router",
            str(Path(sys.executable).parent / "evolution-router"),
        )
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(installed)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "Type=notify\n" in unit and "NotifyAccess=main\n" in unit and "WatchdogSec=30\n" in unit
    # The admin API writes instance files: they must be inside the writable state directory.
    assert "Environment=ROUTER_INSTANCES_DIR=/var/lib/evolution-router/instances" in unit
    assert "StateDirectory=evolution-router" in unit
    assert "Environment=ROUTER_STATE_DIR=/var/lib/evolution-router" in unit
    assert "EnvironmentFile=-/etc/evolution-router/env" in unit
    assert "Restart=on-failure" in unit
    assert " run\n" in unit
