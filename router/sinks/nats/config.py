"""The NATS sink's settings, its target and the subject of an event (see ``router.sinks.nats``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, field_validator, model_validator

from router.events import Event


class NatsSettings(BaseModel):
    nats_enabled: bool = False
    nats_uri: str | None = None
    nats_global_enabled: bool = False
    nats_prefix_key: str = ""
    nats_exchange_name: str = "evolution_exchange"  # upstream's, unused by its NATS too

    @field_validator("nats_uri", "nats_prefix_key", mode="before")
    @classmethod
    def _nats_empty(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _nats_consistent(self) -> NatsSettings:
        if self.nats_enabled and not self.nats_uri:
            raise ValueError("NATS_ENABLED is true but NATS_URI is not set")
        for server in (self.nats_uri or "").split(","):
            if server and urlsplit(server.strip()).scheme not in ("nats", "tls", "ws", "wss"):
                raise ValueError("NATS_URI must be nats:// (or tls://) server URLs, comma-separated")
        return self


@dataclass(frozen=True, slots=True)
class NatsTarget:
    key: str
    instance: str | None  # None: the global subscription, subjects under NATS_PREFIX_KEY
    events: frozenset[str]
    sink = "nats"


def subject(target: NatsTarget, event: Event, prefix: str) -> str:
    if target.instance is not None:
        return f"{target.instance}.{event.event}"
    return f"{prefix}.{event.event}" if prefix else event.event
