"""The ``blackroad`` command: up, broker, postgres, worker, produce, db migrate, dlq, perf."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import logging.config
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import orjson

from streams.engines import choice
from streams.history.embedded import EmbeddedPostgres, PostgresError
from streams.processing.metrics import build_info
from streams.runtime import json_logs, native
from streams.runtime.broker import BrokerError, die_with_parent, port_is_open
from streams.runtime.client_log import RepeatedClientMessages
from streams.runtime.settings import Settings, SettingsError
from streams.runtime.stopping import EXIT_BROKER_LOST_DATA, EXIT_CRASHED, Interrupted, WorkerStop


def _settings() -> Settings:
    try:
        return Settings.from_env(os.environ)
    except SettingsError as exc:
        raise SystemExit(f"blackroad: bad setting: {exc}") from None


def _require_broker(settings: Settings) -> None:
    if settings.embedded and not port_is_open(settings.embedded_broker_port):
        raise SystemExit(
            f"blackroad: no broker on 127.0.0.1:{settings.embedded_broker_port}; "
            "run `blackroad broker` (or `blackroad up`), or set BLACKROAD_KAFKA_BOOTSTRAP"
        )


def _start_engine(settings: Settings) -> choice.Engine:
    """Start the embedded broker BLACKROAD_ENGINE chooses; returns once it serves."""
    engine, note = choice.choose(settings)
    if note is not None:
        print(f"blackroad: {note}", flush=True)
    broker = choice.embedded_broker(settings, engine)
    started = time.monotonic()
    try:
        broker.start()
    except BrokerError as exc:
        raise SystemExit(f"blackroad: {exc}") from None
    kept = f"data in {settings.data_dir}" if broker.durable else "in memory only"
    print(
        f"embedded broker: {engine} ({kept}) on {broker.bootstrap}, serving after {time.monotonic() - started:.1f}s",
        flush=True,
    )
    return broker


def _reach(settings: Settings) -> Settings:
    """Wait for the broker; ``settings`` with the engine it turned out to be and the replication resolved."""
    try:
        return asyncio.run(choice.engine_in_use(settings))
    except (SettingsError, BrokerError) as exc:
        print(f"blackroad: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def cmd_broker(args: argparse.Namespace) -> int:
    settings = _settings()
    if not settings.embedded:
        raise SystemExit("blackroad: BLACKROAD_KAFKA_BOOTSTRAP is set; no embedded broker is needed")
    broker = _start_engine(settings)
    stop = {"now": False}

    def _stop(signum: int, _frame: object) -> None:
        Interrupted.note(signum)
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop["now"]:
            time.sleep(0.2)
    finally:
        broker.stop()
    return 0


#: How long a stopping worker's event loop runs on after its services stopped (mode's default: 1 s).
SENTINEL_SECONDS = 0.05
#: How long a stopping worker waits for tasks left running after its services stopped (mode's: 1 s).
GATHER_SECONDS = 0.1


def _worker_class(stopping: WorkerStop, client_messages: RepeatedClientMessages) -> type:
    import faust

    from streams.runtime.stack_dump import dump_stacks

    class Worker(faust.Worker):  # type: ignore[misc]
        """Faust's worker with a bounded stop, the Kafka client's repeats filtered, no spinner,
        and a dump of its stacks on SIGUSR1 and SIGUSR2 (:mod:`streams.runtime.stack_dump`).

        The spinner lowers the root logger to DEBUG for good, so every library builds
        a log record for each debug call on the hot path only to have it filtered out.
        """

        def on_setup_root_logger(self, logger: Any, level: int) -> None:
            self.spinner = None
            super().on_setup_root_logger(logger, level)
            client_messages.install(logger)

        def _on_sigint(self) -> None:
            Interrupted.note(signal.SIGINT)
            super()._on_sigint()

        def _on_sigusr1(self) -> None:
            dump_stacks(sys.stderr, self.loop)

        _on_sigusr2 = _on_sigusr1

        async def stop(self) -> None:
            # Whatever asked for the stop (a signal, a crash, a fatal condition), it is bounded.
            stopping.begin(crashed=self.crash_reason is not None)
            await super().stop()

        def _gather_all(self) -> None:
            # Tasks still running once every service stopped were given up by a bounded
            # stop (the retry relay's consumer still joining its group, a flush past its
            # budget): a moment to end, then cancelled. mode gives them up to a second.
            deadline = time.monotonic() + GATHER_SECONDS
            while asyncio.all_tasks(self.loop) and time.monotonic() < deadline:
                self.loop.run_until_complete(asyncio.sleep(0.01))
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        async def _sentinel_task(self) -> None:
            # The last turns of the loop before it closes, for the callbacks of closed
            # connections and of the tasks just cancelled. mode sleeps a whole second here.
            await asyncio.sleep(SENTINEL_SECONDS)

    return Worker


def run_worker(settings: Settings, stopping: WorkerStop | None = None) -> int:
    """Run one worker in this process until it is stopped (SIGINT/SIGTERM); return its exit code."""
    from streams.app import create_app
    from streams.processing.retry_relay import relay_client_id, relay_group
    from streams.runtime.broker_health import BrokerHealth
    from streams.runtime.heap_trim import HeapTrim
    from streams.runtime.membership import client_id, evict_predecessors, takes_over_from_predecessors

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # A process that died here before left its members in the groups (the tasks' and the
    # retry relay's): remove them, so the groups rebalance at once instead of waiting out
    # those members' sessions.
    if takes_over_from_predecessors(settings):
        groups = ((settings.app_id, client_id(settings)), (relay_group(settings), relay_client_id(settings)))
        for group, name in groups:
            for member in asyncio.run(evict_predecessors(settings, group, name)):
                print(f"blackroad: removed the member {member} a previous worker process left in {group}", flush=True)
    app = create_app(settings, stopping=stopping)
    client_messages = RepeatedClientMessages()
    _Worker = _worker_class(app.stopping, client_messages)
    # Tables hold many small long-lived containers; collecting the young generation less
    # often keeps the collector from rescanning them on the hot path.
    gc.set_threshold(50_000, 20, 100)
    health = BrokerHealth(settings.bootstrap, client_messages)
    worker = _Worker(
        app,
        health,
        HeapTrim(settings.heap_trim_interval),
        loglevel=settings.log_level.upper(),
        redirect_stdouts=False,
        logging_config=json_logs.logging_config(settings.log_level) if settings.log_format == "json" else None,
    )
    code = 0
    try:
        worker.execute_from_commandline()  # ends with SystemExit, always
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return app.stopping.exit_code or code


def run_workers(settings: Settings, stopping: WorkerStop | None = None) -> int:
    """Run ``settings.process_count`` workers: in this process, or supervised children.

    ``stopping.request(code)`` stops them (as SIGTERM does) and sets the exit code.
    """
    _require_free_web_ports(settings)
    if settings.process_count == 1 and not settings.readers:
        return run_worker(settings, stopping)
    from streams.runtime.supervisor import Supervisor
    from streams.serve.peer_secret import shared_peer_secret

    if settings.peer_secret is None:
        # Read once here and inherited: a worker process started again after a crash then
        # joins its group without first asking the broker for it.
        os.environ["BLACKROAD_PEER_SECRET"] = asyncio.run(shared_peer_secret(settings))

    code = Supervisor(settings, settings.process_count, settings.readers).run()
    return (stopping.exit_code if stopping is not None else 0) or code


def _configure_logging(settings: Settings) -> None:
    """Logging of the commands that are not workers (a worker's goes through Faust's worker)."""
    if settings.log_format == "json":
        logging.config.dictConfig(json_logs.logging_config(settings.log_level))
    else:
        logging.basicConfig(
            level=settings.log_level.upper(), format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
        )


def _require_free_web_ports(settings: Settings) -> None:
    """Stop with one line, before any worker starts, when a web port is taken."""
    for port in range(settings.web_port, settings.web_port + settings.process_count + settings.readers):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((settings.web_host, port))
            except OSError as exc:
                raise SystemExit(
                    f"blackroad: cannot serve the web views on {settings.web_host}:{port}: {exc.strerror or exc} "
                    "(BLACKROAD_WEB_PORT; is another worker running?)"
                ) from None


def _handlers_option(args: argparse.Namespace) -> None:
    """``--handlers`` stands for ``BLACKROAD_HANDLERS`` (the worker processes inherit it); the
    plug-ins are loaded once here, so one that cannot be stops the command before any worker starts."""
    from agents.plugins import PluginError, load_handlers
    from agents.registry import HandlerRegistry

    if args.handlers is not None:
        os.environ["BLACKROAD_HANDLERS"] = args.handlers
    try:
        load_handlers(HandlerRegistry(), _settings().handler_specs)
    except PluginError as exc:
        raise SystemExit(f"blackroad: handler plug-in: {exc}") from None


def cmd_worker(args: argparse.Namespace) -> int:
    _handlers_option(args)
    settings = _settings()
    try:
        if args.web_port:
            settings = settings.replace(web_port=args.web_port)
        if args.processes is not None:
            settings = settings.replace(worker_processes=args.processes)
    except SettingsError as exc:
        raise SystemExit(f"blackroad: bad option: {exc}") from None
    _require_broker(settings)
    return run_workers(_reach(settings))


def cmd_reader(args: argparse.Namespace) -> int:
    """One read replica in this process (``up`` and ``worker`` run ``BLACKROAD_READERS`` of them)."""
    from yarl import URL

    from streams.replica.server import serve

    settings = _settings()
    upstream = URL(args.upstream or settings.web_url)
    try:
        settings = settings.replace(web_port=args.web_port or settings.web_port + settings.process_count)
    except SettingsError as exc:
        raise SystemExit(f"blackroad: bad option: {exc}") from None
    _require_broker(settings)
    settings = _reach(settings)
    _configure_logging(settings)

    async def run() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopped_by(signum: int) -> None:
            Interrupted.note(signum)
            stopped.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped_by, sig)
        await serve(settings, upstream, stopped)

    asyncio.run(run())
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.runtime import loadgen

    settings = _settings()
    _require_broker(settings)
    # The tasks topic may not exist yet: it is then created with the cluster's replication.
    settings = _reach(settings)
    progress = loadgen.Progress()
    if args.wait_for_worker:
        deadline = time.monotonic() + 120
        while fetch_stats(settings) is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finished_before = _finished_tasks(settings) if args.stats else 0

    async def main() -> int:
        job = asyncio.create_task(
            loadgen.produce(
                settings,
                settings.topic("tasks"),
                args.agents,
                args.rate,
                args.count,
                args.seed,
                progress,
                pack=args.pack,
                partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=settings.topic_configs,
            )
        )
        try:
            while not job.done():
                await asyncio.wait({job}, timeout=1.0)
                loadgen.print_line(_progress_text(progress, args.count, settings if args.stats else None))
            if args.stats:  # the last line shows the tasks in flight finished too
                deadline = time.monotonic() + 10
                while _finished_tasks(settings) - finished_before < progress.sent and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                loadgen.print_line(_progress_text(progress, args.count, settings))
        except asyncio.CancelledError:  # Ctrl-C: stop sending, close the producer cleanly
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
            raise
        finally:
            sys.stderr.write("\n")
        return job.result()

    try:
        sent = asyncio.run(main())
    except KeyboardInterrupt:
        Interrupted.note(signal.SIGINT)
        sent = progress.sent
    print(f"sent {sent} tasks", flush=True)
    return 0


def _progress_text(progress: object, count: int, settings: Settings | None) -> str:
    sent = getattr(progress, "sent", 0)
    elapsed = max(1e-6, time.monotonic() - getattr(progress, "started", time.monotonic()))
    text = f"sent {sent}" + (f"/{count}" if count else "") + f" ({sent / elapsed:,.0f}/s)"
    if settings is not None:
        stats = fetch_stats(settings)
        if stats:
            latency = stats["task_latency_ms"]
            text += (
                f" | completed {stats['completed_tasks']} failed {stats['failed_tasks']}"
                f" dead {stats['dead_tasks']} | {stats['tasks_per_minute']}/min"
                f" | latency p50 {latency['p50']} ms p99 {latency['p99']} ms | agents {stats['active_agents']}"
            )
            if stats.get("history_lag") is not None:
                text += f" | history lag {stats['history_lag']}"
    return text


def _finished_tasks(settings: Settings) -> int:
    stats = fetch_stats(settings) or {}
    return int(stats.get("completed_tasks", 0) + stats.get("failed_tasks", 0) + stats.get("dead_tasks", 0))


def fetch_stats(settings: Settings) -> dict[str, Any] | None:
    request = urllib.request.Request(f"{settings.web_url}/v1/stats")  # noqa: S310 - own URL
    tokens = settings.api_token_list()
    if tokens:
        request.add_header("Authorization", f"Bearer {tokens[0]}")
    try:
        with urllib.request.urlopen(request, timeout=1) as response:  # noqa: S310 - own URL
            return orjson.loads(response.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def _embedded_broker_died(code: int, stopping: WorkerStop, durable: bool) -> None:
    """``up``'s broker exited on its own: nothing would serve the workers again, so they stop.

    Tansu's data (topics, table changelogs, committed offsets) lived in its memory and is gone
    (exit code 3, as for any broker that lost its data); Kafka's is kept in the data directory.
    """
    if durable:
        kept = "its data is kept in the data directory; run `blackroad up` again to go on"
    else:
        kept = (
            "its in-memory data (topics, table changelogs, committed offsets) is gone; "
            "run `blackroad up` again to start afresh"
        )
    print(
        f"blackroad: the embedded broker exited unexpectedly (code {code}); the workers stop: {kept}.",
        file=sys.stderr,
        flush=True,
    )
    stopping.request(EXIT_CRASHED if durable else EXIT_BROKER_LOST_DATA)


#: How long ``up`` waits for its demo load to stop before killing it.
_DEMO_STOP_SECONDS = 0.5


def _start_postgres(settings: Settings) -> EmbeddedPostgres:
    """Start the embedded PostgreSQL of the history (data kept in ``<DATA_DIR>/postgres``)."""
    started = time.monotonic()
    postgres = EmbeddedPostgres(settings.embedded_postgres_port, settings.data_dir / "postgres")
    try:
        postgres.start()
    except PostgresError as exc:
        raise SystemExit(f"blackroad: {exc}") from None
    print(
        f"embedded PostgreSQL (data in {postgres.home}) on 127.0.0.1:{postgres.port}, "
        f"serving after {time.monotonic() - started:.1f}s",
        flush=True,
    )
    return postgres


def _postgres_died(code: int) -> None:
    print(
        f"blackroad: the embedded PostgreSQL exited unexpectedly (code {code}); task processing goes on, "
        "the history waits for it (restart `blackroad up` to start it again)",
        file=sys.stderr,
        flush=True,
    )


def cmd_up(args: argparse.Namespace) -> int:
    _handlers_option(args)
    settings = _settings()
    broker: choice.Engine | None = None
    postgres: EmbeddedPostgres | None = None
    stopping = WorkerStop(settings.stop_timeout)
    if settings.embedded and not port_is_open(settings.embedded_broker_port):
        broker = _start_engine(settings)
        durable = broker.durable
        broker.on_unexpected_exit(lambda code: _embedded_broker_died(code, stopping, durable))
    demo: subprocess.Popen[bytes] | None = None
    history: subprocess.Popen[bytes] | None = None
    try:
        history_port = settings.embedded_postgres_port
        if settings.history_enabled and settings.embedded_postgres and not port_is_open(history_port):
            postgres = _start_postgres(settings)
            postgres.on_unexpected_exit(_postgres_died)
        if settings.history_enabled:
            history = _start_history()
        settings = _reach(settings)
        count = settings.process_count
        ports = f"{settings.web_port}" if count == 1 else f"{settings.web_port}-{settings.web_port + count - 1}"
        readers = settings.reader_ports
        reading = f", {len(readers)} reader(s) on ports {readers[0]}-{readers[-1]}" if readers else ""
        print(
            f"{count} worker process(es), web views on ports {ports}{reading}: {settings.web_url}/v1/stats"
            "  (Ctrl-C stops everything)",
            flush=True,
        )
        if args.demo:
            command = [
                sys.executable,
                "-m",
                "streams.cli",
                "produce",
                "--stats",
                "--wait-for-worker",
                "--agents",
                str(args.agents),
                "--rate",
                str(args.rate),
                "--count",
                str(args.count),
            ]
            demo = subprocess.Popen(command, preexec_fn=die_with_parent)  # noqa: S603, PLW1509 - own module; prctl only
        return run_workers(settings, stopping)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    finally:
        if demo is not None:
            with contextlib.suppress(ProcessLookupError):
                demo.send_signal(signal.SIGINT)
            # A terminal's Ctrl-C reached it with the workers; with the broker gone its producer
            # would wait for minutes on records it cannot deliver.
            try:
                demo.wait(timeout=_DEMO_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
        if history is not None:
            _stop_child(history, settings.stop_timeout)
        if postgres is not None:
            postgres.stop()
        if broker is not None:
            broker.stop()


def _stop_child(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGINT (unless a terminal's Ctrl-C already reached it), then SIGKILL after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cmd_postgres(args: argparse.Namespace) -> int:
    settings = _settings()
    if not settings.embedded_postgres:
        raise SystemExit("blackroad: BLACKROAD_POSTGRES_DSN is set; no embedded PostgreSQL is needed")
    postgres = _start_postgres(settings)
    done = threading.Event()

    def stopped_by(signum: int, _frame: object) -> None:
        Interrupted.note(signum)
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopped_by)
    postgres.on_unexpected_exit(lambda code: done.set())
    done.wait()
    postgres.stop()
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """Copy the changelogs into PostgreSQL until SIGINT/SIGTERM (see streams.history.sink)."""

    from streams.history.sink import HistorySink

    settings = _settings()
    if not settings.history_enabled:
        raise SystemExit("blackroad: BLACKROAD_HISTORY is off; no history is kept")
    _require_broker(settings)
    settings = _reach(settings)
    _configure_logging(settings)
    logging.getLogger("streams.history").setLevel(logging.INFO)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopped_by(signum: int) -> None:
            Interrupted.note(signum)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped_by, sig)
        await HistorySink(settings).run(stop)

    asyncio.run(run())
    return 0


def _start_history() -> subprocess.Popen[bytes]:
    """``up``'s history sink: a process of its own beside the workers."""
    command = [sys.executable, "-m", "streams.cli", "history"]
    return subprocess.Popen(command, preexec_fn=die_with_parent)  # noqa: S603, PLW1509 - own module; prctl only


