"""One delivery attempt, and how it ends.

A worker (``router.worker``) decides when to attempt a delivery; ``Attempts.run`` calls the
sink and records the outcome: an ack (delivered), a retry (rescheduled with backoff, or the
receiver's ``Retry-After``) or a kill (a dead letter with its last error), with the attempt's
metrics and its ``WEBHOOKS`` log line. A sink that turns out to be unavailable is not an
attempt: ``Unavailable`` goes back to the worker, and nothing is recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from router import logs
from router.errors import PermanentError, RetryableError, Unavailable
from router.retry import RetryPolicy
from router.routing import Target
from router.sinks import BaseSink
from router.store import Lease, QueueStore

log = logs.get_logger("router.delivery")
Count = Callable[[str, str, str, float, float | None], None]  # sink, event, outcome, seconds, latency


class Ended(NamedTuple):
    """How an attempt ended, for its worker."""

    retry_at: float | None  # a retry, due then (None: delivered or dead)
    written: asyncio.Future[Any] | None  # the store write that ends the delivery (ack, dead letter)


class Attempts:
    """Runs attempts for every worker of a dispatcher; see the module docstring."""

    def __init__(self, store: QueueStore, target_of: Callable[[str], Target | None], count: Count) -> None:
        self.store = store
        self.target_of = target_of  # a target by key: configured, or removed but still draining
        self.count = count

    async def run(self, key: str, sink: BaseSink, policy: RetryPolicy, lease: Lease) -> Ended:
        """Attempt ``lease`` for target ``key`` and record the outcome; raise ``Unavailable`` when
        the sink could not take it (then nothing is recorded)."""
        target = self.target_of(key)
        started = time.perf_counter()
        status: int | None = None
        outcome, error, retry_at = "delivered", "", None
        written: asyncio.Future[Any] | None = None
        try:
            if target is None:
                raise PermanentError(f"target {key} is no longer configured")
            status = await sink.send(target, lease.event)
        except Unavailable:
            raise  # not the delivery's failure: the worker's lane waits for the sink
        except RetryableError as exc:
            status, error = exc.status, logs.scrub(str(exc))
            outcome, error, retry_at, written = self._retry_or_kill(policy, lease, error, exc.retry_after_s)
        except PermanentError as exc:
            status, error, outcome = exc.status, logs.scrub(str(exc)), "dead"
            written = track(self.store.kill(lease, error))
        except Exception as exc:  # a bug in a sink must not kill the worker, nor retry forever
            log.exception("delivery.bug", target=key, event_id=lease.event.id)
            error = logs.scrub(f"internal error: {type(exc).__name__}: {exc}")
            outcome, error, retry_at, written = self._retry_or_kill(policy, lease, error, None)
        else:
            written = self.store.ack(lease)
        elapsed = time.perf_counter() - started
        latency_s = time.time() - lease.accepted_at if outcome == "delivered" else None
        self.count(sink.name, lease.event.event, outcome, elapsed, latency_s)
        if logs.is_enabled("WEBHOOKS"):
            log.info(
                "delivery.attempt",
                kind="WEBHOOKS",
                **log_fields(key, sink, lease),
                **(sink.where(target, lease.event) if target else {}),
                attempt=lease.attempts + 1,
                status=status,
                outcome=outcome,
                elapsed_ms=round(elapsed * 1000, 1),
                **({"error": error} if error else {}),
            )
        if outcome == "dead":
            attempt = lease.attempts + 1
            log.error("delivery.dead_letter", **log_fields(key, sink, lease), attempt=attempt, error=error)
        return Ended(retry_at, written)

    def _retry_or_kill(
        self, policy: RetryPolicy, lease: Lease, error: str, retry_after_s: float | None
    ) -> tuple[str, str, float | None, asyncio.Future[Any] | None]:
        """A failed attempt counts, whatever failed: retried by the policy, or a dead letter.
        Returns the outcome, the error as recorded, when the retry is due (None: dead) and the
        dead letter's write."""
        attempt = lease.attempts + 1
        if attempt >= policy.max_attempts:
            error = f"{error} (gave up after {attempt} attempts)"
            return "dead", error, None, track(self.store.kill(lease, error))
        delay = policy.delay_s(attempt)
        if retry_after_s is not None:
            delay = min(retry_after_s, policy.max_delay_s)
        retry_at = time.time() + delay
        track(self.store.retry(lease, retry_at, error))
        return f"retry in {delay:.2f}s", error, retry_at, None


def log_fields(key: str, sink: BaseSink, lease: Lease) -> dict[str, Any]:
    """What every log line about one delivery names."""
    event = lease.event
    return {
        "instance": event.instance,
        "_event": event.event,
        "event_id": event.id,
        "sink": sink.name,
        "target": key,
    }


def track(future: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """Store writes are not awaited (at-least-once tolerates a lost ack); failures are logged."""

    def done(f: asyncio.Future[Any]) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.error("store.write_failed", error=str(f.exception()))

    future.add_done_callback(done)
    return future
