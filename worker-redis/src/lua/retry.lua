-- ARGV[1]: id; ARGV[2]: token; ARGV[3]: delay (ms); ARGV[4]: error; ARGV[5]: channel
-- Returns: 1 when scheduled (attempt + 1, error in history), 0 when the token does not own it
if not owned(ARGV[1], ARGV[2]) then
  return 0
end
local id, delay = ARGV[1], tonumber(ARGV[3])
local now = now_ms()
redis.call('ZREM', KEYS[2], id)
local attempt = meta_of(id)
append_history(id, attempt, ARGV[4], now)
local due = tostring(now + delay)
set_meta(id, tostring(tonumber(attempt) + 1), due, '')
if delay > 0 then
  redis.call('ZADD', KEYS[4], due, id)
else
  redis.call('RPUSH', KEYS[1], id)
  redis.call('PUBLISH', ARGV[5], 1)
end
return 1
