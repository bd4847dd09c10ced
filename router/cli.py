"""The ``evolution-router`` command: run, check, send, events."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from router import __version__, logs
from router.adapters import whatsapp
from router.deadletters import pending_by_target
from router.errors import ConfigError
from router.events import EVERY_EVENT, STARTUP, WIRE_NAMES, by_events_suffix, config_name
from router.instances import load_instances
from router.redact import redact_url
from router.routing import Routes, build_routes
from router.settings import DEFAULT_CONFIG_FILE, DEFAULT_ENV_FILE, Settings, load_settings
from router.sinks.registry import SINKS, kind_of

if TYPE_CHECKING:
    from router.app import App


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, args.env_file)


def _print_problems(problems: list[str]) -> None:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from router.app import App  # noqa: PLC0415 - keeps `check`/`events` light

    settings = _settings(args)
    if args.jsonl:
        settings = settings.model_copy(update={"router_jsonl_path": args.jsonl})
    logs.configure(settings.log_level, settings.log_format, settings.log_color)
    # Delivery allocates many short-lived objects and few cycles: collect the youngest generation
    # less often (~10% more events/s), and once the daemon has started, move what start-up made
    # (imports, instances, routes, a worker per target) out of the collector's way: with 10,000
    # instances every full collection walked them all again.
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    # The store's thread waits for the interpreter lock whenever it returns from SQLite, and
    # intake's 202 waits for that thread: by default a busy event loop keeps the lock up to 5 ms
    # each time. At 1 ms, a batch of 500 events for 500 targets is committed in 30 ms instead of
    # 38 (measured with `make bench`, scale section).
    sys.setswitchinterval(0.001)
    run_loop(serve(App(settings)), settings.router_event_loop)
    return 0


async def serve(app: App) -> None:
    async def freeze_once_started() -> None:
        await app.started.wait()
        gc.freeze()

    freezer = asyncio.create_task(freeze_once_started(), name="gc freeze")
    try:
        await app.run(install_signals=True)
    finally:
        freezer.cancel()


def run_loop(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run ``main`` on uvloop (measured ~20% more deliveries/s than the default loop)."""
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only the daemon needs it

        uvloop.run(main)
    else:
        asyncio.run(main)


def describe_routes(routes: Routes, settings: Settings) -> list[str]:
    """Which sinks receive which events: one line per target."""
    lines = []
    for key, target in sorted(routes.targets.items()):
        events = sorted(target.events)
        shown = ", ".join(events) or "no events"
        if target.events >= EVERY_EVENT:
            shown = "all events" + (f", {STARTUP}" if STARTUP in target.events else "")
        scope = target.instance or "global (every instance)"
        kind = kind_of(key)
        where = kind.describe(target, settings) if kind is not None else "?"
        lines.append(f"  {scope}: {target.sink} -> {where}: {shown}")
    return lines


def describe_layouts(settings: Settings) -> list[str]:
    """Which layout consumers see, for the sinks that have more than one."""
    lines = [line for kind in SINKS if kind.enabled(settings) and (line := kind.layout(settings))]
    modes = settings.ordering_modes()
    enabled = [f"{kind.name} {modes[kind.name]}" for kind in SINKS if kind.enabled(settings)]
    if enabled:  # which deliveries go one at a time (ROUTER_<SINK>_ORDERING)
        lines.append(f"ordering: {', '.join(enabled)}")
    return lines


def cmd_check(args: argparse.Namespace) -> int:
    problems: list[str] = []
    try:
        settings = _settings(args)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 1
    directory = settings.router_instances_dir
    with tempfile.TemporaryDirectory() as exported:
        if settings.router_database_url:  # the instances the routers share, as they will load them
            from router.shared_instances import export_directory  # noqa: PLC0415

            directory = Path(exported)
            asyncio.run(export_directory(settings.router_database_url, directory))
        loaded = load_instances(directory)
    problems += loaded.problems
    routes = build_routes(settings, loaded.instances)
    print(f"settings: ok (port {settings.server_port}, state {settings.router_state_dir})")
    if settings.router_database_url:
        print(f"queue: {redact_url(settings.router_database_url)} (shared; instances from the database)")
    where = "the database" if settings.router_database_url else directory
    print(f"instances: {len(loaded.instances)} valid in {where}")
    for name in sorted(loaded.instances):
        print(f"  {name}: {loaded.files[name].name if settings.router_database_url else loaded.files[name]}")
    for line in describe_layouts(settings):
        print(line)
    print("routes:")
    print("\n".join(describe_routes(routes, settings)) or "  (none: no sink is enabled)")
    problems += asyncio.run(_check_sinks(settings, routes))
    problems += whatsapp.check(loaded.instances)
    problems += waiting_without_sink(settings)
    for kind in SINKS:
        for warning in kind.warnings(settings) if kind.enabled(settings) else ():
            print(f"warning: {warning}", file=sys.stderr)
    _print_problems(problems)
    return 1 if problems else 0


