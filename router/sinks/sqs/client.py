"""The SQS client: batched sends through aiobotocore. Imported only when the sink is enabled:
botocore alone takes about a second to import, half of a start with 10,000 instances."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from router import logs
from router.errors import PermanentError, RetryableError
from router.events import Event, config_name, envelope
from router.sinks import BaseSink
from router.sinks.batching import Batcher, Item
from router.sinks.sqs.config import SqsTarget
from router.sinks.sqs.naming import group_id, queue_name, upstream_queue_name

log = logs.get_logger("router.sinks.sqs")
BATCH_LIMIT = 10  # entries per SendMessageBatch (an SQS limit)
_MISSING_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_BAD_CREDENTIALS = {
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "AccessDenied",
    "AccessDeniedException",
    "MissingAuthenticationToken",
}


@dataclass(frozen=True, slots=True)
class _Message:
    event: Event
    body: bytes
    group: str  # MessageGroupId


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
