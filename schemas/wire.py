"""The Kafka wire format of task events.

Key: the agent id, UTF-8. Value: a msgpack map (see README "Wire format")::

    {"v": 1, "type": "task.created", "event_id": "evt_...", "ts": <ms since epoch>,
     "task_id": "task_...", "agent_id": "agent_alice_001", "kind": "inference",
     "priority": "normal", "title": "...", "description": "...", "payload": {...},
     "agent_type": "worker", "deadline": <ms or nil>, "metadata": {...}}

A task's trace (W3C ``traceparent``, :mod:`schemas.trace_context`) comes in the record's
``traceparent`` header, or as the event's own ``"traceparent"`` field, which wins (the
project writes the field when it sends a task on: a retry, a task forwarded to its
agent's partition).

``decode_task`` validates one value and returns a :class:`TaskEvent` or raises
:class:`WireError` with a reason fit for the dead-letter topic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

import msgpack
from aiokafka.partitioner import murmur2

from schemas import domain, trace_context

SCHEMA_VERSION = 1
TASK_CREATED = "task.created"
TASK_BATCH = "task.batch"
#: Entries of one agent that searches returned (see :class:`MemoryAccess`).
MEMORY_ACCESSED = "memory.accessed"
#: A task's next attempt after a failed one, put back on the tasks topic once its backoff is over.
TASK_RETRY = "task.retry"
#: The record header carrying a task's W3C trace context.
TRACEPARENT_HEADER = "traceparent"
#: Most attempts a task may be given (``BLACKROAD_MAX_ATTEMPTS`` at most).
MAX_ATTEMPTS = 100
#: Most entries one ``memory.accessed`` event may name.
MAX_ACCESSED_IDS = 1000
#: Most tasks one ``task.batch`` event may carry.
MAX_BATCH_TASKS = 10_000
LIFECYCLE_EVENTS = (
    "task.started",
    "task.completed",
    "task.failed",
    "agent.status_changed",
    "memory.written",
)
MAX_TEXT = 16_384
#: Most levels of maps and lists in a free-form value (``payload``, ``metadata``, a
#: handler's result), the value itself included. The web views serve these values inside
#: the task as JSON, which orjson writes at most 255 levels deep.
MAX_DEPTH: Final = 32
#: The range of ``ts`` and ``deadline``: milliseconds from the epoch to the end of year 9999.
MAX_TIME_MS: Final = 253_402_300_799_999
#: The integers orjson writes: signed and unsigned 64-bit.
_MIN_INT: Final = -(1 << 63)
_MAX_INT: Final = (1 << 64) - 1
MAX_AGENT_ID: Final = domain.MAX_AGENT_ID


class WireError(ValueError):
    """An event that cannot be decoded or is not a valid task event."""


@dataclass(slots=True, init=False)
class TaskEvent:
    """A validated ``task.created`` event (treat as read-only; not frozen, for speed).

    Its ``__init__`` is written out: compiled (see :mod:`streams.runtime.native`), it runs
    natively, while a dataclass's generated one stays interpreted.
    """

    task_id: str
    agent_id: str
    kind: str
    priority: str
    title: str
    description: str
    payload: dict[str, Any]
    created_ms: int
    agent_type: str
    deadline_ms: int | None
    metadata: dict[str, Any]
    #: Which attempt this event asks for: 1 for a new task, more for a ``task.retry``.
    attempt: int
    #: The W3C traceparent the task came with (:mod:`schemas.trace_context`); None: untraced.
    trace: str | None

    def __init__(
        self,
        task_id: str,
        agent_id: str,
        kind: str,
        priority: str,
        title: str,
        description: str,
        payload: dict[str, Any],
        created_ms: int,
        agent_type: str = "worker",
        deadline_ms: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.task_id = task_id
        self.agent_id = agent_id
        self.kind = kind
        self.priority = priority
        self.title = title
        self.description = description
        self.payload = payload
        self.created_ms = created_ms
        self.agent_type = agent_type
        self.deadline_ms = deadline_ms
        self.metadata = metadata if metadata is not None else {}
        self.attempt = 1
        self.trace = None

    def to_wire(self) -> dict[str, Any]:
        data = {
            "v": SCHEMA_VERSION,
            "type": TASK_CREATED,
            "event_id": domain.new_id("evt"),
            "ts": self.created_ms,
            "task_id": self.task_id,
            "agent_id": self.agent_id,
            "kind": self.kind,
            "priority": self.priority,
            "title": self.title,
            "description": self.description,
            "payload": self.payload,
            "agent_type": self.agent_type,
            "deadline": self.deadline_ms,
            "metadata": self.metadata,
        }
        if self.trace is not None:
            data["traceparent"] = self.trace
        return data

    @property
    def trace_id(self) -> str | None:
        """The task's trace id (32 hex digits), or None."""
        trace = self.trace
        return None if trace is None else trace_context.trace_id(trace)


