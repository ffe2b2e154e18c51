"""The spans of a task's way through the project, exported over OTLP/HTTP to a collector.

Every traced task gets four spans in the trace its request started (or came with):

* ``ingress`` (``POST /v1/tasks`` or ``POST /v1/batch``): from the request until the broker
  acknowledged its tasks; the records carry this span as their parent, so the others are
  its children;
* ``queue``: from the record's timestamp (when it was sent) until the handler started;
* ``handler``: the attempt itself (a retried task has one per attempt);
* ``table write``: from the handler's end until the flush holding the task's row is
  acknowledged by the broker (committed, under exactly-once).

The worker records the last three after the fact, with the times it kept, once the flush
is acknowledged: nothing is added to a task's way while it runs. Spans are batched and sent
by the OpenTelemetry SDK from its own thread. A trace whose traceparent says it is not
sampled gets no spans (the SDK's parent-based sampler). Without ``BLACKROAD_OTLP_ENDPOINT``
nothing here is imported or built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from schemas import trace_context
from streams.runtime.settings import Settings

log = logging.getLogger(__name__)

#: Seconds a stopping worker waits for its last spans to reach the collector.
SHUTDOWN_WAIT = 1.5
#: Seconds one export request may take.
EXPORT_TIMEOUT = 2.0


class TracedTask(Protocol):
    """What the spans of a finished task are built from (the processor's ``Item``)."""

    partition: int
    offset: int
    queued_ms: int
    started_ms: int
    event: Any
    outcome: Any


class IngressSpan:
    """An open ``ingress`` span; :attr:`traceparent` is what the request's records carry."""

    def __init__(self, span: Any, traceparent: str) -> None:
        self._span = span
        self.traceparent = traceparent

    def end(self, error: str | None = None) -> None:
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()


def tracer_for(settings: Settings, instance: str) -> TaskTracer | None:
    """The process's tracer: None without ``BLACKROAD_OTLP_ENDPOINT`` (then the SDK is never imported)."""
    return None if settings.otlp_endpoint is None else TaskTracer(settings.otlp_endpoint, instance)


class TaskTracer:
    """Builds and exports the spans; one per process, shut down when the process stops."""

    def __init__(self, endpoint: str, instance: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": "blackroad-streams", "service.instance.id": instance})
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=EXPORT_TIMEOUT)
        self._provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self._tracer = self._provider.get_tracer("blackroad-streams")

    def start_ingress(self, incoming: str | None, route: str, tasks: int) -> IngressSpan:
        """Open the ``ingress`` span of a request, a child of ``incoming`` (its traceparent) if any."""
        from opentelemetry.trace import SpanKind

        span = self._tracer.start_span(
            f"POST {route}",
            context=None if incoming is None else _parent(incoming),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route, "blackroad.tasks": tasks},
        )
        context = span.get_span_context()
        traceparent = trace_context.format_traceparent(
            f"{context.trace_id:032x}", f"{context.span_id:016x}", context.trace_flags.sampled
        )
        return IngressSpan(span, traceparent)

    def tasks_written(self, tasks: Iterable[TracedTask], written_ns: int) -> None:
        """Record the ``queue``, ``handler`` and ``table write`` spans of ``tasks``, whose rows
        the broker acknowledged at ``written_ns``."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        start = self._tracer.start_span
        for task in tasks:
            outcome = task.outcome
            if outcome is None or not task.started_ms:
                continue  # not run in this batch (a copy of a task already done)
            event = task.event
            context = _parent(event.trace)
            attributes = {
                "blackroad.task.id": event.task_id,
                "blackroad.agent.id": event.agent_id,
                "blackroad.task.kind": event.kind,
                "blackroad.task.attempt": event.attempt,
            }
            started_ns = task.started_ms * 1_000_000
            queued_ns = min(task.queued_ms * 1_000_000, started_ns)
            queue = start(
                "queue",
                context=context,
                kind=SpanKind.CONSUMER,
                start_time=queued_ns,
                attributes={
                    **attributes,
                    "messaging.system": "kafka",
                    "messaging.destination.partition.id": str(task.partition),
                    "messaging.kafka.offset": task.offset,
                },
            )
            queue.end(end_time=started_ns)
            handled_ns = started_ns + int(outcome.handler_ms * 1_000_000)
            handler = start(
                "handler",
                context=context,
                start_time=started_ns,
                attributes={**attributes, "blackroad.task.status": outcome.status},
            )
            if outcome.status not in ("completed", "queued"):
                handler.set_status(Status(StatusCode.ERROR, outcome.error or outcome.status))
            handler.end(end_time=handled_ns)
            finished_ns = max(handled_ns, outcome.finished_ms * 1_000_000)
            write = start("table write", context=context, start_time=finished_ns, attributes=attributes)
            write.end(end_time=max(finished_ns, written_ns))

    async def shutdown(self) -> None:
        """Send the spans still queued (for at most :data:`SHUTDOWN_WAIT` seconds) and stop.

        The SDK's shutdown blocks while it exports, so it runs in a daemon thread of its own:
        a collector that does not answer must not hold up the process's exit.
        """
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def shut_down() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed after the wait gave up
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=shut_down, name="span-exporter-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), SHUTDOWN_WAIT)
        except TimeoutError:
            log.warning("the trace collector did not take the last spans within %gs; they are dropped", SHUTDOWN_WAIT)


def _parent(traceparent: str) -> Any:
    """An OpenTelemetry context whose (remote) parent span is the one ``traceparent`` names."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

    parent = SpanContext(
        trace_id=int(trace_context.trace_id(traceparent), 16),
        span_id=int(trace_context.parent_span_id(traceparent), 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if trace_context.sampled(traceparent) else TraceFlags.DEFAULT),
    )
    return set_span_in_context(NonRecordingSpan(parent))
