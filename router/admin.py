"""The admin API, compatible with Evolution API's: instances and their sinks, kept as files.

    POST   /instance/create                  upstream's body; writes <instance>.yaml
    GET    /instance/fetchInstances          every instance (?instanceName= for one)
    DELETE /instance/delete/{instance}       removes the file
    POST   /{sink}/set/{instance}            body {"<sink>": {...}}; rewrites that section
    GET    /{sink}/find/{instance}           the section as upstream's row, or null

``{sink}`` is webhook, rabbitmq, sqs, pusher or websocket. The ``apikey`` header carries the
global key (everything) or an instance's token (that instance only). Every change is validated
in full before anything is written, written atomically, and in force when the answer comes:
the routes are swapped under the same lock. ``instance.create`` and ``instance.delete`` are
emitted as upstream emits them. Errors have upstream's shape:
``{"status": 400, "error": "Bad Request", "response": {"message": ["webhook.url: ..."]}}``.
"""

from __future__ import annotations

import asyncio
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from router import instance_files, logs
from router.apikeys import key_matches
from router.errors import ConfigError
from router.events import WIRE_NAMES, config_name
from router.instances import InstanceConfig, InvalidInstance, topic_safe, validate_instance
from router.yamlfile import format_loc, load_yaml

if TYPE_CHECKING:
    from router.app import App

log = logs.get_logger("router.admin")
SINKS = ("webhook", "rabbitmq", "sqs", "pusher", "websocket")
SINK_ENABLED_SETTING = {
    "rabbitmq": "rabbitmq_enabled",
    "sqs": "sqs_enabled",
    "pusher": "pusher_enabled",
    "websocket": "websocket_enabled",
}
# Upstream's per-instance settings, as its create answer and fetchInstances report them.
SETTING_DEFAULTS: dict[str, Any] = {
    "rejectCall": False,
    "msgCall": "",
    "groupsIgnore": False,
    "alwaysOnline": False,
    "readMessages": False,
    "readStatus": False,
    "syncFullHistory": False,
}


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


def sink_row(config: InstanceConfig, sink: str) -> dict[str, Any] | None:
    """A sink section as upstream's database row; None where the instance has no such section."""
    if sink not in config.model_fields_set:
        return None
    section = getattr(config, sink)
    subscribed = section.subscribed()  # upstream stores `events: []` as every event
    row: dict[str, Any] = {
        "id": str(uuid.uuid5(uuid.UUID(config.id), sink)),
        "enabled": section.enabled,
        "events": [config_name(wire) for wire in WIRE_NAMES if wire in subscribed],
    }
    if sink == "webhook":
        hook = config.webhook
        row |= {
            "url": hook.url,
            "headers": hook.headers or None,
            "webhookByEvents": hook.by_events,
            "webhookBase64": hook.base64,
        }
    elif sink == "pusher":
        push = config.pusher
        row |= {
            "appId": push.app_id,
            "key": push.key,
            "secret": push.secret,
            "cluster": push.cluster,
            "useTLS": push.use_tls,
        }
    row["instanceId"] = config.id
    return row


def settings_of(config: InstanceConfig) -> dict[str, Any]:
    extra = config.model_extra or {}
    return {key: extra.get(key, default) for key, default in SETTING_DEFAULTS.items()}


