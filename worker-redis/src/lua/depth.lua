-- Returns: {pending, in_flight, delayed, delayed_due, dead, oldest pending age (ms, -1 if none)}
local now = now_ms()
local head = redis.call('LINDEX', KEYS[1], 0)
local age = -1
if head then
  local _, due = meta_of(head)
  local since = tonumber(due)
  if since == 0 then
    since = now
  end
  age = math.max(0, now - since)
end
return {
  redis.call('LLEN', KEYS[1]),
  redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[4]),
  redis.call('ZCOUNT', KEYS[4], '-inf', now),
  redis.call('ZCARD', KEYS[5]),
  age,
}
