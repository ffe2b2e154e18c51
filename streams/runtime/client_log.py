"""Repeated warnings and errors of the Kafka client, shown once per window instead of as a flood.

While the broker is unreachable, every client in a worker (the consumer, the producers, the
stats follower) logs each failed connect, fetch, metadata update and heartbeat, ten times a
second: about 1,000 ERROR lines in ten seconds that bury everything else; Faust repeats its
own warnings about it too. This filter lets the first record of each kind (logger, level and
message template) through and hides the same kind for ``window`` seconds. It counts what it
hid of the Kafka client's own (aiokafka) records, the ones about talking to the broker;
:mod:`streams.runtime.broker_health` turns the count into one line of the project's own every few
seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: Loggers whose warnings and errors repeat per retry while the broker is away.
CLIENT_LOGGERS = ("aiokafka", "faust", "mode")
#: Those of them about talking to the broker (counted when hidden).
BROKER_CLIENT_LOGGERS = ("aiokafka",)
#: The client's warnings that its group is rebalancing (or was, under another generation):
#: repeated on every heartbeat while a group rebalances, which is the group at work, not the
#: client failing against the broker. Hidden when repeated, like the others, never counted.
GROUP_AT_WORK = frozenset(
    {
        "Heartbeat failed for group %s because it is rebalancing",
        "Heartbeat failed for group %s: generation id is not  current.",
        "Heartbeat failed: local member_id was not recognized; resetting and re-joining group",
    }
)


class RepeatedClientMessages(logging.Filter):
    def __init__(self, window: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self._clock = clock
        #: When each kind was last let through.
        self._shown: dict[tuple[str, int, str], float] = {}
        self._hidden = 0
        self._first_hidden_at: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.WARNING <= record.levelno < logging.CRITICAL or not record.name.startswith(CLIENT_LOGGERS):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        shown = self._shown.get(kind)
        if shown is not None and now - shown < self.window:
            if record.name.startswith(BROKER_CLIENT_LOGGERS) and kind[2] not in GROUP_AT_WORK:
                if not self._hidden:
                    self._first_hidden_at = record.created
                self._hidden += 1
            return False
        self._shown[kind] = now
        return True

    def take_hidden(self) -> tuple[int, float | None]:
        """How many Kafka client records were hidden since the last call, and when the first of them was logged."""
        hidden, first = self._hidden, self._first_hidden_at
        self._hidden, self._first_hidden_at = 0, None
        return hidden, first

    def install(self, logger: logging.Logger) -> None:
        """Filter every handler of ``logger`` (the root logger: records of all loggers reach its handlers)."""
        for handler in logger.handlers:
            handler.addFilter(self)