async def _check_sinks(settings: Settings, routes: Routes) -> list[str]:
    """Each enabled sink's own check (an authenticated call, a connection), as at start."""
    from router.errors import DeliveryError  # noqa: PLC0415

    problems = []
    for kind in SINKS:
        if not kind.enabled(settings) or not kind.checked_by_cli:
            continue
        targets = [target for key, target in routes.targets.items() if kind_of(key) is kind]
        async with kind.open(settings) as sink:
            try:
                await sink.check(targets)
            except DeliveryError as exc:
                problems.append(f"{kind.name}: {exc}")
    return problems


def waiting_without_sink(settings: Settings) -> list[str]:
    """Deliveries stored for a sink that is not enabled now: they become dead letters at start."""
    problems = []
    for target, count in pending_by_target(settings.queue).items():
        kind = kind_of(target)
        if kind is None or not kind.enabled(settings):
            sink = target.split(":", 1)[0]
            problems.append(
                f"{count} deliveries stored for {target} wait for the {sink} sink, which is not enabled:"
                " at the next start they become dead letters (replay them once it is back)"
            )
    return problems


def cmd_events(_: argparse.Namespace) -> int:
    print(f"{'CONFIG NAME':<28} {'WIRE NAME':<28} BY-EVENTS SUFFIX")
    for wire in WIRE_NAMES:
        print(f"{config_name(wire):<28} {wire:<28} {by_events_suffix(wire)}")
    print(f"{'GROUP_UPDATE':<28} {'groups.update':<28} (alias of GROUPS_UPDATE)")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    if args.url is None or args.apikey is None:  # only then are the daemon's settings needed
        settings = _settings(args)
        args.url = args.url or f"http://127.0.0.1:{settings.server_port}"
        args.apikey = args.apikey or settings.authentication_api_key
    try:
        data = orjson.loads(args.data) if args.data else {}
    except orjson.JSONDecodeError as exc:
        print(f"error: --data is not JSON: {exc}", file=sys.stderr)
        return 1
    envelope = {"event": args.event, "instance": args.instance, "data": data}
    url = args.url
    request = urllib.request.Request(
        url.rstrip("/") + "/ingest",
        data=orjson.dumps(envelope),
        headers={"Content-Type": "application/json", "apikey": args.apikey or ""},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"error: HTTP {exc.code}: {exc.read().decode()}", file=sys.stderr)
    except urllib.error.URLError as exc:
        print(f"error: cannot reach {url}: {exc.reason}", file=sys.stderr)
    return 1


