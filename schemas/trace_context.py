"""W3C Trace Context: the ``traceparent`` a task carries from its request to its row.

A traceparent is ``<version>-<trace id>-<parent span id>-<flags>`` in lowercase hex, e.g.
``00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01``: the trace the task belongs
to, the span that sent it on, and whether that trace is being recorded (flag bit 0,
"sampled"). All-zero ids and version ``ff`` are invalid; a later version may add fields
after the flags, which are ignored (https://www.w3.org/TR/trace-context/).

A task's trace never decides whether it runs: a traceparent that does not parse is
treated as absent.
"""

from __future__ import annotations

import os
import re

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
#: Longest header value read (the version-00 form is 55 characters).
_MAX_LENGTH = 512


def parse(value: object) -> str | None:
    """``value`` as a version-00 traceparent if it is a valid one (of any version), else None."""
    if type(value) is not str or len(value) > _MAX_LENGTH:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    return f"00-{trace}-{span}-{flags}"


def trace_id(traceparent: str) -> str:
    """The 32-hex-digit trace id of a parsed traceparent."""
    return traceparent[3:35]


def parent_span_id(traceparent: str) -> str:
    """The 16-hex-digit id of the span that sent the task on."""
    return traceparent[36:52]


def sampled(traceparent: str) -> bool:
    """Whether the trace is being recorded (the sampled flag)."""
    return bool(int(traceparent[53:55], 16) & 1)


def new_trace_id() -> str:
    while (trace := os.urandom(16).hex()) == _ZERO_TRACE:
        pass
    return trace


def new_span_id() -> str:
    while (span := os.urandom(8).hex()) == _ZERO_SPAN:
        pass
    return span


def format_traceparent(trace: str, span: str, is_sampled: bool) -> str:
    return f"00-{trace}-{span}-{'01' if is_sampled else '00'}"
