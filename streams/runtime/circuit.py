"""A circuit breaker: after repeated failures, stop calling a dead server for a while."""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    """``closed`` (calls go through), ``open`` (calls wait out ``reset_timeout``), ``half_open``.

    After ``failure_threshold`` consecutive failures the circuit opens: the caller waits
    :meth:`wait_seconds` instead of trying again at once. Once that has passed one trial call
    goes through (half open); its success closes the circuit, its failure opens it again
    for twice as long, up to ``max_reset_timeout``.
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_timeout: float = 1.0,
        max_reset_timeout: float = 10.0,
        retry_delay: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_reset_timeout = reset_timeout
        self.reset_timeout = reset_timeout
        self.max_reset_timeout = max_reset_timeout
        self.retry_delay = retry_delay
        self.failures = 0
        self.opened_at: float | None = None
        self._clock = clock

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "open" if self._clock() - self.opened_at < self.reset_timeout else "half_open"

    def wait_seconds(self) -> float:
        """How long to wait before the next call: a short retry delay while closed, the rest of the open time."""
        if self.opened_at is None:
            return self.retry_delay if self.failures else 0.0
        return max(0.0, self.reset_timeout - (self._clock() - self.opened_at))

    def succeeded(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.reset_timeout = self.base_reset_timeout

    def failed(self) -> None:
        self.failures += 1
        if self.opened_at is not None:  # the trial call failed: open again, for longer
            self.reset_timeout = min(self.max_reset_timeout, self.reset_timeout * 2)
            self.opened_at = self._clock()
        elif self.failures >= self.failure_threshold:
            self.opened_at = self._clock()
