"""Every secret the router knows, every log level on, every kind of failure forced: no secret in
any log line, any command's output or any error message."""

from __future__ import annotations

import asyncio
import base64

import aiohttp

from tests.conftest import API_KEY, DaemonProcess, free_port, post_ingest, run_router, write_instance

SECRETS = {
    "rabbit": "rabbit-Pa55word-z1",
    "sqs": "sqs-Secret-Key-0123456789",
    "pusher": "pusher-Secret-q9w8e7",
    "global_url_password": "global-Url-Pa55-7",
    "global_url_token": "global-Query-Token-3",
    "token": "instance-Token-5h6j7",
    "hook_password": "hook-Url-Pa55-k2",
    "hook_token": "hook-Query-Token-x4",
    "bearer": "bearer-Header-Value-m3",
    "jwt": "jwt-Key-Of-Enough-Length-For-HS256-0001",
    "admin_url_password": "admin-Url-Pa55-p8",
}
SIGNING = "whsec_" + base64.b64encode(b"signing-Secret-bytes-24!").decode()
SECRETS["signing"] = SIGNING.removeprefix("whsec_")


def env_with_every_secret(base_env: dict[str, str], receiver_url: str) -> dict[str, str]:
    dead = free_port()
    host = receiver_url.removeprefix("http://")
    return {
        **base_env,
        "PATH": "/usr/bin:/bin",
        "LOG_LEVEL": "ERROR,WARN,DEBUG,INFO,LOG,VERBOSE,DARK,WEBHOOKS,WEBSOCKET",
        "LOG_FORMAT": "json",
        "WEBHOOK_GLOBAL_ENABLED": "true",
        "WEBHOOK_GLOBAL_URL": f"http://evo:{SECRETS['global_url_password']}@{host}/g?token={SECRETS['global_url_token']}",
        "WEBHOOK_EVENTS_CALL": "true",
        "WEBHOOK_GLOBAL_SIGNING_SECRET": SIGNING,
        "WEBHOOK_RETRY_MAX_ATTEMPTS": "2",
        "WEBHOOK_RETRY_INITIAL_DELAY_SECONDS": "0.05",
        "RABBITMQ_ENABLED": "true",
        "RABBITMQ_URI": f"amqp://guest:{SECRETS['rabbit']}@127.0.0.1:{dead}/",
        "RABBITMQ_GLOBAL_ENABLED": "true",
        "RABBITMQ_EVENTS_CALL": "true",
        "SQS_ENABLED": "true",
        "SQS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "SQS_SECRET_ACCESS_KEY": SECRETS["sqs"],
        "SQS_ACCOUNT_ID": "123456789012",
        "SQS_REGION": "us-east-1",
        "SQS_ENDPOINT_URL": f"http://127.0.0.1:{dead}",
        "SQS_GLOBAL_ENABLED": "true",
        "SQS_GLOBAL_CALL": "true",
        "PUSHER_ENABLED": "true",
        "PUSHER_GLOBAL_ENABLED": "true",
        "PUSHER_GLOBAL_APP_ID": "1",
        "PUSHER_GLOBAL_KEY": "pusher-key",
        "PUSHER_GLOBAL_SECRET": SECRETS["pusher"],
        "PUSHER_HOST": "127.0.0.1",
        "PUSHER_PORT": str(dead),
        "PUSHER_GLOBAL_USE_TLS": "false",
        "PUSHER_EVENTS_CALL": "true",
        "WEBSOCKET_ENABLED": "true",
        "WEBSOCKET_ALLOWED_HOSTS": "",
        "ROUTER_QUEUE_RETRY_INITIAL_DELAY_S": "0.05",
        "ROUTER_QUEUE_RETRY_MAX_DELAY_S": "0.2",
    }


async def test_no_secret_reaches_any_output(receiver, base_env, tmp_path):
    env = env_with_every_secret(base_env, receiver.url)
    host = receiver.url.removeprefix("http://")
    write_instance(
        tmp_path / "instances",
        "bot",
        f"token: {SECRETS['token']}\n"
        f"webhook: {{enabled: true, events: [CALL], signingSecret: {SIGNING},\n"
        f"  url: 'http://{host}/bot?token={SECRETS['hook_token']}',\n"
        f"  headers: {{X-Auth: {SECRETS['bearer']}, jwt_key: {SECRETS['jwt']}}}}}\n",
    )
    receiver.script("/g", [500, 404])  # a retry, then a dead letter
    receiver.script("/bot", [503, 400])
    unreachable = (
        f"http://bot:{SECRETS['hook_password']}@127.0.0.1:{free_port()}/x?token={SECRETS['hook_token']}"
    )
    write_instance(tmp_path / "instances", "gone", f"webhook: {{enabled: true, url: '{unreachable}'}}\n")
    port = free_port()
    proc = DaemonProcess(env={**env, "SERVER_PORT": str(port)}, port=port, log_path=tmp_path / "daemon.log")
    proc.start()
    outputs = []
    try:
        await proc.wait_ready()
        assert (await post_ingest(port, {"event": "call", "instance": "bot", "data": {}}))[0] == 202
        assert (await post_ingest(port, {}, apikey="wrong"))[0] == 401
        assert (await post_ingest(port, {"event": "call", "instance": "gone", "data": {}}))[0] == 202
        assert (await post_ingest(port, {"event": "call", "instance": "bot"}, apikey=SECRETS["token"]))[
            0
        ] == 202
        async with aiohttp.ClientSession() as session:
            bad_url = f"ftp://admin:{SECRETS['admin_url_password']}@x/hook"
            async with session.post(
                f"http://127.0.0.1:{port}/webhook/set/bot",
                json={"webhook": {"enabled": True, "url": bad_url}},
                headers={"apikey": API_KEY},
            ) as answer:
                assert answer.status == 400
                outputs.append(await answer.text())
            async with session.get(f"http://127.0.0.1:{port}/ready") as answer:
                outputs.append(await answer.text())
            async with session.ws_connect(f"http://127.0.0.1:{port}/bot?apikey=wrong-key") as ws:
                await ws.receive(timeout=5)
        await receiver.wait_for(2, "/g")  # the webhooks' attempts, failed as scripted
        await receiver.wait_for(2, "/bot")
        async with asyncio.timeout(20):
            while len(run_router(env, "dlq", "list").stdout.splitlines()) < 3:
                await asyncio.sleep(0.2)
        for args in (("check",), ("dlq", "list"), ("dlq", "show", "1"), ("dlq", "show", "2")):
            done = run_router(env, *args)
            outputs += [done.stdout, done.stderr]
        mistyped = run_router({**env, "RABBITMQ_URI": f"amqx://guest:{SECRETS['rabbit']}@h/"}, "check")
        assert mistyped.returncode == 1 and "RABBITMQ_URI" in mistyped.stderr
        outputs += [mistyped.stdout, mistyped.stderr]
    finally:
        await proc.terminate()
    outputs.append(proc.logs())
    text = "\n".join(outputs)
    assert "delivery.attempt" in text and "delivery.dead_letter" in text and "rabbitmq.unreachable" in text
    leaked = [name for name, secret in SECRETS.items() if secret in text]
    assert leaked == [], f"secrets in the output: {leaked}"