_new_id = domain.new_id
#: One reusable packer: ``msgpack.packb`` builds a new one per call.
_pack = msgpack.Packer(use_bin_type=True).pack


def encode(value: Any) -> bytes:
    return _pack(value)


def encode_task(event: TaskEvent) -> bytes:
    return encode(event.to_wire())


def task_retry(event: TaskEvent, attempt: int, due_ms: int) -> bytes:
    """Encode a ``task.retry`` event: ``event`` again, for its ``attempt``-th attempt from ``due_ms`` on."""
    data = event.to_wire()
    data["type"] = TASK_RETRY
    data["attempt"] = attempt
    data["due"] = due_ms
    return encode(data)


def retry_due_ms(raw: bytes) -> int:
    """When a ``task.retry`` event is due (ms since the epoch); WireError if it is not one."""
    data = _unpack_map(raw)
    due = data.get("due")
    if data.get("type") != TASK_RETRY or type(due) is not int:
        raise WireError("not a task.retry event with its 'due' time")
    return due


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key`` (murmur2)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Partitioner:
    """:func:`partition_for` with a fixed partition count, remembering the keys it has seen.

    murmur2 is pure Python in aiokafka (microseconds a key); agent ids repeat, so most
    lookups are one dict hit. The memo is cleared when it reaches ``memo_size`` keys.
    """

    def __init__(self, partitions: int, memo_size: int = 1 << 20) -> None:
        self.partitions = partitions
        self._memo: dict[bytes, int] = {}
        self._memo_size = memo_size

    def __call__(self, key: bytes) -> int:
        partition = self._memo.get(key)
        if partition is None:
            if len(self._memo) >= self._memo_size:
                self._memo.clear()
            partition = self._memo[key] = partition_for(key, self.partitions)
        return partition


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryAccess:
    """A validated ``memory.accessed`` event: searches returned these entries of one agent at ``ts``.

    ``{"v": 1, "type": "memory.accessed", "agent_id": ..., "ts": <ms>, "ids": ["mem_...", ...]}``,
    keyed by the agent like its tasks; the agent's worker counts one access of each entry.
    """

    __slots__ = ("agent_id", "ids", "ts")

    def __init__(self, agent_id: str, ids: list[str], ts: int) -> None:
        self.agent_id = agent_id
        self.ids = ids
        self.ts = ts


def memory_accessed(agent_id: str, ids: list[str], ts_ms: int) -> bytes:
    """Encode a ``memory.accessed`` event for the tasks topic."""
    return encode({"v": SCHEMA_VERSION, "type": MEMORY_ACCESSED, "agent_id": agent_id, "ts": ts_ms, "ids": ids})


def _memory_access(data: dict[str, Any]) -> MemoryAccess:
    if data.get("v") != SCHEMA_VERSION or type(data.get("v")) is not int:
        raise WireError(f"unsupported schema version {data.get('v')!r} (expected {SCHEMA_VERSION})")
    agent_id = data.get("agent_id")
    if type(agent_id) is not str or len(agent_id) > MAX_AGENT_ID or not _AGENT_ID_MATCH(agent_id):
        raise WireError(f"memory.accessed: invalid agent_id {_brief(agent_id)}")
    ts = data.get("ts")
    if type(ts) is not int or not 0 <= ts <= MAX_TIME_MS:
        raise WireError(f"memory.accessed: 'ts' must be milliseconds since the epoch, got {_brief(ts)}")
    ids = data.get("ids")
    if type(ids) is not list or not 1 <= len(ids) <= MAX_ACCESSED_IDS:
        raise WireError(f"memory.accessed: 'ids' must be a list of 1 to {MAX_ACCESSED_IDS} memory ids")
    for entry_id in ids:
        if type(entry_id) is not str or not _MEMORY_ID_MATCH(entry_id):
            raise WireError(f"memory.accessed: invalid memory id {_brief(entry_id)}")
    return MemoryAccess(agent_id, ids, ts)


