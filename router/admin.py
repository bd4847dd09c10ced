"""The admin API, compatible with Evolution API's: instances and their sinks, kept as files.

    POST   /instance/create                  upstream's body; writes <instance>.yaml
    GET    /instance/fetchInstances          every instance (?instanceName=, ?instanceId=, ?number=)
    GET    /instance/connectionState/{instance}  the connection's state, as last reported
    DELETE /instance/delete/{instance}       removes the file
    POST   /{sink}/set/{instance}            body {"<sink>": {...}}; rewrites that section
    GET    /{sink}/find/{instance}           the section as upstream's row, or null

``{sink}`` is webhook, rabbitmq, sqs, pusher or websocket. The ``apikey`` header carries the
global key (everything) or an instance's token (that instance only). Every change is validated
in full before anything is written, written atomically, and in force when the answer comes:
the routes are swapped under the same lock. ``instance.create``, ``instance.delete`` and
``remove.instance`` are emitted as upstream emits them. Request and answer shapes are in
``router.admin_shapes``. Errors have upstream's shape:
``{"status": 400, "error": "Bad Request", "response": {"message": ["webhook.url: ..."]}}``
(a 401's message is the string ``"Unauthorized"``, as upstream's).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from router import instance_files, logs
from router.adapters import whatsapp
from router.admin_shapes import (
    SINKS,
    create_answer,
    file_from_create,
    instance_row,
    section_from_body,
    sink_row,
    too_deep,
)
from router.apikeys import key_matches
from router.bodies import BodyError, leave_unread, read_body
from router.errors import ConfigError, StoreRefused
from router.events import utc_timestamp
from router.instance_status import InstanceStatus
from router.instances import (
    InstanceConfig,
    InvalidInstance,
    check_instance_name,
    same_but_for_case,
    validate_instance,
)
from router.intake import Intake
from router.routing import Routes
from router.settings import Settings
from router.sinks.registry import SECTIONS
from router.yamlfile import format_loc, load_yaml


class AdminHost(Protocol):
    """What the admin API needs of the daemon (``App`` is one): the instances in force, their
    files, the lock that serialises changes, and a reload that publishes them."""

    settings: Settings
    status: InstanceStatus
    config_lock: asyncio.Lock

    @property
    def instances(self) -> Mapping[str, InstanceConfig]: ...

    @property
    def instance_paths(self) -> Mapping[str, Path]: ...

    @property
    def routes(self) -> Routes: ...

    @property
    def intake(self) -> Intake | None: ...

    async def reload_locked(self) -> None: ...


log = logs.get_logger("router.admin")
QRCODE_WAIT_S = 5.0  # upstream waits 5 s for the first QR code when create asks for one
MAX_BODY_BYTES = 1 << 20  # an instance's settings are a few KB
MAX_DEPTH = 32  # levels of nesting in a body; instance files are a few levels deep


class Refused(Exception):
    """Answer the request with ``status`` and these messages."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__("; ".join(messages))
        self.status = status
        self.messages = list(messages)


def _answer(status: int, body: Any) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda value: orjson.dumps(value).decode())


def _problems(exc: InvalidInstance) -> list[str]:
    return [f"{format_loc(loc)}: {what}" for loc, what in exc.problems]


def _ignored(request: web.Request, instance: str, keys: list[str]) -> None:
    if keys:
        log.warning(
            "admin.keys_ignored",
            path=request.path,
            instance=instance,
            keys=keys,
            hint="not used by the router",
        )


