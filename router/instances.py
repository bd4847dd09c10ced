"""Per-instance configuration: one YAML file per instance, shaped like upstream's
``POST /instance/create`` body. ``load_instances`` reads a directory and reports every problem
as ``file:line: field: what``; files that validate are used, the others are reported."""

from __future__ import annotations

import contextlib
import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.errors import ConfigError
from router.events import EVERY_EVENT, UnknownEventError, wire_name
from router.redact import redact_url
from router.signing import parse_secrets
from router.yamlfile import YamlDoc, format_loc, load_yaml

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
MAX_NAME_CHARACTERS = 100
MAX_NAME_BYTES = 200  # "<name>.yaml" must fit a file name (255 bytes on most file systems)
# Unicode categories a name may not hold: controls, formats (U+202E, U+FEFF ...), surrogates,
# private use, unassigned, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

# Keys of upstream's instance/create body that the router accepts and keeps but does not use.
UPSTREAM_KEYS = frozenset(
    [
        "number",
        "qrcode",
        "businessId",
        "rejectCall",
        "msgCall",
        "groupsIgnore",
        "alwaysOnline",
        "readMessages",
        "readStatus",
        "syncFullHistory",
        "wavoipToken",
        "nats",  # upstream's NATS and Kafka sections: kept in the file, not used
        "kafka",
        "proxyHost",
        "proxyPort",
        "proxyProtocol",
        "proxyUsername",
        "proxyPassword",
        "chatwootAccountId",
        "chatwootToken",
        "chatwootUrl",
        "chatwootSignMsg",
        "chatwootReopenConversation",
        "chatwootConversationPending",
        "chatwootImportContacts",
        "chatwootNameInbox",
        "chatwootMergeBrazilContacts",
        "chatwootImportMessages",
        "chatwootDaysLimitImportMessages",
        "chatwootOrganization",
        "chatwootLogo",
        "chatwootAutoCreate",
    ]
)


def topic_safe(name: str) -> bool:
    """Usable in a RabbitMQ binding key ``{instance}.{event}``: no word of it is a wildcard
    (``*`` or ``#``). Dots are fine: they only add words before the event's."""
    return not any(word in ("*", "#") for word in name.split("."))


def check_instance_name(name: str) -> str:
    """The name in Unicode NFC (one instance however its accents were typed); ValueError saying
    which rule a name breaks."""
    name = unicodedata.normalize("NFC", name)
    size = len(name.encode("utf-8", "surrogatepass"))
    if not name or len(name) > MAX_NAME_CHARACTERS or size > MAX_NAME_BYTES:
        raise ValueError(
            f"must be 1-{MAX_NAME_CHARACTERS} characters and at most {MAX_NAME_BYTES} bytes of UTF-8"
            f" (this one: {len(name)} characters, {size} bytes)"
        )
    if "/" in name or "\\" in name:
        raise ValueError("must not contain '/' or '\\'")
    if name.startswith("."):
        raise ValueError("must not start with '.'")
    if name != name.strip():
        raise ValueError("must not start or end with white space")
    refused = sorted({f"U+{ord(c):04X}" for c in name if unicodedata.category(c) in _REFUSED_CATEGORIES})
    if refused:
        raise ValueError(f"must not contain control or format characters ({', '.join(refused)})")
    return name


def same_but_for_case(name: str, names: Iterable[str]) -> str | None:
    """Another of ``names`` that differs from ``name`` only by case (``CaseTest``, ``casetest``)."""
    folded = name.casefold()
    return next((other for other in names if other != name and other.casefold() == folded), None)


