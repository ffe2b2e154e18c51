"""The naive baseline: a plain faust-streaming app written the way the Faust docs teach.

One agent iterates the stream event by event and does the job's three table writes per
task (task status by task id, the agent's counter, the global stats counter).

Usage: python benchmarks/naive_faust.py BOOTSTRAP TOPIC EXPECTED WEB_PORT DATA_DIR
"""

from __future__ import annotations

import sys

import faust
import msgpack

from benchmarks.report import Tally, emit


def build(bootstrap: str, topic_name: str, expected: int, web_port: int, data_dir: str) -> faust.App:
    app = faust.App(
        "bench-naive-faust",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        topic_partitions=4,
        web_port=web_port,
        datadir=data_dir,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
    )
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw")
    tasks = app.Table("tasks", default=str)
    agents = app.Table("agents", default=int)
    stats = app.Table("stats", default=int)
    tally = Tally(expected)

    @app.agent(topic)
    async def process(stream: faust.StreamT) -> None:
        async for value in stream:
            event = msgpack.unpackb(value)
            tasks[event["task_id"]] = "completed"
            agents[event["agent_id"]] += 1
            stats["completed"] += 1
            tally.done_one(event["ts"])

    @app.task
    async def ready() -> None:
        emit({"event": "ready"})

    return app


if __name__ == "__main__":
    bootstrap, topic_name, expected, web_port, data_dir = sys.argv[1:6]
    application = build(bootstrap, topic_name, int(expected), int(web_port), data_dir)
    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    application.main()
