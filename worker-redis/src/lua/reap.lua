-- ARGV[1]: most to reclaim in this call; ARGV[2]: channel
-- Returns: how many expired leases went back to pending (attempt + 1)
-- Invariant: atomic, so many reapers at once reclaim each expired lease exactly once.
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(expired) do
  drop_lease(id)
  local attempt = attempt_of(id)
  append_history(id, attempt, 'lease expired: the worker stopped beating', now)
  redis.call('HSET', KEYS[6], id, attempt + 1)
  redis.call('HSET', KEYS[8], id, now)
  redis.call('RPUSH', KEYS[1], id)
end
if #expired > 0 then
  redis.call('PUBLISH', ARGV[2], #expired)
end
return #expired
