-- ARGV[1]: most to reclaim in this call; ARGV[2]: channel
-- Returns: how many expired leases went back to pending (attempt + 1)
-- Invariant: atomic, so many reapers at once reclaim each expired lease exactly once.
local now = now_ms()
local now_text = tostring(now)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  local attempt = meta_of(id)
  append_history(id, attempt, 'lease expired: the worker stopped beating', now)
  set_meta(id, tostring(tonumber(attempt) + 1), now_text, '')
  redis.call('RPUSH', KEYS[1], id)
end
if #expired > 0 then
  redis.call('PUBLISH', ARGV[2], #expired)
end
return #expired
