"""Amazon SQS: one queue per instance and event, FIFO by default, sends batched.

Queue names (``SQS_NAMING``): ``router`` (the default, as the seed documents) is
``{instance}-{event}`` with the event in its by-events form (``my-instance-messages-upsert``);
``upstream`` is Evolution API 2.3.6's ``{instance}_{event}`` with the event's config name in
lower case (``my-instance_messages_upsert``). Global mode uses ``SQS_GLOBAL_PREFIX_NAME`` in
place of the instance, and ``SQS_GLOBAL_FORCE_SINGLE_QUEUE`` one ``{prefix}-singlequeue``
(``{prefix}_singlequeue``). Names are made legal for SQS (letters, digits, ``-``, ``_``; at most
80 characters with ``.fifo``).

FIFO queues get ``MessageDeduplicationId`` = event id, so a retried send is not stored twice
within SQS's five-minute window, and ``MessageGroupId`` = the delivery's ordering key under
``ROUTER_SQS_ORDERING`` (``<instance>/<chat>`` by default, the instance for ``instance`` and
``none``; hashed when it is no legal group id), so SQS keeps each conversation's order; with
upstream's naming, upstream's group ids (``evolution``, or ``{SERVER_NAME}-{event}-{instance}``
for global queues). Queues are looked up in ``SQS_ACCOUNT_ID``'s account, created when missing,
and their URLs cached.

Batching (``router.sinks.batching``): every attempt is one ``send`` call. Attempts for one queue that
arrive together wait for each other, and the first of them sends them in ``SendMessageBatch``
requests of up to ten entries. Each entry's outcome goes back to its own attempt, so a failed
entry is retried on its own by the delivery worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, Field, field_validator, model_validator

from router import logs
from router.errors import PermanentError, RetryableError
from router.events import Event, by_events_suffix, config_name, envelope
from router.sections import Subscription
from router.sinks import BaseSink, Placement, SinkKind, subscribed
from router.sinks.batching import Batcher, Item

if TYPE_CHECKING:
    from router.instances import InstanceConfig

log = logs.get_logger("router.sinks.sqs")
BATCH_LIMIT = 10  # entries per SendMessageBatch (an SQS limit)
MAX_NAME = 80
_ILLEGAL = re.compile(r"[^A-Za-z0-9_-]")
_MISSING_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_BAD_CREDENTIALS = {
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "AccessDenied",
    "AccessDeniedException",
    "MissingAuthenticationToken",
}


def queue_name(base: str, wire: str | None, fifo: bool) -> str:
    """``base-event`` (by-events form) made legal."""
    return legal_queue_name(f"{base}{by_events_suffix(wire).replace('/', '-')}" if wire else base, fifo)


def upstream_queue_name(base: str, part: str, fifo: bool) -> str:
    """Upstream's ``base_part``: ``part`` is the event's config name in lower case, or ``singlequeue``."""
    return legal_queue_name(f"{base}_{part}", fifo)


def legal_queue_name(name: str, fifo: bool) -> str:
    """``name`` made legal for SQS; too long a name keeps a hash of the full one, to stay unique."""
    name = _ILLEGAL.sub("-", name)
    suffix = ".fifo" if fifo else ""
    limit = MAX_NAME - len(suffix)
    if len(name) > limit:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]  # a name, not a secret
        name = f"{name[: limit - 9]}-{digest}"
    return name + suffix


class SqsSettings(BaseModel):
    """Upstream's SQS settings, and ``SQS_ENDPOINT_URL``, ``SQS_FIFO``, ``SQS_NAMING`` (ours)."""

    sqs_enabled: bool = False
    sqs_access_key_id: str | None = None
    sqs_secret_access_key: str | None = None
    sqs_account_id: str | None = None
    sqs_region: str | None = None
    sqs_global_enabled: bool = False
    sqs_global_force_single_queue: bool = False
    sqs_global_prefix_name: str = "global"
    sqs_max_payload_size: int = Field(1_048_576, gt=0)
    sqs_endpoint_url: str | None = None
    sqs_fifo: bool = True
    # "router" ({instance}-{event}) or "upstream" (Evolution API 2.3.6's {instance}_{event}.fifo)
    sqs_naming: Literal["router", "upstream"] = "router"

    @field_validator("sqs_endpoint_url", mode="before")
    @classmethod
    def _sqs_empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("sqs_naming", mode="before")
    @classmethod
    def _sqs_lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _sqs_consistent(self) -> SqsSettings:
        if not self.sqs_enabled:
            return self
        needed = ("sqs_access_key_id", "sqs_secret_access_key", "sqs_account_id", "sqs_region")
        missing = [name.upper() for name in needed if not getattr(self, name)]
        if missing:
            raise ValueError(f"SQS_ENABLED is true but {', '.join(missing)} not set")
        account = self.sqs_account_id or ""
        if not re.fullmatch(r"\d{12}", account):
            raise ValueError(f"SQS_ACCOUNT_ID must be a 12-digit AWS account id, got {account!r}")
        return self


