-- wrk script: GET /v1/agents/{id} for agents picked at random from the bench load's
-- agent_load_00001 .. agent_load_N (N is the script's first argument).
local agents = 30000

function init(args)
  agents = tonumber(args[1]) or agents
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

function request()
  return wrk.format("GET", string.format("/v1/agents/agent_load_%05d", math.random(1, agents)))
end
