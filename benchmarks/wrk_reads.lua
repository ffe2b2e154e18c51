-- wrk script for benchmarks/reads.py: the read mix of GET views, paced.
-- Arguments: a file of agent ids, a file of task ids (one a line), and the pause in ms each
-- connection makes before each request (so that connections x requests a second ~ the rate).
-- Mix: agent detail 40%, task detail 30%, stats 15%, agent list 15%. Prints one JSON line
-- with the X-Staleness-Ms values' P50/P99 and the count of answers >= 500.
local agents, tasks, pause = {}, {}, 0
local threads = {}

local function lines(path)
  local found = {}
  for line in io.lines(path) do
    if #line > 0 then found[#found + 1] = line end
  end
  return found
end

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  agents = lines(args[1])
  tasks = lines(args[2])
  pause = tonumber(args[3]) or 0
  staleness = {}
  errors = 0
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

function delay()
  return pause
end

function request()
  local pick = math.random(1, 100)
  local path
  if pick <= 40 then
    path = "/v1/agents/" .. agents[math.random(1, #agents)]
  elseif pick <= 70 and #tasks > 0 then
    path = "/v1/tasks/" .. tasks[math.random(1, #tasks)]
  elseif pick <= 85 then
    path = "/v1/stats"
  else
    path = "/v1/agents?limit=20"
  end
  return wrk.format("GET", path)
end

function response(status, headers, body)
  if status >= 500 then errors = errors + 1 end
  local stale = headers["X-Staleness-Ms"] or headers["x-staleness-ms"]
  if stale then staleness[#staleness + 1] = tonumber(stale) end
end

function done(summary, latency, requests)
  local all, failed = {}, 0
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("errors")
    local values = thread:get("staleness")
    for i = 1, #values do all[#all + 1] = values[i] end
  end
  table.sort(all)
  local function at(share)
    if #all == 0 then return -1 end
    return all[math.min(#all, math.floor(share * #all) + 1)]
  end
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "errors": %d, "socket_errors": %d, "staleness_p50_ms": %s, "staleness_p99_ms": %s}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    failed, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    at(0.5), at(0.99)))
end
