"""Retry schedules: upstream's for webhooks, a gentle unbounded one for queues and brokers."""

from __future__ import annotations

import random
from dataclasses import dataclass

QUEUE_MAX_ATTEMPTS = 2**62  # "forever": a broker outage never turns events into dead letters


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Upstream's schedule: the delay before attempt n+1 after n failed attempts is
    ``min(initial * 2**(n-1), max)``, then jittered by ±``jitter``, never below ``initial``."""

    max_attempts: int = 10
    initial_delay_s: float = 5.0
    exponential: bool = True
    max_delay_s: float = 300.0
    jitter: float = 0.2

    def delay_s(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        if not self.exponential:
            return self.initial_delay_s
        delay = min(self.initial_delay_s * 2 ** (failed_attempts - 1), self.max_delay_s)
        spread = delay * self.jitter * (rng or random).uniform(-1.0, 1.0)
        return float(max(self.initial_delay_s, delay + spread))

    @classmethod
    def for_queues(cls, initial_delay_s: float, max_delay_s: float) -> RetryPolicy:
        """Brokers and queues: while one is down, events wait in the store; retried forever, gently."""
        return cls(max_attempts=QUEUE_MAX_ATTEMPTS, initial_delay_s=initial_delay_s, max_delay_s=max_delay_s)