def cmd_db_migrate(args: argparse.Namespace) -> int:
    """Apply the history schema's pending migrations to BLACKROAD_POSTGRES_DSN (or the embedded server)."""
    import asyncpg

    from streams.history import schema

    settings = _settings()

    async def run() -> list[schema.Migration]:
        conn = await asyncpg.connect(settings.postgres_url, timeout=settings.postgres_command_timeout)
        try:
            return await schema.migrate(conn)
        finally:
            await conn.close()

    try:
        applied = asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as exc:
        raise SystemExit(f"blackroad: cannot migrate the history database at {settings.postgres_url}: {exc}") from None
    for migration in applied:
        print(f"applied migration {migration.version}: {migration.name}")
    print(f"history schema at version {schema.latest_version()}" + ("" if applied else " (nothing to do)"))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Compare the history in PostgreSQL with the tables' changelogs; exit 1 on any difference."""
    import asyncpg

    from streams.history.verify import verify

    settings = _settings()
    if not settings.history_enabled:
        raise SystemExit("blackroad: BLACKROAD_HISTORY is off; there is no history to verify")
    _require_broker(settings)
    settings = _reach(settings)
    try:
        report = asyncio.run(verify(settings, args.wait, progress=print))
    except (OSError, asyncpg.PostgresError) as exc:
        raise SystemExit(f"blackroad: cannot read the history database at {settings.postgres_url}: {exc}") from None
    if report.history_behind:
        print(
            f"the history sink is still {report.history_behind} records behind after {args.wait:g} s:"
            " rows it has not copied yet show as differences"
        )
    shown = report.differences[: args.show]
    for line in shown:
        print(f"  {line}")
    if len(report.differences) > len(shown):
        print(f"  ... and {len(report.differences) - len(shown)} more")
    checked = (
        f"{report.tasks} task rows, {report.agents} agent rows and {report.memory_chains} agents' memory chains"
        f" ({report.memory_entries} entries)"
    )
    if report.differences:
        print(f"{len(report.differences)} difference(s) between PostgreSQL and the tables ({checked} compared)")
        return 1
    print(f"no differences: PostgreSQL holds the tables' {checked}")
    return 0


