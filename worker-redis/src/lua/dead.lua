-- ARGV[1]: id; ARGV[2]: token; ARGV[3]: reason
-- Returns: 1 when dead-lettered (envelope, reason and history kept), 0 when the token
-- does not own it
if not owned(ARGV[1], ARGV[2]) then
  return 0
end
local id = ARGV[1]
local now = now_ms()
drop_lease(id)
append_history(id, attempt_of(id), ARGV[3], now)
local env = redis.call('HGET', KEYS[4], id)
redis.call('HDEL', KEYS[4], id)
redis.call('HDEL', KEYS[8], id)
if env then
  redis.call('HSET', KEYS[10], id, env)
end
redis.call('HSET', KEYS[11], id, ARGV[3])
redis.call('ZADD', KEYS[9], now, id)
return 1
