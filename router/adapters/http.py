"""The ``http`` adapter: ``POST /ingest`` (and ``/ingest/<by-events suffix>``).

The body is one envelope (upstream's webhook format), a JSON array of them, or NDJSON. The answer
is 202 with the event ids once they are durably stored; 400 names what is wrong, 401 means no
valid key, 413 means the body is over ``ROUTER_INGEST_MAX_BYTES``, 503 that the state
directory's disk is full (nothing was stored; retry).

The key is the ``apikey`` header, or the password of HTTP Basic credentials: stock Evolution API
can only put it in ``WEBHOOK_GLOBAL_URL`` (``http://evolution:KEY@router:8080/ingest``). Clients
from ``ROUTER_INGEST_TRUSTED_HOSTS`` need none.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from router.addresses import AddressList
from router.apikeys import key_matches, request_keys
from router.bodies import BodyError, leave_unread, read_body
from router.errors import IntakeError, StoreRefused
from router.events import UnknownEventError, wire_from_suffix
from router.intake import Intake

INTAKE_KEY = web.AppKey("intake", Intake)
FULL_RETRY_AFTER_S = 10
TRUSTED_KEY = web.AppKey("ingest trusted hosts", AddressList)
MISSING_KEY = (
    "missing apikey: send an apikey header, or the key as the password of the URL"
    " (http://evolution:KEY@host:port/ingest)"
)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"status": status, "error": message}, status=status)


def decode_body(body: bytes) -> list[Any]:
    """A JSON object, a JSON array, or NDJSON -> a list of objects; IntakeError if none."""
    if not body.strip():
        raise IntakeError("empty body: expected a JSON object, a JSON array or NDJSON")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        lines = [line for line in body.splitlines() if line.strip()]
        if len(lines) < 2:
            raise IntakeError(f"malformed JSON: {exc}") from None
        items = []
        for number, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError as line_exc:
                raise IntakeError(f"malformed JSON on line {number}: {line_exc}") from None
        return items
    if isinstance(parsed, list):
        if not parsed:
            raise IntakeError("empty batch")
        return parsed
    return [parsed]


async def ingest(request: web.Request) -> web.Response:
    intake = request.app[INTAKE_KEY]
    keys = request_keys(request.headers)
    is_global = request.remote in request.app[TRUSTED_KEY] or any(
        key_matches(key, intake.settings.authentication_api_key) for key in keys
    )
    if not is_global:
        keys = [key for key in keys if intake.routes.is_token(key)]
        if not keys:
            leave_unread(request)
            return _error(401, "invalid apikey" if request_keys(request.headers) else MISSING_KEY)

    path_event = None
    if suffix := request.match_info.get("suffix"):
        try:
            path_event = wire_from_suffix(suffix)
        except UnknownEventError:
            leave_unread(request)
            return _error(400, f"unknown event path /ingest/{suffix}")

    try:
        body = await read_body(request, intake.settings.router_ingest_max_bytes)
    except BodyError as exc:
        return _error(exc.status, str(exc))

    try:
        events = await intake.parse_batch(decode_body(body), path_event)
    except IntakeError as exc:
        return _error(400, str(exc))
    if not is_global:
        for event in events:
            token = intake.routes.token_of(event.instance)
            if not any(key_matches(key, token) for key in keys):
                return _error(401, f"apikey is not valid for instance {event.instance!r}")
    try:
        ids = await intake.accept(events)
    except StoreRefused as exc:  # senders (upstream among them) retry a 503; nothing was taken
        answer = _error(503, str(exc))
        answer.headers["Retry-After"] = str(FULL_RETRY_AFTER_S)
        return answer
    accepted = orjson.dumps({"status": 202, "accepted": len(ids), "ids": ids})
    return web.Response(body=accepted, status=202, content_type="application/json", charset="utf-8")


def add_routes(app: web.Application, intake: Intake) -> None:
    app[INTAKE_KEY] = intake
    app[TRUSTED_KEY] = AddressList(intake.settings.router_ingest_trusted_hosts)
    app.router.add_post("/ingest", ingest)
    app.router.add_post("/ingest/{suffix}", ingest)
