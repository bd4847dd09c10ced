"""The router's exception tree. Client-library exceptions are translated into these at the
boundary of each sink (``raise ... from exc``), so the delivery loop only knows these::

    RouterError
    ├── ConfigError            bad settings or instance file; carries every problem found
    ├── IntakeError            an ingested event or request that cannot be accepted
    ├── StoreRefused           nothing new can be stored now (the sender should retry):
    │   ├── StorageFull        the state directory's disk (or the database's) is full
    │   └── StoreUnavailable   the PostgreSQL database cannot be reached
    └── DeliveryError          one delivery attempt failed
        ├── RetryableError     try again later (timeout, 5xx, connection refused, ...);
        │   │                  may carry ``retry_after_s`` from the receiver
        │   └── Unavailable    the sink itself is down (no broker connection): the attempt
        │                      does not count; it waits for ``sink.wait_ready()``
        └── PermanentError     retrying cannot help (non-retryable status, oversize payload)
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error the router raises on purpose."""


class ConfigError(RouterError):
    """Configuration that does not validate. ``problems`` are ``where: what`` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class IntakeError(RouterError):
    """An ingested event that cannot be accepted; the message names what is wrong."""


class StoreRefused(RouterError):
    """The queue cannot take new events now. Events already stored are kept; intake answers 503
    and the sender retries."""


class StoreUnavailable(StoreRefused):
    """The shared database cannot be reached (``where`` names it without its password)."""

    def __init__(self, where: object, why: object) -> None:
        super().__init__(f"the queue database {where} cannot be reached: {why}")


class StorageFull(StoreRefused):
    """The queue database could not be written for lack of disk space. Events already stored are
    kept; new ones cannot be accepted until there is room (the sender should retry)."""

    def __init__(self, path: object) -> None:
        super().__init__(f"the disk holding {path} is full: nothing new can be stored until there is room")


class DeliveryError(RouterError):
    """One delivery attempt failed. ``status`` is the receiver's status code, if any."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(DeliveryError):
    """The attempt may succeed later."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class Unavailable(RetryableError):
    """The sink cannot make any attempt now (its connection is down and being re-opened). Not
    the delivery's failure: the worker waits for the sink, and the attempt is not counted."""


class PermanentError(DeliveryError):
    """Retrying cannot help: the delivery becomes a dead letter at once."""
