// The live dashboard: polls the worker that serves it and shows the figures.
//
// Deployment-wide figures come from GET /v1/stats and GET /v1/agents (any worker answers
// for all of them); the ones marked "this worker" come from this worker's GET /metrics.
// With API tokens required for reads, open /dashboard#token=<token>: the token is sent as
// "Authorization: Bearer" and, being in the fragment, never reaches the server in the URL.
(() => {
  "use strict";

  const INTERVAL_SECONDS = 2;
  // Throughput samples the sparkline shows (three minutes at one every two seconds).
  const SPARKLINE_SAMPLES = 90;
  // As schemas/domain.py's AGENT_STATUSES.
  const AGENT_STATUSES = ["offline", "idle", "busy", "paused"];
  // The Prometheus series read from /metrics (streams/processing/metrics.py).
  const METRIC = {
    consumerLag: "blackroad_consumer_lag_records",
    eventsIn: "blackroad_events_in_total",
    deadLettered: "blackroad_dead_lettered_total",
    handlerErrors: "blackroad_handler_errors_total",
    residentMemory: "process_resident_memory_bytes",
  };

  class Refused extends Error {
    constructor(path, status) {
      super(`${path} answered ${status}`);
      this.status = status;
    }
  }

  function token() {
    return new URLSearchParams(location.hash.slice(1)).get("token");
  }

  async function get(path, as) {
    const headers = {};
    const given = token();
    if (given) headers.Authorization = `Bearer ${given}`;
    const response = await fetch(path, { headers, cache: "no-store" });
    if (!response.ok) throw new Refused(path, response.status);
    return as === "text" ? response.text() : response.json();
  }

  // Prometheus text format: one "name{labels} value" sample a line.
  const SAMPLE = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /(\w+)="((?:[^"\\]|\\.)*)"/g;

  function parseMetrics(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      const found = line.startsWith("#") ? null : SAMPLE.exec(line);
      if (!found) continue;
      const labels = {};
      for (const [, name, value] of (found[2] || "").matchAll(LABEL)) labels[name] = value;
      samples.push({ name: found[1], labels, value: Number(found[3]) });
    }
    return samples;
  }

  function total(samples, name) {
    return samples.filter((s) => s.name === name).reduce((sum, s) => sum + s.value, 0);
  }

  function byLabel(samples, name, label) {
    const found = {};
    for (const s of samples) if (s.name === name) found[s.labels[label]] = (found[s.labels[label]] || 0) + s.value;
    return found;
  }

  // A rate from two readings of a counter; null until there are two, or after a reset.
  function rate(now, before, key) {
    if (!before || now[key] == null || before[key] == null || now[key] < before[key]) return null;
    const seconds = (now.at - before.at) / 1000;
    return seconds > 0 ? (now[key] - before[key]) / seconds : null;
  }

  const number = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

  function show(figure, value) {
    const element = document.querySelector(`[data-figure="${figure}"]`);
    const known = typeof value === "number" && Number.isFinite(value);
    const unit = element.dataset.unit ? ` ${element.dataset.unit}` : "";
    element.dataset.value = known ? String(value) : "";
    element.textContent = known ? number.format(value) + unit : "–";
  }

  function showReasons(counts) {
    const list = document.getElementById("dead_letter_reasons");
    const reasons = Object.entries(counts).sort((a, b) => b[1] - a[1]);
    list.replaceChildren(
      ...(reasons.length ? reasons : [["none", null]]).map(([reason, count]) => {
        const item = document.createElement("li");
        item.textContent = count == null ? reason : `${reason}: ${number.format(count)}`;
        return item;
      }),
    );
  }

  function drawSparkline(values) {
    const canvas = document.getElementById("sparkline");
    // Drawn at the size it is shown, in device pixels (sharp, not stretched).
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    const scale = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * scale);
    canvas.height = Math.round(height * scale);
    const context = canvas.getContext("2d");
    context.scale(scale, scale);
    const known = values.filter((v) => v != null);
    canvas.dataset.samples = String(known.length);
    if (known.length < 2) return;
    const top = Math.max(...known, 1);
    const step = width / (SPARKLINE_SAMPLES - 1);
    const start = width - step * (values.length - 1);
    const style = getComputedStyle(document.body);
    context.fillStyle = style.getPropertyValue("--muted");
    context.font = "12px system-ui, sans-serif";
    context.fillText(`peak ${number.format(top)} / s`, 4, 12);
    context.strokeStyle = style.getPropertyValue("--accent");
    context.lineWidth = 2;
    context.beginPath();
    let drawing = false; // a sample not known (no earlier reading, a reset) leaves a gap
    values.forEach((v, i) => {
      if (v == null) {
        drawing = false;
        return;
      }
      const x = start + i * step;
      const y = height - 2 - (v / top) * (height - 4);
      if (drawing) context.lineTo(x, y);
      else context.moveTo(x, y);
      drawing = true;
    });
    context.stroke();
  }

  function setStatus(text, failing) {
    const status = document.getElementById("status");
    status.textContent = text;
    status.classList.toggle("failing", failing);
  }

  function explain(error) {
    if (error instanceof Refused && error.status === 401) {
      return "this deployment needs an API token for reads: open /dashboard#token=<your token>";
    }
    if (error instanceof Refused && error.status === 503) return "the worker is recovering its tables; retrying";
    return `cannot read the figures (${error.message}); retrying`;
  }

  let previous = null;
  const throughputs = [];

  async function refresh() {
    const [stats, metricsText, ...agentPages] = await Promise.all([
      get("/v1/stats"),
      get("/metrics", "text"),
      ...AGENT_STATUSES.map((status) => get(`/v1/agents?status=${status}&limit=1`)),
    ]);
    const samples = parseMetrics(metricsText);
    const reading = {
      at: performance.now(),
      completed: stats.completed_tasks,
      eventsIn: total(samples, METRIC.eventsIn),
    };
    const throughput = rate(reading, previous, "completed");
    const eventsIn = rate(reading, previous, "eventsIn");
    previous = reading;

    show("throughput", throughput);
    throughputs.push(throughput);
    if (throughputs.length > SPARKLINE_SAMPLES) throughputs.shift();
    drawSparkline(throughputs);
    show("tasks_per_minute", stats.tasks_per_minute);
    show("completed_tasks", stats.completed_tasks);
    show("failed_tasks", stats.failed_tasks);
    show("dead_tasks", stats.dead_tasks);
    show("duplicate_tasks", stats.duplicate_tasks);
    for (const p of ["p50", "p95", "p99"]) {
      show(`task_latency_${p}`, stats.task_latency_ms[p]);
      show(`handler_latency_${p}`, stats.handler_latency_ms[p]);
    }
    AGENT_STATUSES.forEach((status, i) => show(`agents_${status}`, agentPages[i].total));
    show("active_agents", stats.active_agents);
    show("pending_tasks", stats.pending_tasks);
    show("in_progress_tasks", stats.in_progress_tasks);
    show("history_lag", stats.history_lag);
    show("consumer_lag", total(samples, METRIC.consumerLag));
    show("events_in_per_second", eventsIn);
    show("dead_lettered_events", stats.dead_lettered_events);
    show("handler_errors", total(samples, METRIC.handlerErrors));
    showReasons(byLabel(samples, METRIC.deadLettered, "reason"));
    show("memory_ops_per_second", stats.memory_ops_per_second);
    show("resident_memory", total(samples, METRIC.residentMemory) / 2 ** 20);
  }

  async function run() {
    document.getElementById("worker").textContent = location.host;
    document.getElementById("interval").textContent = String(INTERVAL_SECONDS);
    for (;;) {
      try {
        await refresh();
        setStatus(`updated ${new Date().toLocaleTimeString()}`, false);
      } catch (error) {
        setStatus(explain(error), true);
      }
      await new Promise((resolve) => setTimeout(resolve, INTERVAL_SECONDS * 1000));
    }
  }

  run();
})();
