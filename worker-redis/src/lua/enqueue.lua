-- ARGV[1]: notify channel; ARGV[2..]: triples of id, envelope JSON, delay (ms)
-- Returns: {0} when written; {1, id} when id is already live in the queue (nothing written)
-- Invariant: all or nothing; a job id is live at most once per queue.
local seen = {}
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  if seen[id] or redis.call('HEXISTS', KEYS[4], id) == 1 then
    return {'1', id}
  end
  seen[id] = true
end
local now = now_ms()
local ready = 0
for i = 2, #ARGV, 3 do
  local id, env, delay = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  redis.call('HSET', KEYS[4], id, env)
  redis.call('HSET', KEYS[6], id, 1)
  if delay > 0 then
    redis.call('ZADD', KEYS[5], now + delay, id)
    redis.call('HSET', KEYS[8], id, now + delay)
  else
    redis.call('RPUSH', KEYS[1], id)
    redis.call('HSET', KEYS[8], id, now)
    ready = ready + 1
  end
end
if ready > 0 then
  redis.call('PUBLISH', ARGV[1], ready)
end
return {'0'}
