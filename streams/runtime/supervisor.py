"""Several worker processes on one machine, each a full worker with its own web port, and
the machine's read replicas (``BLACKROAD_READERS``) beside them.

Python runs one core per process, so a machine with more cores runs more workers. They
join one consumer group and split the partitions like workers on separate machines do;
their web views forward to each other (see :mod:`streams.serve.web`). A worker that exits
unexpectedly is started again (at once if a signal killed it, after a growing pause if it
exited by itself soon after starting) and recovers its tables from the changelogs; a reader
likewise, and catches up with the changelogs again (:mod:`streams.replica`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from streams.runtime.broker import die_with_parent, terminate
from streams.runtime.settings import Settings
from streams.runtime.stopping import EXIT_BROKER_LOST_DATA, Interrupted

#: Pause before starting a worker that exited again, doubling up to the maximum.
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 30.0
#: A worker that ran this long before exiting restarts after the first pause again.
_HEALTHY_SECONDS = 60.0
#: Seconds past a worker's own stop bound before it is killed.
_STOP_GRACE = 0.5


@dataclass
class _Child:
    index: int
    web_port: int
    #: ``worker`` (processes tasks) or ``reader`` (a read replica).
    kind: str = "worker"
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = _FIRST_BACKOFF
    restart_at: float | None = None


class Supervisor:
    def __init__(self, settings: Settings, count: int, readers: int = 0) -> None:
        self.settings = settings
        self.children = [_Child(i, settings.web_port + i) for i in range(count)]
        reader_ports = range(settings.web_port + count, settings.web_port + count + readers)
        self.children += [_Child(count + i, port, "reader") for i, port in enumerate(reader_ports)]
        self._stopping = False
        #: What ``run`` returns: a worker's fatal exit code once one made every worker stop.
        self.exit_code = 0

    def command(self, child: _Child) -> list[str]:
        if child.kind == "reader":
            # Memory search, which only workers hold, goes to the first worker of this machine.
            upstream = self.settings.web_url
            return [
                sys.executable,
                "-m",
                "streams.cli",
                "reader",
                "--web-port",
                str(child.web_port),
                "--upstream",
                upstream,
            ]
        return [sys.executable, "-m", "streams.cli", "worker", "--web-port", str(child.web_port), "--processes", "1"]

    def _start(self, child: _Child) -> None:
        child.process = subprocess.Popen(  # noqa: S603 - our own module
            self.command(child),
            # Each child is one process of its own: the readers are this supervisor's to run.
            env={**os.environ, "BLACKROAD_READERS": "0"},
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, fork-safe
        )
        child.started = time.monotonic()
        child.restart_at = None

    def stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        Interrupted.note(signum)
        self._stopping = True

    def forward(self, signum: int, _frame: object = None) -> None:
        """Pass a signal on to every running worker (SIGUSR1/SIGUSR2: each dumps its stacks;
        the read replicas have no such handler)."""
        for child in self.children:
            if child.kind == "worker" and child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)

    def run(self) -> int:
        """Start every worker and keep them running until SIGINT or SIGTERM."""
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        previous.update({sig: signal.signal(sig, self.forward) for sig in (signal.SIGUSR1, signal.SIGUSR2)})
        try:
            for child in self.children:
                self._start(child)
            while not self._stopping:
                self._watch()
                time.sleep(0.2)
        finally:
            for child in self.children:
                if child.process is not None and child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            # Each worker bounds its own stop (BLACKROAD_STOP_TIMEOUT); they stop side by side, so
            # all share one deadline, after which any still running is killed.
            deadline = time.monotonic() + self.settings.stop_timeout + _STOP_GRACE
            for child in self.children:
                if child.process is not None:
                    terminate(child.process, timeout=max(0.0, deadline - time.monotonic()))
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            if process is None or process.poll() is None:
                continue
            if process.returncode == EXIT_BROKER_LOST_DATA and child.kind == "worker":
                # Every worker would refuse the broker the same way: stop them all (the
                # worker's own CRITICAL line says why) rather than restart in a loop.
                print(
                    f"blackroad: worker on web port {child.web_port} found the broker lost its data; stopping",
                    file=sys.stderr,
                    flush=True,
                )
                self.exit_code = process.returncode
                self._stopping = True
                return
            if now - child.started >= _HEALTHY_SECONDS:
                child.backoff = _FIRST_BACKOFF
            # A worker killed by a signal (SIGKILL by an operator or the OOM killer) comes
            # back at once: its partitions wait for it. One that exits by itself soon after
            # starting is likely to fail again the same way, so it backs off.
            killed = process.returncode < 0
            pause = 0.0 if killed else child.backoff
            child.restart_at = now + pause
            print(
                f"blackroad: {child.kind} on web port {child.web_port} "
                + (f"killed by signal {-process.returncode}" if killed else f"exited with code {process.returncode}")
                + (f"; starting it again in {pause:.0f}s" if pause else "; starting it again"),
                file=sys.stderr,
                flush=True,
            )
            if not killed:
                child.backoff = min(_MAX_BACKOFF, child.backoff * 2)
