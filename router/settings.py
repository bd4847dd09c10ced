"""Typed settings, read once, from upstream's environment names.

Precedence, highest first (the only place it is decided: ``Settings.settings_customise_sources``):

1. the process environment,
2. the ``.env`` file,
3. ``config/router.yaml`` (a flat mapping of the same names),
4. the defaults below.

Names are upstream's (``WEBHOOK_GLOBAL_URL``, ``WEBHOOK_EVENTS_MESSAGES_UPSERT``, ...); the
router's own additions start with ``ROUTER_`` or are marked *ours*. Every error names the
variable and where it came from (``environment``, ``.env:LINE`` or ``router.yaml:LINE``).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, cast
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from router.addresses import parse_networks
from router.errors import ConfigError
from router.events import CONFIG_TO_WIRE
from router.redact import redact_text, redact_url
from router.sinks.registry import SINKS
from router.urls import check_http_url
from router.yamlfile import YamlDoc, load_yaml

DEFAULT_CONFIG_FILE = Path("config/router.yaml")
# Settings whose name says they hold a secret are never echoed in an error message.
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD")
DEFAULT_ENV_FILE = Path(".env")

# Per-event switches, by sink: ``<PREFIX><CONFIG NAME>=true`` (each sink names its prefix).
EVENT_FLAG_PREFIXES = {kind.name: kind.event_flags for kind in SINKS if kind.event_flags}
# Upstream names under those prefixes that are settings, not events; accepted and ignored.
IGNORED_FLAG_NAMES = frozenset(name for kind in SINKS for name in kind.ignored_settings)

LOG_LEVEL_NAMES = (
    "ERROR",
    "WARN",
    "DEBUG",
    "INFO",
    "LOG",
    "VERBOSE",
    "DARK",
    "WEBHOOKS",
    "WEBSOCKET",
)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _YamlSource(PydanticBaseSettingsSource):
    """``router.yaml``: a flat mapping of upstream names (case-insensitive) to values."""

    def __init__(self, settings_cls: type[BaseSettings], doc: YamlDoc | None) -> None:
        super().__init__(settings_cls)
        self.doc = doc

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden

    def __call__(self) -> dict[str, Any]:
        if self.doc is None:
            return {}
        return {str(key).lower(): value for key, value in self.doc.data.items()}


class Settings(BaseSettings):
    """Everything the daemon reads from its environment. Build with ``load_settings``."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", env_file_encoding="utf-8", validate_default=True
    )

    # --- cross-cutting (upstream) ---
    server_url: str | None = None
    server_name: str = "evolution"
    server_port: int = Field(8080, ge=0, le=65535)  # 0: any free port
    authentication_api_key: str | None = None
    authentication_expose_in_fetch_instances: bool = False
    log_level: Annotated[list[str], NoDecode] = ["ERROR", "WARN", "INFO", "LOG"]
    log_color: bool = True

    websocket_enabled: bool = False
    websocket_global_events: bool = False
    websocket_allowed_hosts: str = "127.0.0.1,::1,::ffff:127.0.0.1"
    cors_origin: str = "*"

    # --- ours ---
    server_host: str = "0.0.0.0"
    log_format: Literal["console", "json"] = "console"
    router_instances_dir: Path = Path("config/instances")
    router_state_dir: Path = Path("var")
    router_ingest_max_bytes: int = Field(32 * 1024 * 1024, gt=0)
    router_ingest_trusted_hosts: str = ""  # addresses or networks whose /ingest needs no key
    router_shutdown_grace_s: float = Field(10.0, ge=0)
    router_queue_concurrency: int = Field(64, ge=1)
    router_queue_retry_initial_delay_s: float = Field(1.0, ge=0)
    router_queue_retry_max_delay_s: float = Field(30.0, ge=0)
    router_lease_buffer: int = Field(20_000, ge=1)
    router_dedup_window_s: float = Field(600.0, ge=0)
    router_jsonl_path: str | None = None
    router_event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    router_websocket_buffer: int = Field(1000, ge=1)  # messages waiting per client before it is dropped
    router_websocket_buffer_bytes: int = Field(16 * 1024 * 1024, ge=1)  # and bytes of them
    router_database_url: str | None = None  # postgresql://...: the shared queue (else SQLite)
    router_lease_timeout_s: float = Field(30.0, gt=0)  # a dead router's leases are taken over after
    router_node_name: str | None = None  # this router, in leases and metrics (default host:port)

    # --- set by systemd under Type=notify (see router/systemd.py), not by operators ---
    notify_socket: str | None = None
    watchdog_usec: int | None = Field(None, gt=0)
    watchdog_pid: int | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _parse_log_level(cls, value: Any) -> Any:
        names = [name.upper() for name in _split_csv(value)]
        unknown = [name for name in names if name not in LOG_LEVEL_NAMES]
        if unknown:
            raise ValueError(f"unknown level {', '.join(unknown)}; known: {', '.join(LOG_LEVEL_NAMES)}")
        return names

    @field_validator(
        "server_url", "authentication_api_key", "router_database_url", "router_node_name", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("server_url")
    @classmethod
    def _check_server_url(cls, value: str | None) -> str | None:
        return check_http_url(value) if value is not None else None

    @field_validator("router_database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError(f"must be a postgresql:// URL, got {redact_url(value)!r}")
        return value

    @field_validator("router_ingest_trusted_hosts")
    @classmethod
    def _check_networks(cls, value: str) -> str:
        parse_networks(value)
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if not self.authentication_api_key:
            raise ValueError("AUTHENTICATION_API_KEY is not set (it guards /ingest)")
        return self

    @property
    def database_path(self) -> Path:
        """The queue database, in the state directory."""
        return self.router_state_dir / "router.db"

    @property
    def queue(self) -> Path | str:
        """Where the queue is: the PostgreSQL URL when set, else the SQLite file."""
        return self.router_database_url or self.database_path

    @property
    def node_name(self) -> str:
        """This router's name among several: ``ROUTER_NODE_NAME``, else host:port."""
        if self.router_node_name:
            return self.router_node_name
        if self.server_port:
            return f"{socket.gethostname()}:{self.server_port}"
        return f"{socket.gethostname()}:{os.getpid()}-{secrets.token_hex(3)}"  # any port: not stable

    def secret_values(self) -> list[str]:
        """Every secret these settings hold, for ``logs.set_secrets``."""
        values = [self.authentication_api_key]
        if self.router_database_url:
            values.append(urlsplit(self.router_database_url).password)
        for kind in SINKS:
            values += kind.secrets(self)
        return [value for value in values if value]

    def events_enabled(self, sink: str) -> frozenset[str]:
        """Wire names whose ``<PREFIX><EVENT>`` switch is on for ``sink`` (e.g. ``webhook``)."""
        prefix = EVENT_FLAG_PREFIXES[sink].lower()
        return frozenset(
            wire for config, wire in CONFIG_TO_WIRE.items() if getattr(self, prefix + config.lower(), False)
        )

    def ordering_modes(self) -> dict[str, str]:
        """Each sink's ordering (``ROUTER_<SINK>_ORDERING``): ``chat``, ``instance`` or ``none``."""
        return {kind.name: getattr(self, f"router_{kind.name}_ordering") for kind in SINKS}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The precedence: environment, then .env, then router.yaml, then defaults.
        return (init_settings, env_settings, dotenv_settings, _YamlSource(settings_cls, _yaml_doc))


# One bool field per (sink, event): webhook_events_messages_upsert, ... (GROUP_UPDATE included).
_flag_fields: dict[str, Any] = {
    prefix.lower() + config.lower(): (bool, False)
    for prefix in EVENT_FLAG_PREFIXES.values()
    for config in CONFIG_TO_WIRE
}


# How each sink orders its deliveries (``router.ordering``): ROUTER_WEBHOOK_ORDERING=chat, ...
_ordering_fields: dict[str, Any] = {
    f"router_{kind.name}_ordering": (Literal["chat", "instance", "none"], kind.default_ordering)
    for kind in SINKS
}


def _distinct_validators(classes: Iterable[type[BaseModel]]) -> None:
    """Pydantic keeps one validator per name across bases: a sink's ``_check`` would silently
    replace another's. Prefix validators with the sink's name; this says which clash."""
    seen: dict[str, str] = {}
    for cls in classes:
        decorators = cls.__pydantic_decorators__
        for name in [*decorators.field_validators, *decorators.model_validators]:
            if name in seen and seen[name] != cls.__name__:
                raise TypeError(f"validator {name} of {cls.__name__} hides {seen[name]}'s; rename it")
            seen[name] = cls.__name__


_distinct_validators([Settings, *(kind.settings for kind in SINKS)])
# The whole class: the cross-cutting settings above, each sink's own (declared in its module),
# and the per-event switches.
_FullSettings = cast(
    type[Settings],
    create_model(
        "Settings",
        __base__=(Settings, *(kind.settings for kind in SINKS)),
        **_flag_fields,
        **_ordering_fields,
    ),
)
_yaml_doc: YamlDoc | None = None  # the router.yaml being loaded (read by _YamlSource)


def _dotenv_lines(path: Path) -> dict[str, int]:
    lines: dict[str, int] = {}
    if path.is_file():
        pattern = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if match := pattern.match(line):
                lines[match.group(1).upper()] = number
    return lines


def _unknown_flags(names: Iterable[str]) -> list[str]:
    bad = []
    for name in names:
        upper = name.upper()
        for prefix in EVENT_FLAG_PREFIXES.values():
            known = (
                upper in IGNORED_FLAG_NAMES
                or upper[len(prefix) :] in CONFIG_TO_WIRE
                or upper.lower() in _FullSettings.model_fields
            )
            if upper.startswith(prefix) and not known:
                bad.append(upper)
    return bad


def load_settings(
    config_file: Path | None = DEFAULT_CONFIG_FILE,
    env_file: Path | None = DEFAULT_ENV_FILE,
) -> Settings:
    """Read the settings once; raise ConfigError naming every bad variable and its origin."""
    global _yaml_doc  # noqa: PLW0603 - pydantic-settings builds sources from the class
    environ = {key.upper(): value for key, value in os.environ.items()}
    doc = load_yaml(config_file) if config_file is not None and config_file.is_file() else None
    env_path = env_file if env_file is not None and env_file.is_file() else None
    dotenv_lines = _dotenv_lines(env_path) if env_path else {}

    problems: list[str] = []
    known = set(_FullSettings.model_fields)
    if doc is not None:
        for key in doc.data:
            if str(key).lower() not in known:
                problems.append(f"{doc.where([key])}: unknown setting")

    def origin(name: str) -> str:
        if name in environ:
            return f"{name} (environment)"
        if name in dotenv_lines:
            return f"{env_path}:{dotenv_lines[name]}: {name}"
        if doc is not None:
            for key in doc.data:
                if str(key).upper() == name:
                    return doc.where([key])
        return name

    flag_names = list(environ) + list(dotenv_lines) + [str(k) for k in (doc.data if doc else {})]
    problems += [f"{origin(name)}: unknown event" for name in sorted(set(_unknown_flags(flag_names)))]

    _yaml_doc = doc
    try:
        settings = _FullSettings(_env_file=env_path)
    except ValidationError as exc:
        for error in exc.errors():
            if error["loc"]:
                name = str(error["loc"][0]).upper()
                shown = "" if error["type"] == "missing" or _SECRET_NAME.search(name) else error["input"]
                said = " got " in error["msg"]  # the message shows the value already
                value = f", got {redact_text(repr(shown))}" if shown != "" and not said else ""
                problems.append(f"{origin(name)}: {error['msg']}{value}")
            else:
                problems.append(error["msg"].removeprefix("Value error, "))
        raise ConfigError(problems) from exc
    finally:
        _yaml_doc = None
    if problems:
        raise ConfigError(problems)
    return settings