class Admin:
    """The handlers; the daemon (``App``) holds the instances, their files and the lock."""

    def __init__(self, app: App) -> None:
        self.app = app

    def add_routes(self, web_app: web.Application) -> None:
        router = web_app.router
        router.add_post("/instance/create", self._handle(self.create))
        router.add_get("/instance/fetchInstances", self._handle(self.fetch_instances))
        router.add_delete("/instance/delete/{instance}", self._handle(self.delete))
        for sink in SINKS:
            router.add_post(f"/{sink}/set/{{instance}}", self._handle(self.set_sink, sink))
            router.add_get(f"/{sink}/find/{{instance}}", self._handle(self.find_sink, sink))

    def _handle(self, handler: Any, *args: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            try:
                return await handler(request, *args)  # type: ignore[no-any-return]
            except Refused as exc:
                log.warning(
                    "admin.refused",
                    method=request.method,
                    path=request.path,
                    status=exc.status,
                    error=str(exc),
                )
                phrase = HTTPStatus(exc.status).phrase
                body = {"status": exc.status, "error": phrase, "response": {"message": exc.messages}}
                return _answer(exc.status, body)

        return handle

    # --- checks ---------------------------------------------------------------------------

    def _authorise(self, request: web.Request, instance: str | None) -> None:
        """The global key may do anything, an instance's token act on its own instance; else 401."""
        key = request.headers.get("apikey")
        if not key:
            raise Refused(401, "missing apikey header")
        if key_matches(key, self.app.settings.authentication_api_key):
            return
        config = self.app.instances.get(instance) if instance is not None else None
        if config is None or not key_matches(key, config.token):
            raise Refused(401, "Unauthorized")

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise Refused(400, f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise Refused(400, f"expected a JSON object, got {type(body).__name__}")
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
        if self.app.routes.needs_topic_safe_names and not topic_safe(name):
            raise Refused(400, f"instanceName: {name!r} cannot be routed by RabbitMQ ('.', '*', '#')")
        for sink, setting in SINK_ENABLED_SETTING.items():
            if getattr(config, sink).enabled and not getattr(self.app.settings, setting):
                log.warning("admin.sink_disabled", instance=name, sink=sink, setting=setting.upper())
        return config

    async def _write(self, path: Path, data: dict[str, Any], written_by: str) -> None:
        """Write the file and swap the routes; the caller holds ``config_lock``."""
        text = instance_files.render(data, written_by)
        await asyncio.to_thread(instance_files.write_atomically, path, text)
        await self.app.reload_locked()

    async def _emit(self, wire: str, config: InstanceConfig) -> None:
        """``instance.create`` / ``instance.delete``, through intake like any event (durable)."""
        intake = self.app.intake
        assert intake is not None, "admin API before the daemon serves"
        data = {"instanceName": config.instance_name, "instanceId": config.id}
        events = intake.parse_many([{"event": wire, "instance": config.instance_name, "data": data}])
        await intake.accept(events, adapter="admin")

    # --- handlers ---------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        self._authorise(request, None)  # the global key only: there is no instance yet
        body = await self._body(request)
        name = body.get("instanceName")
        if not isinstance(name, str) or not name:
            raise Refused(400, "instanceName: is required")
        # The file: upstream's body as sent, with the instance id and token it is given here.
        data = {
            "instanceName": name,
            "instanceId": str(uuid.uuid4()),
            "integration": body.get("integration") or "WHATSAPP-BAILEYS",
            "token": body.get("token") or str(uuid.uuid4()).upper(),
        }
        data |= {key: value for key, value in body.items() if key not in data}
        async with self.app.config_lock:
            config = self._validated(data, name)
            if name in self.app.instances:
                raise Refused(403, f'This name "{name}" is already in use.')
            path = self.app.settings.router_instances_dir / f"{name}.yaml"
            await self._write(path, data, "POST /instance/create")
            await self._emit("instance.create", config)
        log.info("admin.instance_created", instance=name, file=str(path))
        answer = {
            "instance": {
                "instanceName": name,
                "instanceId": config.id,
                "integration": config.integration,
                "webhookWaBusiness": None,
                "accessTokenWaBusiness": "",
                "status": "created",
            },
            "hash": config.token,
            "webhook": {
                "webhookUrl": config.webhook.url,
                "webhookByEvents": config.webhook.by_events,
                "webhookBase64": config.webhook.base64,
            },
            **{sink: {"enabled": getattr(config, sink).enabled} for sink in SINKS if sink != "webhook"},
            "settings": settings_of(config),
        }
        return _answer(201, answer)

    async def fetch_instances(self, request: web.Request) -> web.Response:
        wanted = request.query.get("instanceName")
        key = request.headers.get("apikey") or ""
        instances = self.app.instances
        if key and not key_matches(key, self.app.settings.authentication_api_key):
            # An instance token sees its own instance only (upstream looks the token up).
            own = [name for name, config in instances.items() if key_matches(key, config.token)]
            if not own:
                raise Refused(401, "Unauthorized")
            wanted = wanted or own[0]
        self._authorise(request, wanted)
        if wanted is not None and wanted not in instances:
            raise Refused(404, f'Instance "{wanted}" not found')
        names = [wanted] if wanted is not None else sorted(instances)
        return _answer(200, [self._info(instances[name]) for name in names])

    def _info(self, config: InstanceConfig) -> dict[str, Any]:
        extra = config.model_extra or {}
        # Known only for sessions the router runs itself (integration WHATSAPP-WHATSMEOW).
        sessions = self.app.whatsapp.sessions if self.app.whatsapp is not None else {}
        session = sessions.get(config.instance_name)
        return {
            "id": config.id,
            "name": config.instance_name,
            "connectionStatus": session.state if session is not None else None,
            "ownerJid": session.mapper.own_jid if session is not None else None,
            "profileName": session.mapper.profile_name if session is not None else None,
            "integration": config.integration,
            "number": extra.get("number"),
            "businessId": extra.get("businessId"),
            "token": config.token,
            **{sink.capitalize(): sink_row(config, sink) for sink in SINKS},
            "Setting": settings_of(config),
        }

    async def delete(self, request: web.Request) -> web.Response:
        instance = request.match_info["instance"]
        self._authorise(request, instance)
        async with self.app.config_lock:
            config = self._existing(instance)
            # Emitted while the instance still exists, so its own subscriptions receive it too;
            # its removed targets then deliver what is stored for them (see Dispatcher.apply).
            await self._emit("instance.delete", config)
            path = self.app.instance_paths[instance]
            await asyncio.to_thread(instance_files.remove, path)
            await self.app.reload_locked()
        log.info("admin.instance_deleted", instance=instance, file=str(path))
        return _answer(
            200, {"status": "SUCCESS", "error": False, "response": {"message": "Instance deleted"}}
        )

    async def set_sink(self, request: web.Request, sink: str) -> web.Response:
        instance = request.match_info["instance"]
        self._authorise(request, instance)
        body = await self._body(request)
        # Upstream's body is {"webhook": {...}}; its older flat form ({"enabled": ...}) works too.
        section = body.get(sink, body if "enabled" in body else None)
        if not isinstance(section, dict):
            raise Refused(400, f'{sink}: is required, as an object: {{"{sink}": {{"enabled": true, ...}}}}')
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
        log.info("admin.sink_set", instance=instance, sink=sink, enabled=getattr(config, sink).enabled)
        return _answer(201, sink_row(config, sink))

    async def find_sink(self, request: web.Request, sink: str) -> web.Response:
        instance = request.match_info["instance"]
        self._authorise(request, instance)
        return _answer(200, sink_row(self._existing(instance), sink))
