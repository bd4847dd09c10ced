"""The SQS sink's settings and its target (see ``router.sinks.sqs``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator


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
