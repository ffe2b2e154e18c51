"""The Faust app of one worker: topics, tables, the batch processor and web views."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import faust
from aiokafka import AIOKafkaProducer
from faust.tables import TableManager
from faust.web.drivers.aiohttp import Web as AiohttpWeb
from mode import Service
from yarl import URL

from agents.plugins import load_handlers
from agents.registry import HandlerRegistry, default_registry
from schemas import wire
from streams.cold_rows import RowFile
from streams.llm.client import ChatClient
from streams.llm.handler import ModelInference
from streams.memory_search.accesses import AccessRecorder
from streams.memory_search.embedding import CachedEmbedder, ProcessEmbedder, load_embedder
from streams.memory_search.indexer import MemoryIndexer
from streams.memory_search.vector_log import VectorLog, vector_topic
from streams.processing.exactly_once import TransactionalSender
from streams.processing.log_continuity import BrokerLostData, VerifiedProducer
from streams.processing.metrics import Metrics
from streams.processing.processor import EXPIRY_CHUNK, BatchProcessor
from streams.processing.retry_relay import RetryRelay, run_until_cancelled
from streams.processing.state import stats_key
from streams.processing.tables import (
    ROWS_IN_FILES,
    THAWED_PER_PACKED,
    CachedTable,
    DirectSender,
    Tables,
    TableWriter,
    define_tables,
    row_offset,
)
from streams.processing.transport import BatchConsumer, BatchTransport
from streams.runtime import kafka_clients
from streams.runtime.membership import client_id
from streams.runtime.settings import Settings
from streams.runtime.stopping import EXIT_BROKER_LOST_DATA, WorkerStop
from streams.serve.consistency import Token
from streams.serve.http_errors import EnvelopeRunner, router_errors_in_envelope
from streams.serve.ingress import IngressProducer
from streams.serve.peer_secret import shared_peer_secret
from streams.serve.peers import PartitionOwners, PeerClient
from streams.serve.stats_view import StatsView
from streams.serve.view_source import HistoryPool, Progress, TableRows
from streams.serve.web_auth import ApiGuard, guard_for
from streams.tracing.spans import TaskTracer, tracer_for

log = logging.getLogger(__name__)


class BlackroadWeb(AiohttpWeb):
    """Faust's aiohttp web server, serving only the project's views (README, "Web views").

    Faust mounts pages of its own: ``/table/...`` served the raw rows of some tables and
    a bare 500 (and a traceback in the log) for others; ``/router/...``, ``/`` and the
    debug pages show the cluster's insides. None of them is mounted. Unknown paths answer
    404 in the error envelope (:func:`streams.serve.http_errors.router_errors_in_envelope`), and so
    do requests the HTTP parser refuses (:class:`streams.serve.http_errors.EnvelopeRunner`).
    """

    default_blueprints = ()
    production_blueprints = ()
    debug_blueprints = ()
    optional_blueprints = ()

    def __init__(self, app: faust.App, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.web_app.middlewares.append(router_errors_in_envelope)
        self._runner = EnvelopeRunner(self.web_app, access_log=None)


class DeclaredTableManager(TableManager):
    """Faust's table manager, for tables that are all declared before the app starts.

    Faust's waits a second before it starts the tables, in case more are declared
    meanwhile; every worker start paid that second. Here the tables are declared by
    :func:`create_app` (and the manager refuses any declared after it started).
    """

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class BlackroadApp(faust.App):
    """A Faust app whose consumer hands whole fetches to :class:`BatchProcessor`."""

    settings: Settings
    pipeline: Pipeline
    #: How this worker process stops (bounded), and with which exit code.
    stopping: WorkerStop
    #: Topics whose records go to the batch processor (the rest take Faust's path).
    batch_topics: frozenset[str] = frozenset()
    #: What the web views read through (the pipeline: see streams.serve.view_source).
    view_source: Pipeline
    #: The files of the tables whose frozen rows are kept out of the heap (streams.cold_rows).
    row_files: dict[str, RowFile]

    def _new_transport(self) -> Any:
        return BatchTransport(self.conf.broker_consumer, self)

    def _new_web(self) -> Any:
        return BlackroadWeb(self)

    #: Rebalances (revocations and assignments) so far: a fetch from before the last one is stale.
    rebalances: int = 0

    async def batch_sink(self, batch: dict[Any, list[Any]], fetched_in: int) -> None:
        await self.pipeline.process(batch, fetched_in)

    def rows_restored(self, tp: Any) -> None:
        """Changelog records of ``tp`` were applied to its table's rows (table recovery)."""
        self.pipeline.rows_restored(tp)

    async def _on_partitions_revoked(self, revoked: Any) -> None:
        # Let the batch in flight finish and reach the broker before Faust commits
        # and hands partitions away.
        async with self.pipeline.lock:
            self.rebalances += 1
            await self.pipeline.drain()
            await self.pipeline.release(revoked)
            await super()._on_partitions_revoked(revoked)

    @contextlib.asynccontextmanager
    async def processing_stopped(self) -> AsyncIterator[None]:
        """No batch runs inside, and every one before is committed."""
        async with self.pipeline.lock:
            await self.pipeline.drain()
            yield

    async def _on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        self.rebalances += 1
        # Before any await: the consumer already fetches the new partitions from the
        # offsets committed at the join, and none of their records may be processed before
        # their tables are restored and they are sought to the offsets committed last
        # (Faust pauses them a few awaits later, and resumes them before it seeks).
        consumer: BatchConsumer = self.consumer  # type: ignore[assignment]
        consumer.pause_partitions(assigned)
        consumer.hold_until_sought(assigned)
        # Under exactly-once, fence the partitions' previous owners before Faust restores
        # their tables and reads their committed offsets (streams.processing.exactly_once).
        try:
            await self.pipeline.claim(assigned)
        except Exception as exc:  # noqa: BLE001 - as Faust treats its own rebalance failures
            await self.crash(exc)
            return
        await super()._on_partitions_assigned(assigned, generation_id)