def cmd_instances(args: argparse.Namespace) -> int:
    from router import shared_instances  # noqa: PLC0415

    settings = _settings(args)
    url = settings.router_database_url
    if url is None:
        raise ConfigError(["instances import|export: ROUTER_DATABASE_URL is not set (instances are files)"])
    directory = args.directory or settings.router_instances_dir
    if args.action == "import":
        loaded = load_instances(directory)
        if loaded.problems:
            _print_problems(loaded.problems)
            return 1
        count = asyncio.run(shared_instances.import_directory(url, directory))
        print(f"imported {count} instances from {directory}")
    else:
        count = asyncio.run(shared_instances.export_directory(url, directory))
        print(f"exported {count} instances to {directory}")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from router import deadletters  # noqa: PLC0415

    path = _settings(args).queue
    selection = deadletters.Selection(
        ids=tuple(getattr(args, "ids", ()) or ()),
        instance=args.instance,
        sink=args.sink,
        event=args.event,
        since=deadletters.parse_time(args.since) if args.since else None,
        until=deadletters.parse_time(args.until) if args.until else None,
    )
    if args.action == "show":
        for delivery_id in selection.ids:
            print(orjson.dumps(deadletters.show(path, delivery_id), option=orjson.OPT_INDENT_2).decode())
        return 0
    if args.action == "list":
        rows = deadletters.dead_letters(path, selection)
        print(
            f"{'ID':>8}  {'DIED (UTC)':<20} {'INSTANCE':<20} {'EVENT':<24}"
            f" {'TARGET':<32} {'TRIES':>5}  LAST ERROR"
        )
        for row in rows:
            died = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["updated_at"]))
            print(
                f"{row['id']:>8}  {died:<20} {row['instance']:<20} {row['event']:<24} {row['target']:<32}"
                f" {row['attempts']:>5}  {row['last_error']}"
            )
        print(f"{len(rows)} dead letter(s)", file=sys.stderr)
        return 0
    if not selection.narrows and not getattr(args, "all", False):
        raise ConfigError([f"dlq {args.action}: name ids or a filter, or pass --all for every dead letter"])
    if args.action == "replay":
        count = deadletters.replay(path, selection)
        print(f"replayed {count} dead letter(s): pending again, due now")
    else:
        count = deadletters.purge(path, selection)
        print(f"purged {count} dead letter(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evolution-router", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_FILE,
        help="router.yaml (default: %(default)s)",
    )
    parser.add_argument(
        "--env-file", type=Path, default=DEFAULT_ENV_FILE, help=".env file (default: %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--jsonl", metavar="PATH", help="also read events from PATH ('-' for stdin)")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="validate the configuration and print the routes")
    check.set_defaults(func=cmd_check)

    send = commands.add_parser("send", help="post one event to a running daemon")
    send.add_argument("--instance", required=True)
    send.add_argument("--event", required=True, help="wire or config name, e.g. messages.upsert")
    send.add_argument("--data", help="the event's data as JSON (default: {})")
    send.add_argument("--url", help="the daemon's base URL (default: http://127.0.0.1:SERVER_PORT)")
    send.add_argument("--apikey", help="default: AUTHENTICATION_API_KEY")
    send.set_defaults(func=cmd_send)

    events = commands.add_parser("events", help="list every event and its names")
    events.set_defaults(func=cmd_events)

    shared = commands.add_parser("instances", help="with ROUTER_DATABASE_URL: instances in the database")
    moves = shared.add_subparsers(dest="action", required=True)
    for action, helptext in (
        ("import", "every instance file of DIR into the database (added or replaced)"),
        ("export", "every instance in the database as a file in DIR"),
    ):
        sub = moves.add_parser(action, help=helptext)
        sub.add_argument(
            "directory", nargs="?", type=Path, metavar="DIR", help="default: ROUTER_INSTANCES_DIR"
        )
        sub.set_defaults(func=cmd_instances)

    dlq = commands.add_parser("dlq", help="dead letters: list, show, replay, purge")
    actions = dlq.add_subparsers(dest="action", required=True)
    for action, helptext in (
        ("list", "list dead letters (filters narrow)"),
        ("show", "a dead letter's envelope and every attempt's error"),
        ("replay", "make dead letters pending again; they go through the normal retry path"),
        ("purge", "delete dead letters"),
    ):
        sub = actions.add_parser(action, help=helptext)
        if action == "show":
            sub.add_argument("ids", nargs="+", type=int, metavar="ID")
        elif action != "list":
            sub.add_argument("ids", nargs="*", type=int, metavar="ID")
            sub.add_argument("--all", action="store_true", help="every dead letter the filters leave")
        sub.add_argument("--instance")
        sub.add_argument("--sink", choices=[kind.name for kind in SINKS])
        sub.add_argument("--event", help="wire name, e.g. messages.upsert")
        sub.add_argument("--since", help="died at or after (ISO-8601 or unix seconds)")
        sub.add_argument("--until", help="died before (ISO-8601 or unix seconds)")
        sub.set_defaults(func=cmd_dlq)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 1
    except KeyboardInterrupt:
        return 130
