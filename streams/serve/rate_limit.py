"""Per-client rate limits of the web views: token buckets.

Each client (its API token's name, or its address when tokens are not in use) has two
buckets on each worker: requests (every view, one each) and tasks (what ``POST
/v1/tasks`` and ``/v1/batch`` put on the broker, one per task, so a batch of 1,000 costs
what 1,000 single posts do). A bucket holds up to ``burst`` and refills at ``rate`` a
second; a request that would take more than it holds is refused with 429 and told when to
come back (``Retry-After``), and takes nothing. Until then the client is refused at the
door (:meth:`TokenBuckets.blocked`), before its request is read: a client that ignores
``Retry-After`` costs the worker a header check per request, not a parse of its body; and
its request waits (:class:`Holds`) until its ``Retry-After`` is up before it is looked at,
so a client that asks again at once is slowed to its limit instead of spinning.
Requests forwarded between workers are not counted again. The buckets of clients idle
longest are forgotten beyond ``clients`` of them (a forgotten client starts again with a
full bucket).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict


class TokenBuckets:
    def __init__(self, rate: float, burst: float, clients: int = 100_000) -> None:
        #: Refill per second; 0 turns the limit off.
        self.rate = rate
        self.burst = burst
        self._clients = clients
        #: client -> (tokens held, when last refilled, refused until), the most recently used last.
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()

    def blocked(self, client: str, now: float | None = None) -> float:
        """Seconds the client must still wait after its last refusal (0.0: none)."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, bucket[2] - now)

    def take(self, client: str, cost: float, now: float | None = None) -> float:
        """Take ``cost`` from the client's bucket: 0.0 when it held enough, else the seconds
        until it will (nothing is taken then). A cost above ``burst`` can never be met: the
        wait returned is then for a full bucket."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        held, since, until = self._buckets.pop(client, (self.burst, now, 0.0))
        held = min(self.burst, held + (now - since) * self.rate)
        if now < until:
            wait = until - now
        elif held >= cost:
            held -= cost
            wait = 0.0
        else:
            wait = (min(cost, self.burst) - held) / self.rate
            until = now + wait
        self._buckets[client] = (held, now, until)
        if len(self._buckets) > self._clients:
            self._buckets.popitem(last=False)
        return wait

    def give_back(self, client: str, cost: float) -> None:
        """Return ``cost`` taken from the client's bucket for a request that was then refused
        for another reason (it never reached the broker)."""
        bucket = self._buckets.get(client)
        if bucket is not None:
            held, since, until = bucket
            self._buckets[client] = (min(self.burst, held + cost), since, until)


class Holds:
    """Requests of clients that did not wait their ``Retry-After``, held until it is up.

    A refusal answered at once invites the next try at once: a client that ignores
    ``Retry-After`` on a few connections then makes thousands of requests a second, each
    a connection to accept and refuse, and its own machine's work besides. Held instead,
    each connection asks about once per ``Retry-After``. At most ``most`` requests are held
    at a time, each at most ``longest`` seconds; beyond that they are refused at once.
    """

    def __init__(self, most: int = 256, longest: float = 2.0) -> None:
        self.most = most
        self.longest = longest
        self.held = 0

    async def hold(self, seconds: float) -> bool:
        """Wait ``seconds`` (at most :attr:`longest`); False, at once, when too many already wait."""
        if self.held >= self.most:
            return False
        self.held += 1
        try:
            await asyncio.sleep(min(seconds, self.longest))
        finally:
            self.held -= 1
        return True


def retry_after(wait: float) -> int:
    """Whole seconds for ``Retry-After`` (at least 1)."""
    return max(1, math.ceil(wait))
