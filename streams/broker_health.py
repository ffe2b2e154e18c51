"""One line every few seconds while the Kafka client keeps failing, instead of its own flood.

:class:`~streams.client_log.RepeatedClientMessages` hides the client's repeated warnings and
errors; this service says, every ``REPORT_INTERVAL`` seconds while it hides any, that the broker
is unreachable (or, if it accepts connections, that the client keeps failing against it) since
when, and how many client messages it did not show; and once when they stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from mode import Service

from streams.client_log import RepeatedClientMessages

log = logging.getLogger(__name__)

REPORT_INTERVAL = 5.0


class BrokerHealth(Service):
    def __init__(self, bootstrap: str, messages: RepeatedClientMessages, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bootstrap = bootstrap
        self.messages = messages
        #: Wall-clock time of the first report of the current failure, None while all is well.
        self.failing_since: float | None = None

    @Service.timer(REPORT_INTERVAL)
    async def _report(self) -> None:
        hidden, first_hidden_at = self.messages.take_hidden()
        if not hidden:
            if self.failing_since is not None:
                log.warning(
                    "the Kafka client has stopped failing: the broker at %s answers again (it did not since %s)",
                    self.bootstrap,
                    _clock(self.failing_since),
                )
                self.failing_since = None
            return
        if self.failing_since is None:
            self.failing_since = first_hidden_at or time.time()
        if await self._accepts():
            state = "the Kafka client keeps failing against the broker at %s, which accepts connections,"
        else:
            state = "the broker at %s is unreachable"
        log.warning(
            state + " since about %s (%d repeated Kafka client messages in the last %gs not shown)",
            self.bootstrap,
            _clock(self.failing_since),
            hidden,
            REPORT_INTERVAL,
        )

    async def _accepts(self) -> bool:
        host, _, port = self.bootstrap.split(",")[0].strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))
