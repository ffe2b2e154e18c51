"""Operating a deployment: ``blackroad dlq list|show|replay`` against a real broker."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading

import msgpack
import orjson

from tests.factories import record, task
from tests.harness import ROOT, Deployment, produce, wait_until


def _blackroad(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        cwd=ROOT,
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dead_letters_are_listed_shown_and_replayed_once_their_cause_is_fixed(deployment: Deployment) -> None:
    deployment.env.update(BLACKROAD_MAX_ATTEMPTS="2", BLACKROAD_MEMORY_SEARCH="off")
    worker = deployment.worker().start().wait_ready()
    agent = "agent_letters_001"
    failing = task(agent, "inference", {"fail_attempts": 3, "latency_ms": 0})  # dies after 2 attempts
    good, bad = task("agent_letters_002").to_wire(), {"task_id": "nope"}
    batch = msgpack.packb({"v": 1, "type": "task.batch", "ts": 5, "tasks": [good, bad]})
    produce(
        deployment.bootstrap,
        deployment.topic("tasks"),
        [record(failing), (agent.encode(), b"\xc1"), (b"agent_letters_002", batch)],
    )
    letters = {"dead_tasks": 1, "dead_lettered_events": 3}
    wait_until(lambda: {k: worker.stats()[k] for k in letters} == letters, 30, what=f"the stats to show {letters}")
    listed = _blackroad(deployment, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[-1] == "3 dead letter(s)" and len(lines) == 4, listed.stdout
    refs = {line.split()[0]: line for line in lines[:-1]}
    [dead] = [ref for ref, line in refs.items() if "handler failed after 2 attempts" in line]
    [undecodable] = [ref for ref, line in refs.items() if "not msgpack" in line]
    [refused] = [ref for ref, line in refs.items() if "tasks[1]:" in line]
    filtered = _blackroad(deployment, "dlq", "list", "--reason", "not msgpack")
    assert filtered.stdout.splitlines()[-1] == "1 dead letter(s) whose reason contains 'not msgpack'"
    shown = _blackroad(deployment, "dlq", "show", dead)
    assert shown.returncode == 0, shown.stderr
    letter = orjson.loads(shown.stdout)
    assert letter["reason"].startswith("handler failed") and letter["key"] == agent
    assert letter["value"]["task_id"] == failing.task_id and letter["source"]["topic"] == deployment.topic("tasks")
    assert _blackroad(deployment, "dlq", "show", "9:999999").returncode == 1
    # The cause is fixed (more attempts allowed); the dead task runs again under a new id,
    # the undecodable record and the batch's refused task are left alone.
    worker.stop()
    deployment.env["BLACKROAD_MAX_ATTEMPTS"] = "5"
    worker = deployment.worker().start().wait_ready()
    replayed = _blackroad(deployment, "dlq", "replay", undecodable, refused, "--reason", "handler failed")
    assert replayed.returncode == 0, replayed.stderr
    out = replayed.stdout
    assert f"{dead}: sent back" in out and f"{undecodable}: skipped, still not a valid event" in out
    assert f"{refused}: skipped, a task.batch with refused tasks" in out
    assert out.splitlines()[-1] == f"1 of 3 chosen dead letter(s) sent back to {deployment.topic('tasks')}"
    row = wait_until(
        lambda: (a := worker.get(f"/v1/agents/{agent}")[1]).get("stats", {}).get("tasks_completed") and a, 30
    )
    assert (row["stats"]["tasks_completed"], row["stats"]["tasks_dead"]) == (1, 1)
    assert worker.stats()["dead_lettered_events"] == 3  # nothing new refused or dead


def test_workers_run_handler_plug_ins_and_refuse_one_that_cannot_load(deployment: Deployment) -> None:
    refused = _blackroad(deployment, "worker", "--handlers", "tests.plugin_handlers:broken")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "handler plug-in: tests.plugin_handlers:broken failed to register its handlers" in refused.stderr
    deployment.env.update(BLACKROAD_HANDLERS="tests.plugin_handlers:register", BLACKROAD_MEMORY_SEARCH="off")
    worker = deployment.worker().start().wait_ready()
    analysis = task("agent_plugin_001", "code_analysis", {"code": "print(1)"})
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(analysis)])
    done = wait_until(lambda: (t := worker.get(f"/v1/tasks/{analysis.task_id}")[1]).get("result") and t, 30)
    assert done["result"] == {"plugin": "shout", "code": "PRINT(1)"}
    assert worker.get("/v1/agents/agent_plugin_001/memory")[1]["entries"][0]["importance"] == 0.8


def test_the_performance_dashboard_reports_a_running_worker(deployment: Deployment) -> None:
    deployment.env["BLACKROAD_MEMORY_SEARCH"] = "off"
    worker = deployment.worker().start().wait_ready()
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(task(f"agent_perf_{n:03d}")) for n in range(50)])
    wait_until(lambda: worker.stats()["completed_tasks"] == 50, 30, what="the tasks done")
    asking = threading.Event()

    def ask() -> None:
        while not asking.is_set():
            worker.get("/v1/agents/agent_perf_001")

    reader = threading.Thread(target=ask)
    reader.start()
    try:
        shown = _blackroad(deployment, "perf", "--url", worker.url, "--interval", "1")
    finally:
        asking.set()
        reader.join()
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "BLACKROAD PERFORMANCE"
    rate = float(next(line for line in lines if "Requests/s:" in line).split(":")[1].replace(",", ""))
    assert rate > 10
    assert "  ✓ API latency P50 < 50 ms" in lines and "  Tasks/min: 50" in lines
    down = _blackroad(deployment, "perf", "--url", "http://127.0.0.1:9", "--interval", "0.1")
    assert down.returncode == 1 and "do not answer" in down.stderr


def test_a_taken_web_port_stops_the_worker_with_one_line(deployment: Deployment) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = _blackroad(deployment, "worker", "--web-port", str(port))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"blackroad: cannot serve the web views on 127.0.0.1:{port}: Address already in use "
        "(BLACKROAD_WEB_PORT; is another worker running?)"
    ]


def test_json_logs_give_one_object_per_record(deployment: Deployment) -> None:
    deployment.env.update(BLACKROAD_LOG_FORMAT="JSON", BLACKROAD_MEMORY_SEARCH="off")
    worker = deployment.worker().start().wait_ready()
    produce(deployment.bootstrap, deployment.topic("tasks"), [record(task("agent_logs_001"))])
    wait_until(lambda: worker.stats()["completed_tasks"] == 1, 30, what="the task done")
    worker.stop()
    lines = worker.log_path.read_text().splitlines()
    records = [orjson.loads(line) for line in lines if line.startswith("{")]
    assert len(records) >= 10, lines[:20]
    assert all(set(r) >= {"ts", "level", "logger", "process", "message"} for r in records)
    assert {r["level"] for r in records} >= {"info"} and records[0]["ts"].endswith("+00:00")
    assert not [line for line in lines if re.match(r"\[\d{4}-\d\d-\d\d ", line)]  # no record in the text format