@dataclass(frozen=True, slots=True)
class SqsTarget:
    """Sends to the queue named after the instance (or the global prefix) and the event."""

    key: str
    instance: str | None  # None: global mode, queues named after SQS_GLOBAL_PREFIX_NAME
    events: frozenset[str]
    sink = "sqs"


@dataclass(frozen=True, slots=True)
class _Message:
    event: Event
    body: bytes
    group: str  # MessageGroupId


_GROUP_ID = re.compile(r"[!-~]{1,128}")  # what SQS takes: 1 to 128 printable ASCII characters


def group_id(key: str) -> str:
    """``key`` as a ``MessageGroupId``: itself when SQS takes it, else a digest of it."""
    if _GROUP_ID.fullmatch(key):
        return key
    return "sha256-" + hashlib.sha256(key.encode()).hexdigest()


class SqsSink(BaseSink):
    name = "sqs"

    def __init__(self, settings: Any) -> None:  # SqsSettings, within the daemon's Settings
        self.settings = settings
        self.fifo = settings.sqs_fifo
        self.upstream = settings.sqs_naming == "upstream"
        self.max_payload = settings.sqs_max_payload_size
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._urls: dict[str, str] = {}
        self._batcher: Batcher[_Message] = Batcher(BATCH_LIMIT, self._send_batch, "SQS send")
        self.requests = 0  # SQS API calls made, for the benchmark's requests per message

    async def open(self) -> None:
        settings = self.settings
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "sqs",
                region_name=settings.sqs_region,
                endpoint_url=settings.sqs_endpoint_url,
                aws_access_key_id=settings.sqs_access_key_id,
                aws_secret_access_key=settings.sqs_secret_access_key,
                # The delivery worker owns retries and backoff; botocore must not add its own.
                config=AioConfig(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=30),
            )
        )

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def check(self, targets: Sequence[SqsTarget]) -> None:
        """One cheap authenticated call: raises DeliveryError naming bad credentials or endpoint."""
        try:
            await self._client.list_queues(MaxResults=1)
        except ClientError as exc:
            raise PermanentError(f"SQS refused the credentials: {exc}") from exc
        except BotoCoreError as exc:
            raise RetryableError(f"SQS unreachable: {exc}") from exc

    def queue_for(self, target: SqsTarget, event: Event) -> str:
        settings = self.settings
        single = target.instance is None and settings.sqs_global_force_single_queue
        base = target.instance or settings.sqs_global_prefix_name
        if self.upstream:
            part = "singlequeue" if single else config_name(event.event).lower()
            return upstream_queue_name(base, part, self.fifo)
        if single:
            return queue_name(f"{base}-singlequeue", None, self.fifo)
        return queue_name(base, event.event, self.fifo)

    def group_for(self, target: SqsTarget, event: Event) -> str:
        """FIFO ``MessageGroupId``: the ordering key (see the module docstring), or upstream's."""
        if not self.upstream:
            chat = event.chat if self.settings.router_sqs_ordering == "chat" else None
            return group_id(event.instance if chat is None else f"{event.instance}/{chat}")
        if target.instance is not None:
            return "evolution"
        # Upstream formats the event with its first dot only: send.message.update -> send_message.update
        part = (
            "singlequeue" if self.settings.sqs_global_force_single_queue else event.event.replace(".", "_", 1)
        )
        return f"{self.settings.server_name}-{part}-{event.instance}"

    def where(self, target: SqsTarget, event: Event) -> dict[str, str]:
        return {"queue": self.queue_for(target, event)}

    async def send(self, target: SqsTarget, event: Event) -> int | None:
        body = envelope(
            event,
            server_url=event.server_url,
            apikey=event.apikey,
            extra={"dataType": "json", "server": self.settings.server_name},
        )
        if len(body) > self.max_payload:
            raise PermanentError(
                f"message of {len(body)} bytes is over SQS_MAX_PAYLOAD_SIZE ({self.max_payload} bytes)"
            )
        message = _Message(event, body, self.group_for(target, event))
        await self._batcher.submit(self.queue_for(target, event), message)
        return None

    async def _send_batch(self, queue: str, batch: list[Item[_Message]]) -> None:
        entries = []
        for index, item in enumerate(batch):
            message = item.payload
            entry: dict[str, Any] = {"Id": str(index), "MessageBody": message.body.decode()}
            if self.fifo:
                entry["MessageGroupId"] = message.group
                entry["MessageDeduplicationId"] = message.event.id
            entries.append(entry)
        try:
            url = await self._queue_url(queue)
            self.requests += 1
            answer = await self._client.send_message_batch(QueueUrl=url, Entries=entries)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _MISSING_QUEUE:
                self._urls.pop(queue, None)  # deleted under us: create it again next time
            if code in _BAD_CREDENTIALS:
                log.error("sqs.credentials_refused", queue=queue, code=code)
            raise RetryableError(f"SQS {code or 'error'} on queue {queue!r}: {exc}", status=status) from exc
        except BotoCoreError as exc:
            raise RetryableError(f"SQS unreachable: {exc}") from exc
        for ok in answer.get("Successful", []):
            batch[int(ok["Id"])].succeed()
        for failed in answer.get("Failed", []):
            reason = f"SQS refused the message ({failed.get('Code')}): {failed.get('Message', '')}"
            error = PermanentError(reason) if failed.get("SenderFault") else RetryableError(reason)
            batch[int(failed["Id"])].fail(error)

    async def _queue_url(self, queue: str) -> str:
        if queue in self._urls:
            return self._urls[queue]
        try:
            self.requests += 1
            answer = await self._client.get_queue_url(
                QueueName=queue, QueueOwnerAWSAccountId=self.settings.sqs_account_id
            )
            url = answer["QueueUrl"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") not in _MISSING_QUEUE:
                raise
            attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "false"} if self.fifo else {}
            self.requests += 1
            url = (await self._client.create_queue(QueueName=queue, Attributes=attributes))["QueueUrl"]
            log.info("sqs.queue_created", queue=queue)
        self._urls[queue] = str(url)
        return str(url)


