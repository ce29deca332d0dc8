-- ARGV[1]: notify channel; ARGV[2..]: triples of id, envelope JSON, delay (ms)
-- Returns: {0} when written; {1, id} when id is already live in the queue (nothing written)
-- Invariant: all or nothing; a job id is live at most once per queue.
-- Cost: five commands per batch of up to 333 jobs.
local ids, fields = {}, {}
for i = 2, #ARGV, 3 do
  ids[#ids + 1] = ARGV[i]
  fields[#fields + 1] = e(ARGV[i])
end
local seen = {}
local live = hmget_all(KEYS[3], fields)
for i, id in ipairs(ids) do
  if seen[id] or live[i] then
    return {'1', id}
  end
  seen[id] = true
end
local now = now_ms()
-- Formatted once: Lua turns each number into text, which is costly.
local now_text = tostring(now)
local writes, ready, delayed = {}, {}, {}
for i = 2, #ARGV, 3 do
  local id, delay = ARGV[i], tonumber(ARGV[i + 2])
  local due = now_text
  if delay > 0 then
    due = tostring(now + delay)
    delayed[#delayed + 1] = due
    delayed[#delayed + 1] = id
  else
    ready[#ready + 1] = id
  end
  writes[#writes + 1] = e(id)
  writes[#writes + 1] = ARGV[i + 1]
  writes[#writes + 1] = m(id)
  writes[#writes + 1] = '1|' .. due .. '|'
end
chunked_pairs('HSET', KEYS[3], writes)
chunked_pairs('ZADD', KEYS[4], delayed)
chunked('RPUSH', KEYS[1], ready)
if #ready > 0 then
  redis.call('PUBLISH', ARGV[1], #ready)
end
return {'0'}
