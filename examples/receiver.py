"""A small webhook receiver for trying evolution-router out.

    .venv/bin/python examples/receiver.py --port 9000 [--jwt-key SECRET] [--signing-secret whsec_...]

Prints one line per event (id, event, instance). With --jwt-key it checks the bearer token that
a `jwt_key` header produces; with --signing-secret, the Standard Webhooks signature
(`webhook-id`, `webhook-timestamp`, `webhook-signature`) and that the timestamp is within five
minutes. A request that fails a check gets 401. Otherwise it answers 200, so the router marks
the delivery done; events arrive at least once, so a real receiver de-duplicates on the
envelope's `id`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import time

import jwt
from aiohttp import web

TOLERANCE_S = 300


def signature_problem(secret: str, headers: dict[str, str] | web.Request, body: bytes) -> str | None:
    """Why a Standard Webhooks signature does not hold, or None when it does."""
    get = headers.headers.get if isinstance(headers, web.Request) else headers.get
    message_id, timestamp = get("webhook-id", ""), get("webhook-timestamp", "")
    if not message_id or not timestamp.isdigit():
        return "missing webhook-id or webhook-timestamp"
    if abs(time.time() - int(timestamp)) > TOLERANCE_S:
        return "timestamp too old or in the future"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [part.split(",", 1)[1] for part in get("webhook-signature", "").split() if part.startswith("v1,")]
    if not any(hmac.compare_digest(expected, signature) for signature in given):
        return "no signature matches"
    return None


def make_app(jwt_key: str | None, signing_secret: str | None = None) -> web.Application:
    seen: set[str] = set()

    async def receive(request: web.Request) -> web.Response:
        if signing_secret is not None:
            problem = signature_problem(signing_secret, request, await request.read())
            if problem is not None:
                return web.json_response({"error": f"bad signature: {problem}"}, status=401)
        if jwt_key is not None:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            try:
                jwt.decode(token, jwt_key, algorithms=["HS256"])
            except jwt.PyJWTError as exc:
                return web.json_response({"error": f"bad token: {exc}"}, status=401)
        envelope = await request.json()
        duplicate = " (duplicate)" if envelope["id"] in seen else ""
        seen.add(envelope["id"])
        line = f"{envelope['id']} {envelope['event']:<28} {envelope['instance']} {request.path}{duplicate}"
        print(line, flush=True)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{tail:.*}", receive)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--jwt-key")
    parser.add_argument("--signing-secret", help="the webhook's whsec_ secret (Standard Webhooks)")
    args = parser.parse_args()
    print(json.dumps({"listening": f"http://127.0.0.1:{args.port}/"}), flush=True)
    app = make_app(args.jwt_key, args.signing_secret)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
