"""Pure logic: what a task event may carry so that every view can serve it as JSON."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson
import pytest

from schemas import wire
from schemas.wire import WireError
from tests.factories import nested, task

#: The last millisecond of the year 9999.
YEAR_9999_MS = 253_402_300_799_999


def _raw(**change: Any) -> bytes:
    return msgpack.packb({**task("agent_alice_001").to_wire(), **change}, use_bin_type=True)


def test_everything_json_can_say_is_accepted_up_to_the_limits_and_nothing_past_them() -> None:
    payload = {
        "text": "ünïcode ✓",
        "numbers": [0, -1, 1.5, -(2**63), 2**64 - 1, float("inf")],
        "flags": [True, False, None],
        "empty": [{}, []],
        "deep": nested(wire.MAX_DEPTH - 1),
    }
    raw = _raw(
        payload=payload,
        metadata=nested(wire.MAX_DEPTH),
        agent_id="agent_" + "a" * (wire.MAX_AGENT_ID - 10) + "_001",
        ts=wire.MAX_TIME_MS,
        deadline=wire.MAX_TIME_MS,
    )
    event = wire.decode_task(raw)
    assert event.payload == payload and len(event.agent_id) == wire.MAX_AGENT_ID
    assert wire.MAX_TIME_MS == YEAR_9999_MS
    # As the task view serves it: the task around the payload is one more level.
    orjson.dumps({"task": {"payload": event.payload, "metadata": event.metadata}})
    assert wire.decode_task(_raw(ts=0, deadline=0)).created_ms == 0
    # One past each limit is refused.
    for change in (
        {"payload": {"deep": nested(wire.MAX_DEPTH)}},
        {"agent_id": "agent_" + "a" * (wire.MAX_AGENT_ID - 9) + "_001"},
        {"ts": wire.MAX_TIME_MS + 1},
        {"deadline": wire.MAX_TIME_MS + 1},
    ):
        with pytest.raises(WireError):
            wire.decode_task(_raw(**change))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"payload": {"input": msgpack.ExtType(5, b"x")}}, r"payload\['input'\]: a msgpack ext type \(code 5\)"),
        ({"payload": {"at": msgpack.Timestamp(1, 0)}}, r"payload\['at'\]: a msgpack timestamp"),
        ({"payload": {"input": [b"\x00"]}}, r"payload\['input'\]\[0\]: binary data \(msgpack bin\)"),
        ({"payload": {b"key": 1}}, r"payload: a map key is binary data"),
        ({"payload": nested(600)}, f"payload.*: nested deeper than {wire.MAX_DEPTH} levels"),
        ({"payload": nested(wire.MAX_DEPTH + 1)}, "payload.*: nested deeper than"),
        ({"metadata": {"trace": msgpack.ExtType(1, b"")}}, r"metadata\['trace'\]: a msgpack ext type"),
        ({"metadata": nested(wire.MAX_DEPTH + 1)}, "metadata.*: nested deeper than"),
        ({"agent_id": "agent_a_001\n"}, "agent_id must look like"),
        ({"agent_id": "agent_" + "a" * 5000 + "_001"}, "agent_id must look like .*at most 128 characters"),
        ({"task_id": "task_x1\n"}, "task_id must look like"),
        ({"ts": 2**64 - 1}, "ts must be milliseconds since the epoch"),
        ({"deadline": 2**64 - 1}, "deadline must be"),
        ({"deadline": -1}, "deadline must be"),
    ],
)
def test_what_a_view_could_not_serve_is_refused_with_the_reason(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        wire.decode_task(_raw(**change))


def test_a_reason_shows_a_long_value_cut_short() -> None:
    with pytest.raises(WireError) as refused:
        wire.decode_task(_raw(agent_id="agent_" + "a" * 5000 + "_001"))
    assert len(str(refused.value)) < 300


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": [1, {"b": b"x"}]}, "['a'][1]['b']: binary data (msgpack bin) has no JSON form"),
        ([1, 2, {3: "three"}], "[2]: a map key is a value of type int, not a string"),
        ({"n": 2**64}, "['n']: the integer 18446744073709551616 is outside 64 bits"),
        ({"n": -(2**63) - 1}, "['n']: the integer -9223372036854775809 is outside 64 bits"),
        ({"s": {1, 2}}, "['s']: a value of type set has no JSON form"),
        ({"t": (1, 2)}, "['t']: a value of type tuple has no JSON form"),
        ({"ok": [1, "a", None, True, 1.0, {"b": []}]}, None),
        ("plain", None),
        (None, None),
    ],
)
def test_json_problem_says_what_and_where(value: Any, problem: str | None) -> None:
    assert wire.json_problem(value) == problem


def test_json_problem_counts_the_levels_of_maps_and_lists() -> None:
    assert wire.json_problem(nested(wire.MAX_DEPTH)) is None
    assert wire.json_problem([nested(wire.MAX_DEPTH - 1)]) is None
    problem = wire.json_problem(nested(wire.MAX_DEPTH + 1))
    assert problem is not None and problem.endswith(f": nested deeper than {wire.MAX_DEPTH} levels")
    # The search stops at the limit: far deeper values are refused as quickly.
    assert wire.json_problem(nested(100_001)) == problem


def test_a_bad_payload_in_a_batch_refuses_only_its_task() -> None:
    columns = {
        "task_id": ["task_a1", "task_a2", "task_a3"],
        "agent_id": ["agent_a_001"] * 3,
        "kind": ["coordination"] * 3,
        "payload": [{}, {"blob": b"\x01"}, None],
        "metadata": [None, None, {"when": msgpack.ExtType(3, b"")}],
    }
    value = msgpack.packb({"v": 1, "type": "task.batch", "ts": 5, "columns": columns}, use_bin_type=True)
    decoded, refused = wire.decode_tasks(value)
    assert [e.task_id for e in decoded] == ["task_a1"]
    assert refused[0].startswith("tasks[1]: payload['blob']: binary data")
    assert refused[1].startswith("tasks[2]: metadata['when']: a msgpack ext type (code 3)")


def test_a_task_retry_event_carries_the_task_and_the_attempt_it_asks_for() -> None:
    event = task("agent_retry_001", "inference", {"fail_attempts": 1})
    raw = wire.task_retry(event, 2, 1_700_000_000_000)
    [decoded], refused, access = wire.decode_record(raw)
    assert (refused, access) == ([], None)
    assert (decoded.task_id, decoded.payload, decoded.attempt) == (event.task_id, event.payload, 2)
    assert wire.retry_due_ms(raw) == 1_700_000_000_000
    assert wire.decode_record(wire.encode_task(event))[0][0].attempt == 1
    for attempt in (1, 0, 101, "2"):
        bad = msgpack.unpackb(raw)
        bad["attempt"] = attempt
        with pytest.raises(wire.WireError, match="'attempt' must be 2 to 100"):
            wire.decode_record(msgpack.packb(bad))
    with pytest.raises(wire.WireError, match=r"not a task\.retry"):
        wire.retry_due_ms(wire.encode_task(event))