class Subscription(BaseModel):
    """``{enabled, events}``: ``events: []`` with ``enabled: true`` means every event."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    enabled: bool = False
    events: tuple[str, ...] = ()

    @field_validator("events", mode="before")
    @classmethod
    def _resolve_events(cls, value: Any) -> Any:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of event names")  # noqa: TRY004 - pydantic wants ValueError
        resolved = []
        for index, name in enumerate(value):
            try:
                resolved.append(wire_name(str(name)))
            except UnknownEventError:
                raise ValueError(f"item {index}: unknown event {name!r}") from None
        return tuple(resolved)

    def subscribed(self) -> frozenset[str]:
        """The wire names this subscription receives (``application.startup`` only when named)."""
        if not self.enabled:
            return frozenset()
        return frozenset(self.events) if self.events else EVERY_EVENT


class WebhookConfig(Subscription):
    url: str | None = None
    by_events: bool = Field(
        False, validation_alias=AliasChoices("byEvents", "webhookByEvents", "webhook_by_events", "by_events")
    )
    base64: bool = Field(False, validation_alias=AliasChoices("base64", "webhookBase64", "webhook_base64"))
    headers: dict[str, str] = Field(default_factory=dict)
    # Standard Webhooks signing (ours): one whsec_ secret, or several while changing it.
    signing_secret: tuple[str, ...] = Field(
        (), validation_alias=AliasChoices("signingSecret", "signing_secret")
    )

    @field_validator("signing_secret", mode="before")
    @classmethod
    def _check_signing_secret(cls, value: Any) -> Any:
        parse_secrets(value)
        if value is None or value == "":
            return ()
        return tuple(part.strip() for part in value.split(",")) if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {redact_url(value)!r}")
        return value

    @field_validator("headers", mode="before")
    @classmethod
    def _stringify_headers(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        headers = {str(k): str(v) for k, v in value.items()}
        for name, text in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any(char in text for char in "\r\n\0"):
                raise ValueError(f"header {name!r}: its value must not contain CR, LF or NUL")
        return headers


class PusherConfig(Subscription):
    app_id: str | None = Field(None, validation_alias=AliasChoices("appId", "app_id"))
    key: str | None = None
    secret: str | None = None
    cluster: str | None = None
    use_tls: bool = Field(True, validation_alias=AliasChoices("useTLS", "use_tls"))

    @field_validator("app_id", mode="before")
    @classmethod
    def _app_id_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


class InstanceConfig(BaseModel):
    """One instance file. Unknown keys are errors, except upstream's (kept, unused)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    instance_name: str = Field(validation_alias=AliasChoices("instanceName", "instance_name"))
    instance_id: str | None = Field(None, validation_alias=AliasChoices("instanceId", "instance_id"))
    integration: str = "WHATSAPP-BAILEYS"
    token: str | None = None
    webhook: WebhookConfig = WebhookConfig()
    rabbitmq: Subscription = Subscription()
    sqs: Subscription = Subscription()
    websocket: Subscription = Subscription()
    pusher: PusherConfig = PusherConfig()

    @field_validator("instance_name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_instance_name(value)

    @field_validator("token", mode="before")
    @classmethod
    def _token_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    def secret_values(self) -> list[str]:
        """Every secret this instance holds, for ``logs.set_secrets``."""
        values = [
            self.token,
            self.pusher.secret,
            *self.webhook.headers.values(),
            *self.webhook.signing_secret,
        ]
        if self.webhook.url and (password := urlsplit(self.webhook.url).password):
            values.append(password)
        return [value for value in values if value]

    @property
    def id(self) -> str:
        """``instanceId`` as written by ``/instance/create``; for a file written by hand, a stable
        id made from the name, so the same instance always has the same id."""
        return self.instance_id or str(uuid.uuid5(_INSTANCE_IDS, self.instance_name))


_INSTANCE_IDS = uuid.UUID("5d0b7a52-0c4e-4a44-9a39-7f3f4c1e2b60")


Loc = tuple[str | int, ...]


class InvalidInstance(ValueError):
    """An instance that does not validate: ``problems`` are (field location, what) pairs."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(f"{format_loc(loc)}: {what}" for loc, what in problems))
        self.problems = problems


@dataclass
class LoadResult:
    instances: dict[str, InstanceConfig] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    failed_names: set[str] = field(default_factory=set)  # file stems whose file did not validate
    # (file name, mtime_ns, size) of every file read: tells whether the directory changed since.
    fingerprint: frozenset[tuple[str, int, int]] = frozenset()


def validate_instance(data: Mapping[str, Any], name: str) -> InstanceConfig:
    """Validate an instance's settings (a file's or an API body's) for the instance ``name``.

    Raise InvalidInstance naming every problem; the caller says where (file:line, or HTTP 400).
    """
    data = dict(data)
    name = unicodedata.normalize("NFC", name)
    data.setdefault("instanceName", name)
    problems: list[tuple[Loc, str]] = []
    for key in data:
        known = key in InstanceConfig.model_fields or key in _FIELD_ALIASES or key in UPSTREAM_KEYS
        if not known:
            problems.append(((key,), "unknown field"))
    for section in ("nats", "kafka"):  # upstream's, kept unused: still valid subscriptions
        if section in data:
            try:
                Subscription.model_validate(data[section])
            except ValidationError as exc:
                problems += _located(exc, (section,))
    try:
        config = InstanceConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInstance(problems + _located(exc)) from exc
    if config.instance_name != name:
        problems.append(
            (
                ("instanceName",),
                f"is {config.instance_name!r} but the file is named {name + '.yaml'!r};"
                " name the file after the instance",
            )
        )
    if config.rabbitmq.enabled and not topic_safe(config.instance_name):
        problems.append(
            (
                ("instanceName",),
                f"{config.instance_name!r} cannot be used with RabbitMQ:"
                " a word '*' or '#' between dots is a wildcard in its binding keys",
            )
        )
    if config.pusher.enabled:
        for field_name, alias in (("app_id", "appId"), ("key", "key"), ("secret", "secret")):
            if not getattr(config.pusher, field_name):
                problems.append((("pusher", "enabled"), f"pusher is enabled but has no {alias}"))
    if config.webhook.enabled and not config.webhook.url:
        problems.append((("webhook", "enabled"), "webhook is enabled but has no url"))
    if problems:
        raise InvalidInstance(problems)
    return config


def _located(exc: ValidationError, prefix: Loc = ()) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    for error in exc.errors():
        loc = [*prefix, *error["loc"]]
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            msg = "unknown field"
        item = re.match(r"item (\d+): (.*)", msg)
        if item and loc and loc[-1] == "events":
            loc.append(int(item.group(1)))
            msg = item.group(2)
        problems.append((tuple(loc), msg))
    return problems


def parse_instance(doc: YamlDoc) -> InstanceConfig:
    """Validate one instance file; raise ConfigError with ``file:line: field: what`` lines."""
    try:
        return validate_instance(doc.data, doc.path.stem)
    except InvalidInstance as exc:
        raise ConfigError([f"{doc.where(loc)}: {what}" for loc, what in exc.problems]) from exc


_FIELD_ALIASES = frozenset({"instanceName", "instanceId"})


def accepted_keys(model: type[BaseModel]) -> frozenset[str]:
    """Every key ``model`` reads: its field names and each of their aliases."""
    keys = set(model.model_fields)
    for info in model.model_fields.values():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            keys.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            keys.add(alias)
    return frozenset(keys)


def instance_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if is_instance_file(p) and p.is_file())


def is_instance_file(path: Path) -> bool:
    """``<name>.yaml`` or ``<name>.yml``; hidden files (editors' and our temporary ones) are not."""
    return path.suffix in (".yaml", ".yml") and not path.name.startswith(".")


def fingerprint(files: list[Path]) -> frozenset[tuple[str, int, int]]:
    stamps = set()
    for path in files:
        with contextlib.suppress(OSError):  # removed in the meantime: it is not there
            stat = path.stat()
            stamps.add((path.name, stat.st_mtime_ns, stat.st_size))
    return frozenset(stamps)


def directory_fingerprint(directory: Path) -> frozenset[tuple[str, int, int]]:
    return fingerprint(instance_files(directory))


def load_instances(directory: Path) -> LoadResult:
    """Read every ``*.yaml`` in ``directory``; a bad file is reported and left out."""
    result = LoadResult()
    if not directory.is_dir():
        result.problems.append(f"{directory}: instances directory does not exist")
        return result
    files = instance_files(directory)
    result.fingerprint = fingerprint(files)
    for path in files:
        try:
            config = parse_instance(load_yaml(path))
        except ConfigError as exc:
            result.problems.extend(exc.problems)
            result.failed_names.add(path.stem)
            continue
        except Exception as exc:  # a file must never stop the daemon, whatever is in it
            result.problems.append(f"{path}:1: cannot be read: {type(exc).__name__}: {exc}")
            result.failed_names.add(path.stem)
            continue
        name = config.instance_name
        other = name if name in result.instances else same_but_for_case(name, result.instances)
        if other is not None:
            how = "also" if other == name else f"differs only by case from {other!r},"
            result.problems.append(f"{path}:1: instanceName: {name!r} {how} defined in {result.files[other]}")
            result.failed_names.add(name)
            continue
        result.instances[name] = config
        result.files[name] = path
    return result
