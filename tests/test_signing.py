"""Standard Webhooks signatures, verified with the specification's reference library
(``standardwebhooks`` from PyPI), not with the router's own code."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import jwt
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from router.errors import ConfigError
from tests.conftest import ROOT, free_port, hook_env, post_ingest, running, wait_idle, write_instance


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


async def test_instance_webhook_is_signed_with_each_secret_while_rotating(receiver, make_settings, tmp_path):
    old, new = new_secret(), new_secret()
    write_instance(
        tmp_path / "instances",
        "bot",
        f"webhook: {{enabled: true, url: '{receiver.url}/bot', events: [CALL],\n"
        f"  signingSecret: [{old}, {new}], headers: {{jwt_key: a-jwt-secret-of-32-bytes-or-more!!}}}}\n",
    )
    async with running(make_settings()) as app:
        status, answer = await post_ingest(app, {"event": "call", "instance": "bot", "data": {"n": 1}})
        assert status == 202
        [got] = await receiver.wait_for(1, "/bot")
    for secret in (old, new):  # a receiver on either secret accepts it
        payload = Webhook(secret).verify(got.body, got.headers)
        assert payload["data"] == {"n": 1}
    assert got.headers["webhook-id"] == answer["ids"][0] == got.json()["id"]
    assert len(got.headers["webhook-signature"].split()) == 2
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(got.body, got.headers)
    # It composes with jwt_key: the bearer token is there too.
    token = got.headers["Authorization"].removeprefix("Bearer ")
    assert jwt.decode(token, "a-jwt-secret-of-32-bytes-or-more!!", algorithms=["HS256"])["app"] == "evolution"


async def test_global_webhook_is_signed_and_a_retry_is_signed_anew(receiver, make_settings):
    secret = new_secret()
    receiver.script("/hook", [500])
    env = hook_env(
        receiver, "CALL", WEBHOOK_GLOBAL_SIGNING_SECRET=secret, WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05"
    )
    async with running(make_settings(**env)) as app:
        assert (await post_ingest(app, {"event": "call", "instance": "any", "data": {}}))[0] == 202
        first, retried = await receiver.wait_for(2, "/hook")
    for request in (first, retried):
        Webhook(secret).verify(request.body, request.headers)
    assert first.headers["webhook-id"] == retried.headers["webhook-id"]  # the same message


def test_a_secret_that_is_not_a_whsec_secret_is_named_not_shown(make_settings):
    with pytest.raises(ConfigError) as caught:
        make_settings(WEBHOOK_GLOBAL_SIGNING_SECRET="hunter2-not-base64")
    text = str(caught.value)
    assert (
        "WEBHOOK_GLOBAL_SIGNING_SECRET (environment): Value error, secret 1 must start with 'whsec_'" in text
    )
    assert "hunter2" not in text


async def test_the_example_receiver_checks_the_signature(make_settings, tmp_path):
    secret, port = new_secret(), free_port()
    receiver = subprocess.Popen(
        [sys.executable, "examples/receiver.py", "--port", str(port), "--signing-secret", secret],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert "listening" in receiver.stdout.readline()
        for name, key in (("good", secret), ("bad", new_secret())):
            write_instance(
                tmp_path / "instances",
                name,
                f"webhook: {{enabled: true, url: 'http://127.0.0.1:{port}/{name}', events: [CALL],"
                f" signingSecret: {key}}}\n",
            )
        settings = make_settings(WEBHOOK_RETRY_MAX_ATTEMPTS="1")
        async with running(settings) as app:
            for name in ("good", "bad"):
                assert (await post_ingest(app, {"event": "call", "instance": name, "data": {}}))[0] == 202
            await wait_idle(app, timeout=15)
            assert (await app.store.counts())["dead"] == 1  # type: ignore[union-attr]
        printed = receiver.stdout.readline()
        assert " call " in printed and "/good" in printed
    finally:
        receiver.terminate()
        receiver.wait(10)
        receiver.stdout.close()  # type: ignore[union-attr]
