"""HTTP web views (JSON via orjson) over the materialized tables.

Lookups by agent id are answered by the worker that owns the agent's partition:
any other worker forwards the request there. Lookups by task id and the agent
list ask the other workers too when this worker does not hold the answer. The
history views (an agent's tasks, the task feed, a task gone from the live table,
agents' recent tasks) read PostgreSQL, from any worker (``streams.history.queries``).

The views read through a :class:`streams.serve.view_source.ViewSource`: a worker's stores, or
a read replica's copy of the changelogs (``streams.replica``), which holds every partition and
so forwards nothing. Every GET answer says how far behind the stream it is
(``X-Staleness-Ms``), and a GET carrying a consistency token waits for the write it names
(``streams.serve.consistency``).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from faust import web
from faust.web.exceptions import MethodNotAllowed
from yarl import URL

from agents.memory import describe, entries, entry_id, tier_counts, walk_chain
from schemas import trace_context, wire
from streams.history import queries
from streams.history.sink import POSTGRES_ERRORS as HISTORY_ERRORS
from streams.history.verify import compare_memory
from streams.memory_search.index import TIERS, Hit
from streams.processing.metrics import Metrics
from streams.processing.tables import task_expired, thaw
from streams.serve.consistency import (
    CURRENT,
    CURRENT_HEADER,
    STALENESS_HEADER,
    TOKEN_HEADER,
    format_token,
    not_reached,
    parse_token,
)
from streams.serve.contract import operations as api
from streams.serve.contract.params import PatternQuery
from streams.serve.errors import REQUEST_ID, RETRY_AFTER, ApiError, envelope, error_headers, invalid, request_id
from streams.serve.ingress import BrokerUnavailable, IngressProducer
from streams.serve.openapi import build_document, package_version
from streams.serve.peers import PeerClient, PeerError
from streams.serve.rate_limit import Holds, retry_after
from streams.serve.request_bodies import MemorySearch, parse_batch, parse_search, parse_task_request, read_json
from streams.serve.sorted_keys import SortedKeys
from streams.serve.view_source import ViewSource
from streams.serve.web_auth import ApiGuard, Refused

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Tasks per agent in ``GET /v1/agents?include=recent_tasks``, newest first.
RECENT_TASKS = 5
#: Carries the peer secret on requests one worker forwards to another (see ``streams.serve.web_auth``).
FORWARDED = "X-Blackroad-Forwarded"
#: ... while the broker does not acknowledge records: an outage tends to last seconds, not a moment.
BROKER_RETRY_AFTER = 2
#: A POST answers with the trace its tasks carry (W3C Trace Context Level 2; docs/tracing.md),
#: the request's own ``traceparent`` (the header of the records too) or a new one.
TRACERESPONSE = "traceresponse"


def _json(view: web.View, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    return view.bytes(orjson.dumps(value), content_type="application/json", status=status, headers=headers)


#: Responses longer than this go gzip-compressed to clients that accept it.
COMPRESS_ABOVE = 1024


def compress(request: Any, response: Any) -> None:
    """gzip ``response``'s body in place when it is over :data:`COMPRESS_ABOVE` bytes and the
    client accepts gzip (workers asking each other do not)."""
    body = response.body
    if (
        isinstance(body, bytes)
        and len(body) > COMPRESS_ABOVE
        and "gzip" in request.headers.get("Accept-Encoding", "")
        and "Content-Encoding" not in response.headers
    ):
        response.body = gzip.compress(body, compresslevel=1)
        response.headers["Content-Encoding"] = "gzip"
        response.headers["Vary"] = "Accept-Encoding"


def _error(view: web.View, exc: ApiError, request_id: str) -> Any:
    return view.bytes(
        envelope(exc, request_id), content_type="application/json", status=exc.status, headers=error_headers(exc)
    )


class ApiView(web.View):
    """Turns :class:`ApiError` (and anything unexpected) into the error envelope."""

    name = "api"
    #: Views that read tables answer 503 until the worker's tables are recovered.
    reads_tables = True
    #: Methods that change something (they need an API token when tokens are in use).
    write_methods: frozenset[str] = frozenset()

    #: Views anyone may ask, with no token and no limit (the health checks).
    open_to_all = False

    async def dispatch(self, request: Any) -> Any:
        app: Any = self.app
        source: ViewSource = app.view_source
        metrics: Metrics = source.metrics
        started = time.perf_counter()
        asked = request_id(request)
        try:
            if not self.open_to_all:
                self._admit(request, source.guard)
            if self.reads_tables and request.method == "GET":
                if not source.tables_ready():
                    raise ApiError("internal_error", "the tables are being recovered or caught up; retry shortly", 503)
                if (raw_token := request.headers.get(TOKEN_HEADER)) is not None:
                    await _wait_for_token(source, raw_token, self.name)
            response = await self._call(request)
        except ApiError as exc:
            response = _error(self, exc, asked)
            if request.body_exists and not request.content.at_eof():
                # Refused before its body was read (no token, over its limit): closing costs
                # less than reading a body nobody will use.
                response.force_close()
        except (KeyError, MethodNotAllowed):
            # A method Faust's view does not know (KeyError), or HEAD of a view with no GET.
            response = _error(self, ApiError("invalid_request", f"method {request.method} not allowed", 405), asked)
        except Exception as exc:
            log.exception("web view %s failed (request %s): %r", self.name, asked, exc)
            response = _error(self, ApiError("internal_error", "internal error"), asked)
        response.headers[REQUEST_ID] = asked
        if request.method == "GET" and STALENESS_HEADER not in response.headers:
            response.headers[STALENESS_HEADER] = str(source.staleness_ms())
        compress(request, response)
        status = response.status
        metrics.http_request(self.name, status, time.perf_counter() - started)
        # A 503 (recovering, broker away) is expected and retried: no warning for each.
        failed = status >= 500 and status != 503
        if failed or log.isEnabledFor(logging.DEBUG):
            log.log(
                logging.WARNING if failed else logging.DEBUG,
                "%s %s -> %d (request %s)",
                request.method,
                request.path,
                status,
                asked,
            )
        return response

    async def _call(self, request: Any) -> Any:
        """The view's method for the request (Faust's dispatch without its sensors, so views
        run the same under a worker's Faust app and a reader's plain aiohttp one)."""
        method = self.methods[request.method.lower()]
        return await method(request, **(request.match_info or {}))

    def _admit(self, request: Any, guard: ApiGuard | None) -> None:
        """Let the request in (noting its :func:`client`), or raise the error that refuses it."""
        if guard is None:
            raise ApiError("internal_error", "the worker is still starting; retry shortly", 503)
        forwarded = request.headers.get(FORWARDED)
        if forwarded is not None:
            if not guard.is_peer(forwarded):
                raise ApiError("forbidden", f"{FORWARDED} is for requests between workers", 403)
            return
        try:
            named = guard.client(request.headers.get("Authorization"), request.method in self.write_methods)
        except Refused as refused:
            code = "unauthorized" if refused.status == 401 else "forbidden"
            raise ApiError(code, str(refused), refused.status, auth_challenge=refused.status == 401) from None
        request[_CLIENT] = client = named or f"addr:{request.remote}"
        over_limit(guard.requests.take(client, 1), "requests", guard.requests.rate)


#: Where a request keeps who is asking (the view instances serve every request).
_CLIENT = "blackroad.client"


def client(request: Any) -> str | None:
    """Who is asking: the API token's name or the client's address; None for a worker."""
    name: str | None = request.get(_CLIENT)
    return name


def over_limit(wait: float, what: str, rate: float) -> None:
    """Refuse with 429 when a client's bucket lacked what it asked for (``wait`` > 0)."""
    if wait > 0:
        raise ApiError(
            "rate_limited",
            f"over this worker's limit of {rate:g} {what} a second for each client; retry in {wait:.2f} s",
            429,
            details={"limit": what, "per_second": rate},
            retry_after=retry_after(wait),
        )


