"""One line every few seconds while the Kafka client keeps failing, instead of its own flood.

:class:`~streams.runtime.client_log.RepeatedClientMessages` hides the client's repeated warnings and
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

from streams.runtime.client_log import RepeatedClientMessages

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
        servers = [server.strip() for server in self.bootstrap.split(",") if server.strip()]
        accepting = await asyncio.gather(*(_accepts(server) for server in servers))
        log.warning(
            "%s since about %s (%d repeated Kafka client messages in the last %gs not shown)",
            describe_failure(servers, accepting),
            _clock(self.failing_since),
            hidden,
            REPORT_INTERVAL,
        )


def describe_failure(servers: list[str], accepting: list[bool]) -> str:
    """What a failing client's brokers look like from here, in a few words."""
    if len(servers) == 1:
        if accepting[0]:
            return f"the Kafka client keeps failing against the broker at {servers[0]}, which accepts connections,"
        return f"the broker at {servers[0]} is unreachable"
    down = [server for server, up in zip(servers, accepting, strict=True) if not up]
    if not down:
        return f"the Kafka client keeps failing against the brokers at {','.join(servers)}, which accept connections,"
    if len(down) == len(servers):
        return f"the brokers at {','.join(servers)} are unreachable"
    return (
        f"the Kafka client keeps failing against the brokers at {','.join(servers)}, "
        f"of which {','.join(down)} {'is' if len(down) == 1 else 'are'} unreachable,"
    )


async def _accepts(server: str) -> bool:
    host, _, port = server.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1.0)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))
