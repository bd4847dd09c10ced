"""Writing instance files, and noticing when someone else changed them.

The admin API writes ``<instance>.yaml`` atomically: the text goes to a hidden temporary file in
the same directory, is fsynced, and is renamed over the old file; the directory is fsynced too.
A reader (the daemon itself, an operator's editor, a crash at any moment) sees the old file or
the new one, never half of one. Hidden files are not instance files, so the temporary one is
never loaded.

``watch`` follows the directory (inotify, through watchfiles) and calls back after changes have
settled, so an operator's edit takes effect without SIGHUP.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import yaml
from watchfiles import Change, awatch

from router import logs
from router.instances import is_instance_file

log = logs.get_logger("router.instance_files")
WATCH_DEBOUNCE_MS = 300  # changes that come together (an editor's save) make one reload


def render(data: Mapping[str, Any], written_by: str) -> str:
    header = (
        f"# Written by evolution-router ({written_by}) at {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}.\n"
        "# Edit freely; the admin API rewrites the whole file, so comments are not kept.\n"
    )
    return header + yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=100)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, content: str | bytes) -> None:
    """Replace ``path`` with ``content`` (text as UTF-8): all of it or none of it, on disk when
    this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600: instance files hold tokens and secrets.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def remove(path: Path) -> None:
    """Delete ``path`` durably."""
    path.unlink()
    _fsync_directory(path.parent)


def _instance_file_changed(_: Change, path: str) -> bool:
    return is_instance_file(Path(path))


async def watch(directory: Path, on_change: Callable[[], Awaitable[None]], stop: anyio.Event) -> None:
    """Call ``on_change`` whenever instance files in ``directory`` change, until ``stop`` is set.

    Set ``stop`` rather than cancelling: the watching thread looks at it every 50 ms.
    """
    try:
        async for _ in awatch(
            directory,
            watch_filter=_instance_file_changed,
            debounce=WATCH_DEBOUNCE_MS,
            stop_event=stop,
            recursive=False,
        ):
            await on_change()
    except OSError as exc:  # no inotify watches left, directory removed ...: SIGHUP still works
        log.error("config.watch_failed", directory=str(directory), error=str(exc), hint="use SIGHUP")
