-- ARGV[1..]: ids (none: every dead letter)
-- Returns: how many dead letters were dropped
local ids = ARGV
if #ids == 0 then
  ids = redis.call('ZRANGE', KEYS[9], 0, -1)
end
local dropped = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[9], id) == 1 then
    for _, k in ipairs({10, 11, 6, 7}) do
      redis.call('HDEL', KEYS[k], id)
    end
    dropped = dropped + 1
  end
end
return dropped