async def _wait_for_token(source: ViewSource, raw: str, view: str) -> None:
    """Return once ``source`` has applied the write the token names, or raise the 503."""
    token = parse_token(raw, source.settings.partitions)
    bound = source.settings.consistency_wait
    if not await source.wait_applied(token, view, bound):
        source.metrics.consistency_timeouts.inc()
        raise not_reached(token, bound)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "o"}


def agent_document(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "type": row["type"],
        "status": row["status"],
        "config": row["config"],
        "stats": {
            "tasks_completed": row["tasks_completed"],
            "tasks_failed": row["tasks_failed"],
            "tasks_dead": row["tasks_dead"],
            "avg_response_ms": round(row["avg_response_ms"], 3),
            "peak_concurrent_tasks": row["peak_concurrent_tasks"],
            "last_activity": row["last_activity"],
        },
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def cursor(request: Any, parameter: PatternQuery, parse: Callable[[str], Any]) -> str | None:
    """A page cursor query parameter (of its shape, then checked by ``parse``), or None."""
    raw = parameter.read(request.query)
    if raw is not None:
        try:
            parse(raw)
        except queries.BadCursor as exc:
            raise invalid(parameter.name, str(exc)) from None
    return raw


def search_result(hit: Hit, entry: dict[str, Any]) -> dict[str, Any]:
    """One search result as the API serves it: the entry's other fields are its ``metadata``."""
    metadata = describe(entry, entry.get("tier", hit.tier))
    return {
        "id": metadata.pop("id"),
        "key": metadata.pop("key"),
        "content": metadata.pop("content"),
        "score": round(hit.score, 6),
        "metadata": metadata,
    }


def register_views(app: Any, source: ViewSource) -> None:
    """Hook the views into ``app`` (a worker's Faust app or a reader's host, whichever has
    ``page`` and ``view_source``), reading through ``source``."""
    settings = source.settings
    metrics = source.metrics
    agents_rows = source.rows.agents
    tasks_rows = source.rows.tasks
    memory_rows = source.rows.memory
    entry_rows = source.rows.memory_entries
    retention_ms = int(settings.task_retention * 1000)
    peers = source.peer_urls
    partition_of = wire.Partitioner(settings.partitions)

    def owner_of(agent_id: str) -> URL | None:
        """The web URL of the worker owning the agent's partition, None if this process answers."""
        return source.owner_url(partition_of(agent_id.encode()))

    peers_client: PeerClient = source.peers

    def admitted_by() -> ApiGuard:
        guard: ApiGuard | None = source.guard
        assert guard is not None  # requests are admitted only once it is set
        return guard

    def forward_headers(request: Any = None) -> dict[str, str]:
        headers = {FORWARDED: admitted_by().peer_secret}
        if request is not None and (token := request.headers.get(TOKEN_HEADER)) is not None:
            headers[TOKEN_HEADER] = token  # the owner waits for its part of the write
        return headers

    async def fetch_raw(url: URL, path_qs: str, request: Any) -> tuple[int, bytes]:
        try:
            return await peers_client.get(url, path_qs, forward_headers(request))
        except PeerError as exc:
            raise ApiError("internal_error", f"worker {url} cannot be reached; retry shortly ({exc})", 503) from None

    async def fetch(url: URL, path: str, request: Any, query: dict[str, str] | None = None) -> tuple[int, Any]:
        status, body = await fetch_raw(url, str(URL(path).with_query(query or {})), request)
        return status, orjson.loads(body)

    async def forward(view: web.View, request: Any, url: URL) -> Any:
        status, body = await fetch_raw(url, request.path_qs, request)
        return view.bytes(body, content_type="application/json", status=status)

    async def to_upstream(view: web.View, request: Any) -> Any:
        """A reader passes what only workers answer (memory search and its index) to its worker,
        as the client asked it (the worker checks the client's token and limits)."""
        assert source.upstream is not None
        passed = ("Authorization", TOKEN_HEADER)  # not CURRENT_HEADER: the worker answers from the owner anyway
        headers = {name: request.headers[name] for name in passed if name in request.headers}
        try:
            if request.method == "POST":
                status, body = await peers_client.post(source.upstream, request.path, await request.read(), headers)
            else:
                status, body = await peers_client.get(source.upstream, request.path_qs, headers)
        except PeerError as exc:
            raise ApiError(
                "internal_error", f"worker {source.upstream} cannot be reached; retry shortly ({exc})", 503
            ) from None
        return view.bytes(body, content_type="application/json", status=status)

    def from_owner(request: Any) -> bool:
        """Whether a lookup asks for the owner's state (``X-Consistency: current``) on a reader,
        which then passes it to its worker; a worker always answers from the owner's tables."""
        asked = request.headers.get(CURRENT_HEADER)
        if asked is None:
            return False
        if asked != CURRENT:
            raise invalid(CURRENT_HEADER, f"{CURRENT_HEADER} must be {CURRENT!r} when given, got {asked[:40]!r}")
        return source.upstream is not None

    async def owner_answers(view: web.View, request: Any) -> Any:
        """A reader's lookup answered by its worker, from the owner's tables (not stale)."""
        response = await to_upstream(view, request)
        response.headers[STALENESS_HEADER] = "0"
        return response

    holds = Holds()

    async def refuse_if_blocked(request: Any) -> None:
        """A client refused for its task limit that asks again before its ``Retry-After`` is
        up waits it out first (:class:`Holds`), its body unread; it is refused if it cannot."""
        if (asking := client(request)) is not None:
            tasks = admitted_by().tasks
            wait = tasks.blocked(asking)
            if wait > 0 and await holds.hold(wait):
                wait = tasks.blocked(asking)
            over_limit(wait, "tasks", tasks.rate)

    def charge(request: Any, count: int) -> None:
        """Take ``count`` tasks from the asking client's bucket, or raise a 429."""
        if (asking := client(request)) is not None:
            tasks = admitted_by().tasks
            over_limit(tasks.take(asking, count), "tasks", tasks.rate)

    async def parse_charged_batch(request: Any) -> list[wire.TaskEvent]:
        """A batch's tasks, charged to the client before they are validated (a client over its
        limit costs no validation), and given back if they turn out invalid."""
        charged: list[int] = []

        def charge_batch(count: int) -> None:
            charge(request, count)
            charged.append(count)

        try:
            return await parse_batch(await read_json(request), charge_batch)
        except ApiError:
            if charged and (asking := client(request)) is not None:
                admitted_by().tasks.give_back(asking, charged[0])
            raise

    async def produce(request: Any, route: str, events: list[wire.TaskEvent]) -> dict[str, str]:
        """Put a request's tasks on the broker, in the request's trace (its ``traceparent``, or a
        new one), and return the response's headers: the write's consistency token and the
        trace (``traceresponse``). Raises a 503 naming the tasks that may not be there (see
        ``streams.serve.ingress``)."""
        ingress: IngressProducer | None = source.ingress
        if ingress is None:
            raise ApiError("internal_error", "the worker is still starting; retry shortly", 503)
        incoming = trace_context.parse(request.headers.get(wire.TRACEPARENT_HEADER))
        span = None if ingress.tracer is None else ingress.tracer.start_ingress(incoming, route, len(events))
        if span is not None:
            trace = span.traceparent
        elif incoming is not None:
            trace = incoming
        else:
            trace = trace_context.format_traceparent(trace_context.new_trace_id(), trace_context.new_span_id(), False)
        try:
            token = format_token(await ingress.send(events, trace))
        except BrokerUnavailable as exc:
            if span is not None:
                span.end(str(exc))
            # The domain's error codes have none for this; the status (503) and Retry-After say it.
            raise ApiError(
                "internal_error",
                f"{exc}; the tasks may still arrive: retry with the same task ids, which are counted once",
                503,
                details={"task_ids": exc.task_ids},
                retry_after=BROKER_RETRY_AFTER,
            ) from None
        if span is not None:
            span.end()
        return {TOKEN_HEADER: token, TRACERESPONSE: trace}

    async def from_history(read: Callable[[Any], Awaitable[T]]) -> T:
        """``read(conn)`` on a connection to the history database, its failures as API errors."""
        if not settings.history_enabled:
            raise ApiError("not_found", "the history is off (BLACKROAD_HISTORY=off)")
        try:
            pool = await source.history_pool()
            async with pool.acquire() as conn:
                return await read(conn)
        except HISTORY_ERRORS as exc:
            raise ApiError(
                "internal_error", f"the history database is unavailable: {type(exc).__name__}", 503
            ) from None

    agent_ids_in_order = SortedKeys(agents_rows)

    def first_agents(count: int, status: str | None) -> list[dict[str, Any]]:
        """The first ``count`` agent rows by id (of ``status`` only, if given)."""
        found: list[dict[str, Any]] = []
        for agent_id in agent_ids_in_order.get():
            if len(found) >= count:
                break
            row = agents_rows.get(agent_id)
            if row is not None and (not status or row["status"] == status):
                found.append(row)
        return found

    @app.page("/v1/agents")
    class AgentList(ApiView):
        name = "agents"

        async def get(self, request: Any) -> Any:
            limit = api.AGENTS_LIMIT.read(request.query)
            offset = api.AGENTS_OFFSET.read(request.query)
            status = api.AGENT_STATUS.read(request.query)
            include = api.AGENTS_INCLUDE.read(request.query)
            forwarded = FORWARDED in request.headers
            window = api.PEER_WINDOW.read(request.query) if forwarded and "window" in request.query else offset + limit
            matching = first_agents(window, status)
            if status:
                total = sum(1 for row in agents_rows.values() if row["status"] == status)
            else:
                total = len(agents_rows)
            if forwarded:
                return _json(self, {"agents": [agent_document(r) for r in matching], "total": total})
            docs = [agent_document(r) for r in matching]
            for peer in peers():
                query = {"window": str(offset + limit)}
                if status:
                    query["status"] = status
                code, body = await fetch(peer, "/v1/agents", request, query)
                if code == 200:
                    docs.extend(body["agents"])
                    total += body["total"]
            docs.sort(key=lambda d: d["id"])
            page = docs[offset : offset + limit]
            if include:
                ids = [doc["id"] for doc in page]
                recent = await from_history(lambda conn: queries.recent_tasks_of_agents(conn, ids, RECENT_TASKS))
                for doc in page:
                    doc["recent_tasks"] = recent.get(doc["id"], [])
            return _json(self, {"agents": page, "total": total, "limit": limit, "offset": offset})

    @app.page("/v1/agents/{agent_id}")
    class AgentDetail(ApiView):
        name = "agent"

        async def get(self, request: Any, agent_id: str) -> Any:
            api.AGENT_ID.check(agent_id)
            if from_owner(request):
                return await owner_answers(self, request)
            if FORWARDED not in request.headers and (owner := owner_of(agent_id)) is not None:
                return await forward(self, request, owner)
            row = agents_rows.get(agent_id)
            if row is None:
                raise ApiError("not_found", f"no agent {agent_id!r}", details={"agent_id": agent_id})
            return _json(self, agent_document(row))

    def memory_indexer(ready: bool = True) -> Any:
        """This worker's memory search indexer: 404 with memory search off, 503 (with ``ready``)
        until it has indexed every partition the worker owns."""
        if not settings.memory_search_enabled:
            raise ApiError("not_found", "memory search is off (BLACKROAD_MEMORY_SEARCH=off)")
        if ready and not source.memory_search_ready():
            raise ApiError("internal_error", "the worker is indexing its memory; retry shortly", 503)
        return source.indexer

    def beyond_working_memory(agent_id: str, tier: str, limit: int) -> dict[str, Any]:
        """An agent's entries of the episodic or semantic tier (found through the search index)."""
        found = memory_indexer().agent_entries(agent_id, tier)
        shown = [describe(entry, tier) for entry in found[-limit:]]
        return {"agent_id": agent_id, "tier": tier, "entries": shown, "total": len(found)}

    @app.page("/v1/agents/{agent_id}/memory")
    class AgentMemory(ApiView):
        name = "memory"

        async def get(self, request: Any, agent_id: str) -> Any:
            api.AGENT_ID.check(agent_id)
            tier = api.MEMORY_TIER.chosen(request.query)
            limit = api.MEMORY_LIMIT.read(request.query)
            if tier != "working" and source.upstream is not None:
                return await to_upstream(self, request)
            if from_owner(request):
                return await owner_answers(self, request)
            if FORWARDED not in request.headers and (owner := owner_of(agent_id)) is not None:
                return await forward(self, request, owner)
            if tier != "working":
                return _json(self, beyond_working_memory(agent_id, tier, limit))
            row = thaw(memory_rows.get(agent_id))
            if row is None:
                raise ApiError("not_found", f"no memory for agent {agent_id!r}", details={"agent_id": agent_id})
            return _json(
                self,
                {
                    "agent_id": agent_id,
                    "tier": "working",
                    "entries": [describe(entry, "working") for entry in entries(row)],
                    "tiers": tier_counts(row),
                    "tokens": row["tokens"],
                    "written": row["written"],
                    "head": row["head"],
                },
            )

    @app.page("/v1/agents/{agent_id}/memory/verify")
    class AgentMemoryVerify(ApiView):
        """Walks the agent's memory chain from its head back to GENESIS, through working memory
        and the entries that left it (the ``memory_entries`` table), then, with the history on,
        through its copy in PostgreSQL too (answered by the agent's owner)."""

        name = "memory_verify"

        async def get(self, request: Any, agent_id: str) -> Any:
            api.AGENT_ID.check(agent_id)
            if from_owner(request):
                return await owner_answers(self, request)
            if FORWARDED not in request.headers and (owner := owner_of(agent_id)) is not None:
                return await forward(self, request, owner)
            row = thaw(memory_rows.get(agent_id))
            if row is None:
                raise ApiError("not_found", f"no memory for agent {agent_id!r}", details={"agent_id": agent_id})
            memory = {**row, "agent_id": agent_id}
            broken: list[str] = []
            stored = entry_rows.get
            on_chain, _ = walk_chain(memory, lambda digest: thaw(stored(entry_id(digest))), "the tables", broken)
            walked = len(on_chain)
            if settings.history_enabled:
                archived = await from_history(lambda conn: queries.archived_memory(conn, [agent_id]))
                compare_memory(memory, archived[agent_id], broken)
            document = {
                "agent_id": agent_id,
                "valid": not broken,
                "head": row["head"],
                "written": row["written"],
                "verified": walked,
                "first_broken": broken[0] if broken else None,
                "problems": broken,
            }
            return _json(self, document)

    async def search_peer(url: URL, body: bytes) -> tuple[int, Any]:
        try:
            status, answer = await peers_client.post(url, "/v1/memory/search", body, forward_headers())
        except PeerError as exc:
            raise ApiError("internal_error", f"worker {url} cannot be reached; retry shortly ({exc})", 503) from None
        return status, orjson.loads(answer)

    def search_here(search: MemorySearch) -> list[dict[str, Any]]:
        """This worker's best matches (its own partitions' entries)."""
        indexer = memory_indexer()
        threshold = indexer.embedder.default_threshold if search.threshold is None else search.threshold
        befores: dict[str, int] = {}
        return [
            search_result(hit, entry)
            for hit in indexer.index.search(search.vector, search.limit, threshold, **search.filters)
            if (entry := indexer.entry(hit, befores)) is not None
        ]

    def record_accesses(results: list[dict[str, Any]]) -> None:
        """The entries a client's search returned count as accessed (see ``streams.memory_search.accesses``)."""
        recorder = source.accesses
        if recorder is not None and results:
            recorder.record(results)

    @app.page("/v1/memory/search")
    class MemorySearchView(ApiView):
        """Memory entries by similarity to a text: with an agent filter, answered by the agent's
        owner; without, by every worker, merged by score (any worker gives the same answer)."""

        name = "memory_search"

        async def post(self, request: Any) -> Any:
            if source.upstream is not None:
                return await to_upstream(self, request)
            raw = await read_json(request)
            search = parse_search(raw)
            agent_id = search.filters.get("agent_id")
            forwarded = FORWARDED in request.headers
            if not forwarded and agent_id is not None and (owner := owner_of(agent_id)) is not None:
                status, answer = await search_peer(owner, orjson.dumps(raw))
                if status == 200:
                    record_accesses(answer["results"])
                return _json(self, answer, status)
            indexer = memory_indexer(ready=False)
            asking = [] if forwarded or agent_id is not None else peers()
            body = orjson.dumps(raw)
            # The other workers search while this one does.
            answers = [asyncio.ensure_future(search_peer(peer, body)) for peer in asking]
            if answers:
                await asyncio.sleep(0)  # their requests are written before this worker computes
            try:
                search.vector = await indexer.embed_query(search.query)
                results = search_here(search)
            except BaseException:
                for answer in answers:
                    answer.cancel()
                raise
            if answers:
                for status, answer in await asyncio.gather(*answers):
                    if status != 200:
                        return _json(self, answer, status)
                    results.extend(answer["results"])
                results.sort(key=lambda result: (-result["score"], result["id"]))
                del results[search.limit :]
            if not forwarded:
                record_accesses(results)
            return _json(self, {"results": results, "total": len(results), "model": indexer.embedder.name})

    @app.page("/v1/memory/stats")
    class MemoryStats(ApiView):
        """Entries per tier, the index's size and the embedding counts, of every worker (summed)
        and of each (``workers``, by web URL)."""

        name = "memory_stats"

        async def get(self, request: Any) -> Any:
            if source.upstream is not None:
                return await to_upstream(self, request)
            recorder = source.accesses
            own = {
                **memory_indexer(ready=False).stats(),
                **(recorder.stats() if recorder is not None else {}),
                "ready": source.memory_search_ready(),
            }
            if FORWARDED in request.headers:
                return _json(self, own)
            workers = {settings.web_url: own}
            for peer in peers():
                status, body = await fetch(peer, "/v1/memory/stats", request)
                if status != 200:
                    raise ApiError("internal_error", f"worker {peer} answered {status}; retry shortly", 503)
                workers[str(peer)] = body
            totals = {tier: sum(w["entries"][tier] for w in workers.values()) for tier in TIERS}
            document = {
                "entries": totals,
                "total": sum(totals.values()),
                "index_bytes": sum(w["index_bytes"] for w in workers.values()),
                "embedded": sum(w["embedded"] for w in workers.values()),
                "embedding_cache_hits": sum(w["embedding_cache_hits"] for w in workers.values()),
                "vectors_reused": sum(w["vectors_reused"] for w in workers.values()),
                "vectors_stored": sum(w["vectors_stored"] for w in workers.values()),
                "accesses_recorded": sum(w.get("accesses_recorded", 0) for w in workers.values()),
                "accesses_dropped": sum(w.get("accesses_dropped", 0) for w in workers.values()),
                "model": own["model"],
                "ready": all(w["ready"] for w in workers.values()),
                "workers": workers,
            }
            return _json(self, document)

    @app.page("/v1/agents/{agent_id}/tasks")
    class AgentTaskHistory(ApiView):
        """The agent's tasks from the history in PostgreSQL, newest first (any worker answers)."""

        name = "agent_tasks"
        reads_tables = False

        async def get(self, request: Any, agent_id: str) -> Any:
            api.AGENT_ID.check(agent_id)
            limit = api.TASKS_LIMIT.read(request.query)
            status = api.TASK_STATUS.read(request.query)
            before = cursor(request, api.BEFORE, queries.parse_cursor)
            tasks, next_before = await from_history(
                lambda conn: queries.agent_tasks(conn, agent_id, status, before, limit)
            )
            return _json(self, {"agent_id": agent_id, "tasks": tasks, "limit": limit, "next_before": next_before})

    @app.page("/v1/tasks/{task_id}")
    class TaskDetail(ApiView):
        name = "task"

        async def get(self, request: Any, task_id: str) -> Any:
            api.TASK_ID.check(task_id)
            if from_owner(request):
                return await owner_answers(self, request)
            row = tasks_rows.get(task_id)
            if row is not None and not task_expired(row, wire.now_ms() - retention_ms):
                return _json(self, _public(thaw(row)))
            if FORWARDED not in request.headers:
                for peer in peers():
                    code, body = await fetch(peer, request.path, request)
                    if code == 200:
                        return _json(self, body)
                # No worker holds it live (it finished longer ago than the retention): the history.
                if settings.history_enabled and (task := await from_history(lambda c: queries.task_by_id(c, task_id))):
                    return _json(self, task)
            raise ApiError("not_found", f"no task {task_id!r}", details={"task_id": task_id})

    @app.page("/v1/tasks")
    class Tasks(ApiView):
        """``POST``: a new task. ``GET``: the history's tasks from ``since`` on, oldest first."""

        name = "tasks"
        write_methods = frozenset({"POST"})

        async def get(self, request: Any) -> Any:
            limit = api.TASKS_LIMIT.read(request.query)
            status = api.TASK_STATUS.read(request.query)
            since = cursor(request, api.SINCE, queries.parse_since)
            tasks, next_since = await from_history(lambda conn: queries.task_feed(conn, status, since, limit))
            return _json(self, {"tasks": tasks, "limit": limit, "next_since": next_since})

        async def post(self, request: Any) -> Any:
            await refuse_if_blocked(request)
            event = parse_task_request(await read_json(request))
            charge(request, 1)
            headers = await produce(request, "/v1/tasks", [event])
            document = {"id": event.task_id, "status": "queued", "consistency_token": headers[TOKEN_HEADER]}
            return _json(self, document, 202, headers)

    @app.page("/v1/batch")
    class Batch(ApiView):
        name = "batch"
        write_methods = frozenset({"POST"})

        async def post(self, request: Any) -> Any:
            await refuse_if_blocked(request)
            events = await parse_charged_batch(request)
            headers = await produce(request, "/v1/batch", events)
            results = [{"id": e.task_id, "status": "queued"} for e in events]
            document = {"results": results, "consistency_token": headers[TOKEN_HEADER]}
            return _json(self, document, 202, headers)

    @app.page("/healthz")
    class Alive(ApiView):
        """The process serves HTTP (for liveness probes: no token, no limit)."""

        name = "healthz"
        reads_tables = False
        open_to_all = True

        async def get(self, request: Any) -> Any:
            return _json(self, {"status": "alive"})

    @app.page("/readyz")
    class Ready(ApiView):
        """The worker has started, its tables are recovered and the broker answers (for
        readiness probes: 200, else 503 naming what is not ready)."""

        name = "readyz"
        reads_tables = False
        open_to_all = True

        async def get(self, request: Any) -> Any:
            ingress: IngressProducer | None = source.ingress
            checks = {
                "started": ingress is not None and source.guard is not None,
                "tables": source.tables_ready(),
                "broker": ingress is not None and await ingress.broker_answers(),
            }
            ready = all(checks.values())
            headers = None if ready else {"Retry-After": str(RETRY_AFTER)}
            return _json(
                self, {"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503, headers
            )

    @app.page("/v1/stats")
    class Stats(ApiView):
        name = "stats"

        async def get(self, request: Any) -> Any:
            return _json(
                self, {**source.stats_snapshot(TOKEN_HEADER in request.headers), "served_by": source.staleness()}
            )

    contract = orjson.dumps(build_document(package_version()))

    @app.page("/openapi.json")
    class OpenApi(ApiView):
        """The API's OpenAPI 3.1 document (``streams.serve.openapi``): open to anyone."""

        name = "openapi"
        reads_tables = False
        open_to_all = True

        async def get(self, request: Any) -> Any:
            return self.bytes(contract, content_type="application/json")

    @app.page("/metrics")
    class PrometheusMetrics(ApiView):
        name = "metrics"
        reads_tables = False

        async def get(self, request: Any) -> Any:
            return self.bytes(metrics.render(), content_type="text/plain; version=0.0.4")
