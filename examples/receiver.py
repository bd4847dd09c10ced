"""A small webhook receiver for trying evolution-router out.

    python examples/receiver.py --port 9000 [--jwt-key SECRET]

Prints one line per event (id, event, instance) and, with --jwt-key, checks the bearer token
that a `jwt_key` header produces. Answers 200, so the router marks each delivery done; events
arrive at least once, so a real receiver de-duplicates on the envelope's `id`.
"""

from __future__ import annotations

import argparse
import json

import jwt
from aiohttp import web


def make_app(jwt_key: str | None) -> web.Application:
    seen: set[str] = set()

    async def receive(request: web.Request) -> web.Response:
        if jwt_key is not None:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            try:
                jwt.decode(token, jwt_key, algorithms=["HS256"])
            except jwt.PyJWTError as exc:
                return web.json_response({"error": f"bad token: {exc}"}, status=401)
        envelope = await request.json()
        duplicate = " (duplicate)" if envelope["id"] in seen else ""
        seen.add(envelope["id"])
        print(f"{envelope['id']} {envelope['event']:<28} {envelope['instance']} {request.path}{duplicate}")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{tail:.*}", receive)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--jwt-key")
    args = parser.parse_args()
    print(json.dumps({"listening": f"http://127.0.0.1:{args.port}/"}))
    web.run_app(make_app(args.jwt_key), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