def _dead_letters(settings: Settings) -> list[Any]:
    from streams.operations.dead_letters import read_dead_letters

    _require_broker(settings)
    return asyncio.run(read_dead_letters(settings, settings.topic("deadletter"), settings.partitions))


def cmd_dlq_list(args: argparse.Namespace) -> int:
    letters = [letter for letter in _dead_letters(_settings()) if args.reason in letter.reason]
    for letter in letters[: args.limit]:
        print(letter.summary())
    print(f"{len(letters)} dead letter(s)" + (f" whose reason contains {args.reason!r}" if args.reason else ""))
    return 0


def cmd_dlq_show(args: argparse.Namespace) -> int:
    found = [letter for letter in _dead_letters(_settings()) if letter.ref == args.letter]
    if not found:
        print(f"blackroad: no dead letter {args.letter} (dlq list shows them)", file=sys.stderr)
        return 1
    print(orjson.dumps(found[0].details(), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from streams.operations.dead_letters import replay_record, send_records

    if not args.letters and args.reason is None:
        print("blackroad: name the letters to replay (PARTITION:OFFSET ...) or --reason TEXT", file=sys.stderr)
        return 2
    settings = _settings()
    letters = _dead_letters(settings)
    chosen = [
        letter
        for letter in letters
        if letter.ref in args.letters or (args.reason is not None and args.reason in letter.reason)
    ]
    unknown = sorted(set(args.letters) - {letter.ref for letter in letters})
    for ref in unknown:
        print(f"{ref}: no such dead letter", file=sys.stderr)
    records = []
    for letter in chosen:
        record = replay_record(letter)
        if isinstance(record, str):
            print(f"{letter.ref}: skipped, {record}")
        else:
            records.append(record)
            print(f"{letter.ref}: sent back")
    if records:
        asyncio.run(send_records(settings, settings.topic("tasks"), records, settings.partitions))
    print(f"{len(records)} of {len(chosen)} chosen dead letter(s) sent back to {settings.topic('tasks')}")
    return 1 if unknown else 0


def cmd_perf(args: argparse.Namespace) -> int:
    from streams.operations import perf

    settings = _settings()
    urls = args.url or [f"http://{settings.web_host}:{settings.web_port + n}" for n in range(settings.process_count)]
    tokens = settings.api_token_list()
    fetch = perf.fetcher(tokens[0] if tokens else None)
    while True:
        try:
            found = perf.measure(urls, args.interval, fetch)
        except OSError as exc:
            print(f"blackroad: the workers at {', '.join(urls)} do not answer: {exc}", file=sys.stderr)
            return 1
        text = perf.render(found, len(urls))
        if not args.watch:
            print(text)
            return 0
        print("\x1b[2J\x1b[H" + text, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackroad",
        description="BlackRoad agent/task streams on Kafka. Settings come from BLACKROAD_* environment "
        "variables (see README, Settings).",
    )
    parser.add_argument("--version", action="version", version=f"blackroad {build_info()['version']}")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults: dict[str, Any] = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    up = commands.add_parser("up", **defaults, help="broker (unless configured) + worker + web views")
    up.add_argument("--demo", action="store_true", help="also run a demo load with a live progress line")
    up.add_argument("--agents", type=int, default=1000, help="agents the demo tasks go to")
    # A gentle default: Tansu's fetches slow down with every batch it stores
    # (README, "Known limits of Tansu"); raise both on Kafka.
    up.add_argument("--rate", type=float, default=50.0, help="demo tasks per second")
    up.add_argument("--count", type=int, default=15_000, help="demo tasks to send (0 = until stopped)")
    up.add_argument(
        "--handlers", default=None, help="handler plug-ins, module:function[,...] (overrides BLACKROAD_HANDLERS)"
    )
    up.set_defaults(run=cmd_up)

    broker = commands.add_parser("broker", **defaults, help="just the embedded broker (BLACKROAD_ENGINE)")
    broker.set_defaults(run=cmd_broker)

    postgres = commands.add_parser("postgres", **defaults, help="just the embedded PostgreSQL of the history")
    postgres.set_defaults(run=cmd_postgres)

    history = commands.add_parser("history", **defaults, help="the sink copying the tables' changelogs into PostgreSQL")
    history.set_defaults(run=cmd_history)

    db = commands.add_parser("db", **defaults, help="the history database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    migrate = db_commands.add_parser("migrate", **defaults, help="apply the schema's pending migrations")
    migrate.set_defaults(run=cmd_db_migrate)

    verify = commands.add_parser("verify", **defaults, help="compare the history in PostgreSQL with the tables")
    verify.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the history sink to catch up first"
    )
    verify.add_argument("--show", type=int, default=20, help="differences to print (all are counted)")
    verify.set_defaults(run=cmd_verify)

    worker = commands.add_parser(
        "worker", **defaults, help="stream-processing workers (BLACKROAD_WORKER_PROCESSES of them)"
    )
    worker.add_argument("--web-port", type=int, default=0, help="overrides BLACKROAD_WEB_PORT")
    worker.add_argument(
        "--processes", type=int, default=None, help="overrides BLACKROAD_WORKER_PROCESSES (0 = one per core)"
    )
    worker.add_argument(
        "--handlers", default=None, help="handler plug-ins, module:function[,...] (overrides BLACKROAD_HANDLERS)"
    )
    worker.set_defaults(run=cmd_worker)

    reader = commands.add_parser(
        "reader", **defaults, help="one read replica: the read views from the changelogs, no task processing"
    )
    reader.add_argument(
        "--web-port", type=int, default=0, help="its web port (default: BLACKROAD_WEB_PORT + the worker processes)"
    )
    reader.add_argument(
        "--upstream", default=None, help="a worker's web URL for memory search (default: BLACKROAD_WEB_HOST:WEB_PORT)"
    )
    reader.set_defaults(run=cmd_reader)

    produce = commands.add_parser("produce", **defaults, help="load generator")
    produce.add_argument("--agents", type=int, default=1000, help="agents the tasks go to")
    produce.add_argument("--rate", type=float, default=500.0, help="tasks per second (0 = unthrottled)")
    produce.add_argument("--count", type=int, default=10_000, help="tasks to send (0 = until stopped)")
    produce.add_argument("--seed", type=int, default=7, help="seed of the random load (the same seed, the same tasks)")
    produce.add_argument("--pack", type=int, default=1, help="tasks per task.batch event (1 = one task per event)")
    produce.add_argument("--stats", action="store_true", help="show the worker's stats in the progress line")
    produce.add_argument("--wait-for-worker", action="store_true", help="start once the worker's web views answer")
    produce.set_defaults(run=cmd_produce)

    dlq = commands.add_parser("dlq", **defaults, help="the dead-letter topic: list, show, replay")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = dlq_commands.add_parser("list", **defaults, help="one line per dead letter, oldest first per partition")
    listing.add_argument("--reason", default="", help="only letters whose reason contains this text")
    listing.add_argument("--limit", type=int, default=100, help="letters to print (all are counted)")
    listing.set_defaults(run=cmd_dlq_list)
    show = dlq_commands.add_parser("show", **defaults, help="one dead letter in full, as JSON")
    show.add_argument("letter", help="PARTITION:OFFSET, as dlq list shows it")
    show.set_defaults(run=cmd_dlq_show)
    replay = dlq_commands.add_parser(
        "replay", **defaults, help="send chosen dead letters back to the tasks topic (once their cause is fixed)"
    )
    replay.add_argument("letters", nargs="*", help="PARTITION:OFFSET of each letter to send")
    replay.add_argument("--reason", default=None, help="all letters whose reason contains this text")
    replay.set_defaults(run=cmd_dlq_replay)

    perf = commands.add_parser(
        "perf", **defaults, help="the performance dashboard: latency, throughput, resources, the seed's targets"
    )
    perf.add_argument(
        "--url", action="append", help="a worker's web URL (repeat for each; default: this machine's workers)"
    )
    perf.add_argument("--interval", type=float, default=2.0, help="seconds between the two scrapes measured")
    perf.add_argument("--watch", action="store_true", help="redraw every interval until stopped")
    perf.set_defaults(run=cmd_perf)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        native.check()
    except native.StaleBuild as exc:
        print(f"blackroad: {exc}", file=sys.stderr)
        return 2
    return Interrupted.exit_code(int(args.run(args)))


if __name__ == "__main__":
    sys.exit(main())
