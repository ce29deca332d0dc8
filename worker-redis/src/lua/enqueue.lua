-- ARGV[1]: notify channel; ARGV[2..]: triples of id, envelope JSON, delay (ms)
-- Returns: {0} when written; {1, id} when id is already live in the queue (nothing written)
-- Invariant: all or nothing; a job id is live at most once per queue.
-- Cost: a fixed handful of commands per 500 jobs, whatever the batch's size.
local ids = {}
for i = 2, #ARGV, 3 do
  ids[#ids + 1] = ARGV[i]
end
local seen = {}
local live = hmget_all(KEYS[4], ids)
for i, id in ipairs(ids) do
  if seen[id] or live[i] then
    return {'1', id}
  end
  seen[id] = true
end
local now = now_ms()
-- Formatted once: Lua turns each number argument into text, which is costly.
local now_text = tostring(now)
local envs, attempts, dues, ready, delayed = {}, {}, {}, {}, {}
for i = 2, #ARGV, 3 do
  local id, delay = ARGV[i], tonumber(ARGV[i + 2])
  envs[#envs + 1] = id
  envs[#envs + 1] = ARGV[i + 1]
  attempts[#attempts + 1] = id
  attempts[#attempts + 1] = '1'
  dues[#dues + 1] = id
  if delay > 0 then
    local at = tostring(now + delay)
    dues[#dues + 1] = at
    delayed[#delayed + 1] = at
    delayed[#delayed + 1] = id
  else
    dues[#dues + 1] = now_text
    ready[#ready + 1] = id
  end
end
chunked('HSET', KEYS[4], envs)
chunked('HSET', KEYS[6], attempts)
chunked('HSET', KEYS[8], dues)
chunked('ZADD', KEYS[5], delayed)
chunked('RPUSH', KEYS[1], ready)
if #ready > 0 then
  redis.call('PUBLISH', ARGV[1], #ready)
end
return {'0'}
