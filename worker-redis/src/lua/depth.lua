-- Returns: {pending, in_flight, delayed, delayed_due, dead, oldest pending age (ms, -1 if none)}
local now = now_ms()
local head = redis.call('LINDEX', KEYS[1], 0)
local age = -1
if head then
  local since = tonumber(redis.call('HGET', KEYS[8], head) or now)
  age = math.max(0, now - since)
end
return {
  redis.call('LLEN', KEYS[1]),
  redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[5]),
  redis.call('ZCOUNT', KEYS[5], '-inf', now),
  redis.call('ZCARD', KEYS[9]),
  age,
}