class Pipeline(Service):
    """Owns what processing needs besides Faust: the changelog and ingress producers, the stats view.

    It is also what the web views read through (a :class:`streams.serve.view_source.ViewSource`).
    """

    #: A worker's web views forward nothing to a worker of their own choosing (see ``owner_url``).
    upstream: URL | None = None

    def __init__(
        self, app: BlackroadApp, tables: Tables, registry: HandlerRegistry, metrics: Metrics, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.settings = app.settings
        self.tables = tables
        self.registry = registry
        self.metrics = metrics
        #: The changelog producer under at-least-once.
        self.producer: AIOKafkaProducer | None = None
        #: The transactional producers, one per owned input partition, under exactly-once.
        self.transactions = TransactionalSender(self.settings) if self.settings.exactly_once else None
        #: Puts HTTP requests' tasks on the broker (set once started).
        self.ingress: IngressProducer | None = None
        self.processor: BatchProcessor | None = None
        #: Lets web requests in (API tokens, the peer secret); set once started.
        self.guard: ApiGuard | None = None
        #: Forwards web lookups to the workers that own them.
        self.peers = PeerClient()
        self.stats_view = StatsView(self.settings, tables.stats.changelog_topic.get_topic_name())
        self.rows = TableRows(
            agents=tables.agents.data.data,
            tasks=tables.tasks.data.data,
            memory=tables.memory.data.data,
            memory_entries=tables.memory_entries.data.data,
        )
        #: Per owned input partition, the offset its finished batches have been applied up to
        #: (a batch in flight is not counted until it ends); read-your-writes waits on it.
        self.applied: dict[int, int] = {}
        self._applied_progress = Progress()
        self._owners: PartitionOwners | None = None
        #: Held while a batch is in flight; a rebalance waits for it.
        self.lock = asyncio.Lock()
        #: Set once a check found that the broker lost data this worker had (then it stops).
        self.lost_data: BrokerLostData | None = None
        self._started_event = asyncio.Event()
        self._history = HistoryPool(self.settings)
        #: Keeps the memory search index (set once started; None with memory search off).
        self.indexer: MemoryIndexer | None = None
        #: Sends the memory entries' vectors to the broker (with memory search on; stopped at stop).
        self.vector_log: VectorLog | None = None
        #: Sends ``memory.accessed`` events for the entries HTTP searches return (with memory search on).
        self.accesses: AccessRecorder | None = None
        #: The model server's client when ``inference`` runs on one (closed at stop).
        self.llm_client: ChatClient | None = None
        #: Exports traced tasks' spans when a trace collector is set (shut down at stop).
        self.tracer: TaskTracer | None = None
        self.rows_of_stats: dict[str, Any] = tables.stats.data.data
        self._memory_changelogs = {
            tables.memory.changelog_topic.get_topic_name(),
            tables.memory_entries.changelog_topic.get_topic_name(),
        }

    async def on_start(self) -> None:
        settings = self.settings
        self.guard = guard_for(settings, await shared_peer_secret(settings))
        consumer: BatchConsumer = self.app.consumer  # type: ignore[assignment]
        sender: DirectSender | TransactionalSender
        if self.transactions is not None:
            sender = self.transactions
            on_processed: Callable[[dict[Any, int]], None] = _committed_with_the_flush
        else:
            self.producer = kafka_clients.producer(
                self.settings,
                acks="all",
                linger_ms=0,
                max_batch_size=1024 * 1024,
                max_request_size=4 * 1024 * 1024,
                client_id=f"{self.settings.app_id}-tables",
            )
            await self.producer.start()
            # Records from entries that left working memory go last (streams.processing.agent_runner),
            # and so does the stats row: a reader that sees it knows the rest of its flush is on
            # the broker (read-your-writes, streams.replica.follower).
            entries_changelog = self.tables.memory_entries.changelog_topic.get_topic_name()
            stats_changelog = self.tables.stats.changelog_topic.get_topic_name()
            last = frozenset({self.settings.topic("memory-archive"), entries_changelog, stats_changelog})
            sender = DirectSender(VerifiedProducer(self.producer), last=last)
            on_processed = consumer.mark_processed
        row_files = self.app.row_files
        # Working memory rows stay thawed up to the cache's estimated size (tables.THAWED_PER_PACKED).
        hot_memory = int(self.settings.working_memory_cache_mb * 1e6 / THAWED_PER_PACKED)
        cached = {
            name: CachedTable(name, table, row_files.get(name), hot_memory if name == "memory" else 0)
            for name, table in self.tables.all().items()
        }
        partitions = self.settings.partitions
        self.processor = BatchProcessor(
            self.settings,
            TableWriter(sender, cached),
            self.registry,
            self.metrics,
            partition_for=wire.Partitioner(partitions),
            on_processed=on_processed,
            highwater=consumer.highwater,
            lock=self.lock,
            rebalances=lambda: self.app.rebalances,
        )
        self.tracer = tracer_for(settings, f"{settings.app_id}@{settings.web_host}:{settings.web_port}")
        if self.tracer is not None:
            self.processor.trace_with(self.tracer)
        if self.settings.memory_search_enabled:
            model = await asyncio.get_running_loop().run_in_executor(
                None, ProcessEmbedder, self.settings.embedding_model
            )
            embedder = CachedEmbedder(model, self.settings.embedding_cache_size, half=True)
            queries = CachedEmbedder(load_embedder(self.settings.embedding_model, compact=True), 1000)
            vector_log = VectorLog(
                self.settings,
                vector_topic(self.settings.topic_prefix, embedder.name),
                embedder.dimensions,
                self.settings.app_id,
            )
            vectors = self.app.topic(vector_log.topic, partitions=partitions, value_serializer="raw", compacting=True)
            await vectors.maybe_declare()
            await vector_log.start()
            self.vector_log = vector_log
            self.indexer = MemoryIndexer(embedder, cached["memory"], cached["memory_entries"], queries, vector_log)
            self.processor.indexer = self.indexer
            self.processor.runner.searcher = self.indexer.search_agent
        processor = self.processor
        self.stats_view.in_progress = lambda: processor.in_flight
        self.stats_view.on_history_lag = self.metrics.history_lag.set
        # The changelogs first, compacted: the stats view reads one before Faust's table
        # manager would declare it, and a broker that creates topics on first use would
        # create it without compaction.
        for table in self.tables.all().values():
            await table.changelog_topic.maybe_declare()
        for name in ("tasks", "events", "deadletter", "memory-archive", "retries"):
            topic = self.app.topic(self.settings.topic(name), partitions=partitions, value_serializer="raw")
            await topic.maybe_declare()
        ingress = IngressProducer(self.settings, self.tracer)
        await ingress.start()
        self.ingress = ingress
        if self.indexer is not None:
            self.accesses = AccessRecorder(ingress)
            self.accesses.start()
        await self.add_runtime_dependency(self.stats_view)
        self._started_event.set()

    @Service.task
    async def _acknowledge(self) -> None:
        await self.wait_for_started()
        assert self.processor is not None
        try:
            await self.processor.acknowledge()
        except BrokerLostData as exc:
            self._stop_for_lost_data(exc)

    @Service.task
    async def _relay_retries(self) -> None:
        """Failed tasks back on the tasks topic once their backoff is over (streams.processing.retry_relay)."""
        await self.wait_for_started()
        await run_until_cancelled(RetryRelay(self.settings))

    @Service.task
    async def _flush_on_time(self) -> None:
        await self.wait_for_started()
        assert self.processor is not None
        while not self.should_stop and self.lost_data is None:
            await self.sleep(self.settings.flush_interval / 2)
            if self.lost_data is None:
                await self.processor.flush_if_due()

    @Service.task
    async def _index_owned_partitions(self) -> None:
        """Index the memory of partitions this worker got, forget those it lost."""
        await self.wait_for_started()
        while not self.should_stop and self.indexer is not None and self.lost_data is None:
            await self.sleep(0.2)
            self.indexer.apply_done()
            if not self.tables_ready():
                continue
            owned = self.owned_partitions()
            self.indexer.drop((self.indexer.built | self.indexer.building) - owned)
            if self.indexer.missing(owned):
                # Between batches: the rows are read as they are at one moment.
                async with self.lock:
                    if self.tables_ready():
                        owned = self.owned_partitions()
                        self.indexer.start_build(self.indexer.missing(owned))

    def tables_ready(self) -> bool:
        """True once table recovery has completed and none is running (e.g. after a rebalance)."""
        recovery: Any = self.app.tables.recovery  # type: ignore[attr-defined]
        return bool(recovery.completed.is_set() and not self.app.in_recovery)

    def owned_partitions(self) -> set[int]:
        """The tasks topic's partitions assigned to this worker."""
        return self._task_partitions(self.app.consumer.assignment())

    def memory_search_ready(self) -> bool:
        """Whether every owned partition's memory is in the search index."""
        return self.indexer is not None and self.tables_ready() and self.indexer.ready(self.owned_partitions())

    def rows_restored(self, tp: Any) -> None:
        if self.indexer is not None and tp.topic in self._memory_changelogs:
            self.indexer.drop({tp.partition})

    @Service.task
    async def _expire_finished_tasks(self) -> None:
        await self.wait_for_started()
        assert self.processor is not None
        period = min(60.0, max(0.5, self.settings.task_retention / 10))
        while not self.should_stop:
            await self.sleep(period)
            if self.lost_data is not None:
                return
            cutoff = wire.now_ms() - int(self.settings.task_retention * 1000)
            try:
                while await self.processor.expire_tasks(cutoff) >= EXPIRY_CHUNK:
                    await self.sleep(0)
            except BrokerLostData as exc:
                self._stop_for_lost_data(exc)
                return

    async def drain(self) -> None:
        if self.processor is not None and self.lost_data is None:
            await self.processor.drain()

    def _task_partitions(self, tps: Any) -> set[int]:
        topic = self.settings.topic("tasks")
        return {tp.partition for tp in tps if tp.topic == topic}

    async def claim(self, assigned: Any) -> None:
        """Under exactly-once, start the transactional producers of newly assigned input partitions."""
        if self.transactions is not None:
            await self.transactions.claim(self._task_partitions(assigned))

    async def release(self, revoked: Any) -> None:
        """Under exactly-once, let go of the producers of revoked input partitions (once drained)."""
        for partition in self._task_partitions(revoked):
            self.applied.pop(partition, None)
        if self.transactions is not None:
            await self.transactions.release(self._task_partitions(revoked))

    async def history_pool(self) -> asyncpg.Pool:
        return await self._history.get()

    def owner_url(self, partition: int) -> URL | None:
        if self._owners is None:
            topic = self.tables.agents.changelog_topic.get_topic_name()
            self._owners = PartitionOwners(self.app.assignor, topic, URL(self.settings.web_url))
        return self._owners.url(partition)

    def peer_urls(self) -> list[URL]:
        own = URL(self.settings.web_url)
        urls = {URL(str(u)) for u in self.app.assignor.tables_metadata()}
        return sorted((u for u in urls if (u.host, u.port) != (own.host, own.port)), key=str)

    def stats_snapshot(self, refresh: bool = False) -> dict[str, Any]:
        if refresh:
            self.stats_view.refresh()
        return self.stats_view.snapshot

    def staleness(self) -> dict[str, Any]:
        # The views read the stores processing writes, ahead of the changelogs.
        return {"process": "worker", "url": self.settings.web_url, "staleness_ms": 0, "lag_records": 0}

    def staleness_ms(self) -> int:
        return 0

    def _stats_offset(self, partition: int) -> int:
        """The offset the partition's stats row in this worker's store has been applied up to."""
        row = self.rows_of_stats.get(stats_key(partition))
        return -1 if row is None else row_offset(row)

    async def wait_applied(self, token: Token, view: str, timeout: float) -> bool:
        """Stats come from the stats changelog (:class:`StatsView`); the other views from the stores,
        for the partitions this worker owns (a lookup for another's is forwarded with the token)."""
        if view == "stats":
            return await self.stats_view.progress.wait_until(lambda: self.stats_view.reached(token), timeout)

        def reached() -> bool:
            owned = self.owned_partitions()
            applied = self.applied
            return all(
                applied.get(partition, self._stats_offset(partition)) >= offset
                for partition, offset in token.items()
                if partition in owned
            )

        return await self._applied_progress.wait_until(reached, timeout)

    async def on_stop(self) -> None:
        self.peers.close()
        if self.llm_client is not None:
            await self.llm_client.close()
        if self.indexer is not None:
            self.indexer.close()
        if self.vector_log is not None:
            await self.vector_log.stop()
        await self._history.close()
        # Half the stop budget: the rest of Faust's stop must fit in it too (see streams.runtime.stopping).
        budget = self.settings.stop_timeout / 2
        try:
            await asyncio.wait_for(self._send_last_records(), budget)
        except BrokerLostData as exc:
            self._stop_for_lost_data(exc)
        except TimeoutError:
            log.warning(
                "the broker did not take this worker's last records within %gs: left unacknowledged "
                "(their input offsets are not committed, so it is processed again at the next start)",
                budget,
            )
        if self.tracer is not None:
            await self.tracer.shutdown()

    async def _send_last_records(self) -> None:
        """Flush the rows changed since the last flush and wait until the broker has every record."""
        # After a broker lost its data, rows of the old log must not reach the new one: a worker
        # started afresh would restore them and skip new records as already counted.
        if self.processor is not None and self.lost_data is None:
            async with self.lock:
                await self.processor.flush_changed_rows()
        if self.accesses is not None:
            await self.accesses.stop()
        if self.ingress is not None:
            await self.ingress.stop()
        if self.producer is not None:
            await self.producer.stop()
        if self.transactions is not None:
            await self.transactions.stop()

    async def process(self, batch: dict[Any, list[Any]], fetched_in: int) -> None:
        await self.wait_for_started()
        assert self.processor is not None
        partitions = [tp.partition for tp in batch]
        for partition in partitions:
            # Before the batch changes the stats row: the offset applied so far.
            self.applied.setdefault(partition, self._stats_offset(partition))
        try:
            await self.processor(batch, fetched_in)
            for partition in partitions:
                self.applied[partition] = self._stats_offset(partition)
            self._applied_progress.notify()
        except BrokerLostData as exc:
            self._stop_for_lost_data(exc)
            # No further batch: the worker is stopping (this wait ends when the fetcher is stopped).
            await self.wait_until_stopped()

    def _stop_for_lost_data(self, exc: BrokerLostData) -> None:
        """Say what happened in one line and stop the worker (once, whichever check noticed first)."""
        if self.lost_data is not None:
            return
        self.lost_data = exc
        log.critical("%s", exc)
        self.app.stopping.request(EXIT_BROKER_LOST_DATA)

    async def wait_for_started(self) -> None:
        await self._started_event.wait()


def _committed_with_the_flush(offsets: dict[Any, int]) -> None:
    """Under exactly-once the input offsets are committed in the flush's transaction."""


def worker_state_dir(settings: Settings) -> Path:
    """This worker process's state directory: one per web port."""
    return settings.data_dir / "faust" / f"{settings.web_host}-{settings.web_port}"


def create_app(
    settings: Settings, registry: HandlerRegistry | None = None, stopping: WorkerStop | None = None
) -> BlackroadApp:
    """Build (but do not start) the worker app for ``settings``; ``stopping`` is the process's, if it has one."""
    settings.validate()
    if not settings.replication_resolved:
        raise ValueError("settings not resolved for the cluster: see streams.engines.choice.engine_in_use")
    datadir = worker_state_dir(settings)
    datadir.mkdir(parents=True, exist_ok=True)
    app = BlackroadApp(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        # KAFKA_SECURITY_PROTOCOL and its SASL/SSL settings, as every other client of the project has them.
        broker_credentials=kafka_clients.faust_credentials(settings),
        store="memory://",
        autodiscover=False,
        topic_partitions=settings.partitions,
        # Every topic declared gets these copies and min.insync.replicas (BatchTransport._create_topic).
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        # Members are named after it, so a restarted process finds its predecessor's (streams.runtime.membership).
        broker_client_id=client_id(settings),
        broker_session_timeout=settings.group_session_timeout,
        broker_heartbeat_interval=settings.heartbeat_interval,
        broker_request_timeout=20.0,
        broker_commit_interval=settings.commit_interval,
        broker_max_poll_records=settings.batch_max_records,
        web_enabled=True,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        canonical_url=settings.web_url,
        datadir=str(datadir),
        table_cleanup_interval=3600.0,
        # No standby copies: a worker's stores then hold only the partitions it owns,
        # which the agent list and task lookups rely on; recovery is bulk and quick.
        table_standby_replicas=0,
        TableManager=DeclaredTableManager,
        producer_linger=0.0,
        stream_wait_empty=False,
        stream_processing_timeout=settings.stall_timeout,
    )
    app.settings = settings
    app.stopping = stopping or WorkerStop(settings.stop_timeout)
    app.batch_topics = frozenset({settings.topic("tasks")})
    app.row_files = {name: RowFile(datadir / "cold-rows") for name in ROWS_IN_FILES}
    tables = define_tables(app, settings.partitions)
    metrics = Metrics()
    registry = registry or default_registry(settings.inference_p50_ms, settings.inference_p99_ms)
    # The consumer subscribes to the tasks topic; records reach the processor in batches.
    app.topics.add(
        app.topic(settings.topic("tasks"), partitions=settings.partitions, key_serializer="raw", value_serializer="raw")
    )
    app.pipeline = app.view_source = Pipeline(app, tables, registry, metrics, loop=None)
    if settings.llm_url is not None:
        client = ChatClient(
            settings.llm_api,
            settings.llm_url,
            settings.llm_model,
            timeout=settings.llm_timeout,
            retries=settings.llm_retries,
            api_key=settings.llm_api_key,
        )
        registry.register("inference", ModelInference(client, settings.llm_context_tokens, settings.llm_memories))
        app.pipeline.llm_client = client
    loaded = load_handlers(registry, settings.handler_specs)
    if loaded:
        log.info("handler plug-ins loaded: %s", ", ".join(loaded))
    app.add_dependency(app.pipeline)
    from streams.serve.dashboard.view import register_dashboard
    from streams.serve.web import register_views

    register_views(app, app.pipeline)
    register_dashboard(app)
    return app
