"""The Quix Streams baseline: the same job with RocksDB state and at-least-once delivery.

Quix state is kept per message key (the agent), so the task status and the agent's
counter live in the agent's state; the global stats counter is a process-local dict.

Usage: python benchmarks/quix_app.py BOOTSTRAP TOPIC EXPECTED STATE_DIR
"""

from __future__ import annotations

import sys
from typing import Any

import msgpack
from quixstreams import Application
from quixstreams.models import Deserializer

from benchmarks.report import Tally, emit


class MsgpackDeserializer(Deserializer):
    def __call__(self, value: bytes, ctx: Any) -> Any:
        return msgpack.unpackb(value)


def main(bootstrap: str, topic_name: str, expected: int, state_dir: str) -> None:
    app = Application(
        broker_address=bootstrap,
        consumer_group="bench-quix",
        auto_offset_reset="earliest",
        state_dir=state_dir,
        processing_guarantee="at-least-once",
        loglevel="WARNING",
        # Same group timing as the other contenders (the embedded broker holds a join
        # for half the session timeout) and the same short fetch wait.
        consumer_extra_config={"fetch.wait.max.ms": 10, "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
    )
    topic = app.topic(topic_name, value_deserializer=MsgpackDeserializer())
    tally = Tally(expected)
    stats = {"completed": 0}

    def process(event: dict[str, Any], state: Any) -> None:
        state.set("task:" + event["task_id"], "completed")
        state.set("count", state.get("count", 0) + 1)
        stats["completed"] += 1
        tally.done_one(event["ts"])

    sdf = app.dataframe(topic)
    sdf.update(process, stateful=True)
    emit({"event": "ready"})
    app.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
