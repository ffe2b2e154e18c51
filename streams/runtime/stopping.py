"""How a worker process stops: within ``BLACKROAD_STOP_TIMEOUT`` seconds, whatever the broker does.

Faust's stop waits on the broker in several places (committing offsets and leaving the
group, the final changelog flush, the producers' pending records), and with the broker
gone each of them retries for minutes. Not waiting loses nothing: input offsets are
committed only once the changelog flush that carries their effects is acknowledged, so
whatever the broker has not acknowledged is processed again at the next start.

So once a worker begins to stop, :class:`WorkerStop` gives it ``timeout`` seconds; a worker
still running then says so in one line and exits at once (``os._exit``: Faust's own
shutdown is what is stuck). The countdown runs in a thread of its own, so it fires even if
the event loop is blocked.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

EXIT_OK = 0
#: A worker that crashed (as Faust's own exit code for it).
EXIT_CRASHED = 1
#: The broker lost records this worker had processed (see :mod:`streams.processing.log_continuity`).
EXIT_BROKER_LOST_DATA = 3
#: Stopped by Ctrl-C (SIGINT), as shells report it: 128 + the signal's number.
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: Time left for the last log line to be written before the process exits regardless.
_LAST_WORDS_SECONDS = 0.5


class WorkerStop:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        #: The code the process exits with; the first failure to request a stop sets it.
        self.exit_code = EXIT_OK
        self._countdown: threading.Timer | None = None

    def request(self, exit_code: int) -> None:
        """Stop this worker as SIGTERM does (the same bounded path), then exit with ``exit_code``."""
        if self.exit_code == EXIT_OK:
            self.exit_code = exit_code
        os.kill(os.getpid(), signal.SIGTERM)

    def begin(self, crashed: bool = False) -> None:
        """The worker begins to stop (after a crash, if ``crashed``): start the countdown (once)."""
        if crashed and self.exit_code == EXIT_OK:
            # Exiting at the deadline must not turn a crash into a clean exit.
            self.exit_code = EXIT_CRASHED
        if self._countdown is not None:
            return
        self._countdown = threading.Timer(self.timeout, self._expire)
        self._countdown.daemon = True
        self._countdown.start()

    def _expire(self) -> None:
        # Exit even if writing the log line blocks (a handler lock held by the stuck loop).
        last_words = threading.Timer(_LAST_WORDS_SECONDS, os._exit, (Interrupted.exit_code(self.exit_code),))
        last_words.daemon = True
        last_words.start()
        log.warning(
            "the worker did not stop within %gs (BLACKROAD_STOP_TIMEOUT; is the broker reachable?): exiting "
            "without waiting for it any longer; what the broker has not acknowledged is processed again at the "
            "next start",
            self.timeout,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(Interrupted.exit_code(self.exit_code))


class Interrupted:
    """Whether Ctrl-C (SIGINT) asked this process to stop.

    Every command's signal handler reports its signal here (:meth:`note`); a command that
    then stops cleanly exits with :data:`EXIT_INTERRUPTED` (:meth:`exit_code`), so a shell
    or a script sees that it was interrupted rather than that it finished.
    """

    received = False

    @classmethod
    def note(cls, signum: int) -> None:
        if signum == signal.SIGINT:
            cls.received = True

    @classmethod
    def exit_code(cls, code: int) -> int:
        return EXIT_INTERRUPTED if code == EXIT_OK and cls.received else code
