"""Read-your-writes: the consistency token a write returns and a read may carry.

``POST /v1/tasks`` and ``POST /v1/batch`` answer with a token naming, for each partition of
the tasks topic the request wrote to, the offset of its last record there:
``p<partition>:<offset>`` joined by ``.``, e.g. ``p1:1234.p3:77``. A GET that carries it (the
``X-Consistency-Token`` header) is answered only once the serving process has applied those
offsets' effects to the tables it reads, or with 503 after ``BLACKROAD_CONSISTENCY_WAIT``
seconds: never from an older state (docs/read-replicas.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from streams.serve.errors import ApiError

#: The request header a read carries its token in, and the response header a write returns it in.
TOKEN_HEADER = "X-Consistency-Token"  # noqa: S105 - a header name
#: How far behind the stream the process answering was (docs/read-replicas.md).
STALENESS_HEADER = "X-Staleness-Ms"
#: ``X-Consistency: current`` on a lookup (an agent, its memory, a task) asks for the owner's
#: state: a reader passes it to its worker, which answers from the owner's tables.
CURRENT_HEADER = "X-Consistency"
CURRENT = "current"
#: A token: one or more ``p<partition>:<offset>`` joined by dots.
TOKEN_PATTERN = r"^p[0-9]{1,4}:[0-9]{1,19}(\.p[0-9]{1,4}:[0-9]{1,19}){0,1023}$"  # noqa: S105 - a shape
_TOKEN = re.compile(TOKEN_PATTERN)
#: Seconds a client should wait before asking again after a token was not reached in time.
RETRY_AFTER = 1

#: What a token names: the offset each partition of the tasks topic must have been applied up to.
Token = dict[int, int]


def format_token(reached: Mapping[int, int]) -> str:
    """The token of a write that reached ``reached`` (partition -> offset of its last record)."""
    return ".".join(f"p{partition}:{offset}" for partition, offset in sorted(reached.items()))


def parse_token(raw: str, partitions: int) -> Token:
    """The partitions and offsets of a token, or a 400 naming what is wrong with it."""
    if not _TOKEN.match(raw):
        raise ApiError(
            "invalid_request",
            f"{TOKEN_HEADER} must look like p1:1234.p3:77 (as POST /v1/tasks returns it)",
            details={"header": TOKEN_HEADER},
        )
    token: Token = {}
    for part in raw.split("."):
        partition, offset = part[1:].split(":")
        number = int(partition)
        if number >= partitions:
            raise ApiError(
                "invalid_request",
                f"{TOKEN_HEADER} names partition {number}; the tasks topic has {partitions}",
                details={"header": TOKEN_HEADER},
            )
        token[number] = max(token.get(number, -1), int(offset))
    return token


def not_reached(token: Token, waited: float) -> ApiError:
    """The 503 of a read whose token was not applied within the bound."""
    return ApiError(
        "internal_error",
        f"this process has not yet applied the write the {TOKEN_HEADER} names (waited {waited:g} s); retry shortly",
        503,
        details={"consistency_token": format_token(token)},
        retry_after=RETRY_AFTER,
    )
