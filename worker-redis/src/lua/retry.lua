-- ARGV[1]: id; ARGV[2]: token; ARGV[3]: delay (ms); ARGV[4]: error; ARGV[5]: channel
-- Returns: 1 when scheduled (attempt + 1, error in history), 0 when the token does not own it
if not owned(ARGV[1], ARGV[2]) then
  return 0
end
local id, delay = ARGV[1], tonumber(ARGV[3])
local now = now_ms()
drop_lease(id)
local attempt = attempt_of(id)
append_history(id, attempt, ARGV[4], now)
redis.call('HSET', KEYS[6], id, attempt + 1)
redis.call('HSET', KEYS[8], id, now + delay)
if delay > 0 then
  redis.call('ZADD', KEYS[5], now + delay, id)
else
  redis.call('RPUSH', KEYS[1], id)
  redis.call('PUBLISH', ARGV[5], 1)
end
return 1
