"""RabbitMQ's settings, its target and its name rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator

from router.redact import redact_url


class RabbitmqSettings(BaseModel):
    """Upstream's RabbitMQ settings, and ``RABBITMQ_TOPOLOGY`` (ours)."""

    rabbitmq_enabled: bool = False
    rabbitmq_uri: str | None = None
    rabbitmq_exchange_name: str = "evolution_exchange"
    rabbitmq_global_enabled: bool = False
    rabbitmq_prefix_key: str = ""
    rabbitmq_frame_max: int = Field(8192, ge=4096)
    # "router" (one exchange, keys {instance}.{event}) or "upstream" (Evolution API 2.3.6's)
    rabbitmq_topology: Literal["router", "upstream"] = "router"

    @field_validator("rabbitmq_uri", mode="before")
    @classmethod
    def _rabbitmq_empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("rabbitmq_topology", mode="before")
    @classmethod
    def _rabbitmq_lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _rabbitmq_consistent(self) -> RabbitmqSettings:
        if self.rabbitmq_enabled and not self.rabbitmq_uri:
            raise ValueError("RABBITMQ_ENABLED is true but RABBITMQ_URI is not set")
        if self.rabbitmq_uri and urlsplit(self.rabbitmq_uri).scheme not in ("amqp", "amqps"):
            uri = redact_url(self.rabbitmq_uri)
            raise ValueError(f"RABBITMQ_URI must be an amqp:// or amqps:// URI, got {uri!r}")
        return self


@dataclass(frozen=True, slots=True)
class RabbitmqTarget:
    """Publishes to the exchange; declares the queues that should receive each event."""

    key: str
    instance: str | None  # None: the global target (instances without RabbitMQ of their own)
    instance_events: frozenset[str]  # declare and bind ``{instance}.{event}``
    global_events: frozenset[str]  # declare and bind ``{prefix}.{event}`` to ``#.{event}``
    sink = "rabbitmq"

    @property
    def events(self) -> frozenset[str]:
        return self.instance_events | self.global_events


def topic_safe(name: str) -> bool:
    """Usable in a RabbitMQ binding key ``{instance}.{event}``: no word of it is a wildcard
    (``*`` or ``#``). Dots are fine: they only add words before the event's."""
    return not any(word in ("*", "#") for word in name.split("."))
