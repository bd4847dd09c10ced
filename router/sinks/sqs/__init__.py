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

from collections.abc import Iterable, Mapping
from typing import Any

from router.sections import Subscription
from router.sinks import BaseSink, Configured, Placement, SinkKind, subscribed
from router.sinks.sqs.config import SqsSettings, SqsTarget
from router.sinks.sqs.naming import group_id, legal_queue_name, queue_name, upstream_queue_name

__all__ = [
    "KIND",
    "SqsSettings",
    "SqsTarget",
    "group_id",
    "legal_queue_name",
    "queue_name",
    "upstream_queue_name",
]


class SqsKind(SinkKind):
    name = "sqs"
    settings = SqsSettings
    section = Subscription
    event_flags = "SQS_GLOBAL_"  # upstream's name; SQS_GLOBAL_ENABLED and co. are settings
    checked_by_cli = True  # one authenticated call: are the credentials and the account right

    def enabled(self, settings: SqsSettings) -> bool:
        return settings.sqs_enabled

    def open(self, settings: SqsSettings) -> BaseSink:
        from router.sinks.sqs.client import SqsSink  # noqa: PLC0415 - botocore only when SQS is on

        return SqsSink(settings)

    def place(self, settings: Any, instances: Mapping[str, Configured]) -> Iterable[Placement]:
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
