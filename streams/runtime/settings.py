"""One validated settings object, read from ``BLACKROAD_*`` environment variables.

Every value is checked once at start-up; a bad one raises :class:`SettingsError`
naming the variable, so a worker never starts half-configured.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "BLACKROAD_"
#: Values of BLACKROAD_ENGINE (see streams.engines).
ENGINES = ("auto", "kafka", "tansu")
#: Values of BLACKROAD_PROCESSING_GUARANTEE (see streams.processing.exactly_once).
GUARANTEES = ("auto", "exactly_once", "at_least_once")
#: Most copies a topic may be asked for (Kafka's own limit is far above any cluster's size).
MAX_REPLICAS = 1000
#: Most tasks one ``POST /v1/batch`` carries (a client's task bucket must hold that many).
MAX_BATCH_TASKS = 1000
#: Values of BLACKROAD_KAFKA_SECURITY_PROTOCOL and BLACKROAD_KAFKA_SASL_MECHANISM.
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: The shortest API token or peer secret accepted.
MIN_TOKEN_CHARS = 16
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


class SettingsError(ValueError):
    """A setting has a value the project cannot run with."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{PREFIX}{name}: {message}")
        self.setting = PREFIX + name


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a broker, worker, producer or web view needs to know."""

    #: Bootstrap servers of a real Kafka cluster ("host:port[,host:port]").
    #: Unset means: start (or find) the embedded broker.
    kafka_bootstrap: str | None = None
    #: Port the embedded broker listens on (127.0.0.1 only).
    embedded_broker_port: int = 19092
    #: How every Kafka client of the project (workers, ingress, ``produce``, ``dlq``, the history
    #: sink) talks to ``KAFKA_BOOTSTRAP``: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or
    #: ``SASL_SSL`` (see docs/kafka-security.md). Anything but ``PLAINTEXT`` needs
    #: ``KAFKA_BOOTSTRAP``: the embedded broker listens on 127.0.0.1 in plain text only.
    kafka_security_protocol: str = "PLAINTEXT"
    #: With a SASL protocol: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``, and the user's
    #: name and password (or a file whose first line is the password, ``KAFKA_SASL_PASSWORD_FILE``).
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    kafka_sasl_password_file: str | None = None
    #: With an SSL protocol: the CA certificates (PEM) the broker's certificate is checked
    #: against (unset: the system's), and this client's certificate and key (PEM) when the
    #: broker asks for one.
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    #: The broker engine: ``kafka`` (Apache Kafka, durable), ``tansu`` (in memory only) or
    #: ``auto`` (Kafka where it can start). ``up``/``broker`` start it; a worker learns
    #: which one it reached (streams.engines.engine_in_use), after which this names it.
    engine: str = "auto"
    #: ``exactly_once``: each flush is one Kafka transaction per input partition (rows,
    #: lifecycle events, dead letters and the input offsets), and a worker that lost a
    #: partition is fenced. ``at_least_once``: a replay after a crash may emit lifecycle
    #: events and dead letters again (rows stay exact). ``auto``: exactly-once unless the
    #: broker is Tansu, which has no transactions.
    processing_guarantee: str = "auto"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    partitions: int = 4
    #: Worker processes on this machine (each its own web port from WEB_PORT on);
    #: 0 means one per CPU core, at most one per partition.
    worker_processes: int = 1
    #: Read replicas on this machine (``blackroad up`` / ``worker`` run them beside the workers):
    #: processes that follow the tables' changelogs and serve the read views without processing
    #: tasks (:mod:`streams.replica`). Reader *j* serves on ``WEB_PORT + process_count + j``.
    readers: int = 0
    #: Seconds a read carrying a consistency token may wait for the serving process to have
    #: applied the write it names before it answers 503 (docs/read-replicas.md).
    consistency_wait: float = 2.0
    data_dir: Path = Path("data")
    app_id: str = "blackroad"
    topic_prefix: str = "blackroad"
    #: Tasks of one agent that may be in a handler at the same time.
    max_concurrent_tasks: int = 5
    #: Handler attempts before a task is dead-lettered.
    max_attempts: int = 3
    #: Seconds a failed task waits before its next attempt, doubled per attempt made:
    #: ``min(2**attempts * RETRY_BACKOFF, RETRY_BACKOFF_MAX)`` (DOMAIN.md: 20 s, 40 s, ...).
    retry_backoff: float = 10.0
    #: The longest wait between two attempts of a task, in seconds.
    retry_backoff_max: float = 3600.0
    #: Most records taken from the consumer into one processing batch.
    batch_max_records: int = 2000
    #: How long the broker may hold an empty fetch. Unset: per engine (fetch_wait_ms).
    fetch_max_wait_ms: int | None = None
    #: Seconds without a heartbeat after which the group gives a worker's partitions to
    #: the others (a worker killed for good is noticed this late). Unset: 3 s with the
    #: embedded broker (its Kafka is configured to allow it; Tansu sets no least), else
    #: 6 s, the least a Kafka broker accepts by default (``group.min.session.timeout.ms``).
    session_timeout: float | None = None
    #: Seconds between offset commits.
    commit_interval: float = 1.0
    #: Seconds between changelog flushes while the worker keeps up with its input: a row
    #: changed many times in between is written once.
    flush_interval: float = 0.2
    #: Seconds between flushes while the worker has a backlog: fewer, larger flushes.
    backlog_flush_interval: float = 1.0
    #: Seconds a partition may have records waiting with none processed before the
    #: worker logs it as stalled (Faust's liveness check).
    stall_timeout: float = 300.0
    #: Seconds between two returns of the C heap's free pages to the system (0: never;
    #: :mod:`streams.runtime.heap_trim`).
    heap_trim_interval: float = 30.0
    #: Seconds a finished task stays in the live tasks table (and GET /v1/tasks/{id}).
    task_retention: float = 600.0
    #: Copies of every topic the project creates (tasks, events, dead letters, changelogs).
    #: 0 (unset): learned from the cluster at worker start, see :meth:`for_cluster`.
    replication_factor: int = 0
    #: ``min.insync.replicas`` of every topic the project creates: copies that must have a
    #: record before an ``acks=all`` write is acknowledged. 0 (unset): see :meth:`for_cluster`.
    min_insync_replicas: int = 0
    #: Seconds POST /v1/tasks and /v1/batch wait for the broker to acknowledge a request
    #: before answering 503: a hung or dead broker must not hold clients.
    ingress_timeout: float = 1.5
    #: Seconds a worker may take to stop once asked (SIGINT/SIGTERM, or a fatal error)
    #: before it exits without waiting for the broker any longer.
    stop_timeout: float = 4.0
    #: Token budget of an agent's working memory (about 4 characters per token).
    working_memory_tokens: int = 2048
    #: Megabytes of working-memory rows a worker process keeps decoded between batches (the
    #: agents that wrote memory most recently): the others are decoded again when next written.
    working_memory_cache_mb: float = 32.0
    #: Consolidation, episodic -> semantic: once an agent holds more than this many episodic
    #: entries, those older than ``MEMORY_SEMANTIC_AFTER`` seconds become semantic.
    memory_episodic_limit: int = 1000
    memory_semantic_after: float = 7 * 86400.0
    #: ``on``: memory entries are embedded as they are written and searchable through
    #: ``POST /v1/memory/search`` (:mod:`streams.memory_search`); ``off``: neither.
    memory_search: str = "on"
    #: The sentence-embedding model: ``wordllama`` (built in) or ``minilm`` (the minilm extra).
    embedding_model: str = "wordllama"
    #: Vectors the embedding cache keeps (by content hash), per worker process.
    embedding_cache_size: int = 20_000
    #: A model server for ``inference`` tasks ("http://host:port"); unset: the simulated handler.
    llm_url: str | None = None
    #: An OpenTelemetry collector's OTLP/HTTP endpoint ("http://host:4318"): each traced task's
    #: spans go there (docs/tracing.md); unset: no spans, though trace ids still travel with tasks.
    otlp_endpoint: str | None = None
    #: Its API: ``ollama`` (``/api/chat``) or ``openai`` (``/v1/chat/completions``).
    llm_api: str = "ollama"
    llm_model: str = "llama3.2"
    #: Sent as a bearer token (OpenAI-compatible servers that want one).
    llm_api_key: str | None = None
    #: Seconds one request may take; retries of a failed one; the context's token budget;
    #: memories a search of the agent's memory adds to it.
    llm_timeout: float = 60.0
    llm_retries: int = 2
    llm_context_tokens: int = 4096
    llm_memories: int = 5
    #: Median and 99th percentile of the simulated inference handler, in milliseconds.
    inference_p50_ms: float = 20.0
    inference_p99_ms: float = 80.0
    #: ``on``: every worker copies the tasks and agents changelogs into PostgreSQL
    #: (:mod:`streams.history`); ``off``: no history is kept.
    history: str = "on"
    #: A PostgreSQL server for the history ("postgresql://user@host:port/db"). Unset means:
    #: the embedded one ``up`` starts (data in ``<DATA_DIR>/postgres``).
    postgres_dsn: str | None = None
    #: Port the embedded PostgreSQL listens on (127.0.0.1 only).
    embedded_postgres_port: int = 15432
    #: Connections each worker keeps open to PostgreSQL.
    postgres_pool_min_size: int = 1
    postgres_pool_max_size: int = 4
    #: Seconds a PostgreSQL statement (or a connection attempt) may take before it fails.
    postgres_command_timeout: float = 10.0
    #: Most changelog records the history sink writes in one transaction.
    history_batch_rows: int = 20_000
    #: Seconds between the history sink's writes of agent snapshots (0: with every batch).
    history_agent_interval: float = 5.0
    #: API tokens clients send as ``Authorization: Bearer <token>`` (comma-separated; more,
    #: one per line, in ``API_TOKENS_FILE``). With any set, the write views need one; unset,
    #: the views are open to whoever reaches ``WEB_HOST`` (127.0.0.1 by default).
    api_tokens: str | None = None
    api_tokens_file: str | None = None
    #: Who may use the read views (the GETs and memory search): ``open`` or ``token``.
    api_reads: str = "open"
    #: What workers send each other with forwarded requests (``X-Blackroad-Forwarded``), the
    #: same on every worker. Unset: made by the first worker and kept on the broker.
    peer_secret: str | None = None
    #: Per-client limits of each worker's web views (see :mod:`streams.serve.rate_limit`): requests
    #: a second (every view) and tasks a second (``POST /v1/tasks`` and ``/v1/batch``); 0 turns
    #: one off. A client may use up ``RATE_LIMIT_BURST`` seconds' worth at once.
    rate_limit_requests: float = 2000.0
    rate_limit_tasks: float = 1000.0
    rate_limit_burst: float = 2.0
    #: Handler plug-ins to load after the installed ones (``module:function``, comma-separated;
    #: see :mod:`agents.plugins`).
    handlers: str | None = None
    log_level: str = "warning"
    #: ``text`` (one line per record, for people) or ``json`` (one JSON object per line).
    log_format: str = "text"

    @property
    def handler_specs(self) -> list[str]:
        """The ``module:function`` specs of ``HANDLERS``."""
        return [spec.strip() for spec in (self.handlers or "").split(",") if spec.strip()]

    def api_token_list(self) -> list[str]:
        """The API tokens, from ``API_TOKENS`` and the file ``API_TOKENS_FILE`` (blank lines and
        ``#`` comments skipped); each at least 16 characters of no white space."""
        tokens = [("API_TOKENS", token.strip()) for token in (self.api_tokens or "").split(",") if token.strip()]
        if self.api_tokens_file is not None:
            try:
                lines = Path(self.api_tokens_file).read_text().splitlines()
            except OSError as exc:
                raise SettingsError("API_TOKENS_FILE", f"cannot be read: {exc.strerror or exc}") from None
            tokens += [("API_TOKENS_FILE", line.strip()) for line in lines if line.strip() and not line.startswith("#")]
        for name, token in tokens:
            if len(token) < MIN_TOKEN_CHARS or any(character.isspace() for character in token):
                raise SettingsError(name, f"each token needs at least {MIN_TOKEN_CHARS} characters and no white space")
        return [token for _, token in tokens]

    @property
    def kafka_sasl(self) -> bool:
        """True when clients authenticate with SASL."""
        return self.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def kafka_ssl(self) -> bool:
        """True when clients talk TLS to the broker."""
        return self.kafka_security_protocol in ("SSL", "SASL_SSL")

    def kafka_password(self) -> str | None:
        """The SASL password, from ``KAFKA_SASL_PASSWORD`` or the first line of ``_FILE``."""
        if self.kafka_sasl_password_file is None:
            return self.kafka_sasl_password
        try:
            lines = Path(self.kafka_sasl_password_file).read_text().splitlines()
        except OSError as exc:
            raise SettingsError("KAFKA_SASL_PASSWORD_FILE", f"cannot be read: {exc.strerror or exc}") from None
        return lines[0].strip() if lines else ""

    @property
    def embedded(self) -> bool:
        """True when the project runs its own broker (none is configured)."""
        return self.kafka_bootstrap is None

    @property
    def memory_search_enabled(self) -> bool:
        return self.memory_search == "on"

    @property
    def on_tansu(self) -> bool:
        """True when the broker in use is Tansu, whose defects the project corrects for."""
        return self.engine == "tansu"

    @property
    def exactly_once(self) -> bool:
        """True when flushes are transactions (see :mod:`streams.processing.exactly_once`)."""
        if self.processing_guarantee == "auto":
            return not self.on_tansu
        return self.processing_guarantee == "exactly_once"

    @property
    def group_session_timeout(self) -> float:
        """The consumer group session timeout in seconds: as set, else what suits the broker."""
        if self.session_timeout is not None:
            return self.session_timeout
        return 3.0 if self.embedded else 6.0

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: a third of the session timeout, at most 1 s."""
        return min(1.0, self.group_session_timeout / 3)

    @property
    def fetch_wait_ms(self) -> int:
        """How long the broker may hold an empty fetch: as set, else what suits the engine.

        Tansu holds an empty fetch for half this time even when records arrive meanwhile,
        so there it must be short. Kafka answers a held fetch as soon as records arrive:
        a longer wait costs no latency and spares both sides a fetch every 10 ms.
        """
        if self.fetch_max_wait_ms is not None:
            return self.fetch_max_wait_ms
        return 10 if self.on_tansu else 100

    @property
    def bootstrap(self) -> str:
        """The bootstrap address clients connect to."""
        if self.kafka_bootstrap is not None:
            return self.kafka_bootstrap
        return f"127.0.0.1:{self.embedded_broker_port}"

    @property
    def history_enabled(self) -> bool:
        return self.history == "on"

    @property
    def embedded_postgres(self) -> bool:
        """True when the history goes to the project's own PostgreSQL (none is configured)."""
        return self.postgres_dsn is None

    @property
    def postgres_url(self) -> str:
        """The PostgreSQL the history goes to."""
        if self.postgres_dsn is not None:
            return self.postgres_dsn
        from streams.history.embedded import DATABASE, USER

        return f"postgresql://{USER}@127.0.0.1:{self.embedded_postgres_port}/{DATABASE}"

    @property
    def web_url(self) -> str:
        return f"http://{self.web_host}:{self.web_port}"

    @property
    def process_count(self) -> int:
        """How many worker processes ``blackroad worker`` / ``up`` run on this machine."""
        if self.worker_processes:
            return self.worker_processes
        return max(1, min(os.cpu_count() or 1, self.partitions))

    @property
    def reader_ports(self) -> list[int]:
        """The web ports of this machine's readers: right after the workers'."""
        first = self.web_port + self.process_count
        return list(range(first, first + self.readers))

    @property
    def replication_resolved(self) -> bool:
        """Whether the replication settings are known (set, or resolved by :meth:`for_cluster`)."""
        return self.replication_factor > 0 and self.min_insync_replicas > 0

    @property
    def topic_configs(self) -> dict[str, str]:
        """Configs every topic the project creates gets, besides its own (a changelog's compaction)."""
        if not self.replication_resolved:
            raise RuntimeError("replication settings not resolved for the cluster yet (Settings.for_cluster)")
        return {"min.insync.replicas": str(self.min_insync_replicas)}

    def for_cluster(self, brokers: int) -> Settings:
        """These settings with the replication factor and ``min.insync.replicas`` resolved for ``brokers`` brokers.

        Unset (0), the factor is :func:`default_replication_factor` of the brokers the cluster
        has, and ``min.insync.replicas`` :func:`default_min_insync_replicas` of the factor. A
        factor set above the brokers there are is an error naming the setting: Kafka would
        refuse every topic (and a worker would wait for them).
        """
        factor = self.replication_factor or default_replication_factor(brokers)
        if factor > brokers:
            raise SettingsError(
                "REPLICATION_FACTOR",
                f"is {factor}, but the cluster at {self.bootstrap} has {brokers} broker(s) up: "
                "a topic cannot have more copies than there are brokers",
            )
        return self.replace(
            replication_factor=factor,
            min_insync_replicas=self.min_insync_replicas or default_min_insync_replicas(factor),
        )

    def retry_delay(self, attempts: int) -> float:
        """Seconds to wait after a task's ``attempts``-th failed attempt before the next one."""
        return min(2.0 ** min(attempts, 32) * self.retry_backoff, self.retry_backoff_max)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"

    def replace(self, **changes: object) -> Settings:
        """A copy with ``changes`` applied and validated again."""
        updated = dataclasses.replace(self, **changes)  # type: ignore[arg-type]
        updated.validate()
        return updated

    def validate(self) -> None:
        if self.kafka_bootstrap is not None:
            servers = [s.strip() for s in self.kafka_bootstrap.split(",")]
            if not all(_HOST_PORT.match(s) for s in servers):
                raise SettingsError(
                    "KAFKA_BOOTSTRAP",
                    f"expected host:port[,host:port...], got {self.kafka_bootstrap!r}",
                )
        _check_range("EMBEDDED_BROKER_PORT", self.embedded_broker_port, 1, 65535)
        self._validate_kafka_security()
        if self.engine not in ENGINES:
            raise SettingsError("ENGINE", f"expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.processing_guarantee not in GUARANTEES:
            raise SettingsError(
                "PROCESSING_GUARANTEE",
                f"expected one of {', '.join(GUARANTEES)}, got {self.processing_guarantee!r}",
            )
        if self.processing_guarantee == "exactly_once" and self.on_tansu:
            raise SettingsError(
                "PROCESSING_GUARANTEE",
                "exactly_once needs Kafka transactions, which the Tansu broker does not have "
                "(use at_least_once or auto with Tansu)",
            )
        _check_range("WEB_PORT", self.web_port, 1, 65535)
        _check_range("PARTITIONS", self.partitions, 1, 1024)
        _check_range("WORKER_PROCESSES", self.worker_processes, 0, self.partitions)
        _check_range("READERS", self.readers, 0, 64)
        _check_range("WEB_PORT", self.web_port + self.process_count + self.readers - 1, 1, 65535)
        _check_range("CONSISTENCY_WAIT", self.consistency_wait, 0.0, 60.0)
        _check_range("MAX_CONCURRENT_TASKS", self.max_concurrent_tasks, 1, 10_000)
        _check_range("MAX_ATTEMPTS", self.max_attempts, 1, 100)
        _check_range("RETRY_BACKOFF", self.retry_backoff, 0.001, 3600.0)
        _check_range("RETRY_BACKOFF_MAX", self.retry_backoff_max, self.retry_backoff, 86400.0)
        _check_range("BATCH_MAX_RECORDS", self.batch_max_records, 1, 100_000)
        if self.fetch_max_wait_ms is not None:
            _check_range("FETCH_MAX_WAIT_MS", self.fetch_max_wait_ms, 1, 60_000)
        if self.session_timeout is not None:
            _check_range("SESSION_TIMEOUT", self.session_timeout, 1.0, 3600.0)
        _check_range("COMMIT_INTERVAL", self.commit_interval, 0.05, 600.0)
        _check_range("FLUSH_INTERVAL", self.flush_interval, 0.001, 60.0)
        _check_range("BACKLOG_FLUSH_INTERVAL", self.backlog_flush_interval, 0.001, 60.0)
        if self.backlog_flush_interval < self.flush_interval:
            raise SettingsError("BACKLOG_FLUSH_INTERVAL", "must be >= BLACKROAD_FLUSH_INTERVAL")
        _check_range("STALL_TIMEOUT", self.stall_timeout, 1.0, 86400.0)
        _check_range("TASK_RETENTION", self.task_retention, 1.0, 365 * 86400.0)
        _check_range("REPLICATION_FACTOR", self.replication_factor, 0, MAX_REPLICAS)
        _check_range("MIN_INSYNC_REPLICAS", self.min_insync_replicas, 0, MAX_REPLICAS)
        if self.replication_factor and self.min_insync_replicas > self.replication_factor:
            raise SettingsError(
                "MIN_INSYNC_REPLICAS",
                f"is {self.min_insync_replicas}, above BLACKROAD_REPLICATION_FACTOR ({self.replication_factor}): "
                "no write could ever be acknowledged",
            )
        _check_range("INGRESS_TIMEOUT", self.ingress_timeout, 0.1, 60.0)
        _check_range("STOP_TIMEOUT", self.stop_timeout, 1.0, 600.0)
        _check_range("WORKING_MEMORY_TOKENS", self.working_memory_tokens, 16, 10_000_000)
        _check_range("WORKING_MEMORY_CACHE_MB", self.working_memory_cache_mb, 0.0, 1_000_000.0)
        _check_range("MEMORY_EPISODIC_LIMIT", self.memory_episodic_limit, 0, 1_000_000_000)
        _check_range("MEMORY_SEMANTIC_AFTER", self.memory_semantic_after, 1.0, 100 * 365 * 86400.0)
        _check_range("INFERENCE_P50_MS", self.inference_p50_ms, 0.0, 600_000.0)
        _check_range("INFERENCE_P99_MS", self.inference_p99_ms, 0.0, 600_000.0)
        if self.inference_p99_ms < self.inference_p50_ms:
            raise SettingsError("INFERENCE_P99_MS", "must be >= BLACKROAD_INFERENCE_P50_MS")
        if not re.fullmatch(r"[a-z][a-z0-9_\-]{0,63}", self.app_id):
            raise SettingsError("APP_ID", f"expected a short lower-case id, got {self.app_id!r}")
        if not re.fullmatch(r"[a-z][a-z0-9_\-]{0,63}", self.topic_prefix):
            raise SettingsError("TOPIC_PREFIX", f"expected a short lower-case name, got {self.topic_prefix!r}")
        if self.memory_search not in ("on", "off"):
            raise SettingsError("MEMORY_SEARCH", f"expected on or off, got {self.memory_search!r}")
        if self.embedding_model not in ("wordllama", "minilm"):
            raise SettingsError("EMBEDDING_MODEL", f"expected wordllama or minilm, got {self.embedding_model!r}")
        _check_range("EMBEDDING_CACHE_SIZE", self.embedding_cache_size, 0, 10_000_000)
        if self.llm_url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.llm_url):
            raise SettingsError("LLM_URL", f"expected http(s)://host[:port][/path], got {self.llm_url!r}")
        if self.otlp_endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.otlp_endpoint):
            raise SettingsError("OTLP_ENDPOINT", f"expected http(s)://host[:port][/path], got {self.otlp_endpoint!r}")
        if self.llm_api not in ("ollama", "openai"):
            raise SettingsError("LLM_API", f"expected ollama or openai, got {self.llm_api!r}")
        _check_range("LLM_TIMEOUT", self.llm_timeout, 0.05, 3600.0)
        _check_range("LLM_RETRIES", self.llm_retries, 0, 10)
        _check_range("LLM_CONTEXT_TOKENS", self.llm_context_tokens, 64, 10_000_000)
        _check_range("LLM_MEMORIES", self.llm_memories, 0, 100)
        if self.history not in ("on", "off"):
            raise SettingsError("HISTORY", f"expected on or off, got {self.history!r}")
        if self.postgres_dsn is not None and not re.match(r"^postgres(ql)?://", self.postgres_dsn):
            raise SettingsError("POSTGRES_DSN", "expected postgresql://[user[:password]@]host[:port]/database")
        _check_range("EMBEDDED_POSTGRES_PORT", self.embedded_postgres_port, 1, 65535)
        _check_range("POSTGRES_POOL_MIN_SIZE", self.postgres_pool_min_size, 0, 1000)
        _check_range("POSTGRES_POOL_MAX_SIZE", self.postgres_pool_max_size, 1, 1000)
        if self.postgres_pool_max_size < self.postgres_pool_min_size:
            raise SettingsError("POSTGRES_POOL_MAX_SIZE", "must be >= BLACKROAD_POSTGRES_POOL_MIN_SIZE")
        _check_range("POSTGRES_COMMAND_TIMEOUT", self.postgres_command_timeout, 0.1, 3600.0)
        _check_range("HISTORY_BATCH_ROWS", self.history_batch_rows, 1, 1_000_000)
        _check_range("HISTORY_AGENT_INTERVAL", self.history_agent_interval, 0.0, 3600.0)
        _check_range("HEAP_TRIM_INTERVAL", self.heap_trim_interval, 0.0, 86400.0)
        if self.api_reads not in ("open", "token"):
            raise SettingsError("API_READS", f"expected open or token, got {self.api_reads!r}")
        if not self.api_token_list() and self.api_reads == "token":
            raise SettingsError("API_READS", "is token, but no token is set (BLACKROAD_API_TOKENS or _FILE)")
        if self.peer_secret is not None and len(self.peer_secret) < MIN_TOKEN_CHARS:
            raise SettingsError("PEER_SECRET", f"needs at least {MIN_TOKEN_CHARS} characters")
        _check_range("RATE_LIMIT_REQUESTS", self.rate_limit_requests, 0.0, 1e9)
        _check_range("RATE_LIMIT_TASKS", self.rate_limit_tasks, 0.0, 1e9)
        _check_range("RATE_LIMIT_BURST", self.rate_limit_burst, 0.001, 3600.0)
        if self.rate_limit_tasks and self.rate_limit_tasks * self.rate_limit_burst < MAX_BATCH_TASKS:
            raise SettingsError(
                "RATE_LIMIT_TASKS",
                f"times BLACKROAD_RATE_LIMIT_BURST must allow a whole POST /v1/batch ({MAX_BATCH_TASKS} tasks)",
            )
        for spec in self.handler_specs:
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
                raise SettingsError("HANDLERS", f"expected module:function, got {spec!r}")
        if self.log_format not in ("text", "json"):
            raise SettingsError("LOG_FORMAT", f"expected text or json, got {self.log_format!r}")
        if self.log_level not in {"debug", "info", "warning", "error", "critical"}:
            raise SettingsError("LOG_LEVEL", "expected one of debug, info, warning, error, critical")

    def _validate_kafka_security(self) -> None:
        protocol = self.kafka_security_protocol
        if protocol not in SECURITY_PROTOCOLS:
            raise SettingsError(
                "KAFKA_SECURITY_PROTOCOL", f"expected one of {', '.join(SECURITY_PROTOCOLS)}, got {protocol!r}"
            )
        if protocol != "PLAINTEXT" and self.kafka_bootstrap is None:
            raise SettingsError(
                "KAFKA_SECURITY_PROTOCOL",
                f"is {protocol}, but BLACKROAD_KAFKA_BOOTSTRAP is unset: the embedded broker speaks PLAINTEXT only",
            )
        if self.kafka_sasl_mechanism not in SASL_MECHANISMS:
            raise SettingsError(
                "KAFKA_SASL_MECHANISM",
                f"expected one of {', '.join(SASL_MECHANISMS)}, got {self.kafka_sasl_mechanism!r}",
            )
        if self.kafka_sasl_password is not None and self.kafka_sasl_password_file is not None:
            raise SettingsError("KAFKA_SASL_PASSWORD_FILE", "set either it or BLACKROAD_KAFKA_SASL_PASSWORD, not both")
        if self.kafka_sasl:
            if self.kafka_sasl_username is None:
                raise SettingsError(
                    "KAFKA_SASL_USERNAME", f"is needed with BLACKROAD_KAFKA_SECURITY_PROTOCOL={protocol}"
                )
            if not self.kafka_password():
                raise SettingsError(
                    "KAFKA_SASL_PASSWORD",
                    f"(or _FILE) is needed with BLACKROAD_KAFKA_SECURITY_PROTOCOL={protocol}",
                )
        else:
            for name in ("username", "password", "password_file"):
                if getattr(self, f"kafka_sasl_{name}") is not None:
                    raise SettingsError(
                        f"KAFKA_SASL_{name.upper()}",
                        f"is set, but BLACKROAD_KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL",
                    )
        for name in ("cafile", "certfile", "keyfile"):
            path = getattr(self, f"kafka_ssl_{name}")
            if path is None:
                continue
            if not self.kafka_ssl:
                raise SettingsError(
                    f"KAFKA_SSL_{name.upper()}",
                    f"is set, but BLACKROAD_KAFKA_SECURITY_PROTOCOL={protocol} does not use SSL",
                )
            if not Path(path).is_file():
                raise SettingsError(f"KAFKA_SSL_{name.upper()}", f"no such file: {path}")
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            missing = "KAFKA_SSL_KEYFILE" if self.kafka_ssl_keyfile is None else "KAFKA_SSL_CERTFILE"
            raise SettingsError(missing, "is needed too: a client certificate goes with its key")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read and validate settings; unknown ``BLACKROAD_*`` names are errors too."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for env_name, raw in environ.items():
            if not env_name.startswith(PREFIX):
                continue
            name = env_name[len(PREFIX) :].lower()
            if name not in fields:
                known = ", ".join(PREFIX + n.upper() for n in fields)
                raise SettingsError(name.upper(), f"unknown setting (known: {known})")
            values[name] = _parse(name.upper(), fields[name].type, raw)
            if name in ("log_level", "log_format"):
                values[name] = str(values[name]).lower()  # INFO and info alike
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings


def default_replication_factor(brokers: int) -> int:
    """Copies of each topic on a cluster of ``brokers`` brokers: three (so one may fail while
    writes go on, see :func:`default_min_insync_replicas`), or as many as there are brokers."""
    return max(1, min(3, brokers))


def default_min_insync_replicas(replication_factor: int) -> int:
    """Copies that must have a record before it is acknowledged: all but one (2 of 3), at least one.

    One broker may then be down (or restarting) while writes go on, and an acknowledged
    record is on at least two brokers whenever there are several.
    """
    return max(1, replication_factor - 1)


def _parse(name: str, annotation: object, raw: str) -> object:
    text = raw.strip()
    kind = str(annotation)
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise SettingsError(name, f"expected a number, got {raw!r}") from None
    if kind == "Path":
        if not text:
            raise SettingsError(name, "must not be empty")
        return Path(text)
    if kind == "str | None":
        return text or None
    if kind in ("int | None", "float | None"):
        if not text:
            return None
        try:
            return int(text) if kind == "int | None" else float(text)
        except ValueError:
            raise SettingsError(name, f"expected a number, got {raw!r}") from None
    return text


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise SettingsError(name, f"must be between {low} and {high}, got {value}")
