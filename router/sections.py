"""The shape every sink's per-instance section shares: ``{enabled, events}``.

A sink whose section says more (the webhook's ``url``, Pusher's credentials) extends
``Subscription`` in its own module and names it in its ``SinkKind``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from router.events import EVERY_EVENT, UnknownEventError, wire_name


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
