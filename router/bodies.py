"""Reading request bodies for ``/ingest`` and the admin API, whatever the client sends.

The limit applies to the body as decompressed (a small gzip body can unpack to gigabytes), and a
body that cannot be decompressed is the client's error, not the server's. When a request is
answered without reading its compressed body (its key was refused), the connection is closed
after the answer instead of reading the rest, which would mean decompressing it.
"""

from __future__ import annotations

from aiohttp import web


class BodyError(Exception):
    """The body cannot be taken: answer ``status`` with this message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


CLOSE = web.RequestKey("close after the answer", bool)


async def close_marked(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: an answer that ends its connection says so (``Connection: close``),
    so the client does not send its next request on it."""
    if request.get(CLOSE):
        response.force_close()


def _close_after_answer(request: web.Request) -> None:
    """Answer, then close, without reading (and decompressing) what is left of the body."""
    request[CLOSE] = True
    protocol = request.protocol
    if protocol is not None and hasattr(protocol, "_lingering_time"):
        # aiohttp reads an unread body after the answer for up to 10 s ("lingering"), to keep
        # the connection; with 0 it closes the connection cleanly instead. No public switch.
        protocol._lingering_time = 0.0


def leave_unread(request: web.Request) -> None:
    """The request is answered without its body: do not decompress a compressed one."""
    if request.headers.get("Content-Encoding") and request.can_read_body:
        _close_after_answer(request)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, decompressed, at most ``limit`` bytes; BodyError (413 or 400) otherwise."""
    if request.content_length is not None and request.content_length > limit:
        _close_after_answer(request)
        raise BodyError(413, f"body of {request.content_length} bytes is over the limit of {limit}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        _close_after_answer(request)
        raise BodyError(413, f"body is over the limit of {limit} bytes (decompressed)") from None
    except web.RequestPayloadError as exc:
        _close_after_answer(request)
        encoding = request.headers.get("Content-Encoding", "")
        what = f"a valid {encoding} stream" if encoding else "complete"
        raise BodyError(400, f"body is not {what}: {exc}".replace("\n", " ")) from None