class SqsKind(SinkKind):
    name = "sqs"
    settings = SqsSettings
    section = Subscription
    event_flags = "SQS_GLOBAL_"  # upstream's name; SQS_GLOBAL_ENABLED and co. are settings
    checked_by_cli = True  # one authenticated call: are the credentials and the account right

    def enabled(self, settings: SqsSettings) -> bool:
        return settings.sqs_enabled

    def open(self, settings: SqsSettings) -> SqsSink:
        return SqsSink(settings)

    def place(self, settings: Any, instances: Mapping[str, InstanceConfig]) -> Iterable[Placement]:
        if settings.sqs_global_enabled:
            yield Placement(SqsTarget("sqs:global", None, settings.events_enabled(self.name)))
        for name, own in subscribed(self.name, instances):
            yield Placement(SqsTarget(f"sqs:instance:{name}", name, own.subscribed()), name)

    def describe(self, target: SqsTarget, settings: SqsSettings) -> str:
        base = target.instance or settings.sqs_global_prefix_name
        fifo = ".fifo" if settings.sqs_fifo else ""
        return (
            f"queues {base}_<event>{fifo}"
            if settings.sqs_naming == "upstream"
            else f"queues {base}-<event>{fifo}"
        )

    def layout(self, settings: SqsSettings) -> str:
        if settings.sqs_naming == "upstream":
            layout = "Evolution API 2.3.6's: queues <instance>_<event>, MessageGroupId as upstream"
            return f"sqs naming: upstream ({layout})"
        return "sqs naming: router (queues <instance>-<event>, MessageGroupId the ordering key)"

    def secrets(self, settings: SqsSettings) -> list[str | None]:
        return [settings.sqs_secret_access_key]


KIND = SqsKind()