def decode_record(raw: bytes | None) -> tuple[list[TaskEvent], list[str], MemoryAccess | None]:
    """Decode one value of the tasks topic: tasks as :func:`decode_tasks` gives them, or a
    ``memory.accessed`` event (then no tasks)."""
    data = _unpack_map(raw)
    event_type = data.get("type")
    if event_type == MEMORY_ACCESSED:
        return [], [], _memory_access(data)
    if event_type == TASK_RETRY:
        return [_retry_from_map(data)], [], None
    tasks, refused = _decode_tasks(data)
    return tasks, refused, None


def header_trace(headers: Any) -> str | None:
    """The ``traceparent`` among a record's headers (``(name, bytes)`` pairs), if valid."""
    for name, value in headers:
        if name == TRACEPARENT_HEADER and type(value) is bytes:
            return trace_context.parse(value.decode("latin-1"))
    return None


def add_trace(events: list[TaskEvent], trace: str) -> None:
    """Give ``trace`` to those of ``events`` without one of their own."""
    for event in events:
        if event.trace is None:
            event.trace = trace


def _retry_from_map(data: dict[str, Any]) -> TaskEvent:
    attempt = data.get("attempt")
    if type(attempt) is not int or not 2 <= attempt <= MAX_ATTEMPTS:
        raise WireError(f"task.retry: 'attempt' must be 2 to {MAX_ATTEMPTS}, got {_brief(attempt)}")
    data["type"] = TASK_CREATED
    event = task_from_map(data)
    event.attempt = attempt
    return event


def decode_tasks(raw: bytes | None) -> tuple[list[TaskEvent], list[str]]:
    """Decode one value of the tasks topic: a ``task.created`` or a ``task.batch`` event.

    Returns the valid tasks and, for a batch, the reasons its invalid tasks were refused
    (the valid ones still run). A value that is not a task event at all raises WireError.
    """
    return _decode_tasks(_unpack_map(raw))


def _decode_tasks(data: dict[str, Any]) -> tuple[list[TaskEvent], list[str]]:
    if data.get("type") != TASK_BATCH:
        return [task_from_map(data)], []
    if data.get("v") != SCHEMA_VERSION or type(data.get("v")) is not int:
        raise WireError(f"unsupported schema version {data.get('v')!r} (expected {SCHEMA_VERSION})")
    if "columns" in data:
        return _tasks_from_columns(data)
    tasks = data.get("tasks")
    if type(tasks) is not list or not 1 <= len(tasks) <= MAX_BATCH_TASKS:
        raise WireError(f"a task.batch needs 'tasks': a list of 1 to {MAX_BATCH_TASKS} task maps, or 'columns'")
    batch = _Batch()
    for index, task in enumerate(tasks):
        if type(task) is not dict:
            batch.errors.append(f"tasks[{index}]: must be a map")
            continue
        task.setdefault("v", SCHEMA_VERSION)
        task.setdefault("type", TASK_CREATED)
        task.setdefault("ts", data.get("ts"))
        try:
            event = task_from_map(task)
        except WireError as exc:
            batch.errors.append(f"tasks[{index}]: {exc}")
            continue
        batch.add(index, event)
    return batch.events, batch.errors


#: The columns of a columnar ``task.batch``: the task fields, with the batch's ``ts`` and
#: each field's default standing in for a column left out or a nil in it.
BATCH_COLUMNS = (
    "task_id",
    "agent_id",
    "kind",
    "priority",
    "ts",
    "title",
    "description",
    "payload",
    "metadata",
    "agent_type",
    "deadline",
    "traceparent",
)


class _Batch:
    """The valid tasks of a batch so far, the reasons for the others, and the ids seen."""

    def __init__(self) -> None:
        self.events: list[TaskEvent] = []
        self.errors: list[str] = []
        self._seen: set[str] = set()

    def add(self, index: int, event: TaskEvent) -> None:
        if event.task_id in self._seen:
            self.errors.append(f"tasks[{index}]: task_id {event.task_id!r} repeated in the batch")
            return
        self._seen.add(event.task_id)
        self.events.append(event)