@web.middleware
async def upstream_not_found(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown routes answer as upstream's express app does: JSON naming the method and path."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        if exc.text and exc.content_type == "application/json":
            raise  # a handler's own answer
        message = [f"Cannot {request.method} {request.path_qs}"]
        body = {"status": 404, "error": "Not Found", "response": {"message": message}}
        return _answer(404, body)


class Admin:
    """The handlers; the daemon (``App``) holds the instances, their files and the lock."""

    def __init__(self, app: AdminHost) -> None:
        self.app = app

    def add_routes(self, web_app: web.Application) -> None:
        router = web_app.router
        router.add_post("/instance/create", self._handle(self.create))
        router.add_get("/instance/fetchInstances", self._handle(self.fetch_instances))
        router.add_get("/instance/connectionState/{instance}", self._handle(self.connection_state))
        router.add_delete("/instance/delete/{instance}", self._handle(self.delete))
        for sink in SINKS:
            router.add_post(f"/{sink}/set/{{instance}}", self._handle(self.set_sink, sink))
            router.add_get(f"/{sink}/find/{{instance}}", self._handle(self.find_sink, sink))

    def _handle(self, handler: Any, *args: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            try:
                try:
                    return await handler(request, *args)  # type: ignore[no-any-return]
                except StoreRefused as full:  # the file may be written; its lifecycle event is not
                    raise Refused(503, str(full)) from None
            except Refused as exc:
                leave_unread(request)
                log.warning(
                    "admin.refused",
                    method=request.method,
                    path=request.path,
                    status=exc.status,
                    error=str(exc),
                )
                phrase = HTTPStatus(exc.status).phrase
                # Upstream's UnauthorizedException() says "Unauthorized", a string; the others a list.
                message: Any = exc.messages[0] if exc.status == 401 else exc.messages
                body = {"status": exc.status, "error": phrase, "response": {"message": message}}
                return _answer(exc.status, body)

        return handle

    # --- checks ---------------------------------------------------------------------------

    def _authorise(self, request: web.Request, instance: str | None) -> None:
        """The global key may do anything, an instance's token act on its own instance; else 401."""
        key = request.headers.get("apikey")
        if not key:
            raise Refused(401, "Unauthorized")
        if key_matches(key, self.app.settings.authentication_api_key):
            return
        config = self.app.instances.get(instance) if instance is not None else None
        if config is None or not key_matches(key, config.token):
            raise Refused(401, "Unauthorized")

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await read_body(request, MAX_BODY_BYTES))
        except BodyError as exc:
            raise Refused(exc.status, str(exc)) from None
        except orjson.JSONDecodeError as exc:
            raise Refused(400, f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise Refused(400, f"expected a JSON object, got {type(body).__name__}")
        if too_deep(body, MAX_DEPTH):
            raise Refused(400, f"the body is nested deeper than {MAX_DEPTH} levels")
        return body

    def _existing(self, instance: str) -> InstanceConfig:
        config = self.app.instances.get(instance)
        if config is None:
            raise Refused(404, f'The "{instance}" instance does not exist')
        return config

    def _validated(self, data: dict[str, Any], name: str) -> InstanceConfig:
        try:
            config = validate_instance(data, name)
        except InvalidInstance as exc:
            raise Refused(400, *_problems(exc)) from None
        if (refusal := self.app.routes.refuses_instance(name)) is not None:
            raise Refused(400, f"instanceName: {refusal}")
        for sink, section in config.sections.items():
            if section.enabled and not SECTIONS[sink].enabled(self.app.settings):
                log.warning(
                    "admin.sink_disabled", instance=name, sink=sink, setting=f"{sink.upper()}_ENABLED"
                )
        return config

    async def _write(self, path: Path, data: dict[str, Any], written_by: str) -> None:
        """Write the file and swap the routes; the caller holds ``config_lock``."""
        text = instance_files.render(data, written_by)
        await asyncio.to_thread(instance_files.write_atomically, path, text)
        await self.app.reload_locked()

    async def _emit(self, wire: str, config: InstanceConfig, data: Any) -> None:
        """Lifecycle events, through intake like any event (durable)."""
        intake = self.app.intake
        assert intake is not None, "admin API before the daemon serves"
        events = intake.parse_many([{"event": wire, "instance": config.instance_name, "data": data}])
        await intake.accept(events, adapter="admin")

    def _state(self, name: str) -> str:
        return self.app.status.get(name).state

    # --- handlers ---------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        self._authorise(request, None)  # the global key only: there is no instance yet
        body = await self._body(request)
        name = body.get("instanceName")
        if not isinstance(name, str) or not name:
            raise Refused(400, "instanceName: is required")
        try:
            name = check_instance_name(name)
        except ValueError as exc:
            raise Refused(400, f"instanceName: {exc}") from None
        given, ignored = file_from_create(body)
        _ignored(request, name, ignored)
        # The file: upstream's body as sent, with the instance id and token it is given here.
        data = {
            "instanceName": name,
            "instanceId": str(uuid.uuid4()),
            "integration": body.get("integration") or "WHATSAPP-BAILEYS",
            "token": body.get("token") or str(uuid.uuid4()).upper(),
        }
        data |= {key: value for key, value in given.items() if key not in data}
        async with self.app.config_lock:
            config = self._validated(data, name)
            if name in self.app.instances:
                raise Refused(403, f'This name "{name}" is already in use.')
            if (other := same_but_for_case(name, self.app.instances)) is not None:
                raise Refused(
                    403, f'This name "{name}" is already in use (as "{other}", which differs by case).'
                )
            self.app.status.forget(name)  # a former instance of that name
            path = self.app.settings.router_instances_dir / f"{name}.yaml"
            await self._write(path, data, "POST /instance/create")
            ids = {"instanceName": name, "instanceId": config.id}
            await self._emit("instance.create", config, ids)
        log.info("admin.instance_created", instance=name, file=str(path))
        qrcode_asked = body.get("qrcode") is True and config.integration == whatsapp.INTEGRATION
        qrcode = await self.app.status.wait_for_qrcode(name, QRCODE_WAIT_S) if qrcode_asked else None
        return _answer(201, create_answer(config, self._state(name), qrcode, qrcode_asked))

    async def fetch_instances(self, request: web.Request) -> web.Response:
        query = request.query
        wanted = {key: query[key] for key in ("instanceName", "instanceId", "number") if query.get(key)}
        key = request.headers.get("apikey") or ""
        if not key:
            raise Refused(401, "Unauthorized")
        configs = list(self.app.instances.values())
        is_global = key_matches(key, self.app.settings.authentication_api_key)
        if not is_global:  # an instance token sees its own instance only, as upstream looks it up
            configs = [config for config in configs if key_matches(key, config.token)]
        for field, value in wanted.items():
            configs = [config for config in configs if _identity(config, field) == value]
        if not configs and not is_global:
            raise Refused(401, "Unauthorized")
        if wanted and not configs:
            raise Refused(404, f'Instance "{next(iter(wanted.values()))}" not found')
        paths = self.app.instance_paths
        answer = [
            instance_row(config, self.app.status.get(config.instance_name), _modified(paths.get(name)))
            for name, config in sorted((config.instance_name, config) for config in configs)
        ]
        return _answer(200, answer)

    async def connection_state(self, request: web.Request) -> web.Response:
        instance = request.match_info["instance"]
        self._authorise(request, instance)
        self._existing(instance)
        return _answer(200, {"instance": {"instanceName": instance, "state": self._state(instance)}})

    async def delete(self, request: web.Request) -> web.Response:
        instance = request.match_info["instance"]
        self._authorise(request, instance)
        async with self.app.config_lock:
            config = self._existing(instance)
            # Emitted while the instance still exists, so its own subscriptions receive them, in
            # upstream's order; its removed targets then deliver what is stored for them (see
            # Dispatcher.apply).
            await self._emit("instance.delete", config, {"instanceName": instance, "instanceId": config.id})
            await self._emit("remove.instance", config, None)
            path = self.app.instance_paths[instance]
            await asyncio.to_thread(instance_files.remove, path)
            await self.app.reload_locked()
            self.app.status.forget(instance)
        log.info("admin.instance_deleted", instance=instance, file=str(path))
        return _answer(
            200, {"status": "SUCCESS", "error": False, "response": {"message": "Instance deleted"}}
        )

    async def set_sink(self, request: web.Request, sink: str) -> web.Response:
        instance = request.match_info["instance"]
        self._authorise(request, instance)
        body = await self._body(request)
        # Upstream's body is {"webhook": {...}}; its older flat form ({"enabled": ...}) works too.
        given = body.get(sink, body if "enabled" in body else None)
        if not isinstance(given, dict):
            raise Refused(400, f'{sink}: is required, as an object: {{"{sink}": {{"enabled": true, ...}}}}')
        section, ignored = section_from_body(sink, given)
        _ignored(request, instance, ignored)
        async with self.app.config_lock:
            self._existing(instance)
            path = self.app.instance_paths[instance]
            try:
                data = (await asyncio.to_thread(load_yaml, path)).data
            except ConfigError as exc:
                raise Refused(409, f"{path} does not read as YAML; fix it first", *exc.problems) from None
            merged = {**(data.get(sink) or {}), **section}  # keys not sent keep their value
            if not merged.get("enabled"):
                merged["events"] = []  # upstream: a disabled sink has no events
            data = {**data, sink: merged}
            config = self._validated(data, instance)
            await self._write(path, data, f"POST /{sink}/set/{instance}")
        log.info("admin.sink_set", instance=instance, sink=sink, enabled=config.section(sink).enabled)
        return _answer(201, sink_row(config, sink))

    async def find_sink(self, request: web.Request, sink: str) -> web.Response:
        instance = request.match_info["instance"]
        self._authorise(request, instance)
        return _answer(200, sink_row(self._existing(instance), sink))


def _identity(config: InstanceConfig, field: str) -> Any:
    """What fetchInstances' ``?instanceName=``, ``?instanceId=`` and ``?number=`` compare."""
    if field == "instanceName":
        return config.instance_name
    if field == "instanceId":
        return config.id
    return (config.model_extra or {}).get(field)


def _modified(path: Path | None) -> str | None:
    """A file's modification time as upstream writes ``updatedAt``."""
    try:
        return utc_timestamp(datetime.fromtimestamp(path.stat().st_mtime, UTC)) if path else None
    except OSError:
        return None
