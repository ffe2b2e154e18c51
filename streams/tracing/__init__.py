"""A task traced end to end: W3C trace context from the request to the row, spans over OTLP.

See docs/tracing.md: :mod:`streams.tracing.spans` records the spans (only with
``BLACKROAD_OTLP_ENDPOINT`` set); the trace context itself is :mod:`schemas.trace_context`.
"""
