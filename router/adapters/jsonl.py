"""The ``jsonl`` adapter: one envelope per line, from stdin (``-``) or a file it follows.

For a file, the byte offset after the last accepted line is stored with the events it
accepted (same transaction), so a restart resumes exactly there: no line is lost or read
twice. A file that shrinks or is replaced (log rotation) is read again from its start. A bad
line is logged with its line number and byte offset and skipped: it was never accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from router import logs
from router.errors import IntakeError, StoreRefused
from router.intake import Intake

log = logs.get_logger("router.adapters.jsonl")

BATCH_LINES = 1000
# A file has no "data ready" signal that works everywhere; like `tail -f`, look again after this.
FOLLOW_INTERVAL_S = 0.2
FULL_RETRY_S = 1.0  # with the disk full, lines wait this long before they are tried again


class JsonlAdapter:
    def __init__(self, intake: Intake, path: str, follow_interval_s: float = FOLLOW_INTERVAL_S) -> None:
        self.intake = intake
        self.path = path
        self.follow_interval_s = follow_interval_s
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        try:
            if self.path != "-":
                await self._follow(Path(self.path))
            elif stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode):
                await self._read_regular_stdin(sys.stdin.buffer)  # `--jsonl - < file`
            else:
                await self._read_stdin()
        except Exception:  # a broken source must not stop the daemon or the other adapters
            log.exception("jsonl.failed", source=self.path)

    async def _read_regular_stdin(self, handle: BinaryIO) -> None:
        offset = 0
        lines = []
        for number, line in enumerate(handle, 1):
            lines.append((number, offset, line))
            offset += len(line)
            if len(lines) >= BATCH_LINES:
                await self._accept_lines(lines, None)
                lines = []
            if self._stop.is_set():
                return
        await self._accept_lines(lines, None)

    async def _accept_lines(
        self, lines: list[tuple[int, int, bytes]], checkpoint: tuple[str, str] | None
    ) -> None:
        objects: list[Any] = []
        for number, offset, line in lines:
            if not line.strip():
                continue
            try:
                objects.append(self.intake.parse(orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                log.error(
                    "jsonl.bad_line",
                    source=self.path,
                    line=number,
                    offset=offset,
                    error=f"malformed JSON: {exc}",
                )
            except IntakeError as exc:
                log.error("jsonl.bad_line", source=self.path, line=number, offset=offset, error=str(exc))
        while True:  # the checkpoint moves only once they are stored: retried, never skipped
            try:
                await self.intake.accept(objects, checkpoint, adapter="jsonl")
                return
            except StoreRefused as exc:
                log.error("jsonl.cannot_store", source=self.path, error=str(exc), retry_in_s=FULL_RETRY_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), FULL_RETRY_S)
                if self._stop.is_set():
                    return

    async def _read_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.intake.settings.router_ingest_max_bytes)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer
        )
        # Bounded hand-over: lines that arrived together are stored together (one commit).
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=BATCH_LINES)

        async def read_lines() -> None:
            while line := await reader.readline():
                await queue.put(line)
            await queue.put(None)

        try:
            async with asyncio.TaskGroup() as group:
                reading = group.create_task(read_lines())
                number = offset = 0
                done = False
                while not done and not self._stop.is_set():
                    lines = []
                    item = await queue.get()
                    while item is not None:
                        number += 1
                        lines.append((number, offset, item))
                        offset += len(item)
                        if len(lines) >= BATCH_LINES or queue.empty():
                            break
                        item = queue.get_nowait()
                    done = item is None
                    await self._accept_lines(lines, None)
                reading.cancel()
        finally:
            transport.close()

    async def _follow(self, path: Path) -> None:
        source = f"jsonl:{path.resolve()}"
        saved = await self.intake.store.checkpoint(source)
        while not self._stop.is_set():
            handle = await self._open(path)
            if handle is None:
                await self._pause()
                continue
            with handle:
                inode = os.fstat(handle.fileno()).st_ino
                offset = 0
                if saved is not None:
                    saved_inode, _, saved_offset = saved.partition(":")
                    if saved_inode == str(inode) and int(saved_offset) <= os.fstat(handle.fileno()).st_size:
                        offset = int(saved_offset)
                    saved = None
                handle.seek(offset)
                log.info("jsonl.following", source=str(path), offset=offset)
                await self._read_file(path, handle, source, inode, offset)

    async def _open(self, path: Path) -> BinaryIO | None:
        try:
            return path.open("rb")
        except FileNotFoundError:
            return None

    async def _read_file(self, path: Path, handle: BinaryIO, source: str, inode: int, offset: int) -> None:
        number = 0  # counted from where this read started
        pending = b""
        while not self._stop.is_set():
            chunk = handle.read(1 << 20)
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                lines = []
                for line in complete:
                    number += 1
                    lines.append((number, offset, line))
                    offset += len(line) + 1
                    if len(lines) >= BATCH_LINES:
                        await self._accept_lines(lines, (source, f"{inode}:{offset}"))
                        lines = []
                if lines:
                    await self._accept_lines(lines, (source, f"{inode}:{offset}"))
                continue
            # At the end: has the file been truncated or replaced?
            try:
                current = path.stat()
            except FileNotFoundError:
                current = None
            if current is None or current.st_ino != inode or current.st_size < offset + len(pending):
                log.info("jsonl.reopen", source=str(path), reason="rotated or truncated")
                return
            await self._pause()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self.follow_interval_s)