def _tasks_from_columns(data: dict[str, Any]) -> tuple[list[TaskEvent], list[str]]:
    """The tasks of a columnar ``task.batch``: ``columns`` maps field names to equal-length lists.

    One list per field instead of one map per task: no per-task map to build and read,
    and each field name sent once.
    """
    columns = data["columns"]
    if type(columns) is not dict or not columns:
        raise WireError("'columns' must be a map of field names to lists of equal length")
    unknown = sorted(str(name) for name in columns if name not in BATCH_COLUMNS)
    if unknown:
        raise WireError(f"unknown task.batch columns {unknown} (expected some of {list(BATCH_COLUMNS)})")
    count = -1
    for name, values in columns.items():
        if type(values) is not list or (count >= 0 and len(values) != count):
            raise WireError(f"column {name!r} must be a list as long as the others")
        count = len(values)
    if not 1 <= count <= MAX_BATCH_TASKS:
        raise WireError(f"a task.batch carries 1 to {MAX_BATCH_TASKS} tasks, got {count}")
    absent: list[Any] = [None] * count
    task_ids = columns.get("task_id", absent)
    agent_ids = columns.get("agent_id", absent)
    kinds = columns.get("kind", absent)
    priorities = columns.get("priority", absent)
    created = columns.get("ts", absent)
    titles = columns.get("title", absent)
    descriptions = columns.get("description", absent)
    payloads = columns.get("payload", absent)
    metadata = columns.get("metadata", absent)
    agent_types = columns.get("agent_type", absent)
    deadlines = columns.get("deadline", absent)
    traces = columns.get("traceparent")
    batch_ts = data.get("ts")
    batch = _Batch()
    for index in range(count):
        priority = priorities[index]
        ts = created[index]
        try:
            event = task_from_fields(
                task_ids[index],
                agent_ids[index],
                kinds[index],
                "normal" if priority is None else priority,
                batch_ts if ts is None else ts,
                titles[index],
                descriptions[index],
                payloads[index],
                metadata[index],
                agent_types[index],
                deadlines[index],
            )
        except WireError as exc:
            batch.errors.append(f"tasks[{index}]: {exc}")
            continue
        if traces is not None and traces[index] is not None:
            event.trace = trace_context.parse(traces[index])
        batch.add(index, event)
    return batch.events, batch.errors


def encode_batch(events: list[TaskEvent]) -> bytes:
    """One columnar ``task.batch`` value carrying ``events`` (all for agents of one partition)."""
    columns = _columns(events)
    traces = [event.trace for event in events]
    if any(trace is not None for trace in traces):
        columns["traceparent"] = traces
    return encode(
        {"v": SCHEMA_VERSION, "type": TASK_BATCH, "event_id": domain.new_id("evt"), "ts": now_ms(), "columns": columns}
    )


def _columns(events: list[TaskEvent]) -> dict[str, list[Any]]:
    return {
        "task_id": [event.task_id for event in events],
        "agent_id": [event.agent_id for event in events],
        "kind": [event.kind for event in events],
        "priority": [event.priority for event in events],
        "ts": [event.created_ms for event in events],
        "title": [event.title for event in events],
        "description": [event.description for event in events],
        "payload": [event.payload for event in events],
        "metadata": [event.metadata for event in events],
        "agent_type": [event.agent_type for event in events],
        "deadline": [event.deadline_ms for event in events],
    }


