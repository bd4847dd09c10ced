"""Per-instance configuration: one YAML file per instance, shaped like upstream's
``POST /instance/create`` body. ``load_instances`` reads a directory and reports every problem
as ``file:line: field: what``; files that validate are used, the others are reported."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.errors import ConfigError
from router.sections import Subscription
from router.sinks.registry import SECTIONS
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
        "kafka",  # upstream's Kafka section: kept in the file, not used
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


@functools.lru_cache(maxsize=1 << 16)  # intake checks the name of every event it takes
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


class InstanceConfig(BaseModel):
    """One instance file. Unknown keys are errors, except upstream's (kept, unused).

    ``sections`` holds each sink's section (``webhook``, ``rabbitmq`` ...), validated by the
    model the sink declares (``router.sinks.registry``); ``websocket`` is the live streams'.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    instance_name: str = Field(validation_alias=AliasChoices("instanceName", "instance_name"))
    instance_id: str | None = Field(None, validation_alias=AliasChoices("instanceId", "instance_id"))
    integration: str = "WHATSAPP-BAILEYS"
    token: str | None = None
    websocket: Subscription = Subscription()
    sections: dict[str, Subscription] = Field(default_factory=dict, exclude=True)

    @field_validator("instance_name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_instance_name(value)

    @field_validator("token", mode="before")
    @classmethod
    def _token_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    def section(self, sink: str) -> Subscription:
        """The sink's section, or a disabled one when the file has none."""
        return self.sections.get(sink) or Subscription()

    def secret_values(self) -> list[str]:
        """Every secret this instance holds, for ``logs.set_secrets``."""
        values: list[str | None] = [self.token]
        for name, section in self.sections.items():
            values += SECTIONS[name].section_secrets(section)
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
    # What each file gave, by (name, mtime_ns, size): a reload parses only the files that changed.
    parsed: dict[tuple[str, int, int], InstanceConfig | ConfigError] = field(default_factory=dict)


def validate_instance(data: Mapping[str, Any], name: str) -> InstanceConfig:
    """Validate an instance's settings (a file's or an API body's) for the instance ``name``.

    Raise InvalidInstance naming every problem; the caller says where (file:line, or HTTP 400).
    """
    data = dict(data)
    name = unicodedata.normalize("NFC", name)
    data.setdefault("instanceName", name)
    problems: list[tuple[Loc, str]] = []
    sections: dict[str, Subscription] = {}
    for key in list(data):
        kind = SECTIONS.get(key)
        if kind is not None and kind.section is not None:
            value = data.pop(key)
            try:
                sections[key] = kind.section.model_validate(value if value is not None else {})
            except ValidationError as exc:
                problems += _located(exc, (key,))
        elif key not in _KNOWN and key not in UPSTREAM_KEYS:
            problems.append(((key,), "unknown field"))
    try:
        config = InstanceConfig.model_validate({**data, "sections": sections})
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
    for sink, section in sections.items():
        problems += SECTIONS[sink].instance_problems(config.instance_name, section)
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


def _parse_file(path: Path) -> InstanceConfig | ConfigError:
    try:
        return parse_instance(load_yaml(path))
    except ConfigError as exc:
        return exc
    except Exception as exc:  # a file must never stop the daemon, whatever is in it
        return ConfigError([f"{path}:1: cannot be read: {type(exc).__name__}: {exc}"])


def parse_instance(doc: YamlDoc) -> InstanceConfig:
    """Validate one instance file; raise ConfigError with ``file:line: field: what`` lines."""
    try:
        return validate_instance(doc.data, doc.path.stem)
    except InvalidInstance as exc:
        raise ConfigError([f"{doc.where(loc)}: {what}" for loc, what in exc.problems]) from exc


_KNOWN = frozenset(
    {"instanceName", "instanceId", "instance_name", "instance_id", "integration", "token", "websocket"}
)


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
    return [directory / name for name, _, _ in _stamped_files(directory)]


def is_instance_file(path: Path) -> bool:
    return is_instance_file_name(path.name)


def is_instance_file_name(name: str) -> bool:
    """``<name>.yaml`` or ``<name>.yml``; hidden files (editors' and our temporary ones) are not."""
    return name.endswith((".yaml", ".yml")) and not name.startswith(".")


def file_stamps(directory: Path) -> dict[str, tuple[int, int]]:
    """Each instance file's name -> (mtime in ns, size): what tells that a file changed."""
    if not directory.is_dir():
        return {}
    return {name: (mtime, size) for name, mtime, size in _stamped_files(directory)}


def directory_fingerprint(directory: Path) -> frozenset[tuple[str, int, int]]:
    return frozenset(_stamped_files(directory)) if directory.is_dir() else frozenset()


def _stamped_files(directory: Path) -> list[tuple[str, int, int]]:
    """The instance files of ``directory`` by name, each as (name, mtime, size): one listing and
    one stat per file (10,000 files are read at start)."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not is_instance_file_name(entry.name):
                continue
            with contextlib.suppress(OSError):  # removed in the meantime: it is not there
                if entry.is_file():
                    stat = entry.stat()
                    found.append((entry.name, stat.st_mtime_ns, stat.st_size))
    found.sort()
    return found


def load_instances(directory: Path, previous: LoadResult | None = None) -> LoadResult:
    """Read every ``*.yaml`` in ``directory``; a bad file is reported and left out. Files whose
    name, modification time and size are as in ``previous`` are not read again."""
    result = LoadResult()
    if not directory.is_dir():
        result.problems.append(f"{directory}: instances directory does not exist")
        return result
    stamps = _stamped_files(directory)
    result.fingerprint = frozenset(stamps)
    folded: dict[str, str] = {}  # casefolded name -> the name loaded: one lookup per file
    for stamp in stamps:
        path = directory / stamp[0]
        outcome = previous.parsed.get(stamp) if previous is not None else None
        if outcome is None:
            outcome = _parse_file(path)
        result.parsed[stamp] = outcome
        if isinstance(outcome, ConfigError):
            result.problems.extend(outcome.problems)
            result.failed_names.add(path.stem)
            continue
        config = outcome
        name = config.instance_name
        other = folded.get(name.casefold())
        if other is not None:
            how = "also" if other == name else f"differs only by case from {other!r},"
            result.problems.append(f"{path}:1: instanceName: {name!r} {how} defined in {result.files[other]}")
            result.failed_names.add(name)
            continue
        result.instances[name] = config
        result.files[name] = path
        folded[name.casefold()] = name
    return result
