-- ARGV[1..]: ids (none: every dead letter)
-- Returns: how many dead letters were dropped
local ids = ARGV
if #ids == 0 then
  ids = redis.call('ZRANGE', KEYS[5], 0, -1)
end
local dropped = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[5], id) == 1 then
    redis.call('HDEL', KEYS[6], e(id), r(id), m(id), h(id))
    dropped = dropped + 1
  end
end
return dropped