def _unpack_map(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise WireError("empty value (tombstone) on the tasks topic")
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise WireError(f"value is not msgpack: {type(exc).__name__}: {exc}") from None
    if type(data) is not dict:
        raise WireError(f"value must be a msgpack map, got {type(data).__name__}")
    return data


def decode_task(raw: bytes | None) -> TaskEvent:
    """Decode and validate one ``task.created`` value."""
    return task_from_map(_unpack_map(raw))


def task_from_map(data: dict[str, Any]) -> TaskEvent:
    """Validate a decoded map (also used for HTTP requests after defaults are filled)."""
    get = data.get
    version = get("v")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise WireError(f"unsupported schema version {version!r} (expected {SCHEMA_VERSION})")
    event_type = get("type")
    if event_type != TASK_CREATED:
        raise WireError(f"unsupported event type {event_type!r} (expected {TASK_CREATED!r})")
    event = task_from_fields(
        get("task_id"),
        get("agent_id"),
        get("kind"),
        get("priority", "normal"),
        get("ts"),
        get("title"),
        get("description"),
        get("payload"),
        get("metadata"),
        get("agent_type"),
        get("deadline"),
    )
    trace = get("traceparent")
    if trace is not None:
        event.trace = trace_context.parse(trace)
    return event


def task_from_fields(
    task_id: Any,
    agent_id: Any,
    kind: Any,
    priority: Any,
    created: Any,
    title: Any,
    description: Any,
    payload: Any,
    metadata: Any,
    agent_type: Any,
    deadline: Any,
) -> TaskEvent:
    """Validate a task's fields as decoded (nil or empty optional fields take their defaults).

    Written for the hot path: exact type checks, nothing looked up twice.
    """
    if type(task_id) is not str or not _TASK_ID_MATCH(task_id):
        raise WireError(f"task_id must look like 'task_<id>' (1 to 64 of A-Z a-z 0-9 _ -), got {_brief(task_id)}")
    if type(agent_id) is not str or len(agent_id) > MAX_AGENT_ID or not _AGENT_ID_MATCH(agent_id):
        raise WireError(
            f"agent_id must look like 'agent_<name>_<NNN>' (at most {MAX_AGENT_ID} characters), got {_brief(agent_id)}"
        )
    if type(kind) is not str or kind not in domain.TASK_KINDS:
        raise WireError(f"kind must be one of {sorted(domain.TASK_KINDS)}, got {_brief(kind)}")
    if type(priority) is not str or priority not in _CANONICAL_PRIORITIES:
        canonical = domain.canonical_priority(priority)
        if canonical is None:
            raise WireError(f"unknown priority {_brief(priority)}")
        priority = canonical
    if type(created) is not int or not 0 <= created <= MAX_TIME_MS:
        raise WireError(f"ts must be milliseconds since the epoch (0 to {MAX_TIME_MS}), got {_brief(created)}")
    title = title or ""
    if type(title) is not str or len(title) > MAX_TEXT:
        raise WireError(f"title must be a string of at most {MAX_TEXT} characters")
    description = description or ""
    if type(description) is not str or len(description) > MAX_TEXT:
        raise WireError(f"description must be a string of at most {MAX_TEXT} characters")
    payload = payload or {}
    if type(payload) is not dict:
        raise WireError(f"payload must be a map, got {type(payload).__name__}")
    if payload and (problem := _map_problem(payload, 1)) is not None:
        raise WireError("payload" + problem)
    metadata = metadata or {}
    if type(metadata) is not dict:
        raise WireError(f"metadata must be a map, got {type(metadata).__name__}")
    if metadata and (problem := _map_problem(metadata, 1)) is not None:
        raise WireError("metadata" + problem)
    agent_type = agent_type or "worker"
    if type(agent_type) is not str or agent_type not in domain.AGENT_TYPES:
        raise WireError(f"agent_type must be one of {sorted(domain.AGENT_TYPES)}, got {_brief(agent_type)}")
    if deadline is not None and (type(deadline) is not int or not 0 <= deadline <= MAX_TIME_MS):
        raise WireError(
            f"deadline must be milliseconds since the epoch (0 to {MAX_TIME_MS}) or nil, got {_brief(deadline)}"
        )
    return TaskEvent(
        task_id, agent_id, kind, priority, title, description, payload, created, agent_type, deadline, metadata
    )


_TASK_ID_MATCH = domain.TASK_ID.fullmatch
_AGENT_ID_MATCH = domain.AGENT_ID.fullmatch
_MEMORY_ID_MATCH = domain.MEMORY_ID.fullmatch
_CANONICAL_PRIORITIES = frozenset(domain.PRIORITIES)


def json_problem(value: Any, depth: int = 1) -> str | None:
    """Why the web views could not serve ``value`` as JSON; None when they can.

    The answer reads ``"<path>: <problem>"``, e.g. ``"['input'][0]: binary data (msgpack
    bin) has no JSON form"``. Allowed: maps with string keys and lists, at most
    :data:`MAX_DEPTH` levels of them (``value`` is level ``depth``), strings, booleans,
    nil, floats and 64-bit integers. Exact types, as msgpack and JSON decode them: a
    subclass, a tuple, bytes, a msgpack ext type (or timestamp) is refused.
    """
    kind = type(value)
    if kind is dict:
        return _map_problem(value, depth)
    if kind is list:
        return _list_problem(value, depth)
    if kind is str or kind is bool or kind is float or value is None:
        return None
    if kind is int:
        return None if _MIN_INT <= value <= _MAX_INT else f": the integer {value} is outside 64 bits"
    return f": {_describe(value)} has no JSON form"


# Maps and lists get functions of their own, typed: compiled (see streams.runtime.native), they
# iterate natively. Every task passes here, so strings, the common case, need no call.
def _map_problem(value: dict[Any, Any], depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return f": nested deeper than {MAX_DEPTH} levels"
    for key, item in value.items():
        if type(key) is not str:
            return f": a map key is {_describe(key)}, not a string"
        if type(item) is not str:
            problem = json_problem(item, depth + 1)
            if problem is not None:
                return f"[{_brief(key)}]{problem}"
    return None


def _list_problem(value: list[Any], depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return f": nested deeper than {MAX_DEPTH} levels"
    for index, item in enumerate(value):
        if type(item) is not str:
            problem = json_problem(item, depth + 1)
            if problem is not None:
                return f"[{index}]{problem}"
    return None


def _describe(value: Any) -> str:
    """What a value no JSON can carry is, for a reason."""
    if isinstance(value, msgpack.ExtType):
        return f"a msgpack ext type (code {value.code})"
    if isinstance(value, msgpack.Timestamp):
        return "a msgpack timestamp"
    if isinstance(value, bytes):
        return "binary data (msgpack bin)"
    return f"a value of type {type(value).__name__}"


def _brief(value: Any) -> str:
    """``repr(value)``, cut short: a reason must not carry a whole oversized value."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:60] + f"... ({len(shown)} characters)"


def lifecycle_event(event_type: str, ts_ms: int, event_id: str | None = None, **fields: Any) -> bytes:
    """Encode one lifecycle event for the events topic (a fresh ``event_id`` unless given)."""
    return encode(
        {"v": SCHEMA_VERSION, "type": event_type, "event_id": event_id or _new_id("evt"), "ts": ts_ms, **fields}
    )


def task_event_id(task_id: str, step: str, attempt: int = 1) -> str:
    """The id of a task's ``step`` event (started, completed, failed): the same on every delivery.

    A record replayed after a crash sends its lifecycle events again; their ids repeat,
    so consumers can drop the copies. Each attempt after the first has ids of its own
    (``-started-2``), and so has a failed attempt the task will retry (``-retry-1``).
    """
    return f"evt_{task_id[5:]}-{step}" if attempt == 1 else f"evt_{task_id[5:]}-{step}-{attempt}"


def task_retrying_event(
    task_id: str,
    agent_id: str,
    error: str | None,
    attempt: int,
    retry_at: int,
    ts_ms: int,
    trace_id: str | None = None,
) -> bytes:
    """``task.failed`` for a failed ``attempt`` the task will retry: its status is ``queued`` again."""
    event = {
        "v": SCHEMA_VERSION,
        "type": "task.failed",
        "event_id": task_event_id(task_id, "retry", attempt + 1),
        "ts": ts_ms,
        "task_id": task_id,
        "agent_id": agent_id,
        "status": "queued",
        "error": error,
        "attempt": attempt,
        "retry_at": retry_at,
    }
    return _pack_traced(event, trace_id)


def task_finished_event(
    task_id: str,
    agent_id: str,
    status: str,
    error: str | None,
    started_at: int | None,
    ts_ms: int,
    trace_id: str | None = None,
) -> bytes:
    """``task.completed`` or ``task.failed`` (failed and dead tasks) for the events topic;
    a traced task's carry its ``trace_id``."""
    step = "completed" if status == "completed" else "failed"
    event = {
        "v": SCHEMA_VERSION,
        "type": "task." + step,
        "event_id": task_event_id(task_id, step),
        "ts": ts_ms,
        "task_id": task_id,
        "agent_id": agent_id,
        "status": status,
        "error": error,
        "started_at": started_at,
    }
    return _pack_traced(event, trace_id)


def _pack_traced(event: dict[str, Any], trace_id: str | None) -> bytes:
    """A task's lifecycle event, with its ``trace_id`` if it has one."""
    if trace_id is not None:
        event["trace_id"] = trace_id
    return _pack(event)


def dead_letter(reason: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> bytes:
    """Encode a dead-letter record: the original bytes, the reason and the source offset."""
    return encode(
        {
            "v": SCHEMA_VERSION,
            "type": "dead_letter",
            "reason": reason,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": key,
            "value": value,
            "ts": now_ms(),
        }
    )


def memory_archived(agent_id: str, source_offset: int, entries: list[dict[str, Any]]) -> bytes:
    """A record of the memory-archive topic: ``entries`` left ``agent_id``'s working memory (oldest
    first) while the tasks up to ``source_offset`` of its partition ran. Sent again after a crash
    that may have lost it; an entry's ``id`` tells the copies apart."""
    return encode(
        {
            "v": SCHEMA_VERSION,
            "type": "memory.archived",
            "agent_id": agent_id,
            "source_offset": source_offset,
            "entries": entries,
        }
    )
